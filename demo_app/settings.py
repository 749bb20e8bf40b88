"""The shop's settings, read once from the environment (defaults run everything on this machine).

| Variable | Default | Meaning |
| --- | --- | --- |
| ``DATABASE_URL`` | SQLite file ``var/demo/shop.db`` | Any SQLAlchemy URL (``postgresql+psycopg://...``) |
| ``DEMO_REDIS_URL`` | ``redis://127.0.0.1:6379/0`` | Product cache and the fault switches |
| ``CELERY_BROKER_URL`` | ``DEMO_REDIS_URL`` | Where orders, reports and maintenance tasks are queued |
| ``CELERY_RESULT_BACKEND`` | ``DEMO_REDIS_URL`` | Where the report chord keeps its results |
| ``DEMO_ADMIN_TOKEN`` | none (admin endpoint off) | Bearer token of ``/admin/faults`` |
| ``DEMO_CACHE_TTL`` | ``30`` | Seconds a product stays in the cache |
| ``DEMO_PAYMENT_LATENCY_MS`` | ``120`` | Typical latency of the payment provider |
| ``DEMO_PAYMENT_MAX_RETRIES`` | ``4`` | Retries of a failed charge before the order fails |
| ``DEMO_RETRY_BACKOFF`` | ``1.0`` | Seconds before the first retry; doubles each time (with jitter) |
| ``DEMO_PUBLISH_TIMEOUT`` | ``2.0`` | Seconds an order may wait for the broker before the API answers 503 |
| ``DEMO_MAINTENANCE_INTERVAL`` | ``60`` | Seconds between two runs of the maintenance task (beat) |
| ``DEMO_TASK_TIME_LIMIT`` | ``300`` | Seconds a task may run before its pool process is killed (at least 1) |
| ``DEMO_VISIBILITY_TIMEOUT`` | ``3600`` (kombu's) | Redis broker: seconds until a dead worker's messages return |
| ``DEMO_MAX_TASKS_PER_CHILD`` | ``0`` (never) | Tasks a pool process runs before it is replaced by a fresh one |

A worker that dies (SIGKILL, OOM, lost host) leaves its unacknowledged messages behind. RabbitMQ
(``CELERY_BROKER_URL=amqp://...``) hands them out again as soon as the connection drops. Redis has
no such thing: kombu hides each delivered message for ``DEMO_VISIBILITY_TIMEOUT`` seconds and puts
it back only after that. A short timeout brings orders back quickly, but a message still held by a
live worker when it passes (a long task, a prefetched message, a retry's countdown) is delivered a
second time; the shop's tasks are idempotent, so that costs work, never a second charge.

The fault switches (``DEMO_FAULT_*``) are described in :mod:`demo_app.faults`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["SettingsError", "ShopSettings", "current", "load"]

REPO = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """An environment variable of the shop holds a value it cannot use."""


@dataclass(frozen=True)
class ShopSettings:
    """The shop's configuration."""

    database_url: str
    redis_url: str
    broker_url: str
    result_backend: str
    admin_token: str | None
    cache_ttl_s: float
    payment_latency_ms: float
    payment_max_retries: int
    retry_backoff_s: float
    publish_timeout_s: float
    maintenance_interval_s: float
    task_time_limit_s: float
    visibility_timeout_s: float | None
    max_tasks_per_child: int

    def broker_transport_options(self) -> dict[str, Any]:
        """The broker transport options: socket timeouts, and the Redis visibility timeout if set.

        kombu looks for messages to restore every 100 s by default (10 s, scanning every tenth
        time); with a timeout set it scans every tenth of it (1 to 10 s), so a dead worker's
        messages come back soon after the timeout.
        """
        options: dict[str, Any] = {"socket_connect_timeout": 1.0, "socket_timeout": 5.0}
        if self.visibility_timeout_s:
            options.update(
                visibility_timeout=self.visibility_timeout_s,
                unacked_restore_interval=min(10.0, max(1.0, self.visibility_timeout_s / 10)),
                unacked_restore_throttle=1,
            )
        return options


def _number(env: dict[str, str] | os._Environ, name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


def default_database_url(env: dict[str, str] | os._Environ) -> str:
    """SQLite in ``var/demo/`` (``DEMO_VAR_DIR`` moves ``var/``)."""
    var = Path(env.get("DEMO_VAR_DIR") or REPO / "var") / "demo"
    var.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{var / 'shop.db'}"


def load(env: dict[str, str] | None = None) -> ShopSettings:
    """Read the settings from ``env`` (``os.environ`` by default); raises :class:`SettingsError`."""
    env = os.environ if env is None else env
    redis_url = env.get("DEMO_REDIS_URL") or "redis://127.0.0.1:6379/0"
    return ShopSettings(
        database_url=env.get("DATABASE_URL") or default_database_url(env),
        redis_url=redis_url,
        broker_url=env.get("CELERY_BROKER_URL") or redis_url,
        result_backend=env.get("CELERY_RESULT_BACKEND") or redis_url,
        admin_token=env.get("DEMO_ADMIN_TOKEN", "").strip() or None,  # blank: the endpoint stays off
        cache_ttl_s=_number(env, "DEMO_CACHE_TTL", 30.0),
        payment_latency_ms=_number(env, "DEMO_PAYMENT_LATENCY_MS", 120.0),
        payment_max_retries=int(_number(env, "DEMO_PAYMENT_MAX_RETRIES", 4)),
        retry_backoff_s=_number(env, "DEMO_RETRY_BACKOFF", 1.0),
        publish_timeout_s=_number(env, "DEMO_PUBLISH_TIMEOUT", 2.0, minimum=0.1),
        maintenance_interval_s=_number(env, "DEMO_MAINTENANCE_INTERVAL", 60.0, minimum=1.0),
        task_time_limit_s=_number(env, "DEMO_TASK_TIME_LIMIT", 300.0, minimum=1.0),
        visibility_timeout_s=_number(env, "DEMO_VISIBILITY_TIMEOUT", 0.0, minimum=1.0) or None,
        max_tasks_per_child=int(_number(env, "DEMO_MAX_TASKS_PER_CHILD", 0)),
    )


@lru_cache(maxsize=1)
def current() -> ShopSettings:
    """The settings of this process (read from ``os.environ`` once)."""
    return load()
