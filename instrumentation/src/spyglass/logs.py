r"""Structured logs: one JSON object per line, with the trace and span of the moment.

structlog loggers (``spyglass.get_logger``) and standard-library loggers (werkzeug, gunicorn,
libraries, ``app.logger``) share one processor chain and one renderer, so every line has the same
fields: ``timestamp`` (ISO-8601 UTC), ``level``, ``event``, ``logger``, ``service.name`` and, while
a span is active, ``trace_id`` and ``span_id``.

Client input cannot forge a line or leak a secret through them:

* secret values are redacted: fields by key (nested too), and in the free text of the
  ``event`` message and of the ``exception`` traceback, ``key=value`` pairs with a secret key and
  bearer tokens (see :meth:`spyglass.redaction.Redactor.redact_text`);
* in the JSON format every line is one JSON object: besides JSON's own escapes, the characters
  some readers take for line breaks (U+0085, U+2028, U+2029) and the other C1 controls are
  written as ``\uNNNN``; a value JSON cannot hold (a lone surrogate, an integer over 64 bits,
  nesting deeper than 255) is written by the standard library's encoder or as a placeholder,
  and a log call never raises into the application;
* in the console format control characters in keys, values and exception messages are
  escaped (``\x0a``), so a line is never broken by input.

In the JSON format the lines can also be exported as OpenTelemetry log records
(``OTEL_LOGS_EXPORTER``: ``otlp`` to a collector, ``otlp_json_file`` to OTLP JSON lines); see
:mod:`spyglass.log_export`.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

from spyglass.bound_context import current_bound, merge_bound_context
from spyglass.config import Settings
from spyglass.context_access import current_span
from spyglass.deferred_lines import DeferredLines, frozen_in_place
from spyglass.json_lines import dumps, json_string, needs_escape, utc_text, utc_timestamp
from spyglass.line_writer import LineWriter, UnrenderedLine
from spyglass.log_export import AccessFields, AccessLine, LogLineExporter, LogPipelineCounters, build_log_exporter
from spyglass.process_hooks import call_at_exit
from spyglass.redaction import Redactor, escape_control_characters

__all__ = [
    "AccessLog",
    "attach_log_metrics",
    "configure_logging",
    "flush_logs",
    "get_logger",
    "reset_logging",
]

_HANDLER_NAME = "spyglass"
Processor = Callable[[Any, str, MutableMapping[str, Any]], Any]
_writer: LineWriter | None = None
_exporters: list[LogLineExporter] = []


class _Counters:
    """Forwards the export counts to the metrics once :func:`attach_log_metrics` has given them."""

    target: LogPipelineCounters | None = None

    def dropped(self, count: int, error_type: str) -> None:
        if self.target is not None:
            self.target.dropped(count, error_type)

    def exported(self, count: int, error_type: str = "") -> None:
        if self.target is not None:
            self.target.exported(count, error_type)


_counters = _Counters()


class _LineLogger:
    """The structlog output logger: rendered bytes go to the line writer of the pipeline in place.

    A logger bound before logging was set up again (a module's ``log = get_logger(...)`` imported
    before a gunicorn or Celery pool process sets up its own pipeline) writes through the new
    pipeline, so its lines are batched and exported like every other; once logging is reset, they
    go to the writer it was made with, which writes them at once.
    """

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def msg(self, message: bytes | UnrenderedLine) -> None:
        """Write one rendered line, or queue one to render later (see :class:`_DeferOrRender`)."""
        writer = _writer or self._writer
        if type(message) is tuple:
            writer.write_later(message)
        else:
            writer.write(message + b"\n")  # type: ignore[operator]

    log = debug = info = warn = warning = error = err = fatal = failure = exception = critical = msg


class _LineHandler(logging.Handler):
    """The standard-library handler: formatted records go to the shared line writer."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            formatter = self.formatter
            if isinstance(formatter, _JsonRecordFormatter):
                line = formatter.format_bytes(record)
            else:
                line = self.format(record).encode("utf-8", "backslashreplace")
            self._writer.write(line + b"\n")
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write the lines still pending (``logging.shutdown`` calls this at exit)."""
        self._writer.flush()


# Attributes every LogRecord has: anything else on a record came from ``extra=`` (as structlog's ExtraAdder sees it).
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("name", 0, "pathname", 0, "msg", (), None).__dict__)
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}  # as structlog's add_log_level maps them


class _JsonRecordFormatter(logging.Formatter):
    """Standard-library records as spyglass JSON lines, in one pass over the record.

    The fields and their order are those of structlog's ``ProcessorFormatter`` running
    spyglass's processor chain. ``ProcessorFormatter`` copies each record and runs a generic
    chain; Celery logs a line per task received and per task run, so the cost shows. Records
    structlog itself routed through the standard library (none in spyglass's own setup) still
    go to ``ProcessorFormatter``.
    """

    def __init__(self, settings: Settings, structlog_formatter: logging.Formatter) -> None:
        super().__init__()
        self._service_name = settings.service_name
        self._redactor = Redactor(settings.redact_keys)
        self._structlog_formatter = structlog_formatter

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line (without the newline)."""
        return self.format_bytes(record).decode("utf-8")

    def format_bytes(self, record: logging.LogRecord) -> bytes:
        """The record as one JSON line (without the newline), UTF-8."""
        if hasattr(record, "_logger"):
            return self._structlog_formatter.format(record).encode("utf-8", "backslashreplace")
        method = record.levelname.lower()
        event: dict[str, Any] = {"event": record.getMessage()}
        if record.exc_info:
            event["exc_info"] = record.exc_info
        if record.stack_info:
            event["stack_info"] = record.stack_info
        event["logger"] = record.name
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES:
                event[key] = value
        merge_bound_context(None, method, event)
        event["level"] = _LEVEL_NAMES.get(method, method)
        event["timestamp"] = utc_timestamp()
        event["service.name"] = self._service_name
        _add_trace_context(None, method, event)
        event = self._redactor.redact_event(event)
        if "exc_info" in event:
            event = structlog.processors.format_exc_info(None, method, event)
            _redact_exception_text(self._redactor, event)
        return dumps(event)


class _DeferOrRender:
    """The structlog processor chain of the JSON lines, which defers a line's rendering when it can.

    A line whose values cannot change is captured for the log writer's thread to render
    (:class:`spyglass.deferred_lines.DeferredLines`); any other (an exception or stack to format,
    an object among its values) goes through ``chain`` at once.
    """

    def __init__(self, deferred: DeferredLines, chain: list[Processor]) -> None:
        self._deferred = deferred
        self._chain = chain

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        if "exc_info" not in event_dict and "stack_info" not in event_dict and "exception" not in event_dict:
            line = self._deferred.capture(event_dict, _LEVEL_NAMES.get(method, method), time.time_ns())  # type: ignore[arg-type]
            if line is not None:
                return (line,), {}
        for processor in self._chain:
            event_dict = processor(logger, method, event_dict)
        return event_dict


def _log_exporters(settings: Settings) -> list[LogLineExporter]:
    """One export queue per ``OTEL_LOGS_EXPORTER`` entry."""
    from spyglass.tracing import build_resource

    resource = build_resource(settings)
    return [
        LogLineExporter(
            build_log_exporter(
                name, endpoint=settings.otlp_logs_endpoint, timeout_s=settings.otlp_timeout_s, path=settings.logs_file
            ),
            resource,
            _counters,
            max_queue=settings.blrp_max_queue_size,
            max_batch=settings.blrp_max_export_batch_size,
            schedule_delay_s=settings.blrp_schedule_delay_ms / 1000,
        )
        for name in settings.logs_exporters
    ]


def _tee_to(exporters: list[LogLineExporter]) -> Callable[[list[bytes]], None] | None:
    if not exporters:
        return None
    if len(exporters) == 1:
        return exporters[0].offer

    def offer_to_all(lines: list[bytes]) -> None:
        for exporter in exporters:
            exporter.offer(lines)

    return offer_to_all


def _stdout_writer(settings: Settings, exporters: list[LogLineExporter]) -> LineWriter | None:
    """A line writer on stdout's file descriptor, or ``None`` when stdout has none (or for the console)."""
    if settings.log_format != "json":
        return None
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    sys.stdout.flush()
    return LineWriter(descriptor, max_delay=settings.log_flush_interval_s, tee=_tee_to(exporters))


def _add_trace_context(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if "trace_id" not in event_dict:
        context = current_span().get_span_context()
        if context.is_valid:
            event_dict["trace_id"] = format(context.trace_id, "032x")
            event_dict["span_id"] = format(context.span_id, "016x")
    return event_dict


def _service_name_adder(service_name: str) -> Processor:
    def add_service_name(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict["service.name"] = service_name
        return event_dict

    return add_service_name


def _redact_exception_text(redactor: Redactor, event_dict: MutableMapping[str, Any]) -> None:
    exception = event_dict.get("exception")
    if type(exception) is str:
        event_dict["exception"] = redactor.redact_text(exception)


def _redacting(redactor: Redactor) -> Processor:
    def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        return redactor.redact_event(event_dict)  # type: ignore[arg-type]

    return redact


def _redacting_exceptions(redactor: Redactor) -> Processor:
    """Runs after the traceback is formatted: secrets in exception messages (and source lines) go."""

    def redact_exception(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        _redact_exception_text(redactor, event_dict)
        return event_dict

    return redact_exception


def _escape_strings(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Console format: control characters in keys and string values become visible escapes."""
    return {
        escape_control_characters(key) if isinstance(key, str) else key: (
            escape_control_characters(value) if isinstance(value, str) else value
        )
        for key, value in event_dict.items()
    }


def _format_exception_escaped(exc_info: Any) -> str:
    """A traceback as structlog formats it, with control characters in exception messages escaped.

    The console format keeps tracebacks on several lines; a message (or note) holding a newline
    would otherwise start a line of its own that could pass for a log line.
    """
    exception = traceback.TracebackException(*exc_info)
    _escape_exception_messages(exception, set())
    return "".join(exception.format()).removesuffix("\n")


def _escape_exception_messages(exception: traceback.TracebackException, seen: set[int]) -> None:
    if id(exception) in seen:
        return
    seen.add(id(exception))
    message = getattr(exception, "_str", None)  # the message str(exc) gave (CPython 3.11 to 3.13)
    if isinstance(message, str):
        exception._str = escape_control_characters(message)  # type: ignore[attr-defined]
    notes = getattr(exception, "__notes__", None)
    if isinstance(notes, list | tuple):
        exception.__notes__ = [escape_control_characters(str(note)) for note in notes]  # type: ignore[attr-defined]
    for nested in (exception.__cause__, exception.__context__, *(getattr(exception, "exceptions", None) or ())):
        if nested is not None:
            _escape_exception_messages(nested, seen)


def _drop_werkzeug_access_lines(record: logging.LogRecord) -> bool:
    # werkzeug's development server logs every request; spyglass's access log replaces those lines.
    return not (isinstance(record.msg, str) and " - - [" in record.msg)


def _json_bytes(event_dict: Any, **_kwargs: Any) -> bytes:
    return dumps(event_dict)


def _json_text(event_dict: Any, **_kwargs: Any) -> str:
    return dumps(event_dict).decode("utf-8")


def _shared_processors(settings: Settings) -> list[Processor]:
    processors: list[Processor] = [
        merge_bound_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _service_name_adder(settings.service_name),
        _add_trace_context,
        _redacting(Redactor(settings.redact_keys)),
    ]
    if settings.log_format == "console":
        processors.append(_escape_strings)
    return processors


def configure_logging(settings: Settings) -> None:
    """Route structlog and standard-library logging through the spyglass pipeline on stdout."""
    global _writer, _exporters
    level = logging.getLevelNamesMapping()[settings.log_level.upper()]
    shared = _shared_processors(settings)
    retired_writer, retired_exporters = _writer, _exporters
    _exporters = _log_exporters(settings) if settings.log_format == "json" else []
    _writer = writer = _stdout_writer(settings, _exporters)
    call_at_exit(_flush_at_exit)
    if settings.log_format == "console":
        renderer: Processor = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json_text)
    native_factory: Any
    if writer is not None:
        line_logger = _LineLogger(writer)
        native_factory = lambda *_args: line_logger  # noqa: E731 - structlog wants a factory
        native_renderer: Processor = structlog.processors.JSONRenderer(serializer=_json_bytes)
    else:
        native_factory = structlog.PrintLoggerFactory(sys.stdout)
        native_renderer = renderer

    exceptions: list[Processor] = [
        structlog.processors.ExceptionRenderer(_format_exception_escaped)
        if settings.log_format == "console"
        else structlog.processors.format_exc_info,
        _redacting_exceptions(Redactor(settings.redact_keys)),
    ]
    processors: list[Processor] = [*shared, *exceptions, native_renderer]
    if writer is not None and settings.log_format == "json":
        processors = [_DeferOrRender(DeferredLines(settings.service_name, Redactor(settings.redact_keys)), processors)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=native_factory,
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exceptions,
            renderer,
        ],
    )
    handler: logging.Handler = _LineHandler(writer) if writer is not None else logging.StreamHandler(sys.stdout)
    handler.set_name(_HANDLER_NAME)
    if writer is not None and settings.log_format == "json":
        handler.setFormatter(_JsonRecordFormatter(settings, formatter))
    else:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # The SDK's own export warnings repeat once per failed batch: let each through at most once a minute.
    handler.addFilter(_RateLimit(60.0, prefix="opentelemetry"))
    # Python warnings (DeprecationWarning, UserWarning...) become log lines too, not raw stderr text.
    logging.captureWarnings(True)
    werkzeug = logging.getLogger("werkzeug")
    if _drop_werkzeug_access_lines not in werkzeug.filters:
        werkzeug.addFilter(_drop_werkzeug_access_lines)
    _hand_over(retired_writer, retired_exporters, writer, _exporters)
    _retire(retired_writer, retired_exporters)
    if settings.logs_exporters and settings.log_format != "json":
        logging.getLogger("spyglass.logs").warning(
            "log export (OTEL_LOGS_EXPORTER) needs SPYGLASS_LOG_FORMAT=json; logs go to stdout only",
            extra={"log_format": settings.log_format},
        )


def _hand_over(
    retired_writer: LineWriter | None,
    retired_exporters: list[LogLineExporter],
    writer: LineWriter | None,
    exporters: list[LogLineExporter],
) -> None:
    """Give what a replaced pipeline still holds to the new one, in order.

    Lines not written yet go out through the new writer (and so to its exporters); lines written
    but not yet exported move to the new exporter in the same place of ``OTEL_LOGS_EXPORTER``. The
    replaced pipeline is then left with nothing to do, so retiring it never waits on a backend:
    a gunicorn worker or Celery pool process, which inherits its master's pipeline and sets up its
    own right after the fork, starts at once even when the collector does not answer.
    """
    if retired_writer is not None and writer is not None:
        for line in retired_writer.take_pending():
            writer.write(line)
    for retired, exporter in zip(retired_exporters, exporters, strict=False):
        queued = retired.take_queued()
        if queued:
            exporter.offer(queued)


def _retire(writer: LineWriter | None, exporters: list[LogLineExporter]) -> None:
    """Close a replaced pipeline: its last lines are written and exported (or counted as lost)."""
    if writer is not None:
        writer.close()
    for exporter in exporters:
        exporter.shutdown()


class _RateLimit(logging.Filter):
    """Lets a given (logger, message) under ``prefix`` through at most once per ``interval`` seconds."""

    def __init__(self, interval: float, prefix: str) -> None:
        super().__init__()
        self._interval = interval
        self._prefix = prefix
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefix):
            return True
        key = (record.name, record.msg)
        last = self._last.get(key)
        if last is not None and record.created - last < self._interval:
            return False
        if len(self._last) > 1024:
            self._last.clear()
        self._last[key] = record.created
        return True


def attach_log_metrics(metrics: LogPipelineCounters | None) -> None:
    """Count exported and dropped log records in ``metrics`` from now on (``None``: stop counting)."""
    _counters.target = metrics


def flush_logs(timeout_s: float | None = None) -> None:
    """Write every pending log line now and export them (before a worker exits, for example).

    Export waits at most ``timeout_s`` seconds per exporter (2 s by default), so a backend that
    is down cannot hold up a process's exit.
    """
    if _writer is not None:
        _writer.flush()
    for exporter in _exporters:
        exporter.flush(timeout_s)


def _flush_at_exit() -> None:
    # Registered after the line writer's own exit hook, so it runs first (atexit is LIFO).
    flush_logs()


def reset_logging() -> None:
    """Undo :func:`configure_logging` (used by :func:`spyglass.shutdown` and tests)."""
    global _writer, _exporters
    _retire(_writer, _exporters)
    _writer, _exporters = None, []
    _counters.target = None
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    logging.captureWarnings(False)
    structlog.reset_defaults()


_new_tuple = tuple.__new__


class AccessLog:
    """Writes the access line of each request.

    The line has the fields, timestamp, service, trace ids and bound context of every other line
    and the same JSON rendering, without structlog's per-call machinery (several times the cost on
    the hot path). In the console format it goes through structlog instead.
    """

    def __init__(self, settings: Settings) -> None:
        threshold = logging.getLevelNamesMapping()[settings.log_level.upper()]
        self._info_enabled = threshold <= logging.INFO
        self._error_enabled = threshold <= logging.ERROR
        self._service_name = settings.service_name
        self._redactor = Redactor(settings.redact_keys)
        self._fallback = get_logger("spyglass.access") if _writer is None else None
        self._service_json = json_string(settings.service_name)
        self._json_cache: dict[str, str] = {}

    def http_request(
        self, method: str, route: str, path: str, status: int, seconds: float, trace_id: str, span_id: str
    ) -> None:
        """Emit the ``event="request"`` line of an HTTP request, at level ``error`` for a 5xx, else ``info``."""
        error = status >= 500
        if not (self._error_enabled if error else self._info_enabled):
            return
        writer = _writer
        if writer is None or self._fallback is not None:
            fields = {
                "http.request.method": method,
                "http.route": route,
                "url.path": path,
                "http.response.status_code": status,
                "http.server.request.duration": round(seconds, 6),
            }
            if trace_id:
                fields["trace_id"], fields["span_id"] = trace_id, span_id
            logger = self._fallback or get_logger("spyglass.access")
            (logger.error if error else logger.info)("request", **fields)
            return
        # The writer renders the line later, with the rest of its batch.
        now_ns = time.time_ns()
        bound = current_bound()
        if not bound:  # the common case: a line from a template
            writer.write_later((self._render, method, route, path, status, seconds, trace_id, span_id, now_ns))
            return
        values = (method, route, path, status, seconds, trace_id, span_id, now_ns)
        if not frozen_in_place(bound):  # an object bound to the context: its text now, not when the batch is written
            writer.write(self._line_with_context(bound, *values))
            return
        writer.write_later((self._render_with_context, bound, values))

    def _render(self, line: UnrenderedLine) -> bytes:
        """An access line from its values (see :meth:`http_request`), rendered from a template.

        Method and route come from small fixed sets (their JSON is cached) and only the path,
        which a client chooses, may need escaping.
        """
        _, method, route, path, status, seconds, trace_id, span_id, now_ns = line
        ids = f',"trace_id":"{trace_id}","span_id":"{span_id}"' if trace_id else ""
        plain_path = not needs_escape(path)
        path_json = '"' + path + '"' if plain_path else json_string(path)
        level = "error" if status >= 500 else "info"
        duration = f"{seconds:.6f}"
        timestamp, timestamp_ns = utc_text(now_ns)
        text = (
            f'{{"event":"request","level":"{level}","logger":"spyglass.access",'
            f'"http.request.method":{self._json(method)},"http.route":{self._json(route)},'
            f'"url.path":{path_json},'
            f'"http.response.status_code":{status},"http.server.request.duration":{duration},'
            f'"timestamp":"{timestamp}","service.name":{self._service_json}{ids}}}\n'
        )
        if not (plain_path and _exporters):
            return text.encode("utf-8", "backslashreplace")
        # Exported lines carry their fields: the exporter need not parse them back.
        access = AccessLine(text.encode("utf-8", "backslashreplace"))
        # tuple.__new__ builds the named tuple without its Python-level constructor.
        access.fields = _new_tuple(
            AccessFields, (level, method, route, path, status, duration, timestamp_ns, trace_id, span_id)
        )
        return access

    def _json(self, value: str) -> str:
        encoded = self._json_cache.get(value)
        if encoded is None:
            encoded = json_string(value)
            if len(self._json_cache) < 4096:
                self._json_cache[value] = encoded
        return encoded

    def _render_with_context(self, line: UnrenderedLine) -> bytes:
        """An access line with the structlog keys that were bound when it was queued."""
        _, bound, values = line
        return self._line_with_context(bound, *values)

    def _line_with_context(
        self,
        bound: dict[str, Any],
        method: str,
        route: str,
        path: str,
        status: int,
        seconds: float,
        trace_id: str,
        span_id: str,
        epoch_ns: int,
    ) -> bytes:
        record: dict[str, Any] = {
            **self._redactor.redact_mapping(bound),
            "event": "request",
            "level": "error" if status >= 500 else "info",
            "logger": "spyglass.access",
            "http.request.method": method,
            "http.route": route,
            "url.path": path,
            "http.response.status_code": status,
            "http.server.request.duration": round(seconds, 6),
            "timestamp": utc_text(epoch_ns)[0],
            "service.name": self._service_name,
        }
        if trace_id:
            record["trace_id"] = trace_id
            record["span_id"] = span_id
        return dumps(record, newline=True)


def get_logger(name: str = "app", **initial_values: Any) -> Any:
    """A structlog logger whose lines carry ``logger=name`` and the given values."""
    return structlog.get_logger(name).bind(logger=name, **initial_values)
