"""gunicorn config for prometheus-flask-exporter in multi-process mode, as its documentation sets it up.

The master serves the endpoint on ``BENCH_PFE_METRICS_PORT`` once it is ready, and marks exited
workers dead so their live gauges go; ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory) is set by
the benchmark before gunicorn starts.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

__all__ = ["child_exit", "when_ready"]


def when_ready(server: Any) -> None:
    """Master: serve the metrics of every worker from the multi-process directory."""
    GunicornPrometheusMetrics.start_http_server_when_ready(int(os.environ["BENCH_PFE_METRICS_PORT"]), host="127.0.0.1")


def child_exit(server: Any, worker: Any) -> None:
    """Master: a worker exited; drop its live gauges."""
    GunicornPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)
