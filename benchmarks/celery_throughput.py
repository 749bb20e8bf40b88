"""No-op tasks per second through a real prefork Celery worker on Redis, per kind of instrumentation.

    python -m benchmarks.celery_throughput [--repetitions 5] [--tasks 5000] [--variants ...]

Variants (:data:`DESCRIPTIONS`; the app is :mod:`benchmarks.celery_app`): ``baseline`` (Celery
alone), ``spyglass`` (``import spyglass.auto``, spans exported to an OTLP/JSON file, metrics
endpoint on), ``otel-celery`` (opentelemetry-instrumentation-celery with the SDK, spans to the
same kind of file) and ``events`` (Celery alone, worker run with ``-E``).

One measurement: a fresh queue is filled by a publisher process instrumented like the variant
(so the worker reads the headers it would in production), then a worker (``--pool=prefork
--concurrency=2``) is started on it and stopped once the queue is done; the queue and its keys
are deleted. Variants are measured in turn, repetition after repetition (A B C D A B C D ...),
so machine noise spreads evenly over them.

Timing: the publisher puts a *mark* task first and another last, around the N no-ops; each mark
records in Redis the time it started running. The throughput is (N + 1) / (end - start): the
tasks run between the two instants are the first mark and the N no-ops. Why marks rather than
other clocks:

- worker start-up (imports, pool forks, broker connection) is left out, since the first task
  starts only once the worker consumes;
- nothing is added to the no-op task, so every variant runs the same task body (a per-task
  timestamp or counter written to Redis would cost a round trip per task, as much as what is
  measured, and dilute the differences);
- the error is at most the few tasks still running in the other pool process when the last mark
  starts: under 0.2% of 5,000 tasks.

CPU: when each mark appears (polled every 5 ms) the CPU times of the worker's main process and of
its pool processes are read (psutil); their differences, per task, show where a variant's cost
lands (the main process is the one that limits throughput).

The median tasks/s of each variant is compared with the baseline's; missing the target
(spyglass at least 0.90 of the baseline) is reported, it does not fail the run. The section
``celery-throughput`` of docs/performance.md is written (see :mod:`benchmarks.report`).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from benchmarks import report
from benchmarks.celery_processes import (
    BenchmarkError,
    CpuSnapshot,
    Worker,
    base_environment,
    cpu_snapshot,
    delete_queue,
    free_port,
    publish,
    redis_broker,
    redis_version,
    start_worker,
    stop_worker,
    wait_until,
)
from benchmarks.http_overhead import count_spans

__all__ = ["DESCRIPTIONS", "Measurement", "Summary", "main", "measure_once", "render_section", "run_benchmark"]

SECTION = "celery-throughput"
BASELINE = "baseline"
TARGET_VARIANT = "spyglass"
TARGET_RATIO = 0.90
TRACING_VARIANTS = ("spyglass", "otel-celery")
CONCURRENCY = 2
PACKAGES = (
    "celery",
    "kombu",
    "billiard",
    "redis",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-celery",
    "prometheus-client",
    "spyglass",
)
DESCRIPTIONS = {
    "baseline": "Celery alone: no spyglass, no OpenTelemetry, no events",
    "spyglass": "`import spyglass.auto` first in the app module: run spans (and the publisher's publish spans) "
    "exported to an OTLP/JSON file, task metrics (counts, runtime and queue-wait histograms with exemplars) "
    "in the shared metrics directory, the worker's endpoint on, Celery's log lines as JSON",
    "otel-celery": "opentelemetry-instrumentation-celery alone: SDK `TracerProvider` + `BatchSpanProcessor` "
    "exporting to an OTLP/JSON file, `CeleryInstrumentor().instrument()` in `worker_process_init`",
    "events": "Celery alone, worker run with `-E` (task events, what celery-exporter and Flower read); "
    "publisher with `task_send_sent_event`",
}
"""The variants measured by default."""
EXTRA_DESCRIPTIONS = {
    "spyglass-no-export": "as spyglass with `OTEL_TRACES_EXPORTER=none`: spans created, not exported",
    "spyglass-metrics-only": "as spyglass with `OTEL_SDK_DISABLED=true`: no spans; metrics and logs",
}
"""Variants measured on request (``--variants``), to see where spyglass's cost goes."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DASH = "\u2013"
TIMES = "\u00d7"
MICRO = "\u00b5"


