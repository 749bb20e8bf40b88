"""The Flask app that :mod:`benchmarks.http_load` serves with gunicorn: ``benchmarks.load_app:app``.

One route with a path parameter returning a small JSON document, so that every instrumentation
has a route template to name (``/items/<int:item_id>``) and a body to serialise, and the server
does little else: the worst case for relative overhead. With ``BENCH_PROMETHEUS_FLASK_EXPORTER=1``
the app is wrapped by prometheus-flask-exporter's multi-process class, as its documentation says
to do under gunicorn (its endpoint is served by :mod:`benchmarks.load_gunicorn_pfe`); with
``BENCH_FLOOR=1`` it is wrapped by the floor (:mod:`benchmarks.floor`: an SDK span exported over
OTLP/HTTP by the SDK's exporter, a histogram observation in prometheus_client's multi-process
directory, a structlog bind).
"""

from __future__ import annotations

import os

import flask

__all__ = ["app"]

app = flask.Flask("bench")


@app.get("/items/<int:item_id>")
def item(item_id: int) -> dict[str, object]:
    """A small JSON document about one item."""
    return {"id": item_id, "name": f"item {item_id}", "in_stock": item_id % 3 != 0}


if os.environ.get("BENCH_FLOOR") == "1":  # imported in each worker, after the fork (no preload)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from prometheus_client import CollectorRegistry

    from benchmarks.floor import floor_middleware

    # The SDK's tracer provider shuts down (flushing its spans) when the worker exits.
    app.wsgi_app, _provider = floor_middleware(  # type: ignore[method-assign]
        app.wsgi_app, OTLPSpanExporter(), "/items/<int:item_id>", CollectorRegistry()
    )

if os.environ.get("BENCH_PROMETHEUS_FLASK_EXPORTER") == "1":
    from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

    GunicornPrometheusMetrics(app)
