"""Log lines are batched for speed without being torn, lost at exit or held back for long."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

from spyglass.line_writer import LineWriter
from tests.conftest import REPO


def test_lines_of_many_processes_sharing_a_pipe_never_interleave() -> None:
    """Four processes write 2,000 lines each of varied length into one pipe: every line arrives whole."""
    script = textwrap.dedent(
        """
        import json, os, sys
        from spyglass.line_writer import LineWriter
        writer = LineWriter(1, max_delay=0.05)
        for index in range(2000):
            writer.write(json.dumps({"pid": os.getpid(), "n": index, "pad": "x" * (index % 700)}).encode() + b"\\n")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    read_end, write_end = os.pipe()
    children = [subprocess.Popen([sys.executable, "-c", script], stdout=write_end, env=env) for _ in range(4)]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    for child in children:
        assert child.wait(30) == 0
    records = [json.loads(line) for line in data.splitlines()]  # a torn line would not parse
    assert len(records) == 8000
    by_process: dict[int, list[int]] = {}
    for record in records:
        by_process.setdefault(record["pid"], []).append(record["n"])
    assert all(numbers == list(range(2000)) for numbers in by_process.values())  # in order, none lost


def test_a_lone_line_is_written_within_the_delay(tmp_path) -> None:
    """A quiet service's single line does not wait for a full batch."""
    path = tmp_path / "out.log"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        writer = LineWriter(descriptor, max_delay=0.05)
        writer.write(b'{"event":"alone"}\n')
        assert path.read_bytes() == b""
        deadline = time.monotonic() + 2
        while path.read_bytes() == b"" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.read_bytes() == b'{"event":"alone"}\n'
        writer.close()
    finally:
        os.close(descriptor)


def test_a_line_given_to_a_closed_writer_is_written_at_once(tmp_path) -> None:
    """A thread still holding a writer that was closed (logging set up again meanwhile) does not
    leave its line waiting for the process to exit: there is no background thread left to write it.
    """
    path = tmp_path / "out.log"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        writer = LineWriter(descriptor, max_delay=60)
        writer.write(b'{"event":"before"}\n')
        writer.close()
        assert path.read_bytes() == b'{"event":"before"}\n'
        writer.write(b'{"event":"late"}\n')
        assert path.read_bytes() == b'{"event":"before"}\n{"event":"late"}\n'
    finally:
        os.close(descriptor)


def test_pending_lines_are_written_when_the_process_exits(tmp_path) -> None:
    """Lines still in a batch when the interpreter exits normally are not lost."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from spyglass.line_writer import LineWriter\n"
            "w = LineWriter(1, max_delay=30)\n"
            "[w.write(b'line %d\\n' % i) for i in range(5)]\n",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=30,
    )
    assert result.stdout.splitlines() == [b"line %d" % i for i in range(5)]


def test_a_closed_stdout_never_raises_into_the_application() -> None:
    """Writing to a closed descriptor drops the lines and counts them instead of failing."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    writer = LineWriter(write_end, max_delay=0)
    try:
        writer.write(b"lost\n")  # EPIPE (SIGPIPE is ignored by Python)
        assert writer.dropped_lines == 1
    finally:
        os.close(write_end)


def _render_on_thread(threads: list[int]):
    """A renderer of ``(renderer, text)`` lines that notes the thread it ran on."""

    def render(line: tuple) -> bytes:
        threads.append(threading.get_ident())
        return line[1].encode() + b"\n"

    return render


def test_unrendered_lines_are_rendered_by_the_background_thread_in_their_place(tmp_path) -> None:
    """A line given unrendered is rendered off the thread that logged it, and written between the
    lines given before and after it.
    """
    path = tmp_path / "out.log"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    threads: list[int] = []
    try:
        writer = LineWriter(descriptor, max_delay=0.05)
        writer.write(b"first\n")
        writer.write_later((_render_on_thread(threads), "second"))
        writer.write(b"third\n")
        deadline = time.monotonic() + 2
        while path.read_bytes().count(b"\n") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.read_bytes() == b"first\nsecond\nthird\n"
        assert len(threads) == 1 and threads[0] != threading.get_ident()
        writer.close()
    finally:
        os.close(descriptor)


def test_unrendered_lines_are_rendered_when_flushed_handed_over_or_too_many(tmp_path) -> None:
    """A flush renders what is pending; the lines handed to a replacing writer are rendered bytes;
    and 1,024 unrendered lines are written by the thread that adds the last one, without waiting.
    """
    path = tmp_path / "out.log"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    threads: list[int] = []
    render = _render_on_thread(threads)
    try:
        writer = LineWriter(descriptor, max_delay=60)
        writer.write_later((render, "flushed"))
        writer.flush()
        assert path.read_bytes() == b"flushed\n"
        writer.write_later((render, "handed over"))
        assert writer.take_pending() == [b"handed over\n"]
        for index in range(1023):
            writer.write_later((render, f"line {index}"))
        assert path.read_bytes() == b"flushed\n"  # held: neither rendered nor written yet
        writer.write_later((render, "line 1023"))
        assert path.read_bytes().count(b"\n") == 1 + 1024
        writer.close()
        writer.write_later((render, "after close"))  # no background thread left: written at once
        assert path.read_bytes().endswith(b"line 1023\nafter close\n")
    finally:
        os.close(descriptor)


def test_a_renderer_that_fails_loses_only_its_own_line(tmp_path) -> None:
    """A renderer that raises costs neither the application nor the batch's other lines; the lost
    line is counted as dropped.
    """

    def broken(line: tuple) -> bytes:
        raise ValueError("renderer bug")

    path = tmp_path / "out.log"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        writer = LineWriter(descriptor, max_delay=60)
        writer.write(b"before\n")
        writer.write_later((broken, "lost"))
        writer.write(b"after\n")
        writer.flush()
        assert path.read_bytes() == b"before\nafter\n"
        assert writer.dropped_lines == 1
        writer.close()
    finally:
        os.close(descriptor)
