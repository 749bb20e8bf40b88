"""A real prefork Celery worker (concurrency 2) on Redis: outcomes, runtime, queue wait, one endpoint.

The worker runs `tests/apps/tasks.py`, instrumented only by `import spyglass.auto`; the test
publishes through an instrumented app of its own, as a Flask web process would, and reads the
worker's single metrics endpoint (served by its main process, summing the pool processes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import celery
import pytest
import redis
from kombu import Connection

import spyglass
from spyglass import runtime
from spyglass.config import load_settings
from tests.celery_support import RABBITMQ_URL, VENV_BIN, Worker, completed, start_worker, stop_worker
from tests.conftest import REPO, clean_environment, free_port, read_spans, wait_for, wait_for_port


@pytest.fixture
def publisher(redis_url: str) -> Iterator[celery.Celery]:
    """An instrumented app in this process that sends tasks by name (stamping their publish time)."""
    runtime.init(load_settings({"OTEL_SERVICE_NAME": "web", "SPYGLASS_METRICS_PORT": "0"}))
    app = celery.Celery("web", broker=redis_url, set_as_current=False)
    spyglass.instrument_celery(app)
    yield app
    app.close()
    runtime.shutdown()


@pytest.fixture
def worker(tmp_path: Path, redis_url: str) -> Iterator[Worker]:
    started = start_worker(tmp_path, redis_url)
    yield started
    stop_worker(started)
    redis.Redis.from_url(redis_url).delete(started.queue)


def check_core_cases(publisher: celery.Celery, worker: Worker, successes: int) -> None:
    """Publish successes, a failure and a retry-then-success; each is counted once, with queue wait and depth."""
    for number in range(successes):
        publisher.send_task("tasks.ok", (number,), queue=worker.queue)
    publisher.send_task("tasks.boom", queue=worker.queue)
    publisher.send_task("tasks.flaky", (f"flaky-{uuid.uuid4().hex}",), queue=worker.queue)

    def all_done() -> bool:
        return (
            completed(worker, "tasks.ok", "success") == successes
            and completed(worker, "tasks.boom", "failure") == 1
            and completed(worker, "tasks.flaky", "success") == 1
        )

    assert wait_for(all_done, timeout=60), worker.log_path.read_text()[-3000:]
    assert completed(worker, "tasks.flaky", "retry") == 1
    assert worker.value("celery_task_failures_total", task_name="tasks.boom", exception_type="KeyError") == 1
    assert worker.value("celery_task_runtime_seconds_count", task_name="tasks.ok") == successes
    assert worker.value("celery_task_queue_wait_seconds_count", task_name="tasks.ok") == successes
    assert worker.value("celery_tasks_active") == 0
    # The main process reads its queue's depth from the broker at scrape time: all consumed.
    assert ("celery_queue_length", frozenset({("queue", worker.queue)})) in worker.samples()
    assert worker.value("celery_queue_length") == 0


def test_outcomes_runtime_and_failures_of_a_prefork_pool_add_up_on_one_endpoint(publisher, worker) -> None:
    """Successes, a failure and a retry-then-success are counted once each, over both pool processes."""
    check_core_cases(publisher, worker, successes=6)
    assert worker.samples()[("celery_worker_pool_processes", frozenset())] == 2


def test_hard_time_limit_and_a_killed_pool_process_are_counted_by_the_main_process(publisher, worker) -> None:
    """Endings only the main process sees: the hard time limit, and a pool process that died (SIGKILL)."""
    publisher.send_task("tasks.stuck", queue=worker.queue)
    publisher.send_task("tasks.crash", (f"crash-{uuid.uuid4().hex}",), queue=worker.queue)
    assert wait_for(
        lambda: (
            completed(worker, "tasks.stuck", "time_limit") == 1 and completed(worker, "tasks.crash", "worker_lost") == 1
        ),
        timeout=60,
    ), worker.log_path.read_text()[-3000:]
    failures = {
        exception_type: worker.value("celery_task_failures_total", task_name=task, exception_type=exception_type)
        for task, exception_type in (
            ("tasks.stuck", "billiard.exceptions.TimeLimitExceeded"),
            ("tasks.crash", "billiard.exceptions.WorkerLostError"),
        )
    }
    assert failures == {"billiard.exceptions.TimeLimitExceeded": 1, "billiard.exceptions.WorkerLostError": 1}
    # The killed processes' in-flight gauges are dropped once the main process folds them in.
    assert wait_for(lambda: worker.value("celery_tasks_active") == 0, timeout=10)


def test_a_running_task_revoked_with_terminate_is_counted_as_revoked(publisher, worker) -> None:
    """revoke(terminate=True) of a running task: the main process kills it and counts outcome revoked."""
    result = publisher.send_task("tasks.sleepy", queue=worker.queue)
    assert wait_for(lambda: worker.value("celery_tasks_active") == 1, timeout=30)
    publisher.control.revoke(result.id, terminate=True)
    assert wait_for(lambda: completed(worker, "tasks.sleepy", "revoked") == 1, timeout=30), worker.log_path.read_text()[
        -3000:
    ]
    assert wait_for(lambda: worker.value("celery_tasks_active") == 0, timeout=10)
    assert completed(worker, "tasks.sleepy", "failure") == 0


def test_expired_and_rejected_tasks_are_counted_once_with_their_outcome(publisher, worker) -> None:
    """A task received after its expiry counts as expired; one that rejects its message, as rejected."""
    publisher.send_task("tasks.ok", (1,), queue=worker.queue, expires=datetime.now(UTC) - timedelta(seconds=5))
    publisher.send_task("tasks.refuse", queue=worker.queue)
    assert wait_for(
        lambda: completed(worker, "tasks.ok", "expired") == 1 and completed(worker, "tasks.refuse", "rejected") == 1,
        timeout=60,
    ), worker.log_path.read_text()[-3000:]
    time.sleep(1)  # anything counted twice would show by now
    assert completed(worker, "tasks.ok", "success") == 0
    assert completed(worker, "tasks.refuse", "failure") == 0
    assert completed(worker, "tasks.refuse", "rejected") == 1


def test_celery_log_lines_come_out_as_spyglass_json(publisher, worker) -> None:
    """Worker start, task received and task succeeded are JSON lines with the service name, not Celery text."""
    publisher.send_task("tasks.ok", (7,), queue=worker.queue)
    assert wait_for(lambda: any("succeeded" in record["event"] for record in log_records(worker)), timeout=60)
    records = log_records(worker)
    events = [record["event"] for record in records]
    assert any(event.endswith("ready.") for event in events)
    assert any("received" in event for event in events)
    assert any("succeeded" in event for event in events)
    assert all(record["service.name"] == "worker" and "timestamp" in record for record in records)


def test_queue_wait_runs_from_the_eta_not_from_publish(publisher, worker) -> None:
    """A task published with a 3 s countdown waits about 0 s in the queue: the wait is measured from its ETA."""
    publisher.send_task("tasks.ok", (1,), queue=worker.queue, countdown=3)
    publisher.send_task("tasks.ok", (2,), queue=worker.queue)
    assert wait_for(lambda: completed(worker, "tasks.ok", "success") == 2, timeout=60)
    count = worker.value("celery_task_queue_wait_seconds_count", task_name="tasks.ok")
    total = worker.value("celery_task_queue_wait_seconds_sum", task_name="tasks.ok")
    assert count == 2
    assert total < 2.0, f"queue wait {total:.2f}s includes the countdown"


def log_records(worker: Worker) -> list[dict]:
    return [json.loads(line) for line in worker.log_path.read_text().splitlines() if line.startswith("{")]


def test_lines_logged_inside_a_task_name_the_task(publisher, worker) -> None:
    """Lines of task code (structlog, stdlib) carry task_id, task_name and the run span's ids; Celery's too."""
    result = publisher.send_task("tasks.chatty", (42,), queue=worker.queue)

    def lines_of(task_id: str) -> list[dict]:
        return [record for record in log_records(worker) if record.get("task_id") == task_id]

    # Pool processes write their lines in batches (SPYGLASS_LOG_FLUSH_INTERVAL): wait for the last one.
    assert wait_for(lambda: any("succeeded" in r["event"] for r in lines_of(result.id)), timeout=60)
    mine = lines_of(result.id)
    assert {"charging order", "slow payment provider"} <= {record["event"] for record in mine}
    assert all(record["task_name"] == "tasks.chatty" for record in mine)
    charging = next(record for record in mine if record["event"] == "charging order")
    assert charging["order_id"] == 42 and charging["logger"] == "tasks"
    # Inside the task's run span: the lines of task code carry its trace, the same on every line.
    in_task = [record for record in mine if record["event"] in ("charging order", "slow payment provider")]
    assert len({(record["trace_id"], record["span_id"]) for record in in_task}) == 1
    succeeded = next(record for record in mine if "succeeded" in record["event"])
    assert succeeded["trace_id"] == in_task[0]["trace_id"]
    # The next task in the same pool process is named by its own id, not the previous one's.
    following = publisher.send_task("tasks.ok", (1,), queue=worker.queue)
    assert wait_for(lambda: any("succeeded" in r["event"] for r in lines_of(following.id)), timeout=60)
    assert {record["task_name"] for record in lines_of(following.id)} == {"tasks.ok"}


def test_recycled_pool_processes_lose_no_span_no_count_and_leave_no_files(
    tmp_path: Path, redis_url: str, publisher
) -> None:
    """With max_tasks_per_child=1 every task runs in a new process: 200 tasks, 200 run spans, all counted.

    Each pool process exports its spans as it exits (the batch delay is left at its 5 s default,
    so the flush at exit is what delivers them) and the main process folds its counts in.
    """
    traces = tmp_path / "worker-traces.jsonl"
    recycling = start_worker(
        tmp_path,
        redis_url,
        "--max-tasks-per-child=1",
        OTEL_TRACES_EXPORTER="otlp_json_file",
        SPYGLASS_TRACES_FILE=str(traces),
    )
    tasks = 200
    try:
        for number in range(tasks):
            publisher.send_task("tasks.ok", (number,), queue=recycling.queue)
        assert wait_for(lambda: completed(recycling, "tasks.ok", "success") == tasks, timeout=240), completed(
            recycling, "tasks.ok", "success"
        )
        assert recycling.value("celery_task_runtime_seconds_count", task_name="tasks.ok") == tasks

        def pids_with_files() -> set[str]:
            return {path.stem.rsplit("_", 1)[-1] for path in (tmp_path / "metrics").glob("*.db")}

        # The archive, the main process and the live pool processes: exited ones are folded in
        # by the main process in the background (each second), not left one file set apiece.
        assert wait_for(lambda: len(pids_with_files()) <= 4, timeout=10), sorted(pids_with_files())
        assert completed(recycling, "tasks.ok", "success") == tasks
    finally:
        stop_worker(recycling)
        redis.Redis.from_url(redis_url).delete(recycling.queue)
    runs = [span for span in read_spans(traces) if span["name"] == "run/tasks.ok"]
    assert len({span["attributes"]["messaging.message.id"] for span in runs}) == tasks
    assert len(runs) == tasks


WEB_SCRIPT = """
import spyglass.auto
import flask
from celery import chain

