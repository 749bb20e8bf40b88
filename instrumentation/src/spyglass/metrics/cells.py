"""Metric values written on the hot path: prometheus_client's own storage, with less work per write.

In multi-process mode (a Celery pool process, a gunicorn worker) each ``inc`` of a
prometheus_client value takes the library's lock, asks the kernel for the process id (to notice a
fork), looks its key up twice and packs the new value into the process's memory-mapped file. A
Celery task updates seven such values. :class:`MmapCell` keeps the file position of one value and
writes the same 16 bytes (value and timestamp) there itself, and learns of a fork from an
``os.register_at_fork`` hook rather than from a system call per write. The file, its format and
what the serving process reads are unchanged.

A cell adds to the value it reads from the file, under one lock shared by all cells, so two
cells of the same value (two threads of a threads pool or a gthread worker creating the cell of a
new label set at the same moment) lose no update. spyglass's metric helpers reach each labelled
child they record through :func:`cell_of` only; the library's own ``inc`` would not take that lock.
In single-process mode the library's value object is already a float behind a lock, and is used
as it is.

No write raises into the application. A series the metrics directory has no room for is
represented by :data:`DROPPED`, which counts each update it receives as dropped (see
:mod:`spyglass.metrics.multiprocess`); a cell that cannot move to its process's own file after a
fork drops its updates the same way until the file can be opened.
"""

from __future__ import annotations

import struct
import threading
from typing import Any, Protocol

from prometheus_client.samples import Exemplar

from spyglass.metrics.multiprocess import store
from spyglass.process_hooks import call_after_fork_in_child

__all__ = ["DROPPED", "Cell", "DroppedCell", "MmapCell", "cell_of", "fork_generation"]

_VALUE = struct.Struct("dd")  # value and timestamp, as prometheus_client's files hold them
_PACK_VALUE = _VALUE.pack
_UNPACK_VALUE = _VALUE.unpack_from
_lock = threading.Lock()
_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1


def fork_generation() -> int:
    """A number that changes in a child process after each fork (registers the hook on first use)."""
    call_after_fork_in_child(_forked)
    return _generation


class Cell(Protocol):
    """A metric value: a prometheus_client value object, or a :class:`MmapCell` in front of one."""

    def inc(self, amount: float) -> None:
        """Add ``amount``."""

    def set(self, value: float) -> None:
        """Set the value."""

    def set_exemplar(self, exemplar: Exemplar) -> None:
        """Keep ``exemplar`` (single-process values only)."""


class MmapCell:
    """One value of this process's prometheus_client multi-process file, written directly.

    After a fork it binds again (through the library's value, which then moves to the child's
    own file), so a child never writes into its parent's file.
    """

    __slots__ = ("_file", "_generation", "_position", "_source")

    def __init__(self, source: Any) -> None:
        self._source = source
        self._bind()

    def _bind(self) -> None:
        generation = fork_generation()
        source = self._source
        source.get()  # after a fork, prometheus_client reopens its files for this process here
        mapped_file = source._file
        mapped_file.read_value(source._key)  # allocates the value's entry if it is new
        self._file = mapped_file
        self._position = mapped_file._positions[source._key]
        self._generation = generation  # last: a bind that failed is tried again

    def inc(self, amount: float) -> None:
        """Add ``amount``."""
        if self._generation != _generation and not self._bind_after_fork():
            store.dropped()
            return
        _lock.acquire()  # (the hot path: the write is not a call of its own)
        try:
            position = self._position
            mapped = self._file._m
            # A slice assignment, as prometheus_client writes: a reader never sees a half-written value.
            mapped[position : position + 16] = _PACK_VALUE(amount + _UNPACK_VALUE(mapped, position)[0], 0.0)
        finally:
            _lock.release()

    def set(self, value: float) -> None:
        """Set the value to ``value``."""
        if self._generation != _generation and not self._bind_after_fork():
            store.dropped()
            return
        with _lock:
            position = self._position
            self._file._m[position : position + 16] = _PACK_VALUE(float(value), 0.0)

    def _bind_after_fork(self) -> bool:
        """Move to this process's own file; False (reported, outside the lock) when it cannot be opened."""
        if not store.accepting():
            return False
        failure: Exception | None = None
        with _lock:
            if self._generation == _generation:
                return True
            try:
                self._bind()
            except Exception as exc:  # a file that cannot be opened is never the application's problem
                failure = exc
        if failure is None:
            return True
        store.failed(failure)
        return False

    def set_exemplar(self, exemplar: Exemplar) -> None:
        """Exemplars of multi-process values live in spyglass's exemplar file, not here."""


class DroppedCell:
    """Stands for a series that could not be stored: counts every update it receives as dropped."""

    __slots__ = ()

    def inc(self, amount: float) -> None:
        """Count one dropped update."""
        store.dropped()

    def set(self, value: float) -> None:
        """Count one dropped update."""
        store.dropped()

    def set_exemplar(self, exemplar: Exemplar) -> None:
        """Nothing to keep."""


DROPPED = DroppedCell()
"""The cell of every series that could not be stored."""


def cell_of(value: Any) -> Cell:
    """The cell to write a prometheus_client value object through.

    ``value`` is a labelled child's ``_value``, or a histogram's bucket or sum.
    Raises ``TypeError`` if this prometheus_client version stores values where spyglass cannot see them.
    """
    if not hasattr(value, "inc"):  # pragma: no cover - guards a prometheus_client upgrade
        raise TypeError("this prometheus_client version hides its metric values from spyglass")
    if getattr(value, "_multiprocess", False):
        if not all(hasattr(value, name) for name in ("_file", "_key", "get")):  # pragma: no cover - same guard
            raise TypeError("this prometheus_client version hides its multi-process values from spyglass")
        return MmapCell(value)
    return value
