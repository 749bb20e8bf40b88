"""Each fault of the demo drives its alert to Alertmanager's webhook, and clearing the fault resolves it.

One scripted run of the real demo (:class:`demo_app.native.NativeDemo`: gunicorn, a prefork Celery
worker, beat, Prometheus, Alertmanager and the alert sink) under load, with the real rules and
configurations run through the ``fast`` alert profile (:data:`collector.alert_profile.FAST`, on
copies: a tenth of every ``for:`` but at least 15 s, evaluation every 5 s, a tenth of Alertmanager's
delays). Range windows are the rules' own, so an alert on a 10-minute rate takes about as long to
fire and to resolve as it would in production; the whole run takes about 20 minutes.

The timeline:

1. clean: three minutes of load from a cold start, during which no alert may fire;
2. the worker is stopped, and the API answers half its requests with an injected 500;
3. once the worker is back: tasks sleep past their 2-second time limit, and the ``reports``
   queue is paused (its consumer cancelled);
4. once the slow tasks are cleared: the payment provider fails every charge.

Each fault is cleared as soon as every alert it must raise has reached the webhook (or its deadline
has passed); then the run waits for the alerts to resolve. The tests read what the webhook received.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import requests

from collector.alert_profile import FAST
from demo_app import load
from demo_app.native import PORT_VARIABLES, DemoOptions, NativeDemo, Ports
from tests.conftest import clean_environment, free_port

# The module's first test runs the whole scripted timeline (about 20 minutes) in its fixture.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(45 * 60)]

ADMIN_TOKEN = "alerts-end-to-end-token"
REDIS_DB = 10  # test_dashboard_queries uses 12, test_demo_shop 13, the Celery tests 11
LOAD_RATE = 8.0  # requests per second
CLEAN_S = 180.0  # longer than twice the longest fast `for:` (90 s)
TASK_TIME_LIMIT_S = 2
SLOW_WORKER_MS = 3_000  # above the time limit: every task is killed at it
POLL_S = 2.0
WORKER_SETTLE_S = 30.0  # after a restart, a few scrapes of the worker before the next faults

# Alerts that may accompany the faults without being theirs. The SLO burn-rate alerts follow from
# them (injected 500s spend the availability budget; a stopped worker, a paused queue or slow tasks
# make tasks wait past 10 s) and, by design, stay firing for up to their long window's length (the
# slow-burn page holds for 30 minutes after a short spike): their resolution is shown by promtool
# tests (collector/prometheus/tests/slo_test.yml), not here.
SLO_ALERTS = frozenset({"APIAvailabilityBudgetBurn", "TaskQueueWaitBudgetBurn"})
ACCOMPANYING = frozenset(
    {
        "CeleryQueueOldestMessageTooOld",  # the paused queue's oldest message passes 5 minutes
        "CeleryQueueBacklogGrowing",  # slow tasks or the paused queue leave messages waiting
        "CeleryTaskFailureRatioHigh",  # slow tasks kill every task type, not only reserve_stock
    }
)


# --------------------------------------------------------------------------------------------
# What the webhook received


@dataclass(frozen=True)
class Notified:
    """One alert in one notification the alert sink received."""

    received_at: float
    receiver: str
    status: str  # firing | resolved
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class Expected:
    """An alert a fault must raise: its identifying labels, receiver and time bounds (with their reasons)."""

    labels: Mapping[str, str]
    receiver: str
    fires_within_s: float
    resolves_within_s: float

    @property
    def alertname(self) -> str:
        return self.labels["alertname"]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(name) == value for name, value in self.labels.items())

    def __str__(self) -> str:
        return "{" + ", ".join(f"{name}={value}" for name, value in self.labels.items()) + "}"


@dataclass
class Fault:
    """A fault switched on, then off once its alerts have fired (or their time is up)."""

    name: str
    switch_on: Callable[[], None]
    switch_off: Callable[[], None]
    expected: tuple[Expected, ...]
    after: tuple[str, ...] = ()  # faults that must have been cleared first
    settle_s: float = 0.0  # ... and how long before this one starts
    started_at: float | None = None
    cleared_at: float | None = None

    @property
    def fire_deadline(self) -> float:
        assert self.started_at is not None
        return self.started_at + max(expected.fires_within_s for expected in self.expected)


@dataclass
class Run:
    """What the scripted run did and when (wall clock, as the alert sink stamps notifications)."""

    clean_start: float
    clean_end: float
    faults: dict[str, Fault]
    notified: list[Notified] = field(default_factory=list)
    firing_during_clean: list[dict[str, Any]] = field(default_factory=list)
    served_during_clean: float = 0.0
    tasks_during_clean: float = 0.0

    def timeline(self) -> str:
        """What happened when, in seconds from the start: faults, and each alert's notifications."""
        lines = [f"clean load from 0 to {self.clean_end - self.clean_start:.0f}s"]
        for fault in self.faults.values():
            started, cleared = (
                f"{when - self.clean_start:.0f}s" if when is not None else "never"
                for when in (fault.started_at, fault.cleared_at)
            )
            lines.append(f"{fault.name}: on at {started}, off at {cleared}")
        for entry in sorted(self.notified, key=lambda entry: entry.received_at):
            labels = ", ".join(f"{name}={value}" for name, value in sorted(entry.labels.items()))
            lines.append(f"  {entry.received_at - self.clean_start:6.0f}s {entry.receiver:6} {entry.status:8} {labels}")
        return "\n".join(lines)

    def first(self, expected: Expected, status: str, after: float) -> Notified | None:
        """The first notification of ``expected`` with ``status`` received after ``after``."""
        for entry in self.notified:
            if entry.status == status and entry.received_at >= after and expected.matches(entry.labels):
                return entry
        return None


