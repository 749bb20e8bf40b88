"""The shop's Celery app: the order chain, the sales report chord and the minute maintenance.

Start a worker with ``celery -A demo_app.tasks worker -Q orders,reports,maintenance`` and beat
with ``celery -A demo_app.tasks beat``. Like the web app, this module is instrumented by its first
import alone.

- ``shop.reserve_stock`` → ``shop.charge_payment`` → ``shop.send_confirmation`` (queue
  ``orders``): an order is reserved (or fails out of stock), charged (a failed charge retries
  with exponential backoff and jitter, then fails the order and releases its stock) and confirmed.
- ``shop.sales_for_products`` (a group, one per slice of products) → ``shop.combine_sales``
  (the chord's callback), queue ``reports``.
- ``shop.maintenance`` (beat, every minute, queue ``maintenance``): expires orders stuck before
  payment and restocks products running low.

Messages are acknowledged after the task ran (``task_acks_late``) and given back to the broker when
the pool process running them dies (``task_reject_on_worker_lost``), so a task may run twice, even
twice at once (a chain step that published its successor just before its worker died). Each step
is therefore idempotent: an order moves from one status to the next with a conditional update that
only one run can win, stock is taken and given back only by the run that moved the status, and the
payment provider and the mail service record each charge and e-mail under the order's idempotency
key (:mod:`demo_app.payment`), so a repeated run gets the recorded one back.
"""

import spyglass.auto  # noqa: F401,I001 - first: instruments Celery, SQLAlchemy and logging

import logging
import random
import time
from datetime import timedelta
from typing import Any

from celery import Celery, Task, chain, chord, group
from celery.exceptions import Ignore
from celery.signals import worker_process_init, worker_ready
from sqlalchemy import func, select, update
from sqlalchemy.orm import selectinload

from demo_app import broker, cache, db, faults, payment
from demo_app import settings as shop_settings
from demo_app.models import ConfirmationEmail, Order, OrderLine, Product, utcnow

__all__ = [
    "WORKER_PUBLISH_RETRY_POLICY",
    "OutOfStock",
    "app",
    "charge_payment",
    "combine_sales",
    "fail_order",
    "maintenance",
    "order_workflow",
    "reserve_stock",
    "sales_for_products",
    "sales_report",
    "send_confirmation",
]

_settings = shop_settings.current()
_logger = logging.getLogger("demo_app.tasks")
ORDER_EXPIRY = timedelta(minutes=10)
LOW_STOCK = 20
RESTOCK = 200
REPORT_SLICES = 5
# A chain step's successor (and a retry) is published from the worker after the step ran: with the
# broker down, keep trying for about a minute (0.5, 1, 1.5, then every 2 s) rather than drop the
# order between two steps. The web passes its own short policy: it must answer 503 at once.
WORKER_PUBLISH_RETRY_POLICY = {"max_retries": 30, "interval_start": 0, "interval_step": 0.5, "interval_max": 2}


