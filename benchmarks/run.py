"""Measure the per-request CPU that instrumentation adds to a Flask route; report it in docs/performance.md.

``make bench`` runs ``python -m benchmarks.run``. Every variant of
:data:`benchmarks.http_overhead.VARIANTS` is measured in its own fresh process (instrumentation
installs process-global state), several times, interleaved (A B C ... A B C ...) so that machine
noise spreads evenly over the variants. The result table is printed and written to its own
section (``http``) of ``docs/performance.md`` (see :mod:`benchmarks.report`). A failing
measurement process fails the run; missing the overhead target does not (the report says so).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import instructions, report, task_overhead
from benchmarks.http_overhead import VARIANTS, count_spans

__all__ = ["BenchmarkError", "Summary", "main", "render_report", "run_benchmark"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = report.DEFAULT_OUTPUT
SECTION = "http"
BASELINE = "baseline"
TARGET_NUMERATOR = "spyglass"
TARGET_DENOMINATOR = "otel-flask"
TARGET_RATIO = 0.25
FLOOR = "floor"
FLOOR_TARGET = 1.5
"""spyglass's added CPU (per request, per task) may be at most this multiple of the floor's."""
TASK_MODULE = instructions.TASK_MODULE
HTTP_MODULE = instructions.HTTP_MODULE
PACKAGES = (
    "flask",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-flask",
    "prometheus-flask-exporter",
    "spyglass",
)
_CLEARED_PREFIXES = ("OTEL_", "SPYGLASS_")
_CLEARED_NAMES = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
_SUBPROCESS_TIMEOUT_S = 600
DASH = "\u2013"  # en dash, for ranges and empty cells
TIMES = "\u00d7"

DESCRIPTIONS = {
    "baseline": "plain Flask app, no instrumentation",
    "spyglass": "`import spyglass.auto`: span (always_on) + histogram with exemplar + JSON access log",
    "spyglass-10pct": "as spyglass, `traceidratio` sampler at 0.1",
    "spyglass-no-log": "as spyglass without the access log (`SPYGLASS_ACCESS_LOG=false`): traces and metrics",
    "spyglass-metrics-only": "as spyglass with traces and access log off (`OTEL_SDK_DISABLED=true`): metrics only",
    "otel-flask": "opentelemetry-instrumentation-flask + SDK (batch spans to file, HTTP metrics)",
    "prometheus-flask-exporter": "`PrometheusMetrics(app)`, default metrics",
    "floor": "the app wrapped by the unavoidable parts only: one SDK span (batch, same file exporter), one "
    "route-labelled prometheus_client histogram observation, one structlog context bind",
}
TASK_DESCRIPTIONS = {
    "baseline": "Celery alone (the no-op task through Celery's tracer, its INFO line per task as text)",
    "spyglass": "`import spyglass.auto`: run span to an OTLP/JSON file, task metrics in a multi-process "
    "directory, the INFO line as JSON with ids",
    "otel-celery": "opentelemetry-instrumentation-celery + SDK (batch spans to the same file exporter)",
    "floor": "Celery alone plus one SDK CONSUMER span, one task-labelled histogram observation and one "
    "structlog context bind, in `task_prerun`/`task_postrun` receivers",
}


class BenchmarkError(Exception):
    """A measurement process failed or returned no result."""


@dataclass
class Summary:
    """The measurements of one variant over all repetitions (µs per request)."""

    name: str
    thread_us: list[float]
    process_us: list[float]
    spans_written: list[int | None]
    requests_served: int

    @property
    def thread_median(self) -> float:
        """Median request-thread CPU per request."""
        return statistics.median(self.thread_us)

    @property
    def process_median(self) -> float:
        """Median whole-process CPU per request."""
        return statistics.median(self.process_us)


def _clean_environment() -> dict[str, str]:
    """Return this process's environment without any telemetry configuration a caller may have set."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_CLEARED_PREFIXES) and key not in _CLEARED_NAMES
    }


