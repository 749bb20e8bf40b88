"""Read a generated dashboard's JSON back: its panels, their queries and links, its variables.

The tests and the layout summary in ``docs/dashboards.md`` work from the JSON Grafana loads, not
from the code that built it, so what they check is what on-call engineers see.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["GridPosition", "PanelQuery", "PanelView", "VariableView", "expand", "panels", "variables"]


@dataclass(frozen=True)
class GridPosition:
    """Where a panel sits on Grafana's 24-column grid."""

    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class PanelQuery:
    """One query (target) of a panel."""

    ref_id: str
    expr: str
    datasource_type: str
    datasource_uid: str
    legend: str
    exemplar: bool
    instant: bool


@dataclass(frozen=True)
class PanelView:
    """A panel as Grafana shows it."""

    id: int
    title: str
    type: str
    description: str
    unit: str
    grid: GridPosition
    row: str
    """Title of the row the panel sits under ("" before the first row)."""
    queries: tuple[PanelQuery, ...]
    links: tuple[tuple[str, str], ...]
    """(title, url) of the panel's links."""
    thresholds: tuple[float, ...]


@dataclass(frozen=True)
class VariableView:
    """A template variable."""

    name: str
    type: str
    label: str
    query: str
    datasource_uid: str
    multi: bool
    include_all: bool
    all_value: str


def _datasource(value: Any, default: Mapping[str, str]) -> tuple[str, str]:
    if isinstance(value, Mapping):
        return str(value.get("type", default.get("type", ""))), str(value.get("uid", default.get("uid", "")))
    return default.get("type", ""), default.get("uid", "")


def _query(target: Mapping[str, Any], panel_datasource: Mapping[str, str]) -> PanelQuery:
    ds_type, ds_uid = _datasource(target.get("datasource"), panel_datasource)
    return PanelQuery(
        ref_id=str(target.get("refId", "")),
        expr=str(target.get("expr", "")),
        datasource_type=ds_type,
        datasource_uid=ds_uid,
        legend=str(target.get("legendFormat", "")),
        exemplar=bool(target.get("exemplar", False)),
        instant=bool(target.get("instant", False)),
    )


def _flat_panels(items: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for item in items:
        yield item
        if item.get("type") == "row":
            yield from item.get("panels", ())  # a collapsed row keeps its panels inside


def panels(dashboard: Mapping[str, Any]) -> list[PanelView]:
    """Every panel except rows, in reading order (top to bottom, left to right), with its row."""
    flat = sorted(_flat_panels(dashboard.get("panels", ())), key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    views: list[PanelView] = []
    row = ""
    for item in flat:
        if item.get("type") == "row":
            row = str(item.get("title", ""))
            continue
        panel_ds = item.get("datasource") if isinstance(item.get("datasource"), Mapping) else {}
        defaults = item.get("fieldConfig", {}).get("defaults", {})
        steps = defaults.get("thresholds", {}).get("steps", ())
        grid = item["gridPos"]
        views.append(
            PanelView(
                id=int(item.get("id", 0)),
                title=str(item.get("title", "")),
                type=str(item.get("type", "")),
                description=str(item.get("description", "")),
                unit=str(defaults.get("unit", "")),
                grid=GridPosition(int(grid["x"]), int(grid["y"]), int(grid["w"]), int(grid["h"])),
                row=row,
                queries=tuple(_query(target, panel_ds) for target in item.get("targets", ())),
                links=tuple((str(link.get("title", "")), str(link.get("url", ""))) for link in item.get("links", ())),
                thresholds=tuple(float(step["value"]) for step in steps if step.get("value") is not None),
            )
        )
    return views


def variables(dashboard: Mapping[str, Any]) -> list[VariableView]:
    """The dashboard's template variables, in order."""
    found = []
    for item in dashboard.get("templating", {}).get("list", ()):
        query = item.get("query", "")
        if isinstance(query, Mapping):
            query = query.get("query", "")
        _type, uid = _datasource(item.get("datasource"), {})
        found.append(
            VariableView(
                name=str(item["name"]),
                type=str(item.get("type", "")),
                label=str(item.get("label", "")),
                query=str(query),
                datasource_uid=uid,
                multi=bool(item.get("multi", False)),
                include_all=bool(item.get("includeAll", False)),
                all_value=str(item.get("allValue", "")),
            )
        )
    return found


_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)|\[\[(\w+)\]\]")


def _regex_value(values: Sequence[str]) -> str:
    escaped = [re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def expand(text: str, values: Mapping[str, str | Sequence[str]]) -> str:
    """Substitute Grafana variables (``$name``, ``${name}``, ``${name:format}``, ``[[name]]``) the way Grafana does.

    A value given as a string is used as it is (an "All" value such as ``.+``, or ``5m`` for
    ``$__rate_interval``); a list of values is joined as Grafana joins a multi-value variable in
    a Prometheus query, as a regular expression alternation. An unknown variable is an error, so
    a query cannot silently keep a ``$name`` Prometheus would reject or misread.
    """

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3) or match.group(4)
        if name.isdigit():
            return match.group(0)  # a regex back-reference ("$1" in label_replace), not a variable
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {text!r}")
        value = values[name]
        return value if isinstance(value, str) else _regex_value(value)

    return _VARIABLE.sub(substitute, text)
