"""A Celery worker that crashes loses no acknowledged order and charges none twice; its counters stay sane.

The real demo shop runs (:class:`demo_app.native.NativeDemo`: gunicorn, a prefork worker of two
pool processes, beat, Prometheus) while orders are placed at a steady rate. Every order answered
202 ("acknowledged") goes through reserve_stock -> charge_payment -> send_confirmation, whose
messages are acknowledged after the task ran and given back to the broker when the process running
them dies (``task_acks_late``, ``task_reject_on_worker_lost``). Tasks are slowed down (the
``slow_worker_ms`` switch, a slow payment provider) so that kills land mid-task.

The RabbitMQ run, in one go:

1. pool processes are SIGKILLed one after another while the worker's main process lives (and
   recycles them itself every few tasks, ``worker_max_tasks_per_child``);
2. the pool is SIGKILLed right after the payment provider charged an order and before the order
   was recorded paid, the moment a charge without an idempotency key would be made twice;
3. the whole worker (main process and pool, its process group) is SIGKILLed and started again;
4. the orders are left to complete.

The Redis run kills and restarts the whole worker with a short visibility timeout
(``DEMO_VISIBILITY_TIMEOUT``): Redis gives a dead worker's messages back only once it has passed.

The promises, read from the shop's SQLite database and the worker's metrics endpoint:

- every acknowledged order ends confirmed (or failed for a business reason) exactly once: stock
  taken once, one charge at the payment provider, one confirmation e-mail;
- no counter of the worker ever decreases while only pool processes die; a whole-worker restart
  resets each counter at most once, at the restart;
- the metrics directory does not grow with the number of pool processes that have lived.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from demo_app.native import PORT_VARIABLES, DemoOptions, NativeDemo, Ports
from tests.conftest import clean_environment, free_port, run_shop_script, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(20 * 60)]

REDIS_DB = 15
ADMIN_TOKEN = "worker-crashes-token"
ORDER_INTERVAL_S = 0.5  # two orders a second: six tasks a second, most of what two slowed pool processes run
SLOW_WORKER_MS = 150
PAYMENT_LATENCY_MS = 150
MAX_TASKS_PER_CHILD = 25
POOL_KILLS = 20
CHARGE_KILLS = 5
KILL_INTERVAL_S = 1.5
WORKER_DOWN_S = 3.0
VISIBILITY_TIMEOUT_S = 10
SETTLE_TIMEOUT_S = 240.0
SCRAPE_INTERVAL_S = 0.5
FINAL = ("confirmed", "failed")
BUSINESS_FAILURES = ("payment failed after", "out of stock")
"""A failed order is a business outcome only for these reasons (declined too often, no stock)."""


# --------------------------------------------------------------------------------------------
# What a run records


@dataclass(frozen=True)
class Placed:
    """An order the API acknowledged (202), and the phase of the run it was placed in."""

    order_id: int
    phase: str
    lines: tuple[tuple[int, int], ...]  # (product id, quantity)


@dataclass(frozen=True)
class Scrape:
    """One scrape of the worker's metrics endpoint: every counter-like sample, and the directory's files."""

    at: float
    phase: str
    worker_pid: int
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    files: int
    pool: int


@dataclass
class Outcome:
    """What the shop's database says about each order, charge and e-mail at the end of a run."""

    orders: dict[int, dict]
    charges: dict[int, list[dict]]
    emails: dict[int, list[dict]]
    stock: dict[int, int]


