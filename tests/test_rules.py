"""The Prometheus rules in collector/prometheus/rules/ are valid, tested, documented and linked.

Every rule file passes `promtool check rules`; the promtool unit tests in
collector/prometheus/tests/ pass and hold, for every alert and severity, a case where it fires
(labels and annotations checked) and one where it must not. Every alert carries a severity, a
summary, a description, the runbook URL of its name and a link to a known dashboard; every alert
has a section in docs/runbooks.md and every section there is an alert. Expressions read only
metrics of the catalog, Prometheus' own series and series the rules record, named
level:metric:operations.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml

from collector import links
from collector.slo_rules import relink
from dashboards.inspect import panels
from spyglass.catalog import exposed_sample_names
from tests.promql import metric_names

REPO = Path(__file__).resolve().parent.parent
RULES_DIR = REPO / "collector/prometheus/rules"
TESTS_DIR = REPO / "collector/prometheus/tests"
RUNBOOKS = REPO / "docs/runbooks.md"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
TEST_FILES = sorted(TESTS_DIR.glob("*_test.yml"))

PROMETHEUS_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})
SEVERITIES = frozenset({"critical", "warning"})
DASHBOARD_VARIABLES = frozenset({"job", "route", "task", "queue", "slo"})

# The dashboards as the runbooks name them, and their panel titles (read from the generated JSON).
DASHBOARD_FILES = {"Service": "service.json", "Celery": "celery.json", "SLO": "slo.json", "Database": "database.json"}
PANEL_TITLES = {
    name: tuple(view.title for view in panels(json.loads((REPO / "dashboards/json" / file).read_text())))
    for name, file in DASHBOARD_FILES.items()
}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules(kind: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every rule of the rule files that has the key ``kind`` ("alert" or "record")."""
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            for rule in group["rules"]:
                if kind in rule:
                    yield path, rule


ALERTS = [rule for _, rule in rules("alert")]
ALERT_NAMES = sorted({rule["alert"] for rule in ALERTS})
RECORDED = frozenset(rule["record"] for _, rule in rules("record"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_metric_name_extraction_skips_functions_labels_and_durations() -> None:
    """The checker below sees metric names only, wherever they stand in an expression."""
    expression = (
        'sum by (job, le) (rate(http_server_request_duration_seconds_bucket{le="0.5", job=~"a|b"}[5m] offset 1d))\n'
        "/ on (job) group_left () job:http_server_requests:rate5m > bool 1e-3\n"
        "unless absent_over_time(celery_beat_last_sent_timestamp_seconds[10m]) or vector(1) and time() - up"
    )
    assert metric_names(expression) == {
        "http_server_request_duration_seconds_bucket",
        "job:http_server_requests:rate5m",
        "celery_beat_last_sent_timestamp_seconds",
        "up",
    }


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda path: path.name)
def test_promtool_check_rules_is_clean(path: Path) -> None:
    """`promtool check rules` accepts each rule file without a lint finding (duplicate rules included)."""
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda path: path.name)
def test_promtool_unit_tests_pass(path: Path) -> None:
    """`promtool test rules` passes on every unit test file of collector/prometheus/tests/."""
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_file_is_unit_tested() -> None:
    """Each rule file is loaded by at least one promtool unit test file."""
    tested = {(path.parent / name).resolve() for path in TEST_FILES for name in load(path)["rule_files"]}
    assert {path.resolve() for path in RULE_FILES} <= tested


def test_unit_tests_evaluate_recording_rules_before_alerts() -> None:
    """A test file loading several groups orders them all, so that alert values do not depend on map order."""
    for path in TEST_FILES:
        test = load(path)
        groups = [group["name"] for name in test["rule_files"] for group in load(path.parent / name)["groups"]]
        if len({Path(name).name for name in test["rule_files"]}) > 1:
            assert test.get("group_eval_order") == groups, path.name


def _alert_cases() -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """(test name, alert name, expected alerts) of every alert_rule_test entry."""
    for path in TEST_FILES:
        for test in load(path)["tests"]:
            for case in test.get("alert_rule_test", []):
                yield f"{path.name}: {test.get('name', '?')}", case["alertname"], case.get("exp_alerts") or []


def test_every_alert_and_severity_has_a_firing_case_with_labels_and_annotations() -> None:
    """For each (alert, severity) a unit test expects it to fire, checking its labels and all four annotations."""
    wanted = {(rule["alert"], rule["labels"]["severity"]) for rule in ALERTS}
    fired = set()
    for _, name, expected in _alert_cases():
        for alert in expected:
            annotations = alert.get("exp_annotations", {})
            if {"summary", "description", "runbook_url", "dashboard_url"} <= set(annotations):
                fired.add((name, alert["exp_labels"]["severity"]))
    assert sorted(wanted - fired) == []


def test_every_alert_has_a_case_where_it_must_not_fire() -> None:
    """Each alert has a unit test case expecting no alert (low traffic, a brief blip, under the threshold)."""
    quiet = {name for _, name, expected in _alert_cases() if not expected}
    assert sorted(set(ALERT_NAMES) - quiet) == []