class ShopTask(Task):
    """Every shop task: the slow-worker switch delays it before its work."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        slow_ms = faults.current().slow_worker_ms
        if slow_ms:
            time.sleep(slow_ms / 1000.0)
        return super().__call__(*args, **kwargs)


app = Celery("shop", task_cls=ShopTask)
app.conf.update(
    broker_url=_settings.broker_url,
    broker_transport=broker.transport_for(_settings.broker_url),
    result_backend=_settings.result_backend,
    result_expires=3600,
    task_default_queue="orders",
    task_routes={
        "shop.sales_for_products": {"queue": "reports"},
        "shop.combine_sales": {"queue": "reports"},
        "shop.maintenance": {"queue": "maintenance"},
    },
    beat_schedule={"shop-maintenance": {"task": "shop.maintenance", "schedule": _settings.maintenance_interval_s}},
    task_acks_late=True,
    # Hard limit: the pool process running a task this long is killed (outcome time_limit).
    task_time_limit=_settings.task_time_limit_s,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=4,
    task_publish_retry_policy=WORKER_PUBLISH_RETRY_POLICY,
    broker_connection_timeout=_settings.publish_timeout_s,
    broker_connection_retry_on_startup=True,
    broker_transport_options=_settings.broker_transport_options(),
    redis_socket_connect_timeout=1.0,
    redis_socket_timeout=5.0,
    worker_max_tasks_per_child=_settings.max_tasks_per_child or None,
)


class OutOfStock(Exception):
    """A product of the order has less stock than ordered."""


@worker_process_init.connect
def _fresh_connections(**_kwargs: Any) -> None:
    # A pool process must not share the parent's database connections.
    db.engine().dispose(close=False)


@worker_ready.connect
def _prepare(sender: Any = None, **_kwargs: Any) -> None:
    db.ensure_schema()
    db.engine().dispose()
    for queue in faults.current().paused_queues:  # the switch outlives a worker restart
        _logger.warning("not consuming queue %s (paused_queues switch)", queue)
        sender.cancel_task_queue(queue)


def order_workflow(order_id: int) -> Any:
    """The chain that takes an order from pending to confirmed (or failed)."""
    return chain(reserve_stock.si(order_id), charge_payment.s(), send_confirmation.s())


def sales_report(product_ids: list[int]) -> Any:
    """The chord that computes sales per slice of products and combines them."""
    slices = [product_ids[index::REPORT_SLICES] for index in range(REPORT_SLICES)]
    return chord(group(sales_for_products.s(part) for part in slices if part), combine_sales.s())


def fail_order(order_id: int, reason: str) -> None:
    """Mark an order failed and give back the stock it had reserved.

    Only an order not yet charged (pending or reserved) can fail; of two runs failing the same
    order at once, only the one that changes its status gives the stock back.
    """
    with db.session() as session:
        order = session.get(Order, order_id, options=[selectinload(Order.lines)])
        if order is None or order.status not in ("pending", "reserved"):
            return
        reserved = order.status == "reserved"
        failed = session.execute(
            update(Order)
            .where(Order.id == order_id, Order.status == order.status)
            .values(status="failed", failure_reason=reason[:200])
        ).rowcount
        if not failed:
            return  # another run moved it on in between
        if reserved:
            for line in order.lines:
                session.execute(
                    update(Product).where(Product.id == line.product_id).values(stock=Product.stock + line.quantity)
                )
        products = [line.product_id for line in order.lines] if reserved else []
    for product_id in products:
        cache.forget_product(product_id)
    _logger.warning("order failed", extra={"order_id": order_id, "reason": reason})


@app.task(name="shop.reserve_stock")
def reserve_stock(order_id: int) -> int:
    """Take the ordered quantities out of stock; an order that cannot be served fails and ends the chain."""
    try:
        with db.session() as session:
            order = session.get(Order, order_id, options=[selectinload(Order.lines)])
            if order is None:
                _logger.error("order to reserve does not exist", extra={"order_id": order_id})
                raise Ignore()
            if order.status != "pending":
                return order_id  # a redelivered message: already reserved
            claimed = session.execute(
                update(Order).where(Order.id == order_id, Order.status == "pending").values(status="reserved")
            ).rowcount
            if not claimed:
                return order_id  # another delivery of the message reserved it in between
            for line in order.lines:
                taken = session.execute(
                    update(Product)
                    .where(Product.id == line.product_id, Product.stock >= line.quantity)
                    .values(stock=Product.stock - line.quantity)
                ).rowcount
                if not taken:  # rolls back the stock taken so far and the status
                    raise OutOfStock(f"product {line.product_id} is out of stock")
            products = [line.product_id for line in order.lines]
    except OutOfStock as exc:
        fail_order(order_id, str(exc))
        raise Ignore() from exc
    for product_id in products:
        cache.forget_product(product_id)
    return order_id


@app.task(name="shop.charge_payment", bind=True, max_retries=None)
def charge_payment(self: Task, order_id: int) -> int:
    """Charge the order at the payment provider, retrying with backoff; gives up into a failed order.

    The provider charges once per order (its idempotency key), however often this runs.
    """
    with db.session() as session:
        counted = session.execute(
            update(Order)
            .where(Order.id == order_id, Order.status == "reserved")
            .values(payment_attempts=Order.payment_attempts + 1)
        ).rowcount
        if not counted:
            return order_id  # unknown, failed, or charged by an earlier delivery
        amount = session.scalars(select(Order.total_cents).where(Order.id == order_id)).one()
    try:
        charge_id = payment.charge(order_id, amount, _settings.payment_latency_ms)
    except payment.PaymentError as exc:
        attempts = self.request.retries + 1
        if self.request.retries >= _settings.payment_max_retries:
            fail_order(order_id, f"payment failed after {attempts} attempts: {exc}")
            raise
        countdown = _settings.retry_backoff_s * 2**self.request.retries * random.uniform(0.5, 1.5)
        _logger.info("charge failed, retrying", extra={"order_id": order_id, "attempt": attempts, "in_s": countdown})
        raise self.retry(exc=exc, countdown=countdown) from exc
    with db.session() as session:
        paid = session.execute(
            update(Order).where(Order.id == order_id, Order.status == "reserved").values(status="paid")
        ).rowcount
    if paid:
        _logger.info("order charged", extra={"order_id": order_id, "charge_id": charge_id, "amount_cents": amount})
    return order_id


@app.task(name="shop.send_confirmation")
def send_confirmation(order_id: int) -> int:
    """Confirm the order to the customer: the e-mail (simulated, once per order), then the status."""
    with db.session() as session:
        order = session.get(Order, order_id)
        if order is None or order.status != "paid":
            return order_id
    _send_confirmation_email(order_id)
    with db.session() as session:
        confirmed = session.execute(
            update(Order).where(Order.id == order_id, Order.status == "paid").values(status="confirmed")
        ).rowcount
    if confirmed:
        _logger.info("order confirmed", extra={"order_id": order_id})
    return order_id


def _send_confirmation_email(order_id: int) -> None:
    """The mail service's stand-in: sends (records) one e-mail per order; a repeat gets the first back."""
    key = f"confirmation-{order_id}"
    if db.replay(ConfirmationEmail, key) is None:
        time.sleep(0.005)  # the mail service's latency
        db.record(ConfirmationEmail, key, order_id=order_id)


