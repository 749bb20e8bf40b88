"""`make demo`: the instrumented shop with Prometheus, Alertmanager and load, on this machine.

Starts, each in its own process group with its log under ``var/demo/``:

- Redis, if none answers at ``DEMO_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``);
- the web app under gunicorn (2 workers, spyglass's hooks), service ``shop-web``;
- a prefork Celery worker (concurrency 2) on the queues orders, reports and maintenance, ``shop-worker``;
- Celery beat (the maintenance task every minute), ``shop-beat``;
- Prometheus (exemplar storage on) and Alertmanager with the compose stack's configuration from
  ``collector/``, adapted to this machine's ports (:mod:`demo_app.native_configs`), and the alert
  sink that receives Alertmanager's notifications (:mod:`demo_app.alert_sink`);

then drives load (:mod:`demo_app.load`), prints where to look, and runs until Ctrl-C (or for
``DEMO_SECONDS``); every process it started is stopped on the way out.

Ports come from the environment: ``DEMO_APP_PORT`` (8000), ``SPYGLASS_METRICS_PORT`` (9464, the
web's metrics; the worker's and beat's are ``DEMO_WORKER_METRICS_PORT`` 9465 and
``DEMO_BEAT_METRICS_PORT`` 9466), ``DEMO_PROMETHEUS_PORT`` (9090), ``DEMO_ALERTMANAGER_PORT``
(9093), ``DEMO_ALERT_SINK_PORT`` (9095); files go under ``DEMO_VAR_DIR`` (``var/``): traces and
logs as OTLP JSON lines in ``var/otlp/`` (what a Collector's ``otlpjsonfile`` receiver reads), each
process's output in ``var/demo/<name>.log``; ``DEMO_RATE`` sets the load in requests per
second (10; 0 for none). ``DEMO_ADMIN_TOKEN`` is the fault switches' token (a random one is
made and printed if unset). Every setting of :mod:`demo_app.settings` and :mod:`demo_app.faults`
(``DATABASE_URL``, ``DEMO_FAULT_*``...) passes through to the shop.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import redis

from demo_app import load
from demo_app.native_configs import NativeAddresses, alertmanager_config, prometheus_config, write_yaml

REPO = Path(__file__).resolve().parent.parent
VAR_ROOT = Path(os.environ.get("DEMO_VAR_DIR", REPO / "var"))
VAR = VAR_ROOT / "demo"
QUEUES = "orders,reports,maintenance"


# Each port's variable, the Ports field it sets, and its default.
PORT_VARIABLES: dict[str, tuple[str, int]] = {
    "DEMO_APP_PORT": ("app", 8000),
    "SPYGLASS_METRICS_PORT": ("web_metrics", 9464),
    "DEMO_WORKER_METRICS_PORT": ("worker_metrics", 9465),
    "DEMO_BEAT_METRICS_PORT": ("beat_metrics", 9466),
    "DEMO_PROMETHEUS_PORT": ("prometheus", 9090),
    "DEMO_ALERTMANAGER_PORT": ("alertmanager", 9093),
    "DEMO_ALERT_SINK_PORT": ("alert_sink", 9095),
}


@dataclass(frozen=True)
class Ports:
    """The ports the demo listens on."""

    app: int
    web_metrics: int
    worker_metrics: int
    beat_metrics: int
    prometheus: int
    alertmanager: int
    alert_sink: int

    @classmethod
    def from_environment(cls) -> Ports:
        """Read the ports, each from its variable or its default."""

        def port(name: str, default: int) -> int:
            raw = os.environ.get(name) or str(default)
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise SystemExit(f"{name}={raw!r} is not a port number")
            return int(raw)

        return cls(**{field: port(name, default) for name, (field, default) in PORT_VARIABLES.items()})

    def named(self) -> dict[str, int]:
        """Each port under the variable that sets it."""
        return {name: getattr(self, field) for name, (field, _default) in PORT_VARIABLES.items()}

    def addresses(self) -> NativeAddresses:
        """Where each compose service's port is on this machine."""
        return NativeAddresses(
            {
                ("web", 9464): self.web_metrics,
                ("worker", 9464): self.worker_metrics,
                ("beat", 9464): self.beat_metrics,
                ("alertmanager", 9093): self.alertmanager,
                ("localhost", 9090): self.prometheus,
                ("alert-sink", 9095): self.alert_sink,
            }
        )


