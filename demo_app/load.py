"""Load generator for the demo shop API: a realistic weighted mix of calls at a steady rate.

Usage::

    python -m demo_app.load --url http://127.0.0.1:8000 --rate 20 --seconds 60 [--concurrency 8]

``--seconds inf`` runs until Ctrl-C. From Python, ``run(url, rate, seconds, stop=event)`` does the same and returns
the :class:`Progress` counts (``demo_app.native`` uses it to drive ``make demo``).

The schedule is open-loop: a request is due every ``1 / rate`` seconds whatever the server does, and a small pool of
worker threads (one ``requests.Session`` each, 10 s timeout) sends them. When every worker is busy the due request
is counted as *skipped* rather than queued, so a slow server shows up as latency and skips, never as a backlog.

The mix (see :data:`MIX`) reads products (mostly a popular few, so the cache gets hits) and customers, places
orders and reads them back, lists recent orders (also through the N+1 endpoint), starts sales reports and polls
each once later, and sends about 7 % deliberately bad requests (malformed JSON, negative quantity, unknown product,
oversized body) plus a few requests for a missing product. Those are expected to get 4xx and are counted as 4xx,
not as errors. While running, a progress line is printed to stderr every second (rewritten in place on a terminal,
a new line every 5 s otherwise), and a summary line at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import requests

__all__ = ["DEFAULT_CONCURRENCY", "MIX", "TIMEOUT", "MixEntry", "Progress", "main", "run"]

TIMEOUT = 10.0  # seconds per request
DEFAULT_CONCURRENCY = 8
LATENCY_WINDOW = 5_000  # latencies kept for the percentiles
RECENT_ORDERS = 200  # order ids remembered for reading back

PRODUCT_IDS = range(1, 51)
CUSTOMER_IDS = range(1, 21)
MISSING_PRODUCT_ID = 9999
# Zipf-like popularity: product 1 is asked for most; the first 10 products get about two thirds of the detail reads.
_PRODUCT_POPULARITY = [1.0 / rank for rank in range(1, len(PRODUCT_IDS) + 1)]
_OVERSIZED_BODY = json.dumps(
    {"customer_id": 1, "items": [{"product_id": 1, "quantity": 1}], "note": "x" * 100 * 1024}
).encode()
_REPORT_DELAY = (1.0, 5.0)  # seconds between starting a report and reading it once


class MixEntry(NamedTuple):
    """One kind of request in the load mix: its relative weight and its name."""

    weight: int
    name: str


# Weights add up to 100, so each is a percentage of the requests.
MIX: tuple[MixEntry, ...] = (
    MixEntry(38, "product detail"),
    MixEntry(10, "product list"),
    MixEntry(4, "customer"),
    MixEntry(20, "place order"),
    MixEntry(10, "order detail"),
    MixEntry(5, "recent orders"),
    MixEntry(3, "recent orders n+1"),
    MixEntry(1, "sales report"),
    MixEntry(2, "bad: malformed json"),
    MixEntry(2, "bad: negative quantity"),
    MixEntry(2, "bad: unknown product"),
    MixEntry(1, "bad: oversized body"),
    MixEntry(2, "missing product"),
)


@dataclass
class Progress:
    """Counts and recent latencies of the requests sent so far; safe to update and read from several threads.

    ``sent`` counts completed requests (answered or failed); ``ok`` 2xx and 3xx answers, ``client_errors`` 4xx,
    ``server_errors`` 5xx, ``failed`` connection errors and timeouts, ``skipped`` requests that were due while every
    worker was busy (not sent). ``latencies`` holds the last :data:`LATENCY_WINDOW` request durations in seconds and
    ``outcomes`` counts ``(mix entry name, HTTP status)`` pairs, status 0 for a failed request.
    """

    sent: int = 0
    ok: int = 0
    client_errors: int = 0
    server_errors: int = 0
    failed: int = 0
    skipped: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    outcomes: Counter[tuple[str, int]] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, name: str, status: int | None, seconds: float) -> None:
        """Count one completed request: its mix entry, HTTP status (``None`` if it failed) and duration."""
        with self._lock:
            self.sent += 1
            self.latencies.append(seconds)
            self.outcomes[name, status or 0] += 1
            if status is None:
                self.failed += 1
            elif status >= 500:
                self.server_errors += 1
            elif status >= 400:
                self.client_errors += 1
            else:
                self.ok += 1

    def skip(self) -> None:
        """Count one request that was due but not sent because every worker was busy."""
        with self._lock:
            self.skipped += 1

    def finish(self) -> None:
        """Stop the clock: the rate in :meth:`line` is over the time until now from here on."""
        with self._lock:
            self.finished = time.monotonic()

    def elapsed(self) -> float:
        """Seconds from the start until now (or until :meth:`finish`)."""
        return (self.finished or time.monotonic()) - self.started

    def percentiles(self) -> tuple[float, float, float] | None:
        """The 50th, 95th and 99th percentile of the recent latencies in seconds, or ``None`` with no samples."""
        with self._lock:
            window = list(self.latencies)
        if not window:
            return None
        if len(window) == 1:
            return window[0], window[0], window[0]
        cuts = statistics.quantiles(window, n=100, method="inclusive")
        return cuts[49], cuts[94], cuts[98]

    def line(self) -> str:
        """One line of counts, request rate and latency percentiles, e.g. for a progress display."""
        with self._lock:
            sent, ok, client, server, failed, skipped = (
                self.sent,
                self.ok,
                self.client_errors,
                self.server_errors,
                self.failed,
                self.skipped,
            )
        elapsed = self.elapsed()
        rate = sent / elapsed if elapsed > 0 else 0.0
        cuts = self.percentiles()
        latency = (
            "  ".join(f"p{p} {value * 1e3:.1f} ms" for p, value in zip((50, 95, 99), cuts, strict=True))
            if cuts
            else "p50 -  p95 -  p99 -"
        )
        text = f"requests {sent} ({rate:.1f}/s)  2xx {ok}  4xx {client}  5xx {server}  failed {failed}  {latency}"
        return text + (f"  skipped {skipped}" if skipped else "")


@dataclass
class _Call:
    """One HTTP request to send: the mix entry it stands for and what goes on the wire."""

    name: str
    method: str
    path: str
    json: Any = None
    data: bytes | None = None
    headers: dict[str, str] | None = None


class _Shop:
    """Picks the next request of the mix; remembers order and report ids from the answers to read them back."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.lock = threading.Lock()
        self.orders: deque[int] = deque(maxlen=RECENT_ORDERS)
        self.reports: deque[tuple[float, str]] = deque(maxlen=RECENT_ORDERS)  # (due at, report id), in due order

    def next_call(self, mix: tuple[MixEntry, ...], weights: list[int], now: float) -> _Call:
        """The next request: a report that is due for its one read, else a pick from the mix."""
        with self.lock:
            if self.reports and self.reports[0][0] <= now:
                _, report_id = self.reports.popleft()
                return _Call("report status", "GET", f"/reports/{report_id}")
            known_orders = list(self.orders)
        name = self.rng.choices(mix, weights)[0].name
        if name == "order detail" and not known_orders:
            name = "place order"  # nothing to read back yet
        return self._build(name, known_orders)

    def _build(self, name: str, known_orders: list[int]) -> _Call:
        rng = self.rng
        json_body = {"Content-Type": "application/json"}
        if name == "product detail":
            product = rng.choices(PRODUCT_IDS, _PRODUCT_POPULARITY)[0]
            return _Call(name, "GET", f"/products/{product}")
        if name == "product list":
            return _Call(name, "GET", f"/products?limit=20&offset={rng.choice((0, 0, 20, 40))}")
        if name == "customer":
            return _Call(name, "GET", f"/customers/{rng.choice(CUSTOMER_IDS)}")
        if name == "place order":
            return _Call(name, "POST", "/orders", json=self._order())
        if name == "order detail":
            return _Call(name, "GET", f"/orders/{rng.choice(known_orders)}")
        if name == "recent orders":
            return _Call(name, "GET", "/orders/recent?limit=20")
        if name == "recent orders n+1":
            return _Call(name, "GET", "/orders/recent/n-plus-one?limit=20")
        if name == "sales report":
            return _Call(name, "POST", "/reports/sales", json={})
        if name == "bad: malformed json":
            return _Call(name, "POST", "/orders", data=b"{not json", headers=json_body)
        if name == "bad: negative quantity":
            order = self._order()
            order["items"][0]["quantity"] = -rng.randint(1, 3)
            return _Call(name, "POST", "/orders", json=order)
        if name == "bad: unknown product":
            order = self._order()
            order["items"][0]["product_id"] = MISSING_PRODUCT_ID
            return _Call(name, "POST", "/orders", json=order)
        if name == "bad: oversized body":
            return _Call(name, "POST", "/orders", data=_OVERSIZED_BODY, headers=json_body)
        if name == "missing product":
            return _Call(name, "GET", f"/products/{MISSING_PRODUCT_ID}")
        raise ValueError(f"no request for mix entry {name!r}")

    def _order(self) -> dict[str, Any]:
        rng = self.rng
        items = [
            {"product_id": rng.choices(PRODUCT_IDS, _PRODUCT_POPULARITY)[0], "quantity": rng.randint(1, 3)}
            for _ in range(rng.randint(1, 3))
        ]
        return {"customer_id": rng.choice(CUSTOMER_IDS), "items": items}

    def remember(self, call: _Call, response: requests.Response) -> None:
        """Keep the order or report id a successful answer carries, to read it back later."""
        if call.name not in ("place order", "sales report") or response.status_code >= 300:
            return
        try:
            body = response.json()
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        with self.lock:
            if call.name == "place order" and isinstance(body.get("order_id"), int):
                self.orders.append(body["order_id"])
            elif call.name == "sales report" and isinstance(body.get("report_id"), str | int):
                due = time.monotonic() + random.uniform(*_REPORT_DELAY)  # not self.rng: keep the seeded picks
                self.reports.append((due, str(body["report_id"])))


