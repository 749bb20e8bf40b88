"""JSON log lines per second through spyglass's pipeline, against stdlib logging with python-json-logger.

    python -m benchmarks.logs_throughput [--repetitions 7] [--lines 50000] [--warmup 2000]

Variants (:data:`DESCRIPTIONS`), every one logging the same call: level INFO, logger
``shop.orders``, message ``order placed``, fields ``order_id`` (the line's number) and
``status="paid"``:

``spyglass``
    spyglass set up from the environment (``spyglass.init()``, what ``import spyglass.auto``
    does first), then ``spyglass.get_logger("shop.orders").info("order placed", order_id=i,
    status="paid")`` inside an active span, as code running in a request or task logs: the line
    gets ``trace_id`` and ``span_id``.
``spyglass-stdlib``
    the same set-up, then ``logging.getLogger("shop.orders").info("order placed",
    extra={...})``: a standard-library call, which spyglass routes through its pipeline once it
    has taken over logging (a library's line, or an app that never adopted structlog).
``stdlib-json``
    no spyglass: the root logger at INFO with a ``logging.StreamHandler`` on stdout formatted by
    python-json-logger's ``JsonFormatter`` (ISO-8601 UTC ``timestamp``, ``level``, ``logger``,
    ``message`` and the ``extra`` fields): the usual way to get JSON lines from the standard
    library, and the peer the others are compared with.

Each measurement is a fresh process (logging set-up is process-global) whose stdout is a new
file on disk; it logs ``--warmup`` lines, then times ``--lines`` lines (wall clock and process
CPU, until every line has been handed to the kernel). The parent checks that the file holds
every line and that the last one is the JSON object expected. Variants are measured in turn,
repetition after repetition (A B C A B C ...), so machine noise spreads evenly over them. The
section ``logs`` of docs/performance.md is written (see :mod:`benchmarks.report`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import report

__all__ = [
    "DESCRIPTIONS",
    "PEER",
    "BenchmarkError",
    "Measurement",
    "Summary",
    "figures",
    "main",
    "measure_once",
    "render_section",
    "run_benchmark",
]

SECTION = "logs"
PEER = "stdlib-json"
PEER_LABEL = "stdlib logging + python-json-logger"
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("structlog", "orjson", "opentelemetry-sdk", "python-json-logger", "spyglass")
LOGGER_NAME = "shop.orders"
MESSAGE = "order placed"
STATUS = "paid"
DESCRIPTIONS = {
    "spyglass": "`spyglass.init()` from the environment; `spyglass.get_logger('shop.orders')"
    ".info('order placed', order_id=i, status='paid')` inside an active span (adds `trace_id`, `span_id`, "
    "`service.name`)",
    "spyglass-stdlib": "the same set-up; `logging.getLogger('shop.orders').info('order placed', "
    "extra={'order_id': i, 'status': 'paid'})` inside the span, routed by spyglass through its pipeline",
    "stdlib-json": "no spyglass: root logger at INFO, `logging.StreamHandler(sys.stdout)` with python-json-logger's "
    "`JsonFormatter('%(levelname)s %(name)s %(message)s', timestamp=True, rename_fields={'levelname': 'level', "
    "'name': 'logger'})`; the same call as spyglass-stdlib, no span",
}
EXPECTED_FIELDS = {
    "spyglass": ("event", "level", "logger", "timestamp", "service.name", "trace_id", "span_id"),
    "spyglass-stdlib": ("event", "level", "logger", "timestamp", "service.name", "trace_id", "span_id"),
    "stdlib-json": ("message", "level", "logger", "timestamp"),
}
"""Fields besides ``order_id`` and ``status`` that the last line of each variant must carry."""
_CLEARED_PREFIXES = ("OTEL_", "SPYGLASS_", "PROMETHEUS_")
_CLEARED_NAMES = ("prometheus_multiproc_dir", "PYTHONUNBUFFERED")
_SUBPROCESS_TIMEOUT_S = 600
DASH = "\u2013"
TIMES = "\u00d7"


class BenchmarkError(Exception):
    """A measurement process failed, or its output is not what the variant should have written."""


@dataclass(frozen=True)
class Measurement:
    """One process's run of one variant."""

    variant: str
    lines_per_s: float
    cpu_us_per_line: float
    bytes_per_line: float


@dataclass
class Summary:
    """The measurements of one variant over all repetitions."""

    name: str
    runs: list[Measurement] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        """Lines per second, one per repetition, in the order measured."""
        return [run.lines_per_s for run in self.runs]

    @property
    def median(self) -> float:
        """Median lines per second."""
        return statistics.median(self.rates)

    @property
    def cpu_median(self) -> float:
        """Median process CPU per line, in µs."""
        return statistics.median(run.cpu_us_per_line for run in self.runs)

    @property
    def bytes_per_line(self) -> float:
        """Median size of a line, newline included."""
        return statistics.median(run.bytes_per_line for run in self.runs)


