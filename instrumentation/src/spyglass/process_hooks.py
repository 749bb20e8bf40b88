"""Fork and exit hooks, registered on first use so that importing spyglass has no side effects."""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable

__all__ = ["call_after_fork_in_child", "call_at_exit"]

_after_fork: set[Callable[[], None]] = set()
_at_exit: set[Callable[[], None]] = set()


def call_after_fork_in_child(callback: Callable[[], None]) -> None:
    """Run ``callback`` in every child forked from now on (registered once per callback)."""
    if callback not in _after_fork and hasattr(os, "register_at_fork"):
        _after_fork.add(callback)
        os.register_at_fork(after_in_child=callback)


def call_at_exit(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the interpreter exits normally (registered once per callback)."""
    if callback not in _at_exit:
        _at_exit.add(callback)
        atexit.register(callback)
