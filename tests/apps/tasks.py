"""A Celery app instrumented the way a user does it: `import spyglass.auto` first, nothing else.

Broker and queue come from CELERY_BROKER_URL and TEST_QUEUE (each test uses a queue of its own);
tasks that count their runs keep the count in the Redis of COUNTER_REDIS_URL (default: the broker).
"""

import spyglass.auto  # noqa: I001 - first, as the docs say

import logging
import os
import signal
import time

import celery
import redis
from celery.exceptions import Reject

import spyglass


def _counters() -> redis.Redis:
    return redis.Redis.from_url(os.environ.get("COUNTER_REDIS_URL") or os.environ["CELERY_BROKER_URL"])


app = celery.Celery("tasks", broker=os.environ["CELERY_BROKER_URL"])
app.conf.task_default_queue = os.environ["TEST_QUEUE"]
app.conf.broker_connection_retry_on_startup = True
if os.environ.get("BEAT_EVERY_SECONDS"):
    app.conf.beat_schedule = {
        "heartbeat": {"task": "tasks.ok", "schedule": float(os.environ["BEAT_EVERY_SECONDS"]), "args": (0,)}
    }


@app.task(name="tasks.ok")
def ok(value: int) -> int:
    """Succeed."""
    return value


@app.task(name="tasks.boom")
def boom() -> None:
    """Fail with a KeyError."""
    raise KeyError("missing")


@app.task(bind=True, name="tasks.flaky", max_retries=3, default_retry_delay=0)
def flaky(self: celery.Task, key: str) -> int:
    """Ask for a retry on the first run (counted in Redis), succeed on the second."""
    runs = _counters().incr(key)
    if runs < 2:
        raise self.retry(countdown=0)
    return runs


@app.task(name="tasks.chatty")
def chatty(order_id: int) -> None:
    """Log through structlog and through the standard library."""
    spyglass.get_logger("tasks").info("charging order", order_id=order_id)
    logging.getLogger("tasks.stdlib").warning("slow payment provider")


@app.task(name="tasks.stuck", time_limit=1)
def stuck() -> None:
    """Run past its hard time limit: the main process kills the pool process."""
    time.sleep(30)


@app.task(name="tasks.crash")
def crash(key: str) -> str:
    """Kill the pool process running it (SIGKILL) on the first delivery."""
    if _counters().incr(key) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


@app.task(name="tasks.sleepy")
def sleepy() -> None:
    """Run for a long time (until revoked with terminate=True)."""
    time.sleep(60)


@app.task(name="tasks.refuse")
def refuse() -> None:
    """Reject its message without requeueing it."""
    raise Reject("not for us", requeue=False)


@app.task(name="tasks.crash_late", acks_late=True, reject_on_worker_lost=True)
def crash_late(key: str) -> str:
    """Like crash, with the message acknowledged late and requeued when its pool process is lost."""
    if _counters().incr(key) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return "delivered again"


@app.task(name="tasks.nap")
def nap(seconds: float) -> None:
    """Sleep a while (keeps a pool process busy)."""
    time.sleep(seconds)
