"""A light recording span for instrumentation hot paths, on the SDK's own span pipeline.

The SDK's span object costs a request (or a Celery task) more than the rest of the
instrumentation together: a lock, attribute containers that validate every value twice (at
start and at end), and a second object built for the processors when it ends.
:class:`LightSpan` keeps its attributes in a plain dict and is itself the finished
``ReadableSpan`` handed to the span processors (batch processor, exporters, anything the user
added to the tracer provider). spyglass uses it for the SERVER span of each Flask request and,
through :class:`spyglass.light_tracer.LightTracer`, for the Celery publish and run spans.

Everything else behaves as an SDK span: ids come from the provider's id generator, the
provider's sampler decides, processors see ``on_start`` and ``on_end``, and code that enriches
the span (``set_attribute(s)``, ``add_event``, ``add_link``, ``record_exception``,
``set_status``, ``update_name``) gets the SDK's validation and the ``OTEL_SPAN_*_LIMIT`` /
``OTEL_ATTRIBUTE_*_LIMIT`` limits: string, boolean and number attributes are checked inline
(the SDK would store them unchanged), anything else, and any span over a limit, goes through
the SDK's own bounded containers. Child spans started while it is current have it as their
parent, as usual.

One difference: exception messages are free text that often quotes input, so the message and
stack trace of a recorded exception (and the status description set by ``with span:``) are
redacted as log messages are (``password=...`` pairs, bearer tokens; see
:meth:`spyglass.redaction.Redactor.redact_text`).
"""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from time import time_ns
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_MESSAGE,
    EXCEPTION_STACKTRACE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE, TraceState
from opentelemetry.util import types

from spyglass.config import DEFAULT_REDACT_KEYS
from spyglass.context_access import context_access, span_of
from spyglass.redaction import Redactor
from spyglass.sampling import TRACE_ID_LIMIT, SamplingRule

__all__ = ["LightSpan", "LightSpanStarter"]

_logger = logging.getLogger("spyglass.traces")
_UNSET = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)
_INVALID_SPAN = trace.INVALID_SPAN
_EXCEPTION_ESCAPED = "exception.escaped"
_PLAIN_ITEM_TYPES = frozenset((str, bool, int, float))
_DEFAULT_REDACTOR = Redactor(DEFAULT_REDACT_KEYS)
# The four trace-flag values a span can get: sampled or not, random trace id or not.
_FLAGS = {
    (sampled, random): TraceFlags(TraceFlags.SAMPLED * sampled | TraceFlags.RANDOM_TRACE_ID * random)
    for sampled in (False, True)
    for random in (False, True)
}


