"""The OTLP/JSON file format is exactly the protobuf ExportTraceServiceRequest, in JSON."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from google.protobuf.json_format import ParseDict
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from spyglass.light_span import LightSpanStarter
from spyglass.otlp_json import OtlpJsonFileLogExporter, OtlpJsonFileSpanExporter, spans_to_otlp_json


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


def test_a_span_with_invalid_unicode_or_unicode_line_breaks_stays_on_one_valid_line_with_its_batch(
    tmp_path: Path,
) -> None:
    """A lone surrogate in a span (say, from a mis-decoded file name) used to make the encoder raise and
    lose the whole batch; now it becomes U+FFFD, the batch is written, and NEL/U+2028/U+2029 are escaped,
    so a reader splitting on any Unicode line break still sees one JSON request per line.
    """
    path = tmp_path / "traces.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OtlpJsonFileSpanExporter(str(path))))
    tracer = provider.get_tracer("scope")
    with tracer.start_as_current_span("open\u2028file") as span:
        span.set_attribute("file.path", "/tmp/caf\udce9.txt")
        span.set_attribute("note", "a\x85b\u2029c")
    with tracer.start_as_current_span("next"):
        pass
    raw = path.read_bytes()
    text = raw.decode("utf-8")  # valid UTF-8, or this raises
    assert len(text.splitlines()) == 2 == raw.count(b"\n")
    spans = [span for line in text.splitlines() for span in _spans_of(json.loads(line))]
    assert [span["name"] for span in spans] == ["open\u2028file", "next"]
    attributes = {a["key"]: a["value"]["stringValue"] for a in spans[0]["attributes"]}
    assert attributes == {"file.path": "/tmp/caf\ufffd.txt", "note": "a\x85b\u2029c"}


def test_a_log_record_with_invalid_unicode_is_written_not_lost(tmp_path: Path) -> None:
    """The logs file exporter writes a record holding a lone surrogate (as U+FFFD), on one line."""
    path = tmp_path / "logs.jsonl"
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(OtlpJsonFileLogExporter(str(path))))
    provider.get_logger("scope").emit(body="bad \ud800 name\u2028here", attributes={"k\udfff": "v"})
    provider.force_flush()
    lines = path.read_bytes().decode("utf-8").splitlines()
    assert len(lines) == 1
    [record] = json.loads(lines[0])["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
    assert record["body"]["stringValue"] == "bad \ufffd name\u2028here"
    assert record["attributes"][0]["key"] == "k\ufffd"


def _spans_of(request: dict) -> list[dict]:
    return [
        span
        for resource_spans in request["resourceSpans"]
        for scope_spans in resource_spans["scopeSpans"]
        for span in scope_spans["spans"]
    ]


def test_exporters_of_one_file_in_one_process_report_its_outage_once(tmp_path: Path, caplog) -> None:
    """Two exporters writing the same file (a pipeline set up again while the old one drains) share
    what they know of it: one warning when writing fails, one line when it works again.
    """
    blocker = tmp_path / "blocked"
    blocker.write_text("")
    path = blocker / "traces.jsonl"
    first, second = OtlpJsonFileSpanExporter(str(path)), OtlpJsonFileSpanExporter(str(path))
    spans = sample_spans()
    with caplog.at_level("INFO", logger="spyglass.traces"):
        assert first.export(spans).name == "FAILURE"
        assert second.export(spans).name == "FAILURE"
        blocker.unlink()
        blocker.mkdir()
        assert second.export(spans).name == "SUCCESS"
        assert first.export(spans).name == "SUCCESS"
    records = [record for record in caplog.records if record.name == "spyglass.traces"]
    assert [record.getMessage() for record in records] == [
        "cannot write the traces file: spans are dropped until it can be written again",
        "writing the traces file again",
    ]
    assert records[-1].dropped == 2 * len(spans)