def _measure_once(name: str, warmup: int, requests: int, module: str = HTTP_MODULE) -> dict[str, Any]:
    """Run one measurement process of ``module`` for variant ``name`` and return its JSON result."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as workdir:
        traces_file = os.path.join(workdir, "traces.jsonl")
        result_file = os.path.join(workdir, "result.json")
        environment = _clean_environment()
        environment.update(instructions.variant_variables(module, name, workdir))
        command = [
            sys.executable,
            "-m",
            module,
            name,
            "--traces-file",
            traces_file,
            "--result",
            result_file,
            "--warmup",
            str(warmup),
            "--requests",
            str(requests),
        ]
        try:
            completed = subprocess.run(
                command,
                cwd=ROOT,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # spyglass's access log: a real write, no terminal flood
                stderr=subprocess.PIPE,
                timeout=_SUBPROCESS_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchmarkError(f"variant {name!r} did not finish within {_SUBPROCESS_TIMEOUT_S} s") from exc
        stderr = completed.stderr.decode("utf-8", "replace").strip()
        if completed.returncode != 0:
            tail = "\n".join(stderr.splitlines()[-25:])
            raise BenchmarkError(f"variant {name!r} failed with exit status {completed.returncode}:\n{tail}")
        try:
            with open(result_file, encoding="utf-8") as file:
                result: dict[str, Any] = json.load(file)
        except (OSError, ValueError) as exc:
            raise BenchmarkError(f"variant {name!r} exited without a readable result ({exc}):\n{stderr}") from exc
        # Spans of the warm-up are in the file too: compared with warmup + requests (+1 check).
        result["spans_written"] = count_spans(traces_file)
        return result


def run_benchmark(
    variants: Sequence[str], repetitions: int, warmup: int, requests: int, module: str = HTTP_MODULE
) -> list[Summary]:
    """Measure every variant of ``module`` ``repetitions`` times, interleaved, and summarise each."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    total = repetitions * len(variants)
    done = 0
    for repetition in range(1, repetitions + 1):
        for name in variants:
            result = _measure_once(name, warmup, requests, module)
            results[name].append(result)
            done += 1
            unit = "task" if module == TASK_MODULE else "req"
            print(
                f"[{done:>2}/{total}] rep {repetition} {name:<26} "
                f"thread {result['thread_us']:7.1f} µs/{unit}  process {result['process_us']:7.1f} µs/{unit}",
                file=sys.stderr,
                flush=True,
            )
    served = warmup + requests + (0 if module == TASK_MODULE else 1)  # + the request that checks the response
    return [
        Summary(
            name=name,
            thread_us=[r["thread_us"] for r in runs],
            process_us=[r["process_us"] for r in runs],
            spans_written=[r.get("spans_written") for r in runs],
            requests_served=served,
        )
        for name, runs in results.items()
    ]


def _machine_lines() -> list[str]:
    """Describe the machine and software the numbers were measured on, as Markdown list items."""
    return report.machine_lines(PACKAGES)


def _spans_cell(summary: Summary) -> str:
    counts = [count for count in summary.spans_written if count is not None]
    if not counts:
        return DASH
    median = int(statistics.median(counts))
    return f"{median:,} ({median / summary.requests_served:.0%})"


def _signed(value: float) -> str:
    return f"{value:+.1f}"


def _key_ratio(by_name: dict[str, Summary], attribute: str) -> float | None:
    """Divide the added cost of spyglass by that of otel-flask for one measure (``None`` if unmeasured)."""
    if not {BASELINE, TARGET_NUMERATOR, TARGET_DENOMINATOR} <= by_name.keys():
        return None
    base = getattr(by_name[BASELINE], attribute)
    denominator = getattr(by_name[TARGET_DENOMINATOR], attribute) - base
    if denominator <= 0:
        return None
    return (getattr(by_name[TARGET_NUMERATOR], attribute) - base) / denominator


def target_verdict(summaries: Sequence[Summary]) -> tuple[float | None, str]:
    """Return the key figure (whole-process CPU) and whether it meets the target.

    Whole-process CPU counts everything the instrumentation costs, exporting every span included;
    request-thread CPU alone would reward an instrumentation for pushing work onto a thread.
    """
    ratio = _key_ratio({s.name: s for s in summaries}, "process_median")
    if ratio is None:
        return None, "not measured"
    return ratio, "target met" if ratio <= TARGET_RATIO else "target missed"


