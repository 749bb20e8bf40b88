"""docs/performance.md, one section per benchmark, and the machine notes every section carries.

Each benchmark owns one section of the report, between two HTML comment markers::

    <!-- bench:NAME:begin -->
    ...
    <!-- bench:NAME:end -->

:func:`write_section` replaces what is between one pair of markers and leaves the rest of the
file as it is (other benchmarks' sections and any text outside the markers). A section not yet in
the file is inserted in the order of :data:`SECTIONS`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

__all__ = [
    "DEFAULT_OUTPUT",
    "SECTIONS",
    "Figure",
    "ReportError",
    "add_section_options",
    "cpu_model",
    "machine_lines",
    "noise",
    "p95",
    "package_version",
    "paired_ratios",
    "publish_section",
    "ratio_spread",
    "read_figures",
    "read_section",
    "replace_section",
    "source_revision",
    "write_figures",
    "write_section",
]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "performance.md"
SECTIONS = (
    "summary",
    "http-load",
    "http-instructions",
    "http",
    "celery-throughput",
    "celery-scrape",
    "scrape-size",
    "logs",
)
"""The sections of docs/performance.md, in the order they appear."""
PREAMBLE = (
    "<!-- Each benchmark of `make bench` writes only its own section of this file, between its "
    "bench:NAME:begin and bench:NAME:end markers; do not edit inside the markers, rerun the benchmark. -->\n"
)


class ReportError(Exception):
    """The report file's markers are missing their pair, repeated or out of order."""


@dataclass(frozen=True)
class Figure:
    """One line of the summary table that ``make bench`` prints: a measured figure and its ratio.

    ``value`` is the formatted median (``"1,234 req/s"``); ``ratio`` divides it by what ``against``
    names (``"uninstrumented"``, ``"the floor"``, ``"prometheus-flask-exporter"``...), so that a
    reader sees at once how far from its reference spyglass is; ``noise`` says how much the
    repetitions spread (``"±3%"``, ``"1.1 to 1.4"``). ``target`` is the goal in words and
    ``met`` whether this run reached it (both ``None`` when the figure has no goal).
    """

    benchmark: str
    measure: str
    value: str
    ratio: float | None = None
    against: str = ""
    noise: str = ""
    target: str | None = None
    met: bool | None = None


def write_figures(path: Path, figures: Sequence[Figure]) -> None:
    """Store one benchmark's summary figures as JSON at ``path`` (read back by :func:`read_figures`)."""
    path.write_text(json.dumps([asdict(figure) for figure in figures], indent=1), encoding="utf-8")


def read_figures(path: Path) -> list[Figure]:
    """The figures :func:`write_figures` stored at ``path``."""
    return [Figure(**item) for item in json.loads(path.read_text(encoding="utf-8"))]


def paired_ratios(values: Sequence[float], base: Sequence[float]) -> list[float]:
    """Each repetition's value divided by the base's of the same repetition.

    The variants of a benchmark run interleaved (every variant once, then again), so the
    repetitions of the same index ran side by side; their ratio cancels the drift of the machine
    between repetitions that the ratio of two medians keeps.
    """
    if len(values) != len(base):
        raise ValueError(f"{len(values)} repetitions cannot be paired with {len(base)}")
    return [value / reference for value, reference in zip(values, base, strict=True)]


def ratio_spread(ratios: Sequence[float]) -> str:
    """Ratios as their median and range: ``0.86 (0.80\u20130.92)``."""
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}\u2013{max(ratios):.2f})"


def noise(values: Sequence[float]) -> str:
    """How much repeated measurements spread: half their range as a share of their median (``±4%``).

    Half the range (not a standard deviation) because a handful of repetitions is what a
    benchmark run affords, and the range is what a reader can check against the table.
    """
    if len(values) < 2:
        return "one run"
    middle = statistics.median(values)
    if middle == 0:
        return "n/a"
    return f"\u00b1{(max(values) - min(values)) / 2 / abs(middle):.0%}"