class LightSpan(trace.Span, ReadableSpan):
    """A recording span: the API of a span while it runs, a ``ReadableSpan`` once ended.

    Create it with :meth:`LightSpanStarter.start`. After :meth:`end`, changes are ignored with a
    warning, as the SDK does. Unlike the SDK's span it takes no lock of its own: it is meant to be
    changed by the thread handling the request (attributes, once user code sets one, live in the
    SDK's ``BoundedAttributes``, which does lock).
    """

    # Defaults shared by every instance: most requests add no event or link and set no status.
    _events: Sequence[Event] = ()
    _links: Sequence[Link] = ()
    _status = _UNSET
    _end_time: int | None = None
    _instrumentation_info = None

    def __init__(
        self,
        starter: LightSpanStarter,
        name: str,
        context: SpanContext,
        trace_id: int,
        span_id: int,
        parent: SpanContext | None,
        attributes: MutableMapping[str, Any],
        start_time: int,
        kind: SpanKind = SpanKind.SERVER,
    ) -> None:
        self._starter = starter
        self._kind = kind
        self._name = name
        self._context = context
        self._trace_id = trace_id
        self._span_id = span_id
        self._parent = parent
        self._attributes = attributes
        self._start_time = start_time
        self._resource = starter.resource
        self._instrumentation_scope = starter.scope

    def __repr__(self) -> str:
        return f'LightSpan(name="{self._name}", context={self._context})'

    # -- the span API --------------------------------------------------------------------------
    def get_span_context(self) -> SpanContext:
        """The span's immutable context (ids, flags, trace state)."""
        return self._context

    def is_recording(self) -> bool:
        """True until the span ends."""
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        """Set one attribute (validated and limited as by the SDK)."""
        if self._ended("set_attribute"):
            return
        if not self._set_plain(key, value):
            self._bounded_attributes()[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        """Set several attributes (validated and limited as by the SDK)."""
        if self._ended("set_attributes"):
            return
        set_plain = self._set_plain
        for key, value in attributes.items():
            if not set_plain(key, value):
                self._bounded_attributes()[key] = value

    def _set_plain(self, key: str, value: types.AnyValue) -> bool:
        """Store a value the SDK would keep unchanged in the plain dict; False to take the SDK's path.

        Strings within the length limit, booleans, numbers, and lists or tuples of one of those
        types (stored as a tuple, as the SDK does).
        """
        attributes = self._attributes
        if type(attributes) is not dict or type(key) is not str or not key:
            return False
        kind = type(value)
        if kind is str:
            limit = self._starter.limits.max_span_attribute_length
            if limit is not None and len(value) > limit:
                return False  # truncated by the SDK
        elif kind is tuple or kind is list:
            value = _plain_sequence(value, self._starter.limits.max_span_attribute_length)  # type: ignore[arg-type]
            if value is None:
                return False
        elif kind is not bool and kind is not int and kind is not float:
            return False
        if key not in attributes and len(attributes) >= self._starter.max_attributes:
            return False  # dropped and counted by the SDK
        attributes[key] = value
        return True

    def finish(
        self,
        attributes: Mapping[str, Any],
        name: str | None = None,
        exception: BaseException | None = None,
        error: bool = False,
    ) -> None:
        """End the span as the instrumentation sees the request finish, in one call.

        Sets ``attributes`` (built by the instrumentation: valid by construction) and ``name``,
        records ``exception`` and, if ``error``, sets an ERROR status (unless the application set
        OK). Does nothing if application code already ended the span.
        """
        if self._end_time is not None:
            return
        if name is not None:
            self._name = name
        if type(self._attributes) is dict:
            self._attributes.update(attributes)
        else:
            self.set_attributes(attributes)
        if exception is not None:
            self.record_exception(exception)
        if error:
            self.set_status(_ERROR)
        self._end(time_ns())

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        """Add a timestamped event (at most ``OTEL_SPAN_EVENT_COUNT_LIMIT``)."""
        if self._ended("add_event"):
            return
        limits = self._starter.limits
        if not isinstance(self._events, BoundedList):
            self._events = BoundedList(limits.max_events)
        bounded = BoundedAttributes(
            limits.max_event_attributes, attributes, immutable=True, max_value_len=limits.max_attribute_length
        )
        self._events.append(Event(name=name, attributes=bounded, timestamp=timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        """Link another span (at most ``OTEL_SPAN_LINK_COUNT_LIMIT``); invalid links are ignored."""
        if self._ended("add_link"):
            return
        if not (context and (context.is_valid or attributes or context.trace_state)):
            return
        limits = self._starter.limits
        if not isinstance(self._links, BoundedList):
            self._links = BoundedList(limits.max_links)
        bounded = BoundedAttributes(
            limits.max_link_attributes, attributes, immutable=True, max_value_len=limits.max_attribute_length
        )
        self._links.append(Link(context=context, attributes=bounded))

    def update_name(self, name: str) -> None:
        """Rename the span."""
        if self._ended("update_name"):
            return
        self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """Set the status; ``OK`` is final and ``UNSET`` is ignored, as the specification says."""
        if self._ended("set_status"):
            return
        if self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                _logger.warning("Description %s ignored: pass a Status, or a StatusCode and a description", description)
            self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """Record an exception as an ``exception`` event with type, message and stack trace (redacted)."""
        kind = type(exception)
        module = kind.__module__
        redactor = _redactor()
        event_attributes: dict[str, Any] = {
            EXCEPTION_TYPE: f"{module}.{kind.__qualname__}" if module and module != "builtins" else kind.__qualname__,
            EXCEPTION_MESSAGE: _exception_text(redactor, str(exception)),
            EXCEPTION_STACKTRACE: _exception_text(redactor, "".join(traceback.format_exception(exception))),
            _EXCEPTION_ESCAPED: str(escaped),
        }
        if attributes:
            event_attributes.update(attributes)
        self.add_event("exception", event_attributes, timestamp)

    def end(self, end_time: int | None = None) -> None:
        """End the span and hand it to the span processors (a second call only warns)."""
        if self._ended("end"):
            return
        self._end(end_time if end_time is not None else time_ns())

    def _end(self, end_time: int) -> None:
        self._end_time = end_time
        if type(self._attributes) is not dict:  # bounded: the SDK freezes them the same way
            self._attributes._immutable = True  # type: ignore[attr-defined]
        starter = self._starter
        processors = getattr(starter.processor, "_span_processors", starter._whole)
        if processors is not starter._processors_seen:  # a processor was added while the span ran
            starter._see(processors)
        for call in starter._ending:
            call(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """End the span; an exception leaving the block is recorded and sets an error status."""
        if exc_val is not None and self.is_recording():
            self.record_exception(exc_val, escaped=True)
            self.set_status(
                Status(StatusCode.ERROR, _exception_text(_redactor(), f"{type(exc_val).__name__}: {exc_val}"))
            )
        self.end()

    # -- read access for exporters (the SDK's checks, without its slow ABC isinstance) -----------
    @property
    def dropped_attributes(self) -> int:
        """Attributes left out by the count limit."""
        attributes = self._attributes
        return 0 if type(attributes) is dict else getattr(attributes, "dropped", 0)

    @property
    def dropped_events(self) -> int:
        """Events left out by the count limit."""
        return getattr(self._events, "dropped", 0)

    @property
    def dropped_links(self) -> int:
        """Links left out by the count limit."""
        return getattr(self._links, "dropped", 0)

    # -- helpers -------------------------------------------------------------------------------
    def _ended(self, operation: str) -> bool:
        if self._end_time is None:
            return False
        _logger.warning("Tried calling %s on an ended span.", operation)
        return True

    def _bounded_attributes(self) -> BoundedAttributes:
        attributes = self._attributes
        if isinstance(attributes, BoundedAttributes):
            return attributes
        limits = self._starter.limits
        bounded = BoundedAttributes(
            limits.max_span_attributes, attributes, immutable=False, max_value_len=limits.max_span_attribute_length
        )
        self._attributes = bounded
        return bounded


def _redactor() -> Redactor:
    """The process's redactor (``SPYGLASS_REDACT_KEYS``), or the default one before spyglass is set up."""
    from spyglass import runtime  # runtime imports this module

    state = runtime.current()
    return state.redactor if state is not None else _DEFAULT_REDACTOR


def _exception_text(redactor: Redactor, text: str) -> str:
    r"""Exception text as a span may carry it: secrets redacted, and encodable as UTF-8.

    A message quoting client input may hold a lone surrogate (JSON allows ``"\ud800"``); as it
    is, it would make the exporter fail on the whole batch of spans. It is written escaped.
    """
    text = redactor.redact_text(text)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _plain_sequence(items: list | tuple, limit: int | None) -> tuple | None:
    """``items`` as the tuple the SDK would store, if it keeps them unchanged; else ``None``.

    The SDK keeps a sequence whose items all have the same type, one of str, bool, int, float
    (strings within the length limit); it drops or converts anything else.
    """
    if not items:
        return ()
    kind = type(items[0])
    if kind not in _PLAIN_ITEM_TYPES:
        return None
    for item in items:
        if type(item) is not kind:
            return None
    if kind is str and limit is not None and any(len(item) > limit for item in items):
        return None
    return tuple(items)


def _starting_processors(processors: tuple[SpanProcessor, ...]) -> tuple[SpanProcessor, ...]:
    """The processors whose ``on_start`` does something (the batch and simple processors' do nothing)."""
    return tuple(processor for processor in processors if type(processor).on_start not in _NO_OP_ON_START)


_NO_OP_ON_START = frozenset((SpanProcessor.on_start, BatchSpanProcessor.on_start, SimpleSpanProcessor.on_start))


def _ending_calls(processors: tuple[SpanProcessor, ...]) -> tuple[Callable[[LightSpan], None], ...]:
    """What ending a span calls, in the SDK's order.

    First ``_on_ending`` of the processors that do something then, then each processor's
    ``on_end``. A processor with an ``on_end_light`` method (:class:`spyglass.tracing.SpanBatchProcessor`) is
    given the span through it: the same effect, a shorter way for a :class:`LightSpan`.
    """
    ending = [
        processor._on_ending  # type: ignore[attr-defined]
        for processor in processors
        if getattr(type(processor), "_on_ending", None) not in _NO_OP_ON_ENDING
    ]
    ending += [getattr(processor, "on_end_light", processor.on_end) for processor in processors]
    return tuple(ending)


_NO_OP_ON_ENDING = frozenset(
    {getattr(kind, "_on_ending", None) for kind in (SpanProcessor, BatchSpanProcessor, SimpleSpanProcessor)}
)


def _span_context(trace_id: int, span_id: int, flags: TraceFlags, trace_state: TraceState | None) -> SpanContext:
    """``SpanContext(trace_id, span_id, is_remote=False, ...)`` without its keyword handling.

    The tuple is the one ``SpanContext.__new__`` builds (ids, remote flag, flags, trace state,
    validity), at a third of its cost on the hot path.
    """
    valid = 0 < trace_id <= _TRACE_ID_MAX and 0 < span_id <= _SPAN_ID_MAX
    state = trace_state if trace_state is not None else DEFAULT_TRACE_STATE
    return _new_tuple(SpanContext, (trace_id, span_id, False, flags, state, valid))


_new_tuple = tuple.__new__
_TRACE_ID_MAX = (1 << 128) - 1
_SPAN_ID_MAX = (1 << 64) - 1


class LightSpanStarter:
    """Starts :class:`LightSpan` objects on a tracer provider's sampler, ids, resource and processors."""

    def __init__(
        self,
        provider: TracerProvider,
        scope_name: str,
        scope_version: str,
        rule: SamplingRule | None = None,
        schema_url: str | None = None,
    ) -> None:
        """Use ``provider``'s pipeline; ``rule`` stands in for its sampler, which must decide the same.

        Without a rule, the provider's sampler is called for every span.
        """
        processor = getattr(provider, "_active_span_processor", None)
        if not isinstance(processor, SpanProcessor):  # pragma: no cover - guards an SDK upgrade
            raise TypeError("this OpenTelemetry SDK version hides its span processors from spyglass")
        self.processor: SpanProcessor = processor
        # on_start is called on the provider's processors that do something at start (see start).
        self._whole: tuple[SpanProcessor, ...] = (processor,)  # a later SDK without that list: call it whole
        self._processors_seen: tuple[SpanProcessor, ...] | None = None
        self._starting: tuple[SpanProcessor, ...] = ()
        self._ending: tuple[Callable[[LightSpan], None], ...] = ()
        self.resource = provider.resource
        self.scope = InstrumentationScope(scope_name, scope_version, schema_url)
        self.limits = SpanLimits()
        limit = self.limits.max_span_attributes
        self.max_attributes: int = limit if limit is not None else 1 << 62
        self._sampler = provider.sampler
        self._rule = rule
        self._ids = provider.id_generator
        self._random_ids = self._ids.is_trace_id_random()
        # The SDK's default generator is random.getrandbits until it draws a non-zero id: called directly.
        self._random_bits = random.getrandbits if type(self._ids) is RandomIdGenerator else None
        self._current_context = context_access().current

    def start(
        self,
        name: str,
        parent_context: otel_context.Context | None,
        attributes: dict[str, Any],
        kind: SpanKind = SpanKind.SERVER,
    ) -> tuple[trace.Span, int, int, bool]:
        """Start a span of ``kind`` under ``parent_context`` (the current context when ``None``).

        ``attributes`` must hold valid attribute values (strings, numbers, booleans); the dict
        becomes the span's. Returns the span (a :class:`LightSpan`, or a ``NonRecordingSpan``
        when the sampler drops the trace) with its trace id, span id and sampled flag.
        """
        start_time = time_ns()
        parent_span = span_of(parent_context if parent_context is not None else self._current_context())
        parent: SpanContext | None = None if parent_span is _INVALID_SPAN else parent_span.get_span_context()
        ids = self._ids
        bits = self._random_bits
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = (bits(128) if bits is not None else 0) or ids.generate_trace_id()
            random_id = self._random_ids
        else:
            trace_id = parent.trace_id
            random_id = parent.trace_flags.random_trace_id
        span_id = (bits(64) if bits is not None else 0) or ids.generate_span_id()
        rule = self._rule
        if rule is not None:
            if parent is not None and rule.parent_based:
                sampled = parent.trace_flags.sampled
            else:
                sampled = trace_id & TRACE_ID_LIMIT < rule.bound
            context = _span_context(
                trace_id, span_id, _FLAGS[sampled, random_id], parent.trace_state if parent is not None else None
            )
            if not sampled:
                return NonRecordingSpan(context), trace_id, span_id, False
            span_attributes: MutableMapping[str, Any] = attributes
        else:
            result = self._sampler.should_sample(parent_context, trace_id, name, kind, attributes)
            context = _span_context(
                trace_id, span_id, _FLAGS[result.decision.is_sampled(), random_id], result.trace_state
            )
            sampled = result.decision.is_sampled()
            if not result.decision.is_recording():
                return NonRecordingSpan(context), trace_id, span_id, sampled
            sampled_attributes = result.attributes
            if len(sampled_attributes) != len(attributes) or sampled_attributes != attributes:
                # The sampler chose the attributes (as the SDK's tracer honours): validate them.
                limits = self.limits
                span_attributes = BoundedAttributes(
                    limits.max_span_attributes, sampled_attributes, max_value_len=limits.max_span_attribute_length
                )
            else:
                span_attributes = attributes
        span = LightSpan(self, name, context, trace_id, span_id, parent, span_attributes, start_time, kind)
        processors = getattr(self.processor, "_span_processors", self._whole)
        if processors is not self._processors_seen:  # the provider's list changed (or first span)
            self._see(processors)
        for processor in self._starting:
            processor.on_start(span, parent_context=parent_context)
        return span, trace_id, span_id, sampled

    def _see(self, processors: tuple[SpanProcessor, ...]) -> None:
        self._starting = _starting_processors(processors)
        self._ending = _ending_calls(processors)
        self._processors_seen = processors
