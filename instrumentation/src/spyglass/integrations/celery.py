"""Celery: task metrics from Celery's signals, in every process that publishes or runs tasks.

No Celery events (``-E``) and no exporter process: each publishing process (the Flask web, or a
worker starting sub-tasks) counts what it publishes and stamps every message with the time it was
published, so that the worker running the task can measure how long it waited in the queue.

This module covers the publishing side so far; running tasks, worker processes and traces follow.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from celery import Celery, current_app, signals

from spyglass import runtime

__all__ = ["PUBLISHED_AT_HEADER", "UNREGISTERED_TASK", "install_auto_instrumentation", "instrument_celery"]

PUBLISHED_AT_HEADER = "spyglass_published_at"
"""Message header holding the publish time (Unix seconds, float) that the worker reads back."""
UNREGISTERED_TASK = "<unregistered>"
"""The ``task_name`` label of tasks the instrumented apps do not register (``send_task`` by name)."""

_DISPATCH_UID = "spyglass.celery"
_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
_every_app = False
_lock = threading.Lock()


def instrument_celery(app: Celery) -> Celery:
    """Instrument a Celery app (idempotent); returns the app.

    Initialises spyglass from the environment first if :func:`spyglass.init` has not run. Task
    names registered in any instrumented app keep their name as a label; others are
    ``<unregistered>``, so a caller naming arbitrary tasks cannot create series.
    """
    with _lock:
        if runtime.init().disabled or app in _apps:
            return app
        _apps.add(app)
        _connect_signals()
    return app


def install_auto_instrumentation() -> None:
    """Instrument every Celery app of the process, created before or after this call.

    Celery's signals are process-wide; task names are checked against the app in use.
    """
    global _every_app
    with _lock:
        if runtime.init().disabled:
            return
        _every_app = True
        _connect_signals()


def _connect_signals() -> None:
    signals.before_task_publish.connect(_before_task_publish, weak=False, dispatch_uid=_DISPATCH_UID)


def _task_label(name: str | None) -> str:
    if name:
        apps = [*_apps, current_app._get_current_object()] if _every_app else _apps
        for app in apps:
            if name in app.tasks:
                return name
    return UNREGISTERED_TASK


def _before_task_publish(
    sender: str | None = None,
    headers: dict[str, Any] | None = None,
    routing_key: str | None = None,
    **_extra: Any,
) -> None:
    """Stamp the publish time into the message headers and count the message."""
    if headers is not None:
        headers[PUBLISHED_AT_HEADER] = time.time()
    state = runtime.current()
    metrics = state.celery_metrics() if state is not None else None
    if metrics is not None:
        metrics.published(_task_label(sender or (headers or {}).get("task")), routing_key or "")
