"""The subprocess side of the HTTP overhead benchmark: one variant, measured in a fresh process.

Run by :mod:`benchmarks.run` as::

    python -m benchmarks.http_overhead VARIANT --traces-file PATH --result PATH [--warmup N] [--requests N]

The process builds a Flask "hello" app for ``VARIANT``, calls it as a WSGI server would (a copy of
one ``GET /`` environ per request, the body iterated and closed), and writes its measurements as
JSON to ``--result``. Its stdout is expected to be ``/dev/null``: spyglass writes one access-log
line per request there. Instrumentation installs process-global state, so a process measures
exactly one variant; the environment a variant needs is given by :func:`variant_environment` and
set by the parent before the process starts, the way a user configures a service.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import flask
    from opentelemetry.sdk.metrics.export import MetricExporter

__all__ = ["VARIANTS", "Variant", "count_spans", "main", "measure", "variant_environment"]


def _nothing() -> None:
    """Flush or shut down a variant that holds nothing in the background."""


@dataclass
class Variant:
    """An app ready to serve, with how to flush and stop what its instrumentation runs in the background."""

    app: flask.Flask | Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
    flush: Callable[[], None] = _nothing
    shutdown: Callable[[], None] = _nothing


def _hello_app() -> flask.Flask:
    """Build the application under test: one route returning a short text body."""
    import flask

    app = flask.Flask("bench")

    @app.get("/")
    def hello() -> str:
        return "hello"

    return app


def build_baseline(_traces_file: str) -> Variant:
    """Build the app without any instrumentation."""
    return Variant(_hello_app())


def build_spyglass(_traces_file: str) -> Variant:
    """Build the app instrumented as a user does: ``import spyglass.auto`` first, configured by the environment.

    The traces file, sampler and the rest come from the variables of :func:`variant_environment`.
    """
    import spyglass.auto  # initialises spyglass and instruments every Flask app of the process
    from spyglass import runtime

    app = _hello_app()

    def flush() -> None:
        telemetry = runtime.current()
        if telemetry is not None:
            telemetry.flush()

    return Variant(app, flush=flush, shutdown=spyglass.shutdown)


def _discarding_metric_exporter() -> MetricExporter:
    """Return a metric exporter that accepts every batch and drops it (the metrics are still recorded)."""
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

    class DiscardingMetricExporter(MetricExporter):
        def export(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
        ) -> MetricExportResult:
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            return None

    return DiscardingMetricExporter()


def build_otel_flask(traces_file: str) -> Variant:
    """Build the app instrumented by ``opentelemetry-instrumentation-flask`` with the OpenTelemetry SDK.

    Spans go through a ``BatchSpanProcessor`` (SDK defaults) to spyglass's own OTLP/JSON file
    exporter, so that export costs the same as in the spyglass variants; HTTP metrics are recorded
    by an SDK ``MeterProvider`` whose periodic reader (default 60 s interval) exports to a sink.
    """
    from opentelemetry import metrics, trace
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from spyglass.otlp_json import OtlpJsonFileSpanExporter

    resource = Resource.create({"service.name": "bench"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OtlpJsonFileSpanExporter(traces_file)))
    meter_provider = MeterProvider(
        resource=resource, metric_readers=[PeriodicExportingMetricReader(_discarding_metric_exporter())]
    )
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    app = _hello_app()
    FlaskInstrumentor().instrument_app(app)

    def flush() -> None:
        tracer_provider.force_flush()

    def shutdown() -> None:
        tracer_provider.shutdown()
        meter_provider.shutdown()

    return Variant(app, flush=flush, shutdown=shutdown)


def build_floor(traces_file: str) -> Variant:
    """Build the app wrapped by the floor (:mod:`benchmarks.floor`), its spans to the same file exporter."""
    from benchmarks.floor import floor_middleware
    from spyglass.otlp_json import OtlpJsonFileSpanExporter

    app, provider = floor_middleware(_hello_app().wsgi_app, OtlpJsonFileSpanExporter(traces_file), "/")
    return Variant(app, flush=provider.force_flush, shutdown=provider.shutdown)


def build_prometheus_flask_exporter(_traces_file: str) -> Variant:
    """Build the app with ``prometheus-flask-exporter``'s default metrics (and its ``/metrics`` route)."""
    from prometheus_flask_exporter import PrometheusMetrics

    app = _hello_app()
    PrometheusMetrics(app)
    return Variant(app)


VARIANTS: dict[str, Callable[[str], Variant]] = {
    "baseline": build_baseline,
    "spyglass": build_spyglass,
    "spyglass-10pct": build_spyglass,
    "spyglass-no-log": build_spyglass,
    "spyglass-metrics-only": build_spyglass,
    "otel-flask": build_otel_flask,
    "prometheus-flask-exporter": build_prometheus_flask_exporter,
    "floor": build_floor,
}