class _Workers:
    """A fixed pool of threads with one ``requests.Session`` each; refuses work rather than queueing it."""

    def __init__(self, url: str, concurrency: int, shop: _Shop, progress: Progress) -> None:
        self.url = url.rstrip("/")
        self.shop = shop
        self.progress = progress
        self.free = threading.BoundedSemaphore(concurrency)
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="demo-load")
        self.local = threading.local()
        self.sessions: list[requests.Session] = []
        self.sessions_lock = threading.Lock()

    def submit(self, call: _Call) -> bool:
        """Start ``call`` on a free worker; ``False`` (and nothing sent) if every worker is busy."""
        if not self.free.acquire(blocking=False):
            return False
        try:
            self.pool.submit(self._send, call)
        except BaseException:
            self.free.release()
            raise
        return True

    def _session(self) -> requests.Session:
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
            session.headers["User-Agent"] = "demo-load/1"
            with self.sessions_lock:
                self.sessions.append(session)
        return session

    def _send(self, call: _Call) -> None:
        try:
            session = self._session()
            started = time.perf_counter()
            try:
                response = session.request(
                    call.method,
                    self.url + call.path,
                    json=call.json,
                    data=call.data,
                    headers=call.headers,
                    timeout=TIMEOUT,
                )
            except requests.RequestException:
                self.progress.record(call.name, None, time.perf_counter() - started)
                return
            self.progress.record(call.name, response.status_code, time.perf_counter() - started)
            self.shop.remember(call, response)
        finally:
            self.free.release()

    def close(self) -> None:
        """Wait for the requests in flight, then close the sessions."""
        self.pool.shutdown(wait=True)
        with self.sessions_lock:
            for session in self.sessions:
                session.close()


