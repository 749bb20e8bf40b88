"""gunicorn server hooks: ``gunicorn -c python:spyglass.gunicorn app:app``.

The master owns the multi-process metrics directory and serves one metrics endpoint that sums
every worker; each worker sets up its telemetry after the fork (so no exporter thread or lock is
inherited) and flushes its spans when it exits, so ``max_requests`` recycling loses none.
gunicorn's own log lines go through the spyglass JSON pipeline.

To keep an existing config, import the hooks into it::

    from spyglass.gunicorn import child_exit, logger_class, on_exit, on_starting, post_fork, worker_exit

(chain them from your own functions if you already define a hook of the same name).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from gunicorn.glogging import Logger

from spyglass import runtime
from spyglass.config import load_settings
from spyglass.metrics import multiprocess

__all__ = [
    "MetricsPortClash",
    "SpyglassLogger",
    "child_exit",
    "logger_class",
    "on_exit",
    "on_starting",
    "post_fork",
    "worker_exit",
]


class SpyglassLogger(Logger):
    """gunicorn's logger, sending its error and access records through the spyglass pipeline."""

    def setup(self, cfg: Any) -> None:
        """Let gunicorn configure its loggers, then hand their records to the root handler."""
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True


logger_class = SpyglassLogger


class MetricsPortClash(RuntimeError):
    """``SPYGLASS_METRICS_PORT`` is a port gunicorn is told to serve the application on.

    A ``RuntimeError``: gunicorn prints its message and exits with status 1, before binding anything.
    """


def on_starting(server: Any) -> None:
    """Master, before any worker: prepare the metrics directory and serve the endpoint.

    Refuses to start (:class:`MetricsPortClash`) when the metrics port is one the app is bound to:
    the endpoint would take the app's port and gunicorn would fail to bind it.
    """
    settings = load_settings()
    app_ports = {address[1] for address in getattr(server.cfg, "address", []) if isinstance(address, tuple)}
    if not settings.disabled and settings.metrics_port and settings.metrics_port in app_ports:
        raise MetricsPortClash(
            f"SPYGLASS_METRICS_PORT={settings.metrics_port} is the port gunicorn serves the application on; "
            "give the metrics endpoint a port of its own"
        )
    runtime.init(settings, role="master")


def post_fork(server: Any, worker: Any) -> None:
    """Worker, right after the fork: record telemetry into the shared directory, instrument Flask."""
    runtime.mark_worker()
    runtime.init(role="worker")
    try:
        from spyglass.integrations.flask import install_auto_instrumentation
    except ImportError:  # pragma: no cover - gunicorn serving something other than Flask
        return
    install_auto_instrumentation()


def worker_exit(server: Any, worker: Any) -> None:
    """Worker, on its way out (including ``max_requests`` recycling): export pending spans and log lines."""
    runtime.shutdown()


def child_exit(server: Any, worker: Any) -> None:
    """Master, after a worker exited (or was killed): fold its metric files into the totals."""
    state = runtime.current()
    if state is not None and state.metrics_dir:
        try:
            multiprocess.compact_dead_process(worker.pid, state.metrics_dir)
        except OSError as exc:
            logging.getLogger("spyglass.metrics").warning(
                "could not fold an exited worker's metrics", extra={"pid": worker.pid, "error": str(exc)}
            )


def on_exit(server: Any) -> None:
    """Master, when gunicorn stops: stop the endpoint and remove a temporary metrics directory."""
    state = runtime.current()
    directory = state.metrics_dir if state is not None else None
    runtime.shutdown()
    if directory and os.path.dirname(directory) == tempfile.gettempdir() and "spyglass-metrics-" in directory:
        shutil.rmtree(directory, ignore_errors=True)
