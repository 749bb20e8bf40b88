"""A full or unwritable disk under the traces file, the logs file or the metrics directory.

What the service promises (issue 8), checked against real gunicorn workers and a real Celery
prefork pool writing to real file systems (a small tmpfs filled up gives ENOSPC, a read-only one
EROFS):

* every request still answers 200, as fast as on a healthy disk, served by the same worker
  processes (nothing crashes, nothing restarts);
* the problem is logged once per process: one warning naming the path and the error (not one per
  request or batch), and one line when it is over;
* what is lost is counted on the metrics endpoint: spans and log records in
  ``otel_sdk_exporter_{span,log}_exported_total{error_type="export_failed"}``, metric updates in
  ``spyglass_metrics_store_dropped_updates_total``, failed writes to the metrics directory in
  ``spyglass_metrics_store_errors_total``;
* writing resumes by itself once there is room again (or the file system is writable again), and
  the files never hold half a line;
* a metrics directory that is unusable at start is replaced by a private temporary one, or by
  in-memory metrics, and the endpoint keeps answering.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import celery
import psutil
import pytest
import redis
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from spyglass.metrics import multiprocess
from tests.celery_support import start_worker, stop_worker
from tests.conftest import Gunicorn, start_gunicorn, wait_for

REDIS_URL = "redis://127.0.0.1:6379/14"
ROUNDS = 100  # requests per server in a latency comparison


class Tmpfs:
    """A tmpfs of a few hundred KiB mounted for one test: filled up, freed, made read-only and writable again."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
        self._filler = path / ".filler"

    def fill(self) -> None:
        """Take every free byte (the last page of a file being appended to may keep a little room)."""
        with open(self._filler, "ab", buffering=0) as filler:
            for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
                try:
                    while True:
                        filler.write(b"\0" * chunk)
                except OSError:
                    continue
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        """Give the space back."""
        self._filler.unlink()

    def remount(self, mode: str) -> None:
        """``ro`` or ``rw``; retried while a write in flight keeps the file system busy."""
        deadline = time.monotonic() + 10
        while True:
            result = subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], capture_output=True)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"remount,{mode} failed: {result.stderr.decode()}")
            time.sleep(0.02)

    def unmount(self) -> None:
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Tmpfs]]:
    """Mounts small file systems under the test's directory; all are unmounted afterwards."""
    mounted: list[Tmpfs] = []

    def mount(name: str, size: str = "1m") -> Tmpfs:
        mounted.append(Tmpfs(tmp_path / name, size))
        return mounted[-1]

    yield mount
    for disk in reversed(mounted):
        disk.unmount()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """The same service on a healthy disk, to compare latencies with (requests alternate between the two)."""
    server = start_gunicorn(tmp_path_factory.mktemp("baseline"))
    yield server
    server.stop()


def worker_pids(server: Gunicorn) -> set[int]:
    """The gunicorn workers alive now (once all of them have started)."""
    workers = int(server.process.args[server.process.args.index("-w") + 1])
    assert wait_for(lambda: len(psutil.Process(server.process.pid).children()) >= workers)
    return {child.pid for child in psutil.Process(server.process.pid).children()}


def interleaved_latencies(server: Gunicorn, baseline: Gunicorn, path: str, rounds: int) -> tuple[list, list]:
    """Alternate requests between the healthy server and the troubled one; every answer is a 200."""
    timings: tuple[list[float], list[float]] = ([], [])
    with requests.Session() as healthy_session, requests.Session() as troubled_session:
        for index in range(rounds):
            for target, session, bucket in ((baseline, healthy_session, 0), (server, troubled_session, 1)):
                started = time.perf_counter()
                response = session.get(target.url + path.format(index + 1), timeout=10)
                timings[bucket].append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
    return timings


