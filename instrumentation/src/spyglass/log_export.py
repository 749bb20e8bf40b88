"""Exporting the JSON log lines as OpenTelemetry log records (OTLP/HTTP, or OTLP JSON lines in a file).

Every line spyglass writes to stdout is also handed, as the rendered bytes, to
:class:`LogLineExporter` (see :class:`spyglass.line_writer.LineWriter`'s ``tee``). That costs the
application one list extension per batch of lines: parsing the lines back into log records and
exporting them happens on a background thread, in batches, like the SDK's batching processors.
The queue is bounded (``OTEL_BLRP_MAX_QUEUE_SIZE``): when the backend is slow or down, the oldest
lines are not held forever and every line that is not delivered is counted in
``otel_sdk_processor_log_processed_total`` / ``otel_sdk_exporter_log_exported_total``. A logs
file that cannot be written (``otlp_json_file`` on a full or read-only disk) loses its batches,
counted with ``error_type="export_failed"``, and says so once per outage in the log (see
:mod:`spyglass.otlp_json`); the lines on stdout are not affected.

Each line becomes one log record: ``timestamp`` its time, ``level`` its severity, ``event`` its
body, ``trace_id``/``span_id`` its trace context (so Loki and Grafana link it to its trace),
``logger`` its instrumentation scope, ``exception`` the ``exception.stacktrace`` attribute and every
other field an attribute. ``service.name`` and the other resource attributes go on the resource.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import orjson
from opentelemetry import trace
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from spyglass.process_hooks import call_after_fork_in_child

__all__ = [
    "AccessFields",
    "AccessLine",
    "LineFields",
    "LinesExporter",
    "LogLineExporter",
    "LogPipelineCounters",
    "build_log_exporter",
    "line_to_log_record",
    "parse_line",
]

_SEVERITIES: dict[str, SeverityNumber] = {
    "debug": SeverityNumber.DEBUG,
    "info": SeverityNumber.INFO,
    "warning": SeverityNumber.WARN,
    "warn": SeverityNumber.WARN,
    "error": SeverityNumber.ERROR,
    "exception": SeverityNumber.ERROR,
    "critical": SeverityNumber.FATAL,
    "fatal": SeverityNumber.FATAL,
}
# Fields that are part of the record itself (or of the resource), not attributes.
_RECORD_FIELDS = frozenset({"timestamp", "level", "event", "trace_id", "span_id", "logger", "service.name"})


class LogPipelineCounters(Protocol):
    """What the exporter reports to (implemented by :class:`spyglass.metrics.instruments.LogPipelineMetrics`)."""

    def dropped(self, count: int, error_type: str) -> None:
        """Lines dropped before export (``queue_full``)."""

    def exported(self, count: int, error_type: str = "") -> None:
        """Records delivered (``error_type`` empty) or lost (set)."""


def _time_ns(text: Any) -> int:
    if type(text) is str and len(text) == 27 and text[19] == "." and text[26] == "Z":
        # spyglass's own format (2026-11-23T10:00:00.123456Z): the second is parsed once.
        global _last_second
        prefix, seconds = _last_second
        if text[:19] != prefix:
            seconds = _time_ns(text[:19] + "Z") // 1_000_000_000
            _last_second = (text[:19], seconds)
        fraction = text[20:26]
        if fraction.isdigit():
            return seconds * 1_000_000_000 + int(fraction) * 1000
    if isinstance(text, str):
        try:
            moment = datetime.fromisoformat(text)
            return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000
        except ValueError:
            pass
    return time.time_ns()


_last_second: tuple[str, int] = ("", 0)


def _hex_id(value: Any, width: int) -> int:
    if isinstance(value, str) and len(value) == width:
        try:
            return int(value, 16)
        except ValueError:
            return 0
    return 0


def _attribute_value(value: Any) -> Any:
    """``value`` as an OpenTelemetry attribute value: primitives as they are, anything else as JSON text."""
    if isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else str(value)
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return tuple(value)
    return orjson.dumps(value).decode("utf-8")


class LineFields(NamedTuple):
    """What one rendered JSON log line says, in the terms of an OpenTelemetry log record."""

    timestamp_ns: int
    observed_ns: int
    severity_text: str | None
    severity_number: SeverityNumber
    body: str
    attributes: dict[str, Any]
    trace_id: int
    span_id: int
    scope_name: str | None


def parse_line(line: bytes) -> LineFields:
    """Read one rendered JSON log line (a line that is not a JSON object becomes the body of a record)."""
    if type(line) is not bytes:  # orjson reads exact bytes only (an AccessLine is a subclass)
        line = bytes(line)
    try:
        fields = orjson.loads(line)
    except orjson.JSONDecodeError:
        fields = None
    if not isinstance(fields, dict):
        text = line.decode("utf-8", "backslashreplace").rstrip("\n")
        now = time.time_ns()
        return LineFields(now, now, None, SeverityNumber.UNSPECIFIED, text, {}, 0, 0, None)
    level = str(fields.get("level", "")).lower()
    trace_id = _hex_id(fields.get("trace_id"), 32)
    span_id = _hex_id(fields.get("span_id"), 16)
    if not (trace_id and span_id):
        trace_id = span_id = 0
    attributes: dict[str, Any] = {}
    for key, value in fields.items():
        if key in _RECORD_FIELDS or value is None:
            continue
        kind = type(value)
        if kind is not str and kind is not float:
            value = _attribute_value(value)
        attributes["exception.stacktrace" if key == "exception" else key] = value
    event = fields.get("event", "")
    logger_name = fields.get("logger")
    return LineFields(
        timestamp_ns=_time_ns(fields.get("timestamp")),
        observed_ns=time.time_ns(),
        severity_text=level.upper() or None,
        severity_number=_SEVERITIES.get(level, SeverityNumber.UNSPECIFIED),
        body=event if isinstance(event, str) else orjson.dumps(event).decode("utf-8"),
        attributes=attributes,
        trace_id=trace_id,
        span_id=span_id,
        scope_name=logger_name if isinstance(logger_name, str) else None,
    )


class AccessFields(NamedTuple):
    """The fields an access-log line was rendered from, as the line spells them."""

    level: str
    method: str
    route: str
    path: str
    status: int
    duration: str
    """``http.server.request.duration`` as written in the line (``0.000412``)."""
    timestamp_ns: int
    """The line's ``timestamp`` in nanoseconds since the epoch (the microseconds it writes)."""
    trace_id: str
    """32 hexadecimal digits, or empty when the request was not traced."""
    span_id: str


