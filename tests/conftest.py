"""Fixtures that start real servers on loopback and read what they expose."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def clean_environment(**overrides: str) -> dict[str, str]:
    """The environment of this process minus telemetry settings (OTEL_*, SPYGLASS_*, PROMETHEUS_*), plus overrides."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "SPYGLASS_", "PROMETHEUS_"))}
    env.update(overrides)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


@dataclass
class Gunicorn:
    """A real gunicorn running tests/apps/shop.py with spyglass's hooks."""

    process: subprocess.Popen
    app_port: int
    metrics_port: int
    workdir: Path
    log_path: Path
    env: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.app_port}"

    @property
    def traces_path(self) -> Path:
        return self.workdir / "traces.jsonl"

    def scrape(self, openmetrics: bool = True) -> str:
        headers = {"Accept": OPENMETRICS} if openmetrics else {"Accept": "text/plain"}
        response = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", headers=headers, timeout=5)
        response.raise_for_status()
        return response.text

    def families(self) -> dict:
        return {family.name: family for family in parse_openmetrics(self.scrape())}

    def log_text(self) -> str:
        return self.log_path.read_text()

    def log_lines(self) -> list[dict]:
        lines = []
        for raw in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                lines.append({"unparsed": raw})
        return lines

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_gunicorn(
    tmp: Path,
    *args: str,
    workers: int = 2,
    config: str = "python:spyglass.gunicorn",
    app: str = "tests.apps.shop:app",
    unset: tuple[str, ...] = (),
    **env_overrides: str,
) -> Gunicorn:
    """Gunicorn serving ``app`` (the test shop by default) with spyglass's hooks, its files under ``tmp``.

    ``env_overrides`` are set in its environment, after ``unset`` names are removed from it.
    """
    app_port, metrics_port = free_port(), free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    env = clean_environment()
    env.update(
        OTEL_SERVICE_NAME="shop",
        OTEL_RESOURCE_ATTRIBUTES="service.version=1.2.3,deployment.environment.name=test",
        SPYGLASS_METRICS_PORT=str(metrics_port),
        SPYGLASS_METRICS_DIR=str(tmp / "metrics"),
        SPYGLASS_TRACES_FILE=str(tmp / "traces.jsonl"),
        OTEL_BSP_SCHEDULE_DELAY="100",
        PYTHONPATH=str(REPO),
    )
    for name in unset:
        env.pop(name, None)
    env.update(env_overrides)
    log_path = tmp / "gunicorn.log"
    command = [
        str(VENV_BIN / "gunicorn"),
        "-c",
        config,
        "-w",
        str(workers),
        "-b",
        f"127.0.0.1:{app_port}",
        "--graceful-timeout",
        "10",
        "--no-control-socket",
        *args,
        app,
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=tmp, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = Gunicorn(process, app_port, metrics_port, tmp, log_path, env)
    try:
        wait_for_port(app_port, process)
        wait_for_port(metrics_port, process)
    except Exception:
        server.stop()
        raise RuntimeError("gunicorn did not start:\n" + log_path.read_text()) from None
    return server


@pytest.fixture(scope="module")
def gunicorn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    server = start_gunicorn(tmp_path_factory.mktemp("gunicorn"))
    yield server
    server.stop()


def run_shop_script(script: str, *, unset: Iterable[str] = (), **env: str) -> subprocess.CompletedProcess:
    """Run a Python snippet (dedented) against the demo shop in a fresh interpreter at the repository's
    root: no trace export, metrics on a free port, ``env`` added and ``unset`` removed.
    """
    environment = clean_environment(**{"OTEL_TRACES_EXPORTER": "none", "SPYGLASS_METRICS_PORT": "0", **env})
    for name in unset:
        environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def read_spans(path: Path) -> list[dict]:
    """Every span in an OTLP JSON lines file, with its resource attributes under ``resource``."""
    spans = []
    if not path.exists():
        return spans
    for line in path.read_text(encoding="utf-8").split("\n"):  # JSON lines: only "\n" ends one
        if not line:
            continue
        request = json.loads(line)
        for resource_spans in request["resourceSpans"]:
            resource = {a["key"]: a["value"] for a in resource_spans["resource"]["attributes"]}
            for scope_spans in resource_spans["scopeSpans"]:
                for span in scope_spans["spans"]:
                    span["attributes"] = {a["key"]: next(iter(a["value"].values())) for a in span.get("attributes", [])}
                    span["resource"] = resource
                    spans.append(span)
    return spans


def finished_spans(traces: Path) -> list[dict]:
    """Every span this process has ended so far, exported to ``traces`` first."""
    from spyglass import runtime

    state = runtime.current()
    assert state is not None
    state.flush()
    return read_spans(traces)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis to use as Celery broker: the machine's on 127.0.0.1:6379, or one started for the tests."""
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pass
    else:
        yield "redis://127.0.0.1:6379/11"
        return
    port = free_port()
    server = start_redis_server(tmp_path_factory.mktemp("redis"), port)
    try:
        yield f"redis://127.0.0.1:{port}/11"
    finally:
        server.terminate()
        server.wait(timeout=10)


def start_redis_server(directory: Path, port: int, *options: str) -> subprocess.Popen:
    """A redis-server of the tests' own on loopback ``port``, files in ``directory``; returns once it listens.

    ``options`` are extra server options (``--appendonly yes``...); nothing is saved by default.
    """
    directory.mkdir(parents=True, exist_ok=True)
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)]
    server = subprocess.Popen([*command, *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, server)
    return server
