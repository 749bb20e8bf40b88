"""The Grafana dashboards as files: generated from code, complete, and consistent with the catalog and the rules.

What these tests read is the JSON Grafana loads (dashboards/json/), through dashboards.inspect. That every
query returns data from a Prometheus scraping the demo is tests/test_dashboard_queries.py's job.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.links import DASHBOARD_UIDS, runbook_url
from dashboards.__main__ import DOCS_PAGE, JSON_DIR
from dashboards.__main__ import main as dashboards_main
from dashboards.inspect import PanelView, expand, panels, variables
from dashboards.render import docs_page, render_all
from spyglass.catalog import exposed_sample_names
from tests.conftest import REPO
from tests.promql import metric_names

RULES_DIR = REPO / "collector/prometheus/rules"
RUNBOOKS = REPO / "docs/runbooks.md"
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}
# Prometheus' own series a dashboard may use besides the catalog's.
PROMETHEUS_SERIES = {"up"}
# Histograms whose observations carry trace exemplars (spyglass attaches them): their quantile graphs must ask.
EXEMPLAR_HISTOGRAMS = (
    "http_server_request_duration_seconds",
    "celery_task_runtime_seconds",
    "celery_task_queue_wait_seconds",
)
# Resource attributes Loki 3 turns into index labels when it receives OTLP logs (its default otlp_config).
LOKI_OTLP_INDEX_LABELS = {"service_name", "service_namespace", "service_instance_id", "deployment_environment"}


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(JSON_DIR.glob("*.json"))}


def all_panels() -> list[tuple[str, PanelView]]:
    return [(name, view) for name, data in load_dashboards().items() for view in panels(data)]


def variable_metric_names(query: str) -> set[str]:
    """Metric names of a ``label_values(selector, label)`` variable query (or of a plain PromQL one)."""
    call = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
    return metric_names(call.group(1)) if call else metric_names(query)


def rule_names(kind: str) -> set[str]:
    """The names of collector/prometheus/rules' rules of ``kind`` (``record`` or ``alert``)."""
    names = set()
    for path in RULES_DIR.glob("*.yml"):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            names |= {rule[kind] for rule in group.get("rules", []) if kind in rule}
    return names


def test_committed_dashboards_and_their_docs_are_what_the_code_generates() -> None:
    """dashboards/json/*.json and docs/dashboards.md equal what `make dashboards` writes from the code, so
    an edit to the JSON (lost at the next generation) or code committed without regenerating fails here.
    """
    rendered = render_all()
    assert sorted(rendered) == sorted(path.name for path in JSON_DIR.glob("*.json"))
    for name, text in rendered.items():
        assert (JSON_DIR / name).read_text() == text, f"{name} differs from the code: run `make dashboards`"
    assert DOCS_PAGE.read_text() == docs_page(rendered), "docs/dashboards.md is stale: run `make dashboards`"
    assert dashboards_main(["--check"]) == 0


