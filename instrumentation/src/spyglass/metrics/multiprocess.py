"""Multi-process metric storage: one directory shared by a serving process and its workers.

prometheus_client keeps each worker's values in memory-mapped files named after its pid. This
module owns the life cycle of that directory: it is created and emptied when the service starts,
switched on for prometheus_client even when that library was imported first, and compacted when
a worker exits, so that recycling workers (gunicorn ``max_requests``, Celery
``max_tasks_per_child``) neither makes counters go backwards nor fills the directory with files
that slow every scrape down.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import mark_process_dead

__all__ = [
    "ARCHIVE_ID",
    "ExitedProcessCompactor",
    "compact_dead_process",
    "compact_exited_processes",
    "default_directory",
    "enable",
    "is_enabled",
    "prepare_directory",
    "scrape_lock",
]

ARCHIVE_ID = "archive"
"""Stands where a pid would in the file names that hold the values of exited processes."""

# Value files whose samples add up across processes, so an exited process can be folded in.
_ADDITIVE_PREFIXES = ("counter", "histogram", "summary", "gauge_sum")

_lock = threading.Lock()
_logger = logging.getLogger("spyglass.metrics")
_HEADER_SIZE = 8  # a value file starts with the number of its bytes in use


@contextmanager
def scrape_lock() -> Iterator[None]:
    """Hold while reading the directory, so a scrape never sees a compaction half done."""
    with _lock:
        yield


def default_directory(service_name: str) -> str:
    """A per-service, per-serving-process directory under the system temporary directory."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in service_name)
    return os.path.join(tempfile.gettempdir(), f"spyglass-metrics-{safe}-{os.getpid()}")


def prepare_directory(path: str) -> str:
    """Create ``path`` if needed and remove the files a previous run left in it."""
    os.makedirs(path, exist_ok=True)
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)
    return path


def enable(path: str) -> None:
    """Store this process's (and its children's) metric values in ``path``.

    Works even when prometheus_client was imported before the variable was set: its value class
    is chosen at import, so it is replaced here. Metrics created afterwards are multi-process.
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()


def is_enabled() -> bool:
    """Whether metric values of this process go to a multi-process directory."""
    return bool(getattr(values.ValueClass, "_multiprocess", False)) and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def compact_dead_process(pid: int, path: str) -> None:
    """Fold the values of exited process ``pid`` into the archive files and delete its files.

    Counters and histograms keep their totals (Prometheus sees no reset), live gauges drop the
    process, and the directory holds one file per kind of value for all exited processes together.
    Only the serving process may call it (the lock that keeps scrapes consistent is its own).
    """
    with _lock:
        _compact(pid, path)


def compact_exited_processes(path: str) -> list[int]:
    """Fold in every process that left files in ``path`` and no longer exists; return their pids.

    Covers processes nobody reported: pool processes that exited on their own (Celery's
    ``max_tasks_per_child``) or were killed. The serving process calls it before each scrape.
    """
    exited = [pid for pid in _pids_with_files(path) if not _alive(pid)]
    if exited:
        with _lock:
            for pid in exited:
                _compact(pid, path)
    return exited


_PID_IN_NAME = re.compile(r"_(\d+)\.(?:db|exm)$")


def _pids_with_files(path: str) -> set[int]:
    pids = set()
    for entry in os.scandir(path):
        match = _PID_IN_NAME.search(entry.name)
        if match:
            pids.add(int(match.group(1)))
    return pids


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _compact(pid: int, path: str) -> None:
    from spyglass.metrics.exemplars import merge_exemplar_file

    mark_process_dead(pid, path)
    for prefix in _ADDITIVE_PREFIXES:
        dead = os.path.join(path, f"{prefix}_{pid}.db")
        if not os.path.exists(dead):
            continue
        if os.path.getsize(dead) < _HEADER_SIZE:  # died while creating it: nothing recorded
            os.unlink(dead)
            continue
        archive = MmapedDict(os.path.join(path, f"{prefix}_{ARCHIVE_ID}.db"))
        try:
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(dead):
                current, _ = archive.read_value(key)
                archive.write_value(key, current + value, 0.0)
        finally:
            archive.close()
        os.unlink(dead)
    merge_exemplar_file(pid, path)


class ExitedProcessCompactor:
    """Folds in exited processes every ``interval`` seconds, from a daemon thread of the serving process.

    Keeps scrapes cheap however many processes have lived: a scrape reads the files of the live
    processes and one archive file per kind of value, and never does the folding itself.
    """

    def __init__(self, path: str, interval: float = 1.0) -> None:
        self._path = path
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spyglass-metrics-compactor", daemon=True)

    def start(self) -> ExitedProcessCompactor:
        """Start the thread; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (a last pass runs first)."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self._pass()
        self._pass()

    def _pass(self) -> None:
        try:
            compact_exited_processes(self._path)
        except OSError as exc:  # a vanished directory at shutdown, a full disk: try again later
            _logger.warning("could not fold in exited processes", extra={"error": str(exc)})
