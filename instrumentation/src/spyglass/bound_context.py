"""The keys bound to structlog's context-local context, read without walking the whole context.

structlog keeps each bound key in a context variable of its own (``structlog_<key>``) and finds
them, in ``get_contextvars`` and ``merge_contextvars``, by walking every context variable of the
current context: the application's, Flask's and OpenTelemetry's too, about a microsecond per log
line even when nothing is bound. structlog also registers each variable it creates, once per key
ever bound in the process; reading those few variables gives the same keys and values for a
fraction of the cost. Keys come in the order they were first bound in the process (structlog's
walk yields them in no documented order). Should a structlog release no longer keep that
registry, the functions here fall back to structlog's own walk.
"""

from __future__ import annotations

import contextvars
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["current_bound", "merge_bound_context"]

_PREFIX_LENGTH = len("structlog_")
_REGISTRY: dict[str, contextvars.ContextVar[Any]] | None = getattr(structlog.contextvars, "_CONTEXT_VARS", None)


def current_bound() -> dict[str, Any]:
    """The keys bound in the current context and their values, as ``structlog.contextvars.get_contextvars``."""
    if _REGISTRY is None:
        return structlog.contextvars.get_contextvars()
    bound: dict[str, Any] = {}
    for name, variable in tuple(_REGISTRY.items()):  # one step under the GIL, whatever other threads bind
        value = variable.get(Ellipsis)
        if value is not Ellipsis:
            bound[name[_PREFIX_LENGTH:]] = value
    return bound


def merge_bound_context(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Adds the bound keys to a line, as structlog's ``merge_contextvars`` processor does (a key of the line wins)."""
    for key, value in current_bound().items():
        event_dict.setdefault(key, value)
    return event_dict
