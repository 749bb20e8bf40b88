"""A local OTLP/HTTP sink for the HTTP load benchmark: accepts every export and counts what it got.

    python -m benchmarks.otlp_sink --port PORT

It answers ``POST /v1/traces``, ``/v1/metrics`` and ``/v1/logs`` with 200 (protobuf, optionally
gzip), and ``GET /counts`` with a JSON object of the requests, bytes and spans received so far.
It runs as its own process so that the server under test pays for serialising and sending its
telemetry, not for receiving it; trace requests are kept as they came and decoded (to count their
spans, which also checks that they parse) only when ``/counts`` is asked, between timed phases,
so that the sink takes as little as it can of the CPU the server shares with it during one.
"""

from __future__ import annotations

import argparse
import gzip
import json
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

__all__ = ["Counts", "main"]


class Counts:
    """What the sink has received, per signal, under a lock; trace requests wait to be counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[str, int] = {
            "trace_requests": 0,
            "metric_requests": 0,
            "log_requests": 0,
            "bytes": 0,
            "spans": 0,
        }
        self._uncounted: list[bytes] = []

    def add(self, trace_request: bytes | None = None, **amounts: int) -> None:
        """Add ``amounts`` to the counters of the same names; keep ``trace_request`` to count its spans later."""
        with self._lock:
            for key, amount in amounts.items():
                self.values[key] += amount
            if trace_request is not None:
                self._uncounted.append(trace_request)

    def snapshot(self) -> dict[str, int]:
        """A copy of the counters, with the spans of every trace request received so far."""
        with self._lock:
            uncounted, self._uncounted = self._uncounted, []
            spans = sum(_span_count(body) for body in uncounted)
            self.values["spans"] += spans
            return dict(self.values)


def _span_count(body: bytes) -> int:
    request = ExportTraceServiceRequest.FromString(body)
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


def serve(port: int) -> None:
    """Serve the sink on 127.0.0.1:``port`` until killed."""
    counts = Counts()
    signals = {"/v1/traces": "trace_requests", "/v1/metrics": "metric_requests", "/v1/logs": "log_requests"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: bytes = b"", content_type: str = "application/x-protobuf") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            signal = signals.get(self.path)
            if signal is None:
                self._answer(404)
                return
            raw = gzip.decompress(body) if self.headers.get("Content-Encoding") == "gzip" else body
            counts.add(raw if signal == "trace_requests" else None, **{signal: 1, "bytes": len(body)})
            self._answer(200)

        def do_GET(self) -> None:
            if self.path != "/counts":
                self._answer(404)
                return
            self._answer(200, json.dumps(counts.snapshot()).encode(), "application/json")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the port and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    serve(parser.parse_args(argv).port)


if __name__ == "__main__":
    main()
