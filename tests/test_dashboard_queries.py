"""Every Prometheus query of every Grafana dashboard returns data from a real Prometheus.

`python -m demo_app.native` runs the shop (gunicorn, a prefork Celery worker, beat), Prometheus
with the stack's own configuration and rules, and load. The module runs it through a clean phase,
then a fault phase (injected 500s, a payment outage, a paused queue, then tasks past their time
limit), and sends each dashboard's queries, read back from ``dashboards/json`` with
``dashboards.inspect``, the way Grafana sends them: template variables resolved from Prometheus
and expanded with "All", ``$__rate_interval`` and its kin substituted, range queries over the
phase with Grafana's step, instant queries (tables) at the phase's end. Loki queries are not run
here (no Loki); they are checked statically elsewhere.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import yaml

from dashboards.inspect import PanelQuery, PanelView, VariableView, expand, panels, variables
from demo_app.native import PORT_VARIABLES
from tests.conftest import REPO, clean_environment, free_port, wait_for

pytestmark = pytest.mark.slow

DASHBOARD_DIR = REPO / "dashboards" / "json"
DASHBOARD_UIDS = ("spyglass-service", "spyglass-celery", "spyglass-slo", "spyglass-database")
PROMETHEUS_UIDS = ("${datasource}", "$datasource", "prometheus")
ADMIN_TOKEN = "dashboard-queries-token"
REDIS_DB = 12  # test_demo_shop uses 13
TASK_TIME_LIMIT_S = 2
SLOW_WORKER_MS = 3_000  # above the time limit: every task is killed at it
CLEAN_S = 80  # a few scrapes beyond a minute, so every rate window has filled
FAULT_S = 45  # error rate, payment outage, paused queue: failures, retries, a backlog
SLOW_S = 35  # ... plus tasks past the time limit
MAX_ASSIGNMENTS = 50  # combinations of single-valued variables tried per dashboard


def _scrape_interval_s() -> int:
    """Grafana's minimum interval: the Prometheus data source's ``timeInterval`` (the scrape interval)."""
    provisioned = yaml.safe_load((REPO / "dashboards/provisioning/datasources/datasources.yaml").read_text())
    (prometheus,) = [source for source in provisioned["datasources"] if source["uid"] == "prometheus"]
    return int(str(prometheus["jsonData"]["timeInterval"]).removesuffix("s"))


SCRAPE_S = _scrape_interval_s()
STEP_S = SCRAPE_S  # Grafana's $__interval for a few minutes' range: the minimum interval
RATE_INTERVAL_S = max(STEP_S + SCRAPE_S, 4 * SCRAPE_S)  # Grafana's definition of $__rate_interval

# Panels with no series at all until something goes wrong, checked in the fault phase instead of
# the clean one. Only panels that truly have nothing to show without a fault belong here: one
# that shows 0 (``or vector(0)``, ``... * 0``) does not.
NEEDS_FAULT: dict[tuple[str, str], str] = {
    ("spyglass-celery", "Top exceptions"): (
        "celery_task_failures_total has no series until a task raises; the demo's retried declines"
        " (10%, 2 retries) almost never exhaust their retries"
    ),
    ("spyglass-celery", "Oldest message age"): (
        "celery_queue_oldest_message_age_seconds is absent while a queue is empty, and the worker"
        " empties its queues as fast as they fill until one is paused"
    ),
}


# --------------------------------------------------------------------------------------------
# The demo, its phases and its Prometheus


class QueryError(Exception):
    """Prometheus refused a request, or did not answer."""


@dataclass(frozen=True)
class Phase:
    """A stretch of the run with the same fault switches."""

    name: str
    start: float
    end: float

    @property
    def seconds(self) -> int:
        return max(1, round(self.end - self.start))

    def builtins(self) -> dict[str, str]:
        """Grafana's global variables for a panel showing this phase."""
        return {
            "__interval": f"{STEP_S}s",
            "__interval_ms": str(STEP_S * 1000),
            "__rate_interval": f"{RATE_INTERVAL_S}s",
            "__rate_interval_ms": str(RATE_INTERVAL_S * 1000),
            "__range": f"{self.seconds}s",
            "__range_s": str(self.seconds),
            "__range_ms": str(self.seconds * 1000),
        }


