"""Panels about the service's processes and its own telemetry, shared by the Service and Celery dashboards."""

from __future__ import annotations

from dashboards.panels import Query, timeseries_panel
from dashboards.sdk import timeseries

__all__ = ["cpu_panel", "memory_panel", "telemetry_panel"]


def cpu_panel(*, width: int) -> timeseries.Panel:
    """CPU of each selected job's process tree."""
    return timeseries_panel(
        "CPU",
        "CPU used by the service's process tree (the serving process and every worker process): 100 % is one core.",
        "percentunit",
        [Query('sum by (job) (rate(process_cpu_seconds_total{job=~"$job"}[$__rate_interval]))', "{{job}}")],
        width=width,
    )


def memory_panel(*, width: int) -> timeseries.Panel:
    """Resident memory of each selected job's process tree."""
    return timeseries_panel(
        "Memory (resident)",
        "Resident memory of the serving process and its living worker processes.",
        "bytes",
        [Query('sum by (job) (process_resident_memory_bytes{job=~"$job"})', "{{job}}")],
        width=width,
    )


def _outcomes(signal: str, exported: str) -> Query:
    # The exporter counts every item it tried; error_type is empty for the delivered ones.
    return Query(
        f'label_replace(sum by (error_type) (rate({exported}{{job=~"$job"}}[$__rate_interval])), '
        '"error_type", "delivered", "error_type", "")',
        f"{signal} exported: {{{{error_type}}}}",
    )


def _dropped(signal: str, processed: str, always_present: str) -> Query:
    # Drops before export have no series until the first one: show 0 ("none") instead of nothing.
    return Query(
        f'sum by (error_type) (rate({processed}{{job=~"$job", error_type!=""}}[$__rate_interval])) '
        f'or label_replace(0 * sum(rate({always_present}{{job=~"$job"}}[$__rate_interval])), '
        '"error_type", "none", "", "")',
        f"{signal} dropped: {{{{error_type}}}}",
    )


def telemetry_panel(*, width: int) -> timeseries.Panel:
    """Spans and log records delivered, failed and dropped per second (the TelemetryDropped alert)."""
    return timeseries_panel(
        "Telemetry dropped",
        "Spans and log records leaving the selected jobs per second. exported: delivered reached the backend; "
        "exported with an error type (export_failed, an exception type) were refused or unreachable and are lost; "
        "dropped: queue_full or already_shutdown never reached the exporter (none: no drop). Any loss for ten "
        "minutes fires TelemetryDropped.",
        "ops",
        [
            _outcomes("spans", "otel_sdk_exporter_span_exported_total"),
            _dropped("spans", "otel_sdk_processor_span_processed_total", "otel_sdk_processor_span_processed_total"),
            _outcomes("logs", "otel_sdk_exporter_log_exported_total"),
            _dropped("logs", "otel_sdk_processor_log_processed_total", "otel_sdk_exporter_log_exported_total"),
        ],
        alerts=["TelemetryDropped"],
        width=width,
    )
