"""The demo shop end to end, exercised the way a user and an on-call engineer would.

`python -m demo_app.native` runs gunicorn, a prefork worker, beat, Prometheus, Alertmanager and load.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from demo_app.native import PORT_VARIABLES
from tests.conftest import REPO, clean_environment, free_port, read_spans, run_shop_script, wait_for

ADMIN_TOKEN = "test-admin-token"
MAX_RETRIES = 2
pytestmark = pytest.mark.slow


@dataclass
class Demo:
    process: subprocess.Popen
    var: Path
    ports: dict[str, int]

    @property
    def app(self) -> str:
        return f"http://127.0.0.1:{self.ports['DEMO_APP_PORT']}"

    @property
    def prometheus(self) -> str:
        return f"http://127.0.0.1:{self.ports['DEMO_PROMETHEUS_PORT']}"

    def metrics(self, which: str) -> str:
        port = self.ports["SPYGLASS_METRICS_PORT" if which == "web" else "DEMO_WORKER_METRICS_PORT"]
        return f"http://127.0.0.1:{port}/metrics"

    def value(self, which: str, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``, on the web or worker endpoint."""
        return self.values(which, (name,), **labels)[0]

    def values(self, which: str, names: tuple[str, ...], **labels: str) -> tuple[float, ...]:
        """:meth:`value` for each of ``names``, read from one scrape (a histogram's sum and count agree)."""
        text = requests.get(self.metrics(which), timeout=10).text
        totals = dict.fromkeys(names, 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals and all(sample.labels.get(key) == value for key, value in labels.items()):
                    totals[sample.name] += sample.value
        return tuple(totals[name] for name in names)

    def faults(self, method: str = "GET", **switches: Any) -> requests.Response:
        return requests.request(
            method,
            f"{self.app}/admin/faults",
            json=switches if method == "PUT" else None,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=10,
        )

    def place_order(self, **headers: str) -> requests.Response:
        order = {"customer_id": 3, "items": [{"product_id": 7, "quantity": 1}, {"product_id": 8, "quantity": 2}]}
        return requests.post(f"{self.app}/orders", json=order, headers=headers, timeout=10)

    def order(self, order_id: int) -> dict:
        return requests.get(f"{self.app}/orders/{order_id}", timeout=10).json()

    def spans(self) -> list[dict]:
        return read_spans(self.var / "otlp" / "traces.jsonl")

    def query(self, expression: str) -> list[dict]:
        response = requests.get(f"{self.prometheus}/api/v1/query", params={"query": expression}, timeout=5)
        response.raise_for_status()
        return response.json()["data"]["result"]


def _safe(call):
    try:
        return call()
    except (requests.RequestException, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Demo]:
    """The native demo, with a fast payment provider and short retry backoff, under light load."""
    var = tmp_path_factory.mktemp("demo")
    ports = {name: free_port() for name in PORT_VARIABLES}
    shop_redis = redis_url.rsplit("/", 1)[0] + "/13"
    import redis

    redis.Redis.from_url(shop_redis).flushdb()
    env = clean_environment(
        DEMO_VAR_DIR=str(var),
        DEMO_SECONDS="900",
        DEMO_RATE="8",
        DEMO_REDIS_URL=shop_redis,
        DEMO_ADMIN_TOKEN=ADMIN_TOKEN,
        DEMO_PAYMENT_LATENCY_MS="10",
        DEMO_PAYMENT_FAILURE_RATE="0",
        DEMO_RETRY_BACKOFF="0.2",
        DEMO_PAYMENT_MAX_RETRIES=str(MAX_RETRIES),
        DEMO_MAINTENANCE_INTERVAL="3",
        OTEL_BSP_SCHEDULE_DELAY="300",
        **{name: str(port) for name, port in ports.items()},
    )
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "demo_app.native"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    running = Demo(process, var, ports)
    try:
        ready = wait_for(
            lambda: process.poll() is not None or _safe(lambda: requests.get(running.metrics("worker"), timeout=2).ok),
            timeout=90,
            interval=0.5,
        )
        assert ready and process.poll() is None, process.stdout.read().decode() if process.poll() is not None else ""
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=90)
    text = output.decode(errors="replace")
    assert "Where to look" in text and "demo stopped" in text, text[-3000:]