class _Display:
    """The live progress line on stderr: rewritten in place on a terminal, a new line every 5 s otherwise."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tty = sys.stderr.isatty()
        self.period = 1.0 if self.tty else 5.0
        self.width = 0

    def show(self, final: bool = False) -> None:
        stream = sys.stderr
        text = self.progress.line()
        if self.tty:
            stream.write("\r" + text.ljust(self.width) + ("\n" if final else ""))
            self.width = len(text)
        else:
            stream.write(text + "\n")
        stream.flush()


def run(
    url: str,
    rate: float,
    seconds: float,
    stop: threading.Event | None = None,
    quiet: bool = False,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    seed: int | None = None,
) -> Progress:
    """Send the :data:`MIX` to the shop at ``url`` at ``rate`` requests per second and return the counts.

    Runs for ``seconds`` (``float('inf')`` for ever) or until ``stop`` is set, whichever comes first, then waits
    for the requests in flight. At most ``concurrency`` requests are in flight; a request due while all are busy is
    skipped. Unless ``quiet``, prints a progress line to stderr every second and a summary line at the end.
    ``seed`` makes the picks from the mix reproducible (as far as the answers' timing allows). A KeyboardInterrupt
    ends the run like ``stop`` (requests in flight finish, the summary is printed) and then propagates.
    """
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"rate must be a positive number of requests per second, not {rate!r}")
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, not {seconds!r}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency!r}")
    stop = stop or threading.Event()
    mix = MIX
    weights = [entry.weight for entry in mix]
    shop = _Shop(random.Random(seed))
    progress = Progress()
    workers = _Workers(url, concurrency, shop, progress)
    display = None if quiet else _Display(progress)
    interval = 1.0 / rate
    start = progress.started
    deadline = start + seconds
    next_request = start
    next_display = start + display.period if display else math.inf
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_request:
                if now - next_request > 1.0:
                    next_request = now  # far behind (process suspended?): resume the schedule, no burst
                if not workers.submit(shop.next_call(mix, weights, now)):
                    progress.skip()
                next_request += interval
            elif display and now >= next_display:
                display.show()
                next_display += display.period
            else:
                stop.wait(min(next_request, next_display, deadline) - now)
    finally:
        workers.close()
        progress.finish()
        if display:
            display.show(final=True)
    return progress


def _positive(convert: Callable[[str], float], what: str, finite: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: ``convert`` the text, insist on a value > 0 (and finite, if asked), else a clear error."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not value > 0 or (finite and math.isinf(value)):
            raise argparse.ArgumentTypeError(f"must be {what} > 0{' (finite)' if finite else ''}, not {text!r}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: ``python -m demo_app.load --url URL --rate R --seconds S --concurrency C``."""
    parser = argparse.ArgumentParser(prog="python -m demo_app.load", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the shop (%(default)s)")
    parser.add_argument(
        "--rate", type=_positive(float, "a number", finite=True), default=20.0, help="requests per second (%(default)s)"
    )
    parser.add_argument(
        "--seconds", type=_positive(float, "a number"), default=60.0, help="how long; 'inf' for ever (%(default)s)"
    )
    parser.add_argument(
        "--concurrency",
        type=_positive(int, "a whole number"),
        default=DEFAULT_CONCURRENCY,
        help="worker threads, i.e. requests in flight at most (%(default)s)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress or summary line")
    args = parser.parse_args(argv)
    try:
        run(args.url, args.rate, args.seconds, quiet=args.quiet, concurrency=args.concurrency)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