# -- the measurement process ---------------------------------------------------------------------


def _stdlib_json_logger() -> logging.Logger:
    """The peer's set-up: the root logger writing python-json-logger lines to stdout."""
    from pythonjsonlogger.json import JsonFormatter

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            timestamp=True,
            rename_fields={"levelname": "level", "name": "logger"},
        )
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return logging.getLogger(LOGGER_NAME)


def _timed(call: Any, warmup: int, lines: int, flush: Any) -> tuple[float, float]:
    """Run ``call(i)`` for the warm-up, then time ``lines`` calls and ``flush()``: (wall s, CPU s)."""
    for number in range(warmup):
        call(number)
    flush()
    wall, cpu = time.perf_counter(), time.process_time()
    for number in range(warmup, warmup + lines):
        call(number)
    flush()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_in_this_process(variant: str, lines: int, warmup: int) -> dict[str, float]:
    """Log ``warmup`` then ``lines`` lines to stdout as ``variant`` does; return the timings of the latter.

    Runs in a fresh process: the variants set up logging for the whole process.
    """
    if variant == PEER:
        peer = _stdlib_json_logger()
        handler = logging.getLogger().handlers[0]

        def log_peer(number: int) -> None:
            peer.info(MESSAGE, extra={"order_id": number, "status": STATUS})

        seconds, cpu = _timed(log_peer, warmup, lines, handler.flush)
        return {"seconds": seconds, "cpu_seconds": cpu}
    if variant not in DESCRIPTIONS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(DESCRIPTIONS)}")

    from opentelemetry import trace

    import spyglass
    from spyglass.logs import flush_logs

    spyglass.init()
    if variant == "spyglass":
        structured = spyglass.get_logger(LOGGER_NAME)

        def log(number: int) -> None:
            structured.info(MESSAGE, order_id=number, status=STATUS)
    else:
        standard = logging.getLogger(LOGGER_NAME)

        def log(number: int) -> None:
            standard.info(MESSAGE, extra={"order_id": number, "status": STATUS})

    with trace.get_tracer("bench.logs").start_as_current_span("GET /orders"):
        seconds, cpu = _timed(log, warmup, lines, flush_logs)
    spyglass.shutdown()
    return {"seconds": seconds, "cpu_seconds": cpu}


# -- the benchmark -------------------------------------------------------------------------------


