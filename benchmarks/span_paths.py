"""Micro-benchmark: the cost of one SERVER span through the SDK's span object vs a one-shot ReadableSpan.

    .venv/bin/python -m benchmarks.span_paths

Not part of `make bench`: it measures the idea behind the next optimisation of the Flask hot path
(record the request in a light object, hand the SDK's processors one finished ``ReadableSpan``),
which is only sound once user code can still enrich the current span (see docs/performance.md).
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
    """Measure both paths against the same provider, processor and file exporter."""
    os.environ.update(SPYGLASS_METRICS_PORT="0", OTEL_TRACES_EXPORTER="none", SPYGLASS_LOG_FLUSH_INTERVAL="1")
    from opentelemetry import context, trace
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

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

    ids, sampler, resource = provider.id_generator, provider.sampler, provider.resource
    scope = tracer._instrumentation_scope  # private, but this is a measurement, not product code
    processor = provider._active_span_processor

    def one_shot_span() -> None:
        start = time.time_ns()
        trace_id, span_id = ids.generate_trace_id(), ids.generate_span_id()
        sampler.should_sample(None, trace_id, "GET", SpanKind.SERVER, ATTRIBUTES)
        span_context = SpanContext(trace_id, span_id, False, TraceFlags(TraceFlags.SAMPLED))
        context.detach(context.attach(trace.set_span_in_context(NonRecordingSpan(span_context))))
        attributes = {**ATTRIBUTES, "http.response.status_code": 200, "http.route": "/"}
        processor.on_end(
            ReadableSpan(
                name="GET /",
                context=span_context,
                resource=resource,
                attributes=attributes,
                kind=SpanKind.SERVER,
                start_time=start,
                end_time=time.time_ns(),
                instrumentation_scope=scope,
            )
        )

    sdk = _measure("SDK span object", sdk_span)
    lean = _measure("one-shot ReadableSpan", one_shot_span)
    print(f"one-shot ÷ SDK = {lean / sdk:.2f}", file=sys.stderr)
    runtime.shutdown()


if __name__ == "__main__":
    main()
