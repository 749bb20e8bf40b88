"""SQLAlchemy: a CLIENT span per SQL statement, its duration, and N+1 detection per request or task.

Each statement an instrumented engine sends to the database gets:

- a span following the stable OpenTelemetry database conventions: name ``{operation} {table}``
  (``SELECT products``), ``db.system.name``, ``db.namespace``, ``db.query.text`` (the statement
  with its placeholders: parameter values are never recorded), ``db.operation.name``,
  ``db.collection.name`` (the first table the statement names), ``server.address`` and
  ``server.port``, ``db.operation.batch.size`` for ``executemany``, and on failure ``error.type``,
  ``db.response.status_code`` (the SQLSTATE, where the driver gives one) and ERROR status;
- an observation of ``db_client_operation_duration_seconds`` (``db.client.operation.duration``),
  its span as exemplar;
- a count in the tally of the request or task run it belongs to (see :mod:`spyglass.query_tally`).

The listeners are SQLAlchemy's own ``before_cursor_execute``, ``after_cursor_execute`` and
``handle_error`` engine events: :func:`instrument_sqlalchemy` adds them to one engine,
:func:`install_auto_instrumentation` (``import spyglass.auto``) to every engine of the process,
created before or after. An engine instrumented both ways is traced once.
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import event
from sqlalchemy.engine import Engine

from spyglass import __version__, query_tally, runtime
from spyglass.light_span import LightSpan

__all__ = ["SCOPE", "SqlAlchemyInstrumentation", "install_auto_instrumentation", "instrument_sqlalchemy"]

SCOPE = "spyglass.sqlalchemy"
_QUERY_ATTRIBUTE = "_spyglass_query"
_TEXT_LIMIT = 4096
_STATEMENT_CACHE_LIMIT = 2048
# SQLAlchemy dialect names -> db.system.name values of the semantic conventions.
_SYSTEMS = {
    "postgresql": "postgresql",
    "sqlite": "sqlite",
    "mysql": "mysql",
    "mariadb": "mariadb",
    "mssql": "microsoft.sql_server",
    "oracle": "oracle.db",
}
_OPERATION = re.compile(r"\s*(?:(?:--[^\n]*\n|/\*.*?\*/)\s*)*([A-Za-z]+)", re.S)
_NAME = r"((?:[\w$]+|\"[^\"]+\"|`[^`]+`|\[[^\]]+\])(?:\.(?:[\w$]+|\"[^\"]+\"|`[^`]+`|\[[^\]]+\]))*)"
_TARGETS = {
    "SELECT": re.compile(r"\bFROM\s+" + _NAME, re.I),
    "DELETE": re.compile(r"\bFROM\s+" + _NAME, re.I),
    "INSERT": re.compile(r"\bINTO\s+" + _NAME, re.I),
    "REPLACE": re.compile(r"\bINTO\s+" + _NAME, re.I),
    "UPDATE": re.compile(r"\bUPDATE\s+(?:ONLY\s+)?" + _NAME, re.I),
    "CREATE": re.compile(r"\bTABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?" + _NAME, re.I),
    "DROP": re.compile(r"\bTABLE\s+(?:IF\s+EXISTS\s+)?" + _NAME, re.I),
}


@dataclass(frozen=True)
class _Statement:
    """What the conventions derive from one statement's text (computed once per distinct text)."""

    operation: str
    collection: str
    span_name: str


@dataclass(frozen=True)
class _EngineFacts:
    """Attributes every span of one engine carries."""

    system: str
    attributes: tuple[tuple[str, str | int], ...]


class _Query:
    __slots__ = ("facts", "span", "span_id", "started", "statement", "trace_id")

    def __init__(self, facts: _EngineFacts, statement: _Statement, span: Any, trace_id: str, span_id: str) -> None:
        self.facts = facts
        self.statement = statement
        self.span = span
        self.trace_id = trace_id
        self.span_id = span_id
        self.started = perf_counter()


def describe_statement(text: str, system: str) -> _Statement:
    """The operation, first table and span name of a SQL statement (as the conventions derive them)."""
    match = _OPERATION.match(text)
    operation = match.group(1).upper() if match else ""
    collection = ""
    target = _TARGETS.get(operation)
    if target is not None:
        found = target.search(text)
        if found:
            collection = found.group(1).strip('"`[]')
    name = f"{operation} {collection}" if operation and collection else operation or system
    return _Statement(operation, collection, name)


def _engine_facts(engine: Engine) -> _EngineFacts:
    url = engine.url
    system = _SYSTEMS.get(engine.dialect.name, engine.dialect.name)
    attributes: list[tuple[str, str | int]] = [("db.system.name", system)]
    if url.database:
        attributes.append(("db.namespace", url.database))
    if url.host:
        attributes.append(("server.address", url.host))
        if url.port:
            attributes.append(("server.port", int(url.port)))
    return _EngineFacts(system, tuple(attributes))


def _error_type(exception: BaseException) -> str:
    kind = type(exception)
    module = kind.__module__
    return f"{module}.{kind.__qualname__}" if module and module != "builtins" else kind.__qualname__


