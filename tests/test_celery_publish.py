"""Publishing tasks: every message is counted by task and queue and stamped with its publish time.

Checked against a real Redis broker: the stamped header is read back from the message Celery
actually queued.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import celery
import pytest
import redis
from prometheus_client import REGISTRY

import spyglass
from spyglass import runtime
from spyglass.config import load_settings
from spyglass.integrations.celery import PUBLISHED_AT_HEADER, UNREGISTERED_TASK
from tests.conftest import clean_environment, free_port, read_spans

PUBLISHED = "celery_task_published_total"


@pytest.fixture
def shop(redis_url: str) -> Iterator[tuple[celery.Celery, str, redis.Redis]]:
    """An instrumented Celery app publishing to a queue of its own on the real broker."""
    queue = f"spyglass-test-{uuid.uuid4().hex[:12]}"
    runtime.init(load_settings({"OTEL_SERVICE_NAME": "publisher", "SPYGLASS_METRICS_PORT": "0"}))
    app = celery.Celery("shop", broker=redis_url, set_as_current=False)
    app.conf.task_default_queue = queue

    @app.task(name="shop.reserve_stock", shared=False)
    def reserve_stock(order_id: int) -> int:
        return order_id

    spyglass.instrument_celery(app)
    client = redis.Redis.from_url(redis_url)
    yield app, queue, client
    client.delete(queue)
    app.close()
    runtime.shutdown()


def published(task_name: str, queue: str) -> float:
    return REGISTRY.get_sample_value(PUBLISHED, {"task_name": task_name, "queue": queue}) or 0.0


def queued_messages(client: redis.Redis, queue: str) -> list[dict]:
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def test_published_messages_are_counted_and_carry_their_publish_time(shop) -> None:
    """Two publishes count 2 under the task's name and queue; each queued message holds its publish time."""
    app, queue, client = shop
    before = time.time()
    app.tasks["shop.reserve_stock"].apply_async((1,))
    app.tasks["shop.reserve_stock"].apply_async((2,), countdown=30)
    after = time.time()
    assert published("shop.reserve_stock", queue) == 2
    messages = queued_messages(client, queue)
    assert len(messages) == 2
    for message in messages:
        assert before <= float(message["headers"][PUBLISHED_AT_HEADER]) <= after
    # The countdown task keeps its ETA beside the stamp: the worker measures its wait from the ETA.
    assert sorted(message["headers"]["eta"] is not None for message in messages) == [False, True]


def test_tasks_sent_by_a_name_the_app_does_not_register_share_one_label(shop) -> None:
    """send_task with arbitrary names cannot create series: they count as `<unregistered>`."""
    app, queue, _client = shop
    for number in range(5):
        app.send_task(f"somebody.elses.task_{number}", queue=queue)
    assert published(UNREGISTERED_TASK, queue) == 5
    assert not any(
        sample.labels.get("task_name", "").startswith("somebody.")
        for family in REGISTRY.collect()
        if family.name == PUBLISHED.removesuffix("_total")
        for sample in family.samples
    )


def test_a_task_registered_after_its_first_publish_gets_its_name_from_then_on(shop) -> None:
    """A name unknown at first (tasks imported later, autodiscovery) is labelled by name once registered."""
    app, queue, _client = shop
    app.send_task("shop.ship_order", queue=queue)
    assert published(UNREGISTERED_TASK, queue) == 1

    @app.task(name="shop.ship_order", shared=False)
    def ship_order() -> None:
        return None

    app.send_task("shop.ship_order", queue=queue)
    assert published("shop.ship_order", queue) == 1
    assert published(UNREGISTERED_TASK, queue) == 1


def test_import_spyglass_auto_instruments_a_celery_app_created_after_it(redis_url: str) -> None:
    """The drop-in import alone: an app defined after `import spyglass.auto` counts what it publishes."""
    queue = f"spyglass-test-{uuid.uuid4().hex[:12]}"
    script = f"""
import spyglass.auto
import celery
from prometheus_client import REGISTRY

app = celery.Celery("billing", broker={redis_url!r})
app.conf.task_default_queue = {queue!r}

@app.task(name="billing.charge", shared=False)
def charge(amount):
    return amount

charge.delay(3)
app.send_task("not.billing.refund")
for name in ("billing.charge", "<unregistered>"):
    print(REGISTRY.get_sample_value("celery_task_published_total", {{"task_name": name, "queue": {queue!r}}}))
"""
    environment = {**os.environ, "SPYGLASS_METRICS_PORT": "0", "OTEL_TRACES_EXPORTER": "none"}
    completed = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=60, check=False
    )
    redis.Redis.from_url(redis_url).delete(queue)
    assert completed.returncode == 0, completed.stderr
    counts = [line for line in completed.stdout.splitlines() if not line.startswith("{")]
    assert counts == ["1.0", "1.0"]