class AccessLine(bytes):
    """A rendered access-log line (plain bytes to every reader) that also carries its :class:`AccessFields`.

    The OTLP/HTTP exporter encodes the record from the fields instead of parsing the line back
    (:func:`spyglass.otlp_proto.encode_log_lines_request`); the record is the one
    :func:`parse_line` makes of the bytes.
    """

    fields: AccessFields


def line_to_log_record(line: bytes, resource: Resource) -> ReadableLogRecord:
    """One rendered JSON log line as an OpenTelemetry log record (see :func:`parse_line`)."""
    fields = parse_line(line)
    context = None
    if fields.trace_id:
        span = NonRecordingSpan(
            SpanContext(fields.trace_id, fields.span_id, is_remote=False, trace_flags=TraceFlags(1))
        )
        context = trace.set_span_in_context(span)
    record = LogRecord(
        timestamp=fields.timestamp_ns,
        observed_timestamp=fields.observed_ns,
        context=context,
        severity_text=fields.severity_text,
        severity_number=fields.severity_number,
        body=fields.body,
        attributes=fields.attributes,
    )
    scope = InstrumentationScope(fields.scope_name) if fields.scope_name is not None else None
    return ReadableLogRecord(log_record=record, resource=resource, instrumentation_scope=scope)


class LinesExporter(Protocol):
    """An exporter that encodes rendered lines itself (:class:`spyglass.otlp_http.OtlpProtoLogExporter`)."""

    def export_lines(self, lines: Sequence[bytes], resource: Resource) -> LogRecordExportResult:
        """Export one batch of rendered JSON lines as log records of ``resource``."""


