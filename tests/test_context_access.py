"""spyglass's shortcut to the current OpenTelemetry context changes it exactly as the API does.

The Flask middleware and the light spans read and set the current context through
``spyglass.context_access`` rather than ``opentelemetry.context``; code that uses the API (the
application, other instrumentations) must see the same context either way.
"""

from __future__ import annotations

import contextvars
import logging

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from spyglass.context_access import context_access, current_span, span_in_context, span_of


def _span(span_id: int) -> NonRecordingSpan:
    return NonRecordingSpan(SpanContext(0xABC, span_id, False, TraceFlags(TraceFlags.SAMPLED)))


def test_a_span_made_current_through_the_shortcut_is_the_one_the_api_sees() -> None:
    """Attaching makes a context current for trace.get_current_span; resetting restores the previous one."""
    access = context_access()
    outer, inner = _span(1), _span(2)
    outer_token = otel_context.attach(trace.set_span_in_context(outer))
    try:
        token = access.attach(span_in_context(inner, access.current()))
        assert trace.get_current_span() is inner
        assert access.current() is otel_context.get_current()
        access.reset(token)
        assert trace.get_current_span() is outer
    finally:
        otel_context.detach(outer_token)
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_span_in_context_keeps_the_other_values_and_leaves_the_original_alone() -> None:
    """The new context holds the span and every value of the one it copies, which is unchanged."""
    base = otel_context.set_value("tenant", "acme")
    made = span_in_context(_span(3), base)
    assert trace.get_current_span(made) is span_of(made)
    assert span_of(made).get_span_context().span_id == 3
    assert made["tenant"] == "acme"
    assert span_of(base) is trace.INVALID_SPAN
    assert made == trace.set_span_in_context(span_of(made), base)


def test_a_token_from_another_context_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """Detaching, as with the API, never raises into the application: the failure is logged."""
    access = context_access()
    token = contextvars.copy_context().run(access.attach, span_in_context(_span(4), access.current()))
    with caplog.at_level(logging.ERROR, logger="spyglass.traces"):
        access.detach(token)
    assert "Failed to detach context" in caplog.text
    assert trace.get_current_span() is trace.INVALID_SPAN


class _OtherRuntime(ContextVarsRuntimeContext):
    """Stands for a runtime context chosen with OTEL_PYTHON_CONTEXT."""


def test_another_runtime_context_is_used_through_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a runtime other than the default one, the shortcut is the API's own functions."""
    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", _OtherRuntime())
    access = context_access()
    assert access.attach is otel_context.attach
    assert access.current is otel_context.get_current
    token = access.attach(span_in_context(_span(5), access.current()))
    assert trace.get_current_span().get_span_context().span_id == 5
    access.detach(token)
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_current_span_is_the_span_the_api_calls_current() -> None:
    """current_span() answers what trace.get_current_span() does, inside and outside a span."""
    assert current_span() is trace.INVALID_SPAN
    span = _span(6)
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        assert current_span() is span is trace.get_current_span()
    finally:
        otel_context.detach(token)
    assert current_span() is trace.INVALID_SPAN
