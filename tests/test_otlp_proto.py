"""spyglass's own OTLP protobuf encoding sends what the OpenTelemetry SDK's encoder would, faster.

A collector must not be able to tell spyglass's OTLP/HTTP exports from the SDK exporters': every
span and every log line parses to the message the SDK's ``encode_spans`` / ``encode_logs`` build
from the same data, for every kind of attribute value, parent, event, link and status.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from enum import StrEnum
from http import HTTPStatus

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from spyglass.light_span import LightSpan, LightSpanStarter
from spyglass.line_writer import LineWriter
from spyglass.log_export import line_to_log_record
from spyglass.otlp_json import encode_spans_json
from spyglass.otlp_proto import encode_log_lines_request, encode_spans_request


class Colour(StrEnum):
    RED = "red"


ATTRIBUTES = {
    "http.request.method": "GET",
    "url.path": "/items/7",
    "server.port": 8080,
    "negative": -5,
    "large": 2**62,
    "ratio": 1.5,
    "flag": False,
    "names": ("a", "b"),
    "numbers": (1, -2),
    "ratios": (0.5,),
    "flags": (True,),
    "unicode": "é\u2028ü",
    "empty": "",
    "http.response.status_code": HTTPStatus.OK,  # an int subclass, as user code sets it
    "colour": Colour.RED,  # a str subclass
}


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: object) -> SpanExportResult:
        self.spans.extend(spans)  # type: ignore[arg-type]
        return SpanExportResult.SUCCESS


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, _Keep]]:
    kept = _Keep()
    provider = TracerProvider(resource=Resource.create({"service.name": "shop", "replicas": 3, "canary": True}))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    yield provider, kept
    provider.shutdown()


def _without_link_trace_state(request: ExportTraceServiceRequest) -> ExportTraceServiceRequest:
    """The request as the SDK's encoder sends it: without the links' trace state, which it leaves out."""
    copy = ExportTraceServiceRequest()
    copy.CopyFrom(request)
    for resource_spans in copy.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                for link in span.links:
                    link.ClearField("trace_state")
    return copy


def test_sdk_spans_of_every_shape_encode_as_the_sdk_encodes_them(provider: tuple[TracerProvider, _Keep]) -> None:
    """Roots, children, remote parents with trace state, events, links, statuses and every value type
    parse to the SDK's own message (links also carry their trace state, which the SDK drops).
    """
    tracer_provider, kept = provider
    tracer = tracer_provider.get_tracer("shop.web", "1.2", schema_url="https://opentelemetry.io/schemas/1.26.0")
    other = tracer_provider.get_tracer("shop.worker")
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1), trace_state=TraceState([("k", "v")]))
    linked = SpanContext(1, 2, is_remote=False, trace_flags=TraceFlags(1), trace_state=TraceState([("a", "b")]))
    for _ in range(3):
        with tracer.start_as_current_span(
            "GET /items/<int:item_id>", kind=SpanKind.SERVER, attributes=ATTRIBUTES
        ) as span:
            span.add_event("cache miss", {"key": "item:7", "tries": 2})
            span.add_event("")
            with other.start_as_current_span("run shop.charge", links=[Link(linked, {"reason": "batch"})]) as child:
                child.set_status(Status(StatusCode.ERROR, "card declined"))
        context = trace.set_span_in_context(NonRecordingSpan(remote))
        with tracer.start_as_current_span("from a queue", context=context, kind=SpanKind.CONSUMER) as consumer:
            consumer.set_status(Status(StatusCode.OK))
        with tracer.start_as_current_span("bare"):
            pass
    ours = ExportTraceServiceRequest.FromString(encode_spans_request(kept.spans))
    assert _without_link_trace_state(ours) == encode_spans(kept.spans)
    links = [link for rs in ours.resource_spans for ss in rs.scope_spans for s in ss.spans for link in s.links]
    assert links and all(link.trace_state == "a=b" for link in links)


def test_enum_attribute_values_are_sent_as_their_plain_values(provider: tuple[TracerProvider, _Keep]) -> None:
    """An attribute set to HTTPStatus.OK or a StrEnum member is sent as 200 or "red", in protobuf and in
    OTLP/JSON files, instead of failing the whole batch.
    """
    tracer_provider, kept = provider
    with tracer_provider.get_tracer("t").start_as_current_span("GET /", attributes=ATTRIBUTES):
        pass
    (span,) = (
        ExportTraceServiceRequest.FromString(encode_spans_request(kept.spans)).resource_spans[0].scope_spans[0].spans
    )
    values = {attribute.key: attribute.value for attribute in span.attributes}
    assert values["http.response.status_code"].int_value == 200
    assert values["colour"].string_value == "red"
    (json_span,) = encode_spans_json(kept.spans)["resourceSpans"][0]["scopeSpans"][0]["spans"]
    json_values = {attribute["key"]: attribute["value"] for attribute in json_span["attributes"]}
    assert json_values["http.response.status_code"] == {"intValue": "200"}
    assert json_values["colour"] == {"stringValue": "red"}


def test_light_spans_encode_as_the_sdk_encodes_them(provider: tuple[TracerProvider, _Keep]) -> None:
    """Spyglass's light request spans (the hot path) encode exactly as the SDK encodes them."""
    tracer_provider, kept = provider
    starter = LightSpanStarter(tracer_provider, "spyglass.flask", "0.1.0")
    for status in (200, 500):
        span, *_ = starter.start("GET", None, {"http.request.method": "GET", "url.path": "/", "server.port": 80})
        assert isinstance(span, LightSpan)
        span.set_attributes({"http.route": "/", "http.response.status_code": status})
        if status == 500:
            span.set_status(Status(StatusCode.ERROR))
            span.record_exception(RuntimeError("boom"))
        span.end()
    assert len(kept.spans) == 2
    assert ExportTraceServiceRequest.FromString(encode_spans_request(kept.spans)) == encode_spans(kept.spans)