class Processes:
    """The processes the demo started, stopped together in reverse order."""

    def __init__(self) -> None:
        self._started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``command`` in its own process group, output to ``var/demo/<name>.log``."""
        log_file = open(VAR / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        self._started.append((name, process))
        return process

    def check(self) -> None:
        """Raise ``SystemExit`` if one of the processes has exited."""
        for name, process in self._started:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited with code {process.returncode}; see {VAR / (name + '.log')}")

    def stop(self) -> None:
        """SIGTERM each process (the last started first), then SIGKILL what is left of its group.

        Only the group's leader gets SIGTERM: gunicorn and Celery stop their workers themselves
        (a Celery pool process killed directly would lose its task).
        """
        for _name, process in reversed(self._started):
            if process.poll() is None:
                process.terminate()
        for _name, process in reversed(self._started):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(20)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def _wait_for_port(port: int, processes: Processes, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{name} did not listen on port {port} within {timeout:.0f}s; see its log under {VAR}")


def _check_free(port: int, name: str) -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(f"port {port} is taken; set another with {name}= (python -m demo_app.native --help)")


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _ensure_redis(url: str, processes: Processes) -> None:
    """Start a Redis server for ``url`` if none answers there."""
    if _redis_answers(url):
        return
    parts = urlsplit(url)
    port = parts.port or 6379
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"no Redis answers at {url}, and it is not on this machine to start")
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no Redis answers and redis-server is not installed: run `make system-deps`")
    processes.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(VAR)])
    deadline = time.monotonic() + 20
    while not _redis_answers(url):
        processes.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"the Redis server started for {url} does not answer")
        time.sleep(0.1)


COLLECTOR = REPO / "collector"
ADAPTED_HEADER = "Generated by `make demo` from {source} (demo_app/native_configs.py): edit that file, not this one."


def _prometheus_config(ports: Ports) -> Path:
    source = COLLECTOR / "prometheus/prometheus.yml"
    config = prometheus_config(source, ports.addresses(), COLLECTOR / "prometheus/rules")
    header = ADAPTED_HEADER.format(source=source.relative_to(REPO))
    return write_yaml(config, VAR / "prometheus/prometheus.yml", header)


def _alertmanager_config(ports: Ports) -> Path:
    source = COLLECTOR / "alertmanager/alertmanager.yml"
    header = ADAPTED_HEADER.format(source=source.relative_to(REPO))
    return write_yaml(alertmanager_config(source, ports.addresses()), VAR / "alertmanager/alertmanager.yml", header)


def _shop_environment(otlp_dir: Path, admin_token: str, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OTEL_RESOURCE_ATTRIBUTES", "service.version=0.1.0,deployment.environment.name=demo")
    # No collector runs natively: traces and logs go to OTLP JSON lines a Collector can replay.
    env.setdefault("OTEL_LOGS_EXPORTER", "otlp_json_file")
    env.update(
        SPYGLASS_TRACES_FILE=str(otlp_dir / "traces.jsonl"),
        SPYGLASS_LOGS_FILE=str(otlp_dir / "logs.jsonl"),
        DEMO_VAR_DIR=str(VAR_ROOT),
        DEMO_ADMIN_TOKEN=admin_token,
        DEMO_REDIS_URL=redis_url,
        PYTHONPATH=str(REPO),
    )
    return env


def _start_shop(processes: Processes, ports: Ports, env: dict[str, str]) -> None:
    bin_dir = Path(sys.executable).parent
    web_env = {
        **env,
        "OTEL_SERVICE_NAME": "shop-web",
        "SPYGLASS_METRICS_PORT": str(ports.web_metrics),
        "SPYGLASS_METRICS_DIR": str(VAR / "metrics-web"),
    }
    worker_env = {
        **env,
        "OTEL_SERVICE_NAME": "shop-worker",
        "SPYGLASS_METRICS_PORT": str(ports.worker_metrics),
        "SPYGLASS_METRICS_DIR": str(VAR / "metrics-worker"),
    }
    beat_env = {**env, "OTEL_SERVICE_NAME": "shop-beat", "SPYGLASS_METRICS_PORT": str(ports.beat_metrics)}
    beat_env.pop("SPYGLASS_METRICS_DIR", None)
    processes.start(
        "web",
        [str(bin_dir / "gunicorn"), "-c", "python:spyglass.gunicorn", "-w", "2", "-b", f"127.0.0.1:{ports.app}",
         "--no-control-socket", "demo_app.web:app"],
        web_env,
    )  # fmt: skip
    processes.start(
        "worker",
        # -q: no start-up banner on stdout, where every line is JSON.
        [str(bin_dir / "celery"), "-q", "-A", "demo_app.tasks", "worker", "--pool=prefork", "--concurrency=2",
         "-Q", QUEUES, "-n", "shop@%h", "--loglevel=INFO"],
        worker_env,
    )  # fmt: skip
    processes.start(
        "beat",
        [str(bin_dir / "celery"), "-q", "-A", "demo_app.tasks", "beat", "--loglevel=INFO",
         "-s", str(VAR / "celerybeat-schedule")],
        beat_env,
    )  # fmt: skip


def _start_collecting(processes: Processes, ports: Ports) -> None:
    sink = [sys.executable, "-m", "demo_app.alert_sink", "--host", "127.0.0.1", "--port", str(ports.alert_sink)]
    processes.start("alert-sink", sink)
    processes.start(
        "alertmanager",
        ["prometheus-alertmanager", f"--config.file={_alertmanager_config(ports)}",
         f"--storage.path={VAR / 'alertmanager-data'}", f"--web.listen-address=127.0.0.1:{ports.alertmanager}",
         "--cluster.listen-address="],
    )  # fmt: skip
    processes.start(
        "prometheus",
        ["prometheus", f"--config.file={_prometheus_config(ports)}",
         f"--storage.tsdb.path={VAR / 'prometheus-data'}", f"--web.listen-address=127.0.0.1:{ports.prometheus}",
         "--enable-feature=exemplar-storage"],
    )  # fmt: skip


def _where_to_look(ports: Ports, otlp_dir: Path, admin_token: str) -> str:
    prometheus = f"http://127.0.0.1:{ports.prometheus}"
    p99 = quote(
        "histogram_quantile(0.99, sum by (le, http_route) (rate(http_server_request_duration_seconds_bucket[1m])))"
    )
    app = f"http://127.0.0.1:{ports.app}"
    return f"""
