r"""Span and log exporters that append OTLP JSON lines to a file.

Each line is one ``ExportTraceServiceRequest`` (or ``ExportLogsServiceRequest``) in the OTLP/JSON
encoding (hex trace and span ids, integer enums, lowerCamelCase keys, fields at their default value
left out): the format the OpenTelemetry Collector's ``otlpjsonfile`` receiver reads, so a local
run's traces can be replayed into Tempo (and its logs into Loki) later. Spans are encoded directly
from the SDK's objects: going through protobuf messages and ``MessageToDict`` costs several times
more CPU on the export thread.

A file that cannot be written (disk full, read-only file system, a directory that cannot be
created) costs the application nothing: the export thread drops the batch and reports a failure,
which the caller counts (``otel_sdk_exporter_span_exported_total{error_type="export_failed"}``,
``otel_sdk_exporter_log_exported_total{error_type="export_failed"}``). Each process logs one
warning when its writes start failing (naming the file and the error) and one line when they
work again on a file system with free blocks, with the number of spans or records lost in
between (a small batch that still fits in the last page of the file on a full disk does not end
the outage). Exporters of one file in one process share that state (a gunicorn worker that sets
up its own pipeline still holds its master's until it is retired), and a forked child starts its
own, so each process says it once. The file is opened for each batch, so writing resumes by
itself once there is room, or the file system is writable, again. A write that the disk cut
short is taken back, so the file never holds half a line.

Every line is valid UTF-8 JSON on one line: a string that is not valid Unicode (a lone surrogate,
from a decoded file name or a broken client) has the offending code points replaced by U+FFFD
instead of losing its batch, and characters that some readers take for line breaks (C1 controls,
U+2028, U+2029) are written as ``\uNNNN`` escapes.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import re
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
from spyglass.process_hooks import call_after_fork_in_child
from spyglass.redaction import escape_json_line_breaks

_UNSET_STATUS = LightSpan._status  # a light span's status until something sets one

__all__ = [
    "OtlpJsonFileLogExporter",
    "OtlpJsonFileSpanExporter",
    "encode_logs_json",
    "encode_spans_json",
    "spans_to_otlp_json",
]

# OTLP SpanFlags: the parent's remoteness is known (0x100), and the parent is remote (0x200).
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_REMOTE_PARENT_FLAGS = _HAS_IS_REMOTE | _IS_REMOTE


def _any_value(value: Any) -> dict[str, Any]:
    """An OTLP/JSON AnyValue (64-bit integers as decimal strings, as the protobuf JSON mapping does).

    Subclasses of ``str``, ``int`` and ``float`` (``HTTPStatus.OK``, a ``StrEnum``) are written as
    the plain value.
    """
    kind = type(value)
    if kind is str:
        return {"stringValue": value}
    if kind is bool:
        return {"boolValue": value}
    if kind is int:
        return {"intValue": str(value)}
    if kind is float:
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value[:]}  # slicing a subclass gives a plain str
    if isinstance(value, int):
        return {"intValue": str(int(value))}
    if isinstance(value, float):
        return {"doubleValue": float(value)}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Mapping):
        return {"kvlistValue": {"values": _attributes(value)}}
    if isinstance(value, Sequence):
        return {"arrayValue": {"values": [_any_value(item) for item in value]}}
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
    return _json_line(encode_spans_json(spans))


_SURROGATES = re.compile("[\ud800-\udfff]")


def _json_line(document: dict[str, Any]) -> bytes:
    """``document`` as one line of UTF-8 JSON (no newline), whatever strings it holds."""
    try:
        encoded = orjson.dumps(document)
    except orjson.JSONEncodeError:  # a string with a lone surrogate: rare, so checked only then
        encoded = orjson.dumps(_valid_unicode(document))
    return escape_json_line_breaks(encoded)


def _valid_unicode(value: Any) -> Any:
    """``value`` with every surrogate code point in its strings (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATES.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_valid_unicode(key): _valid_unicode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_valid_unicode(item) for item in value]
    return value


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


