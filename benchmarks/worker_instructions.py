"""Instructions a gunicorn worker executes per request, counted by valgrind: the load benchmark nearly without noise.

    python -m benchmarks.worker_instructions [--small 512] [--large 1536] [--variants ...]

The throughput of :mod:`benchmarks.http_load` moves by 10 to 20 % from run to run on a shared
machine; the number of instructions a worker executes per request moves by under 1 % (random
trace ids and sampling, timers; the hash seed is fixed, see :data:`HASH_SEED_ENVIRONMENT`). Each
variant of that benchmark is started as it is there (same command, same environment, same OTLP
sink) but with one worker, under
``valgrind --tool=callgrind``. A sequential client sends a warm-up and then ``small`` (or
``large``) requests; the server is stopped gracefully, so the worker exports what it still holds;
and the worker's count at ``large`` minus its count at ``small``, divided by ``large - small``, is
the figure. Every thread of the worker is counted, so building and sending spans and log records
in the background is included.

Under valgrind the worker serves tens of requests per second instead of thousands, which would
make time-driven batching send small batches. The runs therefore set the batch delays
(``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_BLRP_SCHEDULE_DELAY``, ``OTEL_METRIC_EXPORT_INTERVAL``) to
ten minutes and ``SPYGLASS_LOG_FLUSH_INTERVAL`` to its maximum, one minute: batches leave when
full, as they do under load, and ``large - small`` defaults to a multiple of the batch size (512).
Counts are user space only: system calls and waiting on memory are not in them.

With ``spyglass`` among the variants, its worker is also counted with one part switched off at a
time by its setting (:data:`PARTS`: the span export, the log export, the access line, the
``traceresponse`` header); what a part costs is spyglass's count minus that count.

Writes the section ``http-instructions`` of docs/performance.md (see :mod:`benchmarks.report`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import http_load, report
from benchmarks.celery_processes import BenchmarkError, free_port, wait_until
from benchmarks.instructions import per_extra_unit

__all__ = [
    "BATCHING_ENVIRONMENT",
    "BATCH_SIZE",
    "HASH_SEED_ENVIRONMENT",
    "PARTS",
    "SECTION",
    "Part",
    "figures",
    "main",
    "measure_variants",
    "part_variant",
    "render_parts",
    "render_section",
    "worker_instructions",
]

ROOT = Path(__file__).resolve().parent.parent
SECTION = "http-instructions"
BASELINE = http_load.BASELINE
TARGET_RATIO = http_load.TARGET_RATIO
BATCH_SIZE = 512
"""The span and log batch size of every variant (the OpenTelemetry default)."""
BATCHING_ENVIRONMENT = {
    "OTEL_BSP_SCHEDULE_DELAY": "600000",
    "OTEL_BLRP_SCHEDULE_DELAY": "600000",
    "OTEL_METRIC_EXPORT_INTERVAL": "600000",
    "SPYGLASS_LOG_FLUSH_INTERVAL": "60",
}
"""Batches leave when full, as under load, not on a timer that fires every few requests under valgrind."""
HASH_SEED_ENVIRONMENT = {"PYTHONHASHSEED": "0"}
"""Every count with the same string hashes, so the same dict and set layouts: counts of spyglass's worker with
random seeds differed by up to 10k instructions per request, four with this seed by 6k (2026-11-24)."""
_TOTALS = re.compile(r"^(?:totals|summary):\s*(\d+)", re.MULTILINE)
_READY_TIMEOUT_S = 300.0
_STOP_TIMEOUT_S = 300.0
_WORKER_TIMEOUT_S = 3600
DASH = "\u2013"
TIMES = "\u00d7"
DIVIDE = "\u00f7"
NOISE = "under 1% (valgrind)"
"""Run-to-run variation of the counts (four full runs differed by 0.2 to 0.8 % per variant)."""
PART_COUNT_SPREAD = 7_000
"""How far counts of one variant differ with the fixed hash seed (2026-11-24: spyglass 1,082.0k, 1,083.1k,
1,085.0k and 1,088.0k; with its log export off 1,058.4k, 1,060.9k, 1,063.9k and 1,065.0k)."""
PARTED = "spyglass"
"""The variant whose parts are counted one at a time."""


@dataclass(frozen=True)
class Part:
    """A part of spyglass's work per request, and the setting that switches it off."""

    description: str
    environment: dict[str, str]

    @property
    def setting(self) -> str:
        """The setting as a user writes it (``OTEL_LOGS_EXPORTER=none``)."""
        return ", ".join(f"`{name}={value}`" for name, value in self.environment.items())


