"""Micro-benchmark: one SERVER span through the SDK's span object vs spyglass's LightSpan.

    .venv/bin/python -m benchmarks.span_paths

Not part of `make bench` (which measures whole requests): it isolates the request thread's CPU
for the span itself, the part of the request path that `spyglass.light_span` replaces. Both
paths use the same provider, sampler, batch processor and exporter; see docs/architecture.md
("The hot path of a request").
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

REQUESTS = 50_000
ATTRIBUTES = {
    "http.request.method": "GET",
    "url.path": "/",
    "url.scheme": "http",
    "server.address": "localhost",
    "server.port": 80,
    "client.address": "127.0.0.1",
    "user_agent.original": "bench",
}


def _measure(label: str, one: Callable[[], None]) -> float:
    for _ in range(2_000):
        one()
    started = time.thread_time()
    for _ in range(REQUESTS):
        one()
    per_span = (time.thread_time() - started) / REQUESTS * 1e6
    print(f"{label:28s} {per_span:6.1f} µs/span", file=sys.stderr)
    return per_span


def main() -> None:
    """Measure both paths against the same provider, processor and file exporter (to /dev/null)."""
    os.environ.update(SPYGLASS_METRICS_PORT="0", OTEL_TRACES_EXPORTER="none", SPYGLASS_LOG_FLUSH_INTERVAL="1")
    from opentelemetry import context, trace
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind

    from spyglass import runtime
    from spyglass.otlp_json import OtlpJsonFileSpanExporter

    telemetry = runtime.init()
    provider, tracer = telemetry.tracer_provider, telemetry.tracer
    assert provider is not None and tracer is not None
    provider.add_span_processor(BatchSpanProcessor(OtlpJsonFileSpanExporter(os.devnull), max_queue_size=200_000))

    def sdk_span() -> None:
        span = tracer.start_span("GET", kind=SpanKind.SERVER, attributes=ATTRIBUTES)
        context.detach(context.attach(trace.set_span_in_context(span)))
        span.set_attributes({"http.response.status_code": 200, "http.route": "/"})
        span.update_name("GET /")
        span.end()

    starter = telemetry.server_spans
    assert starter is not None

    def server_span() -> None:
        span, _trace_id, _span_id, _sampled = starter.start("GET", None, dict(ATTRIBUTES))
        context.detach(context.attach(trace.set_span_in_context(span)))
        span.finish({"http.response.status_code": 200, "http.route": "/"}, "GET /")

    sdk = _measure("SDK span object", sdk_span)
    lean = _measure("spyglass LightSpan", server_span)
    print(f"LightSpan ÷ SDK = {lean / sdk:.2f}", file=sys.stderr)
    runtime.shutdown()


if __name__ == "__main__":
    main()
