"""Multi-process metric storage: one directory shared by a serving process and its workers.

prometheus_client keeps each worker's values in memory-mapped files named after its pid. This
module owns the life cycle of that directory: it is created and emptied when the service starts,
switched on for prometheus_client even when that library was imported first, and compacted when
a worker exits, so that recycling workers (gunicorn ``max_requests``, Celery
``max_tasks_per_child``) neither makes counters go backwards nor fills the directory with files
that slow every scrape down.
"""

from __future__ import annotations

import os
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
    "compact_dead_process",
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
    """
    from spyglass.metrics.exemplars import merge_exemplar_file

    with _lock:
        mark_process_dead(pid, path)
        for prefix in _ADDITIVE_PREFIXES:
            dead = os.path.join(path, f"{prefix}_{pid}.db")
            if not os.path.exists(dead):
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
