"""Log lines are batched for speed without being torn, lost at exit or held back for long."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
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
