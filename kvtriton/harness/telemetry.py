"""OpenTelemetry SDK set-up for a run: the library's spans and metrics go to the console or an OTLP endpoint.

kvtriton itself uses only the OpenTelemetry API; until an SDK provider is installed its spans are no-ops.
``setup_telemetry(cfg.telemetry)`` installs a TracerProvider and a MeterProvider as the global ones,
with a console exporter (``exporter: console``, to stderr) or OTLP over HTTP (``exporter: otlp``, to
``endpoint``/v1/traces and /v1/metrics). ``Telemetry.shutdown()`` flushes both at the end of the run.

The global providers can be set once per process; a process that runs several jobs (joblib workers)
keeps the first set-up and reuses it when the next job asks for the same exporter.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

_ACTIVE: dict[str, Any] = {}


@dataclass
class Telemetry:
    exporter: str
    tracer_provider: Any = None
    meter_provider: Any = None

    @property
    def enabled(self) -> bool:
        return self.tracer_provider is not None

    def tracer(self):
        from opentelemetry import trace

        return trace.get_tracer("kvtriton.harness")

    def flush(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()
        if self.meter_provider is not None:
            self.meter_provider.force_flush()

    def shutdown(self) -> None:
        """Flush everything exported so far; the providers stay installed for later jobs in this process."""
        self.flush()


def _key(tcfg) -> str:
    return f"{tcfg.exporter}|{tcfg.endpoint}|{tcfg.service_name}"


def setup_telemetry(tcfg, attributes: dict | None = None) -> Telemetry:
    """Install the SDK providers described by ``tcfg`` (a ``TelemetryConf``) and return a handle."""
    exporter = getattr(tcfg.exporter, "value", tcfg.exporter)
    if exporter == "none":
        return Telemetry("none")
    key = _key(tcfg)
    if key in _ACTIVE:
        return _ACTIVE[key]
    if _ACTIVE:
        # A different exporter was installed earlier in this process; the OTel API keeps the first.
        prev = next(iter(_ACTIVE.values()))
        print(f"telemetry: keeping the {prev.exporter} exporter set up earlier in this process",
              file=sys.stderr)
        return prev

    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({"service.name": tcfg.service_name, **(attributes or {})})
    if exporter == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        span_exporter = ConsoleSpanExporter(out=sys.stderr)
        metric_exporter = ConsoleMetricExporter(out=sys.stderr)
        processor = SimpleSpanProcessor(span_exporter)
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        base = str(tcfg.endpoint).rstrip("/")
        headers = dict(tcfg.headers or {})
        span_exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=headers)
        metric_exporter = OTLPMetricExporter(endpoint=f"{base}/v1/metrics", headers=headers)
        processor = BatchSpanProcessor(span_exporter)
    else:
        raise ValueError(f"telemetry.exporter must be one of none, console, otlp, got {exporter!r}")

    tp = TracerProvider(resource=resource)
    tp.add_span_processor(processor)
    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=int(tcfg.export_interval_ms))
    mp = MeterProvider(resource=resource, metric_readers=[reader])
    trace.set_tracer_provider(tp)
    metrics.set_meter_provider(mp)
    handle = Telemetry(exporter, tp, mp)
    _ACTIVE[key] = handle
    return handle
