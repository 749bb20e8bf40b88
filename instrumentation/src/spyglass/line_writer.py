"""Writing log lines to stdout in batches, from any thread, with a bounded delay.

One ``write`` system call per log line costs a few microseconds and, worse, releases the GIL on
every request, which hands it to the span export thread and makes the request wait. Lines are
therefore collected and written together: as soon as a batch holds ``PIPE_BUF`` bytes of rendered
lines (or 1,024 unrendered ones, below), and at the latest ``max_delay`` seconds after the first
line of the batch (a background thread sees to it).
Each ``write`` holds whole lines and, where it can, at most ``PIPE_BUF`` bytes, so lines of several
processes sharing one pipe (gunicorn workers) never interleave mid-line.

A ``tee`` callable, if given, receives every batch of lines as it is written (spyglass's log
export queues them there). It runs on the thread that writes the batch and must not block.

A line can also be given unrendered (:meth:`LineWriter.write_later`): a renderer and the values
it needs. The thread that writes the batch (the background thread, as a rule) renders it with the
rest of the batch, so the thread that logs, a request's, only appends the values. Rendering a batch
in one loop costs a fraction of rendering each line between the other steps of a request, whose
code keeps evicting the renderer's from the processor's caches.

Pending lines are written at exit and by :meth:`LineWriter.flush` (gunicorn's ``worker_exit``
calls it); a process killed with SIGKILL loses at most ``max_delay`` seconds of lines. A closed
writer has no background thread left: a line still given to it (by a thread that held on to it
while logging was set up again) is written at once rather than held until exit.
"""

from __future__ import annotations

import os
import select
import threading
import weakref
from collections.abc import Callable
from typing import Any

from spyglass.process_hooks import call_after_fork_in_child, call_at_exit

__all__ = ["LineWriter", "UnrenderedLine"]

_PIPE_BUF = getattr(select, "PIPE_BUF", 4096)
_MAX_UNRENDERED = 1024
"""Unrendered lines held at most: past it, the thread that adds one writes the batch itself.

Well past what one process logs in ``max_delay`` (a worker serving 7,000 requests a second
queues 700 access lines in 100 ms), and half the log export's default queue (2,048), which each
batch is handed to whole."""

UnrenderedLine = tuple[Any, ...]
"""A renderer (``Callable[[UnrenderedLine], bytes]``, first) followed by the values it renders, as one tuple."""
_LIVE: weakref.WeakSet[LineWriter] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for writer in list(_LIVE):
        writer._after_fork_in_child()


def _flush_all_at_exit() -> None:
    for writer in list(_LIVE):
        writer.flush()


class LineWriter:
    """Batches complete lines (bytes ending in a newline) to a file descriptor.

    ``max_delay=0`` writes every line at once (no background thread).
    """

    def __init__(self, fd: int, max_delay: float = 0.1, tee: Callable[[list[bytes]], None] | None = None) -> None:
        self._fd = fd
        self._tee = tee
        self._max_delay = max_delay
        self._lock = threading.Lock()
        self._pending: list[bytes | UnrenderedLine] = []
        self._pending_bytes = 0
        self._unrendered = 0
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.dropped_lines = 0
        call_after_fork_in_child(_reset_after_fork)
        call_at_exit(_flush_all_at_exit)
        _LIVE.add(self)

    def write(self, line: bytes) -> None:
        """Queue one line; write the batch now if it is full (or if batching is off)."""
        with self._lock:
            self._pending.append(line)
            self._pending_bytes += len(line)
            batch = self._take() if self._pending_bytes >= _PIPE_BUF or self._max_delay <= 0 else None
        self._queued(batch)

    def write_later(self, line: UnrenderedLine) -> None:
        """Queue one line to be rendered, by ``line[0](line)``, when its batch is written.

        The renderer returns the line's bytes (ending in a newline), from the values as they were
        when the line was logged, within ``max_delay``, on whichever thread writes the batch. A
        renderer that raises loses its own line only, counted in ``dropped_lines``.
        """
        if self._max_delay <= 0:
            for rendered in self._render([line]):
                self.write(rendered)
            return
        with self._lock:
            self._pending.append(line)
            self._unrendered += 1
            batch = self._take() if self._unrendered >= _MAX_UNRENDERED else None
        if batch is not None or self._thread is None:  # (the common case, once per request: no call)
            self._queued(batch)

    def _queued(self, batch: list[bytes | UnrenderedLine] | None) -> None:
        """After a line was queued: write the batch it completed, if any, else see that the background thread runs."""
        if batch is not None:
            self._write(batch)
        elif self._thread is None:
            self._start_flusher()

    def flush(self) -> None:
        """Write every pending line now."""
        with self._lock:
            batch = self._take()
        if batch:
            self._write(batch)

    def take_pending(self) -> list[bytes]:
        """Remove and return the lines not written yet, rendered (to hand them to the writer replacing this one)."""
        with self._lock:
            batch = self._take()
        return self._render(batch)

    def close(self) -> None:
        """Flush and stop the background thread; lines written from now on are written at once."""
        self._max_delay = 0.0
        self._stopped.set()
        self.flush()

    def _take(self) -> list[bytes | UnrenderedLine]:
        batch, self._pending, self._pending_bytes, self._unrendered = self._pending, [], 0, 0
        return batch

    def _render(self, batch: list[bytes | UnrenderedLine]) -> list[bytes]:
        """The batch with its unrendered lines rendered, in order; a line whose renderer fails is counted as dropped."""
        try:
            return [line if type(line) is not tuple else line[0](line) for line in batch]  # type: ignore[misc]
        except Exception:
            lines: list[bytes] = []
            for line in batch:
                try:
                    lines.append(line if type(line) is not tuple else line[0](line))  # type: ignore[arg-type]
                except Exception:  # a renderer's bug must cost neither the application nor the other lines
                    self.dropped_lines += 1
            return lines

    def _write(self, batch: list[bytes | UnrenderedLine]) -> None:
        lines = self._render(batch)
        if self._tee is not None:
            self._tee(lines)
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > _PIPE_BUF:
                self._write_chunk(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write_chunk(b"".join(chunk))

    def _write_chunk(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            # stdout closed or its disk full: the application must not fail for a log line.
            self.dropped_lines += bytes(view).count(b"\n")

    def _start_flusher(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._flush_periodically, name="spyglass-log-flush", daemon=True)
        self._thread.start()

    def _flush_periodically(self) -> None:
        while not self._stopped.wait(self._max_delay):
            if self._pending:
                self.flush()

    def _after_fork_in_child(self) -> None:
        # The parent writes its own pending lines; the child starts empty, with no thread.
        self._lock = threading.Lock()
        self._pending, self._pending_bytes, self._unrendered = [], 0, 0
        self._thread = None
        self._stopped = threading.Event()
