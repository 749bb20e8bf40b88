"""Structured logs: one JSON object per line, with the trace and span of the moment.

structlog loggers (``spyglass.get_logger``) and standard-library loggers (werkzeug, gunicorn,
libraries, ``app.logger``) share one processor chain and one renderer, so every line has the same
fields: ``timestamp`` (ISO-8601 UTC), ``level``, ``event``, ``logger``, ``service.name`` and, while
a span is active, ``trace_id`` and ``span_id``. Secret values are redacted and, in the console
format, control characters are escaped so client input cannot forge a line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
import structlog
from opentelemetry import trace

from spyglass.config import Settings
from spyglass.redaction import Redactor, escape_control_characters

__all__ = ["configure_logging", "get_logger", "reset_logging"]

_HANDLER_NAME = "spyglass"
Processor = Callable[[Any, str, MutableMapping[str, Any]], Any]


def _add_trace_context(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if "trace_id" not in event_dict:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event_dict["trace_id"] = format(context.trace_id, "032x")
            event_dict["span_id"] = format(context.span_id, "016x")
    return event_dict


def _service_name_adder(service_name: str) -> Processor:
    def add_service_name(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict["service.name"] = service_name
        return event_dict

    return add_service_name


def _redacting(redactor: Redactor) -> Processor:
    def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        return redactor.redact_mapping(event_dict)  # type: ignore[arg-type]

    return redact


def _escape_strings(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = escape_control_characters(value)
    return event_dict


def _drop_werkzeug_access_lines(record: logging.LogRecord) -> bool:
    # werkzeug's development server logs every request; spyglass's access log replaces those lines.
    return not (isinstance(record.msg, str) and " - - [" in record.msg)


def _json_bytes(event_dict: Any, **_kwargs: Any) -> bytes:
    return orjson.dumps(event_dict, default=repr)


def _json_text(event_dict: Any, **_kwargs: Any) -> str:
    return orjson.dumps(event_dict, default=repr).decode("utf-8")


def _shared_processors(settings: Settings) -> list[Processor]:
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
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
    level = logging.getLevelNamesMapping()[settings.log_level.upper()]
    shared = _shared_processors(settings)
    if settings.log_format == "console":
        renderer: Processor = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
        native_factory: Any = structlog.PrintLoggerFactory(sys.stdout)
        native_renderer = renderer
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json_text)
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is not None:
            native_factory = structlog.BytesLoggerFactory(buffer)
            native_renderer = structlog.processors.JSONRenderer(serializer=_json_bytes)
        else:
            native_factory = structlog.PrintLoggerFactory(sys.stdout)
            native_renderer = renderer

    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, native_renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=native_factory,
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # The SDK's own export warnings repeat once per failed batch: let each through at most once a minute.
    handler.addFilter(_RateLimit(60.0, prefix="opentelemetry"))
    werkzeug = logging.getLogger("werkzeug")
    if _drop_werkzeug_access_lines not in werkzeug.filters:
        werkzeug.addFilter(_drop_werkzeug_access_lines)


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


def reset_logging() -> None:
    """Undo :func:`configure_logging` (used by :func:`spyglass.shutdown` and tests)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    structlog.reset_defaults()


def get_logger(name: str = "app", **initial_values: Any) -> Any:
    """A structlog logger whose lines carry ``logger=name`` and the given values."""
    return structlog.get_logger(name).bind(logger=name, **initial_values)
