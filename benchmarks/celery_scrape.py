"""Scrape time of a Celery worker's metrics endpoint after many recycled pool processes.

    python -m benchmarks.celery_scrape [--tasks 1000] [--scrapes 30]

A real prefork worker (concurrency 2) runs with ``--max-tasks-per-child=1``, so each of its
``--tasks`` no-op tasks runs in a new pool process that then exits: after 1,000 tasks, 1,000 pool
processes have written metrics and gone. Then its endpoint is scraped ``--scrapes`` times, one
after another, each on a new connection with the ``Accept`` header Prometheus sends, timed from
connect to the last byte of the body. Reported: median and p95 scrape time, the number of files
in the worker's metrics directory, the body size, and how many tasks the endpoint counts.

Variants, measured in the same run with the same tasks:

``spyglass``
    ``import spyglass.auto`` (:mod:`benchmarks.celery_app`), ``SPYGLASS_METRICS_DIR`` in a temporary
    directory; the worker's main process serves the endpoint and folds exited pool processes
    into archive files in the background.
``prometheus-multiproc``
    prometheus_client's own multi-process mode, set up as its docs say (``PROMETHEUS_MULTIPROC_DIR``
    empty at start, ``MultiProcessCollector`` served from the worker's main process, a
    ``Counter`` and a ``Histogram`` updated in ``task_postrun``, ``mark_process_dead`` as pool
    processes exit): the peer a Celery user would otherwise reach for.

Before scraping, the benchmark waits until the endpoint counts every task and, for spyglass,
until the folding of exited processes has caught up, so the scrapes see the steady state a
Prometheus scraping every 15 s would. Target: spyglass's scrapes under 100 ms. Writes the
section ``celery-scrape`` of docs/performance.md (see :mod:`benchmarks.report`).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from benchmarks import report
from benchmarks.celery_processes import (
    BenchmarkError,
    Worker,
    base_environment,
    delete_queue,
    free_port,
    publish,
    redis_broker,
    redis_version,
    start_worker,
    stop_worker,
    wait_until,
)

__all__ = ["DESCRIPTIONS", "ScrapeResult", "main", "measure_variant", "render_section"]

SECTION = "celery-scrape"
TARGET_VARIANT = "spyglass"
TARGET_MS = 100.0
CONCURRENCY = 2
PACKAGES = ("celery", "billiard", "prometheus-client", "spyglass")
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.1"
)
"""What Prometheus (2.x and 3.x, default scrape protocols) asks a target for."""
DESCRIPTIONS = {
    "spyglass": "`import spyglass.auto`: task counts, runtime and queue-wait histograms (with exemplars), "
    "published counts; exited pool processes folded into archive files by the main process",
    "prometheus-multiproc": "prometheus_client multi-process mode as its docs describe: a `Counter` "
    "(task name, state) and a `Histogram` (runtime, default buckets) in `task_postrun`, "
    "`MultiProcessCollector` served by `start_http_server` from `worker_init`, `mark_process_dead` in "
    "`worker_process_shutdown`",
}
COUNTED_SAMPLE = {"spyglass": "celery_task_completed_total", "prometheus-multiproc": "celery_tasks_total"}
"""The sample that counts finished tasks, per variant (summed over its label sets for the no-op task)."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DASH = "\u2013"


@dataclass
class ScrapeResult:
    """What was measured for one variant."""

    name: str
    scrape_ms: list[float]
    files: int
    body_bytes: int
    tasks_counted: float
    run_seconds: float
    failed_polls: int = 0
    """Polls of the endpoint, while the tasks ran, that it answered with an error (not timed scrapes)."""

    @property
    def median(self) -> float:
        return statistics.median(self.scrape_ms)

    @property
    def p95(self) -> float:
        """95th percentile scrape time, ms (see :func:`benchmarks.report.p95`)."""
        return report.p95(self.scrape_ms)


class ScrapeFailed(BenchmarkError):
    """The endpoint answered a scrape with an error status."""