@dataclass
class Prometheus:
    """The demo's Prometheus HTTP API, each answer cached (the data of a finished phase does not change)."""

    url: str
    _answers: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def api(self, path: str, *, cache: bool = True, **params: Any) -> Any:
        key = (path, tuple(sorted(params.items())))
        if key not in self._answers or not cache:
            self._answers[key] = self._ask(path, params)
        answer = self._answers[key]
        if isinstance(answer, QueryError):
            raise answer
        return answer

    def _ask(self, path: str, params: Mapping[str, Any]) -> Any:
        try:
            response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        except requests.RequestException as exc:
            return QueryError(f"no answer: {exc}")
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or body.get("status") != "success":
            reason = body.get("error") or response.text[:300]
            return QueryError(f"HTTP {response.status_code} {body.get('errorType', '')}: {reason}")
        return body["data"]

    def evaluate(self, expr: str, instant: bool, phase: Phase) -> list[tuple[dict[str, str], list[float]]]:
        """Each series' labels and values: a range query over ``phase`` (Grafana's step), or instant at its end."""
        if instant:
            data = self.api("query", query=expr, time=f"{phase.end:.3f}")
        else:
            data = self.api(
                "query_range", query=expr, start=f"{phase.start:.3f}", end=f"{phase.end:.3f}", step=f"{STEP_S}s"
            )
        kind, result = data["resultType"], data["result"]
        if kind == "matrix":
            return [(series["metric"], [float(value) for _, value in series["values"]]) for series in result]
        if kind == "vector":
            return [(sample["metric"], [float(sample["value"][1])]) for sample in result]
        if kind == "scalar":
            return [({}, [float(result[1])])]
        raise QueryError(f"result of type {kind}, not a number")

    def series(self, selector: str, phase: Phase) -> list[dict[str, str]]:
        return self.api("series", **{"match[]": selector, "start": f"{phase.start:.3f}", "end": f"{phase.end:.3f}"})

    def label_values(self, label: str, phase: Phase) -> list[str]:
        return self.api(f"label/{label}/values", start=f"{phase.start:.3f}", end=f"{phase.end:.3f}")

    def exemplars(self, expr: str, phase: Phase) -> list[dict]:
        return self.api("query_exemplars", query=expr, start=f"{phase.start:.3f}", end=f"{phase.end:.3f}")


@dataclass
class Run:
    """The demo after its phases: where its Prometheus is, and when each phase was."""

    prometheus: Prometheus
    clean: Phase
    fault: Phase

    @property
    def whole(self) -> Phase:
        return Phase("whole run", self.clean.start, self.fault.end)


def _safe(call):
    try:
        return call()
    except (requests.RequestException, ValueError, KeyError):
        return None


def _put_faults(app: str, **switches: Any) -> None:
    response = requests.put(
        f"{app}/admin/faults", json=switches, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )
    assert response.status_code == 200, response.text