class AlertSink:
    """The demo's alert sink, read over HTTP."""

    def __init__(self, url: str) -> None:
        self.url = url

    def notified(self) -> list[Notified]:
        response = requests.get(f"{self.url}/notifications", timeout=10)
        response.raise_for_status()
        return [
            Notified(
                entry["received_at"],
                entry["receiver"],
                alert["status"],
                alert.get("labels") or {},
                alert.get("annotations") or {},
            )
            for entry in response.json()
            for alert in entry["payload"].get("alerts") or []
        ]


def _prometheus_query(url: str, expr: str, at: float) -> list[dict[str, Any]]:
    response = requests.get(f"{url}/api/v1/query", params={"query": expr, "time": at}, timeout=30)
    response.raise_for_status()
    return response.json()["data"]["result"]


# --------------------------------------------------------------------------------------------
# The scripted run


class Switches:
    """The demo's fault switches (``/admin/faults``)."""

    def __init__(self, app_url: str) -> None:
        self.url = f"{app_url}/admin/faults"

    def set(self, **switches: Any) -> None:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        response = requests.put(self.url, json=switches, headers=headers, timeout=10)
        assert response.status_code == 200, response.text


def _worker_alert(alertname: str, **labels: str) -> dict[str, str]:
    return {"alertname": alertname, "job": "shop-worker", **labels}


def _fired_since(expected: Expected, notified: list[Notified], since: float) -> bool:
    return any(
        entry.status == "firing" and entry.received_at >= since and expected.matches(entry.labels) for entry in notified
    )


def _faults(demo: NativeDemo) -> dict[str, Fault]:
    switches = Switches(demo.app_url)
    faults = [
        Fault(
            "stopped worker",
            lambda: demo.stop_process("worker"),
            lambda: demo.start_process("worker"),
            (
                # The next scrape fails (10 s), `for:` 18 s, evaluation and a page's 1 s group wait.
                Expected({"alertname": "TargetDown", "job": "shop-worker", "severity": "critical"}, "page", 120, 120),
                # The series goes stale at the failed scrape; `for:` 30 s.
                Expected({"alertname": "CeleryWorkerMetricsAbsent", "severity": "critical"}, "page", 150, 120),
            ),
        ),
        Fault(
            "error rate",
            lambda: switches.set(error_rate=0.5),
            lambda: switches.set(error_rate=0.0),
            (
                # The 5-minute 5xx ratio passes 5 % within seconds at 50 % errors; `for:` 30 s.
                # Resolves once the errors have left the 5-minute window (up to 300 s) plus a group interval.
                Expected({"alertname": "HTTPHighErrorRatio", "job": "shop-web"}, "ticket", 180, 450),
            ),
        ),
        Fault(
            "slow tasks",
            lambda: switches.set(slow_worker_ms=SLOW_WORKER_MS),
            lambda: switches.set(slow_worker_ms=0),
            (
                # Killed reserve_stock runs pass 10 % of its endings in the 10-minute window within
                # a couple of minutes; `for:` 30 s. Resolves as the kills leave the window (10 minutes).
                Expected(
                    _worker_alert("CeleryTaskFailureRatioHigh", task_name="shop.reserve_stock"),
                    "ticket",
                    420,
                    720,
                ),
            ),
            after=("stopped worker",),
            settle_s=WORKER_SETTLE_S,
        ),
        Fault(
            "paused queue",
            lambda: switches.set(paused_queues=["reports"]),
            lambda: switches.set(paused_queues=[]),
            (
                # Nothing from the queue completes in the 5-minute window (300 s after the pause),
                # then `for:` 30 s. Resolves at the first completions after resuming.
                Expected(_worker_alert("CeleryQueueNoConsumers", queue="reports"), "page", 450, 150),
            ),
            after=("stopped worker",),
            settle_s=WORKER_SETTLE_S,
        ),
        Fault(
            "payment outage",
            lambda: switches.set(payment_outage=True),
            lambda: switches.set(payment_outage=False),
            (
                # Every order fails its charge after 4 retries: failures pass 10 % of the 10-minute
                # window's endings after about a minute, retries 50 % after two or three; `for:` 30 s
                # and 60 s. Both resolve as the outage leaves the 10-minute window.
                Expected(
                    _worker_alert("CeleryTaskFailureRatioHigh", task_name="shop.charge_payment"),
                    "ticket",
                    420,
                    720,
                ),
                Expected(
                    _worker_alert("CeleryTaskRetryStorm", task_name="shop.charge_payment"),
                    "ticket",
                    480,
                    720,
                ),
            ),
            after=("slow tasks",),
        ),
    ]
    return {fault.name: fault for fault in faults}


