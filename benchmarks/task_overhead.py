"""The subprocess side of the per-task CPU benchmark: one variant, measured in a fresh process.

Run by :mod:`benchmarks.run` as::

    python -m benchmarks.task_overhead VARIANT --traces-file PATH --result PATH [--warmup N] [--requests N]

The process imports :mod:`benchmarks.celery_app` instrumented as ``VARIANT`` says and runs its
no-op task the way a prefork pool process does: through Celery's own task tracer
(``celery.app.trace.build_tracer``), which sends ``task_prerun``, ``task_success`` and
``task_postrun`` around the task body, with a request as the worker builds it from a message.
Every variant logs the line a worker at ``--loglevel=INFO`` logs per task (to stdout, which the
parent sends to ``/dev/null``). No broker and no message: what is measured is the CPU each
instrumentation spends per task in the process that runs it. The result is JSON with the same
keys as :mod:`benchmarks.http_overhead`'s (``thread_us``, ``process_us``, per task), so
:mod:`benchmarks.run` reports both alike.

Variants:

``baseline``
    Celery alone.
``spyglass``
    ``import spyglass.auto`` (the run span exported to an OTLP/JSON file, task metrics in a
    multi-process directory as in a pool process, Celery's log lines as JSON).
``otel-celery``
    opentelemetry-instrumentation-celery with the SDK (batch spans to the same file exporter).
``floor``
    Celery alone plus the unavoidable parts, in ``task_prerun``/``task_postrun`` receivers: one
    CONSUMER span through the SDK, one observation of a task-labelled prometheus_client
    histogram, one structlog context bind of the ids.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.floor import BUCKETS

__all__ = ["VARIANTS", "main", "measure", "variant_environment"]

VARIANTS = ("baseline", "spyglass", "otel-celery", "floor")
_CELERY_VARIANT = {"baseline": "baseline", "spyglass": "spyglass", "otel-celery": "otel-celery", "floor": "baseline"}
TEXT_LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
"""Celery's own worker log format (``worker_task_log_format`` without the task fields)."""


def variant_environment(name: str, traces_file: str, metrics_dir: str) -> dict[str, str]:
    """The variables a variant's process starts with (on top of a clean environment)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    environment = {
        "BENCH_CELERY_VARIANT": _CELERY_VARIANT[name],
        "BENCH_TRACES_FILE": traces_file,
        "OTEL_BSP_MAX_QUEUE_SIZE": "65536",
    }
    if name == "spyglass":
        environment.update(
            {
                "OTEL_SERVICE_NAME": "bench-worker",
                "OTEL_TRACES_EXPORTER": "otlp_json_file",
                "SPYGLASS_TRACES_FILE": traces_file,
                "OTEL_TRACES_SAMPLER": "always_on",
                "SPYGLASS_METRICS_PORT": "0",
                "SPYGLASS_METRICS_DIR": metrics_dir,
            }
        )
    return environment


def _install_floor(traces_file: str) -> tuple[Callable[[], object], Callable[[], None]]:
    """Connect the floor's receivers; return what flushes its spans and what shuts its provider down."""
    import structlog
    from celery import signals
    from opentelemetry import context, trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from prometheus_client import CollectorRegistry, Histogram

    from spyglass.otlp_json import OtlpJsonFileSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "bench-worker"}))
    provider.add_span_processor(BatchSpanProcessor(OtlpJsonFileSpanExporter(traces_file)))
    tracer = provider.get_tracer("bench.floor")
    runtime = Histogram(
        "celery_task_runtime_seconds",
        "Task runtime.",
        ["task_name", "state"],
        buckets=BUCKETS,
        registry=CollectorRegistry(),
    )
    runs: dict[str, tuple[Any, object, dict[str, Any], float]] = {}

    def started(task_id: str, task: Any, **_extra: Any) -> None:
        span = tracer.start_span(
            f"run {task.name}",
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "celery",
                "messaging.operation.type": "process",
                "celery.task_name": task.name,
            },
        )
        token = context.attach(trace.set_span_in_context(span))
        ids = span.get_span_context()
        bound = structlog.contextvars.bind_contextvars(trace_id=f"{ids.trace_id:032x}", span_id=f"{ids.span_id:016x}")
        runs[task_id] = (span, token, bound, time.perf_counter())

    def finished(task_id: str, task: Any, state: str | None = None, **_extra: Any) -> None:
        span, token, bound, began = runs.pop(task_id)
        structlog.contextvars.reset_contextvars(**bound)
        context.detach(token)  # type: ignore[arg-type]
        span.end()
        runtime.labels(task.name, state or "SUCCESS").observe(time.perf_counter() - began)

    signals.task_prerun.connect(started, weak=False)
    signals.task_postrun.connect(finished, weak=False)
    return provider.force_flush, provider.shutdown


def measure(name: str, traces_file: str, warmup: int, tasks: int) -> dict[str, float]:
    """Run ``warmup`` then ``tasks`` no-op tasks through Celery's tracer; CPU per timed task (µs)."""
    from celery.app.trace import build_tracer

    from benchmarks import celery_app

    flush: Callable[[], object] = lambda: None  # noqa: E731
    shutdown: Callable[[], None] = celery_app.instrument_publisher()
    if name != "spyglass":
        # A worker at --loglevel=INFO logs a line per task; spyglass writes it as JSON, the others as text.
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format=TEXT_LOG_FORMAT)
    if name == "floor":
        flush, shutdown = _install_floor(traces_file)
    elif name == "spyglass":
        from spyglass import runtime

        def flush() -> None:
            telemetry = runtime.current()
            if telemetry is not None:
                telemetry.flush()

    app = celery_app.app
    app.finalize()
    task = app.tasks["bench.noop"]
    tracer = build_tracer(task.name, task, app=app, hostname="bench@localhost")
    ids = [str(uuid.uuid4()) for _ in range(warmup + tasks)]

    def run(task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            request = {
                "id": task_id,
                "task": task.name,
                "hostname": "bench@localhost",
                "delivery_info": {"exchange": "", "routing_key": "celery", "priority": 0, "redelivered": False},
                "reply_to": None,
                "correlation_id": task_id,
            }
            tracer(task_id, (), {}, request)

    run(ids[:warmup])
    flush()
    gc.collect()
    thread_start, process_start = time.thread_time(), time.process_time()
    run(ids[warmup:])
    thread_end = time.thread_time()
    shutdown()
    process_end = time.process_time()
    scale = 1e6 / tasks
    return {"thread_us": (thread_end - thread_start) * scale, "process_us": (process_end - process_start) * scale}


def main(argv: Sequence[str] | None = None) -> None:
    """Measure one variant and write the result as JSON to ``--result``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--traces-file", required=True, help="where span exporters write (must not exist yet)")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--requests", type=int, default=20_000, help="timed tasks")
    args = parser.parse_args(argv)
    if os.environ.get("BENCH_CELERY_VARIANT") != _CELERY_VARIANT[args.variant]:
        parser.error("start this process with the environment of variant_environment()")
    result: dict[str, Any] = {"variant": args.variant, "warmup": args.warmup, "requests": args.requests}
    result.update(measure(args.variant, args.traces_file, args.warmup, args.requests))
    # The parent counts the spans (as for benchmarks.http_overhead): not in the counted process.
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
