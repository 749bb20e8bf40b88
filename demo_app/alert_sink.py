"""A webhook receiver for Alertmanager that keeps what it receives: the stack's stand-in for a pager.

``POST /webhook/<receiver>`` takes an Alertmanager notification (webhook payload version 4),
keeps it in memory (the most recent ``--keep``) and logs one JSON line per alert in it.
``GET /notifications`` returns the kept notifications, oldest first, each with the receiver it
came to and when; ``?receiver=page`` filters. ``DELETE /notifications`` forgets them (tests use it
between scenarios). ``GET /healthz`` answers 200.

    python -m demo_app.alert_sink --host 127.0.0.1 --port 9095
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["AlertSink", "main"]

MAX_BODY_BYTES = 1 << 20


class AlertSink:
    """The notifications received, bounded, safe to use from the server's threads."""

    def __init__(self, keep: int = 1000, log: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._notifications: deque[dict[str, Any]] = deque(maxlen=keep)
        self._log = log or _print_json_line

    def receive(self, receiver: str, payload: dict[str, Any]) -> None:
        """Keep one notification and log a line per alert in it."""
        entry = {"receiver": receiver, "received_at": time.time(), "payload": payload}
        with self._lock:
            self._notifications.append(entry)
        for alert in payload.get("alerts") or []:
            labels = alert.get("labels") or {}
            self._log(
                {
                    "event": "alert notification",
                    "receiver": receiver,
                    "status": alert.get("status"),
                    "alertname": labels.get("alertname"),
                    "severity": labels.get("severity"),
                    "labels": labels,
                    "summary": (alert.get("annotations") or {}).get("summary"),
                }
            )

    def notifications(self, receiver: str | None = None) -> list[dict[str, Any]]:
        """The notifications kept, oldest first, optionally those of one receiver."""
        with self._lock:
            kept = list(self._notifications)
        return [entry for entry in kept if receiver is None or entry["receiver"] == receiver]

    def clear(self) -> None:
        """Forget every notification."""
        with self._lock:
            self._notifications.clear()


def _print_json_line(fields: dict[str, Any]) -> None:
    fields = {**fields, "logger": "alert_sink", "level": "info", "timestamp": time.time()}
    print(json.dumps(fields), flush=True)


def _handler(sink: AlertSink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # the http.server interface
            url = urlsplit(self.path)
            if url.path == "/healthz":
                self._answer(200, {"status": "ok"})
            elif url.path == "/notifications":
                receiver = parse_qs(url.query).get("receiver", [None])[0]
                self._answer(200, sink.notifications(receiver))
            else:
                self._answer(404, {"error": "not found"})

        def do_DELETE(self) -> None:  # the http.server interface
            if urlsplit(self.path).path == "/notifications":
                sink.clear()
                self._answer(200, {"status": "cleared"})
            else:
                self._answer(404, {"error": "not found"})

        def do_POST(self) -> None:  # the http.server interface
            path = urlsplit(self.path).path
            prefix = "/webhook/"
            if not path.startswith(prefix) or not path[len(prefix) :].isidentifier():
                self._answer(404, {"error": "post to /webhook/<receiver>"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._answer(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
                return
            try:
                payload = json.loads(self.rfile.read(length) or b"null")
            except ValueError:
                payload = None
            if not isinstance(payload, dict):
                self._answer(400, {"error": "expected an Alertmanager webhook notification (a JSON object)"})
                return
            sink.receive(path[len(prefix) :], payload)
            self._answer(200, {"status": "received"})

        def log_message(self, *args: object) -> None:
            pass  # one JSON line per alert instead of an access line per request

    return Handler


def serve(host: str, port: int, sink: AlertSink) -> ThreadingHTTPServer:
    """A server for ``sink`` bound to ``host:port`` (not yet serving: call ``serve_forever``)."""
    return ThreadingHTTPServer((host, port), _handler(sink))


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m demo_app.alert_sink", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=9095, help="port (%(default)s)")
    parser.add_argument("--keep", type=int, default=1000, help="notifications kept in memory (%(default)s)")
    args = parser.parse_args(argv)
    server = serve(args.host, args.port, AlertSink(args.keep))
    print(json.dumps({"event": "alert sink listening", "host": args.host, "port": args.port}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