@dataclass
class Measurement:
    """One run of one variant: the throughput and the run spans its worker exported."""

    tasks_per_second: float
    seconds: float
    spans_exported: int | None
    """Spans in the worker's traces file (``None`` for variants without traces)."""
    main_cpu_us: float | None = None
    """CPU microseconds per task of the worker's main process between the marks (``None``: not readable)."""
    pool_cpu_us: float | None = None
    """CPU microseconds per task of its pool processes together, between the marks."""


@dataclass
class Summary:
    """Every measurement of one variant, in repetition order."""

    name: str
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [m.tasks_per_second for m in self.measurements]

    @property
    def median(self) -> float:
        """Median tasks per second."""
        return statistics.median(self.rates)


def variant_environment(
    variant: str, workdir: Path, metrics_port: int, loglevel: str = "INFO"
) -> tuple[dict[str, str], dict[str, str]]:
    """Return the telemetry variables of the worker and of the publisher of one measurement of ``variant``.

    spyglass sets up logging itself; its level is also set to the workers' ``loglevel`` explicitly
    (``SPYGLASS_LOG_LEVEL``), so that every variant logs the same lines.
    """
    if variant in ("spyglass-no-export", "spyglass-metrics-only"):
        worker, publisher = variant_environment("spyglass", workdir, metrics_port, loglevel)
        setting = {"OTEL_TRACES_EXPORTER": "none"} if variant == "spyglass-no-export" else {"OTEL_SDK_DISABLED": "true"}
        return {**worker, **setting}, {**publisher, **setting}
    if variant == "spyglass":
        common = {
            "OTEL_TRACES_EXPORTER": "otlp_json_file",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "SPYGLASS_LOG_LEVEL": loglevel.lower(),
        }
        worker = {
            **common,
            "OTEL_SERVICE_NAME": "bench-worker",
            "SPYGLASS_TRACES_FILE": str(workdir / "worker-traces.jsonl"),
            "SPYGLASS_METRICS_PORT": str(metrics_port),
            "SPYGLASS_METRICS_DIR": str(workdir / "metrics"),
        }
        publisher = {
            **common,
            "OTEL_SERVICE_NAME": "bench-publisher",
            "SPYGLASS_TRACES_FILE": str(workdir / "publisher-traces.jsonl"),
            "SPYGLASS_METRICS_PORT": "0",
        }
        return worker, publisher
    if variant == "otel-celery":
        return (
            {"BENCH_TRACES_FILE": str(workdir / "worker-traces.jsonl")},
            {"BENCH_TRACES_FILE": str(workdir / "publisher-traces.jsonl")},
        )
    if variant in (BASELINE, "events"):
        return {}, {}
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join([*DESCRIPTIONS, *EXTRA_DESCRIPTIONS])}")


def _read_mark(client: redis.Redis, key: str) -> float | None:
    value = client.get(key)
    return float(value) if value is not None else None


def _cpu_at_mark(
    client: redis.Redis, key: str, worker: Worker, variant: str, which: str, timeout: float
) -> CpuSnapshot | None:
    """Wait until the mark ``key`` is set, then read the worker's CPU times."""
    try:
        reached = wait_until(lambda: client.exists(key) == 1, timeout=timeout, interval=0.005, process=worker.process)
    except BenchmarkError as exc:
        raise BenchmarkError(f"{variant}: the worker died ({exc}):\n{worker.log_tail()}") from None
    if not reached:
        raise BenchmarkError(f"{variant}: the worker did not reach the {which} mark:\n{worker.log_tail()}")
    return cpu_snapshot(worker)


