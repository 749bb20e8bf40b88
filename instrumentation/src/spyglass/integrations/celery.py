"""Celery: task metrics from Celery's signals, in every process that publishes or runs tasks.

No Celery events (``-E``) and no exporter process: each publishing process (the Flask web, or a
worker starting sub-tasks) counts what it publishes and stamps every message with the time it was
published; the pool process running a task measures its queue wait from that stamp (or from the
task's ETA), its runtime and its outcome.

Processes: the main process of ``celery worker`` is the master (it owns the multi-process metrics
directory and serves the one endpoint that sums its pool); each prefork pool process sets up its
own telemetry after the fork (``worker_process_init``) and, when it exits (``max_tasks_per_child``
recycling included), exports its spans and log lines (``worker_process_shutdown``); the main
process folds an exited pool process's counts into the totals before the next scrape.
Celery's own logging setup is skipped (``setup_logging``), so its lines come out as spyglass JSON.

Traces come from opentelemetry-instrumentation-celery (publish and run spans, context carried in
the message headers; see :mod:`spyglass.integrations.celery_traces` for what is fixed), so a
request and the tasks it starts share one trace.

The worker's main process also serves the depth of its queues, read from the broker when
scraped (:mod:`spyglass.metrics.broker_queues`).

The main process counts and traces the endings it decides for running tasks: terminated
(revoked), hard time limit, and a pool process that died, requeued or not (see
:mod:`spyglass.integrations.celery_endings`); it also serves the configured pool size. With a
pool that runs tasks in the main process (solo, threads, gevent, eventlet) the main process
records them itself. celery beat counts what it sends on schedule and when it last sent it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery, signals
from prometheus_client.core import GaugeMetricFamily, Metric

from spyglass import runtime
from spyglass.catalog import by_name
from spyglass.config import LOG_LEVELS
from spyglass.integrations import celery_endings, celery_runs
from spyglass.integrations.celery_labels import (
    UNREGISTERED_TASK,
    label_every_app,
    queue_of,
    register_app,
    task_label,
)
from spyglass.integrations.celery_publish import watch_publish_failures
from spyglass.integrations.celery_runs import PUBLISHED_AT_HEADER
from spyglass.metrics.broker_queues import BrokerQueueCollector, probe_for

__all__ = ["PUBLISHED_AT_HEADER", "UNREGISTERED_TASK", "install_auto_instrumentation", "instrument_celery"]

_DISPATCH_UID = "spyglass.celery"
_lock = threading.Lock()


def instrument_celery(app: Celery) -> Celery:
    """Instrument a Celery app (idempotent); returns the app.

    Initialises spyglass from the environment first if :func:`spyglass.init` has not run. Task
    names registered in any instrumented app keep their name as a label; others are
    ``<unregistered>``, so a caller naming arbitrary tasks cannot create series.
    """
    with _lock:
        if runtime.init().disabled or not register_app(app):
            return app
        _connect_signals()
    return app


def install_auto_instrumentation() -> None:
    """Instrument every Celery app of the process, created before or after this call.

    Celery's signals are process-wide; task names are checked against the app in use.
    """
    with _lock:
        if runtime.init().disabled:
            return
        label_every_app()
        _connect_signals()


def _connect_signals() -> None:
    receivers = (
        (signals.before_task_publish, _before_task_publish),
        (signals.after_task_publish, _after_task_publish),
        (signals.task_prerun, celery_runs.task_started),
        (signals.task_postrun, celery_runs.task_finished),
        (signals.task_failure, celery_runs.task_failed),
        (signals.task_revoked, _task_revoked),
        (signals.task_retry, celery_runs.task_retried),
        (signals.celeryd_after_setup, _worker_set_up),
        (signals.beat_init, _beat_started),
        (signals.beat_embedded_init, _beat_started),
        (signals.worker_process_init, _worker_process_init),
        (signals.worker_process_shutdown, _worker_process_shutdown),
        (signals.setup_logging, _keep_spyglass_logging),
    )
    for signal, receiver in receivers:  # one receiver per signal: the dispatch uid is per signal
        signal.connect(receiver, weak=False, dispatch_uid=_DISPATCH_UID)
    watch_publish_failures(_publish_failed)
    _instrument_traces()


def _instrument_traces() -> None:
    """Publish and run spans (see :mod:`spyglass.integrations.celery_traces`), unless traces are off."""
    state = runtime.current()
    if state is None or state.settings.sdk_disabled:
        return
    from spyglass.integrations.celery_traces import instrument_traces

    global _traces
    _traces = instrument_traces()
    celery_runs.set_run_tracer(_traces)


_traces: Any = None
"""The instrumentor of publish and run spans, when spyglass connected it."""
_publishing = threading.local()
"""Per thread: the (task label, routing key) of each publish under way, by task id."""
_MAX_PUBLISHING = 1024


def _before_task_publish(
    sender: str | None = None,
    headers: dict[str, Any] | None = None,
    routing_key: str | None = None,
    **_extra: Any,
) -> None:
    """Stamp the publish time into the message headers; remember the publish until it ends."""
    if headers is None:
        return
    headers[PUBLISHED_AT_HEADER] = time.time()
    task_id = headers.get("id")
    if isinstance(task_id, str):
        under_way = _under_way()
        if len(under_way) >= _MAX_PUBLISHING:  # publishes through a sender spyglass does not watch
            under_way.clear()
        under_way[task_id] = (task_label(sender or headers.get("task")), routing_key or "")


def _under_way() -> dict[str, tuple[str, str]]:
    under_way = getattr(_publishing, "by_task_id", None)
    if under_way is None:
        under_way = _publishing.by_task_id = {}
    return under_way


def _after_task_publish(
    sender: str | None = None,
    headers: dict[str, Any] | None = None,
    routing_key: str | None = None,
    **_extra: Any,
) -> None:
    """Count the message the broker accepted (and, in beat, when it was sent)."""
    headers = headers or {}
    task_id = headers.get("id")
    _under_way().pop(task_id, None)
    state = runtime.current()
    metrics = state.celery_metrics() if state is not None else None
    if metrics is not None:
        label = task_label(sender or headers.get("task"))
        metrics.published(label, routing_key or "")
        if _in_beat:
            metrics.beat_sent(label, headers.get(PUBLISHED_AT_HEADER) or time.time())


def _publish_failed(task_name: str, task_id: str | None, error: BaseException) -> None:
    """A publish raised (broker down, refused, timed out): count it and end its publish span."""
    label, routing_key = _under_way().pop(task_id or "", None) or (task_label(task_name), "")
    state = runtime.current()
    metrics = state.celery_metrics() if state is not None else None
    if metrics is not None:
        metrics.publish_failed(label, routing_key, type(error).__name__)
    if _traces is not None:
        _traces.publish_failed(task_name, task_id, error)


_in_beat = False


def _beat_started(**_extra: Any) -> None:
    """Mark this process as running celery beat: what it publishes is the schedule's work."""
    global _in_beat
    _in_beat = True


