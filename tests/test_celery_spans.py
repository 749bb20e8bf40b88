"""Run spans of a real prefork worker end with the status of their outcome, and can be followed.

One traced worker (concurrency 2, on Redis) runs a task of every outcome, published by an
instrumented process; the spans of both processes are read back from their OTLP/JSON files.
Endings that kill the pool process (hard time limit, SIGKILL) are traced by the main process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import celery
import pytest
import redis

from tests.celery_support import Worker, completed, start_worker, stop_worker
from tests.conftest import REPO, clean_environment, read_spans, wait_for

ERROR = 2
PRODUCER, CONSUMER = 4, 5  # OTLP span kinds

PUBLISH_SCRIPT = """
import json
import sys
from datetime import UTC, datetime, timedelta

from tests.apps.tasks import app

ids = {}
for label, name, args, options in json.loads(sys.argv[1]):
    if options.pop("expired", False):
        options["expires"] = datetime.now(UTC) - timedelta(seconds=5)
    ids[label] = app.send_task(name, args, **options).id
print("IDS", json.dumps(ids))
"""


def run_traced_publisher(tmp_path: Path, redis_url: str, worker: Worker, script: str, *args: str) -> str:
    """Run ``script`` in an instrumented process exporting its spans to a file; its stdout."""
    env = clean_environment()
    env.update(
        CELERY_BROKER_URL=redis_url,
        TEST_QUEUE=worker.queue,
        OTEL_SERVICE_NAME="web",
        OTEL_TRACES_EXPORTER="otlp_json_file",
        SPYGLASS_TRACES_FILE=str(tmp_path / "web-traces.jsonl"),
        SPYGLASS_METRICS_PORT="0",
        PYTHONPATH=str(REPO),
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def publish(tmp_path: Path, redis_url: str, worker: Worker, sends: list[tuple]) -> dict[str, str]:
    """Send tasks from an instrumented process; their ids by label."""
    sends = [(label, name, args, {"queue": worker.queue, **options}) for label, name, args, options in sends]
    stdout = run_traced_publisher(tmp_path, redis_url, worker, PUBLISH_SCRIPT, json.dumps(sends))
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("IDS "))[4:])


@pytest.fixture
def traced_worker(tmp_path: Path, redis_url: str) -> Iterator[Worker]:
    worker = start_worker(
        tmp_path,
        redis_url,
        OTEL_TRACES_EXPORTER="otlp_json_file",
        SPYGLASS_TRACES_FILE=str(tmp_path / "worker-traces.jsonl"),
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    yield worker
    stop_worker(worker)
    redis.Redis.from_url(redis_url).delete(worker.queue)


def all_spans(tmp_path: Path) -> list[dict]:
    return read_spans(tmp_path / "web-traces.jsonl") + read_spans(tmp_path / "worker-traces.jsonl")


def runs_of(spans: list[dict], task_id: str) -> list[dict]:
    """Run spans of one task id, in start order."""
    runs = [s for s in spans if s["name"].startswith("run/") and s["attributes"].get("messaging.message.id") == task_id]
    return sorted(runs, key=lambda span: int(span["startTimeUnixNano"]))


def publish_span(spans: list[dict], task_id: str) -> dict:
    (span,) = [
        s
        for s in spans
        if s["name"].startswith("apply_async/") and s["attributes"].get("messaging.message.id") == task_id
    ]
    return span


def test_every_outcome_ends_its_run_span_with_the_right_status(tmp_path: Path, redis_url: str, traced_worker) -> None:
    """Success, failure, retry, rejected, expired; then time limit, lost process (requeued or not), revoked.

    Tasks that kill their pool process are sent once the others' spans are out: a killed process
    loses the spans it had not exported yet, whichever task they belong to.
    """
    key = uuid.uuid4().hex
    ids = publish(
        tmp_path,
        redis_url,
        traced_worker,
        [
            ("ok", "tasks.ok", [1], {}),
            ("boom", "tasks.boom", [], {}),
            ("flaky", "tasks.flaky", [f"flaky-{key}"], {}),
            ("refuse", "tasks.refuse", [], {}),
            ("expired", "tasks.ok", [2], {"expired": True}),
        ],
    )
    expected_runs = {label: 2 if label == "flaky" else 1 for label in ids}

    def run_counts() -> dict:
        spans = all_spans(tmp_path)
        return {label: len(runs_of(spans, task_id)) for label, task_id in ids.items()}

    assert wait_for(lambda: run_counts() == expected_runs, timeout=60), str(run_counts())
    ids.update(
        publish(
            tmp_path,
            redis_url,
            traced_worker,
            [
                ("crash", "tasks.crash", [f"crash-{key}"], {}),
                ("crash_late", "tasks.crash_late", [f"crash-late-{key}"], {}),
                ("stuck", "tasks.stuck", [], {}),
                ("sleepy", "tasks.sleepy", [], {}),
            ],
        )
    )
    control = celery.Celery("control", broker=redis_url, set_as_current=False)
    try:
        # Once the others have ended, the one task still running is sleepy.
        assert wait_for(
            lambda: (
                completed(traced_worker, "tasks.stuck", "time_limit") == 1
                and completed(traced_worker, "tasks.crash_late", "success") == 1
                and traced_worker.value("celery_tasks_active") == 1
            ),
            timeout=60,
        ), traced_worker.log_path.read_text()[-3000:]
        control.control.revoke(ids["sleepy"], terminate=True)
    finally:
        control.close()
    expected = {
        ("tasks.ok", "success"): 1,
        ("tasks.boom", "failure"): 1,
        ("tasks.flaky", "retry"): 1,
        ("tasks.flaky", "success"): 1,
        ("tasks.refuse", "rejected"): 1,
        ("tasks.ok", "expired"): 1,
        ("tasks.stuck", "time_limit"): 1,
        ("tasks.crash", "worker_lost"): 1,
        ("tasks.crash_late", "worker_lost"): 1,
        ("tasks.crash_late", "success"): 1,
        ("tasks.sleepy", "revoked"): 1,
    }

    def counts() -> dict:
        return {pair: completed(traced_worker, *pair) for pair in expected}

    assert wait_for(lambda: counts() == expected, timeout=60), {
        pair: count for pair, count in counts().items() if count != expected[pair]
    }
    # The lost process's task was delivered again and ran; both runs were counted.
    assert int(redis.Redis.from_url(redis_url).get(f"crash-late-{key}")) == 2
    lost_failures = traced_worker.value(
        "celery_task_failures_total", task_name="tasks.crash_late", exception_type="billiard.exceptions.WorkerLostError"
    )
    assert lost_failures == 1
    # Every run ended one span: crash_late's two deliveries, one each for the others.
    expected_runs.update(crash=1, crash_late=2, stuck=1, sleepy=1)
    assert wait_for(lambda: run_counts() == expected_runs, timeout=30), str(run_counts())

    spans = all_spans(tmp_path)
    by_id = {span["spanId"]: span for span in spans}

    def only_run(label: str) -> dict:
        (span,) = runs_of(spans, ids[label])
        return span

    def assert_ended(span: dict, outcome: str | None, error: bool) -> None:
        assert span["kind"] == CONSUMER and by_id[span["parentSpanId"]]["kind"] == PRODUCER
        assert span["attributes"].get("celery.outcome") == outcome, span
        assert (span["status"].get("code") == ERROR) is error, span
        # Each run is a child of its task's publish span (a retry's: of the retry's publish).
        assert by_id[span["parentSpanId"]]["name"].startswith("apply_async/")
        assert span["resource"]["service.name"]["stringValue"] == "worker"

    assert_ended(only_run("ok"), "success", error=False)
    assert_ended(only_run("boom"), "failure", error=True)
    assert_ended(only_run("refuse"), "rejected", error=True)
    assert only_run("refuse")["status"]["message"].startswith("rejected")
    for label, outcome in (("expired", "expired"), ("stuck", "time_limit"), ("crash", "worker_lost")):
        assert_ended(only_run(label), outcome, error=True)
        assert only_run(label)["parentSpanId"] == publish_span(spans, ids[label])["spanId"]
    assert only_run("stuck")["status"]["message"] == "hard time limit exceeded"
    # A process lost without warning: the main process ends a span in place of the lost one.
    assert only_run("crash")["attributes"]["celery.requeued"] is False
    assert [event["name"] for event in only_run("crash").get("events", [])] == ["exception"]
    lost, again = runs_of(spans, ids["crash_late"])
    assert_ended(lost, "worker_lost", error=True)
    assert lost["attributes"]["celery.requeued"] is True
    assert_ended(again, "success", error=False)
    # Terminated by revoke: the pool process ends its span; the main process counts the outcome.
    assert_ended(only_run("sleepy"), None, error=True)
    assert only_run("sleepy")["status"]["message"] == "terminated while running"
    # Retried then succeeded: the second run is in the first run's trace, one publish apart.
    first, second = runs_of(spans, ids["flaky"])
    assert_ended(first, "retry", error=False)
    assert "celery.retry.reason" in first["attributes"]
    assert_ended(second, "success", error=False)
    assert second["traceId"] == first["traceId"]
    assert by_id[second["parentSpanId"]]["parentSpanId"] == first["spanId"]
    assert int(second["attributes"]["celery.retries"]) == 1


def test_chain_and_group_ids_are_on_publish_and_run_spans(tmp_path: Path, redis_url: str, traced_worker) -> None:
    """celery.root_id, celery.parent_id and celery.group_id let a canvas be followed across its tasks."""
    script = """
