"""The metrics endpoint: Prometheus text or OpenMetrics (with exemplars), as the scraper asks."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

__all__ = ["MetricsServer", "start_metrics_server"]

_logger = logging.getLogger("spyglass.metrics")


@dataclass
class MetricsServer:
    """A running metrics endpoint."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port actually bound (useful when 0 asked for any free port)."""
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> MetricsServer | None:
    """Serve ``registry`` on ``host:port`` from a daemon thread.

    A port that cannot be bound (another process of the same service already serves it, for
    example) is reported once in the log; the application keeps running without the endpoint.
    """
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        _logger.warning(
            "metrics endpoint not started",
            extra={"metrics.address": f"{host}:{port}", "error": str(exc)},
        )
        return None
    return MetricsServer(server, thread)