def _scraping(prometheus: Prometheus) -> bool:
    """Prometheus has scraped the web, the worker and beat at least twice (a rate has two samples)."""
    try:
        result = prometheus.api("query", cache=False, query='count_over_time(up{job=~"shop-.*"}[1m]) >= 2')
    except QueryError:
        return False
    return {sample["metric"].get("job") for sample in result["result"]} >= {"shop-web", "shop-worker", "shop-beat"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Run]:
    """The native demo under load (about 9 requests a second), through a clean phase, then a fault phase.

    Fast payment provider, short retry backoff, a 2 s task time limit. Faults: 20% of API requests
    answered 500, the payment provider down (retries, then failed charges), the reports queue
    paused (a backlog with an age); for the last SLOW_S seconds also every task sleeping past the
    time limit (time_limit endings).
    """
    var = tmp_path_factory.mktemp("dashboard-demo")
    ports = {name: free_port() for name in PORT_VARIABLES}
    shop_redis = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    import redis

    redis.Redis.from_url(shop_redis).flushdb()
    env = clean_environment(
        DEMO_VAR_DIR=str(var),
        DEMO_SECONDS="600",
        DEMO_RATE="9",
        DEMO_REDIS_URL=shop_redis,
        DEMO_ADMIN_TOKEN=ADMIN_TOKEN,
        DEMO_PAYMENT_LATENCY_MS="10",
        DEMO_RETRY_BACKOFF="0.2",
        DEMO_PAYMENT_MAX_RETRIES="2",
        DEMO_MAINTENANCE_INTERVAL="5",
        DEMO_TASK_TIME_LIMIT=str(TASK_TIME_LIMIT_S),
        **{name: str(port) for name, port in ports.items()},
    )
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "demo_app.native"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    app = f"http://127.0.0.1:{ports['DEMO_APP_PORT']}"
    prometheus = Prometheus(f"http://127.0.0.1:{ports['DEMO_PROMETHEUS_PORT']}")
    worker_metrics = f"http://127.0.0.1:{ports['DEMO_WORKER_METRICS_PORT']}/metrics"
    try:
        ready = wait_for(
            lambda: process.poll() is not None or _safe(lambda: requests.get(worker_metrics, timeout=2).ok),
            timeout=90,
            interval=0.5,
        )
        assert ready and process.poll() is None, process.stdout.read().decode() if process.poll() is not None else ""
        assert wait_for(lambda: _scraping(prometheus), timeout=60, interval=1), "Prometheus does not scrape the shop"
        clean_start = time.time()
        time.sleep(CLEAN_S)
        clean = Phase("clean phase", clean_start, time.time())
        _put_faults(app, error_rate=0.2, payment_outage=True, paused_queues=["reports"])
        time.sleep(FAULT_S)
        _put_faults(app, slow_worker_ms=SLOW_WORKER_MS)
        time.sleep(SLOW_S)
        fault = Phase("fault phase", clean.end, time.time())
        response = requests.delete(
            f"{app}/admin/faults", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
        )
        assert response.status_code == 200, response.text
        assert process.poll() is None, "the demo stopped during the phases"
        yield Run(prometheus, clean, fault)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=90)
    text = output.decode(errors="replace")
    assert "Where to look" in text and "demo stopped" in text, text[-3000:]


# --------------------------------------------------------------------------------------------
# The dashboards, their variables and their Prometheus queries


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    panels: tuple[PanelView, ...] = field(repr=False)
    variables: tuple[VariableView, ...] = field(repr=False)


@dataclass(frozen=True)
class Target:
    """One Prometheus query of one panel."""

    dashboard: Dashboard
    panel: PanelView
    query: PanelQuery


@dataclass(frozen=True)
class Failure:
    dashboard: str
    panel: str
    ref_id: str
    expr: str
    reason: str

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel!r} / {self.ref_id}: {self.reason}\n      {self.expr}"


def _report(failures: Sequence[Failure], what: str) -> str:
    lines = "\n".join(f"  - {failure}" for failure in failures)
    return f"{len(failures)} {what}:\n{lines}"


@pytest.fixture(scope="module")
def dashboards() -> dict[str, Dashboard]:
    """Every dashboard in dashboards/json, by uid, as dashboards.inspect reads it."""
    found = {}
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        model = json.loads(path.read_text())
        uid = model.get("uid") or path.stem
        found[uid] = Dashboard(uid, model.get("title", ""), tuple(panels(model)), tuple(variables(model)))
    return found


def _is_prometheus(query: PanelQuery) -> bool:
    if not query.expr.strip():
        return False
    return query.datasource_type == "prometheus" or (
        not query.datasource_type and query.datasource_uid in PROMETHEUS_UIDS
    )