def test_an_order_flows_through_the_chain_and_one_trace_connects_web_and_worker(demo: Demo) -> None:
    """POST /orders → reserve → charge → confirm; the request's trace holds the web, worker and SQL spans."""
    trace_id = uuid.uuid4().hex
    response = demo.place_order(traceparent=f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01")
    assert response.status_code == 202, response.text
    order_id = response.json()["order_id"]
    assert response.headers["Location"] == f"/orders/{order_id}"
    confirmed = wait_for(lambda: demo.order(order_id)["status"] == "confirmed", timeout=30, interval=0.3)
    assert confirmed, demo.order(order_id)

    def trace_complete() -> list[dict] | None:
        spans = [span for span in demo.spans() if span["traceId"] == trace_id]
        names = {span["name"] for span in spans}
        wanted = {"POST /orders", "run/shop.reserve_stock", "run/shop.charge_payment", "run/shop.send_confirmation"}
        return spans if wanted <= names else None

    spans = wait_for(trace_complete, timeout=20, interval=0.5)
    assert spans, sorted({span["name"] for span in demo.spans() if span["traceId"] == trace_id})
    by_id = {span["spanId"]: span for span in spans}
    services = {span["resource"]["service.name"]["stringValue"] for span in spans}
    assert services == {"shop-web", "shop-worker"}
    charge = next(span for span in spans if span["name"] == "run/shop.charge_payment")
    payment = next(span for span in spans if span["name"] == "POST /v1/charges")
    assert payment["parentSpanId"] == charge["spanId"]
    sql_in_worker = [
        span
        for span in spans
        if span["attributes"].get("db.system.name") == "sqlite"
        and span["resource"]["service.name"]["stringValue"] == "shop-worker"
    ]
    assert {span["name"] for span in sql_in_worker} >= {"UPDATE products", "SELECT orders"}
    # Every span but the request's own descends from the request: one connected trace.
    (root,) = [span for span in spans if span.get("parentSpanId") not in by_id]
    assert root["name"] == "POST /orders"


def test_a_declined_payment_retries_with_backoff_then_fails_the_order_and_is_counted(demo: Demo) -> None:
    """With the provider down the charge retries MAX_RETRIES times, then the order fails and stock returns."""
    retries_before = demo.value(
        "worker", "celery_task_completed_total", task_name="shop.charge_payment", outcome="retry"
    )
    failures_before = demo.value(
        "worker",
        "celery_task_failures_total",
        task_name="shop.charge_payment",
        exception_type="demo_app.payment.ProviderUnavailable",
    )
    assert demo.faults("PUT", payment_outage=True).json()["payment_outage"] is True
    try:
        time.sleep(1.2)  # every process rereads the switches within a second
        order_id = demo.place_order().json()["order_id"]
        failed = wait_for(lambda: demo.order(order_id)["status"] == "failed", timeout=40, interval=0.3)
        order = demo.order(order_id)
        assert failed, order
    finally:
        demo.faults("DELETE")
    assert order["payment_attempts"] == MAX_RETRIES + 1
    assert order["failure_reason"].startswith(f"payment failed after {MAX_RETRIES + 1} attempts")
    retries = demo.value("worker", "celery_task_completed_total", task_name="shop.charge_payment", outcome="retry")
    failures = demo.value(
        "worker",
        "celery_task_failures_total",
        task_name="shop.charge_payment",
        exception_type="demo_app.payment.ProviderUnavailable",
    )
    assert retries - retries_before >= MAX_RETRIES
    assert failures - failures_before >= 1


def test_the_n_plus_one_listing_is_detected_and_its_eager_twin_is_not(demo: Demo) -> None:
    """Lazy loading trips the N+1 detector (counter and warning log line); the eager listing never does."""
    for _ in range(2):
        assert requests.get(f"{demo.app}/orders/recent/n-plus-one?limit=20", timeout=10).status_code == 200
        assert requests.get(f"{demo.app}/orders/recent?limit=20", timeout=10).status_code == 200
    lazy = {"http_request_method": "GET", "http_route": "/orders/recent/n-plus-one"}
    eager = {"http_request_method": "GET", "http_route": "/orders/recent"}
    assert demo.value("web", "spyglass_db_n_plus_one_requests_total", **lazy) >= 2
    assert demo.value("web", "spyglass_db_n_plus_one_requests_total", **eager) == 0
    assert demo.value("web", "spyglass_db_queries_per_request_count", **eager) >= 2
    queries, requests_measured = demo.values(
        "web", ("spyglass_db_queries_per_request_sum", "spyglass_db_queries_per_request_count"), **eager
    )
    assert queries / requests_measured <= 4

    def warning() -> dict | None:
        for line in (demo.var / "demo" / "web.log").read_text().splitlines():
            if '"spyglass.db"' in line:
                record = json.loads(line)
                if record.get("http_route") == "/orders/recent/n-plus-one":
                    return record
        return None

    record = wait_for(warning, timeout=10)
    assert record and record["level"] == "warning" and record["count"] >= 5 and "FROM" in record["statement"]


JSON = "application/json"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "error"),
    [
        ("{not json", JSON, 400, "malformed JSON body"),
        ('{"customer_id": 1, "items": [{"product_id": 1, "quantity": -2}]}', JSON, 422, "invalid order"),
        ('{"customer_id": 1, "items": [{"product_id": 9999, "quantity": 1}]}', JSON, 422, "unknown product"),
        ('{"customer_id": 999, "items": [{"product_id": 1, "quantity": 1}]}', JSON, 422, "unknown customer"),
        ('{"customer_id": 1, "items": []}', JSON, 422, "invalid order"),
        ("customer_id=1", "application/x-www-form-urlencoded", 415, "application/json"),
        ('{"pad": "' + "x" * 100_000 + '"}', JSON, 413, ""),
    ],
)
def test_bad_orders_get_a_clear_4xx_json_error(
    demo: Demo, body: str, content_type: str, status: int, error: str
) -> None:
    """Malformed JSON 400, invalid or unplaceable orders 422, not JSON 415, over 64 KiB 413: never a 500."""
    response = requests.post(f"{demo.app}/orders", data=body, headers={"Content-Type": content_type}, timeout=10)
    assert response.status_code == status, response.text
    assert error in response.json()["error"]


