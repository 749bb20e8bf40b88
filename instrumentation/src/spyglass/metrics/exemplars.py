"""Exemplars that survive prometheus_client's multi-process mode.

prometheus_client drops exemplars when values live in a multi-process directory. Here each
process keeps the latest exemplar of every histogram bucket it observed in a small memory-mapped
file of its own (``exemplars_<pid>.exm``, beside the value files), and the serving process attaches
the newest exemplar of each bucket, across all processes, to the merged histogram at scrape time.

A record is guarded by a sequence number (odd while being written), so a scrape that reads a
record mid-write skips it instead of pairing one request's trace id with another's value.

The file's pages are reserved on disk before they are mapped (a sparse file on a full disk would
kill the process with ``SIGBUS``). When the directory has no room, the exemplars of buckets the
file already holds keep being updated; new buckets get none until there is room again (the
outage is reported once, see :mod:`spyglass.metrics.multiprocess`). Recording never raises.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import struct
import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

from spyglass.metrics.multiprocess import reserve, reserve_holes, store
from spyglass.process_hooks import call_after_fork_in_child

__all__ = [
    "ExemplarFile",
    "attach_exemplars",
    "exemplar_key",
    "merge_exemplar_file",
    "read_exemplars",
]

_SUFFIX = ".exm"
_INITIAL_SIZE = 1 << 16
_USED = struct.Struct("<Q")
_KEY_LEN = struct.Struct("<I")
_SEQ = struct.Struct("<Q")
_BODY = struct.Struct("<dd16s8s")  # value, timestamp, trace id, span id
_RECORD_SIZE = _SEQ.size + _BODY.size
_LIVE_FILES: weakref.WeakSet[ExemplarFile] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for exemplar_file in list(_LIVE_FILES):
        exemplar_file._forget_parent_file()


def exemplar_key(family: str, labels: Iterable[tuple[str, str]]) -> str:
    """Identity of one bucket: family name and sorted labels including ``le``."""
    return json.dumps([family, sorted(labels)], separators=(",", ":"))


def _file_name(directory: str, process_id: str) -> str:
    return os.path.join(directory, f"exemplars_{process_id}{_SUFFIX}")


class ExemplarFile:
    """The latest exemplar per histogram bucket for one process, in a memory-mapped file."""

    def __init__(self, directory: str, process_id: str | None = None) -> None:
        self._directory = directory
        self._process_id = process_id
        self._lock = threading.Lock()
        self._positions: dict[object, int] = {}
        self._file = None
        self._map: mmap.mmap | None = None
        self._used = 0
        self._capacity = 0
        self._owner_pid = -1
        call_after_fork_in_child(_after_fork_in_child)
        _LIVE_FILES.add(self)

    def _forget_parent_file(self) -> None:
        # A forked child must write its own file, never the parent's.
        self._lock = threading.Lock()
        self._positions = {}
        self._map = None
        self._file = None
        self._owner_pid = -1

    def _open(self) -> None:
        process_id = self._process_id or str(os.getpid())
        handle = open(_file_name(self._directory, process_id), "a+b")  # noqa: SIM115 - lives with the process
        try:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                reserve(handle.fileno(), 0, _INITIAL_SIZE)
                size = _INITIAL_SIZE
            else:
                reserve_holes(handle.fileno())
            mapped = mmap.mmap(handle.fileno(), size)
        except BaseException:
            handle.close()
            raise
        self._file = handle
        self._capacity = size
        self._map = mapped
        used = _USED.unpack_from(self._map, 0)[0]
        self._used = used if used else _USED.size
        if not used:
            self._map[0 : _USED.size] = _USED.pack(self._used)
        for key, position, _record in _records(self._map, self._used):
            self._positions[key] = position
        self._owner_pid = os.getpid()

    def _allocate(self, key: str) -> int:
        encoded = key.encode("utf-8")
        padded = encoded + b" " * ((8 - (len(encoded) + _KEY_LEN.size) % 8) % 8)
        entry = _KEY_LEN.pack(len(encoded)) + padded + b"\0" * _RECORD_SIZE
        assert self._map is not None and self._file is not None
        if self._used + len(entry) > self._capacity:
            capacity = self._capacity
            while self._used + len(entry) > capacity:
                capacity *= 2
            reserve(self._file.fileno(), self._capacity, capacity - self._capacity)
            self._map = mmap.mmap(self._file.fileno(), capacity)
            self._capacity = capacity
        start = self._used
        self._map[start : start + len(entry)] = entry
        self._used += len(entry)
        self._map[0 : _USED.size] = _USED.pack(self._used)
        return start + len(entry) - _RECORD_SIZE

    def record(
        self,
        family: str,
        series: tuple[str, ...],
        labelnames: Sequence[str],
        bounds: Sequence[float],
        value: float,
        timestamp: float,
        trace_id: bytes,
        span_id: bytes,
    ) -> None:
        """Keep ``value`` with its trace and span ids as the exemplar of its bucket (skipped if there is no room)."""
        index = bisect_left(bounds, value)
        cache_key = (family, series, index)
        failure: OSError | None = None
        lock = self._lock
        lock.acquire()
        try:
            position = self._positions.get(cache_key)
            if position is None:
                if not store.accepting():
                    return
                if self._map is None:  # not opened yet, or forgotten after a fork (see _after_fork_in_child)
                    self._open()
                labels = list(zip(labelnames, series, strict=True))
                labels.append(("le", floatToGoString(bounds[index])))
                position = self._positions[cache_key] = self._allocate(exemplar_key(family, labels))
            self._write(position, value, timestamp, trace_id, span_id)
        except OSError as exc:
            failure = exc
        finally:
            lock.release()
        if failure is not None:
            store.failed(failure)

    def _write(self, position: int, value: float, timestamp: float, trace_id: bytes, span_id: bytes) -> None:
        assert self._map is not None
        mapped = self._map
        sequence = _SEQ.unpack_from(mapped, position)[0]
        mapped[position : position + 8] = _SEQ.pack(sequence + 1)
        mapped[position + 8 : position + _RECORD_SIZE] = _BODY.pack(value, timestamp, trace_id, span_id)
        mapped[position : position + 8] = _SEQ.pack(sequence + 2)

    def write_exemplar(self, key: str, exemplar: Exemplar) -> None:
        """Store an exemplar read from another file (used when folding in an exited process)."""
        with self._lock:
            if self._owner_pid != os.getpid():
                self._forget_parent_file()
                self._open()
            position = self._positions.get(key)
            if position is None:
                position = self._positions[key] = self._allocate(key)
            trace_id = bytes.fromhex(exemplar.labels["trace_id"])
            span_id = bytes.fromhex(exemplar.labels.get("span_id", "0" * 16))
            self._write(position, exemplar.value, exemplar.timestamp or 0.0, trace_id, span_id)

    def close(self) -> None:
        """Unmap and close the file; the next record reopens it."""
        with self._lock:
            if self._map is not None:
                self._map.close()
            if self._file is not None:
                self._file.close()
            self._map = None
            self._file = None
            self._owner_pid = -1
            self._positions = {}


def _records(mapped: mmap.mmap | bytes, used: int) -> Iterable[tuple[str, int, tuple | None]]:
    """Yield (key, record position, (value, timestamp, trace, span) or None when mid-write)."""
    position = _USED.size
    while position + _KEY_LEN.size <= used:
        key_length = _KEY_LEN.unpack_from(mapped, position)[0]
        key_start = position + _KEY_LEN.size
        padded = key_length + (8 - (key_length + _KEY_LEN.size) % 8) % 8
        record_at = key_start + padded
        if record_at + _RECORD_SIZE > used:
            return
        key = bytes(mapped[key_start : key_start + key_length]).decode("utf-8")
        before = _SEQ.unpack_from(mapped, record_at)[0]
        body = _BODY.unpack_from(mapped, record_at + 8)
        after = _SEQ.unpack_from(mapped, record_at)[0]
        consistent = before == after and before % 2 == 0 and before > 0
        yield key, record_at, body if consistent else None
        position = record_at + _RECORD_SIZE


def _read_file(path: str) -> dict[str, Exemplar]:
    found: dict[str, Exemplar] = {}
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < _USED.size:
                return found
            with mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) as mapped:
                used = min(_USED.unpack_from(mapped, 0)[0], size)
                for key, _position, body in _records(mapped, used):
                    if body is None:
                        continue
                    value, timestamp, trace_id, span_id = body
                    labels = {"trace_id": trace_id.hex(), "span_id": span_id.hex()}
                    found[key] = Exemplar(labels, value, timestamp)
    except (FileNotFoundError, ValueError):
        # A file removed (exited process folded in) or still empty between listing and reading.
        return found
    return found


def read_exemplars(directory: str) -> dict[str, Exemplar]:
    """The newest exemplar of every bucket across all exemplar files in ``directory``."""
    newest: dict[str, Exemplar] = {}
    for path in glob.glob(os.path.join(directory, f"*{_SUFFIX}")):
        for key, exemplar in _read_file(path).items():
            current = newest.get(key)
            if current is None or (exemplar.timestamp or 0) > (current.timestamp or 0):
                newest[key] = exemplar
    return newest


def _buckets_with_exemplars(exemplars: dict[str, Exemplar]) -> set[tuple[str, str]]:
    """The (family, ``le``) pairs that hold at least one exemplar, read from the exemplars' keys."""
    found = set()
    for key in exemplars:
        try:
            family, labels = json.loads(key)
            le = next(value for name, value in labels if name == "le")
        except (ValueError, TypeError, StopIteration):
            continue
        found.add((family, le))
    return found


