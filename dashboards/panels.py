"""Panel builders that make every panel carry what on-call needs: a unit, a description, runbook links.

Each function takes the panel's title, a description (what it shows and how to read it), its unit
(a Grafana unit id: ``s``, ``reqps``, ``percentunit``...), its queries and, when the panel
explains an alert, that alert's name: the panel then links to the alert's runbook. Prometheus
queries go through the dashboard's ``datasource`` variable; logs through the provisioned Loki.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from collector.links import runbook_url
from dashboards.sdk import (
    DataSourceRef,
    PromQueryFormat,
    common,
    common_builders,
    dashboard,
    dashboard_model,
    logs,
    loki,
    prometheus,
    stat,
    table,
    timeseries,
)

__all__ = [
    "LOKI",
    "PROMETHEUS",
    "Query",
    "logs_panel",
    "stat_panel",
    "table_panel",
    "timeseries_panel",
]

PROMETHEUS = DataSourceRef(type_val="prometheus", uid="${datasource}")
"""The Prometheus the dashboard's ``datasource`` variable selects."""
LOKI = DataSourceRef(type_val="loki", uid="loki")
"""The provisioned Loki (uid fixed in ``dashboards/provisioning/datasources``)."""

_REF_IDS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Query:
    """One PromQL query of a panel and the legend of its series."""

    expr: str
    legend: str = ""
    instant: bool = False
    """Evaluate once at the end of the time range (tables, stats of "now")."""
    exemplars: bool = False
    """Ask Prometheus for exemplars too: each dot opens the trace it came from."""


def _targets(queries: Sequence[Query]) -> list[prometheus.Dataquery]:
    if not queries:
        raise ValueError("a panel needs at least one query")
    targets = []
    for index, query in enumerate(queries):
        target = (
            prometheus.Dataquery()
            .datasource(PROMETHEUS)
            .expr(query.expr)
            .legend_format(query.legend or "__auto")
            .ref_id(_REF_IDS[index])
        )
        target = target.instant().format(PromQueryFormat.TABLE) if query.instant else target.range()
        if query.exemplars:
            target = target.exemplar(True)
        targets.append(target)
    return targets


def _runbook_links(alerts: Sequence[str]) -> list[dashboard.DashboardLink]:
    return [
        dashboard.DashboardLink(f"Runbook: {alert}").type("link").url(runbook_url(alert)).target_blank(True)
        for alert in alerts
    ]


def _thresholds(values: Sequence[float], *, higher_is_worse: bool = True) -> dashboard.ThresholdsConfig:
    """Green below the first value, orange from it, red from the second (reversed when higher is better)."""
    colors = ("green", "orange", "red") if higher_is_worse else ("red", "orange", "green")
    if len(values) > 2:
        raise ValueError("at most two thresholds: warning and critical")
    if not higher_is_worse and len(values) == 1:
        colors = ("red", "green")
    steps = [dashboard_model.Threshold(value=None, color=colors[0])]
    steps += [dashboard_model.Threshold(value=value, color=colors[i + 1]) for i, value in enumerate(values)]
    return dashboard.ThresholdsConfig().mode(dashboard_model.ThresholdsMode.ABSOLUTE).steps(steps)


def _threshold_lines(values: Sequence[float]) -> dashboard.ThresholdsConfig:
    """Dashed lines at each value (a graph's alert levels), each step redder than the last."""
    steps = [dashboard_model.Threshold(value=None, color="transparent")]
    steps += [dashboard_model.Threshold(value=value, color="red") for value in sorted(values)]
    return dashboard.ThresholdsConfig().mode(dashboard_model.ThresholdsMode.ABSOLUTE).steps(steps)


_Panel = TypeVar("_Panel", timeseries.Panel, stat.Panel, table.Panel)


def _framed(
    panel: _Panel,
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    alerts: Sequence[str],
    size: tuple[int, int],
) -> _Panel:
    """``panel`` with what every Prometheus panel has: title, description, unit, queries, size, runbook links."""
    if not title or not description.strip() or not unit:
        raise ValueError(f"panel {title!r} needs a title, a description and a unit")
    width, height = size
    panel = (
        panel.title(title)
        .description(description)
        .unit(unit)
        .datasource(PROMETHEUS)
        .targets(_targets(queries))
        .span(width)
        .height(height)
    )
    return panel.links(_runbook_links(alerts)) if alerts else panel


def timeseries_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    *,
    alerts: Sequence[str] = (),
    width: int = 12,
    height: int = 8,
    thresholds: Sequence[float] = (),
    stacked: bool = False,
    minimum: float | None = None,
) -> timeseries.Panel:
    """A graph over time; ``thresholds`` draws dashed lines (an alert's firing level, say)."""
    panel = (
        _framed(timeseries.Panel(), title, description, unit, queries, alerts, (width, height))
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .tooltip(
            common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)
        )
        .fill_opacity(10)
        .line_width(1)
        .show_points(common.VisibilityMode.NEVER)
    )
    if minimum is not None:
        panel = panel.min(minimum)
    if stacked:
        panel = panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(60)
    if thresholds:
        panel = panel.thresholds(_threshold_lines(thresholds)).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED)
        )
    return panel


def stat_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    *,
    alerts: Sequence[str] = (),
    width: int = 6,
    height: int = 5,
    thresholds: Sequence[float] = (),
    higher_is_worse: bool = True,
    decimals: int | None = None,
) -> stat.Panel:
    """Big numbers of the last value of each series, coloured by ``thresholds`` (warning, critical).

    Green below the first threshold, orange from it, red from the second; ``higher_is_worse=False``
    reverses the colours (an error budget: red when low).
    """
    panel = (
        _framed(stat.Panel(), title, description, unit, queries, alerts, (width, height))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .color_mode(common.BigValueColorMode.BACKGROUND if thresholds else common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
    )
    if decimals is not None:
        panel = panel.decimals(decimals)
    return panel.thresholds(_thresholds(thresholds, higher_is_worse=higher_is_worse))


def table_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    *,
    alerts: Sequence[str] = (),
    width: int = 12,
    height: int = 8,
    sort_by: str = "Value",
) -> table.Panel:
    """A table of instant results (one row per series), sorted by ``sort_by`` descending."""
    if not all(query.instant for query in queries):
        raise ValueError(f"table {title!r}: its queries must be instant")
    return (
        _framed(table.Panel(), title, description, unit, queries, alerts, (width, height))
        .sort_by([common_builders.TableSortByFieldState().display_name(sort_by).desc(True)])
        .with_transformation(
            dashboard_model.DataTransformerConfig(
                id_val="organize", options={"excludeByName": {"Time": True}, "renameByName": {}}
            )
        )
    )


def logs_panel(title: str, description: str, expr: str, *, width: int = 24, height: int = 10) -> logs.Panel:
    """Log lines from Loki; a line's ``trace_id`` opens its trace (the Loki data source's derived field)."""
    if not title or not description.strip():
        raise ValueError(f"logs panel {title!r} needs a title and a description")
    return (
        logs.Panel()
        .title(title)
        .description(description)
        .unit("none")
        .datasource(LOKI)
        .with_target(loki.Dataquery().datasource(LOKI).expr(expr).ref_id("A"))
        .span(width)
        .height(height)
        .show_time(True)
        .wrap_log_message(True)
        .enable_log_details(True)
        .prettify_log_message(False)
        .sort_order(common.LogsSortOrder.DESCENDING)
    )
