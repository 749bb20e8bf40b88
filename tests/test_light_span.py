"""The request's span behaves like an SDK span for the application and for span processors.

spyglass records the SERVER span of a request in its own light object (see
``spyglass.light_span``); these tests hold it to what user code and the SDK's pipeline rely on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import flask
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from prometheus_client import CollectorRegistry

import spyglass
from spyglass import runtime, tracing
from spyglass.config import load_settings
from spyglass.light_span import LightSpanStarter
from spyglass.metrics.instruments import SpanPipelineMetrics
from spyglass.tracing import SpanBatchProcessor

View = Callable[[], object]


class StampingProcessor(SpanProcessor):
    """A user's processor: stamps an attribute when spans start and keeps the ones that end."""

    def __init__(self) -> None:
        self.ended: list[ReadableSpan] = []

    def on_start(self, span: trace.Span, parent_context: otel_context.Context | None = None) -> None:
        span.set_attribute("tenant", "acme")

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


@pytest.fixture
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., list[ReadableSpan]]]:
    """Run one GET / of an app whose view is given, and return the spans that ended."""

    def run(
        view: View, status: int = 200, processors: tuple[SpanProcessor, ...] = (), **env: str
    ) -> list[ReadableSpan]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings = load_settings(
            {
                "OTEL_SERVICE_NAME": "span-test",
                "SPYGLASS_METRICS_PORT": "0",
                "SPYGLASS_TRACES_FILE": str(tmp_path / "traces.jsonl"),
                **env,
            }
        )
        telemetry = runtime.init(settings)
        assert telemetry.tracer_provider is not None
        exporter = InMemorySpanExporter()
        telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        for processor in processors:
            telemetry.tracer_provider.add_span_processor(processor)
        app = flask.Flask("span-test")
        app.add_url_rule("/", view_func=view)
        spyglass.instrument_flask(app)
        assert app.test_client().get("/").status_code == status
        return list(exporter.get_finished_spans())

    yield run
    runtime.shutdown()


def enrich(span: trace.Span) -> None:
    """What a view might do to the current span, valid and invalid values alike."""
    span.set_attribute("app.order_id", 17)
    span.set_attributes({"app.tags": ["a", "b"], "app.customer": {"tier": "gold"}, "app.broken": object()})
    span.set_attribute("app.text", "x" * 50)
    span.add_event("cache miss", {"key": "order:17", "app.broken": object()})


def test_view_enriches_the_current_span_exactly_as_an_sdk_span_would_record_it(serve) -> None:
    """Attributes and events set on get_current_span() are exported, validated and limited like the SDK's."""

    def view() -> str:
        enrich(trace.get_current_span())
        return "ok"

    (span,) = serve(view, OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT="20")
    reference = TracerProvider().get_tracer("reference").start_span("reference")  # reads the same limits
    enrich(reference)
    reference.end()
    assert span.kind is SpanKind.SERVER
    assert span.name == "GET /"
    assert span.attributes["app.order_id"] == 17
    assert span.attributes["app.text"] == "x" * 20
    assert {key: value for key, value in span.attributes.items() if key.startswith("app.")} == dict(
        reference.attributes
    )
    assert span.attributes["http.route"] == "/"
    assert span.attributes["http.response.status_code"] == 200
    (event,) = span.events
    (reference_event,) = reference.events
    assert (event.name, dict(event.attributes)) == ("cache miss", dict(reference_event.attributes))


def test_spans_started_in_the_view_are_children_of_the_request_span(serve) -> None:
    """A span the view starts has the request span as parent, in the same trace."""

    def view() -> str:
        telemetry = runtime.current()
        assert telemetry is not None and telemetry.tracer_provider is not None
        # The provider spyglass installed (trace.get_tracer gives it too, once per process).
        with telemetry.tracer_provider.get_tracer("app").start_as_current_span("db.query"):
            pass
        return "ok"

    child, server = serve(view)
    assert child.name == "db.query"
    assert child.parent is not None
    assert child.parent.span_id == server.context.span_id
    assert child.context.trace_id == server.context.trace_id
    assert server.parent is None


def test_status_set_by_the_view_follows_the_specification(serve) -> None:
    """OK set by the application is final: the instrumentation's ERROR for a 5xx does not override it."""

    def view() -> tuple[str, int]:
        trace.get_current_span().set_status(Status(StatusCode.OK))
        return "degraded but handled", 503

    (span,) = serve(view, status=503)
    assert span.status.status_code is StatusCode.OK
    assert span.attributes["error.type"] == "503"