class SqlAlchemyInstrumentation:
    """The engine event listeners, and what they keep per engine and per statement text."""

    def __init__(self) -> None:
        self._facts: weakref.WeakKeyDictionary[Engine, _EngineFacts] = weakref.WeakKeyDictionary()
        self._statements: dict[tuple[str, str], _Statement] = {}
        self._lock = threading.Lock()

    def _facts_of(self, engine: Engine) -> _EngineFacts:
        facts = self._facts.get(engine)
        if facts is None:
            facts = _engine_facts(engine)
            with self._lock:
                self._facts[engine] = facts
        return facts

    def _statement(self, text: str, system: str) -> _Statement:
        key = (text, system)
        statement = self._statements.get(key)
        if statement is None:
            statement = describe_statement(text, system)
            if len(self._statements) < _STATEMENT_CACHE_LIMIT:
                self._statements[key] = statement
        return statement

    # -- engine events ---------------------------------------------------------------------------
    def before_cursor_execute(
        self, conn: Any, _cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        """Start the statement's span and count it in the current request's or task's tally."""
        if context is None or getattr(context, _QUERY_ATTRIBUTE, None) is not None:
            return  # instrumented twice (engine and class): the first listener does the work
        tally = query_tally.current()
        if tally is not None:
            tally.add(statement)
        facts = self._facts_of(conn.engine)
        described = self._statement(statement, facts.system)
        span: Any = None
        trace_id = span_id = ""
        state = runtime.current()
        starter = state.span_starter(SCOPE, __version__) if state is not None else None
        if starter is not None:
            attributes: dict[str, Any] = dict(facts.attributes)
            attributes["db.query.text"] = statement if len(statement) <= _TEXT_LIMIT else statement[:_TEXT_LIMIT]
            if described.operation:
                attributes["db.operation.name"] = described.operation
            if described.collection:
                attributes["db.collection.name"] = described.collection
            if executemany and isinstance(parameters, list | tuple) and len(parameters) > 1:
                attributes["db.operation.batch.size"] = len(parameters)
            span, trace_number, span_number, sampled = starter.start(
                described.span_name, None, attributes, SpanKind.CLIENT
            )
            if sampled:
                trace_id, span_id = f"{trace_number:032x}", f"{span_number:016x}"
        setattr(context, _QUERY_ATTRIBUTE, _Query(facts, described, span, trace_id, span_id))

    def after_cursor_execute(
        self, _conn: Any, _cursor: Any, _statement: str, _parameters: Any, context: Any, _executemany: bool
    ) -> None:
        """End the statement's span and record its duration."""
        query = _take_query(context)
        if query is None:
            return
        elapsed = perf_counter() - query.started
        if query.span is not None:
            query.span.end()
        self._record(query, elapsed, "")

    def handle_error(self, exception_context: Any) -> None:
        """End the failed statement's span with the error, and record its duration."""
        query = _take_query(exception_context.execution_context)
        if query is None:
            return
        elapsed = perf_counter() - query.started
        exception = exception_context.original_exception
        error_type = _error_type(exception)
        span = query.span
        if span is not None:
            attributes: dict[str, Any] = {"error.type": error_type}
            sqlstate = getattr(exception, "sqlstate", None)
            if isinstance(sqlstate, str) and sqlstate:
                attributes["db.response.status_code"] = sqlstate
            if type(span) is LightSpan:
                span.finish(attributes, None, exception, error=True)
            elif span.is_recording():
                span.set_attributes(attributes)
                span.record_exception(exception)
                span.set_status(Status(StatusCode.ERROR))
                span.end()
            else:
                span.end()
        self._record(query, elapsed, error_type)

    @staticmethod
    def _record(query: _Query, elapsed: float, error_type: str) -> None:
        state = runtime.current()
        metrics = state.db_metrics() if state is not None else None
        if metrics is None:
            return
        statement = query.statement
        metrics.operation(
            query.facts.system,
            statement.operation,
            statement.collection,
            error_type,
            elapsed,
            query.trace_id,
            query.span_id,
        )

    # -- registration ----------------------------------------------------------------------------
    def listen(self, target: Any) -> None:
        """Add the listeners to an engine, or to the ``Engine`` class (every engine); idempotent."""
        for name, listener in self._listeners():
            if not event.contains(target, name, listener):
                event.listen(target, name, listener)

    def _listeners(self) -> tuple[tuple[str, Any], ...]:
        return (
            ("before_cursor_execute", self.before_cursor_execute),
            ("after_cursor_execute", self.after_cursor_execute),
            ("handle_error", self.handle_error),
        )


def _take_query(context: Any) -> _Query | None:
    if context is None:
        return None
    query = getattr(context, _QUERY_ATTRIBUTE, None)
    if query is not None:
        setattr(context, _QUERY_ATTRIBUTE, None)
    return query


_instrumentation: SqlAlchemyInstrumentation | None = None
_setup_lock = threading.Lock()


def _shared() -> SqlAlchemyInstrumentation:
    global _instrumentation
    with _setup_lock:
        if _instrumentation is None:
            _instrumentation = SqlAlchemyInstrumentation()
        return _instrumentation


def instrument_sqlalchemy(engine: Engine) -> Engine:
    """Trace and measure every statement of ``engine`` (idempotent); returns the engine.

    Accepts an ``AsyncEngine`` too (its ``sync_engine`` is instrumented). Initialises spyglass
    from the environment first if :func:`spyglass.init` has not run.
    """
    if runtime.init().disabled:
        return engine
    target = getattr(engine, "sync_engine", engine)
    _shared().listen(target)
    query_tally.enable()
    return engine


def install_auto_instrumentation() -> None:
    """Trace every SQLAlchemy engine of the process, created before or after this call."""
    if runtime.init().disabled:
        return
    _shared().listen(Engine)
    query_tally.enable()