@dataclass
class CrashRun:
    """One scripted run: orders placed, kills done, scrapes taken, and the final state of the shop."""

    broker: str
    placed: list[Placed] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    pool_kills: list[tuple[float, int]] = field(default_factory=list)
    charge_kills: list[int] = field(default_factory=list)  # orders charged, not yet paid, when the pool was killed
    worker_killed_at: float = 0.0
    in_flight_at_kill: int = 0  # acknowledged orders not yet final when the whole worker was killed
    unacked_at_kill: int = 0  # Redis: messages the killed worker had taken and not acknowledged
    unacked_at_end: int = 0
    worker_restarted_at: float = 0.0
    settled_at: float = 0.0
    scrapes: list[Scrape] = field(default_factory=list)
    initial_stock: dict[int, int] = field(default_factory=dict)
    outcome: Outcome | None = None
    pool_pids_seen: set[int] = field(default_factory=set)
    max_files: int = 0
    max_pids_with_files: int = 0
    prometheus_resets: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)
    confirmed_log_lines: Counter[int] = field(default_factory=Counter)

    def placed_in(self, *phases: str) -> list[Placed]:
        return [order for order in self.placed if order.phase in phases]


# --------------------------------------------------------------------------------------------
# The shop's database, read directly


def _read_only(database: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(database, timeout=15)  # only ever reads
    connection.row_factory = sqlite3.Row
    return connection


def _seeded_stock(database: Path) -> dict[int, int]:
    """The stock of every product once the shop has created and seeded its database (web and worker start it)."""

    def seeded() -> dict[int, int] | None:
        try:
            return _stock(database) or None
        except sqlite3.Error:
            return None

    stock = wait_for(seeded, timeout=60, interval=0.5)
    assert stock, f"{database} was never seeded"
    return stock


def _stock(database: Path) -> dict[int, int]:
    with _read_only(database) as connection:
        return {row["id"]: row["stock"] for row in connection.execute("SELECT id, stock FROM products")}


def _statuses(database: Path, order_ids: list[int]) -> dict[int, str]:
    with _read_only(database) as connection:
        rows = connection.execute(
            f"SELECT id, status FROM orders WHERE id IN ({','.join('?' * len(order_ids))})", order_ids
        )
        return {row["id"]: row["status"] for row in rows}


def _outcome(database: Path, order_ids: list[int]) -> Outcome:
    marks = ",".join("?" * len(order_ids))
    with _read_only(database) as connection:
        orders = {
            row["id"]: dict(row) for row in connection.execute(f"SELECT * FROM orders WHERE id IN ({marks})", order_ids)
        }
        charges: dict[int, list[dict]] = defaultdict(list)
        for row in connection.execute(f"SELECT * FROM payment_charges WHERE order_id IN ({marks})", order_ids):
            charges[row["order_id"]].append(dict(row))
        emails: dict[int, list[dict]] = defaultdict(list)
        for row in connection.execute(f"SELECT * FROM confirmation_emails WHERE order_id IN ({marks})", order_ids):
            emails[row["order_id"]].append(dict(row))
    return Outcome(orders, dict(charges), dict(emails), _stock(database))


# --------------------------------------------------------------------------------------------
# Driving the demo


class Driver:
    """Places orders and scrapes the worker from background threads while the script kills processes."""

    def __init__(self, demo: NativeDemo, run: CrashRun) -> None:
        self.demo = demo
        self.run = run
        self.phase = "warm-up"
        self._stop_orders = threading.Event()
        self._stop_scrapes = threading.Event()
        self._threads = [
            threading.Thread(target=self._place_orders, daemon=True),
            threading.Thread(target=self._scrape, daemon=True),
        ]
        self._random = random.Random(8)

    @property
    def metrics_dir(self) -> Path:
        return self.demo.options.var / "metrics-worker"

    def __enter__(self) -> Driver:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_orders()
        self._stop_scrapes.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def stop_orders(self) -> None:
        self._stop_orders.set()
        self._threads[0].join(timeout=30)

    def _place_orders(self) -> None:
        session = requests.Session()
        while not self._stop_orders.wait(ORDER_INTERVAL_S):
            products = self._random.sample(range(1, 51), self._random.randint(1, 2))
            lines = tuple((product, self._random.randint(1, 2)) for product in products)
            body = {
                "customer_id": self._random.randint(1, 20),
                "items": [{"product_id": product, "quantity": quantity} for product, quantity in lines],
            }
            phase = self.phase
            try:
                response = session.post(f"{self.demo.app_url}/orders", json=body, timeout=10)
            except requests.RequestException as exc:
                self.run.refused.append((0, repr(exc)))
                continue
            if response.status_code == 202:
                self.run.placed.append(Placed(response.json()["order_id"], phase, lines))
            else:
                self.run.refused.append((response.status_code, response.text[:200]))

    def _scrape(self) -> None:
        url = f"http://127.0.0.1:{self.demo.options.ports.worker_metrics}/metrics"
        session = requests.Session()
        while not self._stop_scrapes.wait(SCRAPE_INTERVAL_S):
            self.scrape_once(session, url)

    def scrape_once(self, session: requests.Session, url: str) -> None:
        try:
            worker_pid = self.demo.pid("worker")
            pool = [child.pid for child in psutil.Process(worker_pid).children()]
            text = session.get(url, timeout=10).text
            files = os.listdir(self.metrics_dir)
        except (requests.RequestException, psutil.Error, OSError):
            return  # the worker is down
        self.run.pool_pids_seen.update(pool)
        self.run.max_files = max(self.run.max_files, len(files))
        pids = {name.rsplit("_", 1)[-1].split(".")[0] for name in files} - {"archive"}
        self.run.max_pids_with_files = max(self.run.max_pids_with_files, len(pids))
        values = {}
        for family in text_string_to_metric_families(text):
            if family.type not in ("counter", "histogram"):
                continue
            for sample in family.samples:
                if sample.name.endswith(("_total", "_count", "_sum", "_bucket")):
                    values[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        self.run.scrapes.append(Scrape(time.time(), self.phase, worker_pid, values, len(files), len(pool)))

    def kill_pool_processes(self, kills: int) -> None:
        """SIGKILL one pool process of the worker at a time, a random one, every KILL_INTERVAL_S."""
        while len(self.run.pool_kills) < kills:
            victims = wait_for(self._live_pool, timeout=30, interval=0.05)
            assert victims, "the worker has no pool process to kill"
            victim = self._random.choice(victims)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:  # it exited in between (recycled)
                continue
            self.run.pool_kills.append((time.time(), victim))
            time.sleep(KILL_INTERVAL_S)

    def _live_pool(self) -> list[int]:
        """The worker's pool processes that are alive (a killed one stays a zombie until reaped)."""
        pool = []
        for child in psutil.Process(self.demo.pid("worker")).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    pool.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return pool

    def kill_pool_after_charges(self, database: Path, kills: int, timeout: float = 60.0) -> None:
        """SIGKILL the whole pool right after the payment provider charged an order, before it is recorded paid.

        The provider takes half its latency to answer after recording the charge: the test watches the
        ledger for a charge whose order is still ``reserved`` and kills then.
        """
        deadline = time.monotonic() + timeout
        with _read_only(database) as connection:
            while len(self.run.charge_kills) < kills and time.monotonic() < deadline:
                row = connection.execute(
                    "SELECT c.order_id FROM payment_charges c JOIN orders o ON o.id = c.order_id"
                    " WHERE o.status = 'reserved' AND c.replays = 0 LIMIT 1"
                ).fetchone()
                if row is None:
                    time.sleep(0.002)
                    continue
                for pid in self._live_pool():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                # Still reserved now that the pool is dead (its task cannot run again for a while,
                # in a new pool process, after the slow-worker delay): the kill fell in the window.
                status = connection.execute("SELECT status FROM orders WHERE id = ?", (row["order_id"],)).fetchone()
                if status["status"] == "reserved":
                    self.run.charge_kills.append(row["order_id"])
                time.sleep(KILL_INTERVAL_S)  # the main process starts a new pool

    def kill_and_restart_worker(self) -> None:
        """SIGKILL the worker's process group (main process and pool at once), then start it again."""
        database = self.demo.options.var / "shop.db"

        def in_flight() -> int:
            statuses = _statuses(database, [order.order_id for order in self.run.placed])
            return sum(1 for status in statuses.values() if status not in FINAL)

        # Kill while the worker has orders in hand (there nearly always are, at this rate).
        wait_for(lambda: in_flight() >= 2, timeout=20, interval=0.05)
        self.run.in_flight_at_kill = in_flight()
        if self.run.broker == "redis":
            self.run.unacked_at_kill = _unacked(self.demo.options.redis_url)
        self.run.worker_killed_at = time.time()
        self.demo.kill_process("worker")
        time.sleep(WORKER_DOWN_S)
        self.demo.start_process("worker")
        self.run.worker_restarted_at = time.time()

    def settle(self, database: Path) -> None:
        """Wait until every acknowledged order has reached a final status (or SETTLE_TIMEOUT_S)."""
        order_ids = [order.order_id for order in self.run.placed]

        def all_final() -> bool:
            return all(status in FINAL for status in _statuses(database, order_ids).values())

        wait_for(all_final, timeout=SETTLE_TIMEOUT_S, interval=1.0)
        self.run.settled_at = time.time()
        time.sleep(3 * SCRAPE_INTERVAL_S)  # a few scrapes after the last task


def _unacked(broker_url: str) -> int:
    """Messages delivered and not yet acknowledged, on a Redis broker (kombu keeps them in the ``unacked`` hash)."""
    return redis.Redis.from_url(broker_url).hlen("unacked")


def _options(tmp: Path, shop_redis: str) -> DemoOptions:
    ports = Ports.from_environment({name: str(free_port()) for name in PORT_VARIABLES})
    return DemoOptions(ports=ports, var_root=tmp, redis_url=shop_redis, admin_token=ADMIN_TOKEN)


def _environment(**overrides: str) -> dict[str, str]:
    environ = clean_environment(
        DEMO_FAULT_SLOW_WORKER_MS=str(SLOW_WORKER_MS),
        DEMO_PAYMENT_LATENCY_MS=str(PAYMENT_LATENCY_MS),
        DEMO_RETRY_BACKOFF="0.2",
        DEMO_PAYMENT_MAX_RETRIES="4",
        OTEL_BSP_SCHEDULE_DELAY="500",
    )
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        environ.pop(name, None)
    environ.update(overrides)
    return environ


def _shop_redis(redis_url: str) -> str:
    url = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    return url


def _finish(run: CrashRun, demo: NativeDemo, driver: Driver) -> None:
    database = demo.options.var / "shop.db"
    driver.settle(database)
    run.outcome = _outcome(database, [order.order_id for order in run.placed])
    for line in (demo.options.var / "worker.log").read_text(errors="replace").splitlines():
        if '"order confirmed"' in line:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a SIGKILL
                continue
            run.confirmed_log_lines[int(record["order_id"])] += 1


def _prometheus_resets(demo: NativeDemo, since: float) -> dict[tuple[tuple[str, str], ...], float]:
    """``resets()`` of the worker's completed-task counter over the run, per series, as Prometheus saw them."""
    window = f"{int(time.time() - since) + 1}s"
    response = requests.get(
        f"http://127.0.0.1:{demo.options.ports.prometheus}/api/v1/query",
        params={"query": f'resets(celery_task_completed_total{{job="shop-worker"}}[{window}])'},
        timeout=30,
    )
    response.raise_for_status()
    return {
        tuple(sorted(item["metric"].items())): float(item["value"][1]) for item in response.json()["data"]["result"]
    }


@pytest.fixture(scope="module")
def rabbitmq_vhost() -> Iterator[str]:
    """A RabbitMQ virtual host of its own (the demo's queue names are fixed), deleted afterwards."""
    vhost = f"spyglass-crashes-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def rabbitmq_run(tmp_path_factory: pytest.TempPathFactory, redis_url: str, rabbitmq_vhost: str) -> CrashRun:
    """Pool processes killed one by one, then the whole worker killed and restarted, on RabbitMQ."""
    run = CrashRun("rabbitmq")
    options = _options(tmp_path_factory.mktemp("crashes-rabbitmq"), _shop_redis(redis_url))
    environ = _environment(CELERY_BROKER_URL=rabbitmq_vhost, DEMO_MAX_TASKS_PER_CHILD=str(MAX_TASKS_PER_CHILD))
    with NativeDemo(options, environ) as demo:
        run.initial_stock = _seeded_stock(options.var / "shop.db")
        started = time.time()
        with Driver(demo, run) as driver:
            time.sleep(10)
            driver.phase = "pool-kills"
            driver.kill_pool_processes(POOL_KILLS)
            driver.phase = "charge-kills"
            driver.kill_pool_after_charges(options.var / "shop.db", CHARGE_KILLS)
            driver.phase = "worker-restart"
            time.sleep(5)
            driver.kill_and_restart_worker()
            time.sleep(10)
            driver.phase = "after"
            time.sleep(5)
            driver.stop_orders()
            _finish(run, demo, driver)
        time.sleep(12)  # a Prometheus scrape after the last task
        run.prometheus_resets = _prometheus_resets(demo, started)
    return run


@pytest.fixture(scope="module")
def redis_run(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> CrashRun:
    """The whole worker killed and restarted on Redis, with a visibility timeout of VISIBILITY_TIMEOUT_S."""
    run = CrashRun("redis")
    shop_redis = _shop_redis(redis_url)
    options = _options(tmp_path_factory.mktemp("crashes-redis"), shop_redis)
    # Slower tasks than the orders need: a backlog builds, and the worker holds prefetched messages when killed.
    environ = _environment(
        DEMO_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT_S), DEMO_FAULT_SLOW_WORKER_MS=str(3 * SLOW_WORKER_MS)
    )
    with NativeDemo(options, environ) as demo:
        run.initial_stock = _seeded_stock(options.var / "shop.db")
        with Driver(demo, run) as driver:
            time.sleep(10)
            driver.phase = "worker-restart"
            driver.kill_and_restart_worker()
            time.sleep(5)
            driver.phase = "after"
            time.sleep(5)
            driver.stop_orders()
            _finish(run, demo, driver)
        # Every message taken has been acknowledged (a maintenance task from beat may be running).
        wait_for(lambda: _unacked(shop_redis) == 0, timeout=15, interval=0.5)
        run.unacked_at_end = _unacked(shop_redis)
    return run


# --------------------------------------------------------------------------------------------
# The promises


def _exactly_once_problems(run: CrashRun, placed: list[Placed]) -> list[str]:
    """What is wrong with the outcome of ``placed``: unfinished, failed for no business reason, charged or
    mailed other than once, or the wrong stock taken.
    """
    outcome = run.outcome
    assert outcome is not None
    problems = []
    for order in placed:
        row = outcome.orders[order.order_id]
        charges = outcome.charges.get(order.order_id, [])
        emails = outcome.emails.get(order.order_id, [])
        if row["status"] not in FINAL:
            problems.append(f"order {order.order_id} ({order.phase}) stuck in {row['status']}")
        elif row["status"] == "failed" and not any(reason in row["failure_reason"] for reason in BUSINESS_FAILURES):
            problems.append(f"order {order.order_id} ({order.phase}) failed: {row['failure_reason']}")
        expected = 1 if row["status"] == "confirmed" else 0
        if len(charges) != expected or any(charge["amount_cents"] != row["total_cents"] for charge in charges):
            problems.append(f"order {order.order_id} ({order.phase}, {row['status']}) charged {charges}")
        if len(emails) != expected:
            problems.append(f"order {order.order_id} ({order.phase}, {row['status']}) mailed {len(emails)} times")
        if run.confirmed_log_lines[order.order_id] > 1:
            problems.append(f"order {order.order_id} logged as confirmed {run.confirmed_log_lines[order.order_id]}x")
    # Stock: what confirmed orders took, nothing for failed ones (never taken, or given back).
    taken: Counter[int] = Counter()
    for order in run.placed:
        if outcome.orders[order.order_id]["status"] == "confirmed":
            for product, quantity in order.lines:
                taken[product] += quantity
    for product, before in run.initial_stock.items():
        if outcome.stock[product] != before - taken[product]:
            problems.append(
                f"product {product}: stock {outcome.stock[product]}, expected {before} - {taken[product]} taken"
            )
    return problems


def _summary(run: CrashRun) -> str:
    outcome = run.outcome
    assert outcome is not None
    statuses = Counter(row["status"] for row in outcome.orders.values())
    charge_replays = sum(charge["replays"] for charges in outcome.charges.values() for charge in charges)
    email_replays = sum(email["replays"] for emails in outcome.emails.values() for email in emails)
    return (
        f"{run.broker}: {len(run.placed)} orders acknowledged, {dict(statuses)}; {len(run.pool_kills)} pool kills; "
        f"repeated charges absorbed {charge_replays}, repeated e-mails absorbed {email_replays}; "
        f"{run.in_flight_at_kill} orders in flight when the worker was killed, all final "
        f"{run.settled_at - run.worker_restarted_at:.0f}s after its restart"
    )


def test_every_acknowledged_order_completes_exactly_once_while_pool_processes_are_killed(
    rabbitmq_run: CrashRun,
) -> None:
    """Pool processes SIGKILLed mid-task, one after another: every order acknowledged before the
    worker itself was killed ends confirmed (or failed for a business reason), with its stock taken
    once, one charge at the payment provider and one confirmation e-mail.
    """
    run = rabbitmq_run
    print(_summary(run))
    assert run.refused == [], run.refused[:5]
    confirmed = sum(1 for row in run.outcome.orders.values() if row["status"] == "confirmed")
    assert sum(run.confirmed_log_lines.values()) >= 0.9 * confirmed, "the worker's log lines were not read"
    placed = run.placed_in("warm-up", "pool-kills", "charge-kills")
    assert len(run.placed_in("pool-kills")) >= POOL_KILLS, "orders were not placed while pool processes were killed"
    assert len(run.pool_kills) == POOL_KILLS
    assert _exactly_once_problems(run, placed) == []


def test_a_pool_killed_after_the_provider_charged_does_not_charge_the_order_twice(rabbitmq_run: CrashRun) -> None:
    """The pool killed just after the payment provider charged an order, before the order was recorded
    paid: the charge task runs again, the provider returns the recorded charge (the order is its
    idempotency key), and the order ends confirmed with one charge.
    """
    run = rabbitmq_run
    outcome = run.outcome
    assert outcome is not None
    assert len(run.charge_kills) == CHARGE_KILLS, "charges were not caught between provider and order"
    for order_id in run.charge_kills:
        charges = outcome.charges.get(order_id, [])
        assert outcome.orders[order_id]["status"] == "confirmed", outcome.orders[order_id]
        assert len(charges) == 1, charges
        assert charges[0]["replays"] >= 1, f"order {order_id}: the charge was never asked for again"


def test_kills_of_pool_processes_landed_mid_task_and_were_requeued(rabbitmq_run: CrashRun) -> None:
    """The kills hit running tasks: the worker's main process counted them as worker_lost endings, and
    the tasks ran again (the orders completed, above).
    """
    random_kills = [scrape for scrape in rabbitmq_run.scrapes if scrape.phase in ("warm-up", "pool-kills")]
    lost = sum(
        value
        for (name, labels), value in random_kills[-1].values.items()
        if name == "celery_task_completed_total" and ("outcome", "worker_lost") in labels
    )
    print(f"{lost:.0f} of {POOL_KILLS} pool kills interrupted a task")
    assert lost >= POOL_KILLS // 2, lost


def test_every_acknowledged_order_completes_exactly_once_when_the_whole_worker_is_killed(
    rabbitmq_run: CrashRun, redis_run: CrashRun
) -> None:
    """The worker's main process and pool SIGKILLed at once and started again: the orders it held
    (running, prefetched, waiting in the broker) and those placed while it was down all complete
    exactly once. RabbitMQ gives the dead worker's messages back at once; Redis once the visibility
    timeout has passed.
    """
    for run in (rabbitmq_run, redis_run):
        print(_summary(run))
        assert run.refused == [], run.refused[:5]
        assert run.placed_in("worker-restart"), f"{run.broker}: no orders placed around the restart"
        assert run.in_flight_at_kill > 0, f"{run.broker}: the worker held no order when it was killed"
        assert _exactly_once_problems(run, run.placed) == [], run.broker
    # Redis held the dead worker's messages back until the visibility timeout, then gave them out.
    print(f"redis: the killed worker held {redis_run.unacked_at_kill} unacknowledged messages")
    assert redis_run.unacked_at_kill > 0
    assert redis_run.unacked_at_end == 0


def _decreases(scrapes: list[Scrape]) -> list[str]:
    """Every counter sample that went down from one scrape to the next."""
    found = []
    last: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, float]] = {}
    for scrape in scrapes:
        for key, value in scrape.values.items():
            previous = last.get(key)
            if previous is not None and value < previous[1]:
                found.append(f"{key} {previous[1]} at {previous[0]:.1f} -> {value} at {scrape.at:.1f}")
            last[key] = (scrape.at, value)
    return found


