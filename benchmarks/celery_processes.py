"""Real processes for the Celery benchmarks: a Redis broker, the publisher, and prefork workers.

Every worker runs in a process group of its own, so that stopping it also stops its pool
processes, whatever happened; every queue a measurement creates is deleted afterwards (with its
kombu binding and the measurement's marks).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis

__all__ = [
    "DEFAULT_BROKER_URL",
    "BenchmarkError",
    "CpuSnapshot",
    "Worker",
    "base_environment",
    "cpu_snapshot",
    "delete_queue",
    "free_port",
    "publish",
    "redis_broker",
    "redis_version",
    "start_worker",
    "stop_worker",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent
CELERY = Path(sys.executable).parent / "celery"
_CLEARED_PREFIXES = ("OTEL_", "SPYGLASS_", "PROMETHEUS_", "BENCH_", "CELERY_")
_CLEARED_NAMES = ("prometheus_multiproc_dir",)
_PUBLISH_TIMEOUT_S = 600
_BINDING_DEADLINES = "_kombu.binding_deadlines"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/12"
"""The machine's Redis, in a database of the benchmarks' own (the tests use another)."""


class BenchmarkError(Exception):
    """A process of the benchmark failed, or a measurement could not be completed."""


def base_environment(variant: str, broker: str, queue: str, **extra: str) -> dict[str, str]:
    """Return this process's environment without telemetry settings, plus the app's variables and ``extra``."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_CLEARED_PREFIXES) and key not in _CLEARED_NAMES
    }
    python_path = [str(ROOT), *filter(None, [environment.get("PYTHONPATH")])]
    environment.update(
        BENCH_CELERY_VARIANT=variant,
        CELERY_BROKER_URL=broker,
        BENCH_QUEUE=queue,
        PYTHONPATH=os.pathsep.join(python_path),
        PYTHONUNBUFFERED="1",
    )
    environment.update(extra)
    return environment


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.1, process: subprocess.Popen | None = None
) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False).

    Raises :class:`BenchmarkError` if ``process`` exits meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if process is not None and process.poll() is not None:
            raise BenchmarkError(f"process {process.pid} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _reachable(url: str) -> bool:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return False
    return True


@contextlib.contextmanager
def redis_broker(url: str | None) -> Iterator[str]:
    """Yield the URL of a Redis to use as the broker.

    ``url`` if given (it must answer); else the machine's Redis (:data:`DEFAULT_BROKER_URL`) if it
    answers; else a private ``redis-server`` started for the run on a free port and stopped after.
    """
    if url is not None:
        if not _reachable(url):
            raise BenchmarkError(f"no Redis answers at {url}")
        yield url
        return
    if _reachable(DEFAULT_BROKER_URL):
        yield DEFAULT_BROKER_URL
        return
    server_binary = shutil.which("redis-server")
    if server_binary is None:
        raise BenchmarkError(f"no Redis answers at {DEFAULT_BROKER_URL} and redis-server is not installed")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
        server = subprocess.Popen(
            [server_binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", directory],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            private = f"redis://127.0.0.1:{port}/0"
            if not wait_until(lambda: _reachable(private), timeout=20, process=server):
                raise BenchmarkError("the private redis-server did not start")
            yield private
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def redis_version(url: str) -> str:
    """The version of the Redis server at ``url``."""
    try:
        return str(redis.Redis.from_url(url).info("server").get("redis_version", "unknown"))
    except redis.RedisError:
        return "unknown"


def publish(
    environment: Mapping[str, str], tasks: int, start_mark: str | None = None, end_mark: str | None = None
) -> None:
    """Run :mod:`benchmarks.celery_publish` with ``environment``; fail if it fails."""
    command = [sys.executable, "-m", "benchmarks.celery_publish", "--tasks", str(tasks)]
    if start_mark:
        command += ["--start-mark", start_mark]
    if end_mark:
        command += ["--end-mark", end_mark]
    try:
        completed = subprocess.run(
            command,
            cwd=ROOT,
            env=dict(environment),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # spyglass's log lines
            stderr=subprocess.PIPE,
            timeout=_PUBLISH_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(f"publishing {tasks} tasks took more than {_PUBLISH_TIMEOUT_S} s") from exc
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.decode("utf-8", "replace").splitlines()[-25:])
        raise BenchmarkError(f"the publisher failed with exit status {completed.returncode}:\n{tail}")


@dataclass
class Worker:
    """A running ``celery worker`` (the main process; its pool processes share its process group)."""

    process: subprocess.Popen
    queue: str
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the worker's output (for error messages)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_worker(
    environment: Mapping[str, str],
    queue: str,
    workdir: Path,
    arguments: Sequence[str] = (),
    loglevel: str = "INFO",
    concurrency: int = 2,
) -> Worker:
    """Start ``celery -A benchmarks.celery_app worker`` (prefork) consuming ``queue``; output goes to a file."""
    command = [
        str(CELERY),
        "-A",
        "benchmarks.celery_app",
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        "-Q",
        queue,
        "--hostname",
        f"{queue}@%h",
        "--without-mingle",  # no start-up exchange with other workers on this broker
        "--without-gossip",  # nor their events while it runs
        f"--loglevel={loglevel}",
        *arguments,
    ]
    log_path = workdir / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=dict(environment),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_worker reaches the pool too
        )
    return Worker(process, queue, log_path)


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds (user + system, all threads) used so far by a worker's main process and by each pool process."""

    main: float
    pool: Mapping[int, float]

    def since(self, earlier: CpuSnapshot) -> tuple[float, float]:
        """CPU seconds of the main process and of the pool processes between ``earlier`` and this snapshot.

        A pool process started in between counts from zero; one that exited in between is missing
        (the benchmarks do not recycle pool processes).
        """
        pool = sum(seconds - earlier.pool.get(pid, 0.0) for pid, seconds in self.pool.items())
        return self.main - earlier.main, pool


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def cpu_snapshot(worker: Worker) -> CpuSnapshot | None:
    """The CPU time used so far by ``worker``'s processes, or ``None`` where it cannot be read."""
    try:
        main = psutil.Process(worker.process.pid)
        pool = {}
        for child in main.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                pool[child.pid] = _cpu_seconds(child)
        return CpuSnapshot(_cpu_seconds(main), pool)
    except (psutil.Error, OSError):
        return None


def stop_worker(worker: Worker, timeout: float = 30.0) -> None:
    """Warm shutdown (SIGTERM: pool processes finish and flush), then SIGKILL the whole process group."""
    process = worker.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # pool processes left behind, if any
    if process.poll() is None:
        process.wait(timeout=10)


def delete_queue(broker: str, queue: str) -> None:
    """Delete every Redis key named after ``queue`` and every kombu binding that names it.

    That is the queue's lists (priorities included), its binding tables, the measurement's marks
    and the worker's control queue: queue names are unique per measurement, so nothing else
    matches. Deadlines kombu keeps for binding tables that no longer exist are dropped too.
    """
    client = redis.Redis.from_url(broker)
    keys = list(client.scan_iter(match=f"*{queue}*", count=1000))
    if keys:
        client.delete(*keys)
    token = queue.encode()
    for binding in client.scan_iter(match="_kombu.binding*", count=1000):
        with contextlib.suppress(redis.ResponseError):  # not a set
            stale = [member for member in client.smembers(binding) if token in member]
            if stale:
                client.srem(binding, *stale)
    with contextlib.suppress(redis.ResponseError):  # not a sorted set
        for exchange in client.zrange(_BINDING_DEADLINES, 0, -1):
            if not client.exists(b"_kombu.binding." + exchange):
                client.zrem(_BINDING_DEADLINES, exchange)