class LogLineExporter:
    """Queues rendered log lines and exports them as log records from a background thread.

    ``offer`` is the only call made on the application's threads: it appends to a bounded queue.
    A batch is exported every ``schedule_delay_s`` seconds, or as soon as ``max_batch`` lines wait.
    After a fork the child starts with an empty queue and no thread (lines of the parent stay the
    parent's to export).
    """

    def __init__(
        self,
        exporter: LogRecordExporter,
        resource: Resource,
        counters: LogPipelineCounters,
        *,
        max_queue: int = 2048,
        max_batch: int = 512,
        schedule_delay_s: float = 1.0,
        exit_timeout_s: float = 2.0,
    ) -> None:
        self._exporter = exporter
        self._resource = resource
        self._counters = counters
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._schedule_delay_s = schedule_delay_s
        self._exit_timeout_s = exit_timeout_s
        self._reset()
        call_after_fork_in_child(self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[bytes] = deque()
        self._wake = threading.Event()
        # Flush requests are numbered; the thread records the last one whose lines it exported.
        self._flushes = threading.Condition()
        self._flush_requested = 0
        self._flush_done = 0
        self._stopped = False
        self._thread: threading.Thread | None = None

    def offer(self, lines: Iterable[bytes]) -> None:
        """Queue lines for export; lines beyond the queue's bound are dropped and counted."""
        if self._stopped:
            return
        with self._lock:
            queue = self._queue
            queue.extend(lines)
            overflow = len(queue) - self._max_queue
            if overflow > 0:
                for _ in range(overflow):
                    queue.popleft()
            ready = len(queue) >= self._max_batch
            start = self._thread is None
            if start:
                self._thread = threading.Thread(target=self._run, name="spyglass-log-export", daemon=True)
        if overflow > 0:
            self._counters.dropped(overflow, "queue_full")
        if start:
            self._thread.start()  # type: ignore[union-attr]
        if ready:
            self._wake.set()

    def take_queued(self) -> list[bytes]:
        """Remove and return the lines waiting for export (to hand them to the exporter replacing this one)."""
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
            return queued

    def flush(self, timeout_s: float | None = None) -> bool:
        """Export what is queued now; wait at most ``timeout_s`` (the export thread's bound by default)."""
        if self._thread is None:
            return self._export_queued()
        with self._flushes:
            self._flush_requested += 1
            ticket = self._flush_requested
        self._wake.set()
        with self._flushes:
            return self._flushes.wait_for(
                lambda: self._flush_done >= ticket, self._exit_timeout_s if timeout_s is None else timeout_s
            )

    def shutdown(self) -> None:
        """Export what is queued (waiting at most the exit timeout) and stop; later lines are ignored."""
        self.flush()
        self._stopped = True
        self._wake.set()
        self._exporter.shutdown()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self._schedule_delay_s)
            self._wake.clear()
            with self._flushes:
                ticket = self._flush_requested  # lines offered before this request are queued now
            self._export_queued()
            with self._flushes:
                self._flush_done = ticket
                self._flushes.notify_all()

    def _take(self) -> list[bytes]:
        with self._lock:
            count = min(len(self._queue), self._max_batch)
            return [self._queue.popleft() for _ in range(count)]

    def _export_queued(self) -> bool:
        delivered = True
        while batch := self._take():
            delivered = self._export(batch) and delivered
        return delivered

    def _export(self, lines: Sequence[bytes]) -> bool:
        try:
            export_lines = getattr(self._exporter, "export_lines", None)
            if export_lines is not None:  # encodes the lines itself: no record objects in between
                result = export_lines(lines, self._resource)
            else:
                result = self._exporter.export([line_to_log_record(line, self._resource) for line in lines])
        except Exception as exc:  # an exporter bug must not kill the export thread
            self._counters.exported(len(lines), type(exc).__name__)
            return False
        if result is LogRecordExportResult.SUCCESS:
            self._counters.exported(len(lines))
            return True
        self._counters.exported(len(lines), "export_failed")
        return False


def build_log_exporter(name: str, *, endpoint: str, timeout_s: float, path: str) -> LogRecordExporter:
    """The exporter behind ``OTEL_LOGS_EXPORTER=name``: ``otlp`` (OTLP/HTTP protobuf) or ``otlp_json_file``."""
    if name == "otlp":
        from spyglass.otlp_http import OtlpProtoLogExporter

        return OtlpProtoLogExporter(endpoint=endpoint, timeout=timeout_s)
    if name == "otlp_json_file":
        from spyglass.otlp_json import OtlpJsonFileLogExporter

        return OtlpJsonFileLogExporter(path)
    raise ValueError(f"no log exporter named {name!r}")