def _targets(dashboards: Mapping[str, Dashboard]) -> list[Target]:
    return [
        Target(dashboard, panel, query)
        for dashboard in dashboards.values()
        for panel in dashboard.panels
        for query in panel.queries
        if _is_prometheus(query)
    ]


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$", re.S)
Assignment = dict[str, "str | list[str]"]


@dataclass
class Resolution:
    """The variable values a user can pick on a dashboard: one assignment per choice of the single-valued ones.

    Variables with "All" get their All value (``allValue``, or every value), multi-valued ones
    every value; a single-valued one branches into one assignment per value.
    """

    assignments: list[Assignment]
    problems: list[Failure]


def _variable_values(
    var: VariableView, assignment: Assignment, phase: Phase, prometheus: Prometheus
) -> tuple[str, list[str]]:
    """The expanded variable query and the values it lists (raises QueryError, KeyError, ValueError)."""
    if var.type == "query":
        shown = expand(var.query, {**phase.builtins(), **assignment})
        match = _LABEL_VALUES.match(shown)
        if match is None:
            raise ValueError("not a label_values(...) query, which this test cannot evaluate")
        label, selector = match["label"], match["selector"]
        if selector:
            values = {series[label] for series in prometheus.series(selector, phase) if series.get(label)}
        else:
            values = set(prometheus.label_values(label, phase))
        return shown, sorted(values)
    if var.type in ("custom", "interval"):
        options = [option.strip() for option in var.query.split(",") if option.strip()]
        return var.query, [option.split(" : ", 1)[-1] for option in options]
    if var.type in ("constant", "textbox"):
        return var.query, [var.query]
    raise ValueError(f"variable of type {var.type!r}, which this test cannot evaluate")


def _resolve(dashboard: Dashboard, phase: Phase, prometheus: Prometheus) -> Resolution:
    assignments: list[Assignment] = [{}]
    problems: list[Failure] = []
    for var in dashboard.variables:
        if var.type == "datasource":
            assignments = [{**assignment, var.name: "prometheus"} for assignment in assignments]
            continue
        if var.type == "adhoc":
            continue
        chosen: list[Assignment] = []
        for assignment in assignments:
            shown = var.query
            try:
                shown, values = _variable_values(var, assignment, phase, prometheus)
            except (QueryError, KeyError, ValueError) as exc:
                values, reason = [], str(exc)
            else:
                reason = "lists no value"
            if not values:
                problems.append(Failure(dashboard.uid, f"${var.name}", "variable", shown, reason))
            if var.include_all:
                chosen.append({**assignment, var.name: var.all_value or values or ""})
            elif var.multi:
                chosen.append({**assignment, var.name: values or ""})
            else:
                chosen.extend({**assignment, var.name: value} for value in values or [""])
        if len(chosen) > MAX_ASSIGNMENTS:
            problems.append(
                Failure(dashboard.uid, f"${var.name}", "variable", var.query, f"over {MAX_ASSIGNMENTS} combinations")
            )
        assignments = chosen[:MAX_ASSIGNMENTS]
    return Resolution(assignments, problems)


def _expansions(target: Target, resolution: Resolution, phase: Phase) -> tuple[set[str], list[Failure]]:
    """The distinct expressions Grafana sends for ``target`` over the variables' choices."""
    exprs: set[str] = set()
    failures: list[Failure] = []
    for assignment in resolution.assignments:
        try:
            exprs.add(expand(target.query.expr, {**phase.builtins(), **assignment}))
        except KeyError as exc:
            failures.append(_failure(target, target.query.expr, f"cannot be expanded: {exc.args[0]}"))
            break
    return exprs, failures


def _failure(target: Target, expr: str, reason: str) -> Failure:
    return Failure(target.dashboard.uid, target.panel.title, target.query.ref_id, expr, reason)


