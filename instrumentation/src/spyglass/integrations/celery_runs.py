"""Every task run, in the process that runs it: the run span, the task metrics and the log context.

spyglass does all of its per-task work in one ``task_prerun`` and one ``task_postrun`` receiver.
Celery calls each receiver of a signal in turn and each would read the task's request again;
at a few hundred tasks per second per process that repeated work is what an instrumented
worker loses in throughput. So:

- :func:`task_started` (``task_prerun``) starts the run span under the context the publisher
  sent and makes it current (when spyglass traces Celery: see :class:`RunTracer`), counts the
  run as active, observes its queue wait (the run span is the exemplar) and names the task in
  every log line logged until it ends;
- :func:`task_finished` (``task_postrun``) works out the outcome, ends the run span with it,
  counts it and observes the runtime. A run interrupted by the hard time limit or a terminating
  revoke (Celery reports no state) is left for the worker's main process to count (see
  :mod:`spyglass.integrations.celery_endings`); its span ends with status ERROR and is exported
  at once, before the pool process is killed.

:func:`task_failed` and :func:`task_retried` note what the ``task_failure`` and ``task_retry``
signals say about a run of this process, and tell the main process's ending hooks about runs of
its pool processes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import datetime
from typing import Any, Protocol

import structlog
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from opentelemetry import trace

from spyglass import query_tally, runtime
from spyglass.context_access import current_span
from spyglass.integrations import celery_endings
from spyglass.integrations.celery_labels import queue_of, task_label, type_name

__all__ = [
    "PUBLISHED_AT_HEADER",
    "RunTracer",
    "set_run_tracer",
    "task_failed",
    "task_finished",
    "task_retried",
    "task_started",
]

PUBLISHED_AT_HEADER = "spyglass_published_at"
"""Message header holding the publish time (Unix seconds, float) that the worker reads back."""
_OUTCOMES = {"SUCCESS": "success", "FAILURE": "failure", "RETRY": "retry", "REJECTED": "rejected"}
_LOG_CONTEXT = ("task_id", "task_name")
_get_ident = threading.get_ident


class RunTracer(Protocol):
    """Starts and ends run spans (see :class:`spyglass.integrations.celery_traces.SpyglassCeleryInstrumentor`)."""

    def start_run(self, task: Any, task_id: str, request: Any) -> tuple[trace.Span, object]:
        """Start the run span of ``task`` and make it current; return it with the token to detach."""

    def end_run(
        self,
        task: Any,
        task_id: str,
        span: trace.Span,
        token: object,
        request: Any,
        state: str | None,
        outcome: str | None,
        retval: Any,
    ) -> None:
        """Set the span's attributes and outcome, end it, and detach its context."""


_run_tracer: RunTracer | None = None


def set_run_tracer(tracer: RunTracer | None) -> None:
    """Start and end run spans with ``tracer`` (``None``: this process traces no run itself)."""
    global _run_tracer
    _run_tracer = tracer


class _Run(query_tally.QueryTally):
    """One run of a task in this process, from ``task_prerun`` to ``task_postrun``.

    It is also the tally of the SQL statements the run executes.
    """

    __slots__ = ("exception", "name", "queue", "request", "span", "span_id", "started", "token", "trace_id")

    def __init__(self, name: str, queue: str, request: Any) -> None:
        self.name = name
        self.queue = queue
        self.request = request
        self.started = time.perf_counter()
        self.exception: BaseException | None = None
        self.span: trace.Span | None = None
        self.token: object = None
        self.trace_id = self.span_id = ""
        self.queries = 0  # the tally's slots, set here rather than through a second __init__ call
        self.by_statement = None
        self.tally_token = None


# Runs in progress in this process, by task id and thread: with the threads pool a task that
# retries itself at once starts its next run while the first one is ending.
_running: dict[tuple[str, int], _Run] = {}


def task_started(sender: Any = None, task_id: str | None = None, task: Any = None, **_extra: Any) -> None:
    """``task_prerun``: start the run span, count the run as active, observe its queue wait."""
    task = task or sender
    if task is None or task_id is None:
        return
    request = task.request
    run = _running[task_id, _get_ident()] = _Run(task_label(task.name), queue_of(request), request)
    tracer = _run_tracer
    started = tracer.start_run(task, task_id, request) if tracer is not None else None
    if started is not None:
        run.span, run.token = started
        context = run.span.get_span_context()
        if context.trace_flags.sampled:
            run.trace_id, run.span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"
    else:  # spans from another instrumentation, if any, are current by now
        run.trace_id, run.span_id = _sampled_span_ids()
    metrics = _metrics()
    if metrics is not None:
        wait = _queue_wait(request, time.time())
        metrics.started(run.name, run.queue, wait, run.trace_id, run.span_id)
    # Every line logged while the task runs (Celery's "succeeded" line included) names it.
    structlog.contextvars.bind_contextvars(task_id=task_id, task_name=task.name)
    query_tally.open_tally(run)