def test_an_exception_recorded_by_the_view_becomes_an_exception_event(serve) -> None:
    """record_exception adds an `exception` event with type, message and stack trace."""

    def view() -> str:
        try:
            raise ValueError("bad order")
        except ValueError as exc:
            trace.get_current_span().record_exception(exc)
        return "ok"

    (span,) = serve(view)
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "bad order"
    assert "raise ValueError" in event.attributes["exception.stacktrace"]
    assert span.status.status_code is StatusCode.UNSET


def test_span_limits_from_the_environment_apply(serve) -> None:
    """OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT caps attributes and the overflow is counted as dropped."""

    def view() -> str:
        span = trace.get_current_span()
        for number in range(40):
            span.set_attribute(f"app.extra.{number}", number)
        return "ok"

    (span,) = serve(view, OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT="16")
    assert len(span.attributes) == 16
    assert span.dropped_attributes > 0
    assert encode_spans([span]).resource_spans[0].scope_spans[0].spans[0].dropped_attributes_count > 0


def test_an_ended_span_ignores_changes(serve) -> None:
    """A span kept past its request no longer records, and changing it neither fails nor alters the export."""
    kept: list[trace.Span] = []

    def view() -> str:
        kept.append(trace.get_current_span())
        return "ok"

    (span,) = serve(view)
    (late,) = kept
    assert not late.is_recording()
    late.set_attribute("late", True)
    late.add_event("late")
    late.end()
    assert "late" not in span.attributes
    assert not span.events


def test_user_span_processors_see_the_request_span_start_and_end(serve) -> None:
    """A processor added to the tracer provider gets on_start (and may set attributes) and on_end."""
    processor = StampingProcessor()

    def view() -> str:
        return "ok"

    (span,) = serve(view, processors=(processor,))
    assert span.attributes["tenant"] == "acme"
    assert [ended.name for ended in processor.ended] == ["GET /"]


def test_a_processor_added_after_requests_were_served_sees_the_next_request_start(tmp_path: Path) -> None:
    """Processors added to the tracer provider while the service runs get on_start from the next
    request on (spyglass skips only the processors whose on_start does nothing).
    """
    settings = load_settings(
        {
            "OTEL_SERVICE_NAME": "span-test",
            "SPYGLASS_METRICS_PORT": "0",
            "SPYGLASS_TRACES_FILE": str(tmp_path / "traces.jsonl"),
        }
    )
    telemetry = runtime.init(settings)
    try:
        assert telemetry.tracer_provider is not None
        exporter = InMemorySpanExporter()
        telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        app = flask.Flask("span-test")
        app.add_url_rule("/", view_func=lambda: "ok")
        spyglass.instrument_flask(app)
        client = app.test_client()
        assert client.get("/").status_code == 200
        late = StampingProcessor()
        telemetry.tracer_provider.add_span_processor(late)
        assert client.get("/").status_code == 200
        first, second = exporter.get_finished_spans()
        assert "tenant" not in first.attributes
        assert second.attributes["tenant"] == "acme"
        assert [ended.name for ended in late.ended] == ["GET /"]
    finally:
        runtime.shutdown()


def test_a_trace_the_sampler_drops_is_not_recorded_but_keeps_its_context(serve) -> None:
    """With always_off the view sees a valid, non-recording span and nothing is exported."""
    seen: list[trace.SpanContext] = []

    def view() -> str:
        span = trace.get_current_span()
        assert not span.is_recording()
        seen.append(span.get_span_context())
        return "ok"

    assert serve(view, OTEL_TRACES_SAMPLER="always_off") == []
    (context,) = seen
    assert context.is_valid
    assert not context.trace_flags.sampled


class CountingIds(IdGenerator):
    """A user's id generator: one fixed trace id, span ids counting up from 1."""

    def __init__(self) -> None:
        self.last_span_id = 0

    def generate_span_id(self) -> int:
        self.last_span_id += 1
        return self.last_span_id

    def generate_trace_id(self) -> int:
        return 0xFEED


