"""The current OpenTelemetry context on hot paths, read and set through the runtime's own variable.

Through the API, attaching a context costs two Python calls (``attach``, then the runtime's
``attach``), detaching two, reading the current span four (``get_current_span``, ``get_value``,
``get_current``, the runtime's ``get_current``) and putting a span into a context two. With the
API's default runtime (``contextvars``) the current context is one ``ContextVar``, and
:func:`context_access` hands out that variable's own methods: each of those operations becomes one
call into C, with the same effect. With any other runtime (``OTEL_PYTHON_CONTEXT``) it hands out
the API's functions.

:func:`span_in_context` is ``trace.set_span_in_context`` (a new context holding the span under the
API's key), :func:`span_of` is ``trace.get_current_span`` on a given context and
:func:`current_span` is ``trace.get_current_span()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import Token
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.trace.propagation import _SPAN_KEY

__all__ = ["ContextAccess", "context_access", "current_span", "span_in_context", "span_of"]

_logger = logging.getLogger("spyglass.traces")


@dataclass(frozen=True, slots=True)
class ContextAccess:
    """Three callables on the process's current OpenTelemetry context."""

    current: Callable[[], Context]
    """Returns the current context (``opentelemetry.context.get_current``)."""
    attach: Callable[[Context], Token[Context]]
    """Makes a context current and returns the token that restores the previous one."""
    reset: Callable[[Token[Context]], None]
    """Restores the context a token was taken from; raises where the API's ``detach`` logs (see :meth:`detach`)."""

    def detach(self, token: Token[Context]) -> None:
        """Restore the context before ``token``; a token of another context is logged, as the API does, not raised."""
        try:
            self.reset(token)
        except Exception:  # the API's detach never raises into the application either
            _logger.exception("Failed to detach context")


def context_access() -> ContextAccess:
    """The fastest correct way to read and set the current context in this process."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    if type(runtime) is ContextVarsRuntimeContext and variable is not None:
        return ContextAccess(variable.get, variable.set, variable.reset)
    return ContextAccess(otel_context.get_current, otel_context.attach, _api_reset)


def _api_reset(token: Token[Context]) -> None:
    # The API's detach logs failures itself: nothing is left for ContextAccess.detach to catch.
    otel_context.detach(token)


def span_in_context(span: trace.Span, context: Context) -> Context:
    """A copy of ``context`` whose current span is ``span`` (``trace.set_span_in_context``)."""
    values = dict(context)
    values[_SPAN_KEY] = span
    return Context(values)


def span_of(context: Context) -> trace.Span:
    """The span current in ``context``: ``trace.INVALID_SPAN`` when it holds none."""
    span: Any = context.get(_SPAN_KEY)
    if span is None:  # a root: no isinstance check against the Span ABC
        return _INVALID_SPAN
    return span if isinstance(span, trace.Span) else _INVALID_SPAN


_INVALID_SPAN = trace.INVALID_SPAN
_process_access: ContextAccess | None = None


def current_span() -> trace.Span:
    """The current span, as ``trace.get_current_span()`` returns it (the runtime is the one the API chose at import)."""
    global _process_access
    access = _process_access
    if access is None:
        access = _process_access = context_access()
    return span_of(access.current())
