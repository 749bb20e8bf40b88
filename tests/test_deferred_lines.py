"""structlog lines whose values cannot change are rendered on the log writer's thread, exactly as at once.

Standard-library records keep being rendered by the thread that logs them (spyglass's one-pass
formatter costs less in all than capturing them and rendering them later); every line, whichever
way it goes, shows what was true when it was logged.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry import trace

from spyglass import get_logger, runtime
from spyglass.config import load_settings
from spyglass.deferred_lines import DeferredLines
from spyglass.logs import flush_logs


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Any]:
    """Sets spyglass up with JSON lines, from the environment given to the function it yields."""

    def start(**env: str) -> None:
        runtime.init(
            load_settings(
                {
                    "OTEL_SERVICE_NAME": "unit",
                    "SPYGLASS_METRICS_PORT": "0",
                    "SPYGLASS_TRACES_FILE": str(tmp_path / "traces.jsonl"),
                    **env,
                }
            )
        )

    yield start
    structlog.contextvars.clear_contextvars()
    runtime.shutdown()


def written(capfd) -> list[dict[str, Any]]:
    """The lines written so far, pending ones included, as JSON objects."""
    flush_logs()
    return [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.strip()]


class Box:
    """A value whose text changes when it is changed."""

    def __init__(self, content: str) -> None:
        self.content = content

    def __repr__(self) -> str:
        return f"Box({self.content})"


def tracer() -> trace.Tracer:
    """A tracer of this set-up's provider (the global one is the first test's, shut down since)."""
    telemetry = runtime.current()
    assert telemetry is not None and telemetry.tracer_provider is not None
    return telemetry.tracer_provider.get_tracer("test")


def spyglass_handler() -> logging.Handler:
    return next(handler for handler in logging.getLogger().handlers if handler.get_name() == "spyglass")


def test_a_line_rendered_later_shows_what_was_true_when_it_was_logged(pipeline, capfd) -> None:
    """A task's lines are written after the task changed its data, unbound its context and ended its
    span, yet they show the message, fields, context, trace ids and time of the moment they were logged.
    """
    pipeline(SPYGLASS_LOG_FLUSH_INTERVAL="30")
    written(capfd)
    context = {"id": "t-1", "name": "tasks.charge", "runtime": 0.25}
    items = [1, 2]
    order = {"id": 3, "state": "paid"}
    before = datetime.datetime.now(datetime.UTC)
    structlog.contextvars.bind_contextvars(task_id="t-1", task_name="tasks.charge")
    with tracer().start_as_current_span("run tasks.charge") as span:
        logging.getLogger("celery.app.trace").info(
            "Task %(name)s[%(id)s] succeeded in %(runtime)ss", context, extra={"data": context}
        )
        get_logger("shop.orders").warning("charged", items=items, order=order, amount=12.5)
        ids = span.get_span_context()
    after = datetime.datetime.now(datetime.UTC)
    context["name"], context["runtime"] = "changed", 99.0
    items.append(3)
    order["state"] = "refunded"
    structlog.contextvars.clear_contextvars()
    time.sleep(0.2)
    assert capfd.readouterr().out == "", "the lines were written before their batch was due"

    spyglass_handler().flush()  # what logging.shutdown does at exit
    task_line, app_line = (json.loads(line) for line in capfd.readouterr().out.splitlines())
    assert task_line["event"] == "Task tasks.charge[t-1] succeeded in 0.25s"
    assert task_line["data"] == {"id": "t-1", "name": "tasks.charge", "runtime": 0.25}
    assert app_line["items"] == [1, 2] and app_line["order"] == {"id": 3, "state": "paid"}
    assert app_line["amount"] == 12.5 and app_line["level"] == "warning"
    for line in (task_line, app_line):
        assert (line["task_id"], line["task_name"]) == ("t-1", "tasks.charge")
        assert line["trace_id"] == f"{ids.trace_id:032x}" and line["span_id"] == f"{ids.span_id:016x}"
        assert line["service.name"] == "unit"
        logged_at = datetime.datetime.fromisoformat(line["timestamp"])
        assert before - datetime.timedelta(microseconds=1) <= logged_at <= after


def test_structlog_lines_are_rendered_by_the_writers_thread_not_the_logging_one(pipeline, capfd, monkeypatch) -> None:
    """With nothing mutable in them, structlog lines leave the logging thread as values; the log
    writer's background thread renders them when it writes their batch, in the order they were logged.
    """
    rendering_threads: list[str] = []
    render = DeferredLines.render

    def recording_render(self: DeferredLines, line: tuple[Any, ...]) -> bytes:
        rendering_threads.append(threading.current_thread().name)
        return render(self, line)

    monkeypatch.setattr(DeferredLines, "render", recording_render)
    pipeline(SPYGLASS_LOG_FLUSH_INTERVAL="0.05")
    written(capfd)
    rendering_threads.clear()
    get_logger("shop.orders").info("order placed", order_id=7)
    get_logger("shop.orders").warning("order shipped", order_id=7, parcels=[1, 2])
    seen = ""
    deadline = time.monotonic() + 5
    while seen.count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
        seen += capfd.readouterr().out
    assert [json.loads(line)["event"] for line in seen.splitlines()] == ["order placed", "order shipped"]
    assert rendering_threads == ["spyglass-log-flush", "spyglass-log-flush"]


def test_lines_holding_objects_exceptions_or_stacks_are_rendered_at_once(pipeline, capfd, monkeypatch) -> None:
    """A line with an object among its fields or in the bound context, an exception or a stack is
    rendered by the thread that logs it, so a later change to the object does not show.
    """
    pipeline(SPYGLASS_LOG_FLUSH_INTERVAL="30")
    written(capfd)
    deferred: list[tuple[Any, ...]] = []
    capture = DeferredLines.capture

    def recording_capture(self: DeferredLines, *args: Any) -> tuple[Any, ...] | None:
        line = capture(self, *args)
        if line is not None:
            deferred.append(line)
        return line

    monkeypatch.setattr(DeferredLines, "capture", recording_capture)
    box = Box("first")
    logging.getLogger("shop").info("boxed", extra={"box": box})
    get_logger("shop").info("boxed", box=box)
    get_logger("shop").info("nested", nested={"box": box})
    get_logger("shop").info("listed", listed=[box])
    structlog.contextvars.bind_contextvars(cart=box)
    get_logger("shop").info("bound")
    structlog.contextvars.clear_contextvars()
    try:
        raise ValueError("no stock")
    except ValueError:
        logging.getLogger("shop").exception("failed")
        get_logger("shop").exception("failed")
    logging.getLogger("shop").info("with stack", stack_info=True)
    box.content = "second"
    assert deferred == []

    lines = written(capfd)
    events = ["boxed", "boxed", "nested", "listed", "bound", "failed", "failed", "with stack"]
    assert [line["event"] for line in lines] == events
    assert lines[0]["box"] == lines[1]["box"] == lines[4]["cart"] == "Box(first)"
    assert lines[2]["nested"] == {"box": "Box(first)"} and lines[3]["listed"] == ["Box(first)"]
    assert all("ValueError: no stock" in line["exception"] for line in lines[5:7])
    assert "Stack (most recent call last)" in lines[7]["stack_info"]


def test_a_deferred_line_is_the_line_the_chain_writes_at_once(pipeline) -> None:
    """Rendered later, a structlog line has the fields, order and values (timestamp aside) that the
    processor chain gives it at once: bound and keyword fields, bound context, level names, service,
    trace ids (unless the line names its own), and secrets redacted by key and in the message.
    """
    pipeline()
    (native,) = structlog.get_config()["processors"]
    events = [
        ("info", {"logger": "shop", "event": "order placed", "order_id": 5, "api_key": "k", "items": (1, 2)}),
        ("warn", {"logger": "shop", "event": "password=hunter2 sent", "nested": {"a": 1, "token": "t"}}),
        ("exception", {"event": "no exc_info given", "count": 0, "ratio": 0.5, "flag": None}),
        ("debug", {"event": "own ids", "trace_id": "given", "task_id": "mine"}),
    ]
    structlog.contextvars.bind_contextvars(task_id="t-1", task_name="tasks.ok")
    with tracer().start_as_current_span("run tasks.ok"):
        for method, event in events:
            expected = json.loads(_run_chain(native._chain, method, dict(event)))
            (line,), _ = native(None, method, dict(event))
            actual = json.loads(line[0](line))
            assert list(actual) == list(expected)
            assert actual.pop("timestamp") and expected.pop("timestamp")
            assert actual == expected
            assert "hunter2" not in json.dumps(actual) and actual.get("api_key") in (None, "[REDACTED]")


def _run_chain(chain: list[Any], method: str, event: dict[str, Any]) -> bytes:
    for processor in chain:
        event = processor(None, method, event)
    return event  # type: ignore[return-value]


def _resident_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_rendered_lines_waiting_for_export_hold_their_own_size_in_memory(pipeline) -> None:
    """Lines wait in the writer and in the log export's queue (thousands of them while a collector
    is down); each must cost about its length, not the buffer the JSON encoder wrote it in (about
    4 KiB, which made a worker's memory settle 25 MB higher).
    """
    pipeline()
    (native,) = structlog.get_config()["processors"]
    lines = []
    before = _resident_mb()
    for number in range(20_000):
        (line,), _ = native(None, "info", {"logger": "shop", "event": "item looked up", "item_id": number})
        lines.append(line[0](line))
    grown = _resident_mb() - before
    size = sum(map(len, lines)) / 2**20
    assert grown < size + 10, f"{len(lines)} lines of {size:.1f} MB in all took {grown:.1f} MB"