from tests.apps.tasks import ok

web = flask.Flask("web")


@web.post("/orders")
def create_order():
    result = chain(ok.s(1), ok.s(), ok.s()).apply_async()
    return {"id": result.id}


response = web.test_client().post("/orders")
assert response.status_code == 200, response.data
print("TRACERESPONSE", response.headers["traceresponse"])
"""


def test_a_request_that_starts_a_chain_yields_one_connected_trace(tmp_path: Path, redis_url: str) -> None:
    """Request span, then publish and run spans of every task of a 3-task chain: one trace, right parents."""
    worker_traces, web_traces = tmp_path / "worker-traces.jsonl", tmp_path / "web-traces.jsonl"
    traced = start_worker(
        tmp_path,
        redis_url,
        OTEL_TRACES_EXPORTER="otlp_json_file",
        SPYGLASS_TRACES_FILE=str(worker_traces),
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    try:
        env = clean_environment()
        env.update(
            CELERY_BROKER_URL=redis_url,
            TEST_QUEUE=traced.queue,
            OTEL_SERVICE_NAME="web",
            OTEL_TRACES_EXPORTER="otlp_json_file",
            SPYGLASS_TRACES_FILE=str(web_traces),
            SPYGLASS_METRICS_PORT="0",
            PYTHONPATH=str(REPO),
        )
        web = subprocess.run(
            [sys.executable, "-c", WEB_SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert web.returncode == 0, web.stderr[-3000:]
        trace_id = next(line for line in web.stdout.splitlines() if line.startswith("TRACERESPONSE")).split("-")[1]

        def trace_spans() -> list[dict]:
            return [span for span in read_spans(web_traces) + read_spans(worker_traces) if span["traceId"] == trace_id]

        assert wait_for(lambda: len([s for s in trace_spans() if s["name"].startswith("run/")]) == 3, timeout=60), (
            traced.log_path.read_text()[-3000:]
        )
        # The task histograms point at the trace: each exemplar names a run of this chain.
        assert traced.exemplar_trace_ids("celery_task_runtime_seconds") == {trace_id}
        assert traced.exemplar_trace_ids("celery_task_queue_wait_seconds") == {trace_id}
    finally:
        stop_worker(traced)
        redis.Redis.from_url(redis_url).delete(traced.queue)
    spans = trace_spans()
    by_id = {span["spanId"]: span for span in spans}
    (server,) = [span for span in spans if span["kind"] == 2]
    publishes = [span for span in spans if span["name"] == "apply_async/tasks.ok"]
    runs = [span for span in spans if span["name"] == "run/tasks.ok"]
    assert len(publishes) == 3 and len(runs) == 3
    assert "parentSpanId" not in server
    for span in spans:
        if span is not server:
            assert span["parentSpanId"] in by_id, f"{span['name']} has a parent outside the trace"
    # The first task is published by the request; each run is a child of its publish; each next
    # task of the chain is published from the run of the previous one.
    first_publish = next(span for span in publishes if span["parentSpanId"] == server["spanId"])
    for run in runs:
        assert by_id[run["parentSpanId"]]["name"] == "apply_async/tasks.ok"
    chained = [span for span in publishes if span is not first_publish]
    assert all(by_id[span["parentSpanId"]]["name"] == "run/tasks.ok" for span in chained)
    assert {span["resource"]["service.name"]["stringValue"] for span in spans} == {"web", "worker"}


def test_the_core_cases_hold_on_rabbitmq(tmp_path: Path, redis_url: str) -> None:
    """On RabbitMQ: outcomes, failures, retry then success and queue length, as on Redis."""
    rabbit = start_worker(tmp_path, RABBITMQ_URL, COUNTER_REDIS_URL=redis_url)
    runtime.init(load_settings({"OTEL_SERVICE_NAME": "web", "SPYGLASS_METRICS_PORT": "0"}))
    app = celery.Celery("web", broker=RABBITMQ_URL, set_as_current=False)
    spyglass.instrument_celery(app)
    try:
        check_core_cases(app, rabbit, successes=3)
    finally:
        app.close()
        runtime.shutdown()
        stop_worker(rabbit)
        with Connection(RABBITMQ_URL, connect_timeout=5) as connection:
            channel = connection.channel()
            channel.queue_delete(rabbit.queue)
            channel.close()


def test_beat_counts_what_it_sends_and_when_it_last_sent(tmp_path: Path, redis_url: str) -> None:
    """Beat with a 0.5 s schedule: its endpoint counts the sends and keeps the last send time."""
    queue = f"spyglass-beat-{uuid.uuid4().hex[:10]}"
    metrics_port = free_port()
    env = clean_environment()
    env.update(
        CELERY_BROKER_URL=redis_url,
        TEST_QUEUE=queue,
        BEAT_EVERY_SECONDS="0.5",
        OTEL_SERVICE_NAME="beat",
        OTEL_TRACES_EXPORTER="none",
        SPYGLASS_METRICS_PORT=str(metrics_port),
        PYTHONPATH=str(REPO),
    )
    log_path = tmp_path / "beat.log"
    command = [str(VENV_BIN / "celery"), "-A", "tests.apps.tasks", "beat", "--schedule", str(tmp_path / "schedule")]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    beat = Worker(process, metrics_port, queue, log_path)
    try:
        wait_for_port(metrics_port, process, timeout=60)
        sent_key = ("celery_beat_tasks_sent_total", frozenset({("task_name", "tasks.ok")}))
        assert wait_for(lambda: beat.samples().get(sent_key, 0) >= 3, timeout=30), log_path.read_text()[-3000:]
        last_sent = beat.samples()[("celery_beat_last_sent_timestamp_seconds", frozenset({("task_name", "tasks.ok")}))]
        assert time.time() - last_sent < 5
        assert beat.value("celery_task_published_total", task_name="tasks.ok") >= 3
    finally:
        stop_worker(beat)
        redis.Redis.from_url(redis_url).delete(queue)


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_pools_that_run_tasks_in_the_main_process_count_and_trace_them(
    tmp_path: Path, redis_url: str, publisher, pool: str
) -> None:
    """Solo and threads pools: the main process runs the tasks, and records them as a pool process would."""
    traces = tmp_path / "worker-traces.jsonl"
    in_process = start_worker(
        tmp_path,
        redis_url,
        f"--pool={pool}",
        OTEL_TRACES_EXPORTER="otlp_json_file",
        SPYGLASS_TRACES_FILE=str(traces),
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    try:
        check_core_cases(publisher, in_process, successes=3)
        # 3 successes, a failure, and a retry that ran twice: one run span each, with exemplars.
        assert wait_for(lambda: len([s for s in read_spans(traces) if s["name"].startswith("run/")]) == 6, timeout=30)
        run_trace_ids = {span["traceId"] for span in read_spans(traces) if span["name"].startswith("run/")}
        assert in_process.exemplar_trace_ids("celery_task_runtime_seconds") <= run_trace_ids
        assert in_process.exemplar_trace_ids("celery_task_runtime_seconds")
        lines = [record for record in log_records(in_process) if record.get("task_name") == "tasks.ok"]
        assert lines and all(record.get("trace_id") in run_trace_ids for record in lines)
    finally:
        stop_worker(in_process)
        redis.Redis.from_url(redis_url).delete(in_process.queue)


def test_the_worker_log_level_option_applies_to_spyglass_lines(tmp_path: Path, redis_url: str, publisher) -> None:
    """`celery worker --loglevel=WARNING`: warnings come out as JSON lines; info lines (Celery's, the task's) do not."""
    quiet = start_worker(tmp_path, redis_url, "--loglevel=WARNING")
    try:
        publisher.send_task("tasks.chatty", (7,), queue=quiet.queue)
        assert wait_for(lambda: completed(quiet, "tasks.chatty", "success") == 1, timeout=60)
        assert wait_for(
            lambda: any(record["event"] == "slow payment provider" for record in log_records(quiet)), timeout=10
        ), quiet.log_path.read_text()[-3000:]
        events = [record["event"] for record in log_records(quiet)]
        assert not any("succeeded" in event or "received" in event for event in events), events
        assert "charging order" not in events
    finally:
        stop_worker(quiet)
        redis.Redis.from_url(redis_url).delete(quiet.queue)