UNKNOWN_TASK_SCRIPT = """
import spyglass.auto
import celery
import celery.signals
import flask
from opentelemetry import trace

broker = celery.Celery("web", broker={broker!r})
broker.conf.task_default_queue = {queue!r}
web = flask.Flask("web")
during_publish = []


@celery.signals.before_task_publish.connect
def note_current_span(**_kwargs):  # runs after spyglass's receivers, while the message is being sent
    during_publish.append(format(trace.get_current_span().get_span_context().span_id, "016x"))


@web.post("/refunds")
def refund():
    broker.send_task("billing.refund")  # a task of another service: not registered here
    with trace.get_tracer("app").start_as_current_span("after publish"):
        pass
    return "ok"


assert web.test_client().post("/refunds").status_code == 200
assert not trace.get_current_span().get_span_context().is_valid, "a span is still current after the request"
print("CURRENT_DURING_PUBLISH", during_publish[0])
"""


def test_publishing_a_task_the_publisher_does_not_know_ends_its_span_and_leaks_no_context(
    redis_url: str, tmp_path
) -> None:
    """send_task by name: the publish span covers the publish, then ends; later spans are not its children."""
    queue = f"spyglass-test-{uuid.uuid4().hex[:12]}"
    traces = tmp_path / "traces.jsonl"
    environment = clean_environment()
    environment.update(
        SPYGLASS_METRICS_PORT="0", OTEL_TRACES_EXPORTER="otlp_json_file", SPYGLASS_TRACES_FILE=str(traces)
    )
    script = UNKNOWN_TASK_SCRIPT.format(broker=redis_url, queue=queue)
    completed = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=60, check=False
    )
    redis.Redis.from_url(redis_url).delete(queue)
    assert completed.returncode == 0, completed.stderr[-3000:]
    spans = {span["name"]: span for span in read_spans(traces)}
    assert set(spans) == {"POST /refunds", "apply_async/billing.refund", "after publish"}
    server = spans["POST /refunds"]
    assert spans["apply_async/billing.refund"]["parentSpanId"] == server["spanId"]
    assert spans["after publish"]["parentSpanId"] == server["spanId"]
    # While the message is sent, the publish span is the current one (the peer ended it before).
    current = next(line for line in completed.stdout.splitlines() if line.startswith("CURRENT_DURING_PUBLISH"))
    assert current.split()[1] == spans["apply_async/billing.refund"]["spanId"]


KNOWN_AND_NOT = ("shop.reserve_stock", "<unregistered>")
BROKER_DOWN_SCRIPT = """
import json
import spyglass.auto
import celery
import flask
from kombu.exceptions import OperationalError
from opentelemetry import trace
from prometheus_client import REGISTRY

broker = celery.Celery("web", broker={broker!r})
broker.conf.update(task_default_queue="orders", broker_connection_timeout=0.5,
                   broker_transport_options={{"socket_connect_timeout": 0.5}})
web = flask.Flask("web")


@broker.task(name="shop.reserve_stock")
def reserve_stock(order_id):
    return order_id


@web.post("/orders")
def place_order():
    outcomes = []
    for publish in (lambda: reserve_stock.apply_async((1,), retry=False), lambda: broker.send_task("billing.refund")):
        try:
            publish()
            outcomes.append("sent")
        except OperationalError:
            outcomes.append("failed")
    with trace.get_tracer("app").start_as_current_span("after failed publish"):
        pass
    return flask.jsonify(outcomes), 503


response = web.test_client().post("/orders")
assert response.status_code == 503 and response.get_json() == ["failed", "failed"], response.data
assert not trace.get_current_span().get_span_context().is_valid, "a span is still current after the request"
values = {{}}
for metric in REGISTRY.collect():
    for sample in metric.samples:
        if sample.name.startswith("celery_task_publish") and sample.name.endswith("_total"):
            values[sample.name + json.dumps(sample.labels, sort_keys=True)] = sample.value
print("VALUES " + json.dumps(values))
"""


def test_a_publish_the_broker_refuses_is_counted_as_an_error_and_its_span_ends_in_error(tmp_path) -> None:
    """Broker down: each failed publish counts in celery_task_publish_errors_total (not as published), its
    publish span ends with status ERROR and the exception, and the request's later spans are not its children.
    """
    traces = tmp_path / "traces.jsonl"
    environment = clean_environment()
    environment.update(
        SPYGLASS_METRICS_PORT="0", OTEL_TRACES_EXPORTER="otlp_json_file", SPYGLASS_TRACES_FILE=str(traces)
    )
    script = BROKER_DOWN_SCRIPT.format(broker=f"redis://127.0.0.1:{free_port()}/0")
    completed = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("VALUES "))
    values = json.loads(line[len("VALUES ") :])
    labels = [{"error_type": "OperationalError", "queue": "orders", "task_name": name} for name in KNOWN_AND_NOT]
    assert values == {"celery_task_publish_errors_total" + json.dumps(label): 1 for label in labels}, values
    spans = {span["name"]: span for span in read_spans(traces)}
    server = spans["POST /orders"]
    assert spans["after failed publish"]["parentSpanId"] == server["spanId"]
    for name in ("apply_async/shop.reserve_stock", "apply_async/billing.refund"):
        publish = spans[name]
        assert publish["parentSpanId"] == server["spanId"]
        assert publish["status"]["code"] == 2, publish["status"]  # ERROR
        events = [event["name"] for event in publish.get("events", [])]
        assert "exception" in events, publish
