"""What one Flask request produces: span, metric series and log lines, checked in process."""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import flask
import pytest
import structlog
from opentelemetry import trace
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

import spyglass
from spyglass import runtime
from spyglass.config import load_settings
from spyglass.logs import AccessLog, flush_logs
from tests.conftest import finished_spans

DURATION = "http_server_request_duration_seconds"


def build_app() -> flask.Flask:
    app = flask.Flask("unit")
    log = spyglass.get_logger("unit")

    @app.get("/orders/<int:order_id>")
    def order(order_id: int):
        log.info("order read", order_id=order_id)
        return {"id": order_id}

    @app.route("/boom", methods=["GET", "POST"])
    def boom():
        raise KeyError("missing")

    @app.get("/unavailable")
    def unavailable():
        flask.abort(503)

    @app.get("/stream")
    def stream():
        return flask.Response((f"{n}\n" for n in range(3)), mimetype="text/plain")

    @app.post("/note")
    def note():
        body = flask.request.get_json()
        log.info("note", text=body["text"], credentials={"user": "u", "password": "p"})
        return "ok"

    @app.get("/healthz")
    def health():
        return "ok"

    return app


@pytest.fixture
def instrumented(tmp_path: Path) -> Iterator[Callable[..., tuple[flask.Flask, Path]]]:
    traces = tmp_path / "traces.jsonl"

    def make(**env: str) -> tuple[flask.Flask, Path]:
        settings = load_settings(
            {
                "OTEL_SERVICE_NAME": "unit",
                "SPYGLASS_METRICS_PORT": "0",
                "SPYGLASS_TRACES_FILE": str(traces),
                **env,
            }
        )
        runtime.init(settings)
        return spyglass.instrument_flask(build_app()), traces

    yield make
    runtime.shutdown()


def output(capfd) -> str:
    """What the process wrote to stdout, pending batched log lines included."""
    flush_logs()
    return capfd.readouterr().out


def count(method: str, route: str, status: str) -> float:
    labels = {"http_request_method": method, "http_route": route, "http_response_status_code": status}
    return REGISTRY.get_sample_value(DURATION + "_count", labels) or 0.0


def test_server_span_follows_the_stable_http_conventions(instrumented) -> None:
    """Name `{method} {route}`, kind SERVER and the required and recommended attributes."""
    app, traces = instrumented()
    response = app.test_client().get(
        "/orders/17?access_token=abc&page=2", headers={"User-Agent": "probe/1.0", "Host": "shop.test:8080"}
    )
    assert response.status_code == 200
    (span,) = finished_spans(traces)
    assert span["name"] == "GET /orders/<int:order_id>"
    assert span["kind"] == 2
    attributes = span["attributes"]
    assert attributes["http.request.method"] == "GET"
    assert attributes["http.route"] == "/orders/<int:order_id>"
    assert attributes["url.path"] == "/orders/17"
    assert attributes["url.scheme"] == "http"
    assert attributes["server.address"] == "shop.test"
    assert attributes["server.port"] in ("8080", 8080)
    assert attributes["client.address"] == "127.0.0.1"
    assert attributes["user_agent.original"] == "probe/1.0"
    assert attributes["http.response.status_code"] in ("200", 200)
    assert attributes["url.query"] == "access_token=%5BREDACTED%5D&page=2"
    assert "error.type" not in attributes
    assert count("GET", "/orders/<int:order_id>", "200") == 1


def test_unmatched_paths_and_unknown_methods_get_fixed_labels(instrumented) -> None:
    """A 404 is `<unmatched>` and a made-up method `_OTHER`: client input never becomes a label."""
    app, traces = instrumented()
    client = app.test_client()
    assert client.get("/definitely/not/here").status_code == 404
    assert client.open("/orders/1", method="FROBNICATE").status_code == 405
    spans = {span["name"]: span for span in finished_spans(traces)}
    assert set(spans) == {"GET", "HTTP"}
    assert spans["HTTP"]["attributes"]["http.request.method_original"] == "FROBNICATE"
    assert count("GET", "<unmatched>", "404") == 1
    assert count("_OTHER", "<unmatched>", "405") == 1


