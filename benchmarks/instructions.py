"""Instructions executed per request (or per task), counted by valgrind: a noise-free companion to CPU time.

CPU time on a shared virtual machine varies by tens of percent between runs; the number of
instructions a process executes does not. Each variant runs twice under
``valgrind --tool=callgrind`` (every thread counted, so background export is included), serving
``small`` and then ``large`` timed requests (or running that many tasks, with
:mod:`benchmarks.task_overhead`); the difference divided by ``large - small`` is the per-request
count, free of start-up, warm-up and shutdown costs that both runs share.

Instructions are not time (a cache miss costs more than an add), so this does not replace the CPU
measurement; it shows whether a difference in CPU time is real.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import task_overhead
from benchmarks.http_overhead import variant_environment

__all__ = [
    "HTTP_MODULE",
    "TASK_MODULE",
    "InstructionCountError",
    "measure_variants",
    "per_extra_unit",
    "valgrind_available",
    "variant_variables",
]

ROOT = Path(__file__).resolve().parent.parent
HTTP_MODULE = "benchmarks.http_overhead"
"""Measures requests through the Flask app (its variants: :data:`benchmarks.http_overhead.VARIANTS`)."""
TASK_MODULE = "benchmarks.task_overhead"
"""Measures no-op tasks through Celery's task tracer (its variants: :data:`benchmarks.task_overhead.VARIANTS`)."""
_COLLECTED = re.compile(rb"Collected\s*:\s*(\d+)")
_TIMEOUT_S = 1800


class InstructionCountError(Exception):
    """valgrind failed or printed no instruction count."""


def valgrind_available() -> bool:
    """Whether ``valgrind`` is on the PATH."""
    return shutil.which("valgrind") is not None


def variant_variables(module: str, variant: str, workdir: str) -> dict[str, str]:
    """The variables a measurement process of ``module`` starts with for ``variant``.

    Spans go to ``workdir/traces.jsonl``; a task process also gets ``workdir/metrics`` (created
    here) as its multi-process metrics directory, as a pool process has one.
    """
    traces_file = os.path.join(workdir, "traces.jsonl")
    if module == TASK_MODULE:
        metrics_dir = os.path.join(workdir, "metrics")
        os.makedirs(metrics_dir, exist_ok=True)
        return task_overhead.variant_environment(variant, traces_file, metrics_dir)
    return variant_environment(variant, traces_file)


def _count_total(
    variant: str, requests: int, warmup: int, environment: dict[str, str], module: str = HTTP_MODULE
) -> int:
    """Instructions executed by one whole measurement process of ``module`` serving ``requests`` timed units."""
    with tempfile.TemporaryDirectory(prefix=f"instr-{variant}-") as workdir:
        traces_file = os.path.join(workdir, "traces.jsonl")
        command = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            module,
            variant,
            "--traces-file",
            traces_file,
            "--result",
            os.path.join(workdir, "result.json"),
            "--warmup",
            str(warmup),
            "--requests",
            str(requests),
        ]
        env = dict(environment)
        env.update(variant_variables(module, variant, workdir))
        completed = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=_TIMEOUT_S,
            check=False,
        )
    match = _COLLECTED.search(completed.stderr)
    if completed.returncode != 0 or match is None:
        tail = completed.stderr.decode("utf-8", "replace").strip().splitlines()[-15:]
        raise InstructionCountError(f"{variant}: valgrind exit status {completed.returncode}:\n" + "\n".join(tail))
    return int(match.group(1))


def per_extra_unit(
    count: Callable[[str, int], int],
    variants: Sequence[str],
    small: int,
    large: int,
    parallel: int = os.cpu_count() or 1,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, float]:
    """(``count(name, large)`` - ``count(name, small)``) / (large - small) for every variant name.

    ``count`` runs one whole measurement under valgrind; ``parallel`` of them run at a time
    (valgrind runs a process's threads on one core).
    """
    if large <= small:
        raise ValueError("large must exceed small")
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        jobs = {(name, size): pool.submit(count, name, size) for name in variants for size in (small, large)}
        counts = {}
        for name in variants:
            counts[name] = (jobs[name, large].result() - jobs[name, small].result()) / (large - small)
            if progress is not None:
                progress(name, counts[name])
    return counts


def measure_variants(
    variants: Sequence[str],
    environment: dict[str, str],
    small: int = 500,
    large: int = 2_500,
    warmup: int = 200,
    parallel: int = os.cpu_count() or 1,
    progress: Callable[[str, float], None] | None = None,
    module: str = HTTP_MODULE,
) -> dict[str, float]:
    """Instructions per request (per task for :data:`TASK_MODULE`) of every variant of ``module``.

    (count at ``large`` - count at ``small``) / (large - small).
    """
    return per_extra_unit(
        lambda name, size: _count_total(name, size, warmup, environment, module),
        variants,
        small,
        large,
        parallel,
        progress,
    )