def measure_once(variant: str, broker: str, tasks: int, loglevel: str) -> Measurement:
    """Fill a fresh queue, run a worker through it, and return the throughput between the marks."""
    queue = f"spyglass-bench-{variant}-{uuid.uuid4().hex[:10]}"
    start_key, end_key = f"{queue}:mark:start", f"{queue}:mark:end"
    client = redis.Redis.from_url(broker)
    with tempfile.TemporaryDirectory(prefix=f"bench-celery-{variant}-") as directory:
        workdir = Path(directory)
        worker_variables, publisher_variables = variant_environment(variant, workdir, free_port(), loglevel)
        worker = None
        try:
            publish(base_environment(variant, broker, queue, **publisher_variables), tasks, start_key, end_key)
            queued = client.llen(queue)
            if queued != tasks + 2:
                raise BenchmarkError(f"{variant}: {queued} messages in the queue, expected {tasks + 2}")
            arguments = ["-E"] if variant == "events" else []
            worker = start_worker(
                base_environment(variant, broker, queue, **worker_variables),
                queue,
                workdir,
                arguments,
                loglevel=loglevel,
                concurrency=CONCURRENCY,
            )
            # CPU is read as each mark appears (polled every 5 ms: a few tasks' worth at most).
            started_cpu = _cpu_at_mark(client, start_key, worker, variant, "start", 120)
            finished_cpu = _cpu_at_mark(client, end_key, worker, variant, "end", 60 + tasks / 20)
            start, end = _read_mark(client, start_key), _read_mark(client, end_key)
            if start is None or end is None or end <= start:
                raise BenchmarkError(f"{variant}: marks missing or out of order ({start}, {end})")
            stop_worker(worker)  # warm shutdown: pool processes export their last spans
            spans = (count_spans(str(workdir / "worker-traces.jsonl")) or 0) if variant in TRACING_VARIANTS else None
        finally:
            if worker is not None:
                stop_worker(worker)
            delete_queue(broker, queue)
    seconds = end - start
    main_cpu = pool_cpu = None
    if started_cpu is not None and finished_cpu is not None:
        main_seconds, pool_seconds = finished_cpu.since(started_cpu)
        main_cpu, pool_cpu = main_seconds / (tasks + 1) * 1e6, pool_seconds / (tasks + 1) * 1e6
    return Measurement((tasks + 1) / seconds, seconds, spans, main_cpu, pool_cpu)


def run_benchmark(variants: Sequence[str], repetitions: int, tasks: int, broker: str, loglevel: str) -> list[Summary]:
    """Measure every variant ``repetitions`` times, interleaved."""
    summaries = {name: Summary(name) for name in variants}
    total, done = repetitions * len(variants), 0
    for repetition in range(1, repetitions + 1):
        for name in variants:
            started = time.monotonic()
            measurement = measure_once(name, broker, tasks, loglevel)
            summaries[name].measurements.append(measurement)
            done += 1
            print(
                f"[{done:>2}/{total}] rep {repetition} {name:<12} {measurement.tasks_per_second:8.1f} tasks/s "
                f"({measurement.seconds:.2f} s of tasks, {time.monotonic() - started:.1f} s in all; "
                f"CPU per task: main {_cpu_text(measurement.main_cpu_us)}, pool {_cpu_text(measurement.pool_cpu_us)})",
                file=sys.stderr,
                flush=True,
            )
    return list(summaries.values())


def _cpu_text(microseconds: float | None) -> str:
    return "?" if microseconds is None else f"{microseconds:.0f} {MICRO}s"


def _spans_cell(summary: Summary, tasks: int) -> str:
    counts = [m.spans_exported for m in summary.measurements if m.spans_exported is not None]
    if not counts:
        return DASH
    run = tasks + 2  # the no-ops and the two marks
    low, high = min(counts), max(counts)
    counted = f"{low:,}" if low == high else f"{low:,}{DASH}{high:,}"
    return f"{counted} of {run:,}"


def _cpu_cell(values: Sequence[float | None]) -> str:
    known = [value for value in values if value is not None]
    return f"{statistics.median(known):,.0f}" if known else DASH


