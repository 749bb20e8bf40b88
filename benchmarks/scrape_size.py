"""Time and size of a multi-process metrics scrape: 50 routes by 20 tasks, then 1,000 dead processes more.

    python -m benchmarks.scrape_size [--routes 50] [--tasks 20] [--dead 1000] [--scrapes 30]

For each variant a *master* process is started, as a gunicorn master or a Celery worker's main
process is: it owns an empty metrics directory, serves the endpoint that merges it, and forks the
processes that record.

(a) One live worker process, forked by the master, records one HTTP request on each of
``--routes`` routes and one run of each of ``--tasks`` Celery tasks, through the variant's
instruments, then stays alive (a serving worker). The endpoint is scraped ``--scrapes`` times.

(b) Then the master forks ``--dead`` short-lived processes, one after another: each records one
request (route *i* mod ``--routes``) and one task run (task *i* mod ``--tasks``) and exits; the
master reaps it and tells its metrics library, as a gunicorn ``child_exit`` hook does. The live
worker is still there. The endpoint is scraped ``--scrapes`` times again.

Variants (:data:`DESCRIPTIONS`):

``spyglass``
    the master is set up by ``runtime.init(role="master")`` (what spyglass's gunicorn
    ``on_starting`` hook does), every recording process by ``runtime.mark_worker()`` and
    ``runtime.init(role="worker")`` (its ``post_fork`` hook, or Celery's ``worker_process_init``);
    requests are recorded by spyglass's ``HttpServerMetrics`` and task runs by its
    ``CeleryMetrics`` (with trace exemplars), as the Flask middleware and the Celery receivers do;
    exited processes are folded into archive files by ``spyglass.gunicorn.child_exit`` (and the
    master's background compactor). The endpoint is spyglass's own.
``prometheus-multiproc``
    prometheus_client's multi-process mode as its docs describe: ``PROMETHEUS_MULTIPROC_DIR``
    empty at start, the same metric families (names, labels, buckets, live-sum gauges) as plain
    ``Histogram``/``Counter``/``Gauge`` objects defined in the master before the fork,
    ``MultiProcessCollector`` in a registry of its own served by ``start_http_server``, and
    ``mark_process_dead`` for each exited process. The peer a user would otherwise reach for.

Each scrape opens a new connection and sends the ``Accept`` header Prometheus sends (so both
answer in OpenMetrics), timed from connect to the last byte of the body. Reported: median and p95
scrape time, body bytes, samples in the body, files in the metrics directory, and the requests
and task runs the body counts (every one recorded must be there). Writes the section
``scrape-size`` of docs/performance.md (see :mod:`benchmarks.report`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from benchmarks import report
from benchmarks.celery_processes import BenchmarkError, free_port, wait_until
from benchmarks.celery_scrape import scrape

__all__ = [
    "DESCRIPTIONS",
    "PEER",
    "ScrapeResult",
    "count_body",
    "figures",
    "main",
    "measure_variant",
    "render_section",
    "serve",
]

SECTION = "scrape-size"
PEER = "prometheus-multiproc"
PEER_LABEL = "prometheus_client multiprocess"
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("prometheus-client", "psutil", "spyglass")
QUEUE = "celery"
DESCRIPTIONS = {
    "spyglass": "`runtime.init(role='master')` (spyglass's gunicorn `on_starting`), each recording process "
    "`runtime.mark_worker()` + `runtime.init(role='worker')`; requests through `HttpServerMetrics`, task runs "
    "through `CeleryMetrics` (with exemplars); exited processes folded into archive files by "
    "`spyglass.gunicorn.child_exit`",
    "prometheus-multiproc": "prometheus_client multi-process mode as its docs describe: the same families as plain "
    "`Histogram`/`Counter`/`Gauge` (live-sum gauges) defined before the fork, `MultiProcessCollector` served by "
    "`start_http_server`, `mark_process_dead` for each exited process",
}
REQUESTS_SAMPLE = "http_server_request_duration_seconds_count"
TASKS_SAMPLE = "celery_task_completed_total"
_CLEARED_PREFIXES = ("OTEL_", "SPYGLASS_", "PROMETHEUS_")
_CLEARED_NAMES = ("prometheus_multiproc_dir",)
_START_TIMEOUT_S = 60.0
_DEAD_TIMEOUT_PER_PROCESS_S = 0.5
_PID_IN_NAME = re.compile(r"_(\d+)\.(?:db|exm)$")
DASH = "\u2013"
TIMES = "\u00d7"


def route_names(count: int) -> list[str]:
    """The routes the workers serve: ``count`` distinct Flask route templates."""
    return [f"/api/v1/resource{number:02d}/<int:item_id>" for number in range(count)]


def task_names(count: int) -> list[str]:
    """The Celery tasks the workers run: ``count`` distinct task names."""
    return [f"shop.tasks.job{number:02d}" for number in range(count)]


# -- the master process and the processes it forks -----------------------------------------------


class _Recorder:
    """Records requests and task runs through one variant's instruments, in a forked process."""

    def request(self, route: str, seconds: float) -> None:
        raise NotImplementedError

    def task(self, name: str, wait_seconds: float, runtime_seconds: float) -> None:
        raise NotImplementedError

    def exit(self) -> None:
        """What the process does on its way out."""