def test_light_spans_with_a_remote_parent_links_and_events_encode_as_the_sdk_encodes_them(
    provider: tuple[TracerProvider, _Keep],
) -> None:
    """A light span continuing a remote trace (with trace state), carrying links, events, a status
    description and values of every kind encodes as the SDK encodes it (links aside: their trace
    state is sent, which the SDK leaves out).
    """
    tracer_provider, kept = provider
    starter = LightSpanStarter(tracer_provider, "spyglass.celery", "0.1.0")
    remote = SpanContext(
        0x8D7C6F20B4A453441B1543B77E081B9E,
        0xAF7F6D66E8F5A2E1,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "on")]),
    )
    parent = trace.set_span_in_context(NonRecordingSpan(remote))
    span, *_ = starter.start("run shop.charge", parent, {"celery.task_name": "shop.charge"}, SpanKind.CONSUMER)
    assert isinstance(span, LightSpan)
    span.add_link(SpanContext(7, 8, is_remote=True, trace_state=TraceState([("k", "v")])), {"attempt": 2})
    span.add_event("retry", {"delay_s": 1.5, "reasons": ("busy", "slow")})
    span.set_attributes({"ok": False, "ratio": 0.25, "count": -3, "path": "/caf\u00e9"})
    span.set_status(Status(StatusCode.ERROR, "card declined"))
    span.end()
    (finished,) = kept.spans
    ours = ExportTraceServiceRequest.FromString(encode_spans_request([finished]))
    assert ours.resource_spans[0].scope_spans[0].spans[0].parent_span_id == remote.span_id.to_bytes(8, "big")
    assert _without_link_trace_state(ours) == encode_spans([finished])


# Around 128 bytes a protobuf length takes two bytes: string values of every length near it, one of
# them made longer by multi-byte characters, for each of the nested lengths of a KeyValue.
_BOUNDARY_LENGTHS = (0, 1, 100, 105, 106, 107, 108, 109, 110, 120, 125, 126, 127, 128, 129, 200, 20_000)


