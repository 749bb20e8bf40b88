"""A span exporter that appends OTLP JSON lines to a file.

Each line is one ``ExportTraceServiceRequest`` in the OTLP/JSON encoding (hex trace and span
ids, integer enums, lowerCamelCase keys): the format the OpenTelemetry Collector's
``otlpjsonfile`` receiver reads, so a local run's traces can be replayed into Tempo later.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Sequence

import orjson
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = ["OtlpJsonFileSpanExporter", "spans_to_otlp_json"]

_logger = logging.getLogger("spyglass.traces")
_ID_KEYS = ("traceId", "spanId", "parentSpanId")


def _hex_ids(node: object) -> None:
    """Turn the base64 ids of the protobuf JSON mapping into the hex ids OTLP/JSON requires."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_KEYS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _hex_ids(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids(item)


def spans_to_otlp_json(spans: Sequence[ReadableSpan]) -> bytes:
    """Encode spans as one OTLP/JSON ``ExportTraceServiceRequest`` (no trailing newline)."""
    message = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    _hex_ids(message)
    return orjson.dumps(message)


class OtlpJsonFileSpanExporter(SpanExporter):
    """Append each exported batch as one OTLP/JSON line to ``path`` (directories are created).

    Several processes may append to the same file: each batch is written with a single
    ``write`` on a file opened in append mode.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write the batch; a failure to write loses the batch and is reported as a failure."""
        line = spans_to_otlp_json(spans) + b"\n"
        try:
            with self._lock:
                directory = os.path.dirname(self._path)
                if directory:
                    os.makedirs(directory, exist_ok=True)
                descriptor = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(descriptor, line)
                finally:
                    os.close(descriptor)
        except OSError as exc:
            _logger.warning("cannot write traces file", extra={"path": self._path, "error": str(exc)})
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: the file is opened per batch."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Batches are written synchronously."""
        return True