def test_span_ids_come_from_the_tracer_providers_id_generator() -> None:
    """A generator set on the provider names the spans; the SDK's random one gives distinct random ids."""
    counting = LightSpanStarter(TracerProvider(id_generator=CountingIds()), "test", "1")
    first, trace_id, span_id, sampled = counting.start("GET /", None, {})
    second = counting.start("GET /", None, {})[0]
    assert (trace_id, span_id, sampled) == (0xFEED, 1, True)
    assert second.get_span_context().span_id == 2
    assert not first.get_span_context().trace_flags.random_trace_id

    random_ids = LightSpanStarter(TracerProvider(), "test", "1")
    contexts = [random_ids.start("GET /", None, {})[0].get_span_context() for _ in range(50)]
    assert len({context.trace_id for context in contexts}) == 50
    assert len({context.span_id for context in contexts}) == 50
    assert all(context.is_valid and context.trace_flags.random_trace_id for context in contexts)


def test_a_child_started_under_a_current_span_joins_its_trace() -> None:
    """Without an explicit parent, the span current in the context (as the API set it) is the parent."""
    starter = LightSpanStarter(TracerProvider(id_generator=CountingIds()), "test", "1")
    parent = NonRecordingSpan(SpanContext(0xABC, 0x123, True, TraceFlags(TraceFlags.SAMPLED)))
    token = otel_context.attach(trace.set_span_in_context(parent))
    try:
        child = starter.start("child", None, {}, SpanKind.INTERNAL)[0]
    finally:
        otel_context.detach(token)
    assert child.get_span_context().trace_id == 0xABC
    assert child.parent is not None and child.parent.span_id == 0x123


class GatedExporter(SpanExporter):
    """Holds every export until the test opens the gate, then keeps what it was given."""

    def __init__(self) -> None:
        self.exporting = threading.Event()
        self.gate = threading.Event()
        self.exported: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exporting.set()
        self.gate.wait(10)
        self.exported.extend(spans)
        return SpanExportResult.SUCCESS


class EndingProcessor(SpanProcessor):
    """A processor using the SDK's ``_on_ending`` hook: notes what it sees, and when."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, bool]] = []

    def _on_ending(self, span: trace.Span) -> None:
        self.events.append(("ending", span.name, span.end_time is not None))  # type: ignore[attr-defined]

    def on_end(self, span: ReadableSpan) -> None:
        self.events.append(("end", span.name, span.end_time is not None))


def test_a_processor_with_an_on_ending_hook_hears_of_the_span_before_its_on_end(serve) -> None:
    """As with SDK spans: ``_on_ending`` of every processor first (the span has its end time), then ``on_end``."""
    processor = EndingProcessor()
    serve(lambda: "ok", processors=(processor,))
    assert processor.events == [("ending", "GET /", True), ("end", "GET /", True)]


def test_the_batch_processor_queues_sampled_spans_only_and_drops_the_oldest_when_full() -> None:
    """Spyglass's batch processor exports sampled spans, not recorded-only ones; as the SDK's, a full
    queue drops its oldest span, counted as ``queue_full`` in otel_sdk_processor_span_processed_total.
    """
    registry = CollectorRegistry()
    exporter = GatedExporter()
    processor = SpanBatchProcessor(exporter, max_queue_size=4, max_export_batch_size=4, schedule_delay_millis=60_000)
    tracing._count_drops(processor, SpanPipelineMetrics(registry))
    provider = TracerProvider()
    provider.add_span_processor(processor)
    starter = LightSpanStarter(provider, "test", "1")
    record_only = LightSpanStarter(TracerProvider(sampler=RecordOnly()), "test", "1")
    record_only.processor = starter.processor  # the same pipeline, a sampler that records without sampling

    def processed(error_type: str) -> float:
        value = registry.get_sample_value("otel_sdk_processor_span_processed_total", {"error_type": error_type})
        return value or 0.0

    try:
        for number in range(4):  # a full batch: the export thread takes it and waits at the gate
            starter.start(f"first {number}", None, {})[0].end()
        assert exporter.exporting.wait(10)
        recorded = record_only.start("recorded only", None, {})[0]
        assert recorded.is_recording()
        recorded.end()
        for number in range(6):  # the queue holds 4: the two oldest are dropped
            starter.start(f"span {number}", None, {})[0].end()
        assert processed("queue_full") == 2
        exporter.gate.set()
        assert processor.force_flush()
        names = [span.name for span in exporter.exported]
        assert names == [f"first {number}" for number in range(4)] + [f"span {number}" for number in range(2, 6)]
    finally:
        exporter.gate.set()
        provider.shutdown()


class RecordOnly(Sampler):
    """Records every span without sampling it (the SDK's RECORD_ONLY decision)."""

    def should_sample(self, *args: object, **kwargs: object) -> SamplingResult:
        return SamplingResult(Decision.RECORD_ONLY)

    def get_description(self) -> str:
        return "RecordOnly"
