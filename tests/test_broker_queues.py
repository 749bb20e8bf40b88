"""Queue depth from the real brokers: Redis with priorities and a key prefix, and RabbitMQ."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import celery
import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

import spyglass
from spyglass import runtime
from spyglass.config import load_settings
from spyglass.metrics.broker_queues import (
    AmqpQueueProbe,
    BrokerQueueCollector,
    QueueDepth,
    RedisQueueProbe,
    probe_for,
)
from tests.conftest import wait_for

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
OPTIONS = {"global_keyprefix": "shop:", "priority_steps": [0, 3, 6, 9], "queue_order_strategy": "priority"}


@pytest.fixture
def publisher(redis_url: str) -> Iterator[tuple[celery.Celery, str]]:
    """An instrumented app publishing (with publish-time stamps) to a prefixed, prioritised Redis queue."""
    queue = f"spyglass-depth-{uuid.uuid4().hex[:10]}"
    runtime.init(load_settings({"OTEL_SERVICE_NAME": "web", "SPYGLASS_METRICS_PORT": "0"}))
    app = celery.Celery("web", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = OPTIONS
    spyglass.instrument_celery(app)
    yield app, queue
    client = redis.Redis.from_url(redis_url)
    for key in RedisQueueProbe(redis_url, OPTIONS).keys(queue):
        client.delete(key)
    app.close()
    runtime.shutdown()


def test_redis_length_counts_every_priority_and_age_is_the_oldest_message(publisher, redis_url: str) -> None:
    """Messages of all priorities count; the oldest stamped message, whatever its priority, gives the age."""
    app, queue = publisher
    app.send_task("shop.first", queue=queue, priority=9)
    time.sleep(1.0)
    for priority in (0, 3, 6, 9, 0):
        app.send_task("shop.later", queue=queue, priority=priority)
    probe = RedisQueueProbe(redis_url, OPTIONS)
    assert any(redis.Redis.from_url(redis_url).exists(key) for key in probe.keys(queue)[1:]), "no priority sub-queue"
    depth = probe.measure([queue])[queue]
    assert depth.messages == 6
    assert depth.oldest_age_seconds is not None and 1.0 <= depth.oldest_age_seconds < 10.0


def test_an_empty_queue_has_no_age(redis_url: str) -> None:
    """A queue with no message has length 0 and no oldest-message age."""
    assert RedisQueueProbe(redis_url).measure(["spyglass-never-used"]) == {"spyglass-never-used": QueueDepth(0, None)}


def test_rabbitmq_reports_ready_messages() -> None:
    """A passive declare on RabbitMQ gives the messages waiting in the queue."""
    name = f"spyglass-depth-{uuid.uuid4().hex[:10]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name, auto_delete=False)
    with Connection(RABBITMQ_URL, connect_timeout=5) as connection:
        channel = connection.channel()
        bound = queue(channel)
        bound.declare()
        producer = Producer(channel, exchange=queue.exchange, routing_key=name)
        for number in range(3):
            producer.publish({"n": number})
        try:
            probe = AmqpQueueProbe(RABBITMQ_URL)
            # Publishes are not confirmed: the broker counts them a moment later.
            assert wait_for(lambda: probe.measure([name]) == {name: QueueDepth(3, None)}, timeout=10)
        finally:
            bound.delete()
            channel.close()


def test_a_broker_that_does_not_answer_yields_no_queue_samples_and_does_not_fail() -> None:
    """Queue depth of an unreachable broker is left out of the scrape, quickly, without an exception."""
    collector = BrokerQueueCollector(RedisQueueProbe("redis://127.0.0.1:1/0", timeout=0.5), ["orders"])
    started = time.monotonic()
    assert list(collector.collect()) == []
    assert time.monotonic() - started < 2.0


def test_a_custom_transport_class_is_read_as_the_broker_it_drives(redis_url: str) -> None:
    """A worker whose broker_transport is a subclass of kombu's Redis transport (``module:Class``, as the
    demo's hardened transport) still gets its queue depth: the probe follows the driver, not the URL's scheme.
    """
    app = celery.Celery("custom", broker=redis_url, set_as_current=False)
    app.conf.broker_transport = "demo_app.broker:Transport"
    with app.connection_for_read() as connection:
        url = connection.as_uri(include_password=True)
        driver_type = connection.transport.driver_type
    assert url.startswith("demo_app.broker:Transport://") and driver_type == "redis"
    assert probe_for(url) is None, "the URL alone names no broker spyglass knows"
    probe = probe_for(url, None, driver_type)
    assert isinstance(probe, RedisQueueProbe)
    queue = f"spyglass-depth-{uuid.uuid4().hex[:10]}"
    client = redis.Redis.from_url(redis_url)
    client.lpush(queue, b"{}", b"{}")
    try:
        assert probe.measure([queue])[queue].messages == 2
    finally:
        client.delete(queue)
    assert probe_for("sqs://key@host/", None, "sqs") is None
    app.close()