def _append_line(path: str, line: bytes, after_failure: bool) -> bool:
    """Append ``line`` to ``path`` with one ``write`` (creating its directory); raises ``OSError``.

    A short write (the disk filled up during it) is taken back, unless another process appended
    after it meanwhile. ``after_failure``: first make sure the file ends with a whole line (a
    process that could not take back its short write leaves a fragment, which then stands alone),
    and return whether the file system has free blocks again (a full disk still takes a small
    line into the last page of the file: that is not the end of the outage).
    """
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    access = os.O_RDWR if after_failure else os.O_WRONLY  # reading only to check the file's end
    descriptor = os.open(path, access | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if after_failure:
            size = os.fstat(descriptor).st_size
            if size and os.pread(descriptor, 1, size - 1) != b"\n":
                line = b"\n" + line
        written = os.write(descriptor, line)
        if written < len(line):
            end = os.lseek(descriptor, 0, os.SEEK_CUR)
            if os.fstat(descriptor).st_size == end:
                os.ftruncate(descriptor, end - written)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return not after_failure or os.fstatvfs(descriptor).f_bavail > 0
    finally:
        os.close(descriptor)


class _JsonLinesFile:
    """Appends lines to a file; logs its first failure, and its first success after failures."""

    def __init__(self, path: str, signal: str, items: str) -> None:
        self.path = path
        self._signal = signal
        self._items = items
        self._logger = logging.getLogger(f"spyglass.{signal}")
        self.start_over()

    def start_over(self) -> None:
        """Forget past failures (a forked child has had none of its own yet)."""
        self._lock = threading.Lock()
        self._failing = False
        self._lost = 0

    def append(self, line: bytes, count: int) -> bool:
        """Append one line holding ``count`` items; False (the items counted as lost) if that failed."""
        failure: OSError | None = None
        with self._lock:
            try:
                room = _append_line(self.path, line, self._failing)
            except OSError as exc:
                failure = exc
                starts, self._failing = not self._failing, True
                self._lost += count
            else:
                recovered = self._failing and room
                if recovered:
                    lost, self._failing, self._lost = self._lost, False, 0
        # Logged outside the lock: a log line may itself be exported through this very file.
        if failure is not None:
            if starts:
                self._logger.warning(
                    f"cannot write the {self._signal} file: {self._items} are dropped until it can be written again",
                    extra={
                        "path": self.path,
                        "error": str(failure),
                        "error.type": errno.errorcode.get(failure.errno or 0, type(failure).__name__),
                        "process.pid": os.getpid(),
                    },
                )
            return False
        if recovered:
            self._logger.info(
                f"writing the {self._signal} file again",
                extra={"path": self.path, "dropped": lost, "process.pid": os.getpid()},
            )
        return True


_files: dict[tuple[str, str], _JsonLinesFile] = {}
_files_lock = threading.Lock()


def _start_over_after_fork() -> None:
    global _files_lock
    _files_lock = threading.Lock()
    for lines_file in _files.values():
        lines_file.start_over()


def _json_lines_file(path: str, signal: str, items: str) -> _JsonLinesFile:
    """The process's one :class:`_JsonLinesFile` for ``signal`` lines in ``path``."""
    call_after_fork_in_child(_start_over_after_fork)
    key = (os.path.abspath(path), signal)
    with _files_lock:
        lines_file = _files.get(key)
        if lines_file is None:
            lines_file = _files[key] = _JsonLinesFile(path, signal, items)
        return lines_file


class OtlpJsonFileSpanExporter(SpanExporter):
    """Append each exported batch as one OTLP/JSON line to ``path`` (directories are created).

    Several processes may append to the same file: each batch is written with a single
    ``write`` on a file opened in append mode. A batch that cannot be written is lost and
    reported as a failure; the trouble is logged once per outage (see the module docstring).
    """

    def __init__(self, path: str) -> None:
        self._file = _json_lines_file(path, "traces", "spans")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write the batch; a failure to write loses the batch and is reported as a failure."""
        if self._file.append(spans_to_otlp_json(spans) + b"\n", len(spans)):
            return SpanExportResult.SUCCESS
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        """Nothing to release: the file is opened per batch."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Batches are written synchronously."""
        return True


class OtlpJsonFileLogExporter(LogRecordExporter):
    """Append each exported batch of log records as one OTLP/JSON line to ``path``.

    Several processes may append to the same file, as with :class:`OtlpJsonFileSpanExporter`.
    A failure to write is reported as a failure (and counted by the caller) and logged once per
    outage: that warning line is exported too, and fails like the others, without another warning.
    """

    def __init__(self, path: str) -> None:
        self._file = _json_lines_file(path, "logs", "log records")

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        """Write the batch; a failure to write loses the batch and is reported as a failure."""
        if self._file.append(_json_line(encode_logs_json(batch)) + b"\n", len(batch)):
            return LogRecordExportResult.SUCCESS
        return LogRecordExportResult.FAILURE

    def shutdown(self) -> None:
        """Nothing to release: the file is opened per batch."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Batches are written synchronously."""
        return True
