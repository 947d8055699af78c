"""Tracer and meter access over the OpenTelemetry API, cheap when no SDK is configured."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

from opentelemetry import metrics, trace

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


def get_meter(meter_provider=None):
    """A meter from ``meter_provider``, else from the global provider (a proxy until one is set)."""
    if meter_provider is not None:
        return meter_provider.get_meter(INSTRUMENTATION_NAME, _VERSION)
    return metrics.get_meter(INSTRUMENTATION_NAME, _VERSION)


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
        from opentelemetry.metrics import _internal as _mi
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
                read: Callable[[], Iterable[tuple[float, dict]]]):
        """Register an observable ``kind`` ("counter", "updown", "gauge") whose callback yields
        ``(value, attributes)`` pairs from ``read()`` at collection time."""
        from opentelemetry.metrics import Observation

        def callback(_options):
            return [Observation(v, a) for v, a in read()]

        make = {"counter": self.meter.create_observable_counter,
                "updown": self.meter.create_observable_up_down_counter,
                "gauge": self.meter.create_observable_gauge}
        if kind not in make:
            raise ValueError(f"kind must be one of {sorted(make)}, got {kind!r}")
        inst = make[kind](name, callbacks=[callback], unit=unit, description=description)
        self._gauges.append(inst)
        return inst
