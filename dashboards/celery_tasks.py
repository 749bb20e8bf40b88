"""The Celery dashboard: task throughput, outcomes, runtimes, queue waits, queues, workers and beat."""

from __future__ import annotations

from dashboards.frame import datasource_variable, label_variable, new_dashboard
from dashboards.panels import Query, stat_panel, table_panel, timeseries_panel
from dashboards.processes import cpu_panel, memory_panel, telemetry_panel
from dashboards.sdk import dashboard

__all__ = ["FAILED_OUTCOMES", "build"]

FAILED_OUTCOMES = "failure|time_limit|worker_lost"
"""Outcomes of ``celery_task_completed_total`` counted as failed executions (a retry is not one: it runs again)."""

_TASKS = '{job=~"$job", queue=~"$queue", task_name=~"$task"}'
_COMPLETED = f"celery_task_completed_total{_TASKS}"
_FAILED = (
    f'celery_task_completed_total{{job=~"$job", queue=~"$queue", task_name=~"$task", outcome=~"{FAILED_OUTCOMES}"}}'
)
_FINISHED = 'celery_task_completed_total{job=~"$job", queue=~"$queue", task_name=~"$task", outcome!="retry"}'


def _quantiles(histogram: str) -> list[Query]:
    buckets = f"{histogram}_bucket{_TASKS}"
    return [
        Query(
            f"histogram_quantile({q}, sum by (le) (rate({buckets}[$__rate_interval])))",
            f"p{round(q * 100)}",
            exemplars=True,
        )
        for q in (0.5, 0.95, 0.99)
    ]