def test_no_counter_of_the_worker_decreases_while_pool_processes_are_killed_and_recycled(
    rabbitmq_run: CrashRun,
) -> None:
    """Across pool processes killed and recycled (the main process living), no counter or histogram
    sample on the worker's endpoint ever goes down: the exited processes' counts are kept.
    """
    run = rabbitmq_run
    before_restart = [scrape for scrape in run.scrapes if scrape.at < run.worker_killed_at]
    assert len({scrape.worker_pid for scrape in before_restart}) == 1
    assert len(before_restart) > 30
    assert len(run.pool_pids_seen) >= POOL_KILLS, "pool processes were not replaced"
    assert _decreases(before_restart) == []


def test_a_worker_restart_resets_each_counter_at_most_once_at_the_restart(rabbitmq_run: CrashRun) -> None:
    """Across the whole-worker restart, counters start again from zero once (a reset Prometheus's
    rate() handles), and never go down otherwise; Prometheus's resets() agrees.
    """
    run = rabbitmq_run
    before = [scrape for scrape in run.scrapes if scrape.at < run.worker_killed_at]
    after = [scrape for scrape in run.scrapes if scrape.at > run.worker_restarted_at]
    assert before and after and after[0].worker_pid != before[-1].worker_pid
    assert _decreases(after) == []
    assert run.prometheus_resets, "Prometheus has no celery_task_completed_total of the worker"
    print(f"Prometheus resets() per worker series over the run: {Counter(run.prometheus_resets.values())}")
    assert max(run.prometheus_resets.values()) <= 1, run.prometheus_resets
    # The restart did reset them: the first values after it are below the last ones before it.
    completed = (
        "celery_task_completed_total",
        (("outcome", "success"), ("queue", "orders"), ("task_name", "shop.reserve_stock")),
    )
    assert after[0].values.get(completed, 0.0) < before[-1].values[completed]