def render_table(summaries: Sequence[Summary], tasks: int) -> str:
    """The result table in Markdown."""
    by_name = {summary.name: summary for summary in summaries}
    base = by_name.get(BASELINE)
    lines = [
        f"| Variant | Tasks/s: median (min{DASH}max) | {TIMES} baseline (of medians) "
        f"| {TIMES} baseline per repetition: median (min{DASH}max) "
        f"| CPU per task, {MICRO}s (median): main process | pool processes | Worker spans exported |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for summary in summaries:
        rates = summary.rates
        cells = [f"{summary.median:,.0f} ({min(rates):,.0f}{DASH}{max(rates):,.0f})"]
        if base is None:
            cells += [DASH, DASH]
        else:
            cells.append(f"{summary.median / base.median:.2f}")
            paired = report.paired_ratios(summary.rates, base.rates)
            cells.append(DASH if summary is base else report.ratio_spread(paired))
        cells.append(_cpu_cell([m.main_cpu_us for m in summary.measurements]))
        cells.append(_cpu_cell([m.pool_cpu_us for m in summary.measurements]))
        cells.append(_spans_cell(summary, tasks))
        lines.append(f"| {summary.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_verdict(summaries: Sequence[Summary]) -> tuple[float | None, str]:
    """Return spyglass's median tasks/s over the baseline's, and whether that meets the target."""
    by_name = {summary.name: summary for summary in summaries}
    if BASELINE not in by_name or TARGET_VARIANT not in by_name:
        return None, "not measured"
    ratio = by_name[TARGET_VARIANT].median / by_name[BASELINE].median
    return ratio, "target met" if ratio >= TARGET_RATIO else "target missed"


def figures(summaries: Sequence[Summary]) -> list[report.Figure]:
    """The summary figures: each variant's median tasks/s and its ratio to the baseline's."""
    by_name = {summary.name: summary for summary in summaries}
    base = by_name.get(BASELINE)
    out = []
    for summary in summaries:
        ratio = summary.median / base.median if base is not None and summary is not base else None
        is_target = summary.name == TARGET_VARIANT
        out.append(
            report.Figure(
                benchmark="Celery, prefork worker",
                measure=f"tasks/s, {summary.name}",
                value=f"{summary.median:,.0f} tasks/s",
                ratio=ratio,
                against="" if ratio is None else BASELINE,
                noise=report.noise(summary.rates),
                target=f"at least {TARGET_RATIO} {TIMES} {BASELINE}" if is_target else None,
                met=(ratio is not None and ratio >= TARGET_RATIO) if is_target else None,
            )
        )
    return out


def render_section(summaries: Sequence[Summary], repetitions: int, tasks: int, loglevel: str, broker: str) -> str:
    """Render this benchmark's section of docs/performance.md."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ratio, verdict = target_verdict(summaries)
    if ratio is None:
        key = f"Key figure not available: it needs {BASELINE} and {TARGET_VARIANT}."
    else:
        key = (
            f"**Key figure: {TARGET_VARIANT} keeps {ratio:.3f} of the baseline's throughput (median tasks/s); "
            f"target: at least {TARGET_RATIO:.2f}: {verdict}.**"
        )
    descriptions = {**DESCRIPTIONS, **EXTRA_DESCRIPTIONS}
    variants = "\n".join(f"- `{s.name}`: {descriptions.get(s.name, '')}" for s in summaries)
    return "\n".join(
        [
            "<!-- Generated by `make bench-celery` (python -m benchmarks.celery_throughput). "
            "Do not edit: rerun it instead. -->",
            "",
            "# Performance: Celery worker throughput",
            "",
            "This section is written by `make bench` and `make bench-celery`; the numbers below come from "
            "their last run.",
            "",
            f"Measured {now}: {repetitions} repetitions per variant, each of {tasks:,} no-op tasks through a "
            f"prefork worker (concurrency {CONCURRENCY}) on Redis, variants interleaved.",
            "",
            render_table(summaries, tasks),
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
            "Every measurement uses a fresh queue. A publisher process, instrumented like the variant (spyglass "
            "stamps its publish-time header and a `traceparent`, OpenTelemetry a `traceparent`, the events "
            "variant sends `task-sent` events), fills it with a *mark* task, the no-op tasks and another mark; "
            "then `celery -A benchmarks.celery_app worker --pool=prefork "
            f"--concurrency={CONCURRENCY} --without-mingle --without-gossip --loglevel={loglevel}` (plus `-E` "
            "for `events`) is started on it, its output written to a file (spyglass, which replaces Celery's "
            f"log format with its JSON lines, also gets `SPYGLASS_LOG_LEVEL={loglevel.lower()}`: every variant "
            "logs the same lines, at INFO a line per task received in the main process and one per task "
            "succeeded in the pool process). Each mark records in Redis the time "
            "it started running, so the time between them covers the tasks and not the worker's start-up; "
            "tasks/s is (no-ops + 1) divided by that time. Nothing is added to the no-op task itself, so all "
            "variants run the same task body. The worker is then stopped with a warm shutdown (its pool "
            "processes export their last spans) and the queue deleted. Both tracing variants sample every "
            "task (the publisher's root span is sampled, the workers follow it) and write their spans with "
            "spyglass's OTLP/JSON file exporter through the SDK's batch span processor with its default "
            "settings, so export is paid for as in production; *worker spans exported* counts the run spans "
            "in the worker's file after shutdown (opentelemetry-instrumentation-celery does not flush when a "
            "pool process exits, so its last batch can be missing). spyglass's worker also serves its metrics "
            "endpoint (not scraped during the run) from a temporary `SPYGLASS_METRICS_DIR`. The events "
            "variant's events go to Redis with no consumer: what the worker pays does not depend on one. "
            "*CPU per task* is the user and system CPU time (all threads) that the worker's main process, and "
            "its pool processes together, used between the two marks (read from the kernel when each mark "
            "appears), divided by the tasks run in between: it shows where a variant's cost lands. The main "
            "process (receiving, acknowledging and dispatching every message) is the one that limits "
            f"throughput here; with {CONCURRENCY} CPUs for it, the pool processes and Redis, what the pool "
            "processes add slows it through contention for the CPUs. "
            "Medians are over the repetitions; the per-repetition ratio divides each repetition's tasks/s "
            "by the baseline's of the same repetition. Rerun with `make bench-celery` (or "
            "`.venv/bin/python -m benchmarks.celery_throughput --help` for repetitions and task counts).",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the section and write it; non-zero only if a measurement failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=5, help="measurements per variant (default 5)")
    parser.add_argument("--tasks", type=int, default=5_000, help="no-op tasks per measurement (default 5000)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[*DESCRIPTIONS, *EXTRA_DESCRIPTIONS],
        default=list(DESCRIPTIONS),
        help=f"variants to measure, in this order (default: {' '.join(DESCRIPTIONS)})",
    )
    parser.add_argument(
        "--loglevel", default="INFO", choices=LOG_LEVELS, help="the workers' log level, spyglass's too (default INFO)"
    )
    parser.add_argument("--broker", help="Redis URL (default: the machine's Redis, database 12, or a private one)")
    report.add_section_options(parser)
    args = parser.parse_args(argv)
    if args.repetitions < 1 or args.tasks < 1:
        parser.error("--repetitions and --tasks must be positive")

    try:
        with redis_broker(args.broker) as broker:
            summaries = run_benchmark(args.variants, args.repetitions, args.tasks, broker, args.loglevel)
            section = render_section(summaries, args.repetitions, args.tasks, args.loglevel, broker)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    status = report.publish_section(SECTION, section, args.output, not args.no_write, figures(summaries), args.figures)
    ratio, verdict = target_verdict(summaries)
    if ratio is not None:
        print(f"{verdict}: {TARGET_VARIANT} ÷ {BASELINE} = {ratio:.3f} (target ≥ {TARGET_RATIO:.2f})", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
