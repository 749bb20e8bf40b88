"""Task endings that only a Celery worker's main process sees: counted and traced there.

A prefork pool process that dies while running a task (killed at the hard time limit, by
SIGKILL, by the kernel's OOM killer) cannot count how the task ended. The main process learns of
it through its task request (``celery.worker.request.Request``): ``on_timeout`` for the hard time
limit and ``on_failure`` with ``WorkerLostError`` for a lost process. Celery sends no signal when
it then requeues the message (``acks_late`` with ``reject_on_worker_lost``, or a hard time limit
without ``acks_on_timeout``), so spyglass wraps those two methods and ``reject`` (once, in the
main process) and counts each such ending in ``celery_task_completed_total`` (outcome
``time_limit`` or ``worker_lost``) and ``celery_task_failures_total`` (its exception type),
whether or not the message is delivered again (the next delivery counts its own outcome).

Spans: at the hard time limit billiard first sends SIGTERM, which interrupts the task, and the
pool process ends its own run span (outcome ``time_limit``) and exports it at once; SIGKILL
follows 0.1 s later. A process that died without warning cannot end its run span, so the main
process ends one in its place: a ``run/{task}`` span with the same parent (the publish span,
from the message headers), from the time the pool process accepted the task until now, status
ERROR, the exception recorded, ``celery.outcome`` and ``celery.requeued`` set. The lost span's
own id is unknown to the main process, so spans the task had ended under it keep a parent
that is not exported.

Revoked and expired tasks that never ran get a zero-length ``run/{task}`` span with status ERROR,
so a trace shows that the task was published but never ran.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery.worker import state as worker_state
from celery.worker.request import Request
from opentelemetry.trace import SpanKind, Status, StatusCode

from spyglass import runtime
from spyglass.integrations.celery_labels import queue_of, task_label, type_name
from spyglass.integrations.celery_traces import RUN_SPAN_PREFIX, canvas_attributes

__all__ = ["ending_signalled", "install_request_hooks", "report_unrun_task"]

_logger = logging.getLogger("spyglass")
_installed = False
# Task ids whose message was rejected with requeue=True, newest last (bounded).
_requeued: OrderedDict[str, bool] = OrderedDict()
_REQUEUED_LIMIT = 1_000
# Task ids of lost pool processes being handled by on_failure, and whether Celery ended them
# (task_failure or task_retry sent, or the message requeued) rather than finding they had succeeded.
_handling: dict[str, bool] = {}


def install_request_hooks() -> None:
    """Wrap ``Request.on_failure``, ``on_timeout`` and ``reject`` to see pool endings (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    Request.on_failure = _wrap_on_failure(Request.on_failure)
    Request.on_timeout = _wrap_on_timeout(Request.on_timeout)
    Request.reject = _wrap_reject(Request.reject)


def ending_signalled(task_id: str | None) -> None:
    """Celery sent ``task_failure``/``task_retry`` for a lost pool process's task: it did not succeed."""
    if task_id in _handling:
        _handling[task_id] = True


def _wrap_reject(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def reject(self: Request, requeue: bool = False) -> Any:
        if requeue and not self.acknowledged:
            _requeued[self.id] = True
            if len(_requeued) > _REQUEUED_LIMIT:
                _requeued.popitem(last=False)
        return original(self, requeue=requeue)

    return reject


def _lost_process_exception(request: Request, exception: BaseException) -> BaseException | None:
    """The ``WorkerLostError`` Celery reports for this failure, or ``None`` if the process was not lost."""
    if isinstance(exception, ExceptionWithTraceback):
        exception = exception.exc
    if isinstance(exception, WorkerLostError):
        return exception
    if isinstance(exception, SystemExit | KeyboardInterrupt):
        # Celery treats it as a lost process unless it killed the process itself (revoke, cancel).
        if getattr(request, "_already_cancelled", False) or getattr(request, "_already_revoked", False):
            return None
        return WorkerLostError(f"Worker exited prematurely: {exception!r}")
    return None


def _wrap_on_failure(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def on_failure(self: Request, exc_info: Any, *args: Any, **kwargs: Any) -> Any:
        lost = _lost_process_exception(self, exc_info.exception)
        if lost is None:
            return original(self, exc_info, *args, **kwargs)
        _requeued.pop(self.id, None)
        _handling[self.id] = False
        try:
            return original(self, exc_info, *args, **kwargs)
        finally:
            requeued = _requeued.pop(self.id, False)
            if _handling.pop(self.id, False) or requeued:
                _report_safely(self, "worker_lost", lost, requeued)

    return on_failure


def _wrap_on_timeout(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def on_timeout(self: Request, soft: bool, timeout: float, *args: Any, **kwargs: Any) -> Any:
        # billiard reports a hard time limit to on_failure first (which may requeue), then here.
        result = original(self, soft, timeout, *args, **kwargs)
        if not soft and not worker_state.should_terminate:
            requeued = _requeued.pop(self.id, False)
            # The pool process ends the run span itself (interrupted by SIGTERM first).
            _report_safely(self, "time_limit", TimeLimitExceeded(timeout), requeued, trace_it=False)
        return result

    return on_timeout


def _report_safely(
    request: Request, outcome: str, exception: BaseException, requeued: bool, trace_it: bool = True
) -> None:
    try:
        _report(request, outcome, exception, requeued, trace_it)
    except Exception:  # the worker's own handling must go on whatever happens here
        _logger.exception("spyglass could not report the %s ending of task %s", outcome, request.id)


def _report(request: Request, outcome: str, exception: BaseException, requeued: bool, trace_it: bool) -> None:
    state = runtime.current()
    if state is None:
        return
    name, queue = task_label(request.name), queue_of(request)
    metrics = state.celery_metrics()
    if metrics is not None:
        metrics.failed(name, queue, type_name(exception))
        metrics.ended(name, queue, outcome)
    if trace_it:
        started = request.time_start or time.time()
        _end_run_span(state, request, outcome, started, exception, {"celery.requeued": requeued})


def report_unrun_task(request: Any, outcome: str) -> None:
    """A zero-length ``run/{task}`` span with status ERROR for a task revoked or expired before it ran."""
    state = runtime.current()
    if state is None or request is None:
        return
    _end_run_span(state, request, outcome, time.time(), None, {})


def _message_headers(request: Any) -> dict[str, Any]:
    """The message headers of a worker ``Request``, or of the task ``Context`` (its attributes) Celery passes."""
    headers = getattr(request, "request_dict", None)
    if headers is None:
        headers = getattr(request, "__dict__", None)
    return headers if isinstance(headers, dict) else {}


def _end_run_span(
    state: runtime.Telemetry,
    request: Any,
    outcome: str,
    started: float,
    exception: BaseException | None,
    attributes: dict[str, Any],
) -> None:
    tracer = state.master_tracer()
    if tracer is None:
        return
    headers = _message_headers(request)
    parent = state.propagator.extract(headers)
    name = getattr(request, "name", None) or getattr(request, "task_name", None) or "unknown"
    span = tracer.start_span(
        f"{RUN_SPAN_PREFIX}{name}",
        context=parent,
        kind=SpanKind.CONSUMER,
        start_time=int(started * 1e9),
        attributes={
            "celery.action": "run",
            "celery.task_name": name,
            "messaging.message.id": getattr(request, "id", "") or "",
            "celery.outcome": outcome,
            **canvas_attributes(headers),
            **attributes,
        },
    )
    if exception is not None:
        span.record_exception(exception)
    span.set_status(Status(StatusCode.ERROR, outcome if exception is None else f"{outcome}: {exception!r}"))
    span.end()