def task_finished(
    task: Any = None, task_id: str | None = None, state: str | None = None, retval: Any = None, **_extra: Any
) -> None:
    """``task_postrun``: end the run span with the outcome, count it, observe the runtime."""
    structlog.contextvars.unbind_contextvars(*_LOG_CONTEXT)
    run = _running.pop((task_id or "", _get_ident()), None)
    if run is None:
        return
    elapsed = time.perf_counter() - run.started
    outcome: str | None
    span_outcome: str | None
    if isinstance(run.exception, SoftTimeLimitExceeded | TimeLimitExceeded):
        outcome = span_outcome = "time_limit"
    elif state is None:
        # Interrupted (SIGTERM at the hard time limit, or from revoke(terminate=True)): Celery
        # reports no state, and the main process counts how it ended. The run span says why.
        outcome = None
        span_outcome = "time_limit" if _past_hard_time_limit(task, run.request, elapsed) else None
    else:
        # IGNORED (the task raised Ignore, e.g. it replaced itself) ended without error.
        outcome = span_outcome = _OUTCOMES.get(state, "success" if state == "IGNORED" else "failure")
    if run.tally_token is not None:
        query_tally.close(run, run.span, run.trace_id, run.span_id, task_name=run.name)
    if run.span is not None:
        tracer = _run_tracer
        if tracer is not None:
            tracer.end_run(task, task_id or "", run.span, run.token, run.request, state, span_outcome, retval)
    metrics = _metrics()
    if metrics is not None:
        metrics.finished(run.name, run.queue, outcome, elapsed, run.trace_id, run.span_id)
    if state is None:
        _flush_interrupted_run()


def task_failed(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, **_extra: Any
) -> None:
    """``task_failure``: count the exception type of a run of this process (or note a pool process's)."""
    run = _running.get((task_id or "", _get_ident()))
    metrics = _metrics()
    if metrics is None or exception is None:
        return
    if run is None:  # not run in this process: the main process reporting on its pool
        celery_endings.ending_signalled(task_id)
        return
    run.exception = exception
    metrics.failed(run.name, run.queue, type_name(exception))


def task_retried(request: Any = None, **_extra: Any) -> None:
    """``task_retry``: in the main process, Celery retrying the task of a lost pool process."""
    task_id = getattr(request, "id", None)
    if (task_id, _get_ident()) not in _running:
        celery_endings.ending_signalled(task_id)


def _metrics() -> Any:
    state = runtime.current()
    return state.celery_metrics() if state is not None else None


def _queue_wait(request: Any, now: float) -> float | None:
    """Seconds from publish (or from the ETA, if later) until now; ``None`` without a publish stamp."""
    published = getattr(request, PUBLISHED_AT_HEADER, None)
    if published is None:
        return None
    try:
        since = float(published)
    except (TypeError, ValueError):
        return None
    eta = getattr(request, "eta", None)
    if eta:
        with contextlib.suppress(TypeError, ValueError):
            since = max(since, datetime.fromisoformat(eta).timestamp())
    return now - since


def _past_hard_time_limit(task: Any, request: Any, elapsed: float) -> bool:
    """Whether a run interrupted after ``elapsed`` seconds reached its hard time limit."""
    if task is None:
        return False
    limits = getattr(request, "timelimit", None) or (None, None)
    hard = limits[0] or task.time_limit or task.app.conf.task_time_limit
    # The pool counts from the moment it accepted the task, a little before task_prerun.
    return bool(hard) and elapsed >= float(hard) * 0.95


def _flush_interrupted_run() -> None:
    """After an interrupted run's span ended: export it now, before the pool process is killed."""
    telemetry = runtime.current()
    if telemetry is not None and telemetry.role == "worker":
        telemetry.flush(timeout_millis=80)


def _sampled_span_ids() -> tuple[str, str]:
    """Hex ids of the current span if it is sampled, else empty strings."""
    context = current_span().get_span_context()
    if not (context.is_valid and context.trace_flags.sampled):
        return "", ""
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
