"""The demo load generator (`demo_app.load`) against a tiny fake of the shop API on loopback."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from demo_app import load
from demo_app.load import MixEntry

RATE, SECONDS = 40.0, 2.0
BAD = ("bad: malformed json", "bad: negative quantity", "bad: unknown product", "bad: oversized body")
LINE = re.compile(
    r"^requests \d+ \(\d+\.\d/s\)  2xx \d+  4xx \d+  5xx \d+  failed \d+  "
    r"p50 \d+\.\d ms  p95 \d+\.\d ms  p99 \d+\.\d ms"
)


class FakeShop(ThreadingHTTPServer):
    """Answers like the shop: orders get ids, bad orders 4xx, product 9999 is missing, anything else 200 {}."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ShopHandler)
        self.lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.order_ids: list[int] = []
        self.order_reads: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ShopHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeShop

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        with self.server.lock:
            self.server.statuses[status] += 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/products/9999":
            return self.reply(404, {"error": "no such product"})
        if match := re.fullmatch(r"/orders/(\d+)", path):
            with self.server.lock:
                self.server.order_reads.append(int(match[1]))
        return self.reply(200, {})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)  # read even an oversized body, so the client is not cut off mid-send
        if self.path == "/reports/sales":
            return self.reply(202, {"report_id": "r1"})
        if self.path != "/orders":
            return self.reply(200, {})
        if length > 64 * 1024:
            return self.reply(413, {"error": "too large"})
        try:
            order = json.loads(raw)
        except ValueError:
            return self.reply(400, {"error": "malformed JSON"})
        if any(item["quantity"] < 1 or not 1 <= item["product_id"] <= 50 for item in order["items"]):
            return self.reply(422, {"error": "invalid order"})
        with self.server.lock:
            self.server.order_ids.append(len(self.server.order_ids) + 1)
            order_id = self.server.order_ids[-1]
        return self.reply(202, {"order_id": order_id, "status": "pending"})


@pytest.fixture
def shop() -> Iterator[FakeShop]:
    server = FakeShop()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_the_default_mix_runs_at_the_rate_and_reports_percentiles(
    shop: FakeShop, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default mix is sent at about rate x seconds requests, every answer is counted in its class (the fake
    shop sends no 5xx, so none are counted), and the summary line printed to stderr carries p50/p95/p99.
    """
    progress = load.run(shop.url, rate=RATE, seconds=SECONDS, seed=7)

    expected = RATE * SECONDS
    assert 0.65 * expected <= progress.sent <= 1.35 * expected, progress.line()
    assert progress.sent == sum(shop.statuses.values())
    assert progress.ok + progress.client_errors + progress.server_errors + progress.failed == progress.sent
    assert progress.client_errors == sum(n for status, n in shop.statuses.items() if 400 <= status < 500)
    assert progress.server_errors == progress.failed == progress.skipped == 0
    assert len(progress.latencies) == progress.sent
    assert LINE.match(progress.line()), progress.line()
    summary = capsys.readouterr().err.splitlines()
    assert summary and LINE.match(summary[-1]), summary  # stderr is no TTY here: plain lines, the summary last


def test_bad_requests_get_4xx_and_count_as_client_errors(shop: FakeShop, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kind of deliberately bad request (and the missing product) is answered 4xx by the shop and counted
    in client_errors, not in server_errors or failed.
    """
    names = (*BAD, "missing product")
    monkeypatch.setattr(load, "MIX", tuple(MixEntry(1, name) for name in names))

    progress = load.run(shop.url, rate=RATE, seconds=SECONDS, quiet=True, seed=1)

    assert progress.sent >= 0.65 * RATE * SECONDS, progress.line()
    assert progress.client_errors == progress.sent
    assert progress.ok == progress.server_errors == progress.failed == 0
    assert set(shop.statuses) == {400, 404, 413, 422}
    statuses_by_name: dict[str, set[int]] = {}
    for (name, status), _count in progress.outcomes.items():
        statuses_by_name.setdefault(name, set()).add(status)
    assert statuses_by_name == {
        "bad: malformed json": {400},
        "bad: negative quantity": {422},
        "bad: unknown product": {422},
        "bad: oversized body": {413},
        "missing product": {404},
    }


def test_placed_orders_are_read_back_by_id(shop: FakeShop, monkeypatch: pytest.MonkeyPatch) -> None:
    """Order ids from the 202 answers to POST /orders are remembered and later read with GET /orders/<id>; only
    ids the shop handed out are read.
    """
    monkeypatch.setattr(load, "MIX", (MixEntry(1, "place order"), MixEntry(1, "order detail")))

    progress = load.run(shop.url, rate=RATE, seconds=SECONDS, quiet=True, seed=3)

    assert progress.outcomes["place order", 202] == len(shop.order_ids) > 0
    assert progress.outcomes["order detail", 200] == len(shop.order_reads) > 0
    assert set(shop.order_reads) <= set(shop.order_ids)
    assert progress.server_errors == progress.failed == 0