def _script(sink: AlertSink, faults: Mapping[str, Fault], clean_end: float) -> None:
    """Switch each fault on when its turn comes and off once its alerts have fired; wait for the resolutions."""
    while True:
        now = time.time()
        notified = sink.notified()
        for fault in faults.values():
            if fault.started_at is None:
                ready = all(faults[name].cleared_at is not None for name in fault.after)
                since = max([clean_end] + [faults[name].cleared_at or now for name in fault.after])
                if ready and now >= since + fault.settle_s:
                    fault.switch_on()
                    fault.started_at = time.time()
            elif fault.cleared_at is None:
                fired = all(_fired_since(expected, notified, fault.started_at) for expected in fault.expected)
                if fired or now > fault.fire_deadline:
                    fault.switch_off()
                    fault.cleared_at = time.time()
        if all(fault.cleared_at is not None for fault in faults.values()):
            break
        time.sleep(POLL_S)
    # The resolutions: every expected alert, and every symptom alert that fired along the way.
    deadline = max(
        fault.cleared_at + expected.resolves_within_s for fault in faults.values() for expected in fault.expected
    )
    while time.time() < deadline:
        if not _still_firing(sink.notified()):
            return
        time.sleep(POLL_S * 2)


def _still_firing(notified: list[Notified]) -> set[tuple[tuple[str, str], ...]]:
    """The alerts (by label set) whose last notification says firing, SLO alerts aside."""
    last: dict[tuple[tuple[str, str], ...], str] = {}
    for entry in sorted(notified, key=lambda entry: entry.received_at):
        last[tuple(sorted(entry.labels.items()))] = entry.status
    return {
        labels for labels, status in last.items() if status == "firing" and dict(labels)["alertname"] not in SLO_ALERTS
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Run]:
    """The scripted run, done once: clean load, then the faults one after another, then the resolutions."""
    shop_redis = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis.Redis.from_url(shop_redis).flushdb()
    environ = clean_environment(
        DEMO_TASK_TIME_LIMIT=str(TASK_TIME_LIMIT_S),
        DEMO_PAYMENT_LATENCY_MS="20",
        DEMO_RETRY_BACKOFF="0.5",
        DEMO_PAYMENT_MAX_RETRIES="4",
        # Beat sends every 10 s, well inside CeleryBeatNotSending's 10 minutes, and soon after start.
        DEMO_MAINTENANCE_INTERVAL="10",
    )
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        environ.pop(name, None)
    ports = Ports.from_environment({name: str(free_port()) for name in PORT_VARIABLES})
    options = DemoOptions(
        ports=ports,
        var_root=tmp_path_factory.mktemp("alerts-e2e"),
        redis_url=shop_redis,
        admin_token=ADMIN_TOKEN,
        alert_profile=FAST,
    )
    sink = AlertSink(f"http://127.0.0.1:{ports.alert_sink}")
    stop_load = threading.Event()
    with NativeDemo(options, environ) as demo:
        clean_start = time.time()
        driver = threading.Thread(
            target=load.run,
            args=(demo.app_url, LOAD_RATE, float("inf"), stop_load, True),
            daemon=True,
        )
        driver.start()
        try:
            time.sleep(CLEAN_S)
            clean_end = time.time()
            prometheus = f"http://127.0.0.1:{ports.prometheus}"
            window = f"{round(clean_end - clean_start)}s"
            recorded = Run(
                clean_start,
                clean_end,
                _faults(demo),
                firing_during_clean=_prometheus_query(
                    prometheus, f'max_over_time(ALERTS{{alertstate="firing"}}[{window}])', clean_end
                ),
                served_during_clean=_scalar(
                    prometheus,
                    f'sum(increase(http_server_request_duration_seconds_count{{job="shop-web"}}[{window}]))',
                    clean_end,
                ),
                tasks_during_clean=_scalar(
                    prometheus, f'sum(increase(celery_task_completed_total{{job="shop-worker"}}[{window}]))', clean_end
                ),
            )
            _script(sink, recorded.faults, clean_end)
            recorded.notified = sink.notified()
            print(recorded.timeline())
        finally:
            stop_load.set()
            driver.join(timeout=30)
    yield recorded


