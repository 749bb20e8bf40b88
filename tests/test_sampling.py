"""The request hot path samples exactly as the SDK's sampler for every OTEL_TRACES_SAMPLER setting."""

from __future__ import annotations

import random

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState

from spyglass.config import SAMPLERS, load_settings
from spyglass.light_span import LightSpanStarter
from spyglass.sampling import build_sampler, build_sampling_rule

ATTRIBUTES = {"http.request.method": "GET", "url.path": "/"}


def parents() -> list[SpanContext | None]:
    """No parent, and remote or local parents, sampled or not, with and without trace state."""
    state = TraceState([("vendor", "value")])
    return [
        None,
        SpanContext(0xA1, 0xB1, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED), trace_state=state),
        SpanContext(0xA2, 0xB2, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT)),
        SpanContext(0xA3, 0xB3, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)),
        SpanContext(0xA4, 0xB4, is_remote=False, trace_flags=TraceFlags(TraceFlags.DEFAULT), trace_state=state),
    ]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("ratio", ["0", "0.25", "1"])
def test_fast_decision_equals_the_sdk_sampler(sampler: str, ratio: str) -> None:
    """Same decision, parent trace state kept and attributes unchanged, for every parent and many trace ids.

    Checked both for the rule itself and for the spans the request path starts with it.
    """
    settings = load_settings({"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": ratio})
    sdk_sampler = build_sampler(settings)
    rule = build_sampling_rule(settings)
    generator = random.Random(7)
    decisions = set()
    for parent in parents():
        context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent is not None else None
        for _ in range(300):
            trace_id = parent.trace_id if parent is not None else generator.getrandbits(128)
            result = sdk_sampler.should_sample(context, trace_id, "GET", SpanKind.SERVER, ATTRIBUTES)
            fast = rule.sampled(parent, trace_id)
            assert fast == result.decision.is_sampled(), (sampler, ratio, parent, trace_id)
            assert result.decision.is_recording() == fast
            expected_state = parent.trace_state if parent is not None else TraceState()
            assert (result.trace_state or TraceState()) == expected_state
            if fast:
                assert dict(result.attributes) == ATTRIBUTES
            decisions.add(fast)
    # The span starter applies the same rule inline: its spans carry the SDK sampler's decision.
    provider = TracerProvider(sampler=sdk_sampler)
    starter = LightSpanStarter(provider, "test", "1", rule)
    for parent in parents():
        context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent is not None else None
        for _ in range(100):
            span, trace_id, _span_id, sampled = starter.start("GET", context, dict(ATTRIBUTES))
            result = sdk_sampler.should_sample(context, trace_id, "GET", SpanKind.SERVER, ATTRIBUTES)
            assert sampled == result.decision.is_sampled() == span.is_recording()
            assert span.get_span_context().trace_flags.sampled == sampled
            assert span.get_span_context().trace_state == (result.trace_state or TraceState())
            span.end()
    if sampler.endswith("traceidratio") and ratio == "0.25":
        assert decisions == {True, False}, "a ratio sampler must both keep and drop over 1,500 trace ids"
