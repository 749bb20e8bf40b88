"""prometheus_client metric objects built from the catalog, with cheap recording helpers.

The helpers cache labelled children so that the hot path of a request is a dict look-up and one
observation, and record exemplars natively in a single process or through
:class:`~spyglass.metrics.exemplars.ExemplarFile` in multi-process mode.

Recording never raises into the application. In multi-process mode a new series needs room in
the metrics directory: when there is none (disk full, see :mod:`spyglass.metrics.multiprocess`)
the series is not created, each update it would have received is counted in
``spyglass_metrics_store_dropped_updates_total``, and it is created on a later update once there
is room again. Series created before keep being recorded.
"""

from __future__ import annotations

import contextlib
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.samples import Exemplar

from spyglass.catalog import MetricSpec, by_name
from spyglass.metrics.cells import DROPPED, Cell, cell_of
from spyglass.metrics.exemplars import ExemplarFile
from spyglass.metrics.multiprocess import store

__all__ = [
    "EXEMPLAR_INTERVAL_S",
    "CeleryMetrics",
    "DatabaseMetrics",
    "HttpServerMetrics",
    "LogPipelineMetrics",
    "SpanPipelineMetrics",
    "build_metric",
]


def build_metric(spec: MetricSpec, registry: CollectorRegistry | None) -> Counter | Gauge | Histogram:
    """Create the prometheus_client object for a catalog entry."""
    common = {"labelnames": spec.labels, "registry": registry}
    if spec.type == "counter":
        return Counter(spec.constructor_name, spec.description, **common)
    if spec.type == "histogram":
        return Histogram(spec.constructor_name, spec.description, buckets=spec.buckets, **common)
    if spec.type == "gauge":
        return Gauge(
            spec.constructor_name, spec.description, multiprocess_mode=spec.multiprocess_mode or "all", **common
        )
    raise ValueError(f"{spec.name}: {spec.type} metrics are produced by collectors, not built")


_T = TypeVar("_T")
EXEMPLAR_INTERVAL_S = 0.09
"""Shortest time between two exemplars of one histogram bucket (the Prometheus Java client's default)."""


def _stored(create: Callable[[], _T]) -> _T | None:
    """``create()``, which stores a new series; ``None`` when the metrics directory cannot take it.

    During an outage it is not even tried (the directory is checked for room every few seconds).
    The caller counts the update it drops.
    """
    if not store.accepting():
        return None
    try:
        return create()
    except OSError as exc:
        if not store.failing:  # not already reported by the value file that failed
            store.failed(exc)
        return None
    finally:
        store.report()


class _Registered:
    """Keeps the metrics it creates so that they can be unregistered again."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._registry = registry
        self._created: list = []
        self._cells: dict[tuple, Cell] = {}

    def _build(self, name: str):
        metric = build_metric(by_name(name), self._registry)
        self._created.append(metric)
        return metric

    def _cell(self, metric: Counter | Gauge, *labels: str) -> Cell:
        """The cell of one labelled series (:data:`~spyglass.metrics.cells.DROPPED` if it cannot be stored)."""
        key = (id(metric), *labels)
        cell = self._cells.get(key)
        if cell is None:
            cell = _stored(lambda: _value_of(metric.labels(*labels)))
            if cell is None:
                return DROPPED
            self._cells[key] = cell
        return cell

    def unregister(self) -> None:
        """Remove the metrics from their registry (used when spyglass shuts down)."""
        if self._registry is None:
            return
        for metric in self._created:
            with contextlib.suppress(KeyError):
                self._registry.unregister(metric)
        self._created.clear()


class HttpServerMetrics(_Registered):
    """``http.server.request.duration`` and ``http.server.active_requests``."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, exemplars: ExemplarFile | None = None) -> None:
        super().__init__(registry)
        duration_spec = by_name("http_server_request_duration_seconds")
        self._duration = self._build(duration_spec.name)
        self._active = self._build("http_server_active_requests")
        self._family = duration_spec.name
        self._labelnames = duration_spec.labels
        self._bounds = (*duration_spec.buckets, float("inf"))
        self._exemplars = exemplars
        self._children: dict[tuple[str, str, str], _FastHistogram] = {}
        self._active_children: dict[str, Cell] = {}

    def active(self, method: str) -> Cell:
        """The in-flight count for ``method``: call ``inc(1)`` when a request starts, ``inc(-1)`` when it ends."""
        value = self._active_children.get(method)
        if value is None:
            value = self._cell(self._active, method)
            if value is not DROPPED:
                self._active_children[method] = value
        return value

    def observe(
        self,
        method: str,
        route: str,
        status: str,
        seconds: float,
        trace_id: str = "",
        span_id: str = "",
    ) -> None:
        """Record one finished request; a ``trace_id`` (32 hex digits) becomes the bucket's exemplar."""
        series = (method, route, status)
        child = self._children.get(series)
        if child is None:
            child = _stored(
                lambda: _FastHistogram(
                    self._duration.labels(*series),
                    self._family,
                    series,
                    self._labelnames,
                    self._bounds,
                    self._exemplars,
                )
            )
            if child is None:
                store.dropped()
                return
            self._children[series] = child
        child.observe(seconds, trace_id, span_id)


