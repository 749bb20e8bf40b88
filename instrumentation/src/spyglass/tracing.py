"""The OpenTelemetry SDK trace pipeline, built from validated :class:`~spyglass.config.Settings`.

Export never blocks a request: spans go to the SDK's batch processor (a bounded queue drained by
a background thread). Spans the queue drops and batches the exporter cannot deliver are counted in
:class:`~spyglass.metrics.instruments.SpanPipelineMetrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from spyglass import __version__
from spyglass.config import Settings
from spyglass.metrics.instruments import SpanPipelineMetrics
from spyglass.otlp_json import OtlpJsonFileSpanExporter
from spyglass.sampling import build_sampler
from spyglass.trace_context import mark_w3c_propagator

__all__ = ["CountingSpanExporter", "build_propagator", "build_resource", "build_tracer_provider"]

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
        processor = BatchSpanProcessor(
            CountingSpanExporter(_exporter(name, settings), metrics),
            max_queue_size=settings.bsp_max_queue_size,
            schedule_delay_millis=settings.bsp_schedule_delay_ms,
            max_export_batch_size=settings.bsp_max_export_batch_size,
            export_timeout_millis=settings.bsp_export_timeout_ms,
        )
        _count_drops(processor, metrics)
        provider.add_span_processor(processor)
    return provider
