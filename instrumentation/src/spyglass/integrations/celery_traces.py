"""Celery spans: opentelemetry-instrumentation-celery, with what it gets wrong fixed.

It creates a PRODUCER span ``apply_async/{task}`` around each publish and a CONSUMER span
``run/{task}`` around each execution, carrying the context in the message headers. Fixed here:

- a task published by a name the publisher does not register (``send_task``, signatures of
  another service's tasks): its publish span's context manager was only referenced by a local
  variable, so it was closed whenever the garbage collector got to it. In CPython that is the
  moment the signal handler returns: the span ended before the message was sent (it timed
  nothing and was not current while sending); elsewhere it could stay open with its context
  attached. Here it ends after the publish and the context is restored then;
- it keeps each open span under its task id, so with the threads pool a task that retries itself
  at once (``countdown=0``) ran its second run while the first was ending, and the two runs
  took each other's spans: here the key also names the thread (one thread per run in every
  pool; prefork and solo are unchanged);
- chains, groups and chords cannot be followed from its spans: publish and run spans get
  ``celery.root_id``, ``celery.parent_id`` and ``celery.group_id`` (the first task of the
  workflow, the task that published this one, and its group or chord header);
- a run that did not do its work ended with status UNSET when Celery reports no exception:
  a task that rejected its message (``Reject``), and one interrupted by a signal
  (``revoke(terminate=True)``) end with status ERROR here; every run span that ended with a
  known outcome carries it as ``celery.outcome`` (the ``outcome`` label of
  ``celery_task_completed_total``). Retries keep the instrumentation's ``celery.retry.reason`` on
  the retried run and ``celery.retries`` on the next, whose publish span is a child of the
  retried run, so the attempts form one trace.

On the path of every task, the run span's attributes are set in one pass (the instrumentation
reads the signal's arguments as a second task request, for ``celery.state`` alone) and its
``flower.task.runtime.seconds`` OpenTelemetry histogram is left out: spyglass records
``celery_task_runtime_seconds``.

Endings that kill the pool process (hard time limit, lost process) are traced by the main
process: see :mod:`spyglass.integrations.celery_endings`.

Its spans are light spans (:mod:`spyglass.light_tracer`), on the tracer provider of the process
that starts them (prefork pool processes build theirs after the fork): a fraction of the SDK
span's cost per task, on the same processors and exporters.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor, celery_getter
from opentelemetry.instrumentation.celery import utils as celery_utils
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Status, StatusCode

from spyglass.light_tracer import LightTracerProvider

__all__ = ["RUN_SPAN_PREFIX", "SpyglassCeleryInstrumentor", "canvas_attributes", "end_run_span", "instrument_traces"]

RUN_SPAN_PREFIX = "run/"
"""Run spans are named ``run/{task name}`` (as opentelemetry-instrumentation-celery names them)."""
_APPLY_ASYNC = "apply_async"
# Span attribute -> the field of the message headers and of the task request holding it.
_CANVAS_FIELDS = {"celery.root_id": "root_id", "celery.parent_id": "parent_id", "celery.group_id": "group"}


def canvas_attributes(source: Mapping[str, Any] | Any) -> dict[str, str]:
    """``celery.root_id``/``parent_id``/``group_id`` from message headers (a mapping) or a task request."""
    read = source.get if isinstance(source, Mapping) else lambda field: getattr(source, field, None)
    return {attribute: value for attribute, field in _CANVAS_FIELDS.items() if isinstance(value := read(field), str)}


def _set_canvas_attributes(span: trace.Span, source: Mapping[str, Any] | Any) -> None:
    if span.is_recording():
        span.set_attributes(canvas_attributes(source))


def end_run_span(outcome: str | None, state: str | None, retval: Any) -> None:
    """Mark the current run span (before it ends) with how the task ended.

    Called from the ``task_postrun`` receiver that runs while the run span is current.
    """
    span = trace.get_current_span()
    if not span.is_recording():
        return
    if outcome is not None:
        span.set_attribute("celery.outcome", outcome)
    if state is None:
        reason = "hard time limit exceeded" if outcome == "time_limit" else "terminated while running"
        span.set_status(Status(StatusCode.ERROR, reason))
    elif state == "REJECTED":
        span.set_status(Status(StatusCode.ERROR, f"rejected: {retval!r}"))


class SpyglassCeleryInstrumentor(CeleryInstrumentor):
    """``CeleryInstrumentor`` that also ends the publish spans of tasks the publisher does not know."""

    def __init__(self) -> None:
        super().__init__()
        # Instrumentors are singletons: keep what a previous construction set up.
        if not hasattr(self, "_unknown_publishes"):
            # task id -> (span, context token) of publishes of unknown tasks, between the two signals.
            self._unknown_publishes: dict[str, tuple[trace.Span, object]] = {}

    def _trace_before_publish(self, *args: Any, **kwargs: Any) -> None:
        if celery_utils.retrieve_task_from_sender(kwargs) is not None:
            super()._trace_before_publish(*args, **kwargs)
            # The publish span is current until after_task_publish.
            _set_canvas_attributes(trace.get_current_span(), kwargs.get("headers") or {})
            return
        task_id = celery_utils.retrieve_task_id_from_message(kwargs)
        if task_id is None:
            return
        task_name = kwargs.get("sender") or "unknown"
        span = self._tracer.start_span(f"{_APPLY_ASYNC}/{task_name}", kind=trace.SpanKind.PRODUCER)
        if span.is_recording():
            span.set_attribute("celery.action", _APPLY_ASYNC)
            span.set_attribute("messaging.message.id", task_id)
            span.set_attribute("celery.task_name", task_name)
            celery_utils.set_attributes_from_context(span, kwargs)
            _set_canvas_attributes(span, kwargs.get("headers") or {})
        token = otel_context.attach(trace.set_span_in_context(span))
        self._unknown_publishes[task_id] = (span, token)
        headers = kwargs.get("headers")
        if headers:
            inject(headers)

    def _trace_prerun(self, *args: Any, **kwargs: Any) -> None:
        """Start the run span under the publish span's context, as the instrumentation does.

        The canvas ids go in with the start attributes; the instrumentation's timer for its
        ``flower.task.runtime.seconds`` histogram is not kept (see :meth:`_trace_postrun`).
        """
        task, task_id = kwargs.get("task"), kwargs.get("task_id")
        if task is None or task_id is None:
            return
        request = task.request
        parent = extract(request, getter=celery_getter) or None
        token = otel_context.attach(parent) if parent is not None else None
        span = self._tracer.start_span(
            f"{RUN_SPAN_PREFIX}{task.name}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=canvas_attributes(request),
        )
        activation = trace.use_span(span, end_on_exit=True)
        activation.__enter__()
        celery_utils.attach_context(task, task_id, span, activation, token)

    def _trace_postrun(self, *args: Any, **kwargs: Any) -> None:
        """End the run span with the instrumentation's attributes, in one pass.

        The instrumentation reads the signal's arguments as a task request too, which only ever
        yields ``celery.state``, and records a ``flower.task.runtime.seconds`` histogram on the
        OpenTelemetry meter provider (spyglass records ``celery_task_runtime_seconds``): neither
        is repeated here, on the path of every task.
        """
        task, task_id = kwargs.get("task"), kwargs.get("task_id")
        if task is None or task_id is None:
            return
        started = celery_utils.retrieve_context(task, task_id)
        if started is None:
            return
        span, activation, token = started
        if span.is_recording():
            span.set_attribute("celery.action", "run")
            state = kwargs.get("state")
            if state:
                span.set_attribute("celery.state", state)
            celery_utils.set_attributes_from_context(span, task.request)
            span.set_attribute("celery.task_name", task.name)
        activation.__exit__(None, None, None)
        celery_utils.detach_context(task, task_id)
        if token is not None:
            otel_context.detach(token)

    def _trace_after_publish(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        task_id = celery_utils.retrieve_task_id_from_message(kwargs)
        pending = self._unknown_publishes.pop(task_id, None) if task_id is not None else None
        if pending is None:
            CeleryInstrumentor._trace_after_publish(*args, **kwargs)
            return
        span, token = pending
        otel_context.detach(token)
        span.end()


def _keyed_by_thread(helper: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap one of the instrumentation's span-storage helpers so its key names the thread too."""

    @functools.wraps(helper)
    def keyed(task: Any, task_id: Any, *args: Any, **kwargs: Any) -> Any:
        return helper(task, (task_id, threading.get_ident()), *args, **kwargs)

    keyed.__spyglass_keyed__ = True  # type: ignore[attr-defined]
    return keyed


def _key_spans_by_thread() -> None:
    for name in ("attach_context", "detach_context", "retrieve_context"):
        helper = getattr(celery_utils, name)
        if not getattr(helper, "__spyglass_keyed__", False):
            setattr(celery_utils, name, _keyed_by_thread(helper))


def instrument_traces() -> None:
    """Connect the publish and run spans (once per process), as light spans."""
    _key_spans_by_thread()
    instrumentor = SpyglassCeleryInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=LightTracerProvider())
