"""Label values of the Celery metrics, and the task outcomes they count.

Shared by the receivers of every process role (publisher, pool process, worker main process):
task names are kept only when an instrumented app registers them, so a caller naming arbitrary
tasks cannot create series.
"""

from __future__ import annotations

import weakref
from typing import Any

from celery import Celery, current_app

__all__ = [
    "OUTCOMES",
    "UNREGISTERED_TASK",
    "label_every_app",
    "queue_of",
    "register_app",
    "task_label",
    "type_name",
]

UNREGISTERED_TASK = "<unregistered>"
"""The ``task_name`` label of tasks the instrumented apps do not register (``send_task`` by name)."""
OUTCOMES = ("success", "failure", "retry", "rejected", "revoked", "expired", "time_limit", "worker_lost")
"""Values of the ``outcome`` label of ``celery_task_completed_total`` (and of ``celery.outcome`` on run spans)."""

_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
_every_app = False
# Registered names already looked up (bounded all the same).
_labels: dict[str, str] = {}
_LABELS_LIMIT = 10_000


def register_app(app: Celery) -> bool:
    """Keep the names of ``app``'s tasks as labels; False if it was registered already."""
    if app in _apps:
        return False
    _apps.add(app)
    _labels.clear()
    return True


def label_every_app() -> None:
    """Also keep the names of the tasks of whichever app is current (``spyglass.auto``)."""
    global _every_app
    _every_app = True
    _labels.clear()


def task_label(name: str | None) -> str:
    """``name`` if an instrumented app registers it, else :data:`UNREGISTERED_TASK`."""
    if not name:
        return UNREGISTERED_TASK
    label = _labels.get(name)
    if label is None:
        label = _look_up(name)
        # Only registered names are kept: a name unknown now may be registered later (autodiscovery).
        if label == name and len(_labels) < _LABELS_LIMIT:
            _labels[name] = label
    return label


def _look_up(name: str) -> str:
    apps = [*_apps, current_app._get_current_object()] if _every_app else _apps
    for app in apps:
        if name in app.tasks:
            return name
    return UNREGISTERED_TASK


def queue_of(request: Any) -> str:
    """The queue a task message came from (its routing key), or ``""``."""
    delivery = getattr(request, "delivery_info", None) or {}
    return delivery.get("routing_key") or delivery.get("exchange") or ""


def type_name(exception: BaseException) -> str:
    """The ``exception_type`` label: qualified name, without ``builtins.``."""
    kind = type(exception)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