def test_the_metrics_directory_stays_small_however_many_pool_processes_lived(rabbitmq_run: CrashRun) -> None:
    """Pool processes killed and recycled leave no files behind: the worker's metrics directory holds
    the files of the living processes and one archive per kind of value, whatever the number of
    processes that have lived.
    """
    run = rabbitmq_run
    lived = len(run.pool_pids_seen)
    final = run.scrapes[-1]
    print(
        f"{lived} pool processes lived; at most {run.max_files} files of {run.max_pids_with_files} processes"
        f" in the metrics directory, {final.files} at the end"
    )
    assert lived >= POOL_KILLS + 2
    # Per process at most one file per kind of value (counter, histogram, live gauges, exemplars):
    # the main process, two pool processes (three while one is replaced), and the archive.
    assert run.max_files <= 6 * 5, run.max_files
    # Files of at most the main process, the pool, and the few processes that exited since the last
    # compaction pass (every second; kills and recycling can retire several within one on a busy
    # machine): a bound that does not depend on how many processes lived.
    assert run.max_pids_with_files <= 1 + 2 + 4, run.max_pids_with_files
    assert run.max_pids_with_files * 3 <= lived, (run.max_pids_with_files, lived)


# --------------------------------------------------------------------------------------------
# The idempotency the promises rest on, shown directly


