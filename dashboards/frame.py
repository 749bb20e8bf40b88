"""What every spyglass dashboard shares: its frame (uid, tags, links, time) and its template variables."""

from __future__ import annotations

from collector.links import DASHBOARD_UIDS
from dashboards.panels import PROMETHEUS
from dashboards.sdk import dashboard, dashboard_model

__all__ = ["ALL", "TAG", "datasource_variable", "label_variable", "new_dashboard"]

TAG = "spyglass"
ALL = ".+"
"""The value of "All" in a label variable: any non-empty value (cheaper than a list of every value)."""


def new_dashboard(key: str, title: str, description: str) -> dashboard.Dashboard:
    """A dashboard with its fixed uid (``collector.links.DASHBOARD_UIDS[key]``) and links to the others."""
    return (
        dashboard.Dashboard(title)
        .uid(DASHBOARD_UIDS[key])
        .description(description)
        .tags([TAG])
        .editable()
        .tooltip(dashboard_model.DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .link(
            dashboard.DashboardLink("spyglass")
            .type("dashboards")
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )


def datasource_variable() -> dashboard.DatasourceVariable:
    """``$datasource``: which Prometheus to read (the provisioned one by default)."""
    return (
        dashboard.DatasourceVariable("datasource")
        .label("Prometheus")
        .type("prometheus")
        .current(dashboard_model.VariableOption(selected=True, text="Prometheus", value="prometheus"))
    )


def label_variable(name: str, label: str, metric_selector: str, label_name: str) -> dashboard.QueryVariable:
    """A multi-value variable listing ``label_name``'s values on ``metric_selector``, with "All"."""
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(PROMETHEUS)
        .query(f"label_values({metric_selector}, {label_name})")
        .refresh(dashboard_model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(ALL)
        .current(dashboard_model.VariableOption(selected=True, text="All", value="$__all"))
    )
