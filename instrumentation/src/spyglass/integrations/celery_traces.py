"""Celery spans: opentelemetry-instrumentation-celery, with what it gets wrong fixed.

It creates a PRODUCER span ``apply_async/{task}`` around each publish and a CONSUMER span
``run/{task}`` around each execution, carrying the context in the message headers. Fixed here:

- a task published by a name the publisher does not register (``send_task``, signatures of
  another service's tasks): its publish span's context manager was only referenced by a local
  variable, so it was closed whenever the garbage collector got to it. In CPython that is the
  moment the signal handler returns: the span ended before the message was sent (it timed
  nothing and was not current while sending); elsewhere it could stay open with its context
  attached. Here it ends after the publish and the context is restored then.

The tracer follows the global tracer provider, which prefork pool processes set after the fork.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.instrumentation.celery import utils as celery_utils
from opentelemetry.propagate import inject

__all__ = ["SpyglassCeleryInstrumentor", "instrument_traces"]

_APPLY_ASYNC = "apply_async"


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
        token = otel_context.attach(trace.set_span_in_context(span))
        self._unknown_publishes[task_id] = (span, token)
        headers = kwargs.get("headers")
        if headers:
            inject(headers)

    def _trace_after_publish(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        task_id = celery_utils.retrieve_task_id_from_message(kwargs)
        pending = self._unknown_publishes.pop(task_id, None) if task_id is not None else None
        if pending is None:
            CeleryInstrumentor._trace_after_publish(*args, **kwargs)
            return
        span, token = pending
        otel_context.detach(token)
        span.end()


def instrument_traces() -> None:
    """Connect the publish and run spans (once per process)."""
    instrumentor = SpyglassCeleryInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
