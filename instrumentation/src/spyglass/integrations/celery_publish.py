"""Publishes that fail: counted, and their publish spans ended, instead of left open.

Celery signals a publish before it happens (``before_task_publish``) and after it succeeded
(``after_task_publish``); when the broker is down the publish raises and no signal says so. The
opentelemetry-instrumentation-celery publish span, started and made current by the first signal,
would then never end: it would stay the current span of the thread that published (a web
request's later spans and log lines would belong to it) and be kept in memory for good.

:func:`watch_publish_failures` wraps the function Celery's apps build to send task messages
(``celery.app.amqp.AMQP._create_task_sender``): when sending raises, the failure goes to the
receiver given, with the task's name and id and the exception, and the exception propagates
unchanged to the application.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

from celery.app import amqp

__all__ = ["PublishFailure", "watch_publish_failures"]

PublishFailure = Callable[[str, str | None, BaseException], None]
"""Receives ``(task_name, task_id, exception)`` of a publish that raised."""

_lock = threading.Lock()
_receiver: PublishFailure | None = None
_WRAPPED = "__spyglass_publish_failures__"


def watch_publish_failures(receiver: PublishFailure) -> None:
    """Report every task publish that raises to ``receiver`` from now on (idempotent; last receiver wins).

    Apps whose sender was already built (an app that published before this call) are not
    watched; spyglass is set up before the application publishes anything.
    """
    global _receiver
    with _lock:
        _receiver = receiver
        original = amqp.AMQP._create_task_sender
        if getattr(original, _WRAPPED, False):
            return

        @functools.wraps(original)
        def create_task_sender(self: amqp.AMQP) -> Callable[..., Any]:
            return _reporting(original(self))

        setattr(create_task_sender, _WRAPPED, True)
        amqp.AMQP._create_task_sender = create_task_sender  # type: ignore[method-assign]


def _reporting(send_task_message: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(send_task_message)
    def send(producer: Any, name: str, message: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return send_task_message(producer, name, message, *args, **kwargs)
        except BaseException as exc:
            receiver = _receiver
            if receiver is not None:
                # Reporting must never replace the application's error.
                with contextlib.suppress(Exception):
                    receiver(name, _task_id(message), exc)
            raise

    return send


def _task_id(message: Any) -> str | None:
    """The task id of a message Celery built (protocol 2: headers first; protocol 1: in the body)."""
    try:
        headers, _properties, body, _event = message
    except (TypeError, ValueError):
        return None
    for source in (headers, body):
        if isinstance(source, dict) and isinstance(source.get("id"), str):
            return source["id"]
    return None
