"""Fault switches: drive each alert on purpose, then clear it.

Defaults come from the environment; ``PUT /admin/faults`` (bearer ``DEMO_ADMIN_TOKEN``) overrides
them for every process at once through Redis, and ``DELETE /admin/faults`` clears the overrides.
Each process rereads the switches at most once a second; when Redis is down it keeps the
environment's values.

| Switch | Variable | Effect |
| --- | --- | --- |
| ``error_rate`` | ``DEMO_FAULT_ERROR_RATE`` | Share (0 to 1) of API requests answered 500 by an injected error |
| ``latency_ms`` | ``DEMO_FAULT_LATENCY_MS`` | Milliseconds added to every API request |
| ``payment_failure_rate`` | ``DEMO_PAYMENT_FAILURE_RATE`` | Share (0 to 1) of charges the provider declines (0.1) |
| ``payment_outage`` | ``DEMO_FAULT_PAYMENT_OUTAGE`` | The provider fails every charge |
| ``slow_worker_ms`` | ``DEMO_FAULT_SLOW_WORKER_MS`` | Milliseconds every task sleeps before its work |
| ``paused_queues`` | ``DEMO_FAULT_PAUSED_QUEUES`` | Queues the worker stops consuming (comma-separated) |
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping

import redis
from pydantic import BaseModel, ConfigDict, Field

from demo_app import settings as shop_settings

__all__ = ["QUEUES", "Faults", "FaultsUpdate", "clear", "current", "defaults", "update"]

QUEUES = ("orders", "reports", "maintenance")
_KEY = "demo:faults"
_REFRESH_S = 1.0
_logger = logging.getLogger("demo_app.faults")


class Faults(BaseModel):
    """The switches in force."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_rate: float = Field(0.0, ge=0.0, le=1.0)
    latency_ms: float = Field(0.0, ge=0.0, le=60_000)
    payment_failure_rate: float = Field(0.1, ge=0.0, le=1.0)
    payment_outage: bool = False
    slow_worker_ms: float = Field(0.0, ge=0.0, le=600_000)
    paused_queues: tuple[str, ...] = ()


class FaultsUpdate(BaseModel):
    """A change to some switches (``PUT /admin/faults``); unknown switches are refused."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float | None = Field(None, ge=0.0, le=1.0)
    latency_ms: float | None = Field(None, ge=0.0, le=60_000)
    payment_failure_rate: float | None = Field(None, ge=0.0, le=1.0)
    payment_outage: bool | None = None
    slow_worker_ms: float | None = Field(None, ge=0.0, le=600_000)
    paused_queues: list[str] | None = None


def defaults(env: Mapping[str, str] | None = None) -> Faults:
    """The switches the environment sets (raises pydantic's ``ValidationError`` for a bad value)."""
    env = os.environ if env is None else env
    raw = {
        "error_rate": env.get("DEMO_FAULT_ERROR_RATE"),
        "latency_ms": env.get("DEMO_FAULT_LATENCY_MS"),
        "payment_failure_rate": env.get("DEMO_PAYMENT_FAILURE_RATE"),
        "payment_outage": env.get("DEMO_FAULT_PAYMENT_OUTAGE"),
        "slow_worker_ms": env.get("DEMO_FAULT_SLOW_WORKER_MS"),
        "paused_queues": tuple(q.strip() for q in env.get("DEMO_FAULT_PAUSED_QUEUES", "").split(",") if q.strip())
        or None,
    }
    return Faults(**{key: value for key, value in raw.items() if value not in (None, "")})


class _Store:
    """The overrides in Redis, cached for a second in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._cached: Faults | None = None
        self._read_at = 0.0

    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(
                shop_settings.current().redis_url, socket_connect_timeout=0.5, socket_timeout=0.5
            )
        return self._client

    def current(self) -> Faults:
        now = time.monotonic()
        cached = self._cached
        if cached is not None and now - self._read_at < _REFRESH_S:
            return cached
        with self._lock:
            base = defaults()
            try:
                stored = self.client().get(_KEY)
                overrides = json.loads(stored) if stored else {}
                faults = Faults(**{**base.model_dump(), **overrides})
            except (redis.RedisError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
                _logger.debug("fault switches unreadable, using the environment's", extra={"error": repr(exc)})
                faults = base
            self._cached, self._read_at = faults, now
            return faults

    def write(self, overrides: dict | None) -> None:
        client = self.client()
        if overrides:
            client.set(_KEY, json.dumps(overrides))
        else:
            client.delete(_KEY)
        with self._lock:
            self._cached = None


_store = _Store()


def current() -> Faults:
    """The switches in force now (environment, then overrides)."""
    return _store.current()


def update(change: FaultsUpdate) -> Faults:
    """Store ``change`` on top of the current overrides; returns the switches now in force."""
    try:
        stored = _store.client().get(_KEY)
        overrides = json.loads(stored) if stored else {}
    except ValueError:
        overrides = {}
    for key, value in change.model_dump(exclude_none=True).items():
        overrides[key] = value
    Faults(**{**defaults().model_dump(), **overrides})  # validates the combination
    _store.write(overrides)
    return current()


def clear() -> Faults:
    """Drop every override: the environment's switches apply again."""
    _store.write(None)
    return current()
