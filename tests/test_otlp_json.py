"""The OTLP/JSON file format is exactly the protobuf ExportTraceServiceRequest, in JSON."""

from __future__ import annotations

import base64
import json

from google.protobuf.json_format import ParseDict
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from spyglass.light_span import LightSpanStarter
from spyglass.otlp_json import spans_to_otlp_json


def sample_spans() -> list:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "enc", "deployment.count": 3}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("scope.a", "1.0", schema_url="https://opentelemetry.io/schemas/1.26.0")
    other = provider.get_tracer("scope.b")
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1), trace_state=TraceState([("k", "v")]))
    with tracer.start_as_current_span(
        "parent",
        context=trace.set_span_in_context(trace.NonRecordingSpan(remote)),
        kind=SpanKind.SERVER,
        attributes={"s": "x", "i": 2**40, "f": 1.5, "b": True, "list": ["a", "b"], "ints": [1, 2]},
        links=[Link(remote, {"why": "batch"})],
    ) as parent:
        parent.add_event("happened", {"n": 1})
        parent.set_status(Status(StatusCode.ERROR, "broken"))
        with other.start_as_current_span("child", kind=SpanKind.CONSUMER):
            pass
    with tracer.start_as_current_span("root", kind=SpanKind.INTERNAL):
        pass
    starter = LightSpanStarter(provider, "spyglass", "9.9")
    server, *_ids = starter.start(
        "GET", trace.set_span_in_context(trace.NonRecordingSpan(remote)), {"http.request.method": "GET"}
    )
    server.set_attribute("app.items", [1, 2])
    server.record_exception(KeyError("gone"))
    server.add_link(remote, {"why": "retry"})
    server.set_status(StatusCode.ERROR, "failed")
    server.end()
    # Light spans as Celery and Flask end them, on the encoder's shortcuts: nothing added, a remote
    # parent without trace state, a local parent, no parent.
    plain_remote = SpanContext(0xABC, 0x123, is_remote=True, trace_flags=TraceFlags(1))
    run, *_ids = starter.start(
        "run/task",
        trace.set_span_in_context(trace.NonRecordingSpan(plain_remote)),
        {"celery.root_id": "r"},
        SpanKind.CONSUMER,
    )
    run.set_attributes({"celery.timelimit": ("", "30"), "celery.retries": 2})
    with trace.use_span(run, end_on_exit=True):
        child, *_ids = starter.start("child-of-run", None, {}, SpanKind.INTERNAL)
        child.end()
    orphan, *_ids = starter.start("orphan", None, {"n": 1})
    orphan.end()
    return list(exporter.get_finished_spans())


def test_file_lines_equal_the_protobuf_encoding_of_the_sdk() -> None:
    """Decoding a line back into protobuf gives exactly the SDK's own OTLP encoding (SDK and server spans)."""
    spans = sample_spans()
    assert [span.name for span in spans] == ["child", "parent", "root", "GET", "child-of-run", "run/task", "orphan"]
    document = json.loads(spans_to_otlp_json(spans))
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        assert len(span[key]) in (16, 32) and int(span[key], 16) >= 0  # hex, as OTLP/JSON requires
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
                for link in span.get("links", []):
                    for key in ("traceId", "spanId"):
                        link[key] = base64.b64encode(bytes.fromhex(link[key])).decode()
    decoded = ParseDict(document, ExportTraceServiceRequest())
    assert decoded == encode_spans(spans)
