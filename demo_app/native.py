"""`make demo`: the instrumented demo with Prometheus, Alertmanager and load, on this machine.

Starts gunicorn (2 workers, spyglass hooks), Prometheus (exemplar storage on) and Alertmanager
with the configuration in ``collector/``, drives load, prints where to look and runs until
Ctrl-C (or for ``DEMO_SECONDS``). Everything it writes goes under ``var/``.

Ports come from the environment: ``DEMO_APP_PORT`` (8000), ``SPYGLASS_METRICS_PORT`` (9464),
``DEMO_PROMETHEUS_PORT`` (9090), ``DEMO_ALERTMANAGER_PORT`` (9093); files go under ``DEMO_VAR_DIR``
(``var/``); ``DEMO_RATE`` sets the load in requests per second (20).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from demo_app import load

REPO = Path(__file__).resolve().parent.parent
VAR_ROOT = Path(os.environ.get("DEMO_VAR_DIR", REPO / "var"))
VAR = VAR_ROOT / "demo"


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _wait_for_port(port: int, process: subprocess.Popen, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with code {process.returncode}; see its log under {VAR}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{name} did not listen on port {port} within {timeout:.0f}s")


def _check_free(port: int, name: str) -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(
                f"port {port} for {name} is taken; set the variable named in `python -m demo_app.native --help`"
            )


def _prometheus_config(metrics_port: int, prometheus_port: int, alertmanager_port: int) -> Path:
    source = (REPO / "collector/prometheus/prometheus.yml").read_text()
    adapted = (
        source.replace("127.0.0.1:9464", f"127.0.0.1:{metrics_port}")
        .replace("127.0.0.1:9093", f"127.0.0.1:{alertmanager_port}")
        .replace("127.0.0.1:9090", f"127.0.0.1:{prometheus_port}")
    )
    config_dir = VAR / "prometheus"
    config_dir.mkdir(parents=True, exist_ok=True)
    rules = config_dir / "rules"
    if rules.exists():
        shutil.rmtree(rules)
    shutil.copytree(REPO / "collector/prometheus/rules", rules)
    path = config_dir / "prometheus.yml"
    path.write_text(adapted)
    return path


def _start(command: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    log_file = open(VAR / log_name, "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
    )


def main() -> None:
    """Run the demo until interrupted."""
    if "--help" in sys.argv:
        print(__doc__)
        return
    app_port = _port("DEMO_APP_PORT", 8000)
    metrics_port = _port("SPYGLASS_METRICS_PORT", 9464)
    prometheus_port = _port("DEMO_PROMETHEUS_PORT", 9090)
    alertmanager_port = _port("DEMO_ALERTMANAGER_PORT", 9093)
    for port, name in (
        (app_port, "DEMO_APP_PORT"),
        (metrics_port, "SPYGLASS_METRICS_PORT"),
        (prometheus_port, "DEMO_PROMETHEUS_PORT"),
        (alertmanager_port, "DEMO_ALERTMANAGER_PORT"),
    ):
        _check_free(port, name)
    seconds = float(os.environ.get("DEMO_SECONDS", "0")) or float("inf")
    VAR.mkdir(parents=True, exist_ok=True)
    traces = VAR_ROOT / "otlp" / "traces.jsonl"
    env = dict(os.environ)
    env.setdefault("OTEL_SERVICE_NAME", "demo-web")
    env.setdefault("OTEL_RESOURCE_ATTRIBUTES", "service.version=0.1.0,deployment.environment.name=demo")
    env.update(
        SPYGLASS_METRICS_PORT=str(metrics_port),
        SPYGLASS_METRICS_DIR=str(VAR / "metrics"),
        SPYGLASS_TRACES_FILE=str(traces),
        PYTHONPATH=str(REPO),
    )
    bin_dir = Path(sys.executable).parent
    processes: list[tuple[str, subprocess.Popen]] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        web = _start(
            [str(bin_dir / "gunicorn"), "-c", "python:spyglass.gunicorn", "-w", "2", "-b", f"127.0.0.1:{app_port}",
             "--no-control-socket", "demo_app.hello:app"],
            "web.log",
            env,
        )  # fmt: skip
        processes.append(("web", web))
        _wait_for_port(app_port, web, "gunicorn")
        alertmanager = _start(
            ["prometheus-alertmanager", f"--config.file={REPO / 'collector/alertmanager/alertmanager.yml'}",
             f"--storage.path={VAR / 'alertmanager-data'}", f"--web.listen-address=127.0.0.1:{alertmanager_port}",
             "--cluster.listen-address="],
            "alertmanager.log",
        )  # fmt: skip
        processes.append(("alertmanager", alertmanager))
        prometheus = _start(
            ["prometheus", f"--config.file={_prometheus_config(metrics_port, prometheus_port, alertmanager_port)}",
             f"--storage.tsdb.path={VAR / 'prometheus-data'}", f"--web.listen-address=127.0.0.1:{prometheus_port}",
             "--enable-feature=exemplar-storage"],
            "prometheus.log",
        )  # fmt: skip
        processes.append(("prometheus", prometheus))
        _wait_for_port(alertmanager_port, alertmanager, "alertmanager")
        _wait_for_port(prometheus_port, prometheus, "prometheus")
        quantile_query = (
            "histogram_quantile(0.99%2C%20sum%20by%20(le%2C%20http_route)%20"
            "(rate(http_server_request_duration_seconds_bucket%5B1m%5D)))"
        )
        print(
            f"""
spyglass demo is running. Where to look:
  app              http://127.0.0.1:{app_port}/users/42   (responses carry a traceresponse header)
  metrics          http://127.0.0.1:{metrics_port}/metrics   (OpenMetrics, with exemplars, when asked)
  Prometheus       http://127.0.0.1:{prometheus_port}/graph?g0.expr={quantile_query}
  Alertmanager     http://127.0.0.1:{alertmanager_port}/
  traces (OTLP)    {traces}
  logs (JSON)      {VAR / "web.log"}
Load is running; Ctrl-C stops everything.
""",
            flush=True,
        )
        load.run(
            f"http://127.0.0.1:{app_port}", rate=float(os.environ.get("DEMO_RATE", "20")), seconds=seconds, stop=stop
        )
    except KeyboardInterrupt:
        pass
    finally:
        for _name, process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for _name, process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        print("demo stopped", flush=True)


if __name__ == "__main__":
    main()