def build() -> dashboard.Dashboard:
    """The Celery dashboard (uid ``spyglass-celery``)."""
    return (
        new_dashboard(
            "celery",
            "Celery",
            "What the Celery workers do: tasks per second and how they end, how long they run and wait, the "
            "queues behind them, the worker processes and beat. Runtime and queue-wait points carry exemplars "
            "that open the task's trace.",
        )
        .with_variable(datasource_variable())
        .with_variable(label_variable("job", "Worker", "celery_worker_pool_processes", "job"))
        .with_variable(label_variable("queue", "Queue", 'celery_task_completed_total{job=~"$job"}', "queue"))
        .with_variable(
            label_variable("task", "Task", 'celery_task_completed_total{job=~"$job", queue=~"$queue"}', "task_name")
        )
        .with_row(dashboard.Row("Throughput and outcomes"))
        .with_panel(
            timeseries_panel(
                "Task throughput",
                "Task executions ending per second, by task, whatever their outcome.",
                "ops",
                [Query(f"sum by (task_name) (rate({_COMPLETED}[$__rate_interval]))", "{{task_name}}")],
                width=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Task outcomes",
                "Executions ending per second by outcome: success, failure, retry (the task asked to run again), "
                "time_limit, worker_lost, rejected, revoked, expired. Stacked.",
                "ops",
                [Query(f"sum by (outcome) (rate({_COMPLETED}[$__rate_interval]))", "{{outcome}}")],
                alerts=["CeleryTaskRetryStorm"],
                stacked=True,
                width=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Failure ratio",
                f"Share of each task's finished executions that failed ({FAILED_OUTCOMES.replace('|', ', ')}), "
                "retries left out: a retry runs again, the run that gives up counts. 0 when none failed. The "
                "dashed line is the CeleryTaskFailureRatioHigh alert's 10 %.",
                "percentunit",
                [
                    Query(
                        f"(sum by (task_name) (rate({_FAILED}[$__rate_interval])) "
                        f"or sum by (task_name) (rate({_FINISHED}[$__rate_interval])) * 0) "
                        f"/ sum by (task_name) (rate({_FINISHED}[$__rate_interval]))",
                        "{{task_name}}",
                    )
                ],
                alerts=["CeleryTaskFailureRatioHigh"],
                thresholds=[0.1],
                minimum=0,
                width=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Published vs completed",
                "Task messages published per second (by every instrumented service, web and workers) next to "
                "executions completing. Published above completed for long means the queue is growing.",
                "ops",
                [
                    Query(
                        'sum by (task_name) (rate(celery_task_published_total{queue=~"$queue", task_name=~"$task"}'
                        "[$__rate_interval]))",
                        "published {{task_name}}",
                    ),
                    Query(f"sum by (task_name) (rate({_COMPLETED}[$__rate_interval]))", "completed {{task_name}}"),
                ],
                width=12,
            )
        )
        .with_panel(
            table_panel(
                "Top exceptions",
                "The exceptions tasks raised most over the dashboard's time range, by task and exception type.",
                "short",
                [
                    Query(
                        'topk(10, sum by (task_name, exception_type) (increase(celery_task_failures_total{job=~"$job", '
                        'queue=~"$queue", task_name=~"$task"}[$__range])))',
                        instant=True,
                    )
                ],
                alerts=["CeleryTaskFailureRatioHigh"],
                width=12,
            )
        )
        .with_row(dashboard.Row("Durations"))
        .with_panel(
            timeseries_panel(
                "Runtime p50 / p95 / p99",
                "Time task executions ran in the worker, from start to end, whatever their outcome. Dots are "
                "exemplars: click one to open the execution's trace.",
                "s",
                _quantiles("celery_task_runtime_seconds"),
            )
        )
        .with_panel(
            timeseries_panel(
                "Queue wait p50 / p95 / p99",
                "Time from publish (or the ETA of a delayed task) until a worker started the task: broker wait "
                "plus prefetch wait. Dashed: the queue-wait SLO's 10 s.",
                "s",
                _quantiles("celery_task_queue_wait_seconds"),
                alerts=["TaskQueueWaitBudgetBurn"],
                thresholds=[10],
            )
        )
        .with_row(dashboard.Row("Queues"))
        .with_panel(
            timeseries_panel(
                "Queue length",
                "Messages waiting in the broker per queue, read by the worker at each scrape (Redis: every "
                "priority sub-queue; RabbitMQ: ready messages).",
                "short",
                [Query('max by (queue) (celery_queue_length{job=~"$job", queue=~"$queue"})', "{{queue}}")],
                alerts=["CeleryQueueBacklogGrowing", "CeleryQueueNoConsumers"],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Oldest message age",
                "Age of the oldest message waiting in each queue (Redis; absent while the queue is empty). A "
                "growing age with a steady length means nothing consumes the queue.",
                "s",
                [
                    Query(
                        'max by (queue) (celery_queue_oldest_message_age_seconds{job=~"$job", queue=~"$queue"})',
                        "{{queue}}",
                    )
                ],
                alerts=["CeleryQueueOldestMessageTooOld", "CeleryQueueNoConsumers"],
            )
        )
        .with_row(dashboard.Row("Workers and beat"))
        .with_panel(
            timeseries_panel(
                "Active tasks",
                "Tasks executing now per queue, summed over the workers' live pool processes; compare with the "
                "pool size in Worker processes.",
                "short",
                [Query('sum by (queue) (celery_tasks_active{job=~"$job", queue=~"$queue"})', "{{queue}}")],
                minimum=0,
                width=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Worker processes",
                "Per worker: pool processes configured (--concurrency), pool processes alive, and whether "
                "Prometheus can scrape it (up: 1). A worker whose up drops to 0 or disappears fires TargetDown "
                "or CeleryWorkerMetricsAbsent.",
                "short",
                [
                    Query('sum by (instance) (celery_worker_pool_processes{job=~"$job"})', "configured {{instance}}"),
                    Query('sum by (instance) (spyglass_worker_processes{job=~"$job"})', "alive {{instance}}"),
                    Query('up{job=~"$job"}', "up {{instance}}"),
                ],
                alerts=["TargetDown", "CeleryWorkerMetricsAbsent"],
                minimum=0,
                width=8,
            )
        )
        .with_panel(
            stat_panel(
                "Beat: time since last send",
                "Seconds since celery beat last sent each scheduled task (every beat process, whatever the "
                "worker selection). It should stay below the task's schedule interval.",
                "s",
                [Query("time() - max by (task_name) (celery_beat_last_sent_timestamp_seconds)", "{{task_name}}")],
                alerts=["CeleryBeatNotSending"],
                width=8,
                height=8,
            )
        )
        .with_row(dashboard.Row("Processes and telemetry"))
        .with_panel(cpu_panel(width=8))
        .with_panel(memory_panel(width=8))
        .with_panel(telemetry_panel(width=8))
    )