def assert_answers_as_fast_as(server: Gunicorn, baseline: Gunicorn, path: str = "/items/{}") -> int:
    """``ROUNDS`` requests to the troubled server, alternating with the healthy one: all 200, latency alike.

    Measured a second time if the first measure is out of bounds: a load spike on this shared
    machine passes, a slowdown that the trouble causes does not. Returns how many requests of
    ``path`` the troubled server answered.
    """
    interleaved_latencies(server, baseline, "/pid", 20)  # warm-up, not counted
    for attempt in range(2):
        healthy, troubled = interleaved_latencies(server, baseline, path, ROUNDS)
        median_healthy, median_troubled = statistics.median(healthy), statistics.median(troubled)
        p90_healthy, p90_troubled = (statistics.quantiles(values, n=10)[-1] for values in (healthy, troubled))
        print(f"median {median_healthy * 1e3:.2f} -> {median_troubled * 1e3:.2f} ms", end=", ")
        print(f"p90 {p90_healthy * 1e3:.2f} -> {p90_troubled * 1e3:.2f} ms")
        # Generous bounds for a shared 2-core machine; a blocking write or a retry per request costs far more.
        within = median_troubled < median_healthy * 1.5 + 0.001 and p90_troubled < p90_healthy * 2 + 0.005
        if within or attempt:
            break
    assert median_troubled < median_healthy * 1.5 + 0.001, (median_healthy, median_troubled)
    assert p90_troubled < p90_healthy * 2 + 0.005, (p90_healthy, p90_troubled)
    return ROUNDS * (attempt + 1)


def get_all(server: Gunicorn, paths: list[str], method: str = "GET") -> None:
    """Send each request; each gets its normal answer (5xx only where the app fails on purpose)."""
    with requests.Session() as session:
        for path in paths:
            response = session.request(method, server.url + path, timeout=10)
            assert response.status_code < 500 or path in ("/fail", "/login"), (path, response.status_code)


def counter(server: Gunicorn, family: str, **labels: str) -> float:
    """The value of one counter series on the server's endpoint (0 when absent)."""
    for parsed in server.families().values():
        if parsed.name != family:
            continue
        for sample in parsed.samples:
            if sample.name == family + "_total" and all(sample.labels.get(k, "") == v for k, v in labels.items()):
                return sample.value
    return 0.0


def lost(server: Gunicorn, signal: str) -> float:
    """Spans or log records the exporter could not deliver."""
    return counter(server, f"otel_sdk_exporter_{signal}_exported", error_type="export_failed")


def delivered_spans(server: Gunicorn) -> float:
    return counter(server, "otel_sdk_exporter_span_exported", error_type="")


def log_lines(log_path: Path, event: str) -> list[dict]:
    """The JSON log lines whose event starts with ``event``."""
    found = []
    for raw in log_path.read_text().splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and str(line.get("event", "")).startswith(event):
            found.append(line)
    return found


def assert_reported_once_per_process(lines: list[dict], path: Path, error: str, error_type: str) -> set[int]:
    """At least one warning, at most one per process, each naming the path and the error; returns the pids."""
    assert lines, "the trouble was not logged"
    per_process = collections.Counter(line["process.pid"] for line in lines)
    assert max(per_process.values()) == 1, f"logged more than once by one process: {per_process}"
    for line in lines:
        assert line["level"] == "warning"
        assert line["path"] == str(path)
        assert error in line["error"], line
        assert line["error.type"] == error_type, line
    return set(per_process)


def json_lines(path: Path) -> list[dict]:
    """Every line of an OTLP JSON lines file, parsed: a half-written line fails the test."""
    return [json.loads(line) for line in path.read_bytes().decode().split("\n") if line]


def span_paths(path: Path) -> set[str]:
    """The ``url.path`` of every span in a traces file (none while the exporter has not created it)."""
    found: set[str] = set()
    if not path.exists():
        return found
    for request in json_lines(path):
        for resource_spans in request["resourceSpans"]:
            for scope_spans in resource_spans["scopeSpans"]:
                for span in scope_spans["spans"]:
                    for attribute in span.get("attributes", []):
                        if attribute["key"] == "url.path":
                            found.add(attribute["value"]["stringValue"])
    return found


def log_events(path: Path) -> list[str]:
    """The body of every log record in an OTLP JSON logs file."""
    return [
        record.get("body", {}).get("stringValue", "")
        for request in json_lines(path)
        for resource_logs in request["resourceLogs"]
        for scope_logs in resource_logs["scopeLogs"]
        for record in scope_logs["logRecords"]
    ]