def scrape(port: int) -> tuple[float, str, str]:
    """GET /metrics on a new connection as Prometheus asks; return (milliseconds, content type, body)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("GET", "/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status != 200:
        raise ScrapeFailed(f"GET /metrics answered {response.status}")
    return elapsed_ms, response.getheader("Content-Type", ""), body.decode("utf-8")


def tasks_counted(variant: str, content_type: str, body: str) -> float:
    """How many no-op tasks the scraped body says finished."""
    parse = parse_openmetrics if content_type.startswith("application/openmetrics-text") else parse_text
    return sum(
        sample.value
        for family in parse(body)
        for sample in family.samples
        if sample.name == COUNTED_SAMPLE[variant] and sample.labels.get("task_name") == "bench.noop"
    )


def _counted_now(variant: str, port: int, failures: list[str]) -> float:
    """Tasks the endpoint counts now; -1 when it is not listening yet or answered an error (kept in ``failures``).

    prometheus_client's multi-process collector can fail a scrape that reads the file of a pool
    process still being created (an empty file: ``struct.error``, answered 500): while the tasks
    run, such a poll is counted and the next one tried, as Prometheus would at its next scrape.
    """
    try:
        _ms, content_type, body = scrape(port)
    except OSError:  # not listening yet
        return -1.0
    except ScrapeFailed as exc:
        failures.append(str(exc))
        return -1.0
    return tasks_counted(variant, content_type, body)


def _worker_environment(variant: str, workdir: Path, port: int, loglevel: str) -> dict[str, str]:
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()  # empty at start, as both libraries want
    if variant == "spyglass":
        return {
            "OTEL_SERVICE_NAME": "bench-worker",
            "OTEL_TRACES_EXPORTER": "none",
            "SPYGLASS_LOG_LEVEL": loglevel.lower(),  # as the worker's --loglevel
            "SPYGLASS_METRICS_PORT": str(port),
            "SPYGLASS_METRICS_DIR": str(metrics_dir),
        }
    if variant == "prometheus-multiproc":
        return {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "BENCH_METRICS_PORT": str(port)}
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(DESCRIPTIONS)}")


def _publisher_environment(variant: str) -> dict[str, str]:
    # spyglass's publisher stamps the publish time its worker reads; the peer's publisher is plain Celery.
    if variant == "spyglass":
        return {"OTEL_SERVICE_NAME": "bench-publisher", "OTEL_TRACES_EXPORTER": "none", "SPYGLASS_METRICS_PORT": "0"}
    return {}


def _metric_files(directory: Path) -> int:
    return sum(1 for entry in os.scandir(directory) if entry.is_file())


def _run_tasks(variant: str, worker: Worker, port: int, tasks: int, failures: list[str]) -> float:
    """Wait until the endpoint counts all ``tasks``; return the seconds it took (failed polls go to ``failures``)."""
    started = time.monotonic()
    timeout = 120 + tasks * 0.5
    try:
        done = wait_until(
            lambda: _counted_now(variant, port, failures) >= tasks, timeout, interval=1.0, process=worker.process
        )
    except BenchmarkError as exc:
        raise BenchmarkError(f"{variant}: the worker died ({exc}):\n{worker.log_tail()}") from None
    if not done:
        raise BenchmarkError(f"{variant}: the endpoint never counted {tasks} tasks:\n{worker.log_tail()}")
    return time.monotonic() - started


def _settle(variant: str, metrics_dir: Path, worker: Worker) -> None:
    """Let the worker reach its steady state before the timed scrapes.

    spyglass folds exited pool processes in the background, once a second: wait until at most the
    live pool processes still have files of their own. prometheus_client does nothing in the
    background, so there is nothing to wait for.
    """
    if variant != "spyglass":
        return

    def folded() -> bool:
        pids = {entry.name.rsplit("_", 1)[-1].split(".")[0] for entry in os.scandir(metrics_dir)}
        pids.discard("archive")
        return len(pids) <= CONCURRENCY + 1  # the live pool processes and the main process

    wait_until(folded, timeout=30, interval=0.5, process=worker.process)
    time.sleep(1.5)  # one more pass of the folding thread


def measure_variant(variant: str, broker: str, tasks: int, scrapes: int, loglevel: str) -> ScrapeResult:
    """Run ``tasks`` recycled pool processes through a worker of ``variant``, then time ``scrapes`` scrapes."""
    queue = f"spyglass-bench-scrape-{variant}-{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix=f"bench-scrape-{variant}-") as directory:
        workdir = Path(directory)
        port = free_port()
        worker_variables = _worker_environment(variant, workdir, port, loglevel)
        worker = None
        try:
            publish(base_environment(variant, broker, queue, **_publisher_environment(variant)), tasks)
            worker = start_worker(
                base_environment(variant, broker, queue, **worker_variables),
                queue,
                workdir,
                ["--max-tasks-per-child=1"],
                loglevel=loglevel,
                concurrency=CONCURRENCY,
            )
            failures: list[str] = []
            run_seconds = _run_tasks(variant, worker, port, tasks, failures)
            _settle(variant, workdir / "metrics", worker)
            scrape(port)  # an untimed first scrape: lazily built state, if any, is not what is measured
            timings, content_type, body = [], "", ""
            for _ in range(scrapes):
                elapsed_ms, content_type, body = scrape(port)
                timings.append(elapsed_ms)
            result = ScrapeResult(
                name=variant,
                scrape_ms=timings,
                files=_metric_files(workdir / "metrics"),
                body_bytes=len(body.encode("utf-8")),
                tasks_counted=tasks_counted(variant, content_type, body),
                run_seconds=run_seconds,
                failed_polls=len(failures),
            )
        finally:
            if worker is not None:
                stop_worker(worker)
            delete_queue(broker, queue)
    return result


def render_table(results: Sequence[ScrapeResult], tasks: int) -> str:
    """The result table in Markdown."""
    lines = [
        f"| Variant | Scrape ms: median | p95 | min{DASH}max | Files in metrics directory | Body bytes "
        "| Tasks counted | Worker start to all tasks counted (s) | Polls answered with an error while tasks ran |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result.name} | {result.median:.1f} | {result.p95:.1f} "
            f"| {min(result.scrape_ms):.1f}{DASH}{max(result.scrape_ms):.1f} | {result.files:,} "
            f"| {result.body_bytes:,} | {result.tasks_counted:,.0f} of {tasks:,} | {result.run_seconds:.0f} "
            f"| {result.failed_polls:,} |"
        )
    return "\n".join(lines)


def target_verdict(results: Sequence[ScrapeResult]) -> str:
    """Whether spyglass's scrapes stay under the target, at the median and at p95."""
    mine = next((result for result in results if result.name == TARGET_VARIANT), None)
    if mine is None:
        return "not measured"
    if mine.p95 < TARGET_MS:
        return "target met"
    if mine.median < TARGET_MS:
        return "target met by the median, missed at p95"
    return "target missed"


