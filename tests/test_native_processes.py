"""The demo's process table: one process can be stopped and started again without the rest noticing."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from demo_app.native import Processes
from tests.conftest import wait_for

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]


def test_a_process_stopped_on_purpose_is_not_a_crash_and_starts_again_as_it_was(tmp_path: Path) -> None:
    """stop_one stops it, check() stays quiet, restart runs the same command and appends to its log."""
    processes = Processes(tmp_path)
    try:
        first = processes.start("sleeper", SLEEPER)
        assert wait_for(lambda: "up" in processes.log_path("sleeper").read_text(), timeout=10)
        processes.stop_one("sleeper", timeout=5)
        assert first.poll() is not None and not processes.running("sleeper")
        processes.check()  # no SystemExit: stopped on purpose
        second = processes.restart("sleeper")
        assert second.pid != first.pid and processes.running("sleeper")
        assert wait_for(lambda: processes.log_path("sleeper").read_text().count("up") == 2, timeout=10)
    finally:
        processes.stop()
    assert not processes.running("sleeper")


def test_a_process_that_exits_by_itself_is_reported_with_its_log(tmp_path: Path) -> None:
    """check() raises SystemExit naming the process, its exit code and its log file."""
    processes = Processes(tmp_path)
    try:
        crashing = processes.start("crasher", [sys.executable, "-c", "raise SystemExit(3)"])
        crashing.wait(10)
        with pytest.raises(SystemExit, match=r"crasher exited with code 3; see .*crasher\.log"):
            processes.check()
    finally:
        processes.stop()


def test_starting_a_process_that_runs_already_is_refused(tmp_path: Path) -> None:
    """A second start under the same name while the first runs raises instead of losing track of it."""
    processes = Processes(tmp_path)
    try:
        processes.start("sleeper", SLEEPER)
        with pytest.raises(RuntimeError, match="already running"):
            processes.start("sleeper", SLEEPER)
    finally:
        started = time.monotonic()
        processes.stop()
        assert time.monotonic() - started < 15