@app.task(name="shop.sales_for_products")
def sales_for_products(product_ids: list[int]) -> list[dict[str, int]]:
    """Units sold and revenue of confirmed orders, for some products."""
    with db.session() as session:
        rows = session.execute(
            select(
                OrderLine.product_id,
                func.sum(OrderLine.quantity),
                func.sum(OrderLine.quantity * OrderLine.price_cents),
            )
            .join(Order, Order.id == OrderLine.order_id)
            .where(Order.status == "confirmed", OrderLine.product_id.in_(product_ids))
            .group_by(OrderLine.product_id)
        ).all()
    return [{"product_id": pid, "units": int(units), "revenue_cents": int(revenue)} for pid, units, revenue in rows]


@app.task(name="shop.combine_sales")
def combine_sales(parts: list[list[dict[str, int]]]) -> dict[str, Any]:
    """The report: totals and the five best sellers."""
    rows = [row for part in parts for row in part]
    top = sorted(rows, key=lambda row: row["revenue_cents"], reverse=True)[:5]
    return {
        "products": len(rows),
        "units": sum(row["units"] for row in rows),
        "revenue_cents": sum(row["revenue_cents"] for row in rows),
        "top": top,
    }


@app.task(name="shop.maintenance")
def maintenance() -> dict[str, int]:
    """Expire orders stuck before payment; restock products running low."""
    stale_before = utcnow() - ORDER_EXPIRY
    with db.session() as session:
        stale = session.scalars(
            select(Order.id).where(Order.status.in_(("pending", "reserved")), Order.created_at < stale_before)
        ).all()
        low = session.scalars(select(Product.id).where(Product.stock < LOW_STOCK)).all()
        if low:
            session.execute(update(Product).where(Product.id.in_(low)).values(stock=Product.stock + RESTOCK))
    for order_id in stale:
        fail_order(order_id, "expired before payment")
    for product_id in low:
        cache.forget_product(product_id)
    _logger.info("maintenance done", extra={"expired_orders": len(stale), "restocked_products": len(low)})
    return {"expired_orders": len(stale), "restocked_products": len(low)}