def variant_environment(name: str, traces_file: str) -> dict[str, str]:
    """Return the variables a variant's process is started with (on top of a clean environment).

    Both tracing variants get a span queue larger than a run produces: a loop without I/O starves
    the export thread of the GIL, and a dropped span would be export work left unpaid.
    """
    queue = {"OTEL_BSP_MAX_QUEUE_SIZE": "65536"}
    spyglass = {
        **queue,
        "OTEL_SERVICE_NAME": "bench",
        "OTEL_TRACES_EXPORTER": "otlp_json_file",
        "SPYGLASS_TRACES_FILE": traces_file,
        "OTEL_TRACES_SAMPLER": "always_on",
        "SPYGLASS_METRICS_PORT": "0",
        "SPYGLASS_EXCLUDED_URLS": "",
    }
    if name == "spyglass":
        return spyglass
    if name == "spyglass-no-log":
        return {**spyglass, "SPYGLASS_ACCESS_LOG": "false"}
    if name == "spyglass-metrics-only":
        return {**spyglass, "SPYGLASS_ACCESS_LOG": "false", "OTEL_SDK_DISABLED": "true"}
    if name == "spyglass-10pct":
        return {**spyglass, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    if name == "floor":
        return queue
    if name == "otel-flask":
        return {**queue, "OTEL_SERVICE_NAME": "bench", "OTEL_SEMCONV_STABILITY_OPT_IN": "http"}
    if name in VARIANTS:
        return {}
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
    """Check the status (a WSGI ``start_response`` that sends nothing)."""
    if not status.startswith("200"):
        raise RuntimeError(f"GET / answered {status}")
    return _discard


def _discard(_data: bytes) -> None:
    """Drop data (the ``write`` callable of :func:`_start_response`, unused by Flask)."""


def _serve(app: Callable[[dict, Callable[..., Any]], Iterable[bytes]], environ: dict, count: int) -> None:
    """Serve ``count`` requests the way a WSGI server does: fresh environ, body consumed, then closed."""
    for _ in range(count):
        body = app(environ.copy(), _start_response)
        try:
            for _chunk in body:
                pass
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


def _check_response(app: Callable[[dict, Callable[..., Any]], Iterable[bytes]], environ: dict) -> None:
    """Fail unless ``GET /`` returns the expected body (a broken variant must not look fast)."""
    body = app(environ.copy(), _start_response)
    try:
        content = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    if content != b"hello":
        raise RuntimeError(f"GET / returned {content[:80]!r}, expected b'hello'")


def measure(variant: Variant, warmup: int, requests: int) -> dict[str, float]:
    """Serve ``warmup`` then ``requests`` requests and return the CPU cost per timed request (µs).

    ``thread_us`` is the CPU of the request thread during the timed requests; ``process_us`` is the
    CPU of the whole process from the first timed request until the variant is shut down, so
    background export of the timed requests' telemetry is included. Telemetry of the warm-up is
    flushed before the clock starts.
    """
    from werkzeug.test import EnvironBuilder

    environ = EnvironBuilder(path="/").get_environ()
    app = variant.app
    _check_response(app, environ)
    _serve(app, environ, warmup)
    variant.flush()
    gc.collect()

    thread_start, process_start, wall_start = time.thread_time(), time.process_time(), time.perf_counter()
    _serve(app, environ, requests)
    thread_end, process_loop_end, wall_end = time.thread_time(), time.process_time(), time.perf_counter()
    variant.shutdown()
    process_end = time.process_time()

    scale = 1e6 / requests
    return {
        "thread_us": (thread_end - thread_start) * scale,
        "process_us": (process_end - process_start) * scale,
        "process_loop_us": (process_loop_end - process_start) * scale,
        "wall_us": (wall_end - wall_start) * scale,
    }


def count_spans(path: str) -> int | None:
    """Count the spans in an OTLP/JSON lines file; ``None`` if there is no file."""
    file = Path(path)
    if not file.exists():
        return None
    total = 0
    with file.open("rb") as lines:
        for line in lines:
            if line.strip():
                request = json.loads(line)
                for resource_spans in request.get("resourceSpans", []):
                    for scope_spans in resource_spans.get("scopeSpans", []):
                        total += len(scope_spans.get("spans", []))
    return total


def main(argv: Sequence[str] | None = None) -> None:
    """Measure one variant and write the result as JSON to ``--result``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=list(VARIANTS))
    parser.add_argument("--traces-file", required=True, help="where span exporters write (must not exist yet)")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args(argv)

    variant = VARIANTS[args.variant](args.traces_file)
    result: dict[str, Any] = {"variant": args.variant, "warmup": args.warmup, "requests": args.requests}
    result.update(measure(variant, args.warmup, args.requests))
    # The parent counts the spans in --traces-file: parsing it here would add to this process's
    # instruction count (benchmarks.instructions), by more for a variant whose spans are larger.
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