def floor_ratios(summaries: Sequence[Summary], attribute: str = "process_us") -> list[float]:
    """Per repetition: spyglass's added CPU divided by the floor's (both against that repetition's baseline).

    The variants run interleaved, so the repetitions of one round share the machine's state;
    empty when a variant is missing or the floor added nothing.
    """
    by_name = {summary.name: summary for summary in summaries}
    if not {BASELINE, FLOOR, TARGET_NUMERATOR} <= by_name.keys():
        return []
    rounds = zip(
        getattr(by_name[BASELINE], attribute),
        getattr(by_name[FLOOR], attribute),
        getattr(by_name[TARGET_NUMERATOR], attribute),
        strict=True,
    )
    return [(ours - base) / (floor - base) for base, floor, ours in rounds if floor > base]


def floor_ratio(summaries: Sequence[Summary], attribute: str = "process_median") -> float | None:
    """Divide spyglass's added CPU by the floor's, from the medians (``None`` if not measured)."""
    by_name = {summary.name: summary for summary in summaries}
    if not {BASELINE, FLOOR, TARGET_NUMERATOR} <= by_name.keys():
        return None
    base = getattr(by_name[BASELINE], attribute)
    floor_added = getattr(by_name[FLOOR], attribute) - base
    if floor_added <= 0:
        return None
    return (getattr(by_name[TARGET_NUMERATOR], attribute) - base) / floor_added


def _floor_lines(summaries: Sequence[Summary], unit: str) -> list[str]:
    ratio = floor_ratio(summaries)
    if ratio is None:
        return []
    by_name = {summary.name: summary for summary in summaries}
    base = by_name[BASELINE].process_median
    per_round = floor_ratios(summaries)
    spread = f" (per repetition {min(per_round):.2f}{DASH}{max(per_round):.2f})" if len(per_round) > 1 else ""
    verdict = "target met" if ratio <= FLOOR_TARGET else "target missed"
    thread = floor_ratio(summaries, "thread_median")
    return [
        f"**Against the floor: spyglass adds {by_name[TARGET_NUMERATOR].process_median - base:+.1f} µs of process "
        f"CPU per {unit}, the floor {by_name[FLOOR].process_median - base:+.1f}: {ratio:.2f} {TIMES} the floor"
        f"{spread}; target: at most {FLOOR_TARGET:.1f}: {verdict}.**",
        "",
        f"The same ratio for {unit}-thread CPU alone is {thread:.2f}." if thread is not None else "",
    ]


