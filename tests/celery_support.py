"""Real Celery workers for the tests: started on the real broker with the tests' task app, read by scrape."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, clean_environment, free_port, wait_for, wait_for_port

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


VENV_BIN = Path(sys.executable).parent


@dataclass
class Worker:
    process: subprocess.Popen
    metrics_port: int
    queue: str
    log_path: Path

    def samples(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of one scrape, keyed by name and labels."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def exemplar_trace_ids(self, family: str) -> set[str]:
        """Trace ids of the exemplars on ``family``'s buckets (OpenMetrics exposition)."""
        response = requests.get(
            f"http://127.0.0.1:{self.metrics_port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
            timeout=10,
        )
        return {
            sample.exemplar.labels["trace_id"]
            for parsed in parse_openmetrics(response.text)
            if parsed.name == family
            for sample in parsed.samples
            if sample.exemplar is not None
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples().get((name, frozenset({"queue": self.queue, **labels}.items())), 0.0)


def start_worker(tmp: Path, redis_url: str, *args: str, **env_overrides: str) -> Worker:
    """A prefork worker (concurrency 2) on its own queue, ready, with its metrics endpoint answering.

    ``args`` are added to the ``celery worker`` command line (a later ``--pool`` or ``--concurrency`` wins).
    """
    queue = f"spyglass-worker-{uuid.uuid4().hex[:10]}"
    metrics_port = free_port()
    env = clean_environment()
    env.update(
        CELERY_BROKER_URL=redis_url,
        TEST_QUEUE=queue,
        OTEL_SERVICE_NAME="worker",
        OTEL_TRACES_EXPORTER="none",
        SPYGLASS_METRICS_PORT=str(metrics_port),
        SPYGLASS_METRICS_DIR=str(tmp / "metrics"),
        PYTHONPATH=str(REPO),
    )
    env.update(env_overrides)
    log_path = tmp / "worker.log"
    command = [
        str(VENV_BIN / "celery"),
        "-A",
        "tests.apps.tasks",
        "worker",
        "--pool=prefork",
        "--concurrency=2",
        "-Q",
        queue,
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
        "--loglevel=INFO",
        *args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    worker = Worker(process, metrics_port, queue, log_path)
    try:
        wait_for_port(metrics_port, process, timeout=60)
        if not any(arg.startswith("--loglevel=") and arg != "--loglevel=INFO" for arg in args):  # "ready" is info
            assert wait_for(lambda: b"ready" in log_path.read_bytes(), timeout=60), "worker never became ready"
    except Exception:
        stop_worker(worker)
        raise RuntimeError("celery worker did not start:\n" + log_path.read_text()) from None
    return worker


def stop_worker(worker: Worker) -> None:
    """Warm shutdown (SIGTERM), killed if it takes over 30 s."""
    if worker.process.poll() is None:
        worker.process.send_signal(signal.SIGTERM)
        try:
            worker.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


def completed(worker: Worker, task: str, outcome: str) -> float:
    """``celery_task_completed_total`` of one task and outcome on the worker's queue."""
    return worker.value("celery_task_completed_total", task_name=task, outcome=outcome)