def assert_recovers(server: Gunicorn, lines_event: str, warned: set[int], written: Callable[[], bool]) -> None:
    """After the trouble, writing resumes: ``written()`` comes true and each process that warned says so once.

    ``warned`` holds the processes whose warning was read during the trouble; a process's warning
    may still have been in its stdout batch then (up to 100 ms), but it precedes its own
    "again" line there, so the warnings are read once more with the "again" lines.
    """
    marker = 900_000 + int(time.time()) % 1000
    started = time.monotonic()
    get_all(server, [f"/items/{marker + index}" for index in range(20)])
    assert wait_for(written, timeout=15), "writing did not resume"
    print(f"written again {time.monotonic() - started:.2f} s after the trouble ended")
    again = wait_for(lambda: log_lines(server.log_path, lines_event), timeout=10)
    per_process = collections.Counter(line["process.pid"] for line in again)
    assert max(per_process.values()) == 1, per_process
    warning = "cannot write the " + lines_event.removeprefix("writing the ").removesuffix(" again")
    warned = warned | {line["process.pid"] for line in log_lines(server.log_path, warning)}
    assert set(per_process) <= warned, (per_process, warned)


# Traces file ---------------------------------------------------------------------------------


def test_traces_file_on_a_disk_full_from_the_start(tmpfs, baseline: Gunicorn, tmp_path: Path) -> None:
    """A traces file with no room at all: requests unaffected, spans counted as lost, one warning per worker."""
    disk = tmpfs("traces", "256k")
    disk.fill()
    traces = disk.path / "traces.jsonl"
    server = start_gunicorn(tmp_path / "server", SPYGLASS_TRACES_FILE=str(traces))
    try:
        pids = worker_pids(server)
        assert_answers_as_fast_as(server, baseline)
        assert wait_for(lambda: lost(server, "span") >= ROUNDS)
        assert delivered_spans(server) == 0
        warned = assert_reported_once_per_process(
            log_lines(server.log_path, "cannot write the traces file"), traces, "No space left on device", "ENOSPC"
        )
        assert warned <= pids
        assert worker_pids(server) == pids

        disk.free()
        assert_recovers(server, "writing the traces file again", warned, lambda: len(span_paths(traces)) >= 20)
        assert delivered_spans(server) > 0
        assert worker_pids(server) == pids
    finally:
        server.stop()


def test_traces_file_filling_up_mid_run_never_holds_half_a_line(tmpfs, baseline: Gunicorn, tmp_path: Path) -> None:
    """The disk fills up while spans are written: no request suffers, no line is torn, writing resumes."""
    disk = tmpfs("traces", "1m")
    traces = disk.path / "traces.jsonl"
    server = start_gunicorn(tmp_path / "server", SPYGLASS_TRACES_FILE=str(traces))
    try:
        pids = worker_pids(server)
        get_all(server, [f"/items/{index}" for index in range(1, 30)])
        assert wait_for(lambda: len(span_paths(traces)) >= 29), "no spans written on the healthy disk"
        assert wait_for(lambda: delivered_spans(server) >= 29)
        delivered = delivered_spans(server)
        disk.fill()  # the traces file's last page keeps a little room: a batch that needs more is cut short

        assert_answers_as_fast_as(server, baseline)
        # Every span is accounted for: lost, or (a small batch still fitting in the last page) written.
        assert wait_for(lambda: lost(server, "span") + delivered_spans(server) - delivered >= ROUNDS)
        assert lost(server, "span") > 0
        warned = assert_reported_once_per_process(
            log_lines(server.log_path, "cannot write the traces file"), traces, "No space left on device", "ENOSPC"
        )
        json_lines(traces)  # every line whole

        disk.free()
        assert_recovers(
            server,
            "writing the traces file again",
            warned,
            lambda: any(path.startswith("/items/9") and len(path) == 13 for path in span_paths(traces)),
        )
        json_lines(traces)
        assert worker_pids(server) == pids
    finally:
        server.stop()


