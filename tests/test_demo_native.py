"""`make demo` runs for real: a Prometheus scraping the instrumented app under load."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, clean_environment, free_port, read_spans, wait_for


def query(prometheus: str, expression: str) -> list[dict]:
    response = requests.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]


@pytest.mark.slow
def test_native_demo_is_scraped_with_exemplars_that_open_exported_traces(tmp_path: Path) -> None:
    """Prometheus scrapes the demo (job `web`), stores its exemplars, and each names an exported trace."""
    ports = {
        name: free_port()
        for name in ("DEMO_APP_PORT", "SPYGLASS_METRICS_PORT", "DEMO_PROMETHEUS_PORT", "DEMO_ALERTMANAGER_PORT")
    }
    env = clean_environment()
    env.update({name: str(port) for name, port in ports.items()})
    env.update(DEMO_VAR_DIR=str(tmp_path), DEMO_SECONDS="120", DEMO_RATE="30", OTEL_BSP_SCHEDULE_DELAY="500")
    demo = subprocess.Popen(
        [sys.executable, "-m", "demo_app.native"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    prometheus = f"http://127.0.0.1:{ports['DEMO_PROMETHEUS_PORT']}"
    try:
        up = wait_for(lambda: _safe(lambda: query(prometheus, 'up{job="web"} == 1')), timeout=60, interval=1)
        assert up, "Prometheus never scraped the demo"
        counts = wait_for(
            lambda: _safe(
                lambda: query(prometheus, 'sum by (http_route) (http_server_request_duration_seconds_count{job="web"})')
            ),
            timeout=30,
            interval=1,
        )
        routes = {series["metric"]["http_route"] for series in counts}
        assert {"/users/<int:user_id>", "<unmatched>"} <= routes

        def exemplar_trace_ids() -> set[str]:
            response = requests.get(
                f"{prometheus}/api/v1/query_exemplars",
                params={
                    "query": "http_server_request_duration_seconds_bucket",
                    "start": time.time() - 300,
                    "end": time.time(),
                },
                timeout=5,
            )
            return {
                exemplar["labels"]["trace_id"] for series in response.json()["data"] for exemplar in series["exemplars"]
            }

        trace_ids = wait_for(lambda: _safe(exemplar_trace_ids), timeout=30, interval=1)
        assert trace_ids, "Prometheus stored no exemplars"
        exported = wait_for(
            lambda: trace_ids & {span["traceId"] for span in read_spans(tmp_path / "otlp" / "traces.jsonl")}, timeout=20
        )
        assert exported, "exemplars point at traces that were never exported"
        alertmanager = requests.get(f"http://127.0.0.1:{ports['DEMO_ALERTMANAGER_PORT']}/-/ready", timeout=5)
        assert alertmanager.status_code == 200
    finally:
        demo.send_signal(signal.SIGTERM)
        output, _ = demo.communicate(timeout=60)
    text = output.decode(errors="replace")
    assert "Where to look" in text and "demo stopped" in text, text
    log_lines = (tmp_path / "demo" / "web.log").read_text().splitlines()
    assert all(json.loads(line) for line in log_lines if line.strip()), "a log line is not JSON"


def _safe(call):
    try:
        return call()
    except (requests.RequestException, KeyError, ValueError):
        return None