class _SpyglassRecorder(_Recorder):
    """spyglass in a worker process: set up after the fork, as its gunicorn and Celery hooks do."""

    def __init__(self) -> None:
        from spyglass import runtime

        self._runtime = runtime
        runtime.mark_worker()
        state = runtime.init(role="worker")
        if state.http_metrics is None or state.metrics_dir is None:
            raise RuntimeError("spyglass did not set up multi-process metrics in the worker")
        self._http = state.http_metrics
        celery = state.celery_metrics()
        if celery is None:
            raise RuntimeError("spyglass has no Celery metrics")
        self._celery = celery

    def request(self, route: str, seconds: float) -> None:
        # As the Flask middleware does for a sampled request: in-flight gauge, histogram with exemplar.
        active = self._http.active("GET")
        active.inc(1)
        self._http.observe("GET", route, "200", seconds, os.urandom(16).hex(), os.urandom(8).hex())
        active.inc(-1)

    def task(self, name: str, wait_seconds: float, runtime_seconds: float) -> None:
        # As the task_prerun and task_postrun receivers do for a sampled run.
        trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
        self._celery.started(name, QUEUE, wait_seconds, trace_id, span_id)
        self._celery.finished(name, QUEUE, "success", runtime_seconds, trace_id, span_id)

    def exit(self) -> None:
        self._runtime.shutdown()  # spyglass's worker_exit / worker_process_shutdown


