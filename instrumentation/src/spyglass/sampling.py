"""Sampling from ``OTEL_TRACES_SAMPLER``: the SDK's sampler, and the same decision as plain data.

:func:`build_sampler` gives the tracer provider its sampler. :func:`build_sampling_rule` gives the
request hot path the same decision as two numbers it applies inline, without the sampler
protocol's calls and objects (``tests/test_sampling.py`` holds the two equal for every setting).
"""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import SpanContext

from spyglass.config import Settings

__all__ = ["TRACE_ID_LIMIT", "SamplingRule", "build_sampler", "build_sampling_rule"]

TRACE_ID_LIMIT = TraceIdRatioBased.TRACE_ID_LIMIT


def build_sampler(settings: Settings) -> Sampler:
    """The sampler named by ``OTEL_TRACES_SAMPLER`` (and ``OTEL_TRACES_SAMPLER_ARG``)."""
    name = settings.traces_sampler
    if name == "always_on":
        return ALWAYS_ON
    if name == "always_off":
        return ALWAYS_OFF
    if name == "traceidratio":
        return TraceIdRatioBased(settings.traces_sampler_arg)
    if name == "parentbased_always_off":
        return ParentBased(ALWAYS_OFF)
    if name == "parentbased_traceidratio":
        return ParentBased(TraceIdRatioBased(settings.traces_sampler_arg))
    return ParentBased(ALWAYS_ON)


@dataclass(frozen=True)
class SamplingRule:
    """What the standard samplers decide, as data: the request hot path applies it without calls.

    A trace is sampled when ``parent_based`` and it has a valid parent whose sampled flag is set
    or, without such a parent (or when not parent based), when the low 64 bits of its id are
    below ``bound`` (the SDK's ``TraceIdRatioBased`` rule; 0 never samples, 2**64 always does).
    The standard samplers keep the parent's trace state and add no attribute.
    """

    parent_based: bool
    bound: int

    def sampled(self, parent: SpanContext | None, trace_id: int) -> bool:
        """The decision for a trace id under a valid parent (or ``None``)."""
        if parent is not None and self.parent_based:
            return parent.trace_flags.sampled
        return trace_id & TRACE_ID_LIMIT < self.bound


def build_sampling_rule(settings: Settings) -> SamplingRule:
    """The rule of :func:`build_sampler`'s sampler (tested against the SDK's samplers for every setting)."""
    name = settings.traces_sampler
    if name.endswith("always_on"):
        rate = 1.0
    elif name.endswith("always_off"):
        rate = 0.0
    else:
        rate = settings.traces_sampler_arg
    return SamplingRule(parent_based=name.startswith("parentbased_"), bound=TraceIdRatioBased.get_bound_for_rate(rate))
