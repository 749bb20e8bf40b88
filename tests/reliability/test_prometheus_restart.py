"""Prometheus restarted mid-run loses only the samples of the time it was down, and counters carry on.

The real demo shop runs under load (:class:`demo_app.native.NativeDemo`: gunicorn, a prefork
worker, beat, Prometheus with its TSDB on disk under the demo's var directory). Prometheus is
stopped and started again twice while the load goes on: once as an operator would (SIGTERM, the
``stop_process``/``start_process`` of the demo), once as a crash would (SIGKILL). Afterwards the
run is read back from Prometheus:

- the raw samples of the request and task counters: none is missing outside the restart window
  (the time Prometheus was down, the scrape interval before it, and after it Prometheus's 5 s
  target update and a scrape interval), and the value after each restart continues from where it
  was, not from zero (``resets()`` over the run is 0);
- ``rate()`` over the run, with a small step: a value at every step except within the restart
  windows;
- ``increase()`` over the whole run matches what the web's own endpoint counted.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from demo_app import load
from demo_app.native import PORT_VARIABLES, DemoOptions, NativeDemo, Ports
from tests.conftest import REPO, clean_environment, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(15 * 60)]

REDIS_DB = 15
LOAD_RATE = 6.0  # requests per second
PHASE_S = 40.0  # load between two restarts: four scrapes
DOWN_S = 15.0  # how long Prometheus stays down
SCRAPE_INTERVAL_S = float(
    yaml.safe_load((REPO / "collector/prometheus/prometheus.yml").read_text())["global"]["scrape_interval"].rstrip("s")
)
RATE_RANGE_S = 30
STEP_S = 5
SLACK_S = 2.0  # scrape timing jitter
TARGET_UPDATE_S = 5.0
"""A Prometheus that has started hands its scrape loops their targets at its next 5 s target update."""
COUNTERS = {
    "requests": 'http_server_request_duration_seconds_count{job="shop-web"}',
    "tasks": 'celery_task_completed_total{job="shop-worker"}',
}


@dataclass(frozen=True)
class Restart:
    """One restart of Prometheus: how, when it went down, and when it was ready again."""

    how: str
    stopped_at: float
    ready_at: float

    def covers(self, start: float, end: float) -> bool:
        """Whether the gap between samples at ``start`` and ``end`` spans this restart."""
        return start <= self.ready_at and end >= self.stopped_at


@dataclass
class Run:
    """The run's time line, the web's own count of requests, and what Prometheus returned afterwards."""

    started_at: float
    ended_at: float = 0.0
    restarts: list[Restart] = field(default_factory=list)
    web_requests: tuple[float, float] = (0.0, 0.0)  # the web's counter at the start and at the end
    samples: dict[str, dict[tuple[tuple[str, str], ...], list[tuple[float, float]]]] = field(default_factory=dict)
    resets: dict[str, float] = field(default_factory=dict)
    rates: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    increase: float = 0.0


class Prometheus:
    """The demo's Prometheus, over its HTTP API."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def query(self, expr: str, at: float) -> list[dict]:
        response = requests.get(f"{self.url}/api/v1/query", params={"query": expr, "time": at}, timeout=30)
        response.raise_for_status()
        return response.json()["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        params = {"query": expr, "start": start, "end": end, "step": step}
        response = requests.get(f"{self.url}/api/v1/query_range", params=params, timeout=30)
        response.raise_for_status()
        return response.json()["data"]["result"]


def _web_requests(demo: NativeDemo) -> float:
    """The requests the web has counted so far, read from its own endpoint."""
    text = requests.get(f"http://127.0.0.1:{demo.options.ports.web_metrics}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "http_server_request_duration_seconds_count"
    )


def _restart(demo: NativeDemo, prometheus: Prometheus, how: str, stop: Callable[[], None]) -> Restart:
    stopped_at = time.time()
    stop()
    time.sleep(DOWN_S)
    demo.start_process("prometheus")
    assert wait_for(prometheus.ready, timeout=60, interval=0.2), "Prometheus did not get ready again"
    return Restart(how, stopped_at, time.time())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Run:
    """Load, a graceful restart of Prometheus, load, a killed one, load; then the run read back."""
    shop_redis = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis.Redis.from_url(shop_redis).flushdb()
    environ = clean_environment(DEMO_PAYMENT_LATENCY_MS="20", OTEL_BSP_SCHEDULE_DELAY="500")
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        environ.pop(name, None)
    ports = Ports.from_environment({name: str(free_port()) for name in PORT_VARIABLES})
    var_root: Path = tmp_path_factory.mktemp("prometheus-restart")
    options = DemoOptions(ports=ports, var_root=var_root, redis_url=shop_redis, admin_token="restart-token")
    prometheus = Prometheus(ports.prometheus)
    stop_load = threading.Event()
    with NativeDemo(options, environ) as demo:
        driver = threading.Thread(target=load.run, args=(demo.app_url, LOAD_RATE, float("inf"), stop_load, True))
        driver.start()
        try:
            # Start counting once Prometheus has scraped the web at least once.
            assert wait_for(lambda: prometheus.query(COUNTERS["requests"], time.time()), timeout=60, interval=1)
            recorded = Run(started_at=time.time())
            web_before = _web_requests(demo)
            time.sleep(PHASE_S)
            recorded.restarts.append(
                _restart(demo, prometheus, "stopped (SIGTERM)", lambda: demo.stop_process("prometheus"))
            )
            time.sleep(PHASE_S)
            recorded.restarts.append(
                _restart(demo, prometheus, "killed (SIGKILL)", lambda: demo.kill_process("prometheus", signal.SIGKILL))
            )
            time.sleep(PHASE_S)
            recorded.ended_at = time.time()
            recorded.web_requests = (web_before, _web_requests(demo))
        finally:
            stop_load.set()
            driver.join(timeout=30)
        _read_back(prometheus, recorded)
    return recorded


def _read_back(prometheus: Prometheus, recorded: Run) -> None:
    end = recorded.ended_at
    window = f"{round(end - recorded.started_at)}s"
    for name, selector in COUNTERS.items():
        recorded.samples[name] = {
            tuple(sorted(series["metric"].items())): [(float(at), float(value)) for at, value in series["values"]]
            for series in prometheus.query(f"{selector}[{window}]", end)
        }
        recorded.resets[name] = sum(
            float(series["value"][1]) for series in prometheus.query(f"resets({selector}[{window}])", end)
        )
        series = prometheus.query_range(
            f"sum(rate({selector}[{RATE_RANGE_S}s]))", recorded.started_at + RATE_RANGE_S, end, STEP_S
        )
        recorded.rates[name] = [(float(at), float(value)) for at, value in series[0]["values"]] if series else []
    result = prometheus.query(f"sum(increase({COUNTERS['requests']}[{window}]))", end)
    recorded.increase = float(result[0]["value"][1]) if result else 0.0


def _restart_window(restart: Restart) -> float:
    return restart.ready_at - restart.stopped_at


def _first_scrape_within(_restart: Restart) -> float:
    """The most time that may pass around a restart besides the down time: since the last scrape before
    the stop (an interval), and until the first one after Prometheus is ready (its target update, then
    up to an interval), plus jitter.
    """
    return SCRAPE_INTERVAL_S + TARGET_UPDATE_S + SCRAPE_INTERVAL_S + SLACK_S


def test_samples_are_missing_only_while_prometheus_was_down(run: Run) -> None:
    """Between consecutive samples of each request and task counter series there is one scrape interval,
    except across a restart, where the gap is at most the time Prometheus was down, plus the interval
    since the last scrape before it and the target update and interval until the first one after.
    """
    problems = []
    checked = 0
    for name, by_series in run.samples.items():
        assert by_series, f"Prometheus returned no {name} samples"
        for labels, samples in by_series.items():
            if samples[0][0] > run.restarts[0].stopped_at:
                continue  # a series that appeared later in the run (a route first hit then)
            checked += 1
            for (start, _), (end, _) in itertools.pairwise(samples):
                gap = end - start
                spanned = [restart for restart in run.restarts if restart.covers(start, end)]
                if spanned:
                    allowed = sum(_restart_window(restart) + _first_scrape_within(restart) for restart in spanned)
                else:
                    allowed = SCRAPE_INTERVAL_S + SLACK_S
                if gap > allowed:
                    problems.append(f"{name} {dict(labels)}: {gap:.1f}s without a sample after {start:.0f}")
    for restart in run.restarts:
        gaps = [
            (end - start, restart.stopped_at - start)
            for by_series in run.samples.values()
            for samples in by_series.values()
            for (start, _), (end, _) in itertools.pairwise(samples)
            if restart.covers(start, end)
        ]
        print(
            f"Prometheus {restart.how}: down {_restart_window(restart):.1f}s; longest gap between samples "
            f"{max(gap for gap, _ in gaps):.1f}s; last sample before it {max(lead for _, lead in gaps):.1f}s "
            "before the stop at most"
        )
    assert checked >= 2
    assert problems == []


def test_counters_carry_on_from_their_value_before_each_restart(run: Run) -> None:
    """The first sample after a restart is not below the last one before it (no drop to zero), and
    Prometheus finds no counter reset over the run.
    """
    for name, by_series in run.samples.items():
        for labels, samples in by_series.items():
            for restart in run.restarts:
                before = [value for at, value in samples if at < restart.stopped_at]
                after = [value for at, value in samples if at > restart.ready_at]
                if before and after:
                    assert after[0] >= before[-1], (name, dict(labels), restart, before[-1], after[0])
        assert run.resets[name] == 0, (name, run.resets[name])
    grown = [
        samples[-1][1] - samples[0][1]
        for samples in run.samples["requests"].values()
        if samples[0][0] < run.restarts[0].stopped_at
    ]
    assert sum(grown) > LOAD_RATE * PHASE_S, "the request counters did not grow across the run"


def test_rate_has_a_value_at_every_step_outside_the_restart_windows(run: Run) -> None:
    """rate() over the run with a 5 s step: every step outside the restart windows (down time, then
    until the first scrape after it plus the rate's range) has a value, and the request rate stays
    near the load's.
    """
    for name, points in run.rates.items():
        assert points, f"no rate of {name}"
        present = {round(at) for at, _ in points}
        missing = []
        step = points[0][0]
        while step <= run.ended_at - SCRAPE_INTERVAL_S:
            in_window = any(
                restart.stopped_at <= step <= restart.ready_at + TARGET_UPDATE_S + SCRAPE_INTERVAL_S + RATE_RANGE_S
                for restart in run.restarts
            )
            if not in_window and round(step) not in present:
                missing.append(round(step - run.started_at))
            step += STEP_S
        assert missing == [], f"{name}: no rate at {missing} s into the run"
    requests_rate = [value for _, value in run.rates["requests"]]
    assert min(requests_rate) > 0.3 * LOAD_RATE, requests_rate


def test_increase_over_the_run_matches_what_the_web_counted(run: Run) -> None:
    """increase() of the request counter over the whole run, restarts included, is what the web's own
    endpoint counted over the same time, within the extrapolation at the ends of the window.
    """
    counted = run.web_requests[1] - run.web_requests[0]
    print(f"the web counted {counted:.0f} requests; Prometheus's increase() over the run says {run.increase:.0f}")
    assert counted > LOAD_RATE * PHASE_S
    assert 0.85 * counted <= run.increase <= 1.15 * counted
