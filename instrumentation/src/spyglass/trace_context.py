"""Reading a W3C ``traceparent`` on the hot path, as the OpenTelemetry propagator would.

A Celery pool process extracts the publisher's context once per task. Through the global
propagator that costs several times the parsing itself (a composite of propagators, a getter per
header, the regular expression looked up again, keyword validation of the span context). When
the process's propagator is spyglass's own W3C one (``tracecontext``, optionally with
``baggage``) and a message carries nothing but a ``traceparent``, :func:`remote_parent` parses it
directly, with the same rules and the same result; anything else goes to the propagator.
"""

from __future__ import annotations

import re
from typing import Any

from opentelemetry.context import Context
from opentelemetry.propagate import get_global_textmap
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from spyglass.context_access import span_in_context

__all__ = ["mark_w3c_propagator", "parse_traceparent", "remote_parent"]

_TRACEPARENT = re.compile(TraceContextTextMapPropagator._TRACEPARENT_HEADER_FORMAT_RE)
_INVALID_TRACE_ID = "0" * 32
_INVALID_SPAN_ID = "0" * 16
_FLAGS = {value: TraceFlags(value) for value in range(256)}
_EMPTY = Context()
_w3c_propagators: set[TextMapPropagator] = set()  # by identity; a process builds a handful at most


def mark_w3c_propagator(propagator: TextMapPropagator) -> TextMapPropagator:
    """Note that ``propagator`` reads W3C trace context (and baggage) only; returns it."""
    _w3c_propagators.add(propagator)
    return propagator


def parse_traceparent(header: str) -> SpanContext | None:
    """The remote span context a ``traceparent`` value names, or ``None`` if it is not valid.

    The rules of ``TraceContextTextMapPropagator``: its pattern, no all-zero ids, version ``ff``
    invalid, nothing after the flags in version ``00``.
    """
    match = _TRACEPARENT.search(header)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if trace_id == _INVALID_TRACE_ID or span_id == _INVALID_SPAN_ID:
        return None
    if version == "ff" or (version == "00" and rest):
        return None
    return SpanContext(int(trace_id, 16), int(span_id, 16), True, _FLAGS[int(flags, 16)])


def remote_parent(carrier: Any, getter: Any, read: Any = getattr) -> Context | None:
    """The context a message's headers carry, as ``opentelemetry.propagate.extract`` returns it.

    ``read(carrier, name, None)`` returns a header's value (``getattr`` for a Celery task
    request). ``None`` when the headers name no valid parent and carry no baggage.
    """
    propagator = get_global_textmap()
    if propagator in _w3c_propagators:
        header = read(carrier, "traceparent", None)
        if type(header) is str and read(carrier, "tracestate", None) is None and read(carrier, "baggage", None) is None:
            parent = parse_traceparent(header)
            if parent is None:
                return None
            return span_in_context(NonRecordingSpan(parent), _EMPTY)
    return propagator.extract(carrier, getter=getter) or None
