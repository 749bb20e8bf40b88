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

The run span is started and ended by spyglass's own ``task_prerun`` and ``task_postrun``
receivers (:mod:`spyglass.integrations.celery_runs`), which record the task metrics in the same
call: the instrumentation's two receivers are not connected. They would read the task request
again, set the attributes one call each, and record a ``flower.task.runtime.seconds``
OpenTelemetry histogram that spyglass does not export (it records
``celery_task_runtime_seconds``). The span is the same: name, kind, parent, attributes (the
instrumentation's, see :func:`request_attributes`) and where its ``task_failure`` and
``task_retry`` receivers find it.

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

from celery import signals
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor, celery_getter
from opentelemetry.instrumentation.celery import utils as celery_utils
from opentelemetry.propagate import inject
from opentelemetry.trace import Status, StatusCode

from spyglass.context_access import context_access, span_in_context
from spyglass.light_tracer import LightTracerProvider
from spyglass.trace_context import remote_parent

__all__ = [
    "RUN_SPAN_PREFIX",
    "SpyglassCeleryInstrumentor",
    "canvas_attributes",
    "instrument_traces",
    "request_attributes",
]

RUN_SPAN_PREFIX = "run/"
"""Run spans are named ``run/{task name}`` (as opentelemetry-instrumentation-celery names them)."""
_APPLY_ASYNC = "apply_async"
# Span attribute -> the field of the message headers and of the task request holding it.
_CANVAS_ITEMS = (("celery.root_id", "root_id"), ("celery.parent_id", "parent_id"), ("celery.group_id", "group"))
# (request field, span attribute) in the instrumentation's order (CELERY_CONTEXT_ATTRIBUTES): a
# later field overwrites an earlier one's attribute (origin the hostname, routing_key the
# destination), as there.
_REQUEST_FIELDS = tuple(
    (
        field,
        {
            "origin": "celery.hostname",
            "id": "messaging.message.id",
            "correlation_id": "messaging.conversation_id",
            "routing_key": "messaging.destination",
            "declare": "messaging.destination_kind",
        }.get(field, f"celery.{field}"),
    )
    for field in celery_utils.CELERY_CONTEXT_ATTRIBUTES
)
_NO_TIME_LIMITS = ((None, None), [None, None])


def canvas_attributes(source: Mapping[str, Any] | Any) -> dict[str, str]:
    """``celery.root_id``/``parent_id``/``group_id`` from message headers (a mapping) or a task request."""
    mapping = isinstance(source, Mapping)
    attributes = {}
    for attribute, field in _CANVAS_ITEMS:
        value = source.get(field) if mapping else getattr(source, field, None)
        if isinstance(value, str):
            attributes[attribute] = value
    return attributes


def _set_canvas_attributes(span: trace.Span, source: Mapping[str, Any] | Any) -> None:
    if span.is_recording():
        span.set_attributes(canvas_attributes(source))


def request_attributes(request: Any) -> dict[str, Any]:
    """The attributes opentelemetry-instrumentation-celery sets on a run span from the task request.

    The same names and values as its ``set_attributes_from_context``, built as one dict (set on
    the span in one call) rather than one ``set_attribute`` call per field.
    """
    attributes: dict[str, Any] = {}
    for field, name in _REQUEST_FIELDS:
        value = getattr(request, field, None)
        if value is None or value == "":
            continue
        if field == "timelimit":
            if value in _NO_TIME_LIMITS:
                continue
            if None in value:
                value = ["" if limit is None else str(limit) for limit in value]
        elif field == "retries":
            if value == 0:
                continue
        elif field == "delivery_info":
            routing_key = value.get("routing_key")
            if routing_key is not None:
                attributes["messaging.destination"] = routing_key
            value = str(value)
        elif field == "declare":
            value = _destination_kind(value)
        attributes[name] = value
    return attributes


def _destination_kind(declarations: Any) -> Any:
    for declaration in declarations:
        if declaration.exchange.type == "direct":
            return "queue"
        if declaration.exchange.type == "topic":
            return "topic"
    return declarations


class SpyglassCeleryInstrumentor(CeleryInstrumentor):
    """``CeleryInstrumentor`` that also ends the publish spans of tasks the publisher does not know."""

    def __init__(self) -> None:
        super().__init__()
        # Instrumentors are singletons: keep what a previous construction set up.
        if not hasattr(self, "_unknown_publishes"):
            # task id -> (span, context token) of publishes of unknown tasks, between the two signals.
            self._unknown_publishes: dict[str, tuple[trace.Span, object]] = {}
            self._context_access = context_access()

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

    def _instrument(self, **kwargs: Any) -> None:
        """Connect the instrumentation's receivers, except those of the run span.

        spyglass's own ``task_prerun`` and ``task_postrun`` receivers
        (:mod:`spyglass.integrations.celery_runs`) start and end the run span through
        :meth:`start_run` and :meth:`end_run`, with its metrics, in one call each.
        """
        super()._instrument(**kwargs)
        signals.task_prerun.disconnect(self._trace_prerun)
        signals.task_postrun.disconnect(self._trace_postrun)

    def start_run(self, task: Any, task_id: str, request: Any) -> tuple[trace.Span, object]:
        """Start the run span of ``task`` under the context its message carries, and make it current.

        Returns the span and the token that :meth:`end_run` detaches. The span is also kept where
        the instrumentation's ``task_failure`` and ``task_retry`` receivers look for it.
        """
        parent = remote_parent(request, celery_getter)
        span = self._tracer.start_span(
            f"{RUN_SPAN_PREFIX}{task.name}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=canvas_attributes(request),
        )
        context = self._context_access
        token = context.attach(span_in_context(span, parent if parent is not None else context.current()))
        celery_utils.attach_context(task, task_id, span, None, token)
        return span, token

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
        """End a run span started by :meth:`start_run`, with the instrumentation's attributes and the outcome.

        ``state`` is Celery's (``None`` when the run was interrupted: status ERROR, with the
        reason: ``outcome`` ``time_limit`` for the hard time limit); a rejected message ends
        with status ERROR too. ``outcome`` is the ``celery.outcome`` attribute.
        """
        if span.is_recording():
            attributes = request_attributes(request)
            attributes["celery.action"] = "run"
            if state:
                attributes["celery.state"] = state
            attributes["celery.task_name"] = task.name
            if outcome is not None:
                attributes["celery.outcome"] = outcome
            span.set_attributes(attributes)
            if state is None:
                reason = "hard time limit exceeded" if outcome == "time_limit" else "terminated while running"
                span.set_status(Status(StatusCode.ERROR, reason))
            elif state == "REJECTED":
                span.set_status(Status(StatusCode.ERROR, f"rejected: {retval!r}"))
        span.end()
        celery_utils.detach_context(task, task_id)
        self._context_access.detach(token)  # type: ignore[arg-type]

    def publish_failed(self, task_name: str, task_id: str | None, error: BaseException) -> None:
        """End the publish span of a publish that raised: status ERROR, the exception recorded.

        The publisher's own span is current again, as after ``after_task_publish``.
        """
        if task_id is None:
            return
        pending = self._unknown_publishes.pop(task_id, None)
        if pending is not None:
            span, token = pending
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            otel_context.detach(token)
            span.end()
            return
        task = celery_utils.retrieve_task_from_sender({"sender": task_name})
        if task is None:
            return
        started = celery_utils.retrieve_context(task, task_id, is_publish=True)
        if started is None:
            return
        _span, activation, _token = started
        activation.__exit__(type(error), error, error.__traceback__)  # records the exception, status ERROR
        celery_utils.detach_context(task, task_id, is_publish=True)

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


def instrument_traces() -> SpyglassCeleryInstrumentor | None:
    """Connect the publish and run spans (once per process), as light spans.

    Returns the instrumentor that starts and ends run spans, for spyglass's task receivers
    (``None`` if the application instrumented Celery with opentelemetry-instrumentation-celery
    itself: its own receivers then trace the runs).
    """
    _key_spans_by_thread()
    instrumentor = SpyglassCeleryInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=LightTracerProvider())
    return instrumentor if isinstance(instrumentor, SpyglassCeleryInstrumentor) else None