def p95(values: Sequence[float]) -> float:
    """The 95th percentile of ``values`` (inclusive method: within the measured range)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def _begin(name: str) -> str:
    return f"<!-- bench:{name}:begin -->"


def _end(name: str) -> str:
    return f"<!-- bench:{name}:end -->"


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ValueError(f"section name {name!r} must be lowercase letters, digits and dashes")


def _span(text: str, name: str) -> tuple[int, int] | None:
    """Where the section ``name`` (markers included) is in ``text``; ``None`` if it is not there."""
    begin, end = _begin(name), _end(name)
    begins, ends = text.count(begin), text.count(end)
    if begins == ends == 0:
        return None
    if begins != 1 or ends != 1:
        raise ReportError(f"section {name!r} needs exactly one {begin} and one {end} (found {begins} and {ends})")
    start, stop = text.index(begin), text.index(end)
    if stop < start:
        raise ReportError(f"section {name!r}: {end} comes before {begin}")
    return start, stop + len(end)


def read_section(path: Path, name: str) -> str | None:
    """The body of section ``name`` (without markers), or ``None`` if the file or section is missing."""
    _check_name(name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    span = _span(text, name)
    if span is None:
        return None
    body = text[span[0] + len(_begin(name)) : span[1] - len(_end(name))]
    return body.removeprefix("\n").removesuffix("\n")


def _insertion_point(text: str, name: str) -> int:
    """Where a new section ``name`` goes: before the first present section that follows it, else at the end."""
    order = list(SECTIONS)
    later = order[order.index(name) + 1 :] if name in order else []
    for other in later:
        span = _span(text, other)
        if span is not None:
            return span[0]
    return len(text)


def replace_section(text: str, name: str, body: str) -> str:
    """Return ``text`` with section ``name`` holding ``body`` (inserted if it was not there)."""
    _check_name(name)
    block = f"{_begin(name)}\n{body.strip(chr(10))}\n{_end(name)}"
    span = _span(text, name)
    if span is not None:
        return text[: span[0]] + block + text[span[1] :]
    at = _insertion_point(text, name)
    before, after = text[:at], text[at:]
    if before and not before.endswith("\n\n"):
        before = before.rstrip("\n") + "\n\n"
    return before + block + ("\n\n" + after.lstrip("\n") if after.strip() else "\n")


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` into section ``name`` of the report at ``path``, leaving everything else as it was.

    The file is created (with a short preamble) if needed and replaced atomically, so an
    interrupted run never leaves half a report.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = PREAMBLE
    updated = replace_section(text, name, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(updated)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cpu_model() -> str:
    """Return the CPU model named by /proc/cpuinfo (or what the platform module knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(package: str) -> str:
    """The installed version of ``package``, or ``not installed``."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def source_revision() -> str:
    """Name the git commit measured, noting uncommitted changes (``unknown`` outside a checkout).

    Changes to the report itself (which a ``make bench`` run writes as it goes) do not count.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(  # the report itself is rewritten section by section during a run
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                f":!{DEFAULT_OUTPUT.relative_to(ROOT)}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} (with uncommitted changes)" if dirty else commit


def machine_lines(packages: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """Describe the machine and software the numbers were measured on, as Markdown list items."""
    versions = ", ".join(f"{package} {package_version(package)}" for package in packages)
    return [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical CPUs",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}",
        f"- Packages: {versions}",
        *extra,
        f"- Source: commit {source_revision()}",
    ]


def add_section_options(parser: argparse.ArgumentParser) -> None:
    """The ``--output`` and ``--no-write`` options of a benchmark that writes one section of the report."""
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the report to update")
    parser.add_argument("--no-write", action="store_true", help="print the section without writing the report")
    parser.add_argument(
        "--figures", type=Path, help="also store the summary figures as JSON here (used by benchmarks.all)"
    )


def publish_section(
    name: str,
    body: str,
    output: Path,
    write: bool,
    figures: Sequence[Figure] = (),
    figures_path: Path | None = None,
) -> int:
    """Print section ``name`` and, if ``write``, put it into the report at ``output``; the exit status.

    With ``figures_path``, the benchmark's summary ``figures`` are stored there too.
    """
    print(body)
    if figures_path is not None:
        write_figures(figures_path, figures)
    if not write:
        return 0
    try:
        write_section(output, name, body)
    except ReportError as exc:
        print(f"cannot write the report: {exc}", file=sys.stderr)
        return 1
    print(f"wrote section {name!r} of {output}", file=sys.stderr)
    return 0