def test_unknown_resources_are_404_with_a_json_error(demo: Demo) -> None:
    """Unknown product, order or customer: 404 naming what is missing."""
    for path in ("/products/9999", "/orders/999999", "/customers/999"):
        response = requests.get(demo.app + path, timeout=10)
        assert response.status_code == 404 and "no " in response.json()["error"], path


def test_product_reads_are_served_from_the_cache_after_the_first(demo: Demo) -> None:
    """The second read of a product is a cache hit (X-Cache), counted, and its trace says so."""
    requests.get(f"{demo.app}/products/42", timeout=10)
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    response = requests.get(f"{demo.app}/products/42", headers={"traceparent": traceparent}, timeout=10)
    assert response.headers["X-Cache"] == "hit"
    assert demo.value("web", "demo_product_cache_requests_total", result="hit") >= 1

    def cache_span() -> dict | None:
        return next((s for s in demo.spans() if s["traceId"] == trace_id and s["name"] == "GET product cache"), None)

    span = wait_for(cache_span, timeout=10)
    assert span and span["attributes"]["demo.cache.result"] == "hit"
    assert not [s for s in demo.spans() if s["traceId"] == trace_id and "db.query.text" in s["attributes"]]


def test_beat_runs_the_maintenance_task_on_schedule(demo: Demo) -> None:
    """Beat sends shop.maintenance every DEMO_MAINTENANCE_INTERVAL (3 s here) and the worker runs it."""
    beat = f"http://127.0.0.1:{demo.ports['DEMO_BEAT_METRICS_PORT']}/metrics"

    def sent() -> float:
        text = requests.get(beat, timeout=5).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "celery_beat_tasks_sent_total" and sample.labels.get("task_name") == "shop.maintenance"
        )

    assert wait_for(lambda: _safe(sent) and sent() >= 2, timeout=20)
    ran = wait_for(
        lambda: (
            demo.value("worker", "celery_task_completed_total", task_name="shop.maintenance", outcome="success") >= 1
        ),
        timeout=20,
    )
    assert ran