def _has_number(series: list[tuple[dict[str, str], list[float]]]) -> bool:
    return any(not math.isnan(value) for _labels, values in series for value in values)


def _check_returns_data(run: Run, targets: Sequence[Target], phase: Phase) -> list[Failure]:
    """Every target's expansions are accepted and return a series with a number in ``phase``."""
    resolutions: dict[str, Resolution] = {}
    failures: list[Failure] = []
    for target in targets:
        uid = target.dashboard.uid
        if uid not in resolutions:
            resolutions[uid] = _resolve(target.dashboard, phase, run.prometheus)
        exprs, expansion_failures = _expansions(target, resolutions[uid], phase)
        failures.extend(expansion_failures)
        for expr in sorted(exprs):
            try:
                series = run.prometheus.evaluate(expr, target.query.instant, phase)
            except QueryError as exc:
                failures.append(_failure(target, expr, f"rejected by Prometheus: {exc}"))
                continue
            if not series:
                failures.append(_failure(target, expr, f"no series in the {phase.name}"))
            elif not _has_number(series):
                failures.append(_failure(target, expr, f"only NaN in the {phase.name}"))
    return failures


def _needs_fault(target: Target) -> bool:
    return (target.dashboard.uid, target.panel.title) in NEEDS_FAULT


# --------------------------------------------------------------------------------------------
# Tests that read the dashboards only


def test_every_dashboard_is_generated_and_queries_prometheus(dashboards: dict[str, Dashboard]) -> None:
    """The four dashboards Grafana provisions exist, and each has Prometheus queries to check."""
    assert set(DASHBOARD_UIDS) <= set(dashboards), f"dashboards in {DASHBOARD_DIR}: {sorted(dashboards)}"
    targets = _targets(dashboards)
    for uid in DASHBOARD_UIDS:
        assert any(target.dashboard.uid == uid for target in targets), f"{uid} has no Prometheus query"


def test_every_needs_fault_entry_names_an_existing_panel(dashboards: dict[str, Dashboard]) -> None:
    """A panel renamed or removed cannot leave a stale exemption behind in NEEDS_FAULT."""
    existing = {(target.dashboard.uid, target.panel.title) for target in _targets(dashboards)}
    stale = sorted(key for key in NEEDS_FAULT if key not in existing)
    assert not stale, f"NEEDS_FAULT names panels with no Prometheus query: {stale}"


# --------------------------------------------------------------------------------------------
# Tests against the running demo


def test_every_query_variable_lists_values(run: Run, dashboards: dict[str, Dashboard]) -> None:
    """Each variable's drop-down offers values, whatever the variables it depends on are set to."""
    problems = [
        problem
        for dashboard in dashboards.values()
        for problem in _resolve(dashboard, run.clean, run.prometheus).problems
    ]
    assert not problems, _report(problems, "variables without values in the clean phase")


def test_every_panel_query_returns_data_in_the_clean_phase(run: Run, dashboards: dict[str, Dashboard]) -> None:
    """A healthy service fills every panel (variables on All): no query errors, no empty panel.

    Panels in NEEDS_FAULT have nothing to show until something breaks; they are checked in the
    fault phase instead.
    """
    targets = [target for target in _targets(dashboards) if not _needs_fault(target)]
    failures = _check_returns_data(run, targets, run.clean)
    assert not failures, _report(failures, "panel queries without data in the clean phase")


def test_panels_that_need_a_fault_show_it_in_the_fault_phase(run: Run, dashboards: dict[str, Dashboard]) -> None:
    """The panels that stay empty while all is well (top exceptions, oldest waiting message) fill when faults hit."""
    targets = [target for target in _targets(dashboards) if _needs_fault(target)]
    failures = _check_returns_data(run, targets, run.fault)
    assert not failures, _report(failures, "panel queries without data in the fault phase")


