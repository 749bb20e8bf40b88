"""Span and log exporters that append OTLP JSON lines to a file.

Each line is one ``ExportTraceServiceRequest`` (or ``ExportLogsServiceRequest``) in the OTLP/JSON
encoding (hex trace and span ids, integer enums, lowerCamelCase keys, fields at their default value
left out): the format the OpenTelemetry Collector's ``otlpjsonfile`` receiver reads, so a local
run's traces can be replayed into Tempo (and its logs into Loki) later. Spans are encoded directly
from the SDK's objects: going through protobuf messages and ``MessageToDict`` costs several times
more CPU on the export thread.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

from spyglass.light_span import LightSpan

_UNSET_STATUS = LightSpan._status  # a light span's status until something sets one

__all__ = [
    "OtlpJsonFileLogExporter",
    "OtlpJsonFileSpanExporter",
    "encode_logs_json",
    "encode_spans_json",
    "spans_to_otlp_json",
]

_logger = logging.getLogger("spyglass.traces")
# OTLP SpanFlags: the parent's remoteness is known (0x100), and the parent is remote (0x200).
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_REMOTE_PARENT_FLAGS = _HAS_IS_REMOTE | _IS_REMOTE


def _any_value(value: Any) -> dict[str, Any]:
    """An OTLP/JSON AnyValue (64-bit integers as decimal strings, as the protobuf JSON mapping does)."""
    kind = type(value)
    if kind is str:
        return {"stringValue": value}
    if kind is bool:
        return {"boolValue": value}
    if kind is int:
        return {"intValue": str(value)}
    if kind is float:
        return {"doubleValue": value}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Mapping):
        return {"kvlistValue": {"values": _attributes(value)}}
    if isinstance(value, Sequence):
        return {"arrayValue": {"values": [_any_value(item) for item in value]}}
    if isinstance(value, int | float | str):  # subclasses (enums and the like)
        return _any_value(kind.__mro__[1](value) if not isinstance(value, bool) else bool(value))
    return {}


# Encoded (key, string value) pairs, reused: most attribute values of a service repeat (method,
# scheme, host, route, client address). Bounded: it is emptied when full.
_PAIR_CACHE: dict[tuple[str, str], dict[str, Any]] = {}
_PAIR_CACHE_SIZE = 4096


def _attributes(attributes: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if not attributes:
        return []
    # The SDK hands out a read-only proxy of its attributes, which iterates slowly through the
    # Mapping mix-in; its copy() is a plain dict.
    plain = attributes.copy() if hasattr(attributes, "copy") else dict(attributes)
    encoded = []
    append = encoded.append
    cache = _PAIR_CACHE
    for key, value in plain.items():
        kind = type(value)
        if kind is str:
            pair = cache.get((key, value))
            if pair is None:
                if len(cache) >= _PAIR_CACHE_SIZE:
                    cache.clear()
                pair = cache[key, value] = {"key": key, "value": {"stringValue": value}}
            append(pair)
        elif kind is int:
            append({"key": key, "value": {"intValue": str(value)}})
        else:
            append({"key": key, "value": _any_value(value)})
    return encoded


def _flags(parent: Any) -> int:
    return _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)


def _without_empty(node: dict[str, Any]) -> dict[str, Any]:
    # The protobuf JSON mapping leaves out fields at their default value; do the same.
    return {key: value for key, value in node.items() if value not in (None, "", 0, [], {})}


def _event(event: Any) -> dict[str, Any]:
    encoded: dict[str, Any] = {"timeUnixNano": str(event.timestamp), "name": event.name}
    if event.attributes:
        encoded["attributes"] = _attributes(event.attributes)
    if event.dropped_attributes:
        encoded["droppedAttributesCount"] = event.dropped_attributes
    return encoded


def _link(link: Any) -> dict[str, Any]:
    encoded: dict[str, Any] = {
        "traceId": f"{link.context.trace_id:032x}",
        "spanId": f"{link.context.span_id:016x}",
    }
    if link.attributes:
        encoded["attributes"] = _attributes(link.attributes)
    if link.dropped_attributes:
        encoded["droppedAttributesCount"] = link.dropped_attributes
    encoded["flags"] = _flags(link.context)
    return encoded


_KINDS = {kind: kind.value + 1 for kind in SpanKind}  # OTLP numbers kinds from 1 (0 is unspecified)


def _status(status: Status | None) -> dict[str, Any]:
    if status is None or (status.status_code is StatusCode.UNSET and not status.description):
        return {}
    return _without_empty({"code": status.status_code.value, "message": status.description})


def _identity(trace_id: int, span_id: int, trace_state: Any, parent: Any) -> dict[str, Any]:
    """The ids, trace state and flags that open every encoded span."""
    encoded: dict[str, Any] = {"traceId": f"{trace_id:032x}", "spanId": f"{span_id:016x}"}
    if trace_state:
        encoded["traceState"] = ",".join(f"{key}={value}" for key, value in trace_state.items())
    if parent is not None:
        encoded["parentSpanId"] = f"{parent.span_id:016x}"
        encoded["flags"] = _flags(parent)
    else:
        encoded["flags"] = _HAS_IS_REMOTE
    return encoded


def _add_events_links_status(encoded: dict[str, Any], span: ReadableSpan, events: Any, links: Any) -> None:
    """The events, links (with what limits dropped) and status that close every encoded span."""
    if events:
        encoded["events"] = [_event(event) for event in events]
    if span.dropped_events:
        encoded["droppedEventsCount"] = span.dropped_events
    if links:
        encoded["links"] = [_link(link) for link in links]
    if span.dropped_links:
        encoded["droppedLinksCount"] = span.dropped_links
    encoded["status"] = _status(span.status)


def _light_span(span: LightSpan) -> dict[str, Any]:
    """:func:`_span` for spyglass's light spans, read from their fields (fewer property calls)."""
    parent = span._parent
    trace_state = span._context.trace_state
    if parent is None or trace_state:
        encoded = _identity(span._trace_id, span._span_id, trace_state, parent)
    else:  # the usual case: a parent, no trace state
        encoded = {
            "traceId": f"{span._trace_id:032x}",
            "spanId": f"{span._span_id:016x}",
            "parentSpanId": f"{parent.span_id:016x}",
            "flags": _REMOTE_PARENT_FLAGS if parent.is_remote else _HAS_IS_REMOTE,
        }
    encoded["name"] = span._name
    encoded["kind"] = _KINDS[span._kind]
    encoded["startTimeUnixNano"] = str(span._start_time)
    encoded["endTimeUnixNano"] = str(span._end_time)
    attributes = span._attributes
    if attributes:
        encoded["attributes"] = _attributes(attributes)
        if type(attributes) is not dict and span.dropped_attributes:
            encoded["droppedAttributesCount"] = span.dropped_attributes
    events, links, status = span._events, span._links, span._status
    if type(events) is tuple and type(links) is tuple and status is _UNSET_STATUS:
        encoded["status"] = {}  # none added (nor dropped by a limit), no status set: the usual case
    else:
        _add_events_links_status(encoded, span, events, links)
    return encoded