def _shop_script_result(script: str, tmp_path: Path, redis_url: str) -> dict:
    """What a snippet run against a fresh SQLite shop printed after ``RESULT ``."""
    result = run_shop_script(
        script,
        unset=["DATABASE_URL"],
        DEMO_VAR_DIR=str(tmp_path),
        DEMO_REDIS_URL=redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}",
        DEMO_PAYMENT_FAILURE_RATE="0",
        DEMO_PAYMENT_LATENCY_MS="0",
    )
    line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert line, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(line[len("RESULT ") :])


def test_a_charge_task_run_again_after_its_worker_died_past_the_charge_does_not_charge_twice(
    tmp_path: Path, redis_url: str
) -> None:
    """The pool process charged the order and died before recording it as paid; the message comes
    back and charge_payment runs again: the provider returns the recorded charge (same id), the
    order is paid, and the ledger holds one charge for it.
    """
    result = _shop_script_result(
        """
        import json
        from sqlalchemy import select
        from demo_app import db, payment, tasks
        from demo_app.models import Charge, Order, OrderLine
        db.ensure_schema()
        with db.session() as session:
            order = Order(customer_id=1, status="reserved", total_cents=1234,
                          lines=[OrderLine(product_id=1, quantity=1, price_cents=1234)])
            session.add(order)
        first = payment.charge(order.id, 1234, 0)  # the run that died
        tasks.charge_payment.apply(args=(order.id,)).get()  # the message delivered again
        with db.session() as session:
            status = session.get(Order, order.id).status
            charges = session.scalars(select(Charge).where(Charge.order_id == order.id)).all()
            ledger = [(charge.charge_id, charge.amount_cents, charge.replays) for charge in charges]
        try:
            payment.charge(order.id, 999, 0)
            reused = None
        except payment.IdempotencyKeyReused as exc:
            reused = str(exc)
        print("RESULT " + json.dumps({"first": first, "status": status, "ledger": ledger, "reused": reused}))
        """,
        tmp_path,
        redis_url,
    )
    assert result["status"] == "paid"
    assert result["ledger"] == [[result["first"], 1234, 1]]
    assert result["reused"] and "1234" in result["reused"]


