"""The Database dashboard: SQL statements per request and task, N+1 detections, slow statements."""

from __future__ import annotations

from dashboards.frame import datasource_variable, label_variable, new_dashboard
from dashboards.panels import Query, table_panel, timeseries_panel
from dashboards.sdk import dashboard

__all__ = ["build"]

_STATEMENTS = 'db_client_operation_duration_seconds_count{job=~"$job"}'
_STATEMENT_BUCKETS = 'db_client_operation_duration_seconds_bucket{job=~"$job"}'
_PER_REQUEST = 'spyglass_db_queries_per_request_bucket{job=~"$job", http_route=~"$route"}'
_PER_TASK = 'spyglass_db_queries_per_task_bucket{job=~"$job"}'


def build() -> dashboard.Dashboard:
    """The Database dashboard (uid ``spyglass-database``)."""
    return (
        new_dashboard(
            "database",
            "Database",
            "SQL run through instrumented SQLAlchemy engines: how many statements each request and task runs, "
            "the N+1 patterns spyglass detects (one statement repeated SPYGLASS_DB_N_PLUS_ONE_THRESHOLD times "
            "or more in one request or task), and which statements are slow.",
        )
        .with_variable(datasource_variable())
        .with_variable(label_variable("job", "Service", "db_client_operation_duration_seconds_count", "job"))
        .with_variable(
            label_variable("route", "Route", 'spyglass_db_queries_per_request_count{job=~"$job"}', "http_route")
        )
        .with_row(dashboard.Row("Statements per request and task"))
        .with_panel(
            timeseries_panel(
                "Queries per request (p95)",
                "95th percentile of the SQL statements one request ran, by route (requests that ran at least "
                "one). A route that jumps from a handful to dozens has grown an N+1 loop.",
                "short",
                [
                    Query(
                        f"histogram_quantile(0.95, sum by (le, http_route) (rate({_PER_REQUEST}[$__rate_interval])))",
                        "{{http_route}}",
                    )
                ],
                alerts=["DBNPlusOneRising"],
            )
        )
        .with_panel(
            timeseries_panel(
                "Queries per task (p95)",
                "95th percentile of the SQL statements one Celery task run ran, by task.",
                "short",
                [
                    Query(
                        f"histogram_quantile(0.95, sum by (le, task_name) (rate({_PER_TASK}[$__rate_interval])))",
                        "{{task_name}}",
                    )
                ],
                alerts=["DBNPlusOneRising"],
            )
        )
        .with_panel(
            timeseries_panel(
                "N+1 detections by route",
                "Requests per second that ran one statement at least the N+1 threshold times, by route; and task "
                "runs per second that did, by task (0 for those that query but never did). Each detection is a trace "
                "worth opening: its SQL spans show the loop.",
                "ops",
                [
                    Query(
                        'sum by (http_route) (rate(spyglass_db_n_plus_one_requests_total{job=~"$job", '
                        'http_route=~"$route"}[$__rate_interval])) or 0 * sum by (http_route) (rate('
                        'spyglass_db_queries_per_request_count{job=~"$job", http_route=~"$route"}[$__rate_interval]))',
                        "{{http_route}}",
                    ),
                    Query(
                        'sum by (task_name) (rate(spyglass_db_n_plus_one_tasks_total{job=~"$job"}[$__rate_interval])) '
                        "or 0 * sum by (task_name) "
                        '(rate(spyglass_db_queries_per_task_count{job=~"$job"}[$__rate_interval]))',
                        "task {{task_name}}",
                    ),
                ],
                alerts=["DBNPlusOneRising"],
                width=24,
            )
        )
        .with_row(dashboard.Row("Statements"))
        .with_panel(
            table_panel(
                "Slowest statements (p95)",
                "The ten (operation, table) pairs with the highest 95th percentile duration over the dashboard's "
                "time range.",
                "s",
                [
                    Query(
                        "topk(10, histogram_quantile(0.95, sum by (le, db_operation_name, db_collection_name) "
                        f"(rate({_STATEMENT_BUCKETS}[$__range]))))",
                        instant=True,
                    )
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "Statement rate",
                "SQL statements per second by operation and table.",
                "ops",
                [
                    Query(
                        f"sum by (db_operation_name, db_collection_name) (rate({_STATEMENTS}[$__rate_interval]))",
                        "{{db_operation_name}} {{db_collection_name}}",
                    )
                ],
                stacked=True,
            )
        )
        .with_panel(
            timeseries_panel(
                "Statement latency p50 / p95 / p99",
                "Duration of SQL statements, all operations together. Dots are exemplars: click one to open the "
                "trace of the request or task that ran the statement.",
                "s",
                [
                    Query(
                        f"histogram_quantile({q}, sum by (le) (rate({_STATEMENT_BUCKETS}[$__rate_interval])))",
                        f"p{round(q * 100)}",
                        exemplars=True,
                    )
                    for q in (0.5, 0.95, 0.99)
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "Statement error ratio",
                "Share of statements that failed, by error type (0 when none did).",
                "percentunit",
                [
                    Query(
                        f'(sum by (job) (rate(db_client_operation_duration_seconds_count{{job=~"$job", error_type!=""}}'
                        f"[$__rate_interval])) or sum by (job) (rate({_STATEMENTS}[$__rate_interval])) * 0) "
                        f"/ sum by (job) (rate({_STATEMENTS}[$__rate_interval]))",
                        "{{job}}",
                    )
                ],
                minimum=0,
            )
        )
    )
