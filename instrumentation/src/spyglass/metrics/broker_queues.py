r"""Celery queue depth read from the broker at scrape time: Redis and RabbitMQ.

Redis (kombu's transport) keeps a queue as lists: the queue's own key and one per priority step
(``{queue}\x06\x16{step}`` for steps 3, 6, 9 by default), each behind ``global_keyprefix``.
Messages are pushed on the left and taken from the right, so the oldest message of each list is
at index -1; its ``spyglass_published_at`` header (stamped by instrumented publishers) gives the
oldest message's age. RabbitMQ reports a queue's ready messages to a passive declare; it does
not let a client see a message's age without consuming it.

A broker that does not answer within the probe's timeout costs the scrape that timeout once and
yields no queue samples; the rest of the scrape is unaffected.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric

from spyglass.catalog import by_name

__all__ = ["AmqpQueueProbe", "BrokerQueueCollector", "QueueDepth", "RedisQueueProbe", "probe_for"]

_logger = logging.getLogger("spyglass.celery")
_PRIORITY_SEPARATOR = "\x06\x16"
_DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)
_PUBLISHED_AT = "spyglass_published_at"


@dataclass(frozen=True)
class QueueDepth:
    """What the broker says about one queue."""

    messages: int
    oldest_age_seconds: float | None


class QueueProbe(Protocol):
    """Reads queue depths from a broker."""

    def measure(self, queues: Sequence[str]) -> dict[str, QueueDepth]:
        """Depth of each queue; raises on a broker error."""
        ...


class RedisQueueProbe:
    """Queue depths from kombu's Redis transport, priority sub-queues and key prefix included."""

    def __init__(self, url: str, transport_options: Mapping[str, Any] | None = None, timeout: float = 1.0) -> None:
        import redis

        options = dict(transport_options or {})
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._prefix = str(options.get("global_keyprefix", ""))
        self._steps = tuple(options.get("priority_steps", _DEFAULT_PRIORITY_STEPS))

    def keys(self, queue: str) -> list[str]:
        """The Redis keys holding ``queue``'s messages."""
        return [self._prefix + (f"{queue}{_PRIORITY_SEPARATOR}{step}" if step else queue) for step in self._steps]

    def measure(self, queues: Sequence[str]) -> dict[str, QueueDepth]:
        """Length and oldest stamped message of every queue, in one round trip."""
        pipe = self._client.pipeline(transaction=False)
        for queue in queues:
            for key in self.keys(queue):
                pipe.llen(key)
                pipe.lindex(key, -1)
        replies = pipe.execute()
        now = time.time()
        depths = {}
        per_queue = 2 * len(self._steps)
        for index, queue in enumerate(queues):
            chunk = replies[index * per_queue : (index + 1) * per_queue]
            lengths, oldest = chunk[0::2], chunk[1::2]
            stamps = [stamp for stamp in map(_published_at, oldest) if stamp is not None]
            depths[queue] = QueueDepth(sum(lengths), now - min(stamps) if stamps else None)
        return depths


def _published_at(raw: bytes | None) -> float | None:
    if raw is None:
        return None
    try:
        return float(json.loads(raw)["headers"][_PUBLISHED_AT])
    except (ValueError, KeyError, TypeError):
        return None


class AmqpQueueProbe:
    """Ready-message counts from an AMQP broker (RabbitMQ), by passive queue declaration."""

    def __init__(self, url: str, timeout: float = 1.0) -> None:
        self._url = url
        self._timeout = timeout

    def measure(self, queues: Sequence[str]) -> dict[str, QueueDepth]:
        """Ready messages of every queue that exists."""
        from kombu import Connection

        depths = {}
        with Connection(self._url, connect_timeout=self._timeout) as connection:
            channel = connection.channel()
            try:
                for queue in queues:
                    declared = channel.queue_declare(queue=queue, passive=True)
                    depths[queue] = QueueDepth(declared.message_count, None)
            finally:
                channel.close()
        return depths


_REDIS_SCHEMES = ("redis", "rediss")
_AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def probe_for(
    url: str, transport_options: Mapping[str, Any] | None = None, driver_type: str | None = None
) -> QueueProbe | None:
    """The probe for a broker URL, or ``None`` for a broker spyglass cannot read.

    ``driver_type`` is kombu's name for the transport's driver (``Transport.driver_type``): a custom
    transport class built on kombu's Redis or AMQP transport (``broker_transport="app.module:Transport"``)
    gives a URL whose scheme is that class's path, and is read as the broker it drives.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if separator and scheme not in _REDIS_SCHEMES + _AMQP_SCHEMES and driver_type in ("redis", "amqp"):
        scheme = driver_type
        url = f"{scheme}://{rest}"
    if scheme in _REDIS_SCHEMES:
        return RedisQueueProbe(url, transport_options)
    if scheme in _AMQP_SCHEMES:
        return AmqpQueueProbe(url)
    return None


class BrokerQueueCollector:
    """``celery_queue_length`` and ``celery_queue_oldest_message_age_seconds`` for the worker's queues."""

    def __init__(self, probe: QueueProbe, queues: Sequence[str]) -> None:
        self._probe = probe
        self._queues = list(queues)
        self._last_error = ""

    def collect(self) -> Iterator[Metric]:
        """Ask the broker now; yield nothing (and log the first failure of a kind) if it cannot answer."""
        try:
            depths = self._probe.measure(self._queues)
        except Exception as exc:  # a broker problem must not fail the scrape
            error = type(exc).__name__
            if error != self._last_error:
                _logger.warning("cannot read queue lengths from the broker", extra={"error": repr(exc)})
                self._last_error = error
            return
        self._last_error = ""
        length = GaugeMetricFamily("celery_queue_length", by_name("celery_queue_length").description, labels=["queue"])
        age_spec = by_name("celery_queue_oldest_message_age_seconds")
        age = GaugeMetricFamily(age_spec.name, age_spec.description, labels=["queue"])
        for queue, depth in depths.items():
            length.add_metric([queue], depth.messages)
            if depth.oldest_age_seconds is not None:
                age.add_metric([queue], max(depth.oldest_age_seconds, 0.0))
        yield length
        yield age