def test_a_chain_step_run_twice_takes_stock_and_sends_the_e_mail_once(tmp_path: Path, redis_url: str) -> None:
    """Each step of the order chain run a second time after it completed (a message delivered again)
    changes nothing: the stock is taken once, the order stays confirmed, one e-mail is recorded.
    """
    result = _shop_script_result(
        """
        import json
        from sqlalchemy import select
        from demo_app import db, tasks
        from demo_app.models import ConfirmationEmail, Order, OrderLine, Product
        db.ensure_schema()
        with db.session() as session:
            before = session.get(Product, 2).stock
            order = Order(customer_id=1, total_cents=500, lines=[OrderLine(product_id=2, quantity=3, price_cents=500)])
            session.add(order)
        for step in (tasks.reserve_stock, tasks.charge_payment, tasks.send_confirmation):
            step.apply(args=(order.id,)).get()
            step.apply(args=(order.id,)).get()
        with db.session() as session:
            after = session.get(Product, 2).stock
            status = session.get(Order, order.id).status
            attempts = session.get(Order, order.id).payment_attempts
            emails = session.scalars(select(ConfirmationEmail).where(ConfirmationEmail.order_id == order.id)).all()
        print("RESULT " + json.dumps({"taken": before - after, "status": status, "attempts": attempts,
                                      "emails": len(emails)}))
        """,
        tmp_path,
        redis_url,
    )
    assert result == {"taken": 3, "status": "confirmed", "attempts": 1, "emails": 1}