@pytest.mark.parametrize("trouble", ["read_only_mid_run", "directory_on_a_read_only_disk", "parent_is_a_file"])
def test_traces_file_that_cannot_be_written(tmpfs, baseline: Gunicorn, tmp_path: Path, trouble: str) -> None:
    """Read-only file system (mid-run, or before the directory exists) or a directory that cannot be created."""
    disk = tmpfs("traces", "1m")
    if trouble == "read_only_mid_run":
        traces, error, error_type = disk.path / "traces.jsonl", "Read-only file system", "EROFS"
    elif trouble == "directory_on_a_read_only_disk":
        traces, error, error_type = disk.path / "spans" / "traces.jsonl", "Read-only file system", "EROFS"
        disk.remount("ro")
    else:
        (disk.path / "spans").write_text("a file where a directory should be")
        traces, error, error_type = disk.path / "spans" / "today" / "traces.jsonl", "Not a directory", "ENOTDIR"
    server = start_gunicorn(tmp_path / "server", SPYGLASS_TRACES_FILE=str(traces))
    try:
        pids = worker_pids(server)
        if trouble == "read_only_mid_run":
            get_all(server, ["/items/1"] * 10)
            assert wait_for(traces.exists)
            disk.remount("ro")
        assert_answers_as_fast_as(server, baseline)
        assert wait_for(lambda: lost(server, "span") >= ROUNDS)
        warned = assert_reported_once_per_process(
            log_lines(server.log_path, "cannot write the traces file"), traces, error, error_type
        )

        if trouble == "parent_is_a_file":
            (disk.path / "spans").unlink()
        else:
            disk.remount("rw")
        assert_recovers(
            server, "writing the traces file again", warned, lambda: traces.exists() and bool(span_paths(traces))
        )
        json_lines(traces)
        assert worker_pids(server) == pids
    finally:
        server.stop()


# Logs file -----------------------------------------------------------------------------------


@pytest.mark.parametrize("trouble", ["full_mid_run", "read_only_from_the_start"])
def test_logs_file_that_cannot_be_written(tmpfs, baseline: Gunicorn, tmp_path: Path, trouble: str) -> None:
    """Log records exported to a file: the same promises as for the traces file; stdout keeps every line."""
    disk = tmpfs("logs", "1m")
    logs = disk.path / "logs.jsonl"
    if trouble == "read_only_from_the_start":
        disk.remount("ro")
    server = start_gunicorn(
        tmp_path / "server",
        OTEL_LOGS_EXPORTER="otlp_json_file",
        SPYGLASS_LOGS_FILE=str(logs),
        OTEL_BLRP_SCHEDULE_DELAY="100",
    )
    try:
        pids = worker_pids(server)
        if trouble == "full_mid_run":
            get_all(server, ["/items/1"] * 10)
            assert wait_for(lambda: logs.exists() and "item looked up" in log_events(logs))
            disk.fill()
            error, error_type = "No space left on device", "ENOSPC"
        else:
            error, error_type = "Read-only file system", "EROFS"
        assert_answers_as_fast_as(server, baseline)
        assert wait_for(lambda: lost(server, "log") >= ROUNDS)
        warned = assert_reported_once_per_process(
            log_lines(server.log_path, "cannot write the logs file"), logs, error, error_type
        )
        assert wait_for(lambda: len(log_lines(server.log_path, "item looked up")) >= ROUNDS)  # stdout lost none

        if trouble == "full_mid_run":
            disk.free()
        else:
            disk.remount("rw")
        assert_recovers(
            server,
            "writing the logs file again",
            warned,
            lambda: logs.exists() and "writing the logs file again" in log_events(logs),
        )
        json_lines(logs)
        assert worker_pids(server) == pids
    finally:
        server.stop()


# Metrics directory ---------------------------------------------------------------------------


def request_count(server: Gunicorn, method: str, route: str, status: str) -> float:
    for parsed in server.families().values():
        if parsed.name == "http_server_request_duration_seconds":
            for sample in parsed.samples:
                if sample.name.endswith("_count") and sample.labels == {
                    "http_request_method": method,
                    "http_route": route,
                    "http_response_status_code": status,
                }:
                    return sample.value
    return 0.0


@pytest.mark.parametrize("trouble", ["full", "read_only", "parent_is_a_file"])
def test_metrics_directory_unusable_at_start_is_replaced_by_a_private_one(
    tmpfs, baseline: Gunicorn, tmp_path: Path, trouble: str
) -> None:
    """The service starts anyway, on a private temporary directory: every worker's metrics are served."""
    disk = tmpfs("metrics", "256k")
    directory = disk.path / "values"
    if trouble == "full":
        directory.mkdir()
        disk.fill()
        error, error_type = "No space left on device", "ENOSPC"
    elif trouble == "read_only":
        disk.remount("ro")
        error, error_type = "Read-only file system", "EROFS"
    else:
        directory.write_text("a file where the directory should be")
        directory = directory / "values"
        error, error_type = "Not a directory", "ENOTDIR"
    server = start_gunicorn(tmp_path / "server", SPYGLASS_METRICS_DIR=str(directory))
    try:
        pids = worker_pids(server)
        answered = assert_answers_as_fast_as(server, baseline)
        assert wait_for(lambda: request_count(server, "GET", "/items/<int:item_id>", "200") == answered), (
            "the workers' metrics are not served"
        )
        [warning] = log_lines(server.log_path, "metrics directory unusable")
        assert warning["path"] == str(directory) and error in warning["error"], warning
        assert warning["fallback"] == os.path.join(tempfile.gettempdir(), f"spyglass-metrics-shop-{server.process.pid}")
        assert counter(server, "spyglass_metrics_store_errors", error_type=error_type) == 1
        assert counter(server, "spyglass_metrics_store_dropped_updates") == 0
        assert worker_pids(server) == pids
    finally:
        server.stop()


