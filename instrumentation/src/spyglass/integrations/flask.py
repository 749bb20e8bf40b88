"""Flask: one SERVER span, one histogram observation and one access-log line per request.

The span follows the stable OpenTelemetry HTTP semantic conventions (name ``{method} {route}``,
``http.request.method``, ``http.route``, ``url.path``, ``url.scheme``, ``server.address``,
``client.address``, ``user_agent.original``, ``http.response.status_code``, ``error.type``).
Label values of metrics never come from raw client input: unmatched paths are ``<unmatched>`` and
unknown methods ``_OTHER``.

The middleware is written for the hot path: no work is repeated per request that can be done once
per app, and the trace context is only parsed when the request carries propagation headers.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator
from time import perf_counter
from typing import Any

import flask
from opentelemetry import context as otel_context
from opentelemetry import trace
from werkzeug.wsgi import ClosingIterator

from spyglass import query_tally, runtime
from spyglass.context_access import context_access, span_in_context
from spyglass.light_span import LightSpan
from spyglass.logs import AccessLog

__all__ = ["UNMATCHED_ROUTE", "FlaskInstrumentation", "install_auto_instrumentation", "instrument_flask"]

UNMATCHED_ROUTE = "<unmatched>"
STATE_KEY = "spyglass.request"
_ATTRIBUTE_LIMIT = 1024
_APP_ATTRIBUTE = "_spyglass_instrumentation"
_instrument_lock = threading.Lock()

StartResponse = Callable[..., Any]


class _EnvironGetter:
    """Reads propagation headers from a WSGI environ."""

    def get(self, carrier: dict, key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return [value] if value is not None else None

    def keys(self, carrier: dict) -> list[str]:
        return [key[5:].lower().replace("_", "-") for key in carrier if key.startswith("HTTP_")]


_GETTER = _EnvironGetter()


class _RequestState(query_tally.QueryTally):
    """One request in flight; it is also the tally of the SQL statements it runs."""

    __slots__ = (
        "active",
        "context",
        "done",
        "exception",
        "method",
        "path",
        "raw_method",
        "route",
        "sampled",
        "span",
        "span_hex",
        "start",
        "status",
        "streamed",
        "trace_hex",
    )

    def __init__(self, method: str, raw_method: str, path: str) -> None:
        self.route: str | None = None
        self.status: str | None = None
        self.exception: BaseException | None = None
        self.start = perf_counter()
        self.method = method
        self.raw_method = raw_method
        self.path = path
        self.span: LightSpan | trace.NonRecordingSpan | None = None
        self.context: otel_context.Context | None = None
        self.trace_hex = ""
        self.span_hex = ""
        self.sampled = False
        self.done = False
        self.streamed = True
        self.active: Any = None
        self.queries = 0  # the tally's slots, set here rather than through a second __init__ call
        self.by_statement = None
        self.tally_token = None


def _capture_after_processing(app: flask.Flask) -> None:
    """Make ``app.process_response`` end by noting the matched route and whether the body is complete.

    The response is seen after every ``after_request`` function, as a last ``after_request``
    function would see it, without the coroutine check Flask makes before calling each one. A
    body is complete when it is a list, or when Flask converted a werkzeug response (error pages
    of ``abort``/404/405) into a closing iterator over text it already holds.
    """
    process_response = app.process_response  # the class's method, or an override of the app's class

    def process_response_then_capture(response: flask.Response) -> flask.Response:
        response = process_response(response)
        request = flask.request._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup, not three
        state = request.environ.get(STATE_KEY)
        if state is not None:
            rule = request.url_rule
            if rule is not None:
                state.route = rule.rule
            state.streamed = not (response.is_sequence or isinstance(response.response, ClosingIterator))
        return response

    app.process_response = process_response_then_capture  # type: ignore[method-assign]


def _capture_exception(_sender: Any, exception: BaseException, **_extra: Any) -> None:
    """``got_request_exception`` receiver: keep the unhandled exception (and route) for the span."""
    request = flask.request
    state = request.environ.get(STATE_KEY)
    if state is not None:
        state.exception = exception
        rule = request.url_rule
        if rule is not None:
            state.route = rule.rule


def _clip(value: str) -> str:
    return value if len(value) <= _ATTRIBUTE_LIMIT else value[:_ATTRIBUTE_LIMIT]


_ADDRESS_CACHE: dict[str | None, tuple[str, int | None]] = {}


def _server_address(environ: dict) -> tuple[str, int | None]:
    host = environ.get("HTTP_HOST")
    cached = _ADDRESS_CACHE.get(host)
    if cached is not None:
        return cached
    address = _parse_server_address(host, environ)
    if host is not None and len(_ADDRESS_CACHE) < 256:
        _ADDRESS_CACHE[host] = address
    return address


def _parse_server_address(host: str | None, environ: dict) -> tuple[str, int | None]:
    if host:
        name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if name and port.isdigit():
            return _clip(name), int(port)
        return _clip(host), None
    port_text = environ.get("SERVER_PORT", "")
    return environ.get("SERVER_NAME", ""), int(port_text) if port_text.isdigit() else None


class _ResponseBody:
    """Wraps a streamed WSGI response; the request ends when it is exhausted or closed.

    The request's span is made current only while the application produces a chunk, never
    while the server holds a half-read body, so the context cannot leak into the next request.
    """

    __slots__ = ("_body", "_iterator", "_owner", "_state")

    def __init__(self, body: Iterable[bytes], owner: FlaskInstrumentation, state: _RequestState) -> None:
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._owner = owner
        self._state = state

    def __iter__(self) -> _ResponseBody:
        self._iterator = iter(self._body)
        return self

    def __next__(self) -> bytes:
        iterator = self._iterator
        if iterator is None:
            iterator = self._iterator = iter(self._body)
        context = self._state.context
        access = self._owner.context_access
        token = access.attach(context) if context is not None else None
        try:
            return next(iterator)
        except StopIteration:
            self._owner._finish(self._state)
            raise
        finally:
            if token is not None:
                access.detach(token)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._owner._finish(self._state)


class FlaskInstrumentation:
    """WSGI middleware holding everything computed once per Flask app."""

    def __init__(self, app: flask.Flask, wsgi_app: Callable[[dict, StartResponse], Iterable[bytes]]) -> None:
        telemetry = runtime.init()
        settings = telemetry.settings
        self.app = app
        self._wsgi_app = wsgi_app
        self._telemetry = telemetry
        self._spans = telemetry.server_spans
        self.context_access = context_access()
        self._current_context = self.context_access.current
        self._attach = self.context_access.attach
        self._propagator = telemetry.propagator
        self._propagation_keys = tuple("HTTP_" + field.upper().replace("-", "_") for field in self._propagator.fields)
        assert telemetry.http_metrics is not None, "spyglass is disabled"
        self._metrics = telemetry.http_metrics
        self._redactor = telemetry.redactor
        self._known_methods = settings.known_methods
        self._traceresponse = settings.traceresponse
        self._access_log = AccessLog(settings) if settings.access_log else None
        patterns = settings.excluded_urls
        self._excluded = re.compile("|".join(f"(?:{p})" for p in patterns)).search if patterns else None

    # -- per request ---------------------------------------------------------------------------
    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        """Handle one request: span, metrics and access log around the wrapped WSGI app."""
        path = environ.get("PATH_INFO") or "/"
        if self._excluded is not None and self._excluded(path):
            return self._wsgi_app(environ, start_response)
        raw_method = environ.get("REQUEST_METHOD", "")
        method = raw_method if raw_method in self._known_methods else "_OTHER"
        state = _RequestState(method, raw_method, path)
        environ[STATE_KEY] = state
        active = state.active = self._metrics.active(method)
        active.inc(1)
        token = None
        if self._spans is not None:
            token = self._start_span(environ, state)
        query_tally.open_tally(state)

        def _start_response(status: str, headers: list, exc_info: Any = None) -> Any:
            state.status = status
            if self._traceresponse and state.trace_hex:
                flags = "-01" if state.sampled else "-00"
                headers.append(("traceresponse", "00-" + state.trace_hex + "-" + state.span_hex + flags))
            return start_response(status, headers, exc_info)

        try:
            body = self._wsgi_app(environ, _start_response)
        except BaseException as exc:
            state.exception = exc
            self._finish(state)
            raise
        finally:
            if state.tally_token is not None:
                query_tally.detach(state)
            if token is not None:
                self.context_access.detach(token)
        if not state.streamed:
            # The body is a list computed by the view: the request is complete (this is also
            # what makes telemetry visible to test clients that never read the body).
            self._finish(state)
            return body
        return _ResponseBody(body, self, state)

    def _start_span(self, environ: dict, state: _RequestState) -> object:
        parent = None
        for key in self._propagation_keys:
            if key in environ:
                parent = self._propagator.extract(environ, getter=_GETTER)
                break
        method = state.method
        path = state.path
        address, port = _ADDRESS_CACHE.get(environ.get("HTTP_HOST")) or _server_address(environ)
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": path if len(path) <= _ATTRIBUTE_LIMIT else path[:_ATTRIBUTE_LIMIT],
            "url.scheme": environ.get("wsgi.url_scheme", "http"),
            "server.address": address,
        }
        if port is not None:
            attributes["server.port"] = port
        if method == "_OTHER":
            attributes["http.request.method_original"] = _clip(state.raw_method)
        client = environ.get("REMOTE_ADDR")
        if client:
            attributes["client.address"] = client
        agent = environ.get("HTTP_USER_AGENT")
        if agent:
            attributes["user_agent.original"] = _clip(agent)
        query = environ.get("QUERY_STRING")
        if query:
            attributes["url.query"] = _clip(self._redactor.redact_query(query))
        span, trace_id, span_id, sampled = self._spans.start(  # type: ignore[union-attr]
            "HTTP" if method == "_OTHER" else method, parent, attributes
        )
        state.span = span
        # bytes.hex() is half the work of formatting an int with a width (ids are 128 and 64 bits).
        state.trace_hex = trace_id.to_bytes(16, "big").hex()
        state.span_hex = span_id.to_bytes(8, "big").hex()
        state.sampled = sampled
        state.context = context = span_in_context(span, parent if parent is not None else self._current_context())
        return self._attach(context)

    def _finish(self, state: _RequestState) -> None:
        if state.done:
            return
        state.done = True
        duration = perf_counter() - state.start
        status = state.status[:3] if state.status else "500"
        status_code = int(status)
        route = state.route or UNMATCHED_ROUTE
        method = state.method
        span = state.span
        if state.queries:
            ids = (state.trace_hex, state.span_hex) if state.sampled else ("", "")
            query_tally.close(state, span, *ids, method=method, route=route)
        if type(span) is LightSpan:  # recording (a dropped trace has a NonRecordingSpan)
            self._finish_span(span, state, status_code)
        if state.sampled:
            self._metrics.observe(method, route, status, duration, state.trace_hex, state.span_hex)
        else:
            self._metrics.observe(method, route, status, duration)
        state.active.inc(-1)
        if self._access_log is not None:
            self._access_log.http_request(
                method, route, state.path, status_code, duration, state.trace_hex, state.span_hex
            )

    @staticmethod
    def _finish_span(span: LightSpan, state: _RequestState, status_code: int) -> None:
        attributes: dict[str, Any] = {"http.response.status_code": status_code}
        name = None
        if state.route is not None:
            attributes["http.route"] = state.route
            name = f"{'HTTP' if state.method == '_OTHER' else state.method} {state.route}"
        exception = state.exception
        if exception is not None:
            kind = type(exception)
            attributes["error.type"] = (
                f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__
            )
        elif status_code >= 500:
            attributes["error.type"] = str(status_code)
        span.finish(attributes, name, exception, error=status_code >= 500 or exception is not None)


def instrument_flask(app: flask.Flask) -> flask.Flask:
    """Instrument one Flask app (idempotent); returns the app.

    Initialises spyglass from the environment first if :func:`spyglass.init` has not run.
    """
    with _instrument_lock:
        if getattr(app, _APP_ATTRIBUTE, None) is not None:
            return app
        if runtime.init().disabled:
            setattr(app, _APP_ATTRIBUTE, False)
            return app
        instrumentation = FlaskInstrumentation(app, app.wsgi_app)
        _capture_after_processing(app)
        flask.got_request_exception.connect(_capture_exception, app, weak=False)
        _remove_flask_default_handler(app)
        app.wsgi_app = instrumentation  # type: ignore[method-assign]
        setattr(app, _APP_ATTRIBUTE, instrumentation)
        return app


def _remove_flask_default_handler(app: flask.Flask) -> None:
    # Flask adds its own stderr handler to app.logger if it was touched before logging was set
    # up; records then go through spyglass's root handler only.
    from flask.logging import default_handler

    app.logger.removeHandler(default_handler)


_original_call: Callable[..., Any] | None = None


def install_auto_instrumentation() -> None:
    """Instrument every Flask app of the process, created before or after this call.

    Flask apps are WSGI callables: the first time an app is called, it instruments itself.
    """
    global _original_call
    if _original_call is not None:
        return
    original = flask.Flask.__call__
    _original_call = original

    def __call__(self: flask.Flask, environ: dict, start_response: StartResponse) -> Any:
        if getattr(self, _APP_ATTRIBUTE, None) is None:  # False when spyglass is disabled
            instrument_flask(self)
        return original(self, environ, start_response)

    __call__.__wrapped__ = original  # type: ignore[attr-defined]
    flask.Flask.__call__ = __call__  # type: ignore[method-assign]
