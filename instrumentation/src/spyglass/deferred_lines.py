"""structlog log lines captured on the thread that logs them and rendered on the log writer's thread.

Building a JSON line (merging the bound context, dating it, redacting secrets, encoding) costs
several microseconds, on the thread that logs: a request's or a task's. When every value the line
shows is immutable, nothing can change it afterwards, so that thread only takes what it would
otherwise lose (the fields, the structlog keys bound at that moment, the trace and span then
current, the time) and hands them to
:meth:`spyglass.line_writer.LineWriter.write_later`; the writer renders the line with the rest of
its batch, within ``SPYGLASS_LOG_FLUSH_INTERVAL``. The line is the one the processor chain would
have written at once, field for field.

Immutable means ``str``, ``int``, ``float``, ``bool`` or ``None``, or a dict, list or tuple of
them, which is copied; the same goes for the values bound to the context. A line holding anything
else (an object, whose ``repr`` could change before the writer runs; an exception or a stack to
format) is rendered at once, as before: a line always shows the values it had when it was logged.

Standard-library records are not deferred: spyglass's one-pass formatter renders one in less CPU
than capturing it (message, ``extra`` fields, copies) and rendering it later would take together.
"""

from __future__ import annotations

from typing import Any

from spyglass.bound_context import current_bound
from spyglass.context_access import current_span
from spyglass.json_lines import dumps, utc_text
from spyglass.line_writer import UnrenderedLine
from spyglass.redaction import Redactor

__all__ = ["DeferredLines", "frozen_in_place"]

_SCALARS = frozenset((str, int, float, bool, type(None)))
_MUTABLE = object()
"""What :func:`_frozen` returns for a value that could still change."""


def _frozen(value: Any) -> Any:
    """``value`` if it cannot change, a copy if it is a dict, list or tuple of scalars, else :data:`_MUTABLE`."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        for key, item in value.items():
            if type(item) not in _SCALARS or type(key) is not str:
                return _MUTABLE
        return dict(value)
    if kind is list or kind is tuple:
        for item in value:
            if type(item) not in _SCALARS:
                return _MUTABLE
        return value if kind is tuple else list(value)
    return _MUTABLE


def frozen_in_place(values: dict[str, Any]) -> bool:
    """Whether no value of ``values`` can change any more, once dicts, lists and tuples of scalars in it are copied.

    The copies replace them in ``values``; on ``False`` some may have been replaced already.
    """
    for key, value in values.items():
        if type(value) not in _SCALARS:
            copy = _frozen(value)
            if copy is _MUTABLE:
                return False
            values[key] = copy
    return True


class DeferredLines:
    """Captures lines to render later (:meth:`capture`) and renders them (:meth:`render`) as the chain would.

    The fields are those of spyglass's processor chain, in its order: the line's own fields,
    then the bound structlog context (a field of the line wins), ``level``, ``timestamp``,
    ``service.name`` and, unless the line names its own, ``trace_id`` and ``span_id``; secrets
    are redacted as the chain redacts them.
    """

    __slots__ = ("_redactor", "_service_name")

    def __init__(self, service_name: str, redactor: Redactor) -> None:
        self._service_name = service_name
        self._redactor = redactor

    def capture(self, event: dict[str, Any], level: str, epoch_ns: int) -> UnrenderedLine | None:
        """The line of ``event``, logged at ``epoch_ns``, ready for ``write_later``; ``None`` if it must render now.

        ``event`` is handed over: the caller must not use it afterwards. Its dict and list
        values are replaced by copies.
        """
        if not frozen_in_place(event):
            return None
        bound = current_bound()
        if bound and not frozen_in_place(bound):
            return None
        span = current_span().get_span_context()
        if span.is_valid:
            return (self.render, event, bound, level, epoch_ns, span.trace_id, span.span_id)
        return (self.render, event, bound, level, epoch_ns, 0, 0)

    def render(self, line: UnrenderedLine) -> bytes:
        """The JSON line (with its newline) of a line :meth:`capture` took."""
        _, event, bound, level, epoch_ns, trace_id, span_id = line
        for key, value in bound.items():
            event.setdefault(key, value)
        event["level"] = level
        event["timestamp"] = utc_text(epoch_ns)[0]
        event["service.name"] = self._service_name
        if trace_id and "trace_id" not in event:
            event["trace_id"] = f"{trace_id:032x}"
            event["span_id"] = f"{span_id:016x}"
        return dumps(self._redactor.redact_event(event), newline=True)