def test_without_any_usable_metrics_directory_the_service_keeps_serving(
    tmpfs, baseline: Gunicorn, tmp_path: Path
) -> None:
    """Neither the configured nor a temporary directory has room: requests and the endpoint still answer.

    Metrics stay in memory (only the serving process's own are served); the endpoint shows the failures.
    """
    disk = tmpfs("small", "128k")  # room for Python to accept it as TMPDIR, not for a worker's files
    server = start_gunicorn(tmp_path / "server", SPYGLASS_METRICS_DIR=str(disk.path / "values"), TMPDIR=str(disk.path))
    try:
        pids = worker_pids(server)
        assert_answers_as_fast_as(server, baseline)
        assert counter(server, "spyglass_metrics_store_errors", error_type="ENOSPC") == 2
        warnings = log_lines(server.log_path, "metrics directory unusable")
        assert [line["path"] for line in warnings] == [
            str(disk.path / "values"),
            str(disk.path / f"spyglass-metrics-shop-{server.process.pid}"),
        ]
        assert "metrics are kept in memory" in warnings[1]["event"]
        assert worker_pids(server) == pids
    finally:
        server.stop()


# Every (method, path) the shop answers without a 5xx: 9 methods x 9 paths give about 30 series.
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND"]
PATHS = ["/pid", "/items/1", "/items/0", "/echo", "/note", "/nowhere", "/fail", "/healthz", "/login"]


def test_metrics_directory_filling_up_mid_run(tmpfs, baseline: Gunicorn, tmp_path: Path) -> None:
    """New series find no room: they are dropped and counted, series stored before keep counting.

    Without reserved pages, the first write to a new page of prometheus_client's sparse file
    kills the worker with SIGBUS. Once there is room again, new series are stored again.
    """
    disk = tmpfs("metrics", "2m")
    server = start_gunicorn(tmp_path / "server", workers=1, SPYGLASS_METRICS_DIR=str(disk.path / "values"))
    try:
        pids = worker_pids(server)
        get_all(server, ["/items/1"] * 5)
        assert wait_for(lambda: request_count(server, "GET", "/items/<int:item_id>", "200") == 5)
        disk.fill()

        for method in METHODS:  # about 30 new series: the worker's histogram file must grow
            get_all(server, PATHS, method)
        before = request_count(server, "GET", "/items/<int:item_id>", "200")
        answered = assert_answers_as_fast_as(server, baseline)
        assert request_count(server, "GET", "/items/<int:item_id>", "200") == before + answered, (
            "a stored series stopped"
        )
        dropped = counter(server, "spyglass_metrics_store_dropped_updates")
        print(f"dropped metric updates: {dropped:.0f}")
        assert dropped > 0
        assert counter(server, "spyglass_metrics_store_errors", error_type="ENOSPC") >= 1
        assert wait_for(lambda: log_lines(server.log_path, "cannot store metric values"))
        [warning] = log_lines(server.log_path, "cannot store metric values")
        assert warning["path"] == str(disk.path / "values") and warning["error.type"] == "ENOSPC", warning
        missing = request_count(server, "_OTHER", "<unmatched>", "405")
        assert missing == 0, "the last new series should have been dropped"
        assert worker_pids(server) == pids

        disk.free()
        time.sleep(5.5)  # a process in trouble checks for room every 5 s
        get_all(server, PATHS, "PROPFIND")
        assert wait_for(lambda: request_count(server, "_OTHER", "<unmatched>", "405") > 0), (
            "new series not stored again"
        )
        assert wait_for(lambda: log_lines(server.log_path, "storing metric values again"))
        assert len(log_lines(server.log_path, "storing metric values again")) == 1
        assert counter(server, "spyglass_metrics_store_dropped_updates") == dropped
        assert worker_pids(server) == pids
    finally:
        server.stop()