def variant_environment(variant: str) -> dict[str, str]:
    """The environment of a measurement process: this one's without telemetry settings, plus ``variant``'s."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_CLEARED_PREFIXES) and key not in _CLEARED_NAMES
    }
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if variant != PEER:
        environment.update(
            OTEL_SERVICE_NAME="bench-logs",
            OTEL_TRACES_EXPORTER="none",  # the one span is not what is measured
            SPYGLASS_METRICS_PORT="0",
            SPYGLASS_LOG_LEVEL="info",
        )
    return environment


def _check_output(variant: str, path: Path, expected_lines: int) -> float:
    """Check that ``path`` holds every line and a well-formed last one; return the bytes per line."""
    data = path.read_bytes()
    written = data.count(b"\n")
    if written != expected_lines:
        raise BenchmarkError(f"{variant}: {written:,} lines written, {expected_lines:,} expected")
    last = json.loads(data.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    missing = [name for name in EXPECTED_FIELDS[variant] if name not in last]
    if missing or last.get("order_id") != expected_lines - 1 or last.get("status") != STATUS:
        raise BenchmarkError(f"{variant}: unexpected last line {last!r} (missing {missing})")
    if last.get("event", last.get("message")) != MESSAGE:
        raise BenchmarkError(f"{variant}: unexpected message in {last!r}")
    return len(data) / written


def measure_once(variant: str, lines: int, warmup: int) -> Measurement:
    """Run one fresh process of ``variant``, its stdout a new file on disk, and check what it wrote."""
    with tempfile.TemporaryDirectory(prefix=f"bench-logs-{variant}-") as directory:
        output = Path(directory) / "out.jsonl"
        result = Path(directory) / "result.json"
        command = [
            sys.executable,
            "-m",
            "benchmarks.logs_throughput",
            "--measure",
            variant,
            "--result",
            str(result),
            "--lines",
            str(lines),
            "--warmup",
            str(warmup),
        ]
        with open(output, "wb") as stdout:
            try:
                completed = subprocess.run(
                    command,
                    cwd=ROOT,
                    env=variant_environment(variant),
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=subprocess.PIPE,
                    timeout=_SUBPROCESS_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise BenchmarkError(f"{variant} did not finish within {_SUBPROCESS_TIMEOUT_S} s") from exc
        if completed.returncode != 0:
            tail = "\n".join(completed.stderr.decode("utf-8", "replace").splitlines()[-25:])
            raise BenchmarkError(f"{variant} failed with exit status {completed.returncode}:\n{tail}")
        try:
            timings = json.loads(result.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BenchmarkError(f"{variant} exited without a readable result ({exc})") from exc
        bytes_per_line = _check_output(variant, output, warmup + lines)
    return Measurement(
        variant=variant,
        lines_per_s=lines / timings["seconds"],
        cpu_us_per_line=timings["cpu_seconds"] / lines * 1e6,
        bytes_per_line=bytes_per_line,
    )


def run_benchmark(variants: Sequence[str], repetitions: int, lines: int, warmup: int) -> list[Summary]:
    """Measure every variant ``repetitions`` times, interleaved, and summarise each."""
    summaries = {name: Summary(name) for name in variants}
    total, done = repetitions * len(variants), 0
    for repetition in range(1, repetitions + 1):
        for name in variants:
            measurement = measure_once(name, lines, warmup)
            summaries[name].runs.append(measurement)
            done += 1
            print(
                f"[{done:>2}/{total}] rep {repetition} {name:<16} {measurement.lines_per_s:10,.0f} lines/s  "
                f"{measurement.cpu_us_per_line:6.1f} µs CPU/line",
                file=sys.stderr,
                flush=True,
            )
    return list(summaries.values())


def render_table(summaries: Sequence[Summary]) -> str:
    """The result table in Markdown."""
    peer = next((summary for summary in summaries if summary.name == PEER), None)
    lines = [
        f"| Variant | Lines/s: median (min{DASH}max) | Noise | {TIMES} {PEER} (of medians) "
        f"| {TIMES} {PEER} per repetition: median (min{DASH}max) | Process CPU µs/line (median) | Bytes/line |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for summary in summaries:
        if peer is None or summary is peer:
            ratio = paired = DASH
        else:
            ratio = f"{summary.median / peer.median:.2f}"
            paired = report.ratio_spread(report.paired_ratios(summary.rates, peer.rates))
        lines.append(
            f"| {summary.name} | {summary.median:,.0f} ({min(summary.rates):,.0f}{DASH}{max(summary.rates):,.0f}) "
            f"| {report.noise(summary.rates)} | {ratio} | {paired} | {summary.cpu_median:.1f} "
            f"| {summary.bytes_per_line:.0f} |"
        )
    return "\n".join(lines)


_FIGURE_MEASURES = {
    "spyglass": "spyglass structlog lines/s",
    "spyglass-stdlib": "spyglass stdlib-logging lines/s",
}


def figures(summaries: Sequence[Summary]) -> list[report.Figure]:
    """The summary figures: spyglass's lines/s (structlog, and stdlib if measured), each over the peer's."""
    by_name = {summary.name: summary for summary in summaries}
    peer = by_name.get(PEER)
    result = []
    for name, measure in _FIGURE_MEASURES.items():
        summary = by_name.get(name)
        if summary is None:
            continue
        result.append(
            report.Figure(
                benchmark="Logs, JSON lines",
                measure=measure,
                value=f"{summary.median:,.0f} lines/s",
                ratio=round(summary.median / peer.median, 3) if peer is not None else None,
                against=PEER_LABEL if peer is not None else "",
                noise=report.noise(summary.rates),
            )
        )
    return result


def _key_lines(summaries: Sequence[Summary]) -> list[str]:
    by_name = {summary.name: summary for summary in summaries}
    peer = by_name.get(PEER)
    mine = by_name.get("spyglass")
    if peer is None or mine is None:
        return [f"Key figure not available: it needs spyglass and {PEER}."]
    lines = [
        f"**Key figure: spyglass's structlog logger writes {mine.median:,.0f} JSON lines/s (median), "
        f"{mine.median / peer.median:.2f} {TIMES} the {peer.median:,.0f} lines/s of {PEER_LABEL}.**"
    ]
    stdlib = by_name.get("spyglass-stdlib")
    if stdlib is not None:
        lines += [
            "",
            f"A standard-library call through spyglass: {stdlib.median:,.0f} lines/s, "
            f"{stdlib.median / peer.median:.2f} {TIMES} the peer.",
        ]
    return lines


def _filesystem_of(path: str) -> str:
    """The file-system type ``path`` is on (from /proc/self/mounts), or ``unknown``."""
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                parts = line.split()
                if (
                    len(parts) >= 3
                    and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/"))
                    and len(parts[1]) >= len(best)
                ):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def render_section(summaries: Sequence[Summary], repetitions: int, lines: int, warmup: int) -> str:
    """Render this benchmark's section of docs/performance.md."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    temporary = tempfile.gettempdir()
    variants = "\n".join(f"- `{summary.name}`: {DESCRIPTIONS.get(summary.name, '')}" for summary in summaries)
    return "\n".join(
        [
            "<!-- Generated by `python -m benchmarks.logs_throughput`. Do not edit: rerun it instead. -->",
            "",
            "# Performance: JSON log lines per second",
            "",
            "This section is written by `python -m benchmarks.logs_throughput`; the numbers below come from its "
            "last run.",
            "",
            f"Measured {now}: {repetitions} repetitions per variant, each a fresh process logging {warmup:,} "
            f"warm-up and {lines:,} timed lines to a file, variants interleaved.",
            "",
            render_table(summaries),
            "",
            *_key_lines(summaries),
            "",
            "## Machine",
            "",
            *report.machine_lines(
                PACKAGES,
                [f"- Log output: a new regular file in {temporary} ({_filesystem_of(temporary)}) per process"],
            ),
            "",
            "## Variants",
            "",
            variants,
            "",
            "## Method",
            "",
            "Every variant makes the same logging call: level INFO, logger `shop.orders`, message "
            "`order placed`, and two fields, `order_id` (the line's number) and `status` (`paid`). "
            "spyglass's variants are configured only through the environment (`OTEL_SERVICE_NAME=bench-logs`, "
            "`OTEL_TRACES_EXPORTER=none`, `SPYGLASS_METRICS_PORT=0`, `SPYGLASS_LOG_LEVEL=info`, JSON format "
            "by default) and `spyglass.init()`, which sets up logging as `import spyglass.auto` does; their "
            "calls run inside one active span (`start_as_current_span`), so every line carries `trace_id` and "
            "`span_id`, plus `service.name`, next to `timestamp`, `level`, `logger` and `event`. The peer's "
            "lines carry `timestamp` (ISO-8601 UTC, as spyglass's), `level`, `logger`, `message` and the two "
            "fields, and no trace context (nothing in its set-up knows of spans): spyglass's lines are larger "
            "and do more (see *Bytes/line*). Each measurement is a fresh process whose stdout is a new regular "
            "file on the machine's disk, not /dev/null: a log line's cost includes handing it to the kernel, "
            "and writing to /dev/null copies nothing, which would flatter the peer's `StreamHandler` (one "
            "`write` per line) against spyglass's line writer (whole lines batched into writes of at most 4 "
            "KiB); a file also lets the benchmark check every line afterwards. The process logs the warm-up "
            "lines, then the timed ones: *Lines/s* divides the timed lines by the wall-clock time from the "
            "first timed call until the last line was written to the file (spyglass's pending lines flushed, "
            "`flush_logs()`; the peer flushes on every line); *process CPU* (`time.process_time`, all threads, "
            "spyglass's flush thread included) covers the same interval. After the process exits, the file "
            "must hold exactly warm-up + timed lines, the last one a JSON object with the expected fields. "
            "Medians are over the repetitions (the variants' processes interleaved: A B C A B C ...); "
            "*noise* is half the range of the repetitions over their median; the per-repetition ratio divides "
            "each repetition's lines/s by the peer's of the same repetition. Rerun with "
            "`.venv/bin/python -m benchmarks.logs_throughput` (`--help` for repetitions and line counts).",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the section and write it; non-zero only if a measurement failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=7, help="measurement processes per variant (default 7)")
    parser.add_argument("--lines", type=int, default=50_000, help="timed lines per process (default 50000)")
    parser.add_argument("--warmup", type=int, default=2_000, help="untimed lines first, per process (default 2000)")
    parser.add_argument(
        "--variants", nargs="+", choices=list(DESCRIPTIONS), default=list(DESCRIPTIONS), help="variants to measure"
    )
    parser.add_argument("--measure", choices=list(DESCRIPTIONS), help=argparse.SUPPRESS)  # one measurement process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    report.add_section_options(parser)
    args = parser.parse_args(argv)
    if args.repetitions < 1 or args.lines < 1 or args.warmup < 0:
        parser.error("--repetitions and --lines must be positive, --warmup not negative")

    if args.measure is not None:
        if args.result is None:
            parser.error("--measure needs --result")
        timings = measure_in_this_process(args.measure, args.lines, args.warmup)
        args.result.write_text(json.dumps(timings), encoding="utf-8")
        return 0

    try:
        summaries = run_benchmark(args.variants, args.repetitions, args.lines, args.warmup)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    section = render_section(summaries, args.repetitions, args.lines, args.warmup)
    return report.publish_section(
        SECTION, section, args.output, not args.no_write, figures=figures(summaries), figures_path=args.figures
    )


if __name__ == "__main__":
    sys.exit(main())