def test_check_mode_reports_a_hand_edited_dashboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m dashboards --check` fails on a JSON file that differs from the code and on a stray one."""
    import dashboards.__main__ as cli

    fake = tmp_path / "json"
    fake.mkdir()
    for name, text in render_all().items():
        (fake / name).write_text(text)
    docs = tmp_path / "dashboards.md"
    docs.write_text(docs_page(render_all()))
    monkeypatch.setattr(cli, "JSON_DIR", fake)
    monkeypatch.setattr(cli, "DOCS_PAGE", docs)
    monkeypatch.setattr(cli, "REPO", tmp_path)
    assert cli.main(["--check"]) == 0
    (fake / "service.json").write_text((fake / "service.json").read_text().replace("Request rate", "Requests"))
    assert cli.main(["--check"]) == 1
    cli.main([])
    assert cli.main(["--check"]) == 0
    (fake / "old.json").write_text("{}")
    assert cli.main(["--check"]) == 1


def test_the_four_dashboards_have_their_fixed_uids_and_link_to_each_other() -> None:
    """Service, Celery, SLO and Database dashboards exist with the uids alerts link to, all tagged
    spyglass, each with a dashboards link (by tag, keeping time and variables) to the others.
    """
    dashboards = load_dashboards()
    assert {data["uid"] for data in dashboards.values()} == set(DASHBOARD_UIDS.values())
    for name, data in dashboards.items():
        assert "spyglass" in data["tags"], name
        links = [link for link in data["links"] if link["type"] == "dashboards"]
        assert links and links[0]["tags"] == ["spyglass"] and links[0]["keepTime"] and links[0]["includeVars"]
        assert data["description"].strip(), name


def test_every_panel_has_a_unit_a_description_and_queries() -> None:
    """On-call engineers read a number's unit and what it means on the panel itself: every panel has a
    title, a unit, a description of at least a sentence, and at least one query; titles are unique on
    their dashboard.
    """
    for name, data in load_dashboards().items():
        views = panels(data)
        assert len(views) >= 6, f"{name}: only {len(views)} panels"
        titles = [view.title for view in views]
        assert len(titles) == len(set(titles)), f"{name}: duplicate titles {titles}"
        for view in views:
            assert view.unit, f"{name} / {view.title}: no unit"
            assert len(view.description) >= 30, f"{name} / {view.title}: description too short"
            assert view.queries and all(query.expr.strip() for query in view.queries), f"{name} / {view.title}"


def test_panels_fit_the_grid_and_do_not_overlap() -> None:
    """Every panel lies within Grafana's 24 columns and no two panels cover the same cell."""
    for name, data in load_dashboards().items():
        taken: dict[tuple[int, int], str] = {}
        for item in data["panels"]:
            grid = item["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{name} / {item['title']}: {grid}"
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in taken, f"{name}: {item['title']} overlaps {taken[(x, y)]}"
                    taken[(x, y)] = item["title"]
        ids = [item["id"] for item in data["panels"]]
        assert len(ids) == len(set(ids)) and 0 not in ids, f"{name}: panel ids {ids}"


def test_metric_name_extraction_sees_every_selector_and_nothing_else() -> None:
    """The catalog check below is not vacuous: names in selectors, inside functions, after `offset`, in
    `__name__` regexes and in label_values() variables are found; functions, keywords, label names and
    string contents are not.
    """
    expr = (
        'sum by (le, job) (rate(a_bucket{job=~"$job", x="b_total"}[$__rate_interval])) / on (job) group_left '
        'b:c:rate5m or vector(0) and d_total offset 5m unless label_replace(e, "f", "g", "h", "") '
        '+ min by (slo) ({__name__=~"slo:x_rate(1h|5m)"})'
    )
    assert metric_names(expr) == {"a_bucket", "b:c:rate5m", "d_total", "e", "~slo:x_rate(1h|5m)"}
    assert variable_metric_names('label_values(m_count{job=~"$job"}, http_route)') == {"m_count"}


def test_every_metric_a_dashboard_uses_is_in_the_catalog_or_recorded_by_the_rules() -> None:
    """A renamed metric cannot leave a panel on "No data": every series a panel or variable selects is in
    spyglass's metric catalog, is recorded by collector/prometheus/rules, or is Prometheus' `up`; a
    `__name__` regex must match at least one of those.
    """
    known = exposed_sample_names() | rule_names("record") | PROMETHEUS_SERIES
    problems = []
    for name, data in load_dashboards().items():
        selected = [(view.title, query.expr) for view in panels(data) for query in view.queries]
        selected = [(title, expr) for title, expr in selected if not expr.lstrip().startswith("{")]  # LogQL
        found = [(title, metric) for title, expr in selected for metric in metric_names(expr)]
        found += [
            (f"${v.name}", metric)
            for v in variables(data)
            if v.type == "query"
            for metric in variable_metric_names(v.query)
        ]
        for title, metric in found:
            if metric.startswith("~"):
                if not any(re.fullmatch(metric[1:], candidate) for candidate in known):
                    problems.append(f"{name} / {title}: __name__ regex {metric[1:]!r} matches no known series")
            elif metric not in known:
                problems.append(f"{name} / {title}: {metric} is neither in the catalog nor recorded")
    assert not problems, "\n".join(problems)


def test_promtool_parses_every_prometheus_query_of_every_dashboard(tmp_path: Path) -> None:
    """Every Prometheus query of every panel, with the variables expanded as Grafana would ("All" and a
    multi-value selection), is valid PromQL by promtool's parser (each becomes a recording rule of a file
    `promtool check rules` reads), so no panel opens on a parse error.
    """
    rules = []
    for name, data in load_dashboards().items():
        names = [variable.name for variable in variables(data)]
        builtins = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600"}
        for values in ({n: ".+" for n in names}, {n: ["a-b", "c.d"] for n in names}):
            for view in panels(data):
                for query in view.queries:
                    if query.datasource_type == "prometheus":
                        rules.append(
                            {
                                "record": f"check:{name.removesuffix('.json')}:{len(rules)}",
                                "expr": expand(query.expr, values | builtins),
                            }
                        )
    assert len(rules) > 50
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    path.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [{"record": "a:b:c", "expr": "sum(x"}]}]}))
    assert subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True).returncode != 0


def test_every_variable_a_query_uses_is_defined_on_its_dashboard() -> None:
    """Queries and variable queries use only the dashboard's own variables and Grafana's built-ins, so no
    `$name` reaches Prometheus unexpanded.
    """
    for data in load_dashboards().values():
        defined = {variable.name: ".+" for variable in variables(data)} | dict.fromkeys(GRAFANA_BUILTINS, "5m")
        texts = [query.expr for view in panels(data) for query in view.queries]
        texts += [variable.query for variable in variables(data) if variable.type == "query"]
        for text in texts:
            expand(text, defined)  # raises KeyError naming an undefined variable


def test_variables_are_chained_from_the_datasource_variable() -> None:
    """Each dashboard selects its Prometheus with a `datasource` variable, and every query variable reads
    through it; label variables are multi-value with an "All" of `.+`.
    """
    for name, data in load_dashboards().items():
        found = variables(data)
        assert found[0].name == "datasource" and found[0].type == "datasource" and found[0].query == "prometheus"
        for variable in found[1:]:
            assert variable.type == "query" and variable.datasource_uid == "${datasource}", (name, variable)
            assert variable.multi and variable.include_all and variable.all_value == ".+", (name, variable)
            assert variable.query.startswith("label_values("), (name, variable)


def test_histogram_graphs_with_exemplars_ask_for_them() -> None:
    """Latency, task runtime and queue-wait graphs show exemplars (a spike opens its trace): every
    time-series query taking a quantile of a histogram that carries exemplars asks Prometheus for them.
    """
    checked = 0
    for name, view in all_panels():
        if view.type != "timeseries":
            continue
        for query in view.queries:
            if "histogram_quantile" in query.expr and any(h + "_bucket" in query.expr for h in EXEMPLAR_HISTOGRAMS):
                assert query.exemplar, f"{name} / {view.title} / {query.ref_id}: no exemplars"
                checked += 1
    assert checked >= 5


def test_runbook_links_lead_to_an_alert_and_its_runbook_section() -> None:
    """A panel that explains an alert links to that alert's runbook: every runbook link is
    collector.links.runbook_url(alert) for an alert defined in collector/prometheus/rules, whose section
    exists in docs/runbooks.md; and every alert is explained by at least one panel.
    """
    alerts = rule_names("alert")
    sections = set(re.findall(r"^## (\w+)\s*$", RUNBOOKS.read_text(), flags=re.MULTILINE))
    linked = set()
    for name, view in all_panels():
        for title, url in view.links:
            alert = title.removeprefix("Runbook: ")
            assert url == runbook_url(alert), (name, view.title, url)
            assert alert in alerts, f"{name} / {view.title}: {alert} is not an alert of the rules"
            assert alert in sections, f"{name} / {view.title}: docs/runbooks.md has no section {alert}"
            linked.add(alert)
    assert alerts and alerts <= linked, f"alerts no panel explains: {sorted(alerts - linked)}"


def test_logs_panels_select_streams_by_a_label_loki_indexes_for_otlp() -> None:
    """The logs panel reads Loki by `service_name`, the index label Loki makes of the OTLP resource's
    service.name (which the Collector forwards): the job variable's values are service names.
    """
    logs = [(name, view) for name, view in all_panels() if view.type == "logs"]
    assert logs
    for name, view in logs:
        for query in view.queries:
            assert query.datasource_uid == "loki", (name, view.title)
            selector = re.fullmatch(r"\{(.*)\}.*", query.expr)
            assert selector, query.expr
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector.group(1)))
            assert labels and labels <= LOKI_OTLP_INDEX_LABELS, (name, view.title, labels)
