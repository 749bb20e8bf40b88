"""Throughput and latency of a real gunicorn server under load, with and without instrumentation.

    python -m benchmarks.http_load [--repetitions 5] [--duration 10] [--connections 8]

Each variant serves :mod:`benchmarks.load_app` (``GET /items/<int:item_id>``, a small JSON body)
from ``gunicorn --workers 2`` (sync workers, gunicorn's default) on loopback. Load comes from wrk,
a separate process: ``--connections`` connections on one thread, as fast as the server answers
(closed loop), first for ``--warmup`` seconds that are not counted, then for ``--duration``
seconds that are. Reported per variant: requests per second, p50 and p99 latency (wrk's
histogram), the CPU the server's processes (master and workers) used per request, and what the
telemetry backends received, checked against the requests served so that a variant that drops
its telemetry cannot look fast. Every variant is started fresh for every repetition, and the
repetitions are interleaved (A B C ... A B C ...) so that machine noise spreads evenly.

Variants:

``none``
    the app alone.
``spyglass`` / ``spyglass-10pct``
    ``gunicorn -c python:spyglass.gunicorn``, configured by the environment as a user does: every
    span (or 10%, ``traceidratio``) exported over OTLP/HTTP to a local sink, the HTTP metrics in the
    multi-process directory served by the master, one JSON access-log line per request on stdout
    (written to a file).
``otel-instrument``
    ``opentelemetry-instrument gunicorn ...`` (zero-code: opentelemetry-distro configures the SDK,
    every installed instrumentation is applied), traces and metrics exported over OTLP/HTTP to the
    same sink, stable HTTP semantic conventions.
``prometheus-flask-exporter``
    ``GunicornPrometheusMetrics(app)`` with its multi-process gunicorn hooks
    (:mod:`benchmarks.load_gunicorn_pfe`), default metrics.

Target: spyglass at 100% sampling keeps at least 0.85 of the uninstrumented throughput. Writes the
section ``http-load`` of docs/performance.md (see :mod:`benchmarks.report`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import report
from benchmarks.celery_processes import BenchmarkError, free_port, wait_until

__all__ = [
    "DESCRIPTIONS",
    "Run",
    "ServerCpu",
    "VariantResult",
    "answers",
    "get",
    "log_tail",
    "main",
    "measure_variant",
    "render_section",
    "stop_server",
    "variant_command",
    "variant_environment",
]

ROOT = Path(__file__).resolve().parent.parent
SECTION = "http-load"
BASELINE = "none"
TARGET_VARIANT = "spyglass"
TARGET_RATIO = 0.85
PATH = "/items/7"
PACKAGES = (
    "gunicorn",
    "flask",
    "opentelemetry-sdk",
    "opentelemetry-distro",
    "opentelemetry-instrumentation-flask",
    "prometheus-flask-exporter",
    "spyglass",
)
DESCRIPTIONS = {
    "none": "the app alone: `gunicorn --workers 2 benchmarks.load_app:app`",
    "spyglass": "`gunicorn -c python:spyglass.gunicorn`: every span exported over OTLP/HTTP, HTTP metrics "
    "served by the master, a JSON access-log line per request",
    "spyglass-10pct": "as spyglass, `OTEL_TRACES_SAMPLER=traceidratio`, `OTEL_TRACES_SAMPLER_ARG=0.1`",
    "otel-instrument": "`opentelemetry-instrument gunicorn ...` (zero-code), traces and metrics over OTLP/HTTP",
    "prometheus-flask-exporter": "`GunicornPrometheusMetrics(app)` with its multi-process gunicorn hooks",
    "floor": "the app wrapped by the floor only (`benchmarks/floor.py`): an SDK span exported over OTLP/HTTP by "
    "the SDK's exporter, a histogram observation in prometheus_client's multi-process directory, a structlog bind",
}
SAMPLED_SHARE = {"spyglass": 1.0, "spyglass-10pct": 0.1, "otel-instrument": 1.0, "floor": 1.0}
"""The share of requests whose SERVER span a variant exports (variants without traces are absent)."""
_CLEARED_PREFIXES = ("OTEL_", "SPYGLASS_", "BENCH_")
_CLEARED_NAMES = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
DASH = "\u2013"
TIMES = "\u00d7"


@dataclass
class Run:
    """One repetition of one variant: what wrk saw and what the server and backends did."""

    served: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu_us: float
    request_thread_cpu_us: float
    spans: int | None
    counted: float | None

    @property
    def throughput(self) -> float:
        """Requests per second over the timed phase."""
        return self.requests / self.seconds


@dataclass
class VariantResult:
    """Every repetition of one variant."""

    name: str
    runs: list[Run] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        """The median over the repetitions of one :class:`Run` attribute."""
        return statistics.median(getattr(run, attribute) for run in self.runs)

    def values(self, attribute: str) -> list[float]:
        """One :class:`Run` attribute over the repetitions."""
        return [getattr(run, attribute) for run in self.runs]


@dataclass
class Server:
    """A running gunicorn of one variant and what is needed to read its telemetry."""

    process: subprocess.Popen
    port: int
    metrics_port: int | None
    workdir: Path


def _clean_environment() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_CLEARED_PREFIXES) and key not in _CLEARED_NAMES
    }


def variant_command(name: str, port: int, workers: int = 2, timeout_s: int = 30) -> list[str]:
    """The command line serving variant ``name`` on 127.0.0.1:``port`` (``timeout_s``: gunicorn's worker timeout)."""
    bin_dir = Path(sys.executable).parent
    gunicorn = [
        str(bin_dir / "gunicorn"),
        "--workers",
        str(workers),
        "--timeout",
        str(timeout_s),
        "--bind",
        f"127.0.0.1:{port}",
    ]
    app = "benchmarks.load_app:app"
    if name.startswith("spyglass"):
        return [*gunicorn, "--config", "python:spyglass.gunicorn", app]
    if name == "otel-instrument":
        return [str(bin_dir / "opentelemetry-instrument"), *gunicorn, app]
    if name == "prometheus-flask-exporter":
        return [*gunicorn, "--config", "python:benchmarks.load_gunicorn_pfe", app]
    return [*gunicorn, app]


def variant_environment(name: str, workdir: Path, sink: str, metrics_port: int) -> dict[str, str]:
    """The environment of variant ``name``: the caller's, without telemetry settings, plus the variant's own."""
    environment = _clean_environment()
    environment["PYTHONPATH"] = str(ROOT)
    if name.startswith("spyglass"):
        environment.update(
            {
                "OTEL_SERVICE_NAME": "bench",
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
                "OTEL_TRACES_SAMPLER": "always_on",
                "SPYGLASS_METRICS_PORT": str(metrics_port),
                "SPYGLASS_METRICS_DIR": str(workdir / "metrics"),
            }
        )
        if name == "spyglass-10pct":
            environment.update({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"})
    elif name == "otel-instrument":
        environment.update(
            {
                "OTEL_SERVICE_NAME": "bench",
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_LOGS_EXPORTER": "none",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
                "OTEL_SEMCONV_STABILITY_OPT_IN": "http",
            }
        )
    elif name == "floor":
        directory = workdir / "prometheus-multiproc"
        directory.mkdir()
        environment.update(
            {
                "BENCH_FLOOR": "1",
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
                "PROMETHEUS_MULTIPROC_DIR": str(directory),
            }
        )
    elif name == "prometheus-flask-exporter":
        directory = workdir / "prometheus-multiproc"
        directory.mkdir()
        environment.update(
            {
                "BENCH_PROMETHEUS_FLASK_EXPORTER": "1",
                "BENCH_PFE_METRICS_PORT": str(metrics_port),
                "PROMETHEUS_MULTIPROC_DIR": str(directory),
            }
        )
    return environment


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """``GET path`` on 127.0.0.1:``port`` over a new connection: the status and the body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def answers(port: int, path: str, timeout: float = 1.0) -> bool:
    """Whether ``GET path`` answers 200 within ``timeout`` seconds."""
    try:
        return get(port, path, timeout=timeout)[0] == 200
    except OSError:
        return False


@contextlib.contextmanager
def sink_process() -> Iterator[str]:
    """Run :mod:`benchmarks.otlp_sink` for the whole benchmark; yield its OTLP endpoint."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.otlp_sink", "--port", str(port)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not wait_until(lambda: answers(port, "/counts"), 30, process=process):
            raise BenchmarkError("the OTLP sink did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


def sink_spans(sink: str) -> int:
    """The spans the sink has received so far."""
    status, body = get(int(sink.rsplit(":", 1)[1]), "/counts")
    if status != 200:
        raise BenchmarkError(f"the OTLP sink answered {status}")
    return int(json.loads(body)["spans"])


@contextlib.contextmanager
def gunicorn(name: str, sink: str) -> Iterator[Server]:
    """Start variant ``name`` in a process group of its own; stop it (and every worker) afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"bench-load-{name}-") as directory:
        workdir = Path(directory)
        port, metrics_port = free_port(), free_port()
        output = (workdir / "server.log").open("wb")
        process = subprocess.Popen(
            variant_command(name, port),
            cwd=ROOT,
            env=variant_environment(name, workdir, sink, metrics_port),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        has_endpoint = name.startswith("spyglass") or name == "prometheus-flask-exporter"
        server = Server(process, port, metrics_port if has_endpoint else None, workdir)
        try:
            try:
                started = wait_until(lambda: answers(port, PATH), 60, process=process)
            except BenchmarkError as exc:
                raise BenchmarkError(f"{name}: {exc}\n{log_tail(workdir)}") from exc
            if not started:
                raise BenchmarkError(f"{name}: gunicorn did not answer within 60 s\n{log_tail(workdir)}")
            yield server
        finally:
            stop_server(process)
            output.close()


def log_tail(workdir: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of the server's log in ``workdir`` (empty if it cannot be read)."""
    try:
        return "\n".join((workdir / "server.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_server(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Graceful stop (SIGTERM: workers finish and flush, for ``timeout_s``), then SIGKILL what is left of the group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=10)


@dataclass(frozen=True)
class ServerCpu:
    """CPU seconds (user + system) a gunicorn server has used so far, and the part its request threads used."""

    total: float
    """The master and every worker, all their threads (exited threads included)."""
    request_threads: float
    """The main thread of each live worker, where a sync worker accepts, parses and serves its requests."""

    def __sub__(self, earlier: ServerCpu) -> ServerCpu:
        return ServerCpu(self.total - earlier.total, self.request_threads - earlier.request_threads)


def server_cpu_seconds(server: Server) -> ServerCpu:
    """CPU used so far by the master and its live workers, with the workers' main threads apart."""
    total = request_threads = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        master = psutil.Process(server.process.pid)
        for process in [master, *master.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
                if process.pid == master.pid:
                    continue
                for thread in process.threads():
                    if thread.id == process.pid:
                        request_threads += thread.user_time + thread.system_time
    return ServerCpu(total, request_threads)


def run_wrk(port: int, seconds: float, connections: int) -> dict[str, int]:
    """Load ``GET PATH`` with wrk for ``seconds``; wrk's measurements (see benchmarks/wrk_report.lua)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchmarkError("wrk is not installed (Debian package wrk; `make bench` installs it)")
    command = [
        wrk,
        "--threads",
        "1",
        "--connections",
        str(connections),
        "--duration",
        f"{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "--script",
        str(ROOT / "benchmarks" / "wrk_report.lua"),
        f"http://127.0.0.1:{port}{PATH}",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if completed.returncode != 0:
        raise BenchmarkError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()}")
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchmarkError(f"wrk printed no result:\n{completed.stdout}")
    return json.loads(lines[-1])


def _scrape_count(server: Server, name: str) -> float | None:
    """Requests the variant's own metrics endpoint counts for the route, or ``None`` without an endpoint."""
    if server.metrics_port is None:
        return None
    status, body = get(server.metrics_port, "/metrics")
    if status != 200:
        raise BenchmarkError(f"{name}: the metrics endpoint answered {status}")
    wanted = (
        "http_server_request_duration_seconds" if name.startswith("spyglass") else "flask_http_request_duration_seconds"
    )
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        if family.name != wanted:
            continue
        for sample in family.samples:
            if sample.name == f"{wanted}_count":
                total += sample.value
    return total


def measure_variant(name: str, sink: str, warmup: float, duration: float, connections: int) -> Run:
    """Start variant ``name``, warm it up, load it for ``duration`` seconds and check its telemetry.

    ``spans`` and ``counted`` cover the server's whole life, so they are compared with every request
    it served: the warm-up's and the timed phase's (plus the one request that found it ready).
    """
    spans_before = sink_spans(sink) if name in SAMPLED_SHARE else None
    with gunicorn(name, sink) as server:
        warm = run_wrk(server.port, warmup, connections)
        cpu_before = server_cpu_seconds(server)
        result = run_wrk(server.port, duration, connections)
        cpu_used = server_cpu_seconds(server) - cpu_before
        counted = _scrape_count(server, name)
    # The server is stopped: its exporters have flushed what they still held.
    spans = None if spans_before is None else sink_spans(sink) - spans_before
    errors = sum(result[key] for key in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    requests = result["requests"]
    return Run(
        served=warm["requests"] + requests + 1,
        requests=requests,
        seconds=result["duration_us"] / 1e6,
        p50_ms=result["p50_us"] / 1e3,
        p99_ms=result["p99_us"] / 1e3,
        errors=errors,
        server_cpu_us=cpu_used.total / max(requests, 1) * 1e6,
        request_thread_cpu_us=cpu_used.request_threads / max(requests, 1) * 1e6,
        spans=spans,
        counted=counted,
    )


def run_benchmark(
    variants: Sequence[str], repetitions: int, warmup: float, duration: float, connections: int
) -> list[VariantResult]:
    """Measure every variant ``repetitions`` times, interleaved."""
    results = {name: VariantResult(name) for name in variants}
    with sink_process() as sink:
        for repetition in range(1, repetitions + 1):
            for name in variants:
                run = measure_variant(name, sink, warmup, duration, connections)
                results[name].runs.append(run)
                print(
                    f"rep {repetition} {name:<26} {run.throughput:8.0f} req/s  p50 {run.p50_ms:6.2f} ms  "
                    f"p99 {run.p99_ms:6.2f} ms  server CPU {run.server_cpu_us:6.0f} µs/req "
                    f"(request threads {run.request_thread_cpu_us:4.0f})  errors {run.errors}",
                    file=sys.stderr,
                    flush=True,
                )
    return list(results.values())


def _telemetry_cell(result: VariantResult) -> str:
    """What the backends got over the server's life, as a share of the requests it served."""
    if result.name in SAMPLED_SHARE:
        shares = [run.spans / run.served for run in result.runs if run.spans is not None]
        return f"spans: {statistics.median(shares):.1%} of requests" if shares else DASH
    shares = [run.counted / run.served for run in result.runs if run.counted is not None]
    return f"counted: {statistics.median(shares):.1%} of requests" if shares else DASH


def render_table(results: Sequence[VariantResult]) -> str:
    """The Markdown table of every variant, with ratios to the uninstrumented server."""
    base = next(result for result in results if result.name == BASELINE)
    lines = [
        f"| Variant | Requests/s: median (min{DASH}max) | {TIMES} none (of medians) "
        f"| {TIMES} none per repetition: median (min{DASH}max) | Noise | p50 ms | p99 ms "
        f"| Server CPU µs/req | {TIMES} none | On request threads µs/req | Errors | Telemetry received |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        throughput = result.values("throughput")
        cpu = result.median("server_cpu_us")
        on_request_threads = result.median("request_thread_cpu_us")
        paired = (
            DASH if result is base else report.ratio_spread(report.paired_ratios(throughput, base.values("throughput")))
        )
        lines.append(
            f"| {result.name} | {statistics.median(throughput):,.0f} "
            f"({min(throughput):,.0f}{DASH}{max(throughput):,.0f}) "
            f"| {result.median('throughput') / base.median('throughput'):.2f} | {paired} | {report.noise(throughput)} "
            f"| {result.median('p50_ms'):.2f} | {result.median('p99_ms'):.2f} "
            f"| {cpu:,.0f} | {cpu / base.median('server_cpu_us'):.2f} "
            f"| {on_request_threads:,.0f} ({on_request_threads / cpu:.0%}) "
            f"| {sum(result.values('errors')):,.0f} | {_telemetry_cell(result)} |"
        )
    return "\n".join(lines)


def figures(results: Sequence[VariantResult]) -> list[report.Figure]:
    """The summary figures: each instrumented variant's throughput, p99 and their ratios to ``none``."""
    by_name = {result.name: result for result in results}
    base = by_name.get(BASELINE)
    out = []
    for result in results:
        throughput = result.values("throughput")
        ratio = result.median("throughput") / base.median("throughput") if base else None
        is_target = result.name == TARGET_VARIANT
        out.append(
            report.Figure(
                benchmark="HTTP, gunicorn 2 workers",
                measure=f"requests/s, {result.name}",
                value=f"{result.median('throughput'):,.0f} req/s (p50 {result.median('p50_ms'):.2f} ms, "
                f"p99 {result.median('p99_ms'):.2f} ms)",
                ratio=None if result is base else ratio,
                against="" if result is base else "none",
                noise=report.noise(throughput),
                target=f"at least {TARGET_RATIO} {TIMES} none" if is_target else None,
                met=(ratio is not None and ratio >= TARGET_RATIO) if is_target else None,
            )
        )
    return out


def target_verdict(results: Sequence[VariantResult]) -> str:
    """Whether spyglass at 100% sampling kept at least :data:`TARGET_RATIO` of the throughput."""
    by_name = {result.name: result for result in results}
    if BASELINE not in by_name or TARGET_VARIANT not in by_name:
        return "target not measured"
    ratio = by_name[TARGET_VARIANT].median("throughput") / by_name[BASELINE].median("throughput")
    return (
        f"{TARGET_VARIANT} keeps {ratio:.2f} of the throughput: target {'met' if ratio >= TARGET_RATIO else 'missed'}"
    )


def render_section(
    results: Sequence[VariantResult], repetitions: int, warmup: float, duration: float, connections: int
) -> str:
    """Render the ``http-load`` section of docs/performance.md."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    wrk_line = (
        (wrk_version.stdout or wrk_version.stderr).splitlines()[0]
        if (wrk_version.stdout or wrk_version.stderr)
        else "wrk"
    )
    return "\n".join(
        [
            "<!-- Generated by `make bench` (python -m benchmarks.http_load). Do not edit: rerun it instead. -->",
            "",
            "# Performance: a real gunicorn under load",
            "",
            f"Measured {now}: {repetitions} repetitions per variant, interleaved, each a fresh "
            f"`gunicorn --workers 2` loaded by wrk over {connections} connections for {warmup:.0f} s "
            f"(not counted) then {duration:.0f} s.",
            "",
            render_table(results),
            "",
            f"**Key figure: {target_verdict(results)} (at least {TARGET_RATIO:.2f}).**",
            "",
            "## Machine",
            "",
            *report.machine_lines(PACKAGES, [f"- Load generator: {wrk_line.strip()}, on the same machine"]),
            "",
            "## Variants",
            "",
            *(f"- `{result.name}`: {DESCRIPTIONS[result.name]}" for result in results),
            "",
            "## Method",
            "",
            "The app is `benchmarks/load_app.py`: `GET /items/<int:item_id>` returns a 42-byte JSON document, so "
            "the server does little besides HTTP and the instrumentation (the worst case for relative "
            "overhead). gunicorn runs 2 sync workers (its default worker class: one connection at a time, "
            "closed after each response) on 127.0.0.1; wrk (1 thread) keeps the connections busy, so the "
            "figures are the server's capacity on this 2-CPU machine shared with wrk. Latency is wrk's, "
            "from the closed loop at that concurrency: it includes waiting in gunicorn's accept queue. "
            "*Server CPU* is the user and system CPU time of gunicorn's master and workers during the timed "
            "phase (read from the kernel), per request: what the instrumentation costs whatever the CPU "
            "count. *On request threads* is the part of it spent on the workers' main threads, where "
            "gunicorn's sync workers accept, parse and serve requests (in brackets, its share of the "
            "server CPU): what adds to a request's latency. The rest is the master and the threads an "
            "instrumentation runs beside them (exporting spans and log lines, flushing the access log), "
            "off the request's path. "
            "Traces go over OTLP/HTTP (protobuf) to `benchmarks/otlp_sink.py`, a separate process "
            "that decodes and counts the spans, so export is paid for as in production; after each run "
            "the server is stopped gracefully (its exporters flush) and the spans received are compared "
            "with the requests served, and the variants with a Prometheus endpoint are scraped once for the "
            "requests they counted. spyglass's access log (one JSON line per request) goes to a file. "
            "gunicorn runs in a session of its own, as under a process manager, so that the kernel "
            "schedules it as its own group against wrk and the benchmark (Linux autogroups); started in "
            "the load generator's session instead, every thread of the machine competes as one group, "
            "and the instrumented variants, whose workers run export threads beside the request thread, "
            "lose far more throughput than none does. "
            "Medians are over the repetitions; noise is half the range of requests/s as a share of the "
            "median. The variants run interleaved (every variant once, then again), so the per-repetition "
            "ratio divides each repetition's requests/s by none's of the same repetition, which cancels "
            "the machine's drift between repetitions; the target is read on the ratio of the medians. "
            "Rerun with `make bench` (or `.venv/bin/python -m benchmarks.http_load --help`).",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the section and write it; non-zero only if a measurement failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=5, help="fresh servers per variant (default 5)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load not counted (default 3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of timed load (default 10)")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    parser.add_argument(
        "--variants", nargs="+", choices=list(DESCRIPTIONS), default=list(DESCRIPTIONS), help="variants to measure"
    )
    report.add_section_options(parser)
    args = parser.parse_args(argv)
    if args.repetitions < 1 or args.duration < 1 or args.connections < 1 or args.warmup < 1:
        parser.error("--repetitions, --warmup, --duration and --connections must be at least 1")
    variants = [BASELINE, *(name for name in args.variants if name != BASELINE)]
    try:
        results = run_benchmark(variants, args.repetitions, args.warmup, args.duration, args.connections)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    section = render_section(results, args.repetitions, args.warmup, args.duration, args.connections)
    status = report.publish_section(SECTION, section, args.output, not args.no_write, figures(results), args.figures)
    print(target_verdict(results), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