def test_the_slow_worker_switch_delays_every_task(demo: Demo) -> None:
    """slow_worker_ms=400: a confirmation run takes at least 0.4 s; cleared, it takes milliseconds again."""
    labels = {"task_name": "shop.send_confirmation"}

    def runtime() -> tuple[float, float]:
        # One scrape: a run ending between two would count in one and not the other (CI once saw
        # 3 slow runs' seconds over 4 runs, 0.31 s each).
        return demo.values("worker", ("celery_task_runtime_seconds_sum", "celery_task_runtime_seconds_count"), **labels)

    demo.faults("PUT", slow_worker_ms=400)
    try:
        # Each pool process keeps the switches for 1 s: wait that out, plus time for a run that began
        # on the old switches just before they expired to end even on a loaded machine (CI once counted
        # such a run, 1.2 s after the switch, in the window below).
        time.sleep(2.5)
        total_before, count_before = runtime()
        order_id = demo.place_order().json()["order_id"]
        assert wait_for(lambda: demo.order(order_id)["status"] == "confirmed", timeout=30, interval=0.3)
        assert wait_for(lambda: runtime()[1] > count_before, timeout=10)
        total_after, count_after = runtime()
    finally:
        demo.faults("DELETE")
    assert (total_after - total_before) / (count_after - count_before) >= 0.4


