"""The OpenTelemetry SDK trace pipeline, built from validated :class:`~spyglass.config.Settings`.

Export never blocks a request: spans go to the SDK's batch processor (a bounded queue drained by
a background thread), which :class:`SpanBatchProcessor` gives a shorter way in for spyglass's
own spans. Spans the queue drops and batches the exporter cannot deliver are counted in
:class:`~spyglass.metrics.instruments.SpanPipelineMetrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from spyglass import __version__
from spyglass.config import Settings
from spyglass.metrics.instruments import SpanPipelineMetrics
from spyglass.otlp_json import OtlpJsonFileSpanExporter
from spyglass.sampling import build_sampler
from spyglass.trace_context import mark_w3c_propagator

if TYPE_CHECKING:
    from spyglass.light_span import LightSpan

__all__ = ["CountingSpanExporter", "SpanBatchProcessor", "build_propagator", "build_resource", "build_tracer_provider"]

_logger = logging.getLogger("spyglass.traces")


def build_resource(settings: Settings) -> Resource:
    """The service's resource: SDK defaults, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``."""
    attributes = dict(settings.resource_attributes)
    attributes["service.name"] = settings.service_name
    attributes["telemetry.distro.name"] = "spyglass"
    attributes["telemetry.distro.version"] = __version__
    return Resource.create(attributes)


def build_propagator(settings: Settings) -> TextMapPropagator:
    """W3C trace context and baggage (or what ``OTEL_PROPAGATORS`` names)."""
    known: dict[str, TextMapPropagator] = {
        "tracecontext": TraceContextTextMapPropagator(),
        "baggage": W3CBaggagePropagator(),
    }
    propagator = CompositePropagator([known[name] for name in settings.propagators])
    if "tracecontext" in settings.propagators:  # and nothing but baggage besides: see trace_context
        mark_w3c_propagator(propagator)
    return propagator


class CountingSpanExporter(SpanExporter):
    """Delegates to an exporter and counts the spans it delivered and lost."""

    def __init__(self, delegate: SpanExporter, metrics: SpanPipelineMetrics) -> None:
        self._delegate = delegate
        self._metrics = metrics

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export and count; an exception from the delegate counts as lost spans, never propagates."""
        try:
            result = self._delegate.export(spans)
        except Exception as exc:  # an exporter bug must not kill the export thread
            _logger.warning("span export raised", extra={"error": repr(exc)})
            self._metrics.exported(len(spans), type(exc).__name__)
            return SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._metrics.exported(len(spans))
        else:
            self._metrics.exported(len(spans), "export_failed")
        return result

    def shutdown(self) -> None:
        """Shut the delegate down."""
        self._delegate.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush the delegate."""
        return self._delegate.force_flush(timeout_millis)


def _exporter(name: str, settings: Settings) -> SpanExporter:
    if name == "otlp":
        from spyglass.otlp_http import OtlpProtoSpanExporter

        return OtlpProtoSpanExporter(endpoint=settings.otlp_traces_endpoint, timeout=settings.otlp_timeout_s)
    if name == "console":
        return ConsoleSpanExporter(service_name=settings.service_name)
    return OtlpJsonFileSpanExporter(settings.traces_file)


_QUEUE_INTERNALS = ("_queue", "_shutdown", "_max_queue_size", "_max_export_batch_size", "_worker_awaken", "emit")
_SAMPLED = int(TraceFlags.SAMPLED)


class SpanBatchProcessor(BatchSpanProcessor):
    """The SDK's batch span processor, with a shorter way in for spyglass's own spans.

    :meth:`on_end_light` queues an ended :class:`~spyglass.light_span.LightSpan` as ``on_end``
    does, without the SDK's system call per span to learn the process id (the SDK's own
    after-fork hook already gives a child process an empty queue and its own export thread) and
    without reading the sampled flag through three properties. A span that would be dropped
    (full queue, processor shut down) takes the SDK's own path, which counts and logs the drop.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        inner = getattr(self, "_batch_processor", None)
        if not all(hasattr(inner, name) for name in _QUEUE_INTERNALS):  # pragma: no cover - guards an SDK upgrade
            self.on_end_light = self.on_end  # type: ignore[method-assign]

    def on_end_light(self, span: LightSpan) -> None:
        """``on_end`` for a :class:`~spyglass.light_span.LightSpan`."""
        if not span._context[3] & _SAMPLED:  # SpanContext is a tuple; its fourth item is the trace flags
            return
        inner = self._batch_processor
        queue = inner._queue
        if inner._shutdown or len(queue) >= inner._max_queue_size:
            inner.emit(span)
            return
        queue.appendleft(span)  # the SDK's order: the export thread pops the oldest from the right
        if len(queue) >= inner._max_export_batch_size and not inner._worker_awaken.is_set():
            inner._worker_awaken.set()


def _count_drops(processor: BatchSpanProcessor, metrics: SpanPipelineMetrics) -> None:
    """Route the SDK batch processor's own drop accounting to our Prometheus counters."""
    inner = getattr(processor, "_batch_processor", None)
    if inner is not None and hasattr(inner, "_metrics"):
        inner._metrics = metrics
    else:  # pragma: no cover - guards an SDK upgrade; the drop test fails loudly if this path is taken
        _logger.warning("this OpenTelemetry SDK version hides its span queue; dropped spans are not counted")


def build_tracer_provider(settings: Settings, metrics: SpanPipelineMetrics) -> TracerProvider:
    """A tracer provider with one batch processor per configured exporter."""
    provider = TracerProvider(resource=build_resource(settings), sampler=build_sampler(settings), shutdown_on_exit=True)
    for name in settings.traces_exporters:
        if name == "none":
            continue
        processor = SpanBatchProcessor(
            CountingSpanExporter(_exporter(name, settings), metrics),
            max_queue_size=settings.bsp_max_queue_size,
            schedule_delay_millis=settings.bsp_schedule_delay_ms,
            max_export_batch_size=settings.bsp_max_export_batch_size,
            export_timeout_millis=settings.bsp_export_timeout_ms,
        )
        _count_drops(processor, metrics)
        provider.add_span_processor(processor)
    return provider
