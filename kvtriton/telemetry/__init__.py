"""OpenTelemetry helpers (API only: the SDK, exporters and readers are the application's choice).

``get_tracer``/``get_meter`` take an optional provider, else the global one. ``is_tracing(tracer)``
tells whether spans would be recorded, so hot paths skip span creation entirely under the API's no-op
(or not-yet-configured proxy) tracer and cost nothing beyond one attribute check.
"""

from .otel import (INSTRUMENTATION_NAME, Instrumentation, get_meter, get_tracer, is_tracing,
                   null_span)

__all__ = ["INSTRUMENTATION_NAME", "Instrumentation", "get_meter", "get_tracer", "is_tracing",
           "null_span"]
