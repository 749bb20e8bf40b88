"""The benchmarks run end to end with tiny counts: exit 0, print their section, store their summary figures.

Each runs as ``make bench`` runs it (``python -m benchmarks.NAME``), with ``--no-write`` so that
docs/performance.md is left alone, and ``--figures`` into a temporary directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from benchmarks import report

REPO = Path(__file__).resolve().parent.parent
_TIMEOUT_S = 120


def run_benchmark(
    module: str, arguments: Sequence[str], figures_path: Path, timeout_s: float = _TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m benchmarks.MODULE`` with ``arguments``, not writing the report; fail on a non-zero exit."""
    completed = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *arguments, "--no-write", "--figures", str(figures_path)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def leading_number(value: str) -> float:
    """The number a figure's formatted value starts with (``"1,234 lines/s"`` -> 1234.0)."""
    match = re.match(r"[\d,]+(?:\.\d+)?", value)
    assert match, value
    return float(match.group().replace(",", ""))


def assert_positive(figures: Sequence[report.Figure], benchmark: str) -> None:
    assert figures
    for figure in figures:
        assert figure.benchmark == benchmark
        assert leading_number(figure.value) > 0, figure
        assert figure.ratio is not None and figure.ratio > 0, figure
        assert figure.against and figure.noise, figure


def test_logs_benchmark_runs_every_variant_and_stores_positive_figures(tmp_path: Path) -> None:
    """A tiny logs benchmark exits 0, prints its section, and stores lines/s figures with ratios to the peer."""
    figures_path = tmp_path / "logs.json"
    completed = run_benchmark(
        "logs_throughput", ["--repetitions", "2", "--lines", "300", "--warmup", "20"], figures_path
    )
    assert "<!-- bench:" not in completed.stdout  # the section body only: markers are the report's
    for variant in ("spyglass", "spyglass-stdlib", "stdlib-json"):
        assert f"| {variant} |" in completed.stdout
    figures = report.read_figures(figures_path)
    assert_positive(figures, "Logs, JSON lines")
    assert [figure.measure for figure in figures] == ["spyglass structlog lines/s", "spyglass stdlib-logging lines/s"]


def test_logs_benchmark_without_the_peer_stores_figures_without_ratio(tmp_path: Path) -> None:
    """Measuring spyglass alone still works: its figure has a value and no ratio (nothing to divide by)."""
    figures_path = tmp_path / "logs.json"
    run_benchmark(
        "logs_throughput",
        ["--repetitions", "1", "--lines", "200", "--warmup", "0", "--variants", "spyglass"],
        figures_path,
    )
    (figure,) = report.read_figures(figures_path)
    assert leading_number(figure.value) > 0
    assert figure.ratio is None


def test_scrape_size_benchmark_counts_every_recorded_series_and_stores_positive_figures(tmp_path: Path) -> None:
    """A tiny scrape-size run exits 0, both variants count every request and task run, figures are positive."""
    figures_path = tmp_path / "scrape-size.json"
    completed = run_benchmark(
        "scrape_size",
        ["--routes", "3", "--tasks", "2", "--dead", "4", "--scrapes", "2"],
        figures_path,
    )
    for variant in ("spyglass", "prometheus-multiproc"):
        assert f"| {variant} | 0 |" in completed.stdout
        assert f"| {variant} | 4 |" in completed.stdout
    assert "3 of 3, 2 of 2" in completed.stdout  # the live worker alone
    assert "7 of 7, 6 of 6" in completed.stdout  # and the four dead processes
    assert "Warning" not in completed.stdout
    figures = report.read_figures(figures_path)
    assert_positive(figures, "Metrics scrape, multi-process")
    assert len(figures) == 2


def test_http_load_serves_under_wrk_and_every_request_reaches_the_backends() -> None:
    """A real gunicorn per variant answers wrk's load without errors, and nothing is lost on the way.

    spyglass at 100% sampling delivers one span per request served to the OTLP sink (warm-up
    included, after a graceful stop), and prometheus-flask-exporter's endpoint counts every
    request: a variant that dropped its telemetry would otherwise look fast.
    """
    from benchmarks import http_load

    connections = 4
    with http_load.sink_process() as sink:
        runs = {
            name: http_load.measure_variant(name, sink, warmup=1, duration=1, connections=connections)
            for name in ("none", "spyglass", "prometheus-flask-exporter")
        }
    for name, run in runs.items():
        assert run.errors == 0, name
        assert run.requests > 100, (name, run.requests)
        assert 0 < run.p50_ms <= run.p99_ms, name
        assert run.server_cpu_us > 0, name
        # Both are read in clock ticks (per thread, per process), so the part may exceed the total by a
        # tick per worker and kind of time (user, system): 2 workers, 4 ticks.
        tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
        assert 0 < run.request_thread_cpu_us <= run.server_cpu_us + 4 * tick_us / run.requests, name
    # wrk does not count the responses in flight when it stops: at most one per connection, twice
    # (the warm-up and the timed phase).
    spyglass, exporter = runs["spyglass"], runs["prometheus-flask-exporter"]
    in_flight = 2 * connections
    assert spyglass.spans is not None and spyglass.served <= spyglass.spans <= spyglass.served + in_flight
    assert spyglass.counted is not None and spyglass.served <= spyglass.counted <= spyglass.served + in_flight
    assert exporter.counted is not None and exporter.served <= exporter.counted <= exporter.served + in_flight