def attach_exemplars(families: Iterable, exemplars: dict[str, Exemplar]) -> list:
    """Return metric families with exemplars set on the histogram bucket samples they belong to.

    A bucket's key is only built when its family and bound hold some exemplar: most buckets of a
    scrape (every bound a series' observations never reached) hold none.
    """
    result = []
    candidates = _buckets_with_exemplars(exemplars) if exemplars else set()
    for family in families:
        if family.type == "histogram" and candidates:
            samples = []
            name = family.name
            for sample in family.samples:
                if sample.name.endswith("_bucket") and (name, sample.labels.get("le")) in candidates:
                    found = exemplars.get(exemplar_key(name, sample.labels.items()))
                    if found is not None:
                        sample = Sample(sample.name, sample.labels, sample.value, sample.timestamp, found)
                samples.append(sample)
            family.samples = samples
        result.append(family)
    return result


def merge_exemplar_file(pid: int, directory: str) -> None:
    """Fold the exemplars of exited process ``pid`` into the archive file and delete its file."""
    from spyglass.metrics.multiprocess import ARCHIVE_ID

    dead = _file_name(directory, str(pid))
    if not os.path.exists(dead):
        return
    dead_exemplars = _read_file(dead)
    if dead_exemplars:
        archived = _read_file(_file_name(directory, ARCHIVE_ID))
        archive = ExemplarFile(directory, ARCHIVE_ID)
        try:
            for key, exemplar in dead_exemplars.items():
                current = archived.get(key)
                if current is None or (exemplar.timestamp or 0) >= (current.timestamp or 0):
                    archive.write_exemplar(key, exemplar)
        finally:
            archive.close()
    os.unlink(dead)
