"""The shop's JSON API (Flask). Run it with ``gunicorn -c python:spyglass.gunicorn demo_app.web:app``.

Instrumented the way a user would: ``import spyglass.auto`` first, then plain Flask, SQLAlchemy,
Redis and Celery code. Errors are JSON: 400 malformed JSON, 404 unknown resource, 413 body over
64 KiB, 415 not JSON, 422 an order that cannot be placed (field errors, unknown product or
customer), 503 broker unavailable (quickly, with ``Retry-After``).
"""

import spyglass.auto  # noqa: F401,I001 - first: instruments Flask, Celery, SQLAlchemy and logging

import hmac
import json
import logging
import random
import time
from typing import Any

import redis
from flask import Flask, Response, abort, jsonify, request
from kombu.exceptions import OperationalError as BrokerError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import joinedload, selectinload
from werkzeug.exceptions import HTTPException

from demo_app import cache, db, faults, tasks
from demo_app import settings as shop_settings
from demo_app.models import Customer, Order, OrderLine, Product

__all__ = ["MAX_BODY_BYTES", "PUBLISH_RETRY_POLICY", "OrderRequest", "app", "create_app"]

MAX_BODY_BYTES = 64 * 1024
# A broker that refuses connections is retried twice within half a second, then the API answers 503.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
_logger = logging.getLogger("demo_app.web")


class InjectedFault(RuntimeError):
    """An error the ``error_rate`` switch injected on purpose."""


class OrderItem(BaseModel):
    """One line of an order request."""

    model_config = ConfigDict(extra="forbid", strict=True)
    product_id: int = Field(gt=0)
    quantity: int = Field(gt=0, le=100)


