"""SQL statements counted per unit of work (an HTTP request, a Celery task run), and N+1 reports.

The Flask and Celery integrations open a tally when a request or task run starts and close it
when it ends; the SQLAlchemy integration adds each statement it sees to the tally of the current
context. When the unit ends, :func:`close` records how many statements it ran and reports every
statement that ran at least ``SPYGLASS_DB_N_PLUS_ONE_THRESHOLD`` times (the N+1 pattern: rows
loaded one by one in a loop):

- an event ``spyglass.db.n_plus_one`` on the unit's span (``db.query.text``, the run count);
- a warning log line naming the statement, the count, the route or task and the trace;
- one increment of ``spyglass_db_n_plus_one_requests_total`` or ``..._tasks_total``.

Tallies are opened only once an engine is instrumented (:func:`enable`). A unit of work may be
its own tally (the Flask request state and the Celery run are :class:`QueryTally` subclasses), so
opening one allocates nothing, and a unit that runs no statement never builds its counts.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from spyglass import runtime

__all__ = ["N_PLUS_ONE_EVENT", "QueryTally", "close", "current", "detach", "enable", "enabled", "open_tally"]

N_PLUS_ONE_EVENT = "spyglass.db.n_plus_one"
_STATEMENT_LIMIT = 2048
_logger = logging.getLogger("spyglass.db")
_current: contextvars.ContextVar[QueryTally | None] = contextvars.ContextVar("spyglass_query_tally", default=None)
_enabled = False


class QueryTally:
    """How many times each SQL statement ran in one request or task run.

    A subclass on the hot path may set the three slots in its own ``__init__`` instead of calling
    this one (``queries`` 0, ``by_statement`` and ``tally_token`` ``None``).
    """

    __slots__ = ("by_statement", "queries", "tally_token")

    def __init__(self) -> None:
        self.queries = 0
        self.by_statement: dict[str, int] | None = None  # built at the first statement
        self.tally_token: contextvars.Token | None = None

    def add(self, statement: str) -> None:
        """Count one run of ``statement``."""
        self.queries += 1
        counts = self.by_statement
        if counts is None:
            counts = self.by_statement = {}
        counts[statement] = counts.get(statement, 0) + 1

    def repeated(self, threshold: int) -> list[tuple[str, int]]:
        """Statements that ran at least ``threshold`` times, most frequent first (none if ``threshold`` is 0)."""
        if threshold < 2 or self.queries < threshold or self.by_statement is None:
            return []
        found = [(statement, count) for statement, count in self.by_statement.items() if count >= threshold]
        return sorted(found, key=lambda item: -item[1])


def enable() -> None:
    """Start tallying (called when the first SQLAlchemy engine is instrumented)."""
    global _enabled
    _enabled = True


def enabled() -> bool:
    """Whether an engine is instrumented, so that requests and tasks open tallies."""
    return _enabled


def current() -> QueryTally | None:
    """The tally of the request or task run of the current context, if any."""
    return _current.get()


def open_tally(tally: QueryTally | None = None) -> QueryTally | None:
    """Count the statements of the unit of work beginning now into ``tally`` (a new one if not given).

    Returns the tally, or ``None`` when no engine is instrumented (nothing is counted then).
    """
    if not _enabled:
        return None
    if tally is None:
        tally = QueryTally()
    tally.tally_token = _current.set(tally)
    return tally


def detach(tally: QueryTally) -> None:
    """Stop counting into ``tally`` in the current context (statements that follow are not the unit's)."""
    token = tally.tally_token
    if token is None:
        return
    tally.tally_token = None
    # try/except rather than contextlib.suppress: this runs once per request, and suppress builds
    # an object and makes two Python calls each time.
    try:  # noqa: SIM105
        _current.reset(token)
    except ValueError:  # ended in another context (a streamed response): leave that one alone
        pass


def close(
    tally: QueryTally,
    span: Any,
    trace_id: str,
    span_id: str,
    *,
    method: str = "",
    route: str = "",
    task_name: str = "",
) -> None:
    """Record what the unit of work ran: its query count and, past the threshold, N+1 reports.

    Call it before the unit's ``span`` ends (an HTTP request: ``method`` and ``route``; a task
    run: ``task_name``); ``trace_id``/``span_id`` (hex, empty when not sampled) go on the log line.
    """
    detach(tally)
    if tally.queries == 0:
        return
    state = runtime.current()
    metrics = state.db_metrics() if state is not None else None
    if metrics is None:
        return
    if task_name:
        metrics.task_queries(task_name, tally.queries)
    else:
        metrics.request_queries(method, route, tally.queries)
    threshold = state.settings.db_n_plus_one_threshold  # type: ignore[union-attr]
    repeated = tally.repeated(threshold)
    if not repeated:
        return
    if task_name:
        metrics.n_plus_one_task(task_name)
    else:
        metrics.n_plus_one_request(method, route)
    recording = span is not None and span.is_recording()
    for statement, count in repeated:
        text = statement if len(statement) <= _STATEMENT_LIMIT else statement[:_STATEMENT_LIMIT]
        if recording:
            attributes = {
                "db.query.text": text,
                "spyglass.db.query.count": count,
                "spyglass.db.n_plus_one.threshold": threshold,
            }
            span.add_event(N_PLUS_ONE_EVENT, attributes)
        where: dict[str, Any] = {"task_name": task_name} if task_name else {"http_route": route, "method": method}
        if trace_id:
            where["trace_id"], where["span_id"] = trace_id, span_id
        _logger.warning(
            "N+1 queries: the same statement ran %d times in one %s",
            count,
            "task run" if task_name else "request",
            extra={"statement": text, "count": count, "threshold": threshold, **where},
        )