def test_fault_switches_need_the_admin_token_and_refuse_unknown_switches(demo: Demo) -> None:
    """No or wrong token: 401; an unknown switch or queue: 422; nothing changes."""
    url = f"{demo.app}/admin/faults"
    assert requests.put(url, json={"error_rate": 1}, timeout=10).status_code == 401
    wrong = requests.put(url, json={"error_rate": 1}, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    assert demo.faults("PUT", error_rat=1).status_code == 422
    assert demo.faults("PUT", paused_queues=["nope"]).status_code == 422
    assert demo.faults("PUT", error_rate=2).status_code == 422
    assert demo.faults().json()["error_rate"] == 0


def test_injected_errors_and_latency_are_switched_on_and_off(demo: Demo) -> None:
    """error_rate 1 answers every API request 500 (JSON); latency_ms slows it; clearing restores both.

    Every gunicorn worker caches the switches for a second, so each check waits past that refresh.
    """
    demo.faults("PUT", error_rate=1.0)
    try:
        time.sleep(1.2)
        answers = [requests.get(f"{demo.app}/products/1", timeout=10) for _ in range(4)]
        assert [answer.status_code for answer in answers] == [500] * 4
        assert all("error" in answer.json() for answer in answers)
    finally:
        demo.faults("DELETE")
    demo.faults("PUT", latency_ms=300)
    try:
        time.sleep(1.2)
        started = time.monotonic()
        assert requests.get(f"{demo.app}/products/1", timeout=10).status_code == 200
        assert time.monotonic() - started >= 0.3
    finally:
        demo.faults("DELETE")
    time.sleep(1.2)
    started = time.monotonic()
    assert requests.get(f"{demo.app}/products/1", timeout=10).status_code == 200
    assert time.monotonic() - started < 0.3


def test_pausing_a_queue_stops_its_consumption_and_resuming_drains_it(demo: Demo) -> None:
    """paused_queues=["reports"]: report tasks wait in the broker (queue length > 0); clearing runs the chord."""
    assert demo.faults("PUT", paused_queues=["reports"]).status_code == 200
    try:
        time.sleep(1.0)
        started = requests.post(f"{demo.app}/reports/sales", timeout=10)
        assert started.status_code == 202
        report_id = started.json()["report_id"]
        waiting = wait_for(lambda: demo.value("worker", "celery_queue_length", queue="reports") >= 1, timeout=15)
        assert waiting, "the paused queue did not fill"
        time.sleep(2)
        assert requests.get(f"{demo.app}/reports/{report_id}", timeout=10).status_code == 202
    finally:
        demo.faults("DELETE")

    def done() -> dict | None:
        response = requests.get(f"{demo.app}/reports/{report_id}", timeout=10)
        return response.json() if response.status_code == 200 else None

    report = wait_for(done, timeout=30, interval=0.5)
    assert report and report["status"] == "done"
    assert report["report"]["products"] > 0 and report["report"]["revenue_cents"] > 0
    assert demo.value("worker", "celery_task_completed_total", task_name="shop.combine_sales", outcome="success") >= 1


def test_prometheus_scrapes_every_target_of_the_stack_config_and_sees_the_traffic(demo: Demo) -> None:
    """With the compose Prometheus config adapted to this machine, every target is up (the shop's
    jobs named after their services: shop-web, shop-worker, shop-beat; Alertmanager; Prometheus);
    request rate, task completions, SQL durations and exemplars arrive.
    """
    expected = {"shop-web", "shop-worker", "shop-beat", "alertmanager", "prometheus"}

    def jobs_up() -> set[str] | None:
        series = _safe(lambda: demo.query("up == 1")) or []
        jobs = {item["metric"]["job"] for item in series}
        return jobs if jobs == expected else None

    assert wait_for(jobs_up, timeout=60, interval=1), _safe(lambda: demo.query("up"))
    assert {item["metric"]["service"] for item in demo.query('up{job=~"shop-.*"}')} == {"web", "worker", "beat"}
    for expression in (
        'sum(rate(http_server_request_duration_seconds_count{job="shop-web"}[1m])) > 0',
        'sum(celery_task_completed_total{job="shop-worker", task_name="shop.send_confirmation"}) > 0',
        'sum(db_client_operation_duration_seconds_count{job="shop-worker", db_operation_name="UPDATE"}) > 0',
        'sum(spyglass_db_n_plus_one_requests_total{job="shop-web"}) > 0',
        'sum(demo_product_cache_requests_total{job="shop-web", result="hit"}) > 0',
        'sum(celery_queue_length{job="shop-worker"}) >= 0',
    ):
        assert wait_for(lambda e=expression: _safe(lambda: demo.query(e)), timeout=60, interval=1), expression

    def exemplar_trace_ids() -> set[str]:
        response = requests.get(
            f"{demo.prometheus}/api/v1/query_exemplars",
            params={"query": "http_server_request_duration_seconds_bucket", "start": time.time() - 300},
            timeout=5,
        )
        return {item["labels"]["trace_id"] for series in response.json()["data"] for item in series["exemplars"]}

    trace_ids = wait_for(lambda: _safe(exemplar_trace_ids), timeout=30, interval=1)
    assert trace_ids, "Prometheus stored no exemplars"
    exported = wait_for(lambda: trace_ids & {span["traceId"] for span in demo.spans()}, timeout=20)
    assert exported, "exemplars point at traces that were never exported"
    assert requests.get(f"http://127.0.0.1:{demo.ports['DEMO_ALERTMANAGER_PORT']}/-/ready", timeout=5).ok


def test_the_queries_of_grafanas_trace_to_metrics_links_return_data(demo: Demo) -> None:
    """Each query the Tempo data source's tracesToMetrics link runs (dashboards/provisioning) is
    PromQL that Prometheus accepts and, for the shop's services, returns data from the demo.
    """
    provisioning = yaml.safe_load((REPO / "dashboards/provisioning/datasources/datasources.yaml").read_text())
    tempo = next(source for source in provisioning["datasources"] if source["uid"] == "tempo")
    queries = {
        item["name"]: item["query"].replace("$$", "$") for item in tempo["jsonData"]["tracesToMetrics"]["queries"]
    }
    assert queries
    for name, query in queries.items():
        for job in ("shop-web", "shop-worker"):
            expression = query.replace("$__tags", f'job="{job}"')
            response = requests.get(f"{demo.prometheus}/api/v1/query", params={"query": expression}, timeout=5)
            assert response.status_code == 200 and response.json()["status"] == "success", (name, response.text)
        if name != "5xx rate":  # the demo runs without injected errors here
            assert wait_for(
                lambda q=query: any(
                    _safe(lambda j=job: demo.query(q.replace("$__tags", f'job="{j}"')))
                    for job in ("shop-web", "shop-worker")
                ),
                timeout=60,
                interval=2,
            ), name


def _otlp_log_records(path: Path) -> list[tuple[str, dict]]:
    """(service.name, log record) of every record in an OTLP JSON lines file."""
    records = []
    for line in path.read_text().splitlines():
        for resource_logs in json.loads(line)["resourceLogs"]:
            resource = {
                item["key"]: item["value"].get("stringValue") for item in resource_logs["resource"]["attributes"]
            }
            for scope_logs in resource_logs["scopeLogs"]:
                records.extend((resource["service.name"], record) for record in scope_logs["logRecords"])
    return records


def test_logs_of_web_and_worker_are_written_as_otlp_records_linked_to_the_order_trace(demo: Demo) -> None:
    """With no collector, make demo writes log records as OTLP JSON lines (var/otlp/logs.jsonl): the
    worker's "order confirmed" record carries the order's trace id, and the web's access record of
    the POST that placed the order carries the same one.
    """
    response = demo.place_order()
    assert response.status_code == 202, response.text
    order_id = str(response.json()["order_id"])
    logs = demo.var / "otlp" / "logs.jsonl"

    def linked_records() -> list[tuple[str, dict]] | None:
        records = _otlp_log_records(logs) if logs.exists() else []
        confirmed = [
            record
            for service, record in records
            if service == "shop-worker"
            and record.get("body", {}).get("stringValue") == "order confirmed"
            and {"key": "order_id", "value": {"intValue": order_id}} in record.get("attributes", [])
        ]
        if not confirmed:
            return None
        trace_id = confirmed[0]["traceId"]
        linked = [(service, record) for service, record in records if record.get("traceId") == trace_id]
        return linked if {service for service, _ in linked} >= {"shop-web", "shop-worker"} else None

    linked = wait_for(linked_records, timeout=30, interval=0.5)
    assert linked, "no log records of both services share the order's trace"
    access = [record for service, record in linked if service == "shop-web"]
    assert any(record["body"]["stringValue"] == "request" for record in access)
    assert all(record["severityNumber"] in (9, 13, 17) and record["spanId"] for _, record in linked)


def test_every_log_line_of_web_and_worker_is_json_with_the_service_name(demo: Demo) -> None:
    """web.log and worker.log hold JSON lines only (gunicorn's and Celery's own included)."""
    for name, service in (("web", "shop-web"), ("worker", "shop-worker")):
        log = demo.var / "demo" / f"{name}.log"
        lines = wait_for(lambda log=log: [line for line in log.read_text().splitlines() if line.strip()], timeout=30)
        assert lines, f"{log} stays empty"
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert len(records) >= 0.99 * len(lines), [line for line in lines if not line.startswith("{")][:5]
        assert {record.get("service.name") for record in records} == {service}


def test_a_broker_that_is_down_gets_a_quick_503_and_the_order_is_kept_as_failed(tmp_path: Path, redis_url: str) -> None:
    """No broker: POST /orders answers 503 with Retry-After within 3 s; the order is recorded as not queued."""
    result = run_shop_script(
        """
        import json, time
        from demo_app.web import app
        client = app.test_client()
        started = time.monotonic()
        response = client.post("/orders", json={"customer_id": 1, "items": [{"product_id": 1, "quantity": 1}]})
        elapsed = time.monotonic() - started
        orders = client.get("/orders/recent?limit=1").get_json()["orders"]
        print("RESULT " + json.dumps([response.status_code, response.get_json(), response.headers.get("Retry-After"),
                                      elapsed, orders[0]["status"], orders[0]["failure_reason"]]))
        """,
        DEMO_VAR_DIR=str(tmp_path),
        DEMO_REDIS_URL=redis_url.rsplit("/", 1)[0] + "/13",
        CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",
    )
    line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert line, result.stdout[-2000:] + result.stderr[-2000:]
    status, body, retry_after, elapsed, order_status, reason = json.loads(line[len("RESULT ") :])
    assert status == 503 and "unavailable" in body["error"] and retry_after == "5"
    assert elapsed < 3.0
    assert order_status == "failed" and "broker unavailable" in reason


def test_the_shop_runs_on_postgresql_when_database_url_points_there(tmp_path: Path, redis_url: str) -> None:
    """DATABASE_URL=postgresql+psycopg://...: schema created and seeded, N+1 detected with db.system.name postgresql."""
    import psycopg

    name = f"spyglass_demo_{uuid.uuid4().hex[:8]}"
    admin_url = os.environ.get("DEMO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        database_url = admin_url.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0] + f"/{name}"
        result = run_shop_script(
            """
            import json
            from demo_app.web import app
            client = app.test_client()
            product = client.get("/products/5")
            listing = client.get("/orders/recent/n-plus-one?limit=10")
            print("RESULT " + json.dumps([product.status_code, product.get_json()["sku"], listing.status_code]))
            """,
            DATABASE_URL=database_url,
            DEMO_REDIS_URL=redis_url.rsplit("/", 1)[0] + "/13",
            OTEL_TRACES_EXPORTER="otlp_json_file",
            SPYGLASS_TRACES_FILE=str(tmp_path / "traces.jsonl"),
        )
        line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT ")), None)
        assert line, result.stdout[-2000:] + result.stderr[-2000:]
        assert json.loads(line[len("RESULT ") :]) == [200, "SKU-0005", 200]
        warnings = [json.loads(row) for row in result.stdout.splitlines() if '"spyglass.db"' in row]
        assert warnings and all(row["http_route"] == "/orders/recent/n-plus-one" for row in warnings)
        assert any("FROM order_lines" in row["statement"] for row in warnings)
        queries = [span for span in read_spans(tmp_path / "traces.jsonl") if "db.query.text" in span["attributes"]]
        assert queries and {span["attributes"]["db.system.name"] for span in queries} == {"postgresql"}
        assert {span["attributes"]["db.namespace"] for span in queries} == {name}
        assert {span["attributes"]["server.address"] for span in queries} == {"127.0.0.1"}
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_fault_switch_defaults_come_from_the_environment_and_bad_values_are_refused() -> None:
    """DEMO_FAULT_* and DEMO_PAYMENT_FAILURE_RATE set the defaults; an out-of-range value is a clear error."""
    from pydantic import ValidationError

    from demo_app import faults

    switches = faults.defaults(
        {
            "DEMO_FAULT_ERROR_RATE": "0.25",
            "DEMO_FAULT_LATENCY_MS": "150",
            "DEMO_PAYMENT_FAILURE_RATE": "0.5",
            "DEMO_FAULT_PAYMENT_OUTAGE": "true",
            "DEMO_FAULT_SLOW_WORKER_MS": "20",
            "DEMO_FAULT_PAUSED_QUEUES": "reports, maintenance",
        }
    )
    assert switches == faults.Faults(
        error_rate=0.25,
        latency_ms=150,
        payment_failure_rate=0.5,
        payment_outage=True,
        slow_worker_ms=20,
        paused_queues=("reports", "maintenance"),
    )
    assert faults.defaults({}) == faults.Faults()
    with pytest.raises(ValidationError, match="error_rate"):
        faults.defaults({"DEMO_FAULT_ERROR_RATE": "1.5"})


def test_with_redis_down_products_come_from_the_database_and_fault_switches_answer_503(tmp_path: Path) -> None:
    """Cache down: product reads still answer 200 (X-Cache: error); the admin endpoint says 503, not 500."""
    result = run_shop_script(
        """
        import json
        from demo_app.web import app
        client = app.test_client()
        product = client.get("/products/3")
        admin = client.put("/admin/faults", json={"latency_ms": 5}, headers={"Authorization": "Bearer t"})
        print("RESULT " + json.dumps([product.status_code, product.headers.get("X-Cache"), product.get_json()["id"],
                                      admin.status_code, admin.get_json()["error"]]))
        """,
        DEMO_VAR_DIR=str(tmp_path),
        DEMO_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        DEMO_ADMIN_TOKEN="t",
    )
    line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert line, result.stdout[-2000:] + result.stderr[-2000:]
    product_status, cache, product_id, admin_status, admin_error = json.loads(line[len("RESULT ") :])
    assert (product_status, cache, product_id) == (200, "error", 3)
    assert admin_status == 503 and "Redis" in admin_error


def test_alertmanager_pages_a_critical_alert_to_the_sink_and_mutes_its_warning_twin(demo: Demo) -> None:
    """Alertmanager runs the stack's config: a critical alert reaches the alert sink's page receiver,
    and while it fires the warning alert of the same name and job is inhibited.
    """
    alertmanager = f"http://127.0.0.1:{demo.ports['DEMO_ALERTMANAGER_PORT']}"
    sink = f"http://127.0.0.1:{demo.ports['DEMO_ALERT_SINK_PORT']}"
    name = f"SpyglassStackTest{uuid.uuid4().hex[:8]}"
    labels = {"alertname": name, "job": "shop-web"}
    alerts = [
        {"labels": {**labels, "severity": severity}, "annotations": {"summary": f"{severity} test alert"}}
        for severity in ("critical", "warning")
    ]
    requests.post(f"{alertmanager}/api/v2/alerts", json=alerts, timeout=5).raise_for_status()

    def states() -> dict[str, dict] | None:
        found = requests.get(f"{alertmanager}/api/v2/alerts", params={"filter": f'alertname="{name}"'}, timeout=5)
        by_severity = {alert["labels"]["severity"]: alert["status"] for alert in found.json()}
        return by_severity if len(by_severity) == 2 else None

    status = wait_for(states, timeout=10)
    assert status["critical"]["state"] == "active"
    assert status["warning"]["state"] == "suppressed" and status["warning"]["inhibitedBy"], status

    def paged() -> list[dict] | None:
        notifications = requests.get(f"{sink}/notifications", params={"receiver": "page"}, timeout=5).json()
        return [n for n in notifications if n["payload"]["commonLabels"].get("alertname") == name] or None

    notifications = wait_for(paged, timeout=40, interval=0.5)
    assert notifications, "the critical alert never reached the page receiver"
    payload = notifications[0]["payload"]
    assert payload["status"] == "firing" and payload["commonLabels"]["severity"] == "critical"
    assert [alert["annotations"]["summary"] for alert in payload["alerts"]] == ["critical test alert"]
