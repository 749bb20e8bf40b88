"""The shop's Redis broker transport: kombu's, made to survive a broker crash.

When a Redis broker dies while the worker holds unacknowledged messages, Celery closes the broken
connection and then closes the task consumer's channel, which tries to give those messages back to
the broker. kombu's Redis channel then builds a new connection from a transport whose connection
is already closed and raises ``AttributeError`` ("'NoneType' object has no attribute 'hostname'").
That is not one of the transport's connection errors, so Celery takes it for a bug and the worker
exits ("Unrecoverable error") instead of reconnecting.

:class:`Transport` reports that case as what it is, a lost connection
(:class:`redis.exceptions.ConnectionError`): Celery ignores it while closing and reconnects when
the broker is back. The messages stay in the broker's unacknowledged set, from which any worker
restores them once the visibility timeout (``DEMO_VISIBILITY_TIMEOUT``) has passed.

Use it with ``broker_transport="demo_app.broker:Transport"`` on a ``redis://`` broker URL
(:func:`transport_for` picks it; other brokers keep Celery's transport).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["Channel", "Transport", "transport_for"]


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; asking for a connection once its own is closed is a connection error."""

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is None:
            raise RedisConnectionError("the broker connection of this channel is closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """The transport to give Celery for ``broker_url``: this module's for Redis, else Celery's choice."""
    if broker_url.lower().startswith("redis://"):
        return f"{__name__}:Transport"
    return None