PARTS: dict[str, Part] = {
    "span export": Part(
        "encoding each SERVER span as OTLP protobuf and POSTing the batches (the span is still made: "
        "its ids are in the access line, the header and the exemplars)",
        {"OTEL_TRACES_EXPORTER": "none"},
    ),
    "log export": Part(
        "each log line's OTLP log record, encoded and POSTed in batches (the lines still go to stdout)",
        {"OTEL_LOGS_EXPORTER": "none"},
    ),
    "access line": Part(
        "the JSON access line on stdout and its export",
        {"SPYGLASS_ACCESS_LOG": "false"},
    ),
    "traceresponse header": Part(
        "the W3C `traceresponse` header on every response",
        {"SPYGLASS_TRACERESPONSE": "false"},
    ),
}
"""What :func:`render_parts` prices, each by the settings that switch it off (and nothing else)."""


def part_variant(part: str) -> str:
    """The variant name under which ``spyglass`` without ``part`` is counted (``spyglass without log export``)."""
    return f"{PARTED} without {part}"


def _variant_setup(name: str) -> tuple[str, dict[str, str]]:
    """The load benchmark's variant that ``name`` runs as, and the settings added to its environment."""
    for part, definition in PARTS.items():
        if name == part_variant(part):
            return PARTED, definition.environment
    return name, {}


def _count_from_file(path: Path) -> int:
    match = _TOTALS.search(path.read_text(errors="replace"))
    if match is None:
        raise BenchmarkError(f"{path.name} holds no instruction total")
    return int(match.group(1))


def _request(port: int) -> None:
    status, _body = http_load.get(port, http_load.PATH, timeout=60)
    if status != 200:
        raise BenchmarkError(f"GET {http_load.PATH} answered {status}")


def worker_instructions(name: str, sink: str, requests: int, warmup: int) -> int:
    """Instructions executed by the single worker of variant ``name`` over its life, serving ``warmup + requests``.

    The count covers the worker from its fork to its exit (every thread); the master is not counted.
    """
    base, settings = _variant_setup(name)
    with tempfile.TemporaryDirectory(prefix=f"bench-instr-{base}-") as directory:
        workdir = Path(directory)
        port, metrics_port = free_port(), free_port()
        environment = http_load.variant_environment(base, workdir, sink, metrics_port)
        environment.update(BATCHING_ENVIRONMENT)
        environment.update(HASH_SEED_ENVIRONMENT)
        environment.update(settings)
        command = [
            "valgrind",
            "--tool=callgrind",
            "--trace-children=yes",  # opentelemetry-instrument execs gunicorn
            f"--callgrind-out-file={workdir}/callgrind.%p",
            sys.executable,
            *http_load.variant_command(base, port, workers=1, timeout_s=_WORKER_TIMEOUT_S),
        ]
        with (workdir / "server.log").open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            failure: Exception | None = None
            try:
                # A long timeout: a request given up on while the worker still serves it would count unseen.
                ready = wait_until(
                    lambda: http_load.answers(port, http_load.PATH, timeout=60), _READY_TIMEOUT_S, process=process
                )
                if not ready:
                    raise BenchmarkError(f"gunicorn under valgrind did not answer in {_READY_TIMEOUT_S:.0f} s")
                for _ in range(warmup + requests - 1):  # the request that found the server ready is the first
                    _request(port)
            except (BenchmarkError, OSError) as exc:  # a refused or reset connection too: reported with the log
                failure = exc
            finally:
                http_load.stop_server(process, _STOP_TIMEOUT_S)  # never left behind, whatever interrupted the requests
        if failure is not None:
            raise BenchmarkError(f"{name}: {failure}\n{http_load.log_tail(workdir)}") from failure
        workers = [path for path in workdir.glob("callgrind.*") if path.name != f"callgrind.{process.pid}"]
        if len(workers) != 1:
            raise BenchmarkError(f"{name}: expected the counts of one worker, found {sorted(p.name for p in workers)}")
        return _count_from_file(workers[0])


