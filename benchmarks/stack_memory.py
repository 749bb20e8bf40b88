"""Memory of the native stack (`make demo`) under load, per service.

    python -m benchmarks.stack_memory [--seconds 90] [--rate 10]

Starts ``python -m demo_app.native`` on free ports (the shop under gunicorn with 2 workers, a
prefork Celery worker with 2 pool processes, beat, Prometheus, Alertmanager, the alert sink and the
load generator at ``--rate`` requests per second), lets it run ``--seconds``, then measures every
service's process tree: the sum of PSS (proportional set size: pages shared between a gunicorn
master and its forked workers are split between them rather than counted once per process) and,
for comparison, of RSS. The load generator runs inside the demo's own process and is reported as
``demo runner (load)``. Writes the section ``stack-memory`` of docs/stack.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.report import cpu_model, write_section
from demo_app.native import PORT_VARIABLES
from tests.conftest import REPO, clean_environment, free_port


def _service_name(process: psutil.Process) -> str:
    command = " ".join(process.cmdline())
    for marker, name in (
        ("gunicorn", "web (gunicorn, 2 workers)"),
        ("worker --pool", "worker (Celery prefork, 2 pool processes)"),
        (" beat ", "beat"),
        ("prometheus-alertmanager", "Alertmanager"),
        ("alert_sink", "alert sink"),
        ("redis-server", "Redis"),
        ("prometheus", "Prometheus"),
    ):
        if marker in command:
            return name
    return command[:40]


def _tree_memory(process: psutil.Process) -> tuple[int, int, int]:
    """(PSS, RSS, process count) of ``process`` and its descendants."""
    pss = rss = count = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            info = member.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += getattr(info, "pss", info.rss)
        rss += info.rss
        count += 1
    return pss, rss, count


def measure(seconds: float, rate: float) -> list[tuple[str, int, int, int]]:
    """Run the native demo and return (service, PSS, RSS, processes) per service."""
    with tempfile.TemporaryDirectory(prefix="spyglass-memory-") as var:
        env = clean_environment(
            DEMO_VAR_DIR=var, DEMO_SECONDS=str(seconds + 60), DEMO_RATE=str(rate), DEMO_ADMIN_TOKEN="benchmark"
        )
        env.update({name: str(free_port()) for name in PORT_VARIABLES})
        demo = subprocess.Popen(
            [sys.executable, "-m", "demo_app.native"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert demo.stdout is not None
            for line in demo.stdout:
                if "Where to look" in line:
                    break
            else:
                raise SystemExit("the demo did not start")
            time.sleep(seconds)
            root = psutil.Process(demo.pid)
            rows = []
            for child in root.children():
                pss, rss, count = _tree_memory(child)
                rows.append((_service_name(child), pss, rss, count))
            own = root.memory_full_info()
            rows.append(("demo runner (load)", getattr(own, "pss", own.rss), own.rss, 1))
            return sorted(rows, key=lambda row: -row[1])
        finally:
            demo.terminate()
            demo.wait(60)


def render(rows: list[tuple[str, int, int, int]], seconds: float, rate: float) -> str:
    mib = 1024 * 1024
    lines = [
        f"Measured by `python -m benchmarks.stack_memory` on {datetime.date.today().isoformat()}: "
        f"`make demo` after {seconds:.0f} s at {rate:g} requests per second, on {cpu_model()} "
        f"({os.cpu_count()} cores).",
        "",
        "| Service (native) | PSS MiB | RSS MiB | Processes |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {pss / mib:.0f} | {rss / mib:.0f} | {count} |" for name, pss, rss, count in rows]
    total_pss = sum(row[1] for row in rows)
    total_rss = sum(row[2] for row in rows)
    lines.append(f"| **total** | **{total_pss / mib:.0f}** | {total_rss / mib:.0f} | {sum(r[3] for r in rows)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stack_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="load before measuring (%(default)s)")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second (%(default)s)")
    parser.add_argument("--output", type=Path, default=REPO / "docs/stack.md", help="report file (%(default)s)")
    args = parser.parse_args(argv)
    rows = measure(args.seconds, args.rate)
    body = render(rows, args.seconds, args.rate)
    print(body)
    write_section(args.output, "stack-memory", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