def test_celery_pool_on_a_full_metrics_directory_runs_every_task(tmpfs, tmp_path: Path) -> None:
    """Pool processes started while the directory has no room run their tasks; their metrics are counted as dropped.

    ``--max-tasks-per-child=3`` makes the worker fork new pool processes during the outage: each
    creates its value files then (a sparse file there would kill it with SIGBUS on its first write).
    """
    disk = tmpfs("metrics", "2m")
    worker = start_worker(
        tmp_path, REDIS_URL, "--max-tasks-per-child=3", SPYGLASS_METRICS_DIR=str(disk.path / "values")
    )
    publisher = celery.Celery("publisher", broker=REDIS_URL, set_as_current=False)

    def succeeded() -> int:
        return sum("succeeded" in line["event"] for line in log_lines(worker.log_path, "Task tasks.ok["))

    def counted() -> float:
        return worker.value("celery_task_completed_total", task_name="tasks.ok", outcome="success")

    def send(count: int) -> None:
        for number in range(count):
            publisher.send_task("tasks.ok", (number,), queue=worker.queue)

    try:
        send(6)
        assert wait_for(
            lambda: counted() == 6,
            timeout=30,
        )
        disk.fill()
        send(24)
        assert wait_for(lambda: succeeded() == 30, timeout=60), worker.log_path.read_text()[-3000:]
        log = worker.log_path.read_text()
        assert "WorkerLostError" not in log and "exited with 'signal" not in log, log[-3000:]
        samples = worker.samples()
        assert samples[("spyglass_metrics_store_dropped_updates_total", frozenset())] > 0
        assert samples[("spyglass_metrics_store_errors_total", frozenset({("error_type", "ENOSPC")}))] >= 1
        warnings = log_lines(worker.log_path, "cannot store metric values")
        per_process = collections.Counter(line["process.pid"] for line in warnings)
        assert warnings and max(per_process.values()) == 1, per_process
        during = counted()
        assert during < 30

        disk.free()
        time.sleep(5.5)  # processes in trouble check for room every 5 s
        send(6)
        assert wait_for(lambda: succeeded() == 36, timeout=60)
        assert wait_for(
            lambda: counted() > during,
            timeout=15,
        ), "tasks not counted again once there is room"
    finally:
        stop_worker(worker)
        publisher.close()
        redis.Redis.from_url(REDIS_URL).delete(worker.queue)


def in_child(work: Callable[[], None]) -> int:
    """Run ``work`` in a forked child; its exit code (negative: killed by that signal, e.g. SIGBUS)."""
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])


def test_an_exited_process_that_cannot_be_folded_in_is_counted_once(tmpfs) -> None:
    """An exited worker's values with no room in the archive stay in its file, then are folded in once.

    A scrape reads the file meanwhile; when there is room again, the totals neither lose nor double
    anything (the archive takes every entry or none).
    """
    disk = tmpfs("metrics", "512k")
    directory = str(disk.path)
    exited = os.fork()
    if exited == 0:  # pragma: no cover - a worker that exits at once
        os._exit(0)
    os.waitpid(exited, 0)
    archive = MmapedDict(os.path.join(directory, "counter_archive.db"))
    archive.write_value('["tasks", "tasks_total", {"n": "first"}, "Tasks."]', 1.0, 0.0)
    archive.close()
    dead = MmapedDict(os.path.join(directory, f"counter_{exited}.db"))
    for number in range(1200):  # more than the archive's first 64 KiB can take
        dead.write_value(f'["tasks", "tasks_total", {{"n": "{number:06d}"}}, "Tasks."]', 2.0, 0.0)
    dead.close()
    expected = 1.0 + 1200 * 2.0

    def total() -> float:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        return sum(sample.value for family in registry.collect() for sample in family.samples)

    assert total() == expected
    disk.fill()
    assert in_child(lambda: multiprocess.compact_dead_process(exited, directory)) == 0
    assert os.path.exists(os.path.join(directory, f"counter_{exited}.db")), "folded in without room"
    assert total() == expected
    disk.free()
    assert in_child(lambda: multiprocess.compact_dead_process(exited, directory)) == 0
    assert sorted(os.listdir(directory)) == ["counter_archive.db"]
    assert total() == expected
