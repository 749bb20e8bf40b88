"""The floor of request telemetry: the unavoidable parts, and nothing else, around a WSGI app.

Per request: one SERVER span through the OpenTelemetry SDK (a ``BatchSpanProcessor`` feeding the
exporter given, the attributes spyglass sets), one observation of a route-labelled
prometheus_client histogram (in the registry given: a multi-process directory under gunicorn),
and one structlog context bind of the trace and span ids, undone after the request. No access
log, no error handling, no propagation: what any instrumentation giving traces, metrics and
correlated logs has to pay at least. The benchmarks measure spyglass against it
(:mod:`benchmarks.http_overhead` in-process, :mod:`benchmarks.http_load` under gunicorn).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from prometheus_client import CollectorRegistry

__all__ = ["BUCKETS", "WsgiApp", "floor_middleware"]

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
"""The buckets of ``http.server.request.duration`` (OTel's advice), for the floor's histogram."""

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def floor_middleware(
    inner: WsgiApp, exporter: SpanExporter, route: str, registry: CollectorRegistry | None = None
) -> tuple[WsgiApp, TracerProvider]:
    """Wrap ``inner`` (serving ``route``) in the floor; return the wrapped app and its tracer provider.

    The caller flushes and shuts the provider down. Without ``registry``, the histogram is in a
    registry of its own (no endpoint).
    """
    import structlog
    from opentelemetry import context, trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from prometheus_client import CollectorRegistry, Histogram

    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("bench.floor")
    histogram = Histogram(
        "http_server_request_duration_seconds",
        "Duration of HTTP server requests.",
        ["http_request_method", "http_route", "http_response_status_code"],
        buckets=BUCKETS,
        registry=registry if registry is not None else CollectorRegistry(),
    )
    bind, reset = structlog.contextvars.bind_contextvars, structlog.contextvars.reset_contextvars
    name = f"GET {route}"

    def floor_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.perf_counter()
        span = tracer.start_span(
            name,
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.request.method": environ["REQUEST_METHOD"],
                "url.path": environ["PATH_INFO"],
                "url.scheme": environ["wsgi.url_scheme"],
                "server.address": environ["SERVER_NAME"],
                "server.port": int(environ["SERVER_PORT"]),
                "client.address": environ.get("REMOTE_ADDR", ""),
                "network.protocol.version": "1.1",
            },
        )
        token = context.attach(trace.set_span_in_context(span))
        ids = span.get_span_context()
        bound = bind(trace_id=f"{ids.trace_id:032x}", span_id=f"{ids.span_id:016x}")
        try:
            body = inner(environ, start_response)
        finally:
            reset(**bound)
            context.detach(token)
            span.set_attributes({"http.route": route, "http.response.status_code": 200})
            span.end()
            histogram.labels("GET", route, "200").observe(time.perf_counter() - started)
        return body

    return floor_app, provider