_TASK_LABELS = ("task_name", "queue")


class CeleryMetrics(_Registered):
    """Celery task metrics, recorded from Celery's signals in publishers and workers."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, exemplars: ExemplarFile | None = None) -> None:
        super().__init__(registry)
        self._exemplars = exemplars
        self._published = self._build("celery_task_published_total")
        self._publish_errors = self._build("celery_task_publish_errors_total")
        self._completed = self._build("celery_task_completed_total")
        self._failures = self._build("celery_task_failures_total")
        self._runtime = self._build("celery_task_runtime_seconds")
        self._queue_wait = self._build("celery_task_queue_wait_seconds")
        self._active = self._build("celery_tasks_active")
        self._beat_sent = self._build("celery_beat_tasks_sent_total")
        self._beat_last_sent = self._build("celery_beat_last_sent_timestamp_seconds")
        self._bounds = (*by_name("celery_task_runtime_seconds").buckets, float("inf"))
        self._family_of = {
            id(self._runtime): "celery_task_runtime_seconds",
            id(self._queue_wait): "celery_task_queue_wait_seconds",
        }
        self._histograms: dict[tuple, _FastHistogram] = {}
        self._value = self._cell

    def _observe(
        self, metric: Histogram, task_name: str, queue: str, seconds: float, trace_id: str, span_id: str
    ) -> None:
        key = (id(metric), task_name, queue)
        histogram = self._histograms.get(key)
        if histogram is None:
            series = (task_name, queue)
            histogram = _stored(
                lambda: _FastHistogram(
                    metric.labels(*series),
                    self._family_of[id(metric)],
                    series,
                    _TASK_LABELS,
                    self._bounds,
                    self._exemplars,
                )
            )
            if histogram is None:
                store.dropped()
                return
            self._histograms[key] = histogram
        histogram.observe(seconds, trace_id, span_id)

    def published(self, task_name: str, queue: str) -> None:
        """Count one published task message."""
        self._value(self._published, task_name, queue).inc(1)

    def publish_failed(self, task_name: str, queue: str, error_type: str) -> None:
        """Count one task message that could not be published (``error_type``: the exception's class)."""
        self._value(self._publish_errors, task_name, queue, error_type).inc(1)

    def started(
        self, task_name: str, queue: str, queue_wait_seconds: float | None, trace_id: str = "", span_id: str = ""
    ) -> None:
        """A worker process started a task (``queue_wait_seconds`` is ``None`` when unknown).

        ``trace_id`` and ``span_id`` (hex) of a sampled run span become the queue wait's exemplar.
        """
        self._value(self._active, queue).inc(1)
        if queue_wait_seconds is not None:
            self._observe(self._queue_wait, task_name, queue, max(queue_wait_seconds, 0.0), trace_id, span_id)

    def finished(
        self,
        task_name: str,
        queue: str,
        outcome: str | None,
        runtime_seconds: float,
        trace_id: str = "",
        span_id: str = "",
    ) -> None:
        """A task execution started with :meth:`started` ended (ids: the runtime's exemplar).

        ``outcome`` ``None``: another process counts how it ended (the worker's main process).
        """
        self._value(self._active, queue).inc(-1)
        if outcome is not None:
            self._value(self._completed, task_name, queue, outcome).inc(1)
        self._observe(self._runtime, task_name, queue, runtime_seconds, trace_id, span_id)

    def ended(self, task_name: str, queue: str, outcome: str) -> None:
        """An ending seen outside the pool process that ran the task (revoked, expired, time limit, lost)."""
        self._value(self._completed, task_name, queue, outcome).inc(1)

    def beat_sent(self, task_name: str, when: float) -> None:
        """Count that beat sent ``task_name`` on schedule, at Unix time ``when``."""
        self._value(self._beat_sent, task_name).inc(1)
        self._value(self._beat_last_sent, task_name).set(when)

    def failed(self, task_name: str, queue: str, exception_type: str) -> None:
        """A task execution raised ``exception_type``."""
        self._value(self._failures, task_name, queue, exception_type).inc(1)


class DatabaseMetrics(_Registered):
    """SQL statement durations (``db.client.operation.duration``), queries per request or task, N+1 counts."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, exemplars: ExemplarFile | None = None) -> None:
        super().__init__(registry)
        self._exemplars = exemplars
        self._duration = self._build("db_client_operation_duration_seconds")
        self._per_request = self._build("spyglass_db_queries_per_request")
        self._per_task = self._build("spyglass_db_queries_per_task")
        self._specs = {
            id(self._duration): by_name("db_client_operation_duration_seconds"),
            id(self._per_request): by_name("spyglass_db_queries_per_request"),
            id(self._per_task): by_name("spyglass_db_queries_per_task"),
        }
        self._n_plus_one_requests = self._build("spyglass_db_n_plus_one_requests_total")
        self._n_plus_one_tasks = self._build("spyglass_db_n_plus_one_tasks_total")
        self._histograms: dict[tuple, _FastHistogram | _DroppedHistogram] = {}
        self._counter = self._cell

    def _histogram(self, metric: Histogram, *series: str) -> _FastHistogram | _DroppedHistogram:
        key = (id(metric), *series)
        histogram = self._histograms.get(key)
        if histogram is None:
            spec = self._specs[id(metric)]
            histogram = _stored(
                lambda: _FastHistogram(
                    metric.labels(*series),
                    spec.name,
                    series,
                    spec.labels,
                    (*spec.buckets, float("inf")),
                    self._exemplars,
                )
            )
            if histogram is None:
                return _DROPPED_HISTOGRAM
            self._histograms[key] = histogram
        return histogram

    def operation(
        self,
        system: str,
        operation: str,
        collection: str,
        error_type: str,
        seconds: float,
        trace_id: str = "",
        span_id: str = "",
    ) -> None:
        """Record one statement's duration; ids (hex) of its sampled span become the exemplar."""
        self._histogram(self._duration, system, operation, collection, error_type).observe(seconds, trace_id, span_id)

    def request_queries(self, method: str, route: str, count: int) -> None:
        """Record how many statements one HTTP request ran."""
        self._histogram(self._per_request, method, route).observe(count)

    def task_queries(self, task_name: str, count: int) -> None:
        """Record how many statements one task run ran."""
        self._histogram(self._per_task, task_name).observe(count)

    def n_plus_one_request(self, method: str, route: str) -> None:
        """Count an HTTP request that repeated a statement past the threshold."""
        self._counter(self._n_plus_one_requests, method, route).inc(1)

    def n_plus_one_task(self, task_name: str) -> None:
        """Count a task run that repeated a statement past the threshold."""
        self._counter(self._n_plus_one_tasks, task_name).inc(1)


def _value_of(child: Counter | Gauge) -> Cell:
    """The value cell behind a labelled child: incrementing it skips the per-call checks (see :mod:`.cells`)."""
    value = getattr(child, "_value", None)
    if value is None:  # pragma: no cover - guards a prometheus_client upgrade
        raise TypeError("this prometheus_client version hides its metric values from spyglass")
    return cell_of(value)


class _DroppedHistogram:
    """Stands for a histogram series that could not be stored: counts each observation as dropped."""

    def observe(self, seconds: float, trace_id: str = "", span_id: str = "") -> None:
        """Count one dropped update."""
        store.dropped()


_DROPPED_HISTOGRAM = _DroppedHistogram()


class _FastHistogram:
    """A labelled histogram child recorded without per-call checks, with trace exemplars.

    ``Histogram.observe`` validates the child and every exemplar on each call and scans the bucket
    bounds in Python; the hot paths need none of that: their values and exemplar labels are valid
    by construction, and the bucket is found by bisection. Exemplars go to the child's bucket in a
    single process, to this process's exemplar file in multi-process mode.

    A bucket's exemplar is replaced at most every :data:`EXEMPLAR_INTERVAL_S`, as the Prometheus
    Java client samples them: a busy route's bucket then names a request of its last tenth of a
    second rather than its very last one, and the exemplar costs a few writes per bucket and
    interval instead of per request.
    """

    __slots__ = ("_bounds", "_buckets", "_exemplar_times", "_exemplars", "_family", "_labelnames", "_series", "_sum")

    def __init__(
        self,
        child: Histogram,
        family: str,
        series: tuple[str, ...],
        labelnames: tuple[str, ...],
        bounds: tuple[float, ...],
        exemplars: ExemplarFile | None,
    ) -> None:
        buckets = getattr(child, "_buckets", None)
        total = getattr(child, "_sum", None)
        if buckets is None or total is None or tuple(getattr(child, "_upper_bounds", ())) != bounds:
            # pragma: no cover - guards a prometheus_client upgrade
            raise TypeError("this prometheus_client version hides its histogram values from spyglass")
        self._sum = cell_of(total)
        self._buckets = [cell_of(bucket) for bucket in buckets]
        self._family = family
        self._series = series
        self._labelnames = labelnames
        self._bounds = bounds
        self._exemplars = exemplars
        self._exemplar_times = [float("-inf")] * len(bounds)  # when each bucket's exemplar was last set

    def observe(self, seconds: float, trace_id: str = "", span_id: str = "") -> None:
        """Record one value; ``trace_id``/``span_id`` (hex) of a sampled span become the bucket's exemplar.

        The exemplar is left as it is when the bucket's was set less than :data:`EXEMPLAR_INTERVAL_S` ago.
        """
        self._sum.inc(seconds)
        index = bisect_left(self._bounds, seconds)
        bucket = self._buckets[index]
        bucket.inc(1)
        if not trace_id:
            return
        now = time.time()
        if 0.0 <= now - self._exemplar_times[index] < EXEMPLAR_INTERVAL_S:  # a clock set back records at once
            return
        self._exemplar_times[index] = now
        if self._exemplars is None:
            bucket.set_exemplar(Exemplar({"trace_id": trace_id, "span_id": span_id}, seconds, now))
        else:
            self._exemplars.record(
                self._family,
                self._series,
                self._labelnames,
                self._bounds,
                seconds,
                now,
                bytes.fromhex(trace_id),
                bytes.fromhex(span_id),
            )


class LogPipelineMetrics(_Registered):
    """Health of log export: ``otel.sdk.processor.log.processed`` (drops) and ``otel.sdk.exporter.log.exported``."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        super().__init__(registry)
        self._processed = self._build("otel_sdk_processor_log_processed_total")
        self._exported = self._build("otel_sdk_exporter_log_exported_total")

    def dropped(self, count: int, error_type: str) -> None:
        """Lines dropped before export."""
        self._cell(self._processed, error_type).inc(count)

    def exported(self, count: int, error_type: str = "") -> None:
        """Records the exporter delivered (``error_type`` empty) or lost (``error_type`` set)."""
        self._cell(self._exported, error_type).inc(count)


class SpanPipelineMetrics(_Registered):
    """Health of span export: ``otel.sdk.processor.span.processed`` and ``otel.sdk.exporter.span.exported``.

    Implements the processor-metrics interface of the OpenTelemetry SDK's batch processor
    (``register_queue_size``, ``finish_items``, ``drop_items``) so that dropped spans are counted
    where the SDK drops them.
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        super().__init__(registry)
        self._processed = self._build("otel_sdk_processor_span_processed_total")
        self._exported = self._build("otel_sdk_exporter_span_exported_total")
        self._cell(self._processed, "")  # the series every export updates exist from the start
        self._cell(self._exported, "")

    def register_queue_size(self, get_queue_size: Callable[[], int]) -> None:
        """Part of the SDK interface; the queue size is not exported (it is a per-process value)."""

    def finish_items(self, count: int) -> None:
        """Spans taken from the queue and handed to the exporter."""
        self._cell(self._processed, "").inc(count)

    def drop_items(self, count: int, error_type: str = "queue_full") -> None:
        """Spans dropped by the processor (queue full, or ended after shutdown)."""
        self._cell(self._processed, error_type).inc(count)

    def exported(self, count: int, error_type: str = "") -> None:
        """Spans the exporter delivered (``error_type`` empty) or lost (``error_type`` set)."""
        self._cell(self._exported, error_type).inc(count)