def _span(span: ReadableSpan) -> dict[str, Any]:
    if type(span) is LightSpan:
        return _light_span(span)
    context = span.get_span_context()
    encoded = _identity(context.trace_id, context.span_id, context.trace_state, span.parent)
    encoded["name"] = span.name
    encoded["kind"] = _KINDS[span.kind]
    if span.start_time:
        encoded["startTimeUnixNano"] = str(span.start_time)
    if span.end_time:
        encoded["endTimeUnixNano"] = str(span.end_time)
    if span.attributes:
        encoded["attributes"] = _attributes(span.attributes)
    if span.dropped_attributes:
        encoded["droppedAttributesCount"] = span.dropped_attributes
    _add_events_links_status(encoded, span, span.events, span.links)
    return encoded


def encode_spans_json(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """Spans as one OTLP/JSON ``ExportTraceServiceRequest`` (a dict), grouped by resource and scope."""
    # Grouped by identity: hashing a Resource serialises all its attributes to JSON every time.
    grouped: dict[int, tuple[Any, dict[int, tuple[Any, list[dict[str, Any]]]]]] = {}
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope
        scopes = grouped.setdefault(id(resource), (resource, {}))[1]
        scopes.setdefault(id(scope), (scope, []))[1].append(_span(span))
    resource_spans = []
    for resource, scopes in grouped.values():
        scope_spans = []
        for scope, encoded in scopes.values():
            scope_json = (
                _without_empty(
                    {"name": scope.name, "version": scope.version, "attributes": _attributes(scope.attributes)}
                )
                if scope is not None
                else {}
            )
            scope_spans.append(
                _without_empty(
                    {"scope": scope_json, "spans": encoded, "schemaUrl": scope.schema_url if scope else None}
                )
                | {"scope": scope_json}
            )
        resource_spans.append(
            _without_empty(
                {
                    "resource": _without_empty({"attributes": _attributes(resource.attributes)}),
                    "scopeSpans": scope_spans,
                    "schemaUrl": resource.schema_url,
                }
            )
            | {"resource": _without_empty({"attributes": _attributes(resource.attributes)})}
        )
    return {"resourceSpans": resource_spans}


def spans_to_otlp_json(spans: Sequence[ReadableSpan]) -> bytes:
    """Encode spans as one OTLP/JSON ``ExportTraceServiceRequest`` line (no trailing newline)."""
    return orjson.dumps(encode_spans_json(spans))


def _scope_json(scope: Any) -> dict[str, Any]:
    if scope is None:
        return {}
    return _without_empty({"name": scope.name, "version": scope.version, "attributes": _attributes(scope.attributes)})


def _log_record(readable: ReadableLogRecord) -> dict[str, Any]:
    record = readable.log_record
    encoded: dict[str, Any] = {}
    if record.timestamp:
        encoded["timeUnixNano"] = str(record.timestamp)
    if record.observed_timestamp:
        encoded["observedTimeUnixNano"] = str(record.observed_timestamp)
    if record.severity_number is not None and record.severity_number.value:
        encoded["severityNumber"] = record.severity_number.value
    if record.severity_text:
        encoded["severityText"] = record.severity_text
    if record.body is not None:
        encoded["body"] = _any_value(record.body)
    if record.attributes:
        encoded["attributes"] = _attributes(record.attributes)
    if readable.dropped_attributes:
        encoded["droppedAttributesCount"] = readable.dropped_attributes
    if record.trace_id:
        encoded["traceId"] = f"{record.trace_id:032x}"
    if record.span_id:
        encoded["spanId"] = f"{record.span_id:016x}"
    if record.trace_flags:
        encoded["flags"] = int(record.trace_flags)
    return encoded


def encode_logs_json(records: Sequence[ReadableLogRecord]) -> dict[str, Any]:
    """Log records as one OTLP/JSON ``ExportLogsServiceRequest`` (a dict), grouped by resource and scope."""
    grouped: dict[int, tuple[Any, dict[tuple[str, str], tuple[Any, list[dict[str, Any]]]]]] = {}
    for readable in records:
        scopes = grouped.setdefault(id(readable.resource), (readable.resource, {}))[1]
        scope = readable.instrumentation_scope
        key = (scope.name, scope.version or "") if scope is not None else ("", "")
        scopes.setdefault(key, (scope, []))[1].append(_log_record(readable))
    resource_logs = []
    for resource, scopes in grouped.values():
        scope_logs = [{"scope": _scope_json(scope), "logRecords": encoded} for scope, encoded in scopes.values()]
        resource_logs.append(
            {"resource": _without_empty({"attributes": _attributes(resource.attributes)}), "scopeLogs": scope_logs}
        )
    return {"resourceLogs": resource_logs}


def _append_line(path: str, line: bytes, lock: threading.Lock) -> None:
    """Append ``line`` to ``path`` with one ``write`` (creating its directory); raises ``OSError``."""
    with lock:
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line)
        finally:
            os.close(descriptor)


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
        try:
            _append_line(self._path, spans_to_otlp_json(spans) + b"\n", self._lock)
        except OSError as exc:
            _logger.warning("cannot write traces file", extra={"path": self._path, "error": str(exc)})
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: the file is opened per batch."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Batches are written synchronously."""
        return True


class OtlpJsonFileLogExporter(LogRecordExporter):
    """Append each exported batch of log records as one OTLP/JSON line to ``path``.

    Several processes may append to the same file, as with :class:`OtlpJsonFileSpanExporter`.
    A failure to write is reported as a failure (and counted by the caller), never logged: a
    log line about the logs file would itself be exported and fail again.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        """Write the batch; a failure to write loses the batch and is reported as a failure."""
        try:
            _append_line(self._path, orjson.dumps(encode_logs_json(batch)) + b"\n", self._lock)
        except OSError:
            return LogRecordExportResult.FAILURE
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: the file is opened per batch."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Batches are written synchronously."""
        return True
