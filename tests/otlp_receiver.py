"""A real OTLP/HTTP receiver (protobuf) on loopback, for tests that export traces or logs to it."""

from __future__ import annotations

import gzip
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

__all__ = ["OtlpReceiver"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class OtlpReceiver:
    """Keeps every export request it is sent; listens on ``port`` (any free port by default).

    ``keep=False`` counts spans without keeping the requests, for long runs. With ``tls`` (an
    ``ssl.SSLContext`` holding the server's certificate) it speaks HTTPS.
    """

    def __init__(self, port: int = 0, keep: bool = True, tls: ssl.SSLContext | None = None) -> None:
        self.logs: list[ExportLogsServiceRequest] = []
        self.traces: list[ExportTraceServiceRequest] = []
        self.span_count = 0
        self._count_lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/logs":
                    receiver.logs.append(ExportLogsServiceRequest.FromString(body))
                elif self.path == "/v1/traces":
                    receiver.received_traces(ExportTraceServiceRequest.FromString(body), keep)
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = _Server(("127.0.0.1", port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received_traces(self, request: ExportTraceServiceRequest, keep: bool) -> None:
        """Count (and keep) one trace export request."""
        spans = sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        with self._count_lock:
            self.span_count += spans
        if keep:
            self.traces.append(request)

    def log_records(self) -> list[tuple[dict[str, str], str, object]]:
        """(resource attributes, scope name, record) of every record received."""
        found = []
        for request in list(self.logs):
            for resource_logs in request.resource_logs:
                resource = {kv.key: kv.value.string_value for kv in resource_logs.resource.attributes}
                for scope_logs in resource_logs.scope_logs:
                    for record in scope_logs.log_records:
                        found.append((resource, scope_logs.scope.name, record))
        return found

    def span_trace_ids(self) -> set[str]:
        """The trace ids of every span received."""
        return {
            span.trace_id.hex()
            for request in list(self.traces)
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        }

    def close(self) -> None:
        """Stop listening; the port is free again."""
        self.server.shutdown()
        self.server.server_close()