import json
from celery import chain, group
from tests.apps.tasks import ok

workflow = chain(ok.si(1), group(ok.si(2), ok.si(3))).apply_async()
print(json.dumps({"root": workflow.id}))
"""
    run_traced_publisher(tmp_path, redis_url, traced_worker, script)

    def runs() -> list[dict]:
        return [span for span in all_spans(tmp_path) if span["name"] == "run/tasks.ok"]

    assert wait_for(lambda: len(runs()) == 3, timeout=60), traced_worker.log_path.read_text()[-3000:]
    spans = all_spans(tmp_path)
    run_spans = runs()
    first = next(span for span in run_spans if "celery.parent_id" not in span["attributes"])
    root_id = first["attributes"]["messaging.message.id"]
    # Every task of the workflow names the first task as its root.
    assert {span["attributes"]["celery.root_id"] for span in run_spans} == {root_id}
    publishes = [span for span in spans if span["name"] == "apply_async/tasks.ok"]
    assert {span["attributes"]["celery.root_id"] for span in publishes} == {root_id}
    # The group's two tasks share a group id, and were published by the first task's run.
    grouped = [span for span in run_spans if "celery.group_id" in span["attributes"]]
    assert len(grouped) == 2
    assert len({span["attributes"]["celery.group_id"] for span in grouped}) == 1
    assert {span["attributes"]["celery.parent_id"] for span in grouped} == {root_id}
