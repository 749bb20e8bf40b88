"""Run spans carry exactly the attributes opentelemetry-instrumentation-celery gives them.

spyglass starts and ends the run span itself, in the receivers that also record the task
metrics, and builds the instrumentation's attributes from the task request in one pass. These
tests hold that pass to the instrumentation's own ``set_attributes_from_context``.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery.app.task import Context as TaskRequest
from kombu import Exchange, Queue
from opentelemetry.instrumentation.celery.utils import set_attributes_from_context
from opentelemetry.sdk.trace import TracerProvider

from spyglass.integrations.celery_traces import request_attributes

BASE = {
    "id": "3f1c",
    "task": "shop.charge",
    "correlation_id": "3f1c",
    "reply_to": "reply-queue",
    "origin": "gen42@web-1",
    "hostname": "celery@worker-1",
    "delivery_info": {"exchange": "", "routing_key": "payments", "priority": 0, "redelivered": False},
    "retries": 0,
    "timelimit": (None, None),
    "root_id": "3f1c",
    "parent_id": None,
    "group": None,
    "eta": None,
    "expires": None,
}
REQUESTS = {
    "a plain task": {},
    "retried, with time limits": {"retries": 2, "timelimit": (300, 60)},
    "one time limit": {"timelimit": [None, 30]},
    "with an ETA and an expiry": {"eta": "2026-11-22T10:00:00+00:00", "expires": "2026-11-22T11:00:00+00:00"},
    "empty values": {"reply_to": "", "correlation_id": None, "origin": None},
    "routing key and priority": {"routing_key": "payments.eu", "priority": 5, "exchange": "tasks"},
    "declared queues": {"declare": [Queue("payments", Exchange("tasks", type="topic"))]},
}


def upstream_attributes(request: TaskRequest) -> dict[str, Any]:
    """The attributes the instrumentation's helper sets on an SDK span for ``request``."""
    span = TracerProvider().get_tracer("reference").start_span("run/shop.charge")
    set_attributes_from_context(span, request)
    return dict(span.attributes)


@pytest.mark.parametrize("label", REQUESTS)
def test_run_span_attributes_equal_the_instrumentations(label: str) -> None:
    """Same names, same values (strings, numbers, sequences), for every shape of task request."""
    request = TaskRequest({**BASE, **REQUESTS[label]})
    ours = request_attributes(request)
    reference = TracerProvider().get_tracer("ours").start_span("run/shop.charge")
    reference.set_attributes(ours)  # validated as the SDK validates what the helper sets
    assert dict(reference.attributes) == upstream_attributes(request)
    assert ours["messaging.message.id"] == "3f1c"
