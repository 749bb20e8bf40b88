"""The Service dashboard: RED (rate, errors, duration) of an instrumented HTTP service, per route."""

from __future__ import annotations

from dashboards.frame import datasource_variable, label_variable, new_dashboard
from dashboards.panels import Query, logs_panel, stat_panel, table_panel, timeseries_panel
from dashboards.processes import cpu_panel, memory_panel, telemetry_panel
from dashboards.sdk import dashboard

__all__ = ["build"]

_REQUESTS = 'http_server_request_duration_seconds_count{job=~"$job", http_route=~"$route"}'
_BUCKETS = 'http_server_request_duration_seconds_bucket{job=~"$job", http_route=~"$route"}'
_SERVER_ERRORS = (
    'http_server_request_duration_seconds_count{job=~"$job", http_route=~"$route", http_response_status_code=~"5.."}'
)


def _quantile(q: float, by: str = "") -> str:
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({_BUCKETS}[$__rate_interval])))"


def _error_ratio(by: str) -> str:
    # Zero when no request failed, instead of "No data": on-call must see 0 %, not a blank panel.
    errors = f"sum by ({by}) (rate({_SERVER_ERRORS}[$__rate_interval]))"
    total = f"sum by ({by}) (rate({_REQUESTS}[$__rate_interval]))"
    return f"({errors} or {total} * 0) / {total}"


def build() -> dashboard.Dashboard:
    """The Service dashboard (uid ``spyglass-service``)."""
    return (
        new_dashboard(
            "service",
            "Service (RED)",
            "Requests, errors and latency of each HTTP route of the service, with its logs and the health of its "
            "telemetry. Latency points carry exemplars: click one to open its trace in Tempo.",
        )
        .with_variable(datasource_variable())
        .with_variable(label_variable("job", "Service", "http_server_request_duration_seconds_count", "job"))
        .with_variable(
            label_variable("route", "Route", 'http_server_request_duration_seconds_count{job=~"$job"}', "http_route")
        )
        .with_row(dashboard.Row("Overview"))
        .with_panel(
            stat_panel(
                "Requests per second",
                "Requests the selected routes answer per second, all status codes.",
                "reqps",
                [Query(f"sum(rate({_REQUESTS}[$__rate_interval]))", "requests")],
            )
        )
        .with_panel(
            stat_panel(
                "5xx ratio",
                "Share of requests answered with a 5xx status. Orange from 1 %, red from 5 % (the "
                "HTTPHighErrorRatio alert's level).",
                "percentunit",
                [Query(_error_ratio("job"), "{{job}}")],
                alerts=["HTTPHighErrorRatio"],
                thresholds=[0.01, 0.05],
                decimals=2,
            )
        )
        .with_panel(
            stat_panel(
                "p95 latency",
                "95th percentile of request duration over the selected routes. Orange from 250 ms, red from "
                "500 ms (the latency SLO's threshold).",
                "s",
                [Query(_quantile(0.95), "p95")],
                alerts=["APILatencyBudgetBurn"],
                thresholds=[0.25, 0.5],
            )
        )
        .with_panel(
            stat_panel(
                "Active requests",
                "Requests being handled right now, summed over the service's live worker processes. A number "
                "stuck near the worker count means every worker is busy and new requests queue.",
                "short",
                [Query('sum(http_server_active_requests{job=~"$job"})', "active")],
            )
        )
        .with_row(dashboard.Row("Traffic and errors"))
        .with_panel(
            timeseries_panel(
                "Request rate",
                "Requests per second by route (the route template, never the raw path).",
                "reqps",
                [Query(f"sum by (http_route) (rate({_REQUESTS}[$__rate_interval]))", "{{http_route}}")],
                alerts=["APIAvailabilityBudgetBurn"],
            )
        )
        .with_panel(
            timeseries_panel(
                "Error ratio (5xx)",
                "Share of each route's requests answered with a 5xx status (0 when none failed). 4xx answers are "
                "the client's mistakes and are not counted. The dashed line is the HTTPHighErrorRatio alert's 5 %.",
                "percentunit",
                [Query(_error_ratio("http_route"), "{{http_route}}")],
                alerts=["HTTPHighErrorRatio", "APIAvailabilityBudgetBurn"],
                thresholds=[0.05],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Responses by status code",
                "Requests per second by HTTP status code, stacked.",
                "reqps",
                [
                    Query(
                        f"sum by (http_response_status_code) (rate({_REQUESTS}[$__rate_interval]))",
                        "{{http_response_status_code}}",
                    )
                ],
                stacked=True,
                width=24,
            )
        )
        .with_row(dashboard.Row("Latency"))
        .with_panel(
            timeseries_panel(
                "Latency p50 / p95 / p99",
                "Request duration quantiles over the selected routes, from the histogram's buckets. The dots are "
                "exemplars: requests whose trace was kept; click one to open it. Dashed: the 0.5 s latency SLO.",
                "s",
                [
                    Query(_quantile(0.5), "p50", exemplars=True),
                    Query(_quantile(0.95), "p95", exemplars=True),
                    Query(_quantile(0.99), "p99", exemplars=True),
                ],
                alerts=["APILatencyBudgetBurn"],
                thresholds=[0.5],
            )
        )
        .with_panel(
            timeseries_panel(
                "Latency p95 by route",
                "95th percentile of request duration of each route, with exemplars.",
                "s",
                [Query(_quantile(0.95, "http_route"), "{{http_route}}", exemplars=True)],
                alerts=["APILatencyBudgetBurn"],
            )
        )
        .with_panel(
            table_panel(
                "Slowest routes (p95)",
                "The ten routes with the highest 95th percentile duration over the dashboard's time range.",
                "s",
                [
                    Query(
                        f"topk(10, histogram_quantile(0.95, sum by (le, http_route) (rate({_BUCKETS}[$__range]))))",
                        "{{http_route}}",
                        instant=True,
                    )
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "Active requests by method",
                "Requests in progress by HTTP method, summed over live worker processes.",
                "short",
                [
                    Query(
                        'sum by (http_request_method) (http_server_active_requests{job=~"$job"})',
                        "{{http_request_method}}",
                    )
                ],
                minimum=0,
            )
        )
        .with_row(dashboard.Row("Processes and telemetry"))
        .with_panel(cpu_panel(width=8))
        .with_panel(memory_panel(width=8))
        .with_panel(telemetry_panel(width=8))
        .with_row(dashboard.Row("Logs"))
        .with_panel(
            logs_panel(
                "Logs",
                "The service's log lines from Loki (OpenTelemetry log records; service_name is the job). Open a "
                "line and follow its trace_id to the trace in Tempo.",
                '{service_name=~"$job"}',
            )
        )
    )
