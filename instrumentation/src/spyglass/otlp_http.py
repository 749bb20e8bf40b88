"""OTLP/HTTP exporters whose batches are encoded by :mod:`spyglass.otlp_proto`.

They are the OpenTelemetry SDK's own ``OTLPSpanExporter`` and ``OTLPLogExporter`` (same
variables, endpoint, headers, compression, timeout, retries, size limit and internal metrics);
only the step that turns a batch into protobuf bytes is replaced, the part of an export that
costs the most CPU (:mod:`spyglass.otlp_proto` writes the bytes the SDK's message objects would
serialise to, several times faster). Should a later SDK release no longer have the internals
that step sits between, the exporters fall back to the SDK's own ``export`` unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from spyglass.otlp_proto import encode_log_lines_request, encode_spans_request

__all__ = ["OtlpProtoLogExporter", "OtlpProtoSpanExporter"]

_logger = logging.getLogger(__name__)
_SDK_INTERNALS = ("_shutdown", "_metrics", "_client", "_max_request_size")


def _has_sdk_internals(exporter: object) -> bool:
    return all(hasattr(exporter, name) for name in _SDK_INTERNALS)


def _send(exporter: Any, count: int, encode: Callable[[], bytes], signal: str) -> bool:
    """Encode a batch of ``count`` items and POST it the way the SDK's exporter does; True on success.

    The SDK's internal metrics (``otel.sdk.exporter.*``, when enabled) see the same operation.
    """
    if exporter._shutdown:
        _logger.warning("Exporter already shutdown, ignoring batch")
        return False
    with exporter._metrics.export_operation(count) as result:
        try:
            payload = encode()
        except Exception as error:  # an encoding bug loses this batch, never the export thread
            _logger.error("Failed to encode %s batch: %s", signal, error)
            result.error = error
            return False
        limit = exporter._max_request_size
        if 0 < limit < len(payload):
            _logger.warning(
                "Dropping %s batch: serialized size %d bytes exceeds max_request_size %d bytes.",
                signal,
                len(payload),
                limit,
            )
            result.error = ValueError(f"serialized {signal} request of {len(payload)} bytes exceeds {limit} bytes")
            return False
        outcome = exporter._client.export(payload)
        if not outcome.success:
            result.error = outcome.error
            if outcome.status_code is not None:
                result.error_attrs = {"http.response.status_code": outcome.status_code}
            return False
    return True


class OtlpProtoSpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` encoding its batches with :func:`spyglass.otlp_proto.encode_spans_request`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct = _has_sdk_internals(self)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Encode and send one batch; FAILURE (never an exception) when it could not be delivered."""
        if not self._direct:  # pragma: no cover - an SDK release without the internals used here
            return super().export(spans)
        delivered = _send(self, len(spans), lambda: encode_spans_request(spans), "span")
        return SpanExportResult.SUCCESS if delivered else SpanExportResult.FAILURE


class OtlpProtoLogExporter(OTLPLogExporter):
    """``OTLPLogExporter`` that also exports spyglass's rendered JSON lines without record objects.

    :class:`spyglass.log_export.LogLineExporter` calls :meth:`export_lines`, which encodes each line
    straight to the protobuf bytes of its log record
    (:func:`spyglass.otlp_proto.encode_log_lines_request`); ``export`` of SDK log records is the
    SDK's own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct = _has_sdk_internals(self)

    def export_lines(self, lines: Sequence[bytes], resource: Resource) -> LogRecordExportResult:
        """Encode and send one batch of lines; FAILURE (never an exception) when it could not be delivered."""
        if not self._direct:  # pragma: no cover - an SDK release without the internals used here
            from spyglass.log_export import line_to_log_record

            return super().export([line_to_log_record(line, resource) for line in lines])
        delivered = _send(self, len(lines), lambda: encode_log_lines_request(lines, resource), "logs")
        return LogRecordExportResult.SUCCESS if delivered else LogRecordExportResult.FAILURE
