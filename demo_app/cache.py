"""Product reads cached in Redis: hits and misses are counted and visible on the trace.

A cache that is down is skipped (counted as ``error``): the product is read from the database.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import redis
from opentelemetry import trace
from prometheus_client import Counter

from demo_app import settings as shop_settings

__all__ = ["CACHE_REQUESTS", "cached_product", "forget_product"]

CACHE_REQUESTS = Counter(
    "demo_product_cache_requests", "Product cache lookups of the demo shop, by result (hit, miss, error).", ["result"]
)
_tracer = trace.get_tracer("demo_app.cache")


@lru_cache(maxsize=1)
def _client() -> redis.Redis:
    return redis.Redis.from_url(shop_settings.current().redis_url, socket_connect_timeout=0.3, socket_timeout=0.5)


def cached_product(product_id: int, load: Callable[[int], dict[str, Any] | None]) -> tuple[dict[str, Any] | None, str]:
    """The product as a dict (``load`` reads it on a miss) and where it came from: ``hit``, ``miss`` or ``error``."""
    key = f"demo:product:{product_id}"
    attributes = {"db.system.name": "redis", "db.operation.name": "GET"}
    with _tracer.start_as_current_span("GET product cache", kind=trace.SpanKind.CLIENT, attributes=attributes) as span:
        try:
            stored = _client().get(key)
        except redis.RedisError:
            stored, result = None, "error"
        else:
            result = "hit" if stored is not None else "miss"
        span.set_attribute("demo.cache.result", result)
    CACHE_REQUESTS.labels(result).inc()
    if stored is not None:
        return json.loads(stored), result
    product = load(product_id)
    if product is not None and result == "miss":
        with contextlib.suppress(redis.RedisError):
            _client().set(key, json.dumps(product), ex=max(1, int(shop_settings.current().cache_ttl_s)))
    return product, result


def forget_product(product_id: int) -> None:
    """Drop a product from the cache (its stock changed)."""
    with contextlib.suppress(redis.RedisError):
        _client().delete(f"demo:product:{product_id}")
