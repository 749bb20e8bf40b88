"""A traces backend that is down costs the application nothing but dropped, counted spans."""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests.conftest import Gunicorn, free_port, start_gunicorn, wait_for

REQUESTS = 300


@contextmanager
def silent_backend() -> Iterator[int]:
    """A port that accepts connections (in the kernel backlog) but never reads or answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        yield listener.getsockname()[1]


def interleaved_latencies(first: Gunicorn, second: Gunicorn) -> tuple[list[float], list[float]]:
    """Alternate requests between two servers so both see the same machine noise."""
    timings: tuple[list[float], list[float]] = ([], [])
    with requests.Session() as session_a, requests.Session() as session_b:
        for index in range(REQUESTS):
            for server, session, bucket in ((first, session_a, timings[0]), (second, session_b, timings[1])):
                started = time.perf_counter()
                response = session.get(f"{server.url}/items/{index + 1}", timeout=10)
                bucket.append(time.perf_counter() - started)
                assert response.status_code == 200
    return timings


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def counter(server: Gunicorn, family: str, error_type: str) -> float:
    families = server.families()
    if family not in families:
        return 0.0
    return sum(
        sample.value
        for sample in families[family].samples
        if sample.name.endswith("_total") and sample.labels.get("error_type", "") == error_type
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["refused", "silent"])
def test_requests_keep_their_speed_and_drops_are_counted(tmp_path: Path, backend: str) -> None:
    """With the OTLP backend refusing or hanging, requests succeed as fast as with export off."""
    baseline = start_gunicorn(tmp_path / "baseline", OTEL_TRACES_EXPORTER="none")
    with silent_backend() as silent_port:
        port = silent_port if backend == "silent" else free_port()
        server = start_gunicorn(
            tmp_path / backend,
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
            OTEL_EXPORTER_OTLP_TIMEOUT="1000",
            OTEL_BSP_MAX_QUEUE_SIZE="32",
            OTEL_BSP_MAX_EXPORT_BATCH_SIZE="8",
        )
        try:
            interleaved_latencies(baseline, server)  # warm-up
            healthy, degraded = interleaved_latencies(baseline, server)
            dropped = wait_for(
                lambda: (
                    counter(server, "otel_sdk_processor_span_processed", "queue_full")
                    + counter(server, "otel_sdk_exporter_span_exported", "export_failed")
                ),
                timeout=15,
            )
            assert dropped > 0, "lost spans were not counted"
            assert counter(server, "otel_sdk_exporter_span_exported", "") == 0
        finally:
            baseline.stop()
            assert server.stop() == 0, "gunicorn did not stop cleanly with the backend down"

    median_ratio = statistics.median(degraded) / statistics.median(healthy)
    healthy_ms, degraded_ms = statistics.median(healthy) * 1e3, statistics.median(degraded) * 1e3
    print(f"{backend}: median {healthy_ms:.2f} ms -> {degraded_ms:.2f} ms, dropped {dropped}")
    # Generous bounds for a shared 2-core machine; a blocking export would cost >= 1 s per request.
    assert median_ratio < 1.5, (median_ratio, statistics.median(healthy), statistics.median(degraded))
    assert p90(degraded) < p90(healthy) * 2 + 0.005, (p90(healthy), p90(degraded))
