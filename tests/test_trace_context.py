"""A task's parent context is read from its message exactly as the OpenTelemetry propagator reads it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery.app.task import Context as TaskRequest
from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.instrumentation.celery import celery_getter
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from spyglass.config import load_settings
from spyglass.trace_context import parse_traceparent, remote_parent
from spyglass.tracing import build_propagator

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"
TRACEPARENTS = [
    f"00-{TRACE_ID}-{SPAN_ID}-01",
    f"00-{TRACE_ID}-{SPAN_ID}-00",
    f"00-{TRACE_ID}-{SPAN_ID}-03",  # random-trace-id flag too
    f"  00-{TRACE_ID}-{SPAN_ID}-01  ",
    f"01-{TRACE_ID}-{SPAN_ID}-01-future-field",  # a later version may add fields
    f"00-{TRACE_ID}-{SPAN_ID}-01-extra",  # version 00 may not
    f"ff-{TRACE_ID}-{SPAN_ID}-01",
    f"00-{'0' * 32}-{SPAN_ID}-01",
    f"00-{TRACE_ID}-{'0' * 16}-01",
    f"00-{TRACE_ID.upper()}-{SPAN_ID}-01",
    f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01",
    "garbage",
    "",
]


@pytest.fixture
def w3c_propagator() -> Iterator[None]:
    """The process propagates W3C trace context and baggage, as spyglass sets it up by default."""
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(build_propagator(load_settings({})))
    yield
    propagate.set_global_textmap(previous)


def sdk_extract(request: Any) -> Any:
    """What opentelemetry-instrumentation-celery's own receiver would get."""
    return propagate.get_global_textmap().extract(request, getter=celery_getter) or None


def span_context_of(context: Any) -> Any:
    return None if context is None else trace.get_current_span(context).get_span_context()


@pytest.mark.parametrize("traceparent", TRACEPARENTS)
def test_a_traceparent_gives_the_parent_the_propagator_gives(w3c_propagator, traceparent: str) -> None:
    """Valid or not, every traceparent yields the same parent (or none) as the SDK's propagator."""
    request = TaskRequest({"id": "t", "traceparent": traceparent})
    ours, theirs = remote_parent(request, celery_getter), sdk_extract(request)
    assert span_context_of(ours) == span_context_of(theirs)
    assert (ours is None) == (theirs is None)
    if ours is not None:
        assert dict(ours).keys() == dict(theirs).keys()
        assert span_context_of(ours).is_remote
        assert span_context_of(ours).trace_state == span_context_of(theirs).trace_state


def test_parse_traceparent_reads_ids_and_flags() -> None:
    """The ids and flags of a valid traceparent, as integers; None for an invalid one."""
    parent = parse_traceparent(f"00-{TRACE_ID}-{SPAN_ID}-01")
    assert parent is not None
    assert (parent.trace_id, parent.span_id, parent.trace_flags.sampled) == (int(TRACE_ID, 16), int(SPAN_ID, 16), True)
    assert parse_traceparent(f"00-{TRACE_ID}-{SPAN_ID}-01-extra") is None


def test_trace_state_and_baggage_are_read_by_the_propagator(w3c_propagator) -> None:
    """A message with tracestate or baggage headers gets them in its context, as the SDK extracts them."""
    request = TaskRequest(
        {"id": "t", "traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01", "tracestate": "vendor=v1", "baggage": "tenant=acme"}
    )
    context = remote_parent(request, celery_getter)
    assert span_context_of(context).trace_state.get("vendor") == "v1"
    assert baggage.get_baggage("tenant", context) == "acme"
    assert span_context_of(context) == span_context_of(sdk_extract(request))


def test_a_message_without_trace_headers_has_no_parent(w3c_propagator) -> None:
    """No traceparent: the run starts a trace of its own."""
    assert remote_parent(TaskRequest({"id": "t"}), celery_getter) is None


def test_another_propagator_is_used_as_it_is() -> None:
    """With a propagator spyglass did not build (here: baggage only), it alone decides."""
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([W3CBaggagePropagator()]))
    try:
        request = TaskRequest({"id": "t", "traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01", "baggage": "k=v"})
        context = remote_parent(request, celery_getter)
        assert not span_context_of(context).is_valid  # baggage only: the traceparent is not read
        assert baggage.get_baggage("k", context) == "v"
    finally:
        propagate.set_global_textmap(previous)


def test_a_plain_trace_context_propagator_is_used_as_it_is() -> None:
    """A TraceContext propagator the application set reads the same parent."""
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(TraceContextTextMapPropagator())
    try:
        request = TaskRequest({"id": "t", "traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01"})
        assert span_context_of(remote_parent(request, celery_getter)).trace_id == int(TRACE_ID, 16)
    finally:
        propagate.set_global_textmap(previous)
