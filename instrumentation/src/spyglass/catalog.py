"""The catalog of every metric spyglass exposes: the contract for dashboards, alerts and docs.

Metric objects are built from these entries (see :mod:`spyglass.metrics.instruments`), the
reference in ``docs/metrics.md`` is rendered from them (``python -m spyglass.catalog``), and the
tests check that every name a dashboard or rule uses is listed here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

__all__ = [
    "CATALOG",
    "CELERY_DURATION_BUCKETS",
    "DB_DURATION_BUCKETS",
    "DB_QUERY_COUNT_BUCKETS",
    "HTTP_DURATION_BUCKETS",
    "MetricSpec",
    "by_name",
    "exposed_sample_names",
    "openmetrics_family_name",
    "render_markdown",
]

# Task runtimes and queue waits span milliseconds to many minutes.
CELERY_DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip

# The advisory bucket boundaries of http.server.request.duration (OpenTelemetry semantic conventions).
HTTP_DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip

# The advisory bucket boundaries of db.client.operation.duration (OpenTelemetry semantic conventions).
DB_DURATION_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

# Queries per request or task: a handful is normal, hundreds is an N+1 pattern or a batch job.
DB_QUERY_COUNT_BUCKETS: tuple[float, ...] = (1, 2, 3, 5, 10, 20, 50, 100, 250, 1000)


@dataclass(frozen=True)
class MetricSpec:
    """One metric family as Prometheus sees it."""

    name: str
    """Family name as exposed (counters end in ``_total``)."""
    type: str
    """``counter``, ``gauge``, ``histogram`` or ``info``."""
    unit: str
    """Base unit (``seconds``, ``bytes``) or ``1`` for counts."""
    labels: tuple[str, ...]
    description: str
    otel_name: str = ""
    """The OpenTelemetry semantic-convention name this metric implements, if any."""
    source: str = "spyglass"
    """Which part of spyglass emits it."""
    buckets: tuple[float, ...] = ()
    multiprocess_mode: str = ""
    """How values from several worker processes are combined (gauges only)."""

    @property
    def constructor_name(self) -> str:
        """The name to give prometheus_client (which appends ``_total`` to counters itself)."""
        if self.type == "counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        if self.type == "info" and self.name.endswith("_info"):
            return self.name[: -len("_info")]
        return self.name


CATALOG: tuple[MetricSpec, ...] = (
    MetricSpec(
        name="http_server_request_duration_seconds",
        type="histogram",
        unit="seconds",
        labels=("http_request_method", "http_route", "http_response_status_code"),
        description="Duration of HTTP server requests, from the first byte in to the last byte out.",
        otel_name="http.server.request.duration",
        source="flask",
        buckets=HTTP_DURATION_BUCKETS,
    ),
    MetricSpec(
        name="http_server_active_requests",
        type="gauge",
        unit="1",
        labels=("http_request_method",),
        description="HTTP server requests being handled now, summed over live worker processes.",
        otel_name="http.server.active_requests",
        source="flask",
        multiprocess_mode="livesum",
    ),
    MetricSpec(
        name="otel_sdk_processor_span_processed_total",
        type="counter",
        unit="1",
        labels=("error_type",),
        description=(
            "Spans the batching span processor handed to the exporter; with error_type "
            "(queue_full, already_shutdown) the spans it dropped."
        ),
        otel_name="otel.sdk.processor.span.processed",
        source="traces",
    ),
    MetricSpec(
        name="otel_sdk_exporter_span_exported_total",
        type="counter",
        unit="1",
        labels=("error_type",),
        description=(
            "Spans the exporter tried to deliver; with error_type (export_failed, exception type) the "
            "spans the backend did not accept, which are lost."
        ),
        otel_name="otel.sdk.exporter.span.exported",
        source="traces",
    ),
    MetricSpec(
        name="otel_sdk_processor_log_processed_total",
        type="counter",
        unit="1",
        labels=("error_type",),
        description=(
            "Log lines the export queue dropped before export (error_type queue_full: the backend "
            "is slower than the service logs, or down). Lines on stdout are never dropped."
        ),
        otel_name="otel.sdk.processor.log.processed",
        source="logs",
    ),
    MetricSpec(
        name="otel_sdk_exporter_log_exported_total",
        type="counter",
        unit="1",
        labels=("error_type",),
        description=(
            "Log records the exporter (OTEL_LOGS_EXPORTER) tried to deliver; with error_type "
            "(export_failed, exception type) the records the backend did not accept, which are lost."
        ),
        otel_name="otel.sdk.exporter.log.exported",
        source="logs",
    ),
    MetricSpec(
        name="target_info",
        type="info",
        unit="1",
        labels=("service_name", "service_version", "telemetry_distro_name", "telemetry_distro_version"),
        description=(
            "Resource attributes of the service (service.name, service.version and every "
            "OTEL_RESOURCE_ATTRIBUTES entry) as labels; value 1."
        ),
        source="resource",
    ),
    MetricSpec(
        name="spyglass_build_info",
        type="info",
        unit="1",
        labels=("version", "python_version"),
        description="Version of the spyglass instrumentation and of Python in this service; value 1.",
        source="resource",
    ),
    MetricSpec(
        name="python_info",
        type="gauge",
        unit="1",
        labels=("implementation", "major", "minor", "patchlevel", "version"),
        description="Python implementation and version of the serving process; value 1.",
        source="process",
    ),
    MetricSpec(
        name="process_cpu_seconds_total",
        type="counter",
        unit="seconds",
        labels=(),
        description="CPU time of the service: the serving process and all its worker processes, living and exited.",
        source="process",
    ),
    MetricSpec(
        name="process_resident_memory_bytes",
        type="gauge",
        unit="bytes",
        labels=(),
        description="Resident memory of the serving process and its living worker processes.",
        source="process",
    ),
    MetricSpec(
        name="process_virtual_memory_bytes",
        type="gauge",
        unit="bytes",
        labels=(),
        description="Virtual memory of the serving process and its living worker processes.",
        source="process",
    ),
    MetricSpec(
        name="process_open_fds",
        type="gauge",
        unit="1",
        labels=(),
        description="Open file descriptors of the serving process and its living worker processes.",
        source="process",
    ),
    MetricSpec(
        name="process_max_fds",
        type="gauge",
        unit="1",
        labels=(),
        description="Open file descriptor limit of the serving process.",
        source="process",
    ),
    MetricSpec(
        name="process_start_time_seconds",
        type="gauge",
        unit="seconds",
        labels=(),
        description="Start time of the serving process since the Unix epoch.",
        source="process",
    ),
    MetricSpec(
        name="spyglass_worker_processes",
        type="gauge",
        unit="1",
        labels=(),
        description="Worker processes living under the serving process (gunicorn workers, pool children).",
        source="process",
    ),
    MetricSpec(
        name="spyglass_metrics_store_errors_total",
        type="counter",
        unit="1",
        labels=("error_type",),
        description=(
            "Failed writes to the multi-process metrics directory, by errno name (ENOSPC, EDQUOT, EROFS, EACCES, "
            "ENOENT, ENOTDIR, other): unusable at start (the service then uses a private temporary directory, or "
            "in-memory metrics that cover the serving process only), no room for a new series or a new process's "
            "file, exited processes not yet folded in. Each outage is also logged once per process."
        ),
        source="metrics",
    ),
    MetricSpec(
        name="spyglass_metrics_store_dropped_updates_total",
        type="counter",
        unit="1",
        labels=(),
        description=(
            "Metric updates (increments, observations) lost because the metrics directory had no room for their "
            "series; series stored before keep being updated, and new ones are stored again once there is room."
        ),
        source="metrics",
    ),
    MetricSpec(
        name="celery_task_published_total",
        type="counter",
        unit="1",
        labels=("task_name", "queue"),
        description=(
            "Task messages published by this service (web or worker) and accepted by the broker, by task and "
            "routing key (the queue with Celery's default exchange); task names the app does not register are "
            "`<unregistered>`."
        ),
        source="celery",
    ),
    MetricSpec(
        name="celery_task_publish_errors_total",
        type="counter",
        unit="1",
        labels=("task_name", "queue", "error_type"),
        description=(
            "Task messages this service could not publish (broker down or refusing), by task, routing key "
            "and exception class (`error_type`); they are not in `celery_task_published_total`."
        ),
        source="celery",
    ),
    MetricSpec(
        name="celery_task_completed_total",
        type="counter",
        unit="1",
        labels=("task_name", "queue", "outcome"),
        description=(
            "Task executions that ended, by outcome: success, failure, retry (the execution asked for a "
            "retry), rejected, revoked, expired, time_limit, worker_lost."
        ),
        source="celery",
    ),
    MetricSpec(
        name="celery_task_failures_total",
        type="counter",
        unit="1",
        labels=("task_name", "queue", "exception_type"),
        description="Task executions that raised, by the exception's fully qualified type.",
        source="celery",
    ),
    MetricSpec(
        name="celery_task_runtime_seconds",
        type="histogram",
        unit="seconds",
        labels=("task_name", "queue"),
        description=(
            "Time a task execution ran in the worker, from start to end, whatever its outcome; exemplars "
            "carry the run span's trace_id."
        ),
        source="celery",
        buckets=CELERY_DURATION_BUCKETS,
    ),
    MetricSpec(
        name="celery_task_queue_wait_seconds",
        type="histogram",
        unit="seconds",
        labels=("task_name", "queue"),
        description=(
            "Time from publish (or from the ETA of a countdown/ETA task) until a worker started the task: "
            "broker wait plus prefetch wait. Needs the publisher instrumented and agreeing clocks; exemplars "
            "carry the run span's trace_id."
        ),
        source="celery",
        buckets=CELERY_DURATION_BUCKETS,
    ),
    MetricSpec(
        name="celery_tasks_active",
        type="gauge",
        unit="1",
        labels=("queue",),
        description="Tasks executing now, summed over the worker's live pool processes.",
        source="celery",
        multiprocess_mode="livesum",
    ),
    MetricSpec(
        name="celery_worker_pool_processes",
        type="gauge",
        unit="1",
        labels=(),
        description=(
            "Pool processes the Celery worker is configured to run (--concurrency); compare with "
            "spyglass_worker_processes, the ones alive."
        ),
        source="celery",
    ),
    MetricSpec(
        name="celery_beat_tasks_sent_total",
        type="counter",
        unit="1",
        labels=("task_name",),
        description="Tasks celery beat sent on schedule, by task.",
        source="celery",
    ),
    MetricSpec(
        name="celery_beat_last_sent_timestamp_seconds",
        type="gauge",
        unit="seconds",
        labels=("task_name",),
        description="Unix time celery beat last sent each scheduled task; a stalled beat shows as a growing age.",
        source="celery",
        multiprocess_mode="max",
    ),
    MetricSpec(
        name="celery_queue_length",
        type="gauge",
        unit="1",
        labels=("queue",),
        description=(
            "Messages waiting in the broker for the queues the worker consumes, read at scrape time by the "
            "worker's main process (Redis: all priority sub-queues; RabbitMQ: ready messages)."
        ),
        source="celery",
    ),
    MetricSpec(
        name="celery_queue_oldest_message_age_seconds",
        type="gauge",
        unit="seconds",
        labels=("queue",),
        description=(
            "Age of the oldest waiting message of the queue, from its publish-time stamp (Redis only, "
            "instrumented publishers only; absent when the queue is empty)."
        ),
        source="celery",
    ),
    MetricSpec(
        name="db_client_operation_duration_seconds",
        type="histogram",
        unit="seconds",
        labels=("db_system_name", "db_operation_name", "db_collection_name", "error_type"),
        description=(
            "Duration of SQL statements run through an instrumented SQLAlchemy engine, by database system, "
            "operation (SELECT, INSERT...) and first table named; error_type is set when the statement failed."
        ),
        otel_name="db.client.operation.duration",
        source="sqlalchemy",
        buckets=DB_DURATION_BUCKETS,
    ),
    MetricSpec(
        name="spyglass_db_queries_per_request",
        type="histogram",
        unit="1",
        labels=("http_request_method", "http_route"),
        description="SQL statements one HTTP request ran (requests that ran at least one).",
        source="sqlalchemy",
        buckets=DB_QUERY_COUNT_BUCKETS,
    ),
    MetricSpec(
        name="spyglass_db_queries_per_task",
        type="histogram",
        unit="1",
        labels=("task_name",),
        description="SQL statements one Celery task run ran (runs that ran at least one).",
        source="sqlalchemy",
        buckets=DB_QUERY_COUNT_BUCKETS,
    ),
    MetricSpec(
        name="spyglass_db_n_plus_one_requests_total",
        type="counter",
        unit="1",
        labels=("http_request_method", "http_route"),
        description=(
            "HTTP requests that ran one SQL statement at least SPYGLASS_DB_N_PLUS_ONE_THRESHOLD times "
            "(N+1 queries: rows loaded one by one)."
        ),
        source="sqlalchemy",
    ),
    MetricSpec(
        name="spyglass_db_n_plus_one_tasks_total",
        type="counter",
        unit="1",
        labels=("task_name",),
        description="Celery task runs that ran one SQL statement at least SPYGLASS_DB_N_PLUS_ONE_THRESHOLD times.",
        source="sqlalchemy",
    ),
)

_BY_NAME = {spec.name: spec for spec in CATALOG}


def by_name(name: str) -> MetricSpec:
    """Return the catalog entry for a family name; raises ``KeyError`` for an unknown name."""
    return _BY_NAME[name]


def openmetrics_family_name(spec: MetricSpec) -> str:
    """The family name an OpenMetrics parser reports (without ``_total``, or ``_info`` for info)."""
    if spec.type == "counter":
        return spec.name.removesuffix("_total")
    if spec.type == "info":
        return spec.name.removesuffix("_info")
    return spec.name


def exposed_sample_names() -> frozenset[str]:
    """Every sample name a scrape can contain (``_bucket``/``_sum``/``_count`` for histograms)."""
    names: set[str] = set()
    for spec in CATALOG:
        if spec.type == "histogram":
            names.update(spec.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        elif spec.type == "counter":
            names.update((spec.name, spec.name[: -len("_total")] + "_created"))
        else:
            names.add(spec.name)
    return frozenset(names)


def render_markdown() -> str:
    """Render the catalog as the Markdown reference kept in ``docs/metrics.md``."""
    lines = [
        "# Metric catalog",
        "",
        "<!-- Generated by `python -m spyglass.catalog` from instrumentation/src/spyglass/catalog.py."
        " Do not edit: a test fails when this file and the catalog differ. -->",
        "",
        "Every metric spyglass exposes on its metrics endpoint. Dashboards, alert rules and these docs",
        "are checked against this list. Label values are bounded: routes are route templates",
        "(`<unmatched>` when no route matched), methods outside the known set are `_OTHER`.",
        "",
        "| Metric | Type | Unit | Labels | OpenTelemetry name | Description |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec in CATALOG:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "none"
        otel = f"`{spec.otel_name}`" if spec.otel_name else ""
        lines.append(f"| `{spec.name}` | {spec.type} | {spec.unit} | {labels} | {otel} | {spec.description} |")
    lines += ["", "## Histogram buckets", ""]
    for spec in CATALOG:
        if spec.buckets:
            bounds = ", ".join(f"{bound:g}" for bound in spec.buckets)
            lines.append(f"- `{spec.name}`: {bounds} (and `+Inf`)")
    lines += ["", "## Multi-process aggregation", ""]
    lines.append(
        "Under gunicorn (and other pre-forking servers) counters and histograms are summed over all "
        "worker processes, including workers that have exited, so that counters never go backwards. "
        "Gauges combine as follows:"
    )
    lines.append("")
    for spec in CATALOG:
        if spec.multiprocess_mode:
            lines.append(f"- `{spec.name}`: `{spec.multiprocess_mode}`")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - exercised by `make docs`
    sys.stdout.write(render_markdown())