def figures(results: Sequence[ScrapeResult], tasks: int) -> list[report.Figure]:
    """The summary figures: each variant's median scrape time after ``tasks`` recycled pool processes."""
    by_name = {result.name: result for result in results}
    peer = next((result for result in results if result.name != TARGET_VARIANT), None)
    out = []
    for result in results:
        is_target = result.name == TARGET_VARIANT
        ratio = result.median / peer.median if is_target and peer is not None else None
        out.append(
            report.Figure(
                benchmark="Celery metrics scrape",
                measure=f"after {tasks:,} recycled pool processes, {result.name}",
                value=f"{result.median:.1f} ms (p95 {result.p95:.1f}), {result.files:,} files",
                ratio=ratio,
                against=peer.name if ratio is not None and peer is not None else "",
                noise=report.noise(result.scrape_ms),
                target=f"p95 under {TARGET_MS:.0f} ms" if is_target else None,
                met=by_name[result.name].p95 < TARGET_MS if is_target else None,
            )
        )
    return out


def render_section(results: Sequence[ScrapeResult], tasks: int, scrapes: int, loglevel: str, broker: str) -> str:
    """Render this benchmark's section of docs/performance.md."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mine = next((result for result in results if result.name == TARGET_VARIANT), None)
    if mine is None:
        key = f"Key figure not available: it needs {TARGET_VARIANT}."
    else:
        key = (
            f"**Key figure: {TARGET_VARIANT}'s scrape after {tasks:,} recycled pool processes takes "
            f"{mine.median:.1f} ms (median), {mine.p95:.1f} ms (p95); target: under {TARGET_MS:.0f} ms: "
            f"{target_verdict(results)}.**"
        )
    variants = "\n".join(f"- `{r.name}`: {DESCRIPTIONS.get(r.name, '')}" for r in results)
    return "\n".join(
        [
            "<!-- Generated by `make bench-celery` (python -m benchmarks.celery_scrape). "
            "Do not edit: rerun it instead. -->",
            "",
            "# Performance: Celery metrics scrape after recycled pool processes",
            "",
            "This section is written by `make bench` and `make bench-celery`; the numbers below come from "
            "their last run.",
            "",
            f"Measured {now}: a prefork worker (concurrency {CONCURRENCY}, `--max-tasks-per-child=1`) ran "
            f"{tasks:,} no-op tasks, each in a pool process of its own, then its endpoint was scraped "
            f"{scrapes} times in a row.",
            "",
            render_table(results, tasks),
            "",
            key,
            "",
            "## Machine",
            "",
            *report.machine_lines(PACKAGES, [f"- Broker: Redis {redis_version(broker)} on the same machine"]),
            "",
            "## Variants",
            "",
            variants,
            "",
            "## Method",
            "",
            "For each variant a fresh queue is filled with the no-op tasks (by spyglass's instrumented "
            "publisher for spyglass, by plain Celery for the peer), then `celery -A benchmarks.celery_app "
            f"worker --pool=prefork --concurrency={CONCURRENCY} --max-tasks-per-child=1 --without-mingle "
            f"--without-gossip --loglevel={loglevel}` runs them, its metrics directory empty at start. The "
            "benchmark polls the endpoint (once a second) until it counts every task (a poll answered with an "
            "error is counted, in the last column, and the next one tried: prometheus_client's collector fails "
            "a scrape that reads the file of a pool process still being created); for spyglass it then "
            "waits until exited pool processes are folded in (its main process does that once a second, in "
            "the background), which is the state Prometheus sees between two scrapes. After one untimed "
            "scrape, each timed scrape opens a new connection, sends the `Accept` header Prometheus sends "
            "(so spyglass answers in OpenMetrics, with exemplars) and reads the whole body; the time is "
            "from connecting to the last byte. *Files in metrics directory* is counted after the scrapes. "
            "spyglass's worker runs with `OTEL_TRACES_EXPORTER=none` (spans are not what is measured here). "
            "Rerun with `make bench-celery` (or `.venv/bin/python -m benchmarks.celery_scrape --help` for "
            "the task and scrape counts).",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the section and write it; non-zero only if a measurement failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000, help="tasks, each in a new pool process (default 1000)")
    parser.add_argument("--scrapes", type=int, default=30, help="timed scrapes per variant (default 30)")
    parser.add_argument(
        "--variants", nargs="+", choices=list(DESCRIPTIONS), default=list(DESCRIPTIONS), help="variants to measure"
    )
    parser.add_argument(
        "--loglevel", default="INFO", choices=LOG_LEVELS, help="the workers' log level, spyglass's too (default INFO)"
    )
    parser.add_argument("--broker", help="Redis URL (default: the machine's Redis, database 12, or a private one)")
    report.add_section_options(parser)
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.scrapes < 1:
        parser.error("--tasks and --scrapes must be positive")

    results = []
    try:
        with redis_broker(args.broker) as broker:
            for variant in args.variants:
                started = time.monotonic()
                result = measure_variant(variant, broker, args.tasks, args.scrapes, args.loglevel)
                results.append(result)
                print(
                    f"{variant:<22} scrape median {result.median:8.1f} ms  p95 {result.p95:8.1f} ms  "
                    f"{result.files:,} files  {result.tasks_counted:,.0f} tasks counted "
                    f"{result.failed_polls} failed polls ({time.monotonic() - started:.0f} s in all)",
                    file=sys.stderr,
                    flush=True,
                )
            section = render_section(results, args.tasks, args.scrapes, args.loglevel, broker)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    status = report.publish_section(
        SECTION, section, args.output, not args.no_write, figures(results, args.tasks), args.figures
    )
    print(f"{target_verdict(results)} (target: {TARGET_VARIANT} under {TARGET_MS:.0f} ms)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