def render_table(summaries: Sequence[Summary], unit: str = "req") -> str:
    """Render the result table in Markdown (CPU per ``unit``: ``req`` or ``task``)."""
    by_name = {summary.name: summary for summary in summaries}
    base = by_name[BASELINE]
    thread_label = "Request-thread" if unit == "req" else "Task-thread"
    header = (
        f"| Variant | {thread_label} CPU µs/{unit}: median (min{DASH}max) | Added | {TIMES} baseline "
        f"| Process CPU µs/{unit}: median (min{DASH}max) | Added | {TIMES} baseline | Spans exported (of {unit}s) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for summary in summaries:
        thread, process = summary.thread_median, summary.process_median
        is_base = summary is base
        lines.append(
            f"| {summary.name} "
            f"| {thread:.1f} ({min(summary.thread_us):.1f}{DASH}{max(summary.thread_us):.1f}) "
            f"| {DASH if is_base else _signed(thread - base.thread_median)} "
            f"| {thread / base.thread_median:.2f} "
            f"| {process:.1f} ({min(summary.process_us):.1f}{DASH}{max(summary.process_us):.1f}) "
            f"| {DASH if is_base else _signed(process - base.process_median)} "
            f"| {process / base.process_median:.2f} "
            f"| {_spans_cell(summary)} |"
        )
    return "\n".join(lines)


def _instruction_ratio(counts: dict[str, float], denominator_name: str = TARGET_DENOMINATOR) -> float | None:
    if not {BASELINE, TARGET_NUMERATOR, denominator_name} <= counts.keys():
        return None
    denominator = counts[denominator_name] - counts[BASELINE]
    return (counts[TARGET_NUMERATOR] - counts[BASELINE]) / denominator if denominator > 0 else None


def render_instruction_table(counts: dict[str, float], unit: str = "request") -> list[str]:
    """The instructions-per-request (or per-task) part of the section (empty when they were not counted).

    Per request, spyglass's added count is set against otel-flask's; per task, against the floor's.
    """
    if not counts or BASELINE not in counts:
        return []
    base = counts[BASELINE]
    short = "req" if unit == "request" else unit
    against = TARGET_DENOMINATOR if unit == "request" else FLOOR
    served = "serving 500 and 2,500 timed requests" if unit == "request" else "running 500 and 2,500 timed tasks"
    lines = [
        "",
        f"## Instructions per {unit} (valgrind: deterministic)",
        "",
        "CPU time on this shared virtual machine varies by tens of percent from run to run; the number of "
        "instructions executed does not. Each variant ran twice under `valgrind --tool=callgrind` (all "
        f"threads, so span export is included), {served}; the difference per "
        f"extra {unit} is shown. Instructions are not time (memory stalls and system calls are not "
        "counted), so this confirms the direction of the CPU figures rather than replacing them.",
        "",
        f"| Variant | Instructions/{short} | Added | {TIMES} baseline |",
        "|---|---:|---:|---:|",
    ]
    for name, count in counts.items():
        added = DASH if name == BASELINE else f"{count - base:+,.0f}"
        lines.append(f"| {name} | {count:,.0f} | {added} | {count / base:.2f} |")
    ratio = _instruction_ratio(counts, against)
    if ratio is not None:
        lines += [
            "",
            f"{TARGET_NUMERATOR} added ÷ {against} added, in instructions: {ratio:.2f}.",
        ]
    return lines


def _key_figure_lines(summaries: Sequence[Summary]) -> list[str]:
    by_name = {summary.name: summary for summary in summaries}
    ratio, verdict = target_verdict(summaries)
    if ratio is None:
        return [f"Key figure not available: it needs {BASELINE}, {TARGET_NUMERATOR} and {TARGET_DENOMINATOR}."]
    thread_ratio = _key_ratio(by_name, "thread_median")
    lines = [
        f"**Key figure: {TARGET_NUMERATOR} added ÷ {TARGET_DENOMINATOR} added (whole-process CPU, every span "
        f"exported) = {ratio:.2f}; target: at most {TARGET_RATIO:.2f}: {verdict}.**",
        "",
    ]
    if thread_ratio is not None:
        lines.append(f"The same ratio for request-thread CPU alone is {thread_ratio:.2f}.")
    return lines


def _dropped_spans_note(summaries: Sequence[Summary]) -> list[str]:
    """Warn about always-on variants whose batch span processor dropped spans."""
    lossy = [
        summary.name
        for summary in summaries
        if summary.name in (TARGET_NUMERATOR, TARGET_DENOMINATOR)
        and any(count is not None and count < summary.requests_served for count in summary.spans_written)
    ]
    if not lossy:
        return []
    return [
        "",
        f"Warning: {', '.join(lossy)} sampled every request but exported fewer spans: the batch span "
        "processor's queue overflowed because its export thread did not get enough of the GIL while the "
        "request loop ran. Process CPU therefore leaves out the export of the dropped spans; the comparison "
        "is not fair until this run is repeated.",
    ]


def _breakdown_lines(summaries: Sequence[Summary]) -> list[str]:
    """Split spyglass's added process CPU into metrics, traces and the access log (from the variants)."""
    by_name = {summary.name: summary for summary in summaries}
    needed = (BASELINE, "spyglass-metrics-only", "spyglass-no-log", TARGET_NUMERATOR)
    if not all(name in by_name for name in needed):
        return []
    base, metrics, no_log, full = (by_name[name].process_median for name in needed)
    parts = [
        ("metrics and the middleware itself", metrics - base),
        ("traces (span, context, export)", no_log - metrics),
        ("access log", full - no_log),
    ]
    lines = ["", "Where spyglass's added process CPU goes (differences of medians, so noisy):", ""]
    lines += [f"- {label}: {value:+.1f} µs/request" for label, value in parts]
    return lines


def _task_lines(
    summaries: Sequence[Summary],
    repetitions: int,
    warmup: int,
    tasks: int,
    instruction_counts: dict[str, float] | None = None,
) -> list[str]:
    """The per-task part of the section (empty when tasks were not measured)."""
    if not summaries:
        return []
    variants = [f"- `{s.name}`: {TASK_DESCRIPTIONS.get(s.name, '')}" for s in summaries]
    return [
        "",
        "## Per task (Celery)",
        "",
        f"{repetitions} repetitions per variant, each of {warmup:,} warm-up and {tasks:,} timed no-op tasks run "
        "through Celery's own task tracer in a fresh process, as a prefork pool process runs them "
        "(`benchmarks/task_overhead.py`): `task_prerun`, the task, `task_success`, `task_postrun`; no broker.",
        "",
        render_table(summaries, unit="task"),
        "",
        *_floor_lines(summaries, "task"),
        *render_instruction_table(instruction_counts or {}, unit="task"),
        "",
        *variants,
    ]


def figures(summaries: Sequence[Summary], task_summaries: Sequence[Summary]) -> list[report.Figure]:
    """The summary figures: spyglass against the floor per request and per task, and against otel-flask."""
    out = []
    for what, measured in (("request", summaries), ("task", task_summaries)):
        ratio = floor_ratio(measured)
        if ratio is None:
            continue
        by_name = {summary.name: summary for summary in measured}
        base = by_name[BASELINE].process_median
        per_round = floor_ratios(measured)
        out.append(
            report.Figure(
                benchmark="In-process CPU",
                measure=f"per {what}, spyglass added vs the floor",
                value=f"{by_name[TARGET_NUMERATOR].process_median - base:+.0f} µs/{what} "
                f"(floor {by_name[FLOOR].process_median - base:+.0f})",
                ratio=ratio,
                against="the floor",
                noise=f"{min(per_round):.2f} to {max(per_round):.2f}" if len(per_round) > 1 else "one run",
                target=f"at most {FLOOR_TARGET} {TIMES} the floor",
                met=ratio <= FLOOR_TARGET,
            )
        )
    ratio, verdict = target_verdict(summaries)
    if ratio is not None:
        by_name = {summary.name: summary for summary in summaries}
        base = by_name[BASELINE].process_median
        out.append(
            report.Figure(
                benchmark="In-process CPU",
                measure="per request, spyglass added vs otel-flask added",
                value=f"{by_name[TARGET_NUMERATOR].process_median - base:+.0f} vs "
                f"{by_name[TARGET_DENOMINATOR].process_median - base:+.0f} µs/request",
                ratio=ratio,
                against=TARGET_DENOMINATOR,
                noise=report.noise(by_name[TARGET_NUMERATOR].process_us),
                target=f"at most {TARGET_RATIO}",
                met=verdict == "target met",
            )
        )
    return out


def render_report(
    summaries: Sequence[Summary],
    repetitions: int,
    warmup: int,
    requests: int,
    instruction_counts: dict[str, float] | None = None,
    task_summaries: Sequence[Summary] = (),
    tasks: int = 0,
    task_instruction_counts: dict[str, float] | None = None,
) -> str:
    """Render this benchmark's section of docs/performance.md (the other sections are not its own)."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    variants = "\n".join(f"- `{s.name}`: {DESCRIPTIONS.get(s.name, '')}" for s in summaries)
    return "\n".join(
        [
            "<!-- Generated by `make bench` (python -m benchmarks.run). Do not edit: rerun it instead. -->",
            "",
            "# Performance: per-request CPU overhead",
            "",
            "This file is written by `make bench`; the numbers below come from its last run.",
            "",
            f"Measured {now}: {repetitions} repetitions per variant, each of {warmup:,} warm-up "
            f"and {requests:,} timed `GET /` requests in a fresh process.",
            "",
            render_table(summaries),
            "",
            *_key_figure_lines(summaries),
            "",
            *_floor_lines(summaries, "request"),
            *_dropped_spans_note(summaries),
            *_breakdown_lines(summaries),
            *render_instruction_table(instruction_counts or {}),
            *_task_lines(task_summaries, repetitions, warmup, tasks, task_instruction_counts),
            "",
            "## Machine",
            "",
            *_machine_lines(),
            "",
            "## Variants",
            "",
            variants,
            "",
            "## Method",
            "",
            "Each variant serves the same Flask app (`@app.get('/')` returning `hello`) and runs in its own "
            "process, since instrumentation installs process-global state; the repetitions are interleaved "
            "(every variant once, then again) so machine noise spreads evenly. The process calls the app "
            "directly as a WSGI server would: a copy of one `GET /` environ per request, the body iterated "
            "and closed, no network. `baseline` is the app alone. `spyglass` is configured only through the "
            "environment (`OTEL_SERVICE_NAME=bench`, `OTEL_TRACES_EXPORTER=otlp_json_file` to a temporary "
            "file, `OTEL_TRACES_SAMPLER=always_on`, `SPYGLASS_METRICS_PORT=0`, nothing excluded) and "
            "`import spyglass.auto`: a span per request, a histogram observation with exemplar, and one "
            "JSON access-log line per request written to stdout (redirected to /dev/null). "
            "`spyglass-10pct` samples 10% of traces (`traceidratio`, 0.1). `otel-flask` is "
            "`FlaskInstrumentor().instrument_app(app)` with the OpenTelemetry SDK: a `BatchSpanProcessor` "
            "feeding spyglass's own OTLP/JSON file exporter (the same export work as spyglass) and a "
            "`MeterProvider` whose `PeriodicExportingMetricReader` discards what it collects, with "
            "`OTEL_SEMCONV_STABILITY_OPT_IN=http`. `prometheus-flask-exporter` is `PrometheusMetrics(app)` "
            "with its default metrics. Request-thread CPU (`time.thread_time`) is what a request pays; "
            "process CPU (`time.process_time`) adds the background threads and runs until the "
            "instrumentation is shut down, so pending exports are included (telemetry of the warm-up is "
            "flushed before timing starts). Medians are over the repetitions; *added* is the variant's "
            "median minus the baseline's. Rerun with `make bench` (or `.venv/bin/python -m benchmarks.run "
            "--help` for the repetition and request counts).",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and write the report; non-zero only if a measurement failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=7, help="measurement processes per variant")
    parser.add_argument("--warmup", type=int, default=2_000, help="untimed requests per process")
    parser.add_argument("--requests", type=int, default=20_000, help="timed requests per process")
    parser.add_argument("--tasks", type=int, default=10_000, help="timed tasks per process (0: no per-task part)")
    parser.add_argument(
        "--instructions",
        choices=("auto", "yes", "no"),
        default="auto",
        help="also count instructions per request (and per task) with valgrind (auto: when valgrind is installed)",
    )
    report.add_section_options(parser)
    args = parser.parse_args(argv)
    if min(args.repetitions, args.warmup + 1, args.requests, args.tasks + 1) < 1:
        parser.error("--repetitions and --requests must be positive, --warmup and --tasks not negative")

    try:
        summaries = run_benchmark(list(VARIANTS), args.repetitions, args.warmup, args.requests)
        task_summaries = (
            run_benchmark(list(task_overhead.VARIANTS), args.repetitions, args.warmup, args.tasks, TASK_MODULE)
            if args.tasks
            else []
        )
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    counts: dict[str, float] = {}
    task_counts: dict[str, float] = {}
    if args.instructions == "yes" or (args.instructions == "auto" and instructions.valgrind_available()):
        print("counting instructions per request under valgrind (a few minutes)", file=sys.stderr, flush=True)
        try:
            counts = instructions.measure_variants(
                list(VARIANTS),
                _clean_environment(),
                progress=lambda name, count: print(f"  {name:<26} {count:12,.0f} instructions/req", file=sys.stderr),
            )
            if args.tasks:
                task_counts = instructions.measure_variants(
                    list(task_overhead.VARIANTS),
                    _clean_environment(),
                    progress=lambda name, count: print(f"  {name:<26} {count:12,.0f} instr./task", file=sys.stderr),
                    module=TASK_MODULE,
                )
        except (instructions.InstructionCountError, subprocess.TimeoutExpired) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    section = render_report(
        summaries, args.repetitions, args.warmup, args.requests, counts, task_summaries, args.tasks, task_counts
    )
    status = report.publish_section(
        SECTION, section, args.output, not args.no_write, figures(summaries, task_summaries), args.figures
    )
    ratio, verdict = target_verdict(summaries)
    if ratio is not None:
        print(f"{verdict}: spyglass added ÷ otel-flask added = {ratio:.2f} (target ≤ {TARGET_RATIO:.2f})")
    return status


if __name__ == "__main__":
    sys.exit(main())
