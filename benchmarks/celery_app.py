"""The Celery app of the Celery benchmarks: a no-op task, instrumented the way ``BENCH_CELERY_VARIANT`` says.

Started as a real worker (``celery -A benchmarks.celery_app worker ...``) and imported by the
publisher (:mod:`benchmarks.celery_publish`), so both sides of a measurement are instrumented the
same way. Variants (:data:`VARIANTS`):

``baseline``
    Celery alone: no spyglass, no OpenTelemetry.
``spyglass`` (and ``spyglass-*``, the same with other settings)
    ``import spyglass.auto`` first, as spyglass's docs say; configured by the environment.
``otel-celery``
    opentelemetry-instrumentation-celery alone: an SDK ``TracerProvider`` with a
    ``BatchSpanProcessor`` and ``CeleryInstrumentor().instrument()``, set up in each prefork pool
    process in ``worker_process_init`` (its documentation's advice: the batch processor's thread
    does not survive a fork), and at start in the publisher.
``events``
    Celery alone, with task events: the worker runs with ``-E`` (set by the benchmark) and
    publishers send ``task-sent`` events, as celery-exporter and Flower need.
``prometheus-multiproc``
    prometheus_client's own multi-process mode (``PROMETHEUS_MULTIPROC_DIR``, set by the
    benchmark before this module is imported): a ``Counter`` and a ``Histogram`` updated in
    ``task_postrun``, served by the worker's main process with a ``MultiProcessCollector`` from
    ``worker_init``; each exiting pool process is marked dead as the library's docs advise.

Environment: ``CELERY_BROKER_URL`` (the broker), ``BENCH_QUEUE`` (the queue of this measurement),
``BENCH_REDIS_URL`` (where :func:`mark` records times; default: the broker), ``BENCH_TRACES_FILE``
(the otel-celery span file), ``BENCH_METRICS_PORT`` (the prometheus-multiproc endpoint).
"""

# ruff: noqa: E402 - spyglass.auto must be imported before anything else, and only in its variant

import os

VARIANT = os.environ.get("BENCH_CELERY_VARIANT", "baseline")
if VARIANT.startswith("spyglass"):
    import spyglass.auto  # noqa: F401 - first, as the docs say

import time
from collections.abc import Callable
from typing import Any

import celery
import redis
from celery import signals

__all__ = ["VARIANTS", "app", "instrument_publisher", "mark", "noop"]

VARIANTS = (
    "baseline",
    "spyglass",
    "spyglass-no-export",
    "spyglass-metrics-only",
    "otel-celery",
    "events",
    "prometheus-multiproc",
)
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/12"

if VARIANT not in VARIANTS:
    raise RuntimeError(f"BENCH_CELERY_VARIANT={VARIANT!r} is not one of {', '.join(VARIANTS)}")

app = celery.Celery("bench", broker=os.environ.get("CELERY_BROKER_URL", DEFAULT_BROKER_URL))
app.conf.task_default_queue = os.environ.get("BENCH_QUEUE", "spyglass-bench")
app.conf.broker_connection_retry_on_startup = True
app.conf.task_ignore_result = True
if VARIANT == "events":
    app.conf.task_send_sent_event = True


@app.task(name="bench.noop")
def noop() -> None:
    """Do nothing: what is measured is everything around the task."""


_marks: redis.Redis | None = None


def _marks_client() -> redis.Redis:
    global _marks
    if _marks is None:
        _marks = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL") or app.conf.broker_url)
    return _marks


@app.task(name="bench.mark")
def mark(key: str) -> None:
    """Record in Redis, under ``key``, the Unix time at which this task started running (first run wins)."""
    now = time.time()
    _marks_client().set(key, repr(now), nx=True)


@signals.worker_process_init.connect(weak=False)
def _connect_marks(**_extra: Any) -> None:
    """Open the pool process's Redis connection at start, so a mark's write costs one round trip."""
    global _marks
    _marks = None
    _marks_client().ping()


def _otel_tracing(service_name: str) -> Callable[[], None]:
    """Set up the OpenTelemetry SDK and the Celery instrumentor in this process; return its shutdown."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from spyglass.otlp_json import OtlpJsonFileSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    # spyglass's own OTLP/JSON file exporter: the same export work as in the spyglass variant.
    provider.add_span_processor(BatchSpanProcessor(OtlpJsonFileSpanExporter(os.environ["BENCH_TRACES_FILE"])))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()
    return provider.shutdown


def _nothing() -> None:
    """Shut down a publisher that runs nothing in the background."""


def instrument_publisher() -> Callable[[], None]:
    """Instrument this (publishing) process as its variant's users do; return what flushes and stops it.

    ``spyglass`` is already set up by ``import spyglass.auto``; ``otel-celery`` is set up here.
    """
    if VARIANT.startswith("spyglass"):
        import spyglass

        return spyglass.shutdown
    if VARIANT == "otel-celery":
        return _otel_tracing("bench-publisher")
    return _nothing


if VARIANT == "otel-celery":

    @signals.worker_process_init.connect(weak=False)
    def _otel_in_pool_process(**_extra: Any) -> None:
        """In each prefork pool process, right after the fork: the SDK and the instrumentor."""
        _otel_tracing("bench-worker")


if VARIANT == "prometheus-multiproc":
    from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server

    TASKS = Counter("celery_tasks", "Tasks run, by task name and final state.", ["task_name", "state"])
    RUNTIME = Histogram("celery_task_runtime_seconds", "Task runtime, by task name.", ["task_name"])
    _started: dict[str, float] = {}

    @signals.worker_init.connect(weak=False)
    def _serve_metrics(**_extra: Any) -> None:
        """In the worker's main process, before the pool starts: one endpoint summing every process."""
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        start_http_server(int(os.environ["BENCH_METRICS_PORT"]), addr="127.0.0.1", registry=registry)

    @signals.task_prerun.connect(weak=False)
    def _task_started(task_id: str | None = None, **_extra: Any) -> None:
        if task_id is not None:
            _started[task_id] = time.perf_counter()

    @signals.task_postrun.connect(weak=False)
    def _task_finished(task_id: str | None = None, task: Any = None, state: str | None = None, **_extra: Any) -> None:
        started = _started.pop(task_id or "", None)
        name = getattr(task, "name", None) or "unknown"
        TASKS.labels(name, state or "UNKNOWN").inc()
        if started is not None:
            RUNTIME.labels(name).observe(time.perf_counter() - started)

    @signals.worker_process_shutdown.connect(weak=False)
    def _process_exiting(**_extra: Any) -> None:
        """The docs' advice for exiting processes (it removes only live-gauge files)."""
        multiprocess.mark_process_dead(os.getpid())
