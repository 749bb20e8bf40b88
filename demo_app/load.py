"""A small load generator for the demo: a mix of reads, errors and slow calls at a steady rate.

python -m demo_app.load --url http://127.0.0.1:8000 --rate 20 --seconds 60
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import requests

# (weight, method, path template): mostly successful reads, some 404s, errors and slow calls.
MIX: tuple[tuple[int, str, str], ...] = (
    (50, "GET", "/users/{n}"),
    (20, "GET", "/"),
    (8, "GET", "/stream"),
    (8, "POST", "/login"),
    (6, "GET", "/no-such-page/{n}"),
    (4, "GET", "/users/0"),
    (2, "GET", "/fail"),
    (2, "GET", "/slow?seconds=0.3"),
)


@dataclass
class Progress:
    """Counts and latencies of the requests sent so far (thread-safe)."""

    sent: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, seconds: float, failed: bool) -> None:
        with self.lock:
            self.sent += 1
            self.errors += failed
            self.latencies.append(seconds)

    def line(self) -> str:
        with self.lock:
            recent = self.latencies[-2000:]
            if len(recent) >= 2:
                cuts = statistics.quantiles(recent, n=100)
                p50, p99 = cuts[49] * 1e3, cuts[98] * 1e3
            else:
                p50 = p99 = 0.0
            return f"requests {self.sent}  5xx/failed {self.errors}  p50 {p50:.1f} ms  p99 {p99:.1f} ms"


def run(url: str, rate: float, seconds: float, stop: threading.Event | None = None, quiet: bool = False) -> Progress:
    """Send the mix to ``url`` at ``rate`` requests per second for ``seconds`` (or until ``stop``)."""
    progress = Progress()
    stop = stop or threading.Event()
    weights = [weight for weight, _, _ in MIX]
    rng = random.Random(1)
    deadline = time.monotonic() + seconds
    interval = 1.0 / rate
    next_at = time.monotonic()
    last_print = 0.0
    with requests.Session() as session:
        while not stop.is_set() and time.monotonic() < deadline:
            _, method, template = rng.choices(MIX, weights)[0]
            path = template.format(n=rng.randint(1, 500))
            started = time.perf_counter()
            try:
                response = session.request(
                    method, url + path, json={"username": "demo", "password": "s3cret"}, timeout=5
                )
                failed = response.status_code >= 500
            except requests.RequestException:
                failed = True
            progress.add(time.perf_counter() - started, failed)
            if not quiet and time.monotonic() - last_print > 1:
                last_print = time.monotonic()
                sys.stdout.write("\r" + progress.line() + "   ")
                sys.stdout.flush()
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))
    if not quiet:
        sys.stdout.write("\r" + progress.line() + "\n")
    return progress


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0:
        parser.error("--rate and --seconds must be positive")
    run(args.url.rstrip("/"), args.rate, args.seconds)


if __name__ == "__main__":
    main()