spyglass demo (the shop) is running. Where to look:
  shop API         {app}/products/1   {app}/orders/recent   {app}/orders/recent/n-plus-one
  metrics          web http://127.0.0.1:{ports.web_metrics}/metrics   worker http://127.0.0.1:{ports.worker_metrics}/metrics   beat http://127.0.0.1:{ports.beat_metrics}/metrics
  Prometheus       {prometheus}/graph?g0.expr={p99}
  Prometheus       {prometheus}/targets   (jobs shop-web, shop-worker, shop-beat, alertmanager, prometheus)
  Alertmanager     http://127.0.0.1:{ports.alertmanager}/   notifications http://127.0.0.1:{ports.alert_sink}/notifications
  traces (OTLP)    {otlp_dir / "traces.jsonl"}
  logs (OTLP)      {otlp_dir / "logs.jsonl"}   (JSON lines per process: {VAR}/web.log  worker.log  beat.log)
  fault switches   curl -X PUT -H 'Authorization: Bearer {admin_token}' -H 'Content-Type: application/json' \\
                     -d '{{"payment_outage": true}}' {app}/admin/faults     (DELETE clears them)
Load is running; Ctrl-C stops everything.
"""  # noqa: E501 - the printed lines are meant to be long


def main() -> None:
    """Run the demo until interrupted."""
    if "--help" in sys.argv or "-h" in sys.argv:
        print(__doc__)
        return
    ports = Ports.from_environment()
    for name, port in ports.named().items():
        _check_free(port, name)
    seconds = float(os.environ.get("DEMO_SECONDS", "0")) or float("inf")
    rate = float(os.environ.get("DEMO_RATE", "10"))
    VAR.mkdir(parents=True, exist_ok=True)
    otlp_dir = VAR_ROOT / "otlp"
    admin_token = os.environ.get("DEMO_ADMIN_TOKEN") or secrets.token_urlsafe(16)
    redis_url = os.environ.get("DEMO_REDIS_URL") or "redis://127.0.0.1:6379/0"
    processes = Processes()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        _ensure_redis(redis_url, processes)
        _start_shop(processes, ports, _shop_environment(otlp_dir, admin_token, redis_url))
        _start_collecting(processes, ports)
        for port, name in (
            (ports.app, "gunicorn"),
            (ports.worker_metrics, "the Celery worker"),
            (ports.beat_metrics, "Celery beat"),
            (ports.alert_sink, "the alert sink"),
            (ports.alertmanager, "alertmanager"),
            (ports.prometheus, "prometheus"),
        ):
            _wait_for_port(port, processes, name)
        print(_where_to_look(ports, otlp_dir, admin_token), flush=True)
        if rate > 0:
            load.run(f"http://127.0.0.1:{ports.app}", rate=rate, seconds=seconds, stop=stop)
        else:
            stop.wait(None if seconds == float("inf") else seconds)
    except KeyboardInterrupt:
        pass
    finally:
        processes.stop()
        print("demo stopped", flush=True)


if __name__ == "__main__":
    main()