class _PeerMetrics:
    """The peer's metric families, defined in the master before it forks (an app module's globals)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from spyglass.catalog import by_name  # names, labels and buckets only: the same families

        def spec(name: str) -> Any:
            return by_name(name)

        duration = spec("http_server_request_duration_seconds")
        self.http_duration = Histogram(
            duration.constructor_name, duration.description, duration.labels, buckets=duration.buckets
        )
        active = spec("http_server_active_requests")
        self.http_active = Gauge(
            active.constructor_name, active.description, active.labels, multiprocess_mode="livesum"
        )
        completed = spec("celery_task_completed_total")
        self.completed = Counter(completed.constructor_name, completed.description, completed.labels)
        runtime = spec("celery_task_runtime_seconds")
        self.runtime = Histogram(runtime.constructor_name, runtime.description, runtime.labels, buckets=runtime.buckets)
        wait = spec("celery_task_queue_wait_seconds")
        self.queue_wait = Histogram(wait.constructor_name, wait.description, wait.labels, buckets=wait.buckets)
        tasks_active = spec("celery_tasks_active")
        self.tasks_active = Gauge(
            tasks_active.constructor_name, tasks_active.description, tasks_active.labels, multiprocess_mode="livesum"
        )


class _PeerRecorder(_Recorder):
    """prometheus_client in a worker process: the master's metric objects, values in this process's files."""

    def __init__(self, metrics: _PeerMetrics) -> None:
        self._metrics = metrics

    def request(self, route: str, seconds: float) -> None:
        metrics = self._metrics
        metrics.http_active.labels("GET").inc()
        metrics.http_duration.labels("GET", route, "200").observe(seconds)
        metrics.http_active.labels("GET").dec()

    def task(self, name: str, wait_seconds: float, runtime_seconds: float) -> None:
        metrics = self._metrics
        metrics.tasks_active.labels(QUEUE).inc()
        metrics.queue_wait.labels(name, QUEUE).observe(wait_seconds)
        metrics.completed.labels(name, QUEUE, "success").inc()
        metrics.runtime.labels(name, QUEUE).observe(runtime_seconds)
        metrics.tasks_active.labels(QUEUE).dec()


def _duration(number: int) -> float:
    """A request or run time that spreads the observations over several buckets."""
    return (0.003, 0.02, 0.06, 0.2, 0.7, 1.5)[number % 6]


def _fork_recorder(
    make_recorder: Callable[[], _Recorder],
    routes: Sequence[str],
    tasks: Sequence[str],
    close_fds: Sequence[int],
    hold: tuple[int, int] | None = None,
) -> int:
    """Fork a process that records ``routes`` and ``tasks`` and exits; return its pid.

    With ``hold`` (a pipe to write to once recorded, a pipe to wait on), the process stays alive
    until the master writes to (or closes) the second pipe: a serving worker.
    """
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        for descriptor in close_fds:
            os.close(descriptor)
        recorder = make_recorder()
        for number, route in enumerate(routes):
            recorder.request(route, _duration(number))
        for number, task in enumerate(tasks):
            recorder.task(task, _duration(number + 1) / 10, _duration(number))
        if hold is not None:
            recorded, release = hold
            os.write(recorded, b"1")
            os.read(release, 1)
        recorder.exit()
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


def _reply(reply_fd: int, message: dict[str, Any]) -> None:
    os.write(reply_fd, (json.dumps(message) + "\n").encode("utf-8"))


def _pids_with_files(directory: str) -> set[int]:
    pids = set()
    for entry in os.scandir(directory):
        match = _PID_IN_NAME.search(entry.name)
        if match:
            pids.add(int(match.group(1)))
    return pids


def serve(variant: str, port: int, routes: int, tasks: int, reply_fd: int, commands: BinaryIO) -> int:
    """The master process: serve the endpoint, fork the live worker, then dead processes on command.

    Replies (JSON lines on ``reply_fd``) when the live worker has recorded, and when each batch of
    dead processes is done and folded in; reads ``dead N`` and ``stop`` lines from ``commands``.
    """
    route_list, task_list = route_names(routes), task_names(tasks)
    exited: Callable[[int], None]
    finish: Callable[[], None] = lambda: None  # noqa: E731 - what the master does when it stops
    if variant == "spyglass":
        from spyglass import runtime
        from spyglass.gunicorn import child_exit

        state = runtime.init(role="master")
        if state.metrics_dir is None or state.metrics_port != port:
            _reply(reply_fd, {"error": "spyglass did not serve a multi-process endpoint"})
            return 1
        directory = state.metrics_dir
        make_recorder: Callable[[], _Recorder] = _SpyglassRecorder
        finish = runtime.shutdown

        def exited(pid: int) -> None:
            child_exit(None, SimpleNamespace(pid=pid))

    elif variant == PEER:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        metrics = _PeerMetrics()
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        start_http_server(port, addr="127.0.0.1", registry=registry)

        def make_recorder() -> _Recorder:
            return _PeerRecorder(metrics)

        def exited(pid: int) -> None:
            mark_process_dead(pid, directory)

    else:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(DESCRIPTIONS)}")

    recorded_r, recorded_w = os.pipe()
    release_r, release_w = os.pipe()
    started = time.monotonic()
    live = _fork_recorder(
        make_recorder, route_list, task_list, [reply_fd, recorded_r, release_w], hold=(recorded_w, release_r)
    )
    os.close(recorded_w)
    os.close(release_r)
    if os.read(recorded_r, 1) != b"1":
        _reply(reply_fd, {"error": "the live worker failed to record"})
        return 1
    _reply(reply_fd, {"phase": "live", "pid": live, "seconds": time.monotonic() - started})

    for line in commands:
        words = line.decode("utf-8").split()
        if not words or words[0] == "stop":
            break
        count = int(words[1])
        started = time.monotonic()
        for number in range(count):
            pid = _fork_recorder(
                make_recorder,
                [route_list[number % routes]],
                [task_list[number % tasks]],
                [reply_fd, recorded_r, release_w],
            )
            _, status = os.waitpid(pid, 0)
            if status != 0:
                _reply(reply_fd, {"error": f"dead process {number} ({pid}) exited with status {status}"})
                return 1
            exited(pid)
        # The files of every exited process are folded in (spyglass) or left in place (the peer).
        deadline = time.monotonic() + 60
        while variant == "spyglass" and _pids_with_files(directory) - {live, os.getpid()}:
            if time.monotonic() > deadline:
                _reply(reply_fd, {"error": "exited processes were not folded in within 60 s"})
                return 1
            time.sleep(0.05)
        _reply(reply_fd, {"phase": "dead", "count": count, "seconds": time.monotonic() - started})

    os.close(release_w)  # the live worker exits
    os.waitpid(live, 0)
    finish()
    return 0


# -- the benchmark -------------------------------------------------------------------------------


@dataclass
class ScrapeResult:
    """What was measured for one variant in one state of its directory."""

    variant: str
    dead: int
    scrape_ms: list[float]
    body_bytes: int
    samples: int
    files: int
    requests_counted: float
    tasks_counted: float
    requests_expected: int
    tasks_expected: int
    setup_seconds: float

    @property
    def median(self) -> float:
        """Median scrape time, ms."""
        return statistics.median(self.scrape_ms)

    @property
    def p95(self) -> float:
        """95th percentile scrape time, ms (see :func:`benchmarks.report.p95`)."""
        return report.p95(self.scrape_ms)

    @property
    def complete(self) -> bool:
        """Whether the body counts every request and task run recorded."""
        return self.requests_counted == self.requests_expected and self.tasks_counted == self.tasks_expected


def count_body(content_type: str, body: str) -> tuple[int, float, float]:
    """Samples in a scraped body, and the requests and task runs it counts."""
    parse = parse_openmetrics if content_type.startswith("application/openmetrics-text") else parse_text
    samples = 0
    requests = tasks = 0.0
    for family in parse(body):
        for sample in family.samples:
            samples += 1
            if sample.name == REQUESTS_SAMPLE:
                requests += sample.value
            elif sample.name == TASKS_SAMPLE:
                tasks += sample.value
    return samples, requests, tasks


def _master_environment(variant: str, directory: Path, port: int) -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_CLEARED_PREFIXES) and key not in _CLEARED_NAMES
    }
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if variant == "spyglass":
        environment.update(
            OTEL_SERVICE_NAME="bench-scrape",
            OTEL_TRACES_EXPORTER="none",  # spans are not what is measured; exemplars are still recorded
            SPYGLASS_LOG_LEVEL="warning",
            SPYGLASS_METRICS_DIR=str(directory),
            SPYGLASS_METRICS_PORT=str(port),
        )
    else:
        environment["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return environment


class _Master:
    """The master process of one variant, as the benchmark drives it."""

    def __init__(self, variant: str, workdir: Path, port: int, routes: int, tasks: int) -> None:
        self.variant = variant
        self.log_path = workdir / "master.log"
        self._reply_r, reply_w = os.pipe()
        self._buffer = b""
        command = [
            sys.executable,
            "-m",
            "benchmarks.scrape_size",
            "--serve",
            variant,
            "--port",
            str(port),
            "--routes",
            str(routes),
            "--tasks",
            str(tasks),
            "--reply-fd",
            str(reply_w),
        ]
        try:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=_master_environment(variant, workdir / "metrics", port),
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(reply_w,),
                    start_new_session=True,  # its own process group: stop() reaches the workers too
                )
        finally:
            os.close(reply_w)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the master's output (for error messages)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def reply(self, timeout: float) -> dict[str, Any]:
        """The master's next reply; raises :class:`BenchmarkError` on an error, its exit or a timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchmarkError(
                    f"{self.variant}: no answer from the master in {timeout:.0f} s:\n{self.log_tail()}"
                )
            ready, _, _ = select.select([self._reply_r], [], [], min(remaining, 1.0))
            if ready:
                chunk = os.read(self._reply_r, 4096)
                if not chunk:
                    self.process.wait(timeout=10)
                    raise BenchmarkError(
                        f"{self.variant}: the master exited (status {self.process.returncode}):\n{self.log_tail()}"
                    )
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if "error" in message:
            raise BenchmarkError(f"{self.variant}: {message['error']}:\n{self.log_tail()}")
        return message

    def command(self, text: str) -> None:
        """Send one command line to the master."""
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode("utf-8") + b"\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        """Ask the master to stop; kill its whole process group if it does not within 30 s."""
        with contextlib.suppress(OSError, ValueError):
            self.command("stop")
            assert self.process.stdin is not None
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        os.close(self._reply_r)


def _scrape_phase(
    variant: str, port: int, directory: Path, scrapes: int, dead: int, routes: int, tasks: int, setup: float
) -> ScrapeResult:
    scrape(port)  # an untimed first scrape: lazily built state, if any, is not what is measured
    timings, content_type, body = [], "", ""
    for _ in range(scrapes):
        elapsed_ms, content_type, body = scrape(port)
        timings.append(elapsed_ms)
    samples, requests, task_runs = count_body(content_type, body)
    return ScrapeResult(
        variant=variant,
        dead=dead,
        scrape_ms=timings,
        body_bytes=len(body.encode("utf-8")),
        samples=samples,
        files=sum(1 for entry in os.scandir(directory) if entry.is_file()),
        requests_counted=requests,
        tasks_counted=task_runs,
        requests_expected=routes + dead,
        tasks_expected=tasks + dead,
        setup_seconds=setup,
    )


def _listening(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def measure_variant(variant: str, routes: int, tasks: int, dead: int, scrapes: int) -> list[ScrapeResult]:
    """Measure ``variant`` with the live worker alone, then with ``dead`` exited processes more."""
    results = []
    with tempfile.TemporaryDirectory(prefix=f"bench-scrape-size-{variant}-") as name:
        workdir = Path(name)
        directory = workdir / "metrics"
        directory.mkdir()  # empty at start, as both libraries want
        port = free_port()
        master = _Master(variant, workdir, port, routes, tasks)
        try:
            live = master.reply(_START_TIMEOUT_S)
            if not wait_until(lambda: _listening(port), timeout=_START_TIMEOUT_S, process=master.process):
                raise BenchmarkError(f"{variant}: the endpoint never answered:\n{master.log_tail()}")
            results.append(_scrape_phase(variant, port, directory, scrapes, 0, routes, tasks, live["seconds"]))
            if dead:
                master.command(f"dead {dead}")
                done = master.reply(_START_TIMEOUT_S + dead * _DEAD_TIMEOUT_PER_PROCESS_S)
                results.append(_scrape_phase(variant, port, directory, scrapes, dead, routes, tasks, done["seconds"]))
        finally:
            master.stop()
        if master.process.returncode not in (0, -signal.SIGKILL):
            raise BenchmarkError(
                f"{variant}: the master failed (status {master.process.returncode}):\n{master.log_tail()}"
            )
    return results


def _find(results: Sequence[ScrapeResult], variant: str, dead: int) -> ScrapeResult | None:
    return next((result for result in results if result.variant == variant and result.dead == dead), None)


def _state_label(dead: int, routes: int, tasks: int) -> str:
    base = f"{routes} routes {TIMES} {tasks} tasks"
    return base if dead == 0 else f"{base} + {dead:,} dead processes"


def render_table(results: Sequence[ScrapeResult]) -> str:
    """The result table in Markdown."""
    lines = [
        f"| Variant | Dead processes | Scrape ms: median | p95 | min{DASH}max | {TIMES} {PEER} (median) "
        "| Body bytes | Samples | Files in metrics directory | Requests, task runs counted | Set-up s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        peer = _find(results, PEER, result.dead)
        ratio = DASH if peer is None or result.variant == PEER else f"{result.median / peer.median:.2f}"
        lines.append(
            f"| {result.variant} | {result.dead:,} | {result.median:.1f} | {result.p95:.1f} "
            f"| {min(result.scrape_ms):.1f}{DASH}{max(result.scrape_ms):.1f} | {ratio} | {result.body_bytes:,} "
            f"| {result.samples:,} | {result.files:,} "
            f"| {result.requests_counted:,.0f} of {result.requests_expected:,}, "
            f"{result.tasks_counted:,.0f} of {result.tasks_expected:,} | {result.setup_seconds:.1f} |"
        )
    return "\n".join(lines)


def figures(results: Sequence[ScrapeResult], routes: int, tasks: int) -> list[report.Figure]:
    """The summary figures: spyglass's median scrape time in each state, over prometheus_client's."""
    result = []
    for mine in (r for r in results if r.variant == "spyglass"):
        peer = _find(results, PEER, mine.dead)
        result.append(
            report.Figure(
                benchmark="Metrics scrape, multi-process",
                measure=f"spyglass scrape, {_state_label(mine.dead, routes, tasks)}",
                value=f"{mine.median:.1f} ms, {mine.body_bytes / 1024:,.0f} KiB, {mine.samples:,} samples",
                ratio=round(mine.median / peer.median, 3) if peer is not None else None,
                against=PEER_LABEL if peer is not None else "",
                noise=report.noise(mine.scrape_ms),
            )
        )
    return result


def _key_lines(results: Sequence[ScrapeResult], routes: int, tasks: int) -> list[str]:
    lines = []
    for mine in (r for r in results if r.variant == "spyglass"):
        peer = _find(results, PEER, mine.dead)
        against = (
            ""
            if peer is None
            else f" ({mine.median / peer.median:.2f} {TIMES} prometheus_client's {peer.median:.1f} ms)"
        )
        lines.append(
            f"- {_state_label(mine.dead, routes, tasks)}: spyglass's scrape takes {mine.median:.1f} ms "
            f"(median){against}, {mine.body_bytes:,} bytes, {mine.samples:,} samples, {mine.files:,} files."
        )
    if not lines:
        return ["Key figures not available: they need spyglass."]
    incomplete = [f"{r.variant} with {r.dead:,} dead processes" for r in results if not r.complete]
    warning = (
        ["", f"Warning: the body did not count every request and task run recorded: {', '.join(incomplete)}."]
        if incomplete
        else []
    )
    return ["**Key figures:**", "", *lines, *warning]


def render_section(results: Sequence[ScrapeResult], routes: int, tasks: int, dead: int, scrapes: int) -> str:
    """Render this benchmark's section of docs/performance.md."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    variants = "\n".join(
        f"- `{name}`: {DESCRIPTIONS[name]}" for name in dict.fromkeys(result.variant for result in results)
    )
    return "\n".join(
        [
            "<!-- Generated by `python -m benchmarks.scrape_size`. Do not edit: rerun it instead. -->",
            "",
            "# Performance: metrics scrape time and size, many series and many dead processes",
            "",
            "This section is written by `python -m benchmarks.scrape_size`; the numbers below come from its last run.",
            "",
            f"Measured {now}: a master process serving the endpoint of a multi-process metrics directory; one live "
            f"worker recorded {routes} routes {TIMES} {tasks} Celery tasks, then {dead:,} short-lived processes "
            f"recorded and exited one after another. {scrapes} timed scrapes in each state.",
            "",
            render_table(results),
            "",
            *_key_lines(results, routes, tasks),
            "",
            "## Machine",
            "",
            *report.machine_lines(PACKAGES),
            "",
            "## Variants",
            "",
            variants,
            "",
            "## Method",
            "",
            "For each variant a master process is started with an empty metrics directory (spyglass: "
            "`SPYGLASS_METRICS_DIR`, `OTEL_TRACES_EXPORTER=none`; the peer: `PROMETHEUS_MULTIPROC_DIR`) and serves "
            "its endpoint from a thread, as a gunicorn master or a Celery worker's main process does. It forks one "
            f"live worker that records one `GET` request (status 200) on each of {routes} route templates and one "
            f"successful run of each of {tasks} task names on queue `celery` (queue wait and runtime observed), "
            "then stays alive: the series are `http_server_request_duration_seconds` (a histogram per route), "
            "`http_server_active_requests`, `celery_task_completed_total`, `celery_task_runtime_seconds` and "
            "`celery_task_queue_wait_seconds` (histograms per task) and `celery_tasks_active`, the same names, labels "
            "and buckets in both variants; spyglass also records an exemplar (trace and span id) per observation, "
            "as it does for sampled requests and runs, which prometheus_client's multi-process mode cannot keep. "
            "The endpoint is then scraped (state *0 dead processes*). Then the master forks "
            f"{dead:,} processes one after another, each set up as a worker, recording one request (route *i* mod "
            f"{routes}) and one task run (task *i* mod {tasks}) and exiting (spyglass's: after "
            "`runtime.shutdown()`, its `worker_exit`); the master reaps each and calls what a gunicorn `child_exit` "
            "hook calls: spyglass's `spyglass.gunicorn.child_exit` (folds the process's files into archive files), "
            "prometheus_client's `mark_process_dead` (removes its live gauge files; the rest stay and are read by "
            "every scrape). For spyglass the benchmark waits until no exited process has files left. *Set-up s* "
            "is the time the live worker took to start and record, or the dead processes to be forked, record, "
            "exit and be folded in. In each state, after one untimed scrape, each timed scrape opens a new "
            "connection, sends the `Accept` header Prometheus sends (both endpoints answer in OpenMetrics) and "
            "reads the whole body; the time is from connecting to the last byte. *Samples* counts the samples in "
            "the last body (bucket, sum, count, created and gauge lines; spyglass's endpoint also serves "
            "`process_*`, `python_info`, `target_info` and its store-health counters); *requests, task runs "
            "counted* sums `http_server_request_duration_seconds_count` and `celery_task_completed_total` over the "
            "body, which must equal what was recorded. *Files in metrics directory* is counted after the scrapes. "
            "Rerun with `.venv/bin/python -m benchmarks.scrape_size` (`--help` for the counts).",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the section and write it; non-zero only if a measurement failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=50, help="HTTP routes the live worker serves (default 50)")
    parser.add_argument("--tasks", type=int, default=20, help="Celery tasks the live worker runs (default 20)")
    parser.add_argument("--dead", type=int, default=1_000, help="short-lived processes forked after (default 1000)")
    parser.add_argument("--scrapes", type=int, default=30, help="timed scrapes in each state (default 30)")
    parser.add_argument(
        "--variants", nargs="+", choices=list(DESCRIPTIONS), default=list(DESCRIPTIONS), help="variants to measure"
    )
    parser.add_argument("--serve", choices=list(DESCRIPTIONS), help=argparse.SUPPRESS)  # the master process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reply-fd", type=int, help=argparse.SUPPRESS)
    report.add_section_options(parser)
    args = parser.parse_args(argv)
    if args.routes < 1 or args.tasks < 1 or args.scrapes < 1 or args.dead < 0:
        parser.error("--routes, --tasks and --scrapes must be positive, --dead not negative")

    if args.serve is not None:
        if args.port is None or args.reply_fd is None:
            parser.error("--serve needs --port and --reply-fd")
        return serve(args.serve, args.port, args.routes, args.tasks, args.reply_fd, sys.stdin.buffer)

    results: list[ScrapeResult] = []
    try:
        for variant in args.variants:
            started = time.monotonic()
            measured = measure_variant(variant, args.routes, args.tasks, args.dead, args.scrapes)
            results += measured
            for result in measured:
                print(
                    f"{variant:<22} {result.dead:>5,} dead: scrape median {result.median:8.1f} ms  "
                    f"p95 {result.p95:8.1f} ms  {result.body_bytes:,} bytes  {result.samples:,} samples  "
                    f"{result.files:,} files",
                    file=sys.stderr,
                    flush=True,
                )
            print(f"{variant:<22} {time.monotonic() - started:.0f} s in all", file=sys.stderr, flush=True)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    section = render_section(results, args.routes, args.tasks, args.dead, args.scrapes)
    status = report.publish_section(
        SECTION,
        section,
        args.output,
        not args.no_write,
        figures=figures(results, args.routes, args.tasks),
        figures_path=args.figures,
    )
    incomplete = [result for result in results if not result.complete]
    if incomplete:
        print("warning: some bodies did not count every request and task run recorded", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