def test_string_values_of_every_length_near_a_length_byte_boundary_encode_as_the_sdk_encodes_them(
    provider: tuple[TracerProvider, _Keep],
) -> None:
    """Paths and addresses of any length (short ones put together in one piece, long ones field by
    field) encode as the SDK encodes them, on light spans and on log lines.
    """
    tracer_provider, kept = provider
    starter = LightSpanStarter(tracer_provider, "spyglass.flask", "0.1.0")
    values = ["x" * length for length in _BOUNDARY_LENGTHS] + ["é" * length for length in (40, 60, 63, 64, 100)]
    for value in values:
        span, *_ = starter.start("GET", None, {"url.path": value, "client.address": value[:130]})
        span.end()  # type: ignore[attr-defined]
    assert len(kept.spans) == len(values)
    assert ExportTraceServiceRequest.FromString(encode_spans_request(kept.spans)) == encode_spans(kept.spans)
    resource = Resource.create({"service.name": "shop"})
    lines = [
        b'{"event":"checked","level":"info","logger":"shop","timestamp":"2026-11-23T06:43:33.866235Z",'
        b'"exception":"%s","path":"%s"}' % (value.encode(), value[:110].encode())
        for value in values
    ]
    ours = ExportLogsServiceRequest.FromString(encode_log_lines_request(lines, resource))
    sdk = encode_logs([line_to_log_record(line, resource) for line in lines])
    assert _without_observed_time(ours) == _without_observed_time(sdk)


def test_a_lone_surrogate_is_sent_as_a_replacement_character(provider: tuple[TracerProvider, _Keep]) -> None:
    """A string that is not valid Unicode costs one character, not the batch (the SDK's encoder raises)."""
    tracer_provider, kept = provider
    with tracer_provider.get_tracer("t").start_as_current_span("file \udcff", attributes={"path": "/tmp/\udce9"}):
        pass
    with pytest.raises(Exception):  # noqa: B017 - whatever the SDK's protobuf runtime raises
        encode_spans(kept.spans).SerializeToString()
    (span,) = (
        ExportTraceServiceRequest.FromString(encode_spans_request(kept.spans)).resource_spans[0].scope_spans[0].spans
    )
    assert span.name == "file \ufffd"
    assert span.attributes[0].value.string_value == "/tmp/\ufffd"


LINES = [
    b'{"event":"request","http.request.method":"GET","http.route":"/items/<int:item_id>","url.path":"/items/7",'
    b'"http.response.status_code":200,"duration_s":0.000412,"logger":"spyglass.access","level":"info",'
    b'"timestamp":"2026-11-23T06:43:33.866235Z","service.name":"shop",'
    b'"trace_id":"8d7c6f20b4a453441b1543b77e081b9e","span_id":"af7f6d66e8f5a2e1"}',
    b'{"event":"payment failed","level":"error","logger":"shop.tasks","exception":"Traceback ...",'
    b'"order":{"id":7,"lines":[1,2]},"tags":["a","b"],"huge":123456789012345678901234567890,"none":null,'
    b'"timestamp":"2026-11-23T06:43:34.000001+00:00"}',
    b'{"event":{"nested":true},"level":"warning","trace_id":"8d7c6f20b4a453441b1543b77e081b9e"}',
    b'{"event":"no logger, odd level","level":"verbose"}',
    b"not json at all \xff",
    b"[1, 2]",
]


def _without_observed_time(request: ExportLogsServiceRequest) -> ExportLogsServiceRequest:
    """The request without the times taken when a line is read (its observed time, and the time of a
    line that carries none), which differ from one reading to the next.
    """
    copy = ExportLogsServiceRequest()
    copy.CopyFrom(request)
    for resource_logs in copy.resource_logs:
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                record.observed_time_unix_nano = 0
                if not record.attributes or record.body.string_value.startswith(("not json", "[1", "{")):
                    record.time_unix_nano = 0  # a line without a timestamp is stamped when read
    return copy