def test_unhandled_exception_is_recorded_and_marks_the_span_as_error(instrumented) -> None:
    """The exception type becomes error.type, an exception event is recorded, status is ERROR."""
    app, traces = instrumented()
    assert app.test_client().get("/boom").status_code == 500
    (span,) = finished_spans(traces)
    assert span["attributes"]["error.type"] == "KeyError"
    assert span["status"]["code"] == 2
    (event,) = span["events"]
    assert event["name"] == "exception"
    assert count("GET", "/boom", "500") == 1


def test_a_5xx_without_exception_is_an_error_typed_by_its_status(instrumented) -> None:
    """An abort(503) marks the span as error with error.type `503`; 4xx would not."""
    app, traces = instrumented()
    assert app.test_client().get("/unavailable").status_code == 503
    (span,) = finished_spans(traces)
    assert span["attributes"]["error.type"] == "503"
    assert span["status"]["code"] == 2


def test_streamed_body_ends_the_span_when_fully_sent_without_leaking_context(instrumented) -> None:
    """The request ends when its body is exhausted, and its span is not current afterwards."""
    app, traces = instrumented()
    response = app.test_client().get("/stream")
    assert response.data == b"0\n1\n2\n"
    assert not trace.get_current_span().get_span_context().is_valid
    (span,) = finished_spans(traces)
    assert span["name"] == "GET /stream"


def test_the_response_left_by_the_last_after_request_function_decides_when_the_request_ends(instrumented) -> None:
    """An ``after_request`` function added after instrumenting may swap in a streamed body: the span ends once read."""
    app, traces = instrumented()

    @app.after_request
    def stream_it(response: flask.Response) -> flask.Response:
        body = response.get_data()
        return flask.Response(iter([body[:1], body[1:]]), status=response.status, mimetype=response.mimetype)

    response = app.test_client().get("/orders/3", buffered=False)
    assert finished_spans(traces) == []
    assert json.loads(b"".join(response.response)) == {"id": 3}
    response.close()
    (span,) = finished_spans(traces)
    assert span["name"] == "GET /orders/<int:order_id>"
    assert count("GET", "/orders/<int:order_id>", "200") == 1


def test_excluded_paths_get_no_span_metric_or_header(instrumented) -> None:
    """Paths matching SPYGLASS_EXCLUDED_URLS pass through untouched."""
    app, traces = instrumented(SPYGLASS_EXCLUDED_URLS="^/healthz$")
    response = app.test_client().get("/healthz")
    assert response.status_code == 200 and "traceresponse" not in response.headers
    assert finished_spans(traces) == []
    assert count("GET", "/healthz", "200") == 0


def test_single_process_exposition_has_exemplars_of_sampled_requests(instrumented) -> None:
    """Without gunicorn the default registry carries exemplars naming the request's trace."""
    app, _ = instrumented()
    response = app.test_client().get("/orders/3")
    trace_id = response.headers["traceresponse"].split("-")[1]
    exposition = openmetrics_latest(REGISTRY).decode()
    assert f'trace_id="{trace_id}"' in exposition


def test_unsampled_requests_carry_no_exemplar(instrumented) -> None:
    """An exemplar must open a trace that exists: none for requests the sampler dropped."""
    app, traces = instrumented(OTEL_TRACES_SAMPLER="always_off")
    response = app.test_client().get("/orders/4")
    assert response.headers["traceresponse"].endswith("-00")
    assert "trace_id" not in openmetrics_latest(REGISTRY).decode()
    assert finished_spans(traces) == []