def measure_variants(
    variants: Sequence[str],
    sink: str,
    small: int,
    large: int,
    warmup: int,
    parallel: int = os.cpu_count() or 1,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, float]:
    """Instructions per request of each variant's worker: (count at ``large`` - count at ``small``) / (large - small).

    Runs ``parallel`` servers at a time.
    """
    return per_extra_unit(
        lambda name, size: worker_instructions(name, sink, size, warmup), variants, small, large, parallel, progress
    )


def _load_variants(counts: dict[str, float]) -> dict[str, float]:
    """The counts of the load benchmark's own variants (without the parts' variants)."""
    parted = {part_variant(part) for part in PARTS}
    return {name: count for name, count in counts.items() if name not in parted}


def render_table(counts: dict[str, float]) -> str:
    """One line per variant: instructions per request, what the instrumentation adds, the ratio to ``none``."""
    counts = _load_variants(counts)
    base = counts[BASELINE]
    lines = [
        f"| Variant | Worker instructions/request | Added | {TIMES} none | none {DIVIDE} variant |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, count in counts.items():
        added = DASH if name == BASELINE else f"+{count - base:,.0f}"
        lines.append(f"| {name} | {count:,.0f} | {added} | {count / base:.2f} | {base / count:.2f} |")
    return "\n".join(lines)


def budget_sentence(counts: dict[str, float]) -> str:
    """The instructions keeping :data:`TARGET_RATIO` of the throughput would allow, were time proportional to them."""
    base = counts[BASELINE]
    allowed = base / TARGET_RATIO - base
    sentence = (
        f"Were time proportional to instructions, keeping {TARGET_RATIO:.2f} of none's throughput would allow "
        f"at most +{allowed:,.0f} instructions per request (none {DIVIDE} {TARGET_RATIO:.2f} {DASH} none)"
    )
    if "spyglass" in counts:
        added = counts["spyglass"] - base
        sentence += f"; spyglass at 100% sampling adds +{added:,.0f}, {added / allowed:.1f} {TIMES} that budget"
    return (
        sentence + ". Time is not proportional to instructions (what one costs depends on cache misses and "
        f"system calls): compare none {DIVIDE} variant here with the throughput ratios of the load benchmark."
    )


def figures(counts: dict[str, float]) -> list[report.Figure]:
    """The summary figures: each instrumented variant's worker instructions per request against ``none``."""
    counts = _load_variants(counts)
    base = counts[BASELINE]
    return [
        report.Figure(
            benchmark="HTTP, gunicorn worker instructions",
            measure=f"instructions/request, {name}",
            value=f"{count:,.0f} (none {base:,.0f})",
            ratio=count / base,
            against="none",
            noise=NOISE,
        )
        for name, count in counts.items()
        if name != BASELINE
    ]


def render_parts(counts: dict[str, float]) -> list[str]:
    """The lines pricing each part of spyglass counted in ``counts`` (none if no part was counted).

    A part's cost is spyglass's count minus the count with the part switched off; its share is of
    what spyglass adds to ``none``. The parts overlap (the access line's export is also the log
    export), so their costs do not add up to the whole.
    """
    measured = [part for part in PARTS if part_variant(part) in counts]
    if not measured or PARTED not in counts:
        return []
    whole, base = counts[PARTED], counts[BASELINE]
    added = whole - base
    lines = [
        "## What each part costs",
        "",
        f"spyglass's worker counted again with one part switched off by its setting: the part's cost is "
        f"spyglass's count ({whole:,.0f}) minus that count, and its share is of the +{added:,.0f} spyglass "
        "adds to none. Parts overlap (the access line includes its export), so the shares do not add up. "
        f"Counts of one variant differ by up to {PART_COUNT_SPREAD // 1000}k instructions per request from run "
        "to run (batches leave at the moments the export threads wake), so a part's cost is good to about "
        f"{PART_COUNT_SPREAD // 1000}k either way.",
        "",
        "| Part | Switched off by | Worker instructions/request without it | The part's cost | "
        "Share of spyglass's addition |",
        "|---|---|---:|---:|---:|",
    ]
    for part in measured:
        count = counts[part_variant(part)]
        cost = whole - count
        share = f"{cost / added:.0%}" if added > 0 else DASH
        lines.append(
            f"| {part}: {PARTS[part].description} | {PARTS[part].setting} | {count:,.0f} | {cost:+,.0f} | {share} |"
        )
    return [*lines, ""]


def render_section(counts: dict[str, float], small: int, large: int, warmup: int) -> str:
    """Render the ``http-instructions`` section of docs/performance.md."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "<!-- Generated by `make bench` (python -m benchmarks.worker_instructions). "
            "Do not edit: rerun it instead. -->",
            "",
            "# Performance: instructions per request in a gunicorn worker",
            "",
            f"Measured {now}: each variant of the load benchmark above, with one worker under "
            f"`valgrind --tool=callgrind`, served {warmup:,} warm-up requests and then {small:,} or {large:,} "
            f"more; the difference between the worker's two counts, per extra request, is shown.",
            "",
            render_table(counts),
            "",
            budget_sentence(_load_variants(counts)),
            "",
            *render_parts(counts),
            "## Machine",
            "",
            *report.machine_lines(http_load.PACKAGES, ["- valgrind: callgrind, every thread of the worker"]),
            "",
            "## Method",
            "",
            "Throughput on this shared machine moves by 10 to 20 % between runs; the instructions a worker "
            "executes per request move by under 1 % (random trace ids and sampling, timers; every run has the "
            "same hash seed, `PYTHONHASHSEED=0`), so this table shows, almost without noise, how much more work "
            "each variant gives a worker. Each variant "
            "runs exactly as in the load benchmark (same "
            "command, environment and OTLP sink) but with `--workers 1` under valgrind; a sequential client "
            "sends the requests, the server is stopped gracefully so that the worker exports what it still "
            "holds, and all of the worker's threads are counted (span and log export included; the master, "
            "which only serves `/metrics`, is not). A part's count runs spyglass's variant with the part's "
            "setting added to its environment, and nothing else changed. Under valgrind a worker serves tens "
            "of requests per second, so the timers that send batches are set long (`OTEL_BSP_SCHEDULE_DELAY`, "
            "`OTEL_BLRP_SCHEDULE_DELAY` and `OTEL_METRIC_EXPORT_INTERVAL` to ten minutes, "
            "`SPYGLASS_LOG_FLUSH_INTERVAL` to its maximum, one minute): "
            f"batches leave full, as they do under load, and the two runs differ by whole batches of {BATCH_SIZE}. "
            "Instructions are not time: system calls (the same in every variant but those that export) and "
            "memory stalls are not counted, and the gunicorn master and wrk, which share the CPUs in the load "
            "benchmark, are not part of this figure. Rerun with `make bench` (or "
            "`.venv/bin/python -m benchmarks.worker_instructions --help`).",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Count, print the section and write it; non-zero only if a measurement failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=BATCH_SIZE, help="requests of the short run (default 512)")
    parser.add_argument("--large", type=int, default=3 * BATCH_SIZE, help="requests of the long run (default 1536)")
    parser.add_argument("--warmup", type=int, default=200, help="requests before either run's own (default 200)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(http_load.DESCRIPTIONS),
        default=list(http_load.DESCRIPTIONS),
        help="variants to count (none is always counted)",
    )
    parser.add_argument(
        "--parts",
        nargs="*",
        choices=list(PARTS),
        default=list(PARTS),
        help="parts of spyglass to price by counting it without each (default all; none with no name)",
    )
    report.add_section_options(parser)
    args = parser.parse_args(argv)
    if args.small < 1 or args.large <= args.small or args.warmup < 0:
        parser.error("use 1 <= --small < --large and --warmup >= 0")
    variants = [BASELINE, *(name for name in args.variants if name != BASELINE)]
    if PARTED in variants:
        variants += [part_variant(part) for part in args.parts]

    def progress(name: str, count: float) -> None:
        print(f"{name:<40} {count:12,.0f} instructions/request", file=sys.stderr, flush=True)

    try:
        with http_load.sink_process() as sink:
            counts = measure_variants(variants, sink, args.small, args.large, args.warmup, progress=progress)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    section = render_section(counts, args.small, args.large, args.warmup)
    return report.publish_section(SECTION, section, args.output, not args.no_write, figures(counts), args.figures)


if __name__ == "__main__":
    sys.exit(main())