# -- tasks that end without running (in the worker's main process) ------------------------------
def _task_revoked(
    sender: Any = None, request: Any = None, expired: bool = False, terminated: bool = False, **_extra: Any
) -> None:
    state = runtime.current()
    metrics = state.celery_metrics() if state is not None else None
    if metrics is None or request is None:  # terminated too: the main process killed it while running
        return
    name = getattr(request, "task_name", None) or getattr(request, "task", None) or getattr(sender, "name", None)
    outcome = "expired" if expired else "revoked"
    metrics.ended(task_label(name), queue_of(request), outcome)
    if not terminated:  # a terminated task's pool process ends its run span
        celery_endings.report_unrun_task(request, outcome)


# -- worker processes ------------------------------------------------------------------------------
def _worker_process_init(**_extra: Any) -> None:
    """In each prefork pool process, right after the fork: its own telemetry, into the shared directory.

    The solo pool sends this signal from the worker's main process: that process runs the tasks
    and records them itself, and keeps serving the endpoint.
    """
    state = runtime.current()
    if state is not None and state.role == "master" and state.pid == os.getpid():
        runtime.record_in_master()
        return
    runtime.mark_worker()
    runtime.init(role="worker")


def _worker_process_shutdown(**_extra: Any) -> None:
    """A pool process is exiting (recycled or stopping): export its spans and log lines.

    Its metric files stay; the main process folds them into the totals once it has exited.
    """
    state = runtime.current()
    if state is not None and state.role == "worker":
        runtime.shutdown()


def _serve_queue_lengths(instance: Any = None, **_extra: Any) -> None:
    """In the worker's main process, once its queues are known: serve their depth, read from the broker."""
    state = runtime.current()
    if state is None or instance is None:
        return
    app = instance.app
    queues = sorted(app.amqp.queues.consume_from or app.amqp.queues)
    with app.connection_for_read() as connection:
        url = connection.as_uri(include_password=True)
        driver_type = getattr(connection.transport, "driver_type", None)  # no I/O: the transport object only
    probe = probe_for(url, app.conf.broker_transport_options, driver_type)
    if probe is not None and queues:
        state.serve_collector(BrokerQueueCollector(probe, queues))


class _PoolSizeCollector:
    """``celery_worker_pool_processes``: the worker's configured concurrency."""

    def __init__(self, worker: Any) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        """Yield the configured number of pool processes."""
        spec = by_name("celery_worker_pool_processes")
        family = GaugeMetricFamily(spec.name, spec.description)
        family.add_metric([], float(self._worker.concurrency or 0))
        yield family


def _serve_pool_size(instance: Any = None, **_extra: Any) -> None:
    state = runtime.current()
    if state is not None and instance is not None:
        state.serve_collector(_PoolSizeCollector(instance))


def _runs_tasks_in_main_process(instance: Any) -> bool:
    from celery.concurrency.prefork import TaskPool as PreforkPool

    pool = getattr(instance, "pool_cls", None)
    return not (isinstance(pool, type) and issubclass(pool, PreforkPool))


def _worker_set_up(instance: Any = None, **_extra: Any) -> None:
    """``celeryd_after_setup``, in the worker's main process before its pool starts.

    Serves the pool size and queue depths; hooks the endings of pool processes; with a pool
    that runs tasks in this process (solo, threads...), records them here.
    """
    if instance is not None and _runs_tasks_in_main_process(instance):
        runtime.record_in_master()
    celery_endings.install_request_hooks()
    _serve_pool_size(instance)
    _serve_queue_lengths(instance)


def _keep_spyglass_logging(loglevel: int | str | None = None, **_extra: Any) -> None:
    """Connected to ``setup_logging``: Celery then leaves the logging spyglass configured alone.

    Celery's ``--loglevel`` still applies (``celery worker`` defaults to WARNING), unless
    ``SPYGLASS_LOG_LEVEL`` sets the level.
    """
    state = runtime.init()
    if state.disabled or not loglevel or "SPYGLASS_LOG_LEVEL" in os.environ:
        return
    name = (logging.getLevelName(loglevel) if isinstance(loglevel, int) else str(loglevel)).lower()
    if name in LOG_LEVELS:
        runtime.set_log_level(name)