def _scalar(prometheus: str, expr: str, at: float) -> float:
    result = _prometheus_query(prometheus, expr, at)
    return float(result[0]["value"][1]) if result else 0.0


# --------------------------------------------------------------------------------------------
# The promises


def test_a_clean_load_run_fires_no_alert(run: Run) -> None:
    """Three minutes of load from a cold start: Prometheus fires no alert and the webhook hears nothing."""
    assert run.served_during_clean > LOAD_RATE * CLEAN_S * 0.5, "the load did not reach the shop"
    assert run.tasks_during_clean > 50, "the worker did not run tasks"
    assert run.firing_during_clean == [], [series["metric"] for series in run.firing_during_clean]
    heard = [entry for entry in run.notified if entry.received_at < run.clean_end]
    assert heard == [], heard


@pytest.mark.parametrize("fault_name", ["stopped worker", "error rate", "slow tasks", "paused queue", "payment outage"])
def test_a_fault_drives_its_alert_to_the_webhook_and_clearing_it_resolves_the_alert(run: Run, fault_name: str) -> None:
    """Each alert of the fault reaches its receiver in time, with its annotations, and resolves after the clear."""
    fault = run.faults[fault_name]
    assert fault.started_at is not None and fault.cleared_at is not None, f"{fault_name} never ran"
    problems = []
    for expected in fault.expected:
        fired = run.first(expected, "firing", fault.started_at)
        if fired is None:
            problems.append(f"{expected}: no firing notification after the fault started")
            continue
        took = fired.received_at - fault.started_at
        if took > expected.fires_within_s:
            problems.append(f"{expected}: fired {took:.0f}s after the fault, bound {expected.fires_within_s:.0f}s")
        if fired.receiver != expected.receiver:
            problems.append(f"{expected}: went to {fired.receiver}, not {expected.receiver}")
        missing = {"summary", "description", "runbook_url", "dashboard_url"} - set(fired.annotations)
        if missing:
            problems.append(f"{expected}: annotations missing {sorted(missing)}")
        if fired.labels.get("severity") != ("critical" if expected.receiver == "page" else "warning"):
            problems.append(f"{expected}: severity {fired.labels.get('severity')} to receiver {expected.receiver}")
        resolved = run.first(expected, "resolved", fault.cleared_at)
        if resolved is None:
            problems.append(f"{expected}: never resolved after the fault was cleared")
            continue
        took = resolved.received_at - fault.cleared_at
        if took > expected.resolves_within_s:
            bound = expected.resolves_within_s
            problems.append(f"{expected}: resolved {took:.0f}s after the clear, bound {bound:.0f}s")
    assert problems == [], "\n".join(problems)


def test_every_alert_that_fired_is_explained_by_a_fault_and_every_symptom_alert_resolved(run: Run) -> None:
    """Only the faults' alerts, SLO burns and the documented companions fire; every symptom alert resolves."""
    expected = [expected for fault in run.faults.values() for expected in fault.expected]
    fired = {
        tuple(sorted(entry.labels.items()))
        for entry in run.notified
        if entry.status == "firing" and not any(candidate.matches(entry.labels) for candidate in expected)
    }
    unexplained = [dict(labels) for labels in fired if dict(labels)["alertname"] not in SLO_ALERTS | ACCOMPANYING]
    assert unexplained == [], unexplained
    assert _still_firing(run.notified) == set()
