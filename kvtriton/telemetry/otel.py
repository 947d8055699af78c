"""Tracer and meter access over the OpenTelemetry API, cheap when no SDK is configured."""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterable

from opentelemetry import metrics, trace
from opentelemetry.metrics import _internal as _mi  # the global provider slot, read on hot paths

INSTRUMENTATION_NAME = "kvtriton"

try:  # the version is informative only
    from .. import __version__ as _VERSION
except Exception:  # pragma: no cover - partial import during package init
    _VERSION = None


def get_tracer(tracer_provider=None):
    """A tracer from ``tracer_provider``, else from the global provider (a proxy until one is set)."""
    if tracer_provider is not None:
        return tracer_provider.get_tracer(INSTRUMENTATION_NAME, _VERSION)
    return trace.get_tracer(INSTRUMENTATION_NAME, _VERSION)


_lock = threading.Lock()
_global_meter = None
_meters: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()     # provider -> meter
_observed: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # meter -> {name: [read, ...]}


def get_meter(meter_provider=None):
    """The meter of ``meter_provider``, else of the global provider (a proxy until one is set).

    One meter per provider, shared by every component, so that instruments registered under one name
    by several pools are one instrument (an SDK keeps only the first registration of a name).
    """
    global _global_meter
    with _lock:
        if meter_provider is None:
            if _global_meter is None:
                _global_meter = metrics.get_meter(INSTRUMENTATION_NAME, _VERSION)
            return _global_meter
        m = _meters.get(meter_provider)
        if m is None:
            m = meter_provider.get_meter(INSTRUMENTATION_NAME, _VERSION)
            _meters[meter_provider] = m
        return m


def is_tracing(tracer) -> bool:
    """Whether spans started on ``tracer`` would be recorded by some SDK.

    The global proxy tracer resolves its real tracer only once a provider has been set, so this is
    re-evaluated per call (one property access) rather than fixed when the tracer was created.
    """
    if isinstance(tracer, trace.ProxyTracer):
        tracer = tracer._tracer  # noqa: SLF001 - resolves the delegate once a provider exists
    return not isinstance(tracer, trace.NoOpTracer)


@contextlib.contextmanager
def null_span():
    yield None


class Instrumentation:
    """The spans and instruments of one component (a pool), created once.

    ``span(name, **attributes)`` returns a real span context manager only while tracing is on.
    Counters that the component already keeps as plain integers are exported as observable counters
    read at collection time, so the hot path never touches the metrics API for them.
    """

    def __init__(self, tracer_provider=None, meter_provider=None, attributes: dict | None = None):
        self.tracer = get_tracer(tracer_provider)
        self.meter = get_meter(meter_provider)
        self.attributes = dict(attributes or {})
        self._gauges: list[Any] = []
        # An explicit provider's tracer never changes kind: decide once. The global proxy may gain a
        # real provider later, so it is re-checked until it has one.
        self._fixed: bool | None = None if isinstance(self.tracer, trace.ProxyTracer) else is_tracing(self.tracer)
        self._meter_fixed: bool | None = (None if meter_provider is None
                                          else not isinstance(self.meter, metrics.NoOpMeter))

    @property
    def metering(self) -> bool:
        """Whether synchronous instruments would record anything (checked like ``tracing``)."""
        fixed = self._meter_fixed
        if fixed is not None:
            return fixed
        if _mi._METER_PROVIDER is None:  # noqa: SLF001 - no global provider set yet: no-op
            return False
        self._meter_fixed = not isinstance(_mi._METER_PROVIDER, metrics.NoOpMeterProvider)
        return self._meter_fixed

    @property
    def tracing(self) -> bool:
        fixed = self._fixed
        if fixed is not None:
            return fixed
        if trace._TRACER_PROVIDER is None:  # noqa: SLF001 - no global provider set yet: no-op
            return False
        self._fixed = is_tracing(self.tracer)
        return self._fixed

    def span(self, name: str, **attributes):
        if not self.tracing:
            return null_span()
        attrs = dict(self.attributes)
        attrs.update(attributes)
        return self.tracer.start_as_current_span(name, attributes=attrs)

    def histogram(self, name: str, unit: str, description: str):
        return self.meter.create_histogram(name, unit=unit, description=description)

    def observe(self, name: str, kind: str, unit: str, description: str,
                read: Callable[[], Iterable[tuple[float, dict]] | None]):
        """Report ``(value, attributes)`` pairs from ``read()`` under the observable ``kind``
        ("counter", "updown", "gauge") named ``name``, at collection time.

        Every component observing ``name`` on the same meter shares one instrument; ``read`` returning
        None means its component is gone, and it is dropped.
        """
        from opentelemetry.metrics import Observation

        make = {"counter": self.meter.create_observable_counter,
                "updown": self.meter.create_observable_up_down_counter,
                "gauge": self.meter.create_observable_gauge}
        if kind not in make:
            raise ValueError(f"kind must be one of {sorted(make)}, got {kind!r}")
        with _lock:
            by_name = _observed.get(self.meter)
            if by_name is None:
                by_name = _observed[self.meter] = {}
            readers = by_name.get(name)
            if readers is not None:
                readers.append(read)
                return
            readers = by_name[name] = [read]

        def callback(_options, readers=readers):
            out = []
            for r in list(readers):
                got = r()
                if got is None:
                    with _lock:
                        if r in readers:
                            readers.remove(r)
                    continue
                out.extend(Observation(v, a) for v, a in got)
            return out

        self._gauges.append(make[kind](name, callbacks=[callback], unit=unit, description=description))