def test_log_lines_encode_as_the_sdk_encodes_their_records() -> None:
    """Each rendered line parses to the record the SDK would send for line_to_log_record(line):
    trace context, severity, body, attributes (nested values as JSON), scope, resource.
    """
    resource = Resource.create({"service.name": "shop"}, schema_url="https://opentelemetry.io/schemas/1.26.0")
    ours = ExportLogsServiceRequest.FromString(encode_log_lines_request(LINES, resource))
    sdk = encode_logs([line_to_log_record(line, resource) for line in LINES])
    assert _without_observed_time(ours) == _without_observed_time(sdk)
    records = [record for scope_logs in ours.resource_logs[0].scope_logs for record in scope_logs.log_records]
    assert len(records) == len(LINES)
    access = records[0]
    assert access.trace_id.hex() == "8d7c6f20b4a453441b1543b77e081b9e" and access.flags == 1
    assert access.observed_time_unix_nano > 0


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_ENDPOINT"])
def test_spyglass_exports_through_the_fast_exporters_when_otlp_is_configured(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_TRACES_EXPORTER=otlp and OTEL_LOGS_EXPORTER=otlp build the SDK's exporters with the fast encoding."""
    from spyglass.config import load_settings
    from spyglass.log_export import build_log_exporter
    from spyglass.otlp_http import OtlpProtoLogExporter, OtlpProtoSpanExporter
    from spyglass.tracing import _exporter

    monkeypatch.setenv(variable, "http://127.0.0.1:4318")
    settings = load_settings(dict(os.environ))
    span_exporter = _exporter("otlp", settings)
    log_exporter = build_log_exporter("otlp", endpoint="http://127.0.0.1:4318/v1/logs", timeout_s=1.0, path="")
    try:
        assert isinstance(span_exporter, OtlpProtoSpanExporter) and span_exporter._direct
        assert isinstance(log_exporter, OtlpProtoLogExporter) and log_exporter._direct
    finally:
        span_exporter.shutdown()
        log_exporter.shutdown()


@pytest.fixture
def access_lines(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The lines AccessLog writes while log export is on (a writer that keeps them, one exporter)."""
    from spyglass import logs
    from spyglass.config import load_settings

    written: list[bytes] = []
    writer = _keeping_writer(written)
    monkeypatch.setattr(logs, "_writer", writer)
    monkeypatch.setattr(logs, "_exporters", [object()])
    access = logs.AccessLog(load_settings({"OTEL_SERVICE_NAME": "shop"}))
    access.http_request(
        "GET", "/items/<int:item_id>", "/items/7", 200, 0.000412, "8d7c6f20b4a453441b1543b77e081b9e", "af7f6d66e8f5a2e1"
    )
    access.http_request("POST", "/orders", "/orders", 503, 1.25, "", "")
    access.http_request("_OTHER", "<unmatched>", "/caf\u00e9/x y", 404, 0.0000004, "", "")
    access.http_request(
        "GET", "/search", '/search/"quoted"', 200, 0.002, "8d7c6f20b4a453441b1543b77e081b9e", "af7f6d66e8f5a2e1"
    )
    access.http_request("GET", "/files/<path:name>", "/files/" + "a" * 200, 200, 0.003, "", "")  # past 127 bytes
    writer.close()
    return written


def _keeping_writer(written: list[bytes]) -> LineWriter:
    """A line writer to /dev/null that hands every batch it writes, as written, to ``written``."""
    descriptor = os.open(os.devnull, os.O_WRONLY)
    writer = LineWriter(descriptor, max_delay=60, tee=written.extend)
    weakref.finalize(writer, os.close, descriptor)
    return writer


def test_access_lines_carry_their_fields_and_encode_as_their_parsed_bytes(access_lines: list[bytes]) -> None:
    """An access line written while logs are exported carries the fields it was rendered from, and the
    record encoded from them is the record its bytes parse to; a path that needs escaping in JSON
    leaves the line plain bytes (parsed like any other line).
    """
    from spyglass.log_export import AccessLine

    assert [type(line) is AccessLine for line in access_lines] == [True, True, True, False, True]
    resource = Resource.create({"service.name": "shop"})
    from_fields = ExportLogsServiceRequest.FromString(encode_log_lines_request(access_lines, resource))
    from_bytes = ExportLogsServiceRequest.FromString(
        encode_log_lines_request([bytes(line) for line in access_lines], resource)
    )
    assert _without_observed_time(from_fields) == _without_observed_time(from_bytes)
    sdk = encode_logs([line_to_log_record(bytes(line), resource) for line in access_lines])
    assert _without_observed_time(from_fields) == _without_observed_time(sdk)
    (scope_logs,) = from_fields.resource_logs[0].scope_logs
    assert scope_logs.scope.name == "spyglass.access"
    first, error, *_ = scope_logs.log_records
    assert first.trace_id.hex() == "8d7c6f20b4a453441b1543b77e081b9e"
    assert error.severity_text == "ERROR" and not error.trace_id
    assert {kv.key: kv.value.double_value for kv in error.attributes}["http.server.request.duration"] == 1.25


def test_access_lines_parse_as_their_bytes_for_the_json_file_exporter(access_lines: list[bytes]) -> None:
    """The OTLP JSON file exporter parses access lines back like any line: the fields they carry
    change nothing (the line is not mistaken for text that is not JSON).
    """
    from spyglass.log_export import parse_line

    for line in access_lines:
        parsed, plain = parse_line(line), parse_line(bytes(line))
        assert parsed._replace(observed_ns=0) == plain._replace(observed_ns=0)
        assert parsed.body == "request" and parsed.scope_name == "spyglass.access"


def test_entries_of_every_size_class_carry_their_length_as_the_sdk_encodes_it(
    provider: tuple[TracerProvider, _Keep],
) -> None:
    """Spans and log lines whose encoding takes one, two or three bytes of length (under 128 bytes,
    under 16 KiB, past it) are framed as the SDK frames them.
    """
    tracer_provider, kept = provider
    starter = LightSpanStarter(tracer_provider, "spyglass.flask", "0.1.0")
    sizes = (0, 40, 100, 16_300, 16_500, 40_000)
    for size in sizes:
        span, *_ = starter.start("GET", None, {"url.path": "p" * size} if size else {})
        span.end()  # type: ignore[attr-defined]
    assert ExportTraceServiceRequest.FromString(encode_spans_request(kept.spans)) == encode_spans(kept.spans)
    resource = Resource.create({"service.name": "shop"})
    lines = [b'{"event":"%s"}' % (b"e" * size) for size in sizes]
    ours = ExportLogsServiceRequest.FromString(encode_log_lines_request(lines, resource))
    sdk = encode_logs([line_to_log_record(line, resource) for line in lines])
    assert _without_observed_time(ours) == _without_observed_time(sdk)


def test_access_lines_with_paths_near_the_one_piece_limit_encode_as_their_parsed_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An access record is put together in one piece while its path pair has one-byte lengths, and
    field by field past that; either way it is the record the line's bytes parse to.
    """
    from spyglass import logs
    from spyglass.config import load_settings
    from spyglass.log_export import AccessLine

    written: list[bytes] = []
    writer = _keeping_writer(written)
    monkeypatch.setattr(logs, "_writer", writer)
    monkeypatch.setattr(logs, "_exporters", [object()])
    access = logs.AccessLog(load_settings({"OTEL_SERVICE_NAME": "shop"}))
    for length in range(108, 120):
        trace_id, span_id = ("8d7c6f20b4a453441b1543b77e081b9e", "af7f6d66e8f5a2e1") if length % 2 else ("", "")
        access.http_request(
            "GET",
            "/p/<path:rest>",
            "/" + "é" * (length // 4) + "p" * (length - length // 2),
            200,
            0.5,
            trace_id,
            span_id,
        )
    writer.close()
    assert all(type(line) is AccessLine for line in written)
    resource = Resource.create({"service.name": "shop"})
    from_fields = ExportLogsServiceRequest.FromString(encode_log_lines_request(written, resource))
    from_bytes = ExportLogsServiceRequest.FromString(
        encode_log_lines_request([bytes(line) for line in written], resource)
    )
    assert _without_observed_time(from_fields) == _without_observed_time(from_bytes)
    assert len(from_fields.resource_logs[0].scope_logs[0].log_records) == 12