def test_log_lines_are_single_json_objects_with_redacted_secrets(instrumented, capfd) -> None:
    """Client text with newlines or fake JSON stays inside one line; nested secrets are redacted."""
    app, _ = instrumented()
    forged = 'hi"}\n{"level":"critical","event":"forged"}\r\n\x1b[31m'
    assert app.test_client().post("/note", json={"text": forged}).status_code == 200
    lines = [line for line in output(capfd).splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line parses on its own
    assert not any(record.get("event") == "forged" for record in records)
    note = next(record for record in records if record["event"] == "note")
    assert note["text"] == forged
    assert note["credentials"] == "[REDACTED]"
    access = next(record for record in records if record["event"] == "request")
    assert access["trace_id"] == note["trace_id"] and access["span_id"] == note["span_id"]


def test_access_lines_of_hostile_paths_are_single_valid_json_objects(instrumented, capfd) -> None:
    """Quotes, backslashes, control characters and non-ASCII in a path stay inside one valid line."""
    app, _ = instrumented()
    client = app.test_client()
    paths = ['/a"b', "/back\\slash", "/new%0Aline%0D%1B", "/caf%C3%A9", '/x"}%0A{"event":"forged"']
    for path in paths:
        client.get(path)
    structlog.contextvars.bind_contextvars(request_id="r-1")
    try:
        client.get("/orders/3")
    finally:
        structlog.contextvars.clear_contextvars()
    records = [json.loads(line) for line in output(capfd).splitlines() if line.strip()]
    access = [record for record in records if record["event"] == "request"]
    assert [record["url.path"] for record in access] == [
        '/a"b',
        "/back\\slash",
        "/new\nline\r\x1b",
        "/caf\u00c3\u00a9",  # WSGI paths are bytes decoded as latin-1
        '/x"}\n{"event":"forged"',
        "/orders/3",
    ]
    assert not any(record["event"] == "forged" for record in records)
    for record in access:
        assert set(record) >= {"timestamp", "level", "logger", "service.name", "trace_id", "span_id"}
        assert record["level"] == "info" and record["service.name"] == "unit"
        assert isinstance(record["http.server.request.duration"], float)
        assert isinstance(record["http.response.status_code"], int)
    assert access[-1]["request_id"] == "r-1"
    assert access[-1]["http.route"] == "/orders/<int:order_id>"


def test_an_access_line_written_later_keeps_the_time_and_place_of_its_request(instrumented, capfd) -> None:
    """The access line is rendered when its batch is written, yet its timestamp is when the request
    ended and it follows the lines the request logged.
    """
    app, _ = instrumented(SPYGLASS_LOG_FLUSH_INTERVAL="30")
    client = app.test_client()
    output(capfd)  # what setting up logged
    before = datetime.datetime.now(datetime.UTC)
    client.get("/orders/5")
    after = datetime.datetime.now(datetime.UTC)
    time.sleep(0.3)
    assert capfd.readouterr().out == ""  # still pending
    records = [json.loads(line) for line in output(capfd).splitlines() if line.strip()]
    assert [record["event"] for record in records] == ["order read", "request"]
    logged = datetime.datetime.fromisoformat(records[1]["timestamp"])
    assert before - datetime.timedelta(microseconds=1) <= logged <= after
    assert records[1]["http.route"] == "/orders/<int:order_id>"
    assert records[1]["trace_id"] == records[0]["trace_id"]


def test_an_access_line_shows_the_context_bound_during_its_request(instrumented, capfd, monkeypatch) -> None:
    """Keys bound with structlog while a request ran are on its access line as they were then, even
    once unbound: plain values are rendered later by the log writer's thread, an object at once.
    """
    rendering_threads: list[str] = []
    render = AccessLog._render_with_context

    def recording_render(self: AccessLog, line: tuple[object, ...]) -> bytes:
        rendering_threads.append(threading.current_thread().name)
        return render(self, line)

    class Cart:
        def __init__(self, content: str) -> None:
            self.content = content

        def __repr__(self) -> str:
            return f"Cart({self.content})"

    monkeypatch.setattr(AccessLog, "_render_with_context", recording_render)
    app, _ = instrumented(SPYGLASS_LOG_FLUSH_INTERVAL="0.05")
    client = app.test_client()
    output(capfd)  # what setting up logged
    cart = Cart("3 items")
    try:
        structlog.contextvars.bind_contextvars(request_id="r-1")
        client.get("/orders/5")
        structlog.contextvars.bind_contextvars(request_id="r-2", cart=cart)
        client.get("/orders/6")
    finally:
        structlog.contextvars.clear_contextvars()
    cart.content = "empty"
    seen = ""
    deadline = time.monotonic() + 5
    while seen.count('"event":"request"') < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
        seen += capfd.readouterr().out
    access = [json.loads(line) for line in seen.splitlines() if '"event":"request"' in line]
    assert [(line["url.path"], line["request_id"]) for line in access] == [("/orders/5", "r-1"), ("/orders/6", "r-2")]
    assert "cart" not in access[0] and access[1]["cart"] == "Cart(3 items)"
    assert all(line["trace_id"] and line["level"] == "info" for line in access)
    assert rendering_threads == ["spyglass-log-flush"]


def test_console_format_escapes_control_characters(instrumented, capfd) -> None:
    """In the development format newlines and ANSI escapes from input are shown, not obeyed."""
    app, _ = instrumented(SPYGLASS_LOG_FORMAT="console")
    app.test_client().post("/note", json={"text": "line1\nline2\x1b[2J"})
    text = output(capfd)
    note_lines = [line for line in text.splitlines() if "note" in line and "line1" in line]
    assert len(note_lines) == 1
    assert "\\x0a" in note_lines[0] and "\\x1b" in note_lines[0]
    assert "\x1b[2J" not in text


def test_stdlib_logging_goes_through_the_same_pipeline(instrumented, capfd) -> None:
    """Flask's own error log of an exception is a JSON line with the request's trace id."""
    app, _ = instrumented()
    response = app.test_client().get("/boom")
    trace_id = response.headers["traceresponse"].split("-")[1]
    records = [json.loads(line) for line in output(capfd).splitlines() if line.startswith("{")]
    error = next(record for record in records if record["event"].startswith("Exception on /boom"))
    assert error["logger"] == "unit"
    assert error["level"] == "error"
    assert error["trace_id"] == trace_id
    assert "KeyError" in error["exception"]


def test_stdlib_lines_have_the_fields_and_order_of_the_structlog_chain(instrumented) -> None:
    """Spyglass's one-pass formatter of standard-library records writes what structlog's chain would.

    Celery logs a line per task, so spyglass renders those records itself; the line must not
    differ from the ProcessorFormatter's (timestamps aside): extras, bound context, level,
    service, trace ids, redaction, exceptions, stack info.
    """
    instrumented()
    handler = next(h for h in logging.getLogger().handlers if h.get_name() == "spyglass")
    fast = handler.formatter
    reference = fast._structlog_formatter

    def record(level: int, message: str, *args: object, **fields: object) -> logging.LogRecord:
        exc_info, stack_info = fields.pop("exc_info", None), fields.pop("stack_info", None)
        made = logging.getLogger("celery.app.trace").makeRecord(
            "celery.app.trace", level, __file__, 1, message, args, exc_info, sinfo=stack_info, extra=fields
        )
        return made

    try:
        raise KeyError("missing")
    except KeyError:
        failure = sys.exc_info()
    records = [
        record(logging.INFO, "Task %s[%s] received", "tasks.ok", "t-1", data={"id": "t-1", "password": "hunter2"}),
        record(logging.WARNING, "plain %d%%", 5),
        record(logging.ERROR, "Task failed", exc_info=failure, data={"id": "t-2"}),
        record(logging.CRITICAL, "with stack", stack_info="Stack (most recent call last): ..."),
    ]
    tracer = trace.get_tracer("test")
    structlog.contextvars.bind_contextvars(task_id="t-1", task_name="tasks.ok")
    try:
        with tracer.start_as_current_span("run/tasks.ok"):
            for item in records:
                expected = json.loads(reference.format(logging.makeLogRecord(item.__dict__)))
                actual = json.loads(fast.format_bytes(logging.makeLogRecord(item.__dict__)))
                assert list(actual) == list(expected)
                expected.pop("timestamp"), actual.pop("timestamp")
                assert actual == expected
    finally:
        structlog.contextvars.clear_contextvars()
    assert "[REDACTED]" in fast.format(records[0]) and "hunter2" not in fast.format(records[0])


def test_kill_switch_leaves_the_app_untouched(tmp_path: Path) -> None:
    """SPYGLASS_DISABLED=true: no wrapper, no header, no metric."""
    try:
        runtime.init(load_settings({"SPYGLASS_DISABLED": "true", "SPYGLASS_METRICS_PORT": "0"}))
        app = build_app()
        original = app.wsgi_app
        spyglass.instrument_flask(app)
        assert app.wsgi_app == original
        assert "traceresponse" not in app.test_client().get("/orders/1").headers
    finally:
        runtime.shutdown()


def test_python_warnings_are_written_as_json_log_lines(instrumented, capfd) -> None:
    """A `warnings.warn` from a library comes out as a JSON line (logger py.warnings), not raw stderr text."""
    import warnings

    instrumented()
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("serializer fell back to str", UserWarning, stacklevel=1)
    flush_logs()
    captured = capfd.readouterr()
    assert "serializer fell back to str" not in captured.err
    (line,) = [json.loads(text) for text in captured.out.splitlines() if "serializer fell back" in text]
    assert line["logger"] == "py.warnings" and line["level"] == "warning"