@pytest.mark.parametrize("rule", ALERTS, ids=lambda rule: f"{rule['alert']}-{rule['labels']['severity']}")
def test_alert_carries_severity_summary_description_and_links(rule: dict[str, Any]) -> None:
    """Severity critical or warning; summary, description, runbook_url(name), a known dashboard's URL."""
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert annotations["summary"].strip() and annotations["description"].strip()
    assert annotations["runbook_url"] == links.runbook_url(rule["alert"])
    url = annotations["dashboard_url"]
    uids = {uid: key for key, uid in links.DASHBOARD_UIDS.items()}
    base, _, query = url.partition("?")
    prefix = links.GRAFANA_URL + "/d/"
    assert base.startswith(prefix) and base.removeprefix(prefix) in uids, url
    variables = dict(pair.split("=", 1) for pair in query.split("&")) if query else {}
    names = {name.removeprefix("var-") for name in variables}
    assert names <= DASHBOARD_VARIABLES, names
    rebuilt = links.dashboard_url(
        uids[base.removeprefix(prefix)], **{name.removeprefix("var-"): unquote(v) for name, v in variables.items()}
    )
    assert url == rebuilt


def test_alerts_with_a_meaningful_value_show_it() -> None:
    """Alerts whose value is a ratio, a count or an age print it ({{ $value }}) in their description."""
    valueless = {"TargetDown", "CeleryWorkerMetricsAbsent"}  # 1 or 0: the labels say it all
    for rule in ALERTS:
        if rule["alert"] not in valueless:
            assert "$value" in rule["annotations"]["description"], rule["alert"]


def test_for_durations_are_set_and_slo_pages_wait_at_most_two_minutes() -> None:
    """Every alert waits (`for:`); an SLO page waits no longer than 2 minutes (its short window already confirms)."""
    seconds = {"s": 1, "m": 60, "h": 3600}
    for rule in ALERTS:
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), rule["alert"]
        if "slo" in rule["labels"] and rule["labels"]["severity"] == "critical":
            assert int(rule["for"][:-1]) * seconds[rule["for"][-1]] <= 120, rule["alert"]


def test_rules_read_only_catalog_metrics_and_recorded_series() -> None:
    """Every metric in a rule expression is in spyglass.catalog, recorded by a rule, or Prometheus' own."""
    known = exposed_sample_names() | RECORDED | PROMETHEUS_SERIES
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            for rule in group["rules"]:
                unknown = metric_names(rule["expr"]) - known
                assert not unknown, f"{path.name}: {rule.get('alert') or rule.get('record')} reads {sorted(unknown)}"


def test_recording_rules_are_named_level_metric_operations() -> None:
    """Recorded series follow the level:metric:operations convention, and each name is recorded once per label set."""
    for _, rule in rules("record"):
        assert re.fullmatch(r"[a-z][a-z0-9_]*:[a-z][a-z0-9_]*:[a-z][a-z0-9_]*", rule["record"]), rule["record"]
    hand_written = [rule["record"] for path, rule in rules("record") if path.name != "slo.yml"]
    assert len(hand_written) == len(set(hand_written))


def test_group_names_are_unique() -> None:
    """Rule group names are unique over all rule files (unit tests order groups by name)."""
    names = [group["name"] for path in RULE_FILES for group in load(path)["groups"]]
    assert len(names) == len(set(names))


def test_hand_written_rule_files_link_to_the_current_bases() -> None:
    """`make rules` would not change the runbook and dashboard links of the hand-written files."""
    for path in RULE_FILES:
        assert relink(path.read_text()) == path.read_text(), path.name


def runbook_sections() -> dict[str, str]:
    """``## Name`` sections of docs/runbooks.md: name -> text, white space runs as one space."""
    parts = re.split(r"^## (.+)$", RUNBOOKS.read_text(), flags=re.M)
    return {title.strip(): " ".join(body.split()) for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_every_alert_has_a_runbook_section_and_every_section_is_an_alert() -> None:
    """docs/runbooks.md has one `## AlertName` section per alert (its anchor is the runbook_url's) and no other."""
    sections = runbook_sections()
    assert sorted(sections) == ALERT_NAMES
    for name in sections:
        assert links.runbook_url(name).endswith("#" + name.lower())


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_runbook_says_what_it_means_how_to_confirm_and_what_to_do(name: str) -> None:
    """Each section has Meaning, Confirm and Act, and names a dashboard panel to look at."""
    text = runbook_sections()[name]
    for part in ("**Meaning.**", "**Confirm.**", "**Act.**"):
        assert part in text, f"{name}: no {part}"
    confirm = text.split("**Confirm.**", 1)[1].split("**Act.**", 1)[0]
    named = [
        title
        for dashboard, titles in PANEL_TITLES.items()
        for title in titles
        if f'"{title}"' in confirm and f"{dashboard} dashboard" in confirm
    ]
    assert named, f"{name}: Confirm names no dashboard panel"


def test_runbooks_quote_only_existing_panel_titles() -> None:
    """A quoted title after a dashboard's name is one of that dashboard's panels (no stale names)."""
    every = {title for titles in PANEL_TITLES.values() for title in titles}
    for name, body in runbook_sections().items():
        confirm = body.split("**Confirm.**", 1)[1].split("**Act.**", 1)[0]
        for quoted in re.findall(r'"([^"]+)"', confirm):
            if quoted[0].isupper():
                assert quoted in every, f"{name}: {quoted!r} is not a dashboard panel"