def test_worker_instructions_count_what_spyglass_adds_to_a_gunicorn_worker_per_request(tmp_path: Path) -> None:
    """The instructions of each variant's one gunicorn worker are counted by valgrind, per request served.

    The baseline's worker runs gunicorn and Flask only, so spyglass's (a span, metrics, an access
    line, and their export on the worker's own threads) executes more per request; the summary
    figure is spyglass's count against the baseline's, and the section states the instruction
    budget that keeping 0.85 of the throughput would allow. A part named with ``--parts`` is priced
    by counting spyglass again with its setting off.
    """
    figures_path = tmp_path / "http-instructions.json"
    completed = run_benchmark(
        "worker_instructions",
        [
            "--variants",
            "spyglass",
            "--parts",
            "traceresponse header",
            "--small",
            "10",
            "--large",
            "30",
            "--warmup",
            "5",
        ],
        figures_path,
        timeout_s=600,
    )
    rows = dict(re.findall(r"^\| (none|spyglass) \| ([\d,]+) \|", completed.stdout, re.MULTILINE))
    none, spyglass = (float(rows[name].replace(",", "")) for name in ("none", "spyglass"))
    assert 100_000 < none < spyglass, rows  # a Flask request through gunicorn is hundreds of thousands
    (part,) = re.findall(
        r"^\| traceresponse header: .* \| `SPYGLASS_TRACERESPONSE=false` \| ([\d,]+) \| ([+-][\d,]+) \|",
        completed.stdout,
        re.MULTILINE,
    )
    without, cost = (float(value.replace(",", "")) for value in part)
    assert none < without
    assert abs(cost - (spyglass - without)) <= 1  # each figure is rounded to a whole instruction on its own
    assert "keeping 0.85 of none's throughput would allow at most" in completed.stdout
    (figure,) = report.read_figures(figures_path)
    assert figure.measure == "instructions/request, spyglass" and figure.against == "none"
    assert figure.ratio == pytest.approx(spyglass / none, rel=1e-5) and figure.noise == "under 1% (valgrind)"


def test_worker_instructions_report_a_server_that_cannot_start_with_its_own_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A variant whose gunicorn exits at start fails the count with the server's own message, not a hang."""
    from benchmarks import worker_instructions
    from benchmarks.celery_processes import BenchmarkError

    monkeypatch.setattr(worker_instructions, "BATCHING_ENVIRONMENT", {"SPYGLASS_LOG_FLUSH_INTERVAL": "600"})
    with pytest.raises(BenchmarkError) as failure:
        worker_instructions.worker_instructions("spyglass", "http://127.0.0.1:9", requests=1, warmup=0)
    message = str(failure.value)
    assert message.startswith("spyglass: process ") and "exited with status 1" in message
    assert "SPYGLASS_LOG_FLUSH_INTERVAL='600' is not valid" in message


def test_in_process_benchmark_measures_spyglass_against_the_floor_per_request_and_per_task(tmp_path: Path) -> None:
    """The in-process benchmark measures the floor beside spyglass, for requests and for Celery tasks.

    Every variant exports every span it samples, and the summary holds spyglass's added CPU as a
    multiple of the floor's, per request and per task, with the target it is held to.
    """
    figures_path = tmp_path / "in-process.json"
    completed = run_benchmark(
        "run",
        ["--repetitions", "1", "--warmup", "50", "--requests", "400", "--tasks", "300", "--instructions", "no"],
        figures_path,
    )
    assert "## Per task (Celery)" in completed.stdout
    for spans in ("451 (100%)", "350 (100%)"):  # 50 + 400 requests + 1 check; 50 + 300 tasks
        assert completed.stdout.count(spans) >= 3, completed.stdout  # spyglass, the floor and the otel peer
    figures = {figure.measure: figure for figure in report.read_figures(figures_path)}
    for what in ("request", "task"):
        figure = figures[f"per {what}, spyglass added vs the floor"]
        assert figure.against == "the floor" and figure.ratio is not None and figure.ratio > 0
        assert figure.target == "at most 1.5 \u00d7 the floor" and figure.met == (figure.ratio <= 1.5)


def test_instruction_counts_per_task_compare_spyglass_with_the_floor(tmp_path: Path) -> None:
    """Per task, valgrind counts what each variant's process executes, and the table sets spyglass against the floor.

    The count runs the same task process as the CPU measurement (Celery's own tracer, no broker):
    spyglass and the floor each add a span, metrics and log context to the baseline's task, so both
    execute more instructions per task than Celery alone, and the per-task table states
    spyglass's addition as a multiple of the floor's.
    """
    from benchmarks import instructions, run

    counts = instructions.measure_variants(
        ["baseline", "spyglass", "floor"],
        run._clean_environment(),
        small=20,
        large=120,
        warmup=20,
        module=instructions.TASK_MODULE,
    )
    assert 100_000 < counts["baseline"] < counts["floor"], counts  # Celery's tracer alone: hundreds of thousands
    assert counts["baseline"] < counts["spyglass"], counts
    lines = "\n".join(run.render_instruction_table(counts, unit="task"))
    assert "## Instructions per task (valgrind: deterministic)" in lines
    ratio = (counts["spyglass"] - counts["baseline"]) / (counts["floor"] - counts["baseline"])
    assert f"spyglass added ÷ floor added, in instructions: {ratio:.2f}." in lines
