"""A tracer (and tracer provider) whose spans are :class:`spyglass.light_span.LightSpan` objects.

For instrumentations spyglass takes from OpenTelemetry and runs on a hot path
(opentelemetry-instrumentation-celery starts a span per task published and per task run): they
call ``start_span`` on the tracer they were given and use the span through the API only, so a
light span does the same job at a fraction of the SDK span's cost.

The tracer looks up the process's telemetry at each call: a Celery app is instrumented in the
main process before the prefork pool forks, and each pool process builds its own tracer provider
after the fork. Calls a light span cannot serve (links or an explicit start time) go to the SDK
tracer of the same provider; before spyglass is set up, or with traces off, to the global one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util import types

from spyglass import runtime

__all__ = ["LightTracer", "LightTracerProvider"]

_SCALARS = (str, bool, int, float)


class LightTracer(trace.Tracer):
    """Starts light spans on the current process's tracer provider, under one instrumentation scope."""

    def __init__(self, name: str, version: str | None = None, schema_url: str | None = None) -> None:
        self._scope = (name, version or "", schema_url)

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        """Start a span (not made current), as ``Tracer.start_span`` does."""
        state = runtime.current()
        starter = state.span_starter(*self._scope) if state is not None else None
        plain = attributes is None or all(type(value) in _SCALARS for value in attributes.values())
        if starter is None or links or start_time is not None or not plain:
            return self._sdk_tracer(state).start_span(
                name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
            )
        span, _trace_id, _span_id, _sampled = starter.start(name, context, dict(attributes or {}), kind)
        return span

    @contextmanager
    def start_as_current_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        """Start a span and make it current for the ``with`` block, as ``Tracer.start_as_current_span`` does."""
        span = self.start_span(
            name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
        )
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current

    def _sdk_tracer(self, state: runtime.Telemetry | None) -> trace.Tracer:
        name, version, schema_url = self._scope
        provider = state.tracer_provider if state is not None else None
        if provider is not None:
            return provider.get_tracer(name, version, schema_url)
        return trace.get_tracer(name, version, schema_url=schema_url)


class LightTracerProvider(trace.TracerProvider):
    """Hands out :class:`LightTracer` objects: pass it as ``tracer_provider`` to an instrumentor."""

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes | None = None,
    ) -> trace.Tracer:
        """A light tracer for the named instrumentation scope."""
        return LightTracer(instrumenting_module_name, instrumenting_library_version, schema_url)
