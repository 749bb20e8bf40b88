"""spyglass reads the keys bound to structlog's context as structlog does, without walking the whole context."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import structlog
from structlog.contextvars import (
    bind_contextvars,
    bound_contextvars,
    clear_contextvars,
    get_contextvars,
    reset_contextvars,
    unbind_contextvars,
)

from spyglass import bound_context
from spyglass.bound_context import current_bound, merge_bound_context


def same_as_structlog() -> bool:
    """Whether spyglass's view of the bound keys is structlog's, here and now."""
    return current_bound() == get_contextvars()


def test_the_bound_keys_are_structlogs_through_binds_unbinds_resets_threads_and_tasks() -> None:
    """Whatever binds, unbinds, resets or clears keys, in whichever thread, copied context or asyncio
    task, spyglass sees the keys and values structlog's own ``get_contextvars`` returns.
    """
    clear_contextvars()
    try:
        assert same_as_structlog() and current_bound() == {}
        bind_contextvars(request_id="r-1", user=7)
        assert same_as_structlog() and current_bound() == {"request_id": "r-1", "user": 7}
        tokens = bind_contextvars(user=8, cart={"items": 2})
        assert same_as_structlog() and current_bound()["user"] == 8
        reset_contextvars(**tokens)
        assert same_as_structlog() and current_bound() == {"request_id": "r-1", "user": 7}
        unbind_contextvars("user")
        assert same_as_structlog() and current_bound() == {"request_id": "r-1"}
        with bound_contextvars(task_id="t-1"):
            assert same_as_structlog() and current_bound() == {"request_id": "r-1", "task_id": "t-1"}
        assert same_as_structlog()

        seen_elsewhere: list[bool] = []

        def in_a_new_thread() -> None:
            seen_elsewhere.append(same_as_structlog() and not current_bound())
            bind_contextvars(thread_only="x")
            seen_elsewhere.append(same_as_structlog() and current_bound() == {"thread_only": "x"})

        thread = threading.Thread(target=in_a_new_thread)
        thread.start()
        thread.join()
        assert seen_elsewhere == [True, True]
        assert same_as_structlog() and "thread_only" not in current_bound()

        copied = contextvars.copy_context()
        copied.run(bind_contextvars, in_copy="y")
        assert copied.run(same_as_structlog) and copied.run(current_bound)["in_copy"] == "y"
        assert same_as_structlog() and "in_copy" not in current_bound()

        async def task() -> bool:
            bind_contextvars(in_task="z")
            return same_as_structlog() and current_bound()["in_task"] == "z"

        assert asyncio.run(task())
        assert same_as_structlog() and "in_task" not in current_bound()
        clear_contextvars()
        assert same_as_structlog() and not current_bound()
    finally:
        clear_contextvars()


def test_merging_the_bound_keys_into_a_line_keeps_the_lines_own() -> None:
    """As structlog's ``merge_contextvars``: bound keys are added, a key the line sets wins."""
    clear_contextvars()
    try:
        bind_contextvars(request_id="r-1", event="bound")
        line = merge_bound_context(None, "info", {"event": "own"})
        assert line == structlog.contextvars.merge_contextvars(None, "info", {"event": "own"})
        assert line == {"event": "own", "request_id": "r-1"}
    finally:
        clear_contextvars()


def test_the_pinned_structlog_has_the_registry_that_spares_the_walk() -> None:
    """With the structlog release spyglass pins, bound keys are read from structlog's registry of its
    context variables (a few lookups per line), not by walking every context variable.
    """
    assert bound_context._REGISTRY is structlog.contextvars._CONTEXT_VARS
