"""Multi-process metric storage: one directory shared by a serving process and its workers.

prometheus_client keeps each worker's values in memory-mapped files named after its pid. This
module owns the life cycle of that directory: it is created and emptied when the service starts,
switched on for prometheus_client even when that library was imported first, and compacted when
a worker exits, so that recycling workers (gunicorn ``max_requests``, Celery
``max_tasks_per_child``) neither makes counters go backwards nor fills the directory with files
that slow every scrape down.

A full or unwritable directory never stops the service (see ``docs/reliability.md``):

* The pages of every value file are reserved on disk (``posix_fallocate``) before they are
  mapped, with some room to spare: prometheus_client's sparse files would otherwise kill the
  process with ``SIGBUS`` the first time it wrote a new page of a full file system. When a file
  cannot grow, the values it already holds keep being updated; new series (a new label set, or
  all values of a process that cannot create its file) are not stored, and each update they miss
  is counted in ``spyglass_metrics_store_dropped_updates_total``. Every 5 s a process in that
  state checks whether there is room again, and stores new series again if there is.
* The directory unusable at start (cannot be created, read-only, no room): the serving process
  falls back to a private directory under the system temporary directory, and if that fails too,
  to in-memory metrics (the endpoint then serves only the serving process's own metrics).
* Exited processes that cannot be folded in stay as they are (the scrape still reads them) and
  are folded in once there is room.

Each failure is counted by its errno name in ``spyglass_metrics_store_errors_total``, and each
outage is logged once per process (a warning naming the directory and the error) and once more
when it ends. These two counters live in memory shared by the serving process and the processes
it forks, not in the directory, so they are served even when the directory has no room at all.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import shutil
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import values
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import mark_process_dead

from spyglass.catalog import by_name
from spyglass.process_hooks import call_after_fork_in_child

__all__ = [
    "ARCHIVE_ID",
    "ExitedProcessCompactor",
    "ReservedMmapedDict",
    "StoreHealthCollector",
    "compact_dead_process",
    "compact_exited_processes",
    "default_directory",
    "disable",
    "enable",
    "is_enabled",
    "open_directory",
    "prepare_directory",
    "reserve",
    "reserve_holes",
    "scrape_lock",
    "store",
]

ARCHIVE_ID = "archive"
"""Stands where a pid would in the file names that hold the values of exited processes."""

# Value files whose samples add up across processes, so an exited process can be folded in.
_ADDITIVE_PREFIXES = ("counter", "histogram", "summary", "gauge_sum")

_lock = threading.Lock()
_logger = logging.getLogger("spyglass.metrics")
_HEADER_SIZE = 8  # a value file starts with the number of its bytes in use
_INITIAL_SIZE = 1 << 16  # what prometheus_client gives a new value file
_HEADROOM = 1 << 14  # room each value file keeps free: more than a new series needs
_RETRY_S = 5.0  # how long a process in trouble waits before it checks for room again
# Errors of a file system without fallocate (it then gets sparse files, as prometheus_client makes).
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})
_ERROR_TYPES = ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "ENOENT", "ENOTDIR", "EIO", "other")


def reserve(descriptor: int, offset: int, length: int) -> None:
    """Extend the file to ``offset + length`` bytes with every page allocated on disk.

    ``offset`` is the file's current size. A file system without ``fallocate`` gets a sparse
    extension (what prometheus_client does); any other failure leaves the file as it was and
    raises ``OSError``.
    """
    try:
        os.posix_fallocate(descriptor, offset, length)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(descriptor, offset)  # give back what a failed reservation took
        if exc.errno not in _NO_FALLOCATE:
            raise
        os.ftruncate(descriptor, offset + length)


def reserve_holes(descriptor: int) -> None:
    """Allocate every page of an existing file on disk (a sparse file's holes); raises ``OSError``.

    The file's size does not change. Nothing is done on a file system without ``fallocate``.
    """
    size = os.fstat(descriptor).st_size
    if size:
        try:
            os.posix_fallocate(descriptor, 0, size)
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE:
                raise


def _error_type(exc: BaseException) -> str:
    """The errno name of ``exc`` (one of :data:`_ERROR_TYPES`), ``other`` for anything else."""
    number = getattr(exc, "errno", None)
    name = errno.errorcode.get(number, "") if isinstance(number, int) else ""
    return name if name in _ERROR_TYPES else "other"


_SLOTS = 256
_PID = struct.Struct("<q")
_SLOT = struct.Struct(f"<q{1 + len(_ERROR_TYPES)}d")  # pid, dropped updates, errors by type


class _SharedTally:
    """Counters in anonymous shared memory: a process and the children it forks add to them.

    Each process adds only to its own slot (claimed by writing its pid), so no lock is shared
    between processes; the serving process sums every slot. Slots of exited processes stay, so
    the sums never go backwards.
    """

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _SLOTS * _SLOT.size)
        self._lock = threading.Lock()
        call_after_fork_in_child(self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def _slot(self, pid: int) -> int | None:
        for step in range(_SLOTS):
            offset = ((pid + step) % _SLOTS) * _SLOT.size
            owner = _PID.unpack_from(self._map, offset)[0]
            if owner == 0:
                self._map[offset : offset + _PID.size] = _PID.pack(pid)
                owner = _PID.unpack_from(self._map, offset)[0]
            if owner == pid:
                return offset
        return None  # more processes than slots: this one goes uncounted

    def add(self, field: int, amount: float) -> None:
        """Add ``amount`` to ``field`` (0: dropped updates, 1 + i: errors of type i) of this process."""
        with self._lock:
            offset = self._slot(os.getpid())
            if offset is None:
                return
            fields = list(_SLOT.unpack_from(self._map, offset))
            fields[1 + field] += amount
            self._map[offset : offset + _SLOT.size] = _SLOT.pack(*fields)

    def add_error(self, exc: BaseException) -> None:
        """Count one failure, by its errno name."""
        self.add(1 + _ERROR_TYPES.index(_error_type(exc)), 1)

    def totals(self) -> list[float]:
        """Every field summed over all slots."""
        sums = [0.0] * (1 + len(_ERROR_TYPES))
        for index in range(_SLOTS):
            fields = _SLOT.unpack_from(self._map, index * _SLOT.size)
            if fields[0]:
                for field, value in enumerate(fields[1:]):
                    sums[field] += value
        return sums


_tally = _SharedTally()


class _Store:
    """The directory's health as one process sees it: reports each outage once and notices its end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.failing = False
        self._pending: tuple[str, BaseException] | None = None
        self._retry_at = 0.0
        self._directory = ""
        self._reserving: weakref.WeakSet[ReservedMmapedDict] = weakref.WeakSet()
        call_after_fork_in_child(self._after_fork)

    def _after_fork(self) -> None:
        # The child has files of its own (its parent's are closed in it) and reports for itself.
        self._lock = threading.Lock()
        self.failing = False
        self._pending = None
        self._reserving = weakref.WeakSet()

    def track(self, values_file: ReservedMmapedDict) -> None:
        """Keep room free in ``values_file`` when checking for the end of an outage."""
        self._reserving.add(values_file)

    def dropped(self, count: int = 1) -> None:
        """Count metric updates that could not be stored."""
        _tally.add(0, count)

    def failed(self, exc: BaseException, *, log: bool = True) -> None:
        """The directory could not take a write: count it, and log it if it starts an outage.

        ``log=False`` defers the log line to the next :meth:`report` (or :meth:`accepting`): for
        callers holding prometheus_client's lock, which a log line may need (log export counts).
        """
        _tally.add_error(exc)
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
        with self._lock:
            if not self.failing:
                self._pending = (directory, exc)
            self.failing = True
            self._retry_at = time.monotonic() + _RETRY_S
            self._directory = directory
        if log:
            self.report()

    def report(self) -> None:
        """Log the start of an outage that :meth:`failed` recorded without logging."""
        if self._pending is None:
            return
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        directory, exc = pending
        _logger.warning(
            "cannot store metric values in the metrics directory: new series are not recorded "
            "(their updates are counted in spyglass_metrics_store_dropped_updates_total) until it has room",
            extra={"path": directory, "error": str(exc), "error.type": _error_type(exc), "process.pid": os.getpid()},
        )

    def accepting(self) -> bool:
        """Whether new entries may be written; during an outage, checks for room at most every 5 s."""
        if not self.failing:
            return True
        self.report()
        now = time.monotonic()
        with self._lock:
            if not self.failing:
                return True
            if now < self._retry_at:
                return False
            self._retry_at = now + _RETRY_S  # this thread checks; the others keep dropping meanwhile
            directory = self._directory
        try:
            if directory:
                _probe(directory, _INITIAL_SIZE)
            for values_file in list(self._reserving):
                values_file.reserve_headroom()
        except OSError as exc:
            _tally.add_error(exc)
            return False
        with self._lock:
            self.failing = False
        _logger.info("storing metric values again", extra={"path": directory, "process.pid": os.getpid()})
        return True


store = _Store()
"""The metrics directory's health in this process (consulted by the instruments and the value files)."""


def _probe(directory: str, size: int) -> None:
    """Raise ``OSError`` unless ``size`` bytes can be reserved in a new file of ``directory``."""
    path = os.path.join(directory, f".probe-{os.getpid()}")
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        reserve(descriptor, 0, size)
    finally:
        os.close(descriptor)
        with contextlib.suppress(OSError):
            os.unlink(path)


class ReservedMmapedDict(MmapedDict):
    """prometheus_client's value file, with its pages reserved on disk before they are mapped.

    A new file gets its first 64 KiB reserved, and a file grows (doubling) as soon as it has
    less than 16 KiB free, so a series being created never runs out of room half-way. When a
    file cannot grow, the outage is reported (:data:`store`) and entries go into the room left;
    only an entry that does not fit raises ``OSError``.
    """

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if read_mode:
            super().__init__(filename, read_mode)
            return
        try:
            _create_reserved(filename)
            super().__init__(filename, read_mode)
        except OSError as exc:
            store.failed(exc, log=False)  # prometheus_client's lock is held
            raise
        store.track(self)

    def _grow(self, minimum: int) -> None:
        capacity = self._capacity
        while capacity < minimum:
            capacity *= 2
        reserve(self._f.fileno(), self._capacity, capacity - self._capacity)
        self._m = mmap.mmap(self._f.fileno(), capacity)
        self._capacity = capacity

    def _init_value(self, key: str) -> None:
        encoded = key.encode("utf-8")
        size = 4 + len(encoded) + (8 - (len(encoded) + 4) % 8) + 16  # as the library lays an entry out
        needed = self._used + size
        if needed + _HEADROOM > self._capacity:
            try:
                self._grow(needed + _HEADROOM)
            except OSError as exc:
                store.failed(exc, log=False)  # prometheus_client's lock is held
                if needed > self._capacity:
                    raise
        super()._init_value(key)

    def reserve_headroom(self) -> None:
        """Grow the file if it has less room free than it keeps (raises ``OSError`` if it cannot)."""
        if self._f is not None and self._used + _HEADROOM > self._capacity:
            self._grow(self._used + _HEADROOM)


def _create_reserved(filename: str) -> None:
    """Create ``filename`` with its first pages reserved, or reserve an existing one's holes; raises ``OSError``."""
    descriptor = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(descriptor).st_size == 0:
            try:
                reserve(descriptor, 0, _INITIAL_SIZE)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(filename)
                raise
        else:  # written sparse (by prometheus_client itself, an older spyglass): allocate the holes
            reserve_holes(descriptor)
    finally:
        os.close(descriptor)


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
    """Create ``path`` if needed and remove the files a previous run left in it (raises ``OSError``)."""
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
    values.MmapedDict = ReservedMmapedDict  # the class prometheus_client opens its value files with
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()


def disable() -> None:
    """Keep metric values in memory from now on, in this process and the processes it starts."""
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    os.environ.pop("SPYGLASS_METRICS_DIR", None)
    values.ValueClass = values.MutexValue


def open_directory(configured: str | None, service_name: str, role: str) -> str | None:
    """Make the directory for this process's metric values ready and switch it on (``None``: in memory).

    A ``master`` (the process serving the endpoint for its workers) empties ``configured``
    (default: :func:`default_directory`) and checks that it has room; when it cannot, it falls back
    to :func:`default_directory`, then to in-memory metrics. A ``standalone`` process uses
    ``configured`` if it is usable, else memory. A ``worker`` uses the directory its master chose:
    trouble there is handled as it comes (see :data:`store`). Each fallback is logged once.
    """
    if role == "master":
        candidates = [configured] if configured else []
        try:
            private = default_directory(service_name)
        except OSError as exc:  # not one usable temporary directory on the machine
            if not candidates:
                _unusable("", exc, None)
        else:
            if private not in candidates:
                candidates.append(private)
        for index, path in enumerate(candidates):
            try:
                prepare_directory(path)
                _probe(path, 4 * _INITIAL_SIZE)  # a worker's first files: counters, histograms, gauges, exemplars
            except OSError as exc:
                _unusable(path, exc, candidates[index + 1] if index + 1 < len(candidates) else None)
                continue
            os.environ["SPYGLASS_METRICS_DIR"] = path  # workers inherit the variables and read it there
            enable(path)
            return path
        disable()
        return None
    if not configured:
        return None
    try:
        if not os.path.isdir(configured):
            prepare_directory(configured)
        if role == "standalone":
            _probe(configured, _INITIAL_SIZE)
    except OSError as exc:
        if role == "standalone":
            _unusable(configured, exc, None)
            disable()
            return None
        store.failed(exc)
    enable(configured)
    return configured


def _unusable(path: str, exc: OSError, fallback: str | None) -> None:
    _tally.add_error(exc)
    fields = {"path": path, "error": str(exc), "error.type": _error_type(exc), "process.pid": os.getpid()}
    if fallback is not None:
        _logger.warning(
            "metrics directory unusable: using a private directory instead", extra=fields | {"fallback": fallback}
        )
    else:
        _logger.warning(
            "metrics directory unusable: metrics are kept in memory, and only this process's own are served",
            extra=fields,
        )


def is_enabled() -> bool:
    """Whether metric values of this process go to a multi-process directory."""
    return bool(getattr(values.ValueClass, "_multiprocess", False)) and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def compact_dead_process(pid: int, path: str) -> None:
    """Fold the values of exited process ``pid`` into the archive files and delete its files.

    Counters and histograms keep their totals (Prometheus sees no reset), live gauges drop the
    process, and the directory holds one file per kind of value for all exited processes together.
    Only the serving process may call it (the lock that keeps scrapes consistent is its own). When
    the directory has no room the files stay (a scrape still reads them) and the outage is reported
    once; the compactor folds them in later.
    """
    try:
        with _lock:
            _compact(pid, path)
    except OSError as exc:
        store.failed(exc)


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
        archive = ReservedMmapedDict(os.path.join(path, f"{prefix}_{ARCHIVE_ID}.db"))
        try:
            folded = list(MmapedDict.read_all_values_from_file(dead))
            for key, _value, _timestamp, _pos in folded:
                archive.read_value(key)  # every entry first: no room for one, and nothing is added twice
            for key, value, _timestamp, _pos in folded:
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
        if not store.accepting():  # no room to fold into: the files stay readable, try again later
            return
        try:
            compact_exited_processes(self._path)
        except OSError as exc:  # a vanished directory at shutdown, a full disk: reported once, tried again
            store.failed(exc)


class StoreHealthCollector:
    """``spyglass_metrics_store_errors_total`` and ``spyglass_metrics_store_dropped_updates_total``.

    Read from memory shared with the processes this one forked, so it works without the directory.
    """

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of this collector."""
        totals = _tally.totals()
        errors = CounterMetricFamily(
            "spyglass_metrics_store_errors",
            by_name("spyglass_metrics_store_errors_total").description,
            labels=["error_type"],
        )
        for error_type, count in zip(_ERROR_TYPES, totals[1:], strict=True):
            if count:
                errors.add_metric([error_type], count)
        yield errors
        yield CounterMetricFamily(
            "spyglass_metrics_store_dropped_updates",
            by_name("spyglass_metrics_store_dropped_updates_total").description,
            value=totals[0],
        )

    def describe(self) -> Iterator[Metric]:
        """Nothing to describe ahead of time."""
        return iter(())
