"""The drop-in promises: one import, before or after the app exists; hooks in any gunicorn config."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, Gunicorn, clean_environment, read_spans, start_gunicorn, wait_for


def run_script(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    env = clean_environment()
    env.update(
        SPYGLASS_METRICS_PORT="0",
        SPYGLASS_TRACES_FILE=str(tmp_path / "traces.jsonl"),
        OTEL_SERVICE_NAME="dropin",
        PYTHONPATH=str(REPO),
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)], env=env, cwd=tmp_path, capture_output=True, text=True
    )


@pytest.mark.parametrize("order", ["import-then-create", "create-then-import"])
def test_auto_import_instruments_apps_created_before_or_after_it(tmp_path: Path, order: str) -> None:
    """`import spyglass.auto` instruments a Flask app whether it was created before or after."""
    create = "from flask import Flask\napp = Flask('x')\napp.get('/p/<name>')(lambda name: name)\n"
    importing = "import spyglass.auto\n"
    body = (importing + create) if order == "import-then-create" else (create + importing)
    result = run_script(
        tmp_path,
        body
        + """
response = app.test_client().get('/p/abc')
assert response.status_code == 200, response.status_code
assert 'traceresponse' in response.headers
import spyglass
spyglass.shutdown()
""",
    )
    assert result.returncode == 0, result.stderr
    (span,) = read_spans(tmp_path / "traces.jsonl")
    assert span["name"] == "GET /p/<name>"
    access = [json.loads(line) for line in result.stdout.splitlines() if '"event":"request"' in line]
    assert access and access[0]["trace_id"] == span["traceId"]


def test_init_is_idempotent_and_instrument_flask_wraps_once(tmp_path: Path) -> None:
    """Calling init() and instrument_flask() again changes nothing and records each request once."""
    result = run_script(
        tmp_path,
        """
import spyglass
from flask import Flask
from prometheus_client import REGISTRY
first = spyglass.init()
assert spyglass.init() is first
app = Flask('x')
app.get('/')(lambda: 'ok')
spyglass.instrument_flask(app)
wrapped = app.wsgi_app
spyglass.instrument_flask(app)
assert app.wsgi_app is wrapped
app.test_client().get('/')
labels = {'http_request_method': 'GET', 'http_route': '/', 'http_response_status_code': '200'}
assert REGISTRY.get_sample_value('http_server_request_duration_seconds_count', labels) == 1.0
""",
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["preload", "existing-config"])
def test_gunicorn_variants_aggregate_both_workers(tmp_path: Path, mode: str) -> None:
    """With --preload, or with the hooks imported into an existing config, one endpoint sums all workers."""
    if mode == "preload":
        server = start_gunicorn(tmp_path, "--preload")
    else:
        server = start_gunicorn(tmp_path, config="python:tests.apps.gunicorn_conf")
    try:
        pids = set()
        for index in range(200):
            response = requests.get(f"{server.url}/items/{index + 1}", headers={"Connection": "close"}, timeout=10)
            pids.add(response.json()["pid"])
            if len(pids) == 2 and index >= 40:
                break
        sent = index + 1
        assert len(pids) == 2
        assert_aggregated(server, sent)
    finally:
        assert server.stop() == 0
    lines = server.log_text().splitlines()
    assert all(line.startswith("{") for line in lines if line.strip()), "a log line is not JSON"
    assert any('"logger":"gunicorn.error"' in line and "Booting worker" in line for line in lines)


def assert_aggregated(server: Gunicorn, sent: int) -> None:
    families = wait_for(server.families)
    samples = families["http_server_request_duration_seconds"].samples
    counted = sum(
        s.value for s in samples if s.name.endswith("_count") and s.labels["http_route"] == "/items/<int:item_id>"
    )
    assert counted == sent
    assert any(s.exemplar for s in samples if s.name.endswith("_bucket"))
    (target,) = families["target"].samples
    assert target.labels["service_name"] == "shop" and target.labels["service_version"] == "1.2.3"
    assert families["process_cpu_seconds"].samples[0].value > 0
    assert families["spyglass_worker_processes"].samples[0].value == 2