class OrderRequest(BaseModel):
    """The body of ``POST /orders``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    customer_id: int = Field(gt=0)
    items: list[OrderItem] = Field(min_length=1, max_length=50)


def _error(status: int, message: str, **details: Any) -> Response:
    response = jsonify(error=message, **details)
    response.status_code = status
    return response


def _json_body() -> Any:
    if not request.is_json:
        abort(415, description="send the body as application/json")
    raw = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        abort(400, description=f"malformed JSON body: {exc}")


def _product_dict(product: Product) -> dict[str, Any]:
    return {
        "id": product.id,
        "sku": product.sku,
        "name": product.name,
        "price_cents": product.price_cents,
        "stock": product.stock,
    }


def _order_dict(order: Order) -> dict[str, Any]:
    return {
        "id": order.id,
        "customer": {"id": order.customer.id, "name": order.customer.name},
        "status": order.status,
        "failure_reason": order.failure_reason,
        "total_cents": order.total_cents,
        "payment_attempts": order.payment_attempts,
        "created_at": order.created_at.isoformat() + "Z",
        "lines": [
            {"product_id": line.product_id, "product": line.product.name, "quantity": line.quantity}
            for line in order.lines
        ],
    }


def _load_product(product_id: int) -> dict[str, Any] | None:
    with db.session() as session:
        product = session.get(Product, product_id)
        return _product_dict(product) if product is not None else None


def _limit() -> int:
    raw = request.args.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        abort(400, description="limit must be a whole number from 1 to 100")
    return int(raw)


def create_app() -> Flask:
    """The shop's Flask app (creates and seeds the schema on first start)."""
    app = Flask("demo_app.web")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    db.ensure_schema()

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        response = _error(exc.code or 500, exc.description or exc.name)
        if exc.code == 503:
            response.headers["Retry-After"] = "5"
        if exc.code == 401:  # RFC 6750: say which scheme the endpoint wants
            response.headers["WWW-Authenticate"] = 'Bearer realm="shop-admin"'
        return response

    @app.before_request
    def inject_faults() -> None:
        if request.path.startswith(("/admin", "/healthz")):
            return
        switches = faults.current()
        if switches.latency_ms:
            time.sleep(switches.latency_ms / 1000.0)
        if switches.error_rate and random.random() < switches.error_rate:
            raise InjectedFault("injected error (error_rate switch)")

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.get("/products")
    def list_products() -> Response:
        offset = request.args.get("offset", "0")
        if not offset.isdigit():
            abort(400, description="offset must be a whole number")
        with db.session() as session:
            products = session.scalars(select(Product).order_by(Product.id).limit(_limit()).offset(int(offset)))
            return jsonify(products=[_product_dict(product) for product in products])

    @app.get("/products/<int:product_id>")
    def get_product(product_id: int) -> Response:
        product, result = cache.cached_product(product_id, _load_product)
        if product is None:
            abort(404, description=f"no product {product_id}")
        response = jsonify(product)
        response.headers["X-Cache"] = result
        return response

    @app.get("/customers/<int:customer_id>")
    def get_customer(customer_id: int) -> Response:
        with db.session() as session:
            customer = session.get(Customer, customer_id)
            if customer is None:
                abort(404, description=f"no customer {customer_id}")
            return jsonify(id=customer.id, name=customer.name, email=customer.email)

    @app.post("/orders")
    def place_order() -> Response:
        try:
            order_request = OrderRequest.model_validate(_json_body())
        except ValidationError as exc:
            details = [
                {"field": ".".join(str(part) for part in error["loc"]), "message": error["msg"]}
                for error in exc.errors(include_url=False)
            ]
            return _error(422, "invalid order", details=details)
        wanted = {item.product_id for item in order_request.items}
        with db.session() as session:
            if session.get(Customer, order_request.customer_id) is None:
                return _error(422, "unknown customer", customer_id=order_request.customer_id)
            products = {p.id: p for p in session.scalars(select(Product).where(Product.id.in_(wanted)))}
            unknown = sorted(wanted - products.keys())
            if unknown:
                return _error(422, "unknown product", product_ids=unknown)
            lines = [
                OrderLine(
                    product_id=item.product_id,
                    quantity=item.quantity,
                    price_cents=products[item.product_id].price_cents,
                )
                for item in order_request.items
            ]
            order = Order(
                customer_id=order_request.customer_id,
                lines=lines,
                total_cents=sum(line.quantity * line.price_cents for line in lines),
            )
            session.add(order)
        try:
            tasks.order_workflow(order.id).apply_async(retry=True, retry_policy=PUBLISH_RETRY_POLICY)
        except BrokerError as exc:
            tasks.fail_order(order.id, "not queued: broker unavailable")
            _logger.error("order not queued: broker unavailable", extra={"order_id": order.id, "error": str(exc)})
            abort(503, description="the order queue is unavailable; the order was not placed, try again later")
        return _accepted(order.id)

    @app.get("/orders/<int:order_id>")
    def get_order(order_id: int) -> Response:
        with db.session() as session:
            order = session.get(
                Order,
                order_id,
                options=[joinedload(Order.customer), selectinload(Order.lines).joinedload(OrderLine.product)],
            )
            if order is None:
                abort(404, description=f"no order {order_id}")
            return jsonify(_order_dict(order))

    @app.get("/orders/recent")
    def recent_orders() -> Response:
        """Recent orders with customer and lines, loaded eagerly: three queries whatever the limit."""
        with db.session() as session:
            orders = session.scalars(
                select(Order)
                .options(joinedload(Order.customer), selectinload(Order.lines).selectinload(OrderLine.product))
                .order_by(Order.id.desc())
                .limit(_limit())
            ).all()
            return jsonify(orders=[_order_dict(order) for order in orders])

    @app.get("/orders/recent/n-plus-one")
    def recent_orders_n_plus_one() -> Response:
        """The same listing with lazy loading: one more query per order for its lines (N+1)."""
        with db.session() as session:
            orders = session.scalars(select(Order).order_by(Order.id.desc()).limit(_limit())).all()
            return jsonify(orders=[_order_dict(order) for order in orders])

    @app.post("/reports/sales")
    def start_sales_report() -> Response:
        with db.session() as session:
            product_ids = list(session.scalars(select(Product.id)))
        try:
            result = tasks.sales_report(product_ids).apply_async(retry=True, retry_policy=PUBLISH_RETRY_POLICY)
        except BrokerError:
            abort(503, description="the report queue is unavailable; try again later")
        response = jsonify(report_id=result.id, status="pending")
        response.status_code = 202
        response.headers["Location"] = f"/reports/{result.id}"
        return response

    @app.get("/reports/<report_id>")
    def get_report(report_id: str) -> Response:
        result = tasks.app.AsyncResult(report_id)
        if result.state == "SUCCESS":
            return jsonify(report_id=report_id, status="done", report=result.result)
        if result.state == "FAILURE":
            return _error(500, "the report failed", report_id=report_id)
        response = jsonify(report_id=report_id, status=result.state.lower())
        response.status_code = 202
        return response

    @app.route("/admin/faults", methods=["GET", "PUT", "DELETE"])
    def admin_faults() -> Response:
        _require_admin()
        try:
            return _change_faults()
        except redis.RedisError as exc:
            _logger.error("fault switches unavailable", extra={"error": str(exc)})
            abort(503, description="the fault switches are kept in Redis, which is unavailable")

    def _change_faults() -> Response:
        if request.method == "PUT":
            try:
                change = faults.FaultsUpdate.model_validate(_json_body())
            except ValidationError as exc:
                details = exc.errors(include_url=False, include_context=False)
                return _error(422, "invalid fault switches", details=details)
            unknown_queues = sorted(set(change.paused_queues or ()) - set(faults.QUEUES))
            if unknown_queues:
                return _error(422, "unknown queue", queues=unknown_queues, known=list(faults.QUEUES))
            before = faults.current()
            after = faults.update(change)
            _apply_queue_pauses(before.paused_queues, after.paused_queues)
        elif request.method == "DELETE":
            before = faults.current()
            after = faults.clear()
            _apply_queue_pauses(before.paused_queues, after.paused_queues)
        else:
            after = faults.current()
        _logger.info("fault switches", extra={"faults": after.model_dump()})
        return jsonify(after.model_dump())

    return app


def _accepted(order_id: int) -> Response:
    response = jsonify(order_id=order_id, status="pending")
    response.status_code = 202
    response.headers["Location"] = f"/orders/{order_id}"
    return response


def _require_admin() -> None:
    token = shop_settings.current().admin_token
    if not token:
        abort(403, description="the admin endpoint is off: set DEMO_ADMIN_TOKEN")
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        abort(401, description="send Authorization: Bearer <DEMO_ADMIN_TOKEN>")


def _apply_queue_pauses(before: tuple[str, ...], after: tuple[str, ...]) -> None:
    """Tell the workers to stop or resume consuming queues (Celery remote control)."""
    control = tasks.app.control
    try:
        for queue in set(after) - set(before):
            control.cancel_consumer(queue, reply=True, timeout=1.0)
        for queue in set(before) - set(after):
            control.add_consumer(queue, reply=True, timeout=1.0)
    except BrokerError as exc:
        _logger.warning("workers not told about paused queues", extra={"error": str(exc)})


app = create_app()