def test_tasks_past_the_time_limit_end_as_time_limit(run: Run) -> None:
    """With slow_worker_ms above DEMO_TASK_TIME_LIMIT, the worker kills tasks and counts them as time_limit."""
    series = run.prometheus.series('celery_task_completed_total{job="shop-worker", outcome="time_limit"}', run.fault)
    assert series, 'no celery_task_completed_total{outcome="time_limit"} in the fault phase'


def _groups_by(expr: str, label: str) -> bool:
    return any(label in re.split(r"\s*,\s*", group.strip()) for group in re.findall(r"\bby\s*\(([^)]*)\)", expr))


def _nonzero_series(run: Run, target: Target, phase: Phase) -> list[dict[str, str]]:
    """The labels of the target's series that are above zero at some point of ``phase``."""
    resolution = _resolve(target.dashboard, phase, run.prometheus)
    exprs, failures = _expansions(target, resolution, phase)
    assert not failures, _report(failures, "queries that cannot be expanded")
    return [
        labels
        for expr in sorted(exprs)
        for labels, values in run.prometheus.evaluate(expr, target.query.instant, phase)
        if any(value > 0 for value in values)
    ]


def test_the_task_outcomes_panel_shows_failures_retries_and_time_limits(
    run: Run, dashboards: dict[str, Dashboard]
) -> None:
    """Under a payment outage and tasks past their time limit, the Celery outcomes panel shows each ending."""
    outcome_targets = [
        target
        for target in _targets(dashboards)
        if target.dashboard.uid == "spyglass-celery" and _groups_by(target.query.expr, "outcome")
    ]
    assert outcome_targets, "no panel of spyglass-celery groups by outcome"
    for target in outcome_targets:
        shown = {labels.get("outcome", "") for labels in _nonzero_series(run, target, run.fault)}
        missing = {"failure", "retry", "time_limit"} - shown
        assert not missing, f"{target.panel.title!r} ({target.query.expr}) shows {sorted(shown)}, not {sorted(missing)}"


def test_the_service_error_panel_shows_the_injected_5xx(run: Run, dashboards: dict[str, Dashboard]) -> None:
    """With 20% of requests answered 500, the Service dashboard's error panel is above zero."""
    error_panels: dict[str, list[Target]] = {}
    for target in _targets(dashboards):
        if target.dashboard.uid == "spyglass-service" and re.search(r"5xx|error", target.panel.title, re.I):
            error_panels.setdefault(target.panel.title, []).append(target)
    assert error_panels, "no panel of spyglass-service has 5xx or error in its title"
    quiet = [
        title
        for title, targets in error_panels.items()
        if not any(_nonzero_series(run, target, run.fault) for target in targets)
    ]
    assert not quiet, f"error panels showing nothing above zero under 20% injected 500s: {quiet}"


def test_exemplar_queries_return_exemplars_with_trace_ids(run: Run, dashboards: dict[str, Dashboard]) -> None:
    """Each graph drawn with exemplars has dots that open a trace: exemplars carrying a trace_id."""
    targets = [target for target in _targets(dashboards) if target.query.exemplar]
    resolutions: dict[str, Resolution] = {}
    failures: list[Failure] = []
    for target in targets:
        uid = target.dashboard.uid
        if uid not in resolutions:
            resolutions[uid] = _resolve(target.dashboard, run.whole, run.prometheus)
        exprs, expansion_failures = _expansions(target, resolutions[uid], run.whole)
        failures.extend(expansion_failures)
        for expr in sorted(exprs):
            try:
                found = run.prometheus.exemplars(expr, run.whole)
            except QueryError as exc:
                failures.append(_failure(target, expr, f"exemplar query rejected: {exc}"))
                continue
            trace_ids = [
                exemplar["labels"].get("trace_id", "") for group in found for exemplar in group.get("exemplars", ())
            ]
            if not any(re.fullmatch(r"[0-9a-f]{32}", trace_id) for trace_id in trace_ids):
                failures.append(_failure(target, expr, f"{len(trace_ids)} exemplars, none with a trace_id"))
    assert not failures, _report(failures, "exemplar queries without trace ids")
