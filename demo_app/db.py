"""The database: one engine per process, sessions, the schema created and seeded on first start.

Records kept once per idempotency key (the payment provider's and mail service's stand-ins) are
written with :func:`record` and found again with :func:`replay`.

SQLite (the default) gets WAL journaling and a busy timeout so that the web workers and the
Celery pool processes can write to the same file. spyglass instruments the engine by itself
(``import spyglass.auto``): nothing here mentions it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from demo_app import settings as shop_settings
from demo_app.models import Base, Charge, ConfirmationEmail, Customer, Order, OrderLine, Product

__all__ = ["CUSTOMERS", "PRODUCTS", "engine", "ensure_schema", "record", "replay", "session"]

PRODUCTS = 50
CUSTOMERS = 20
SEED_ORDERS = 40
_ADJECTIVES = ("Red", "Blue", "Quiet", "Rapid", "Tiny", "Grand", "Solar", "Lunar", "Smart", "Classic")
_NOUNS = ("Kettle", "Lamp", "Backpack", "Notebook", "Headset")


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=15000")
    cursor.close()


@lru_cache(maxsize=1)
def engine() -> Engine:
    """The engine of this process (created on first use, after any fork)."""
    url = shop_settings.current().database_url
    if url.startswith("sqlite"):
        created = create_engine(url, connect_args={"timeout": 15})
        event.listen(created, "connect", _sqlite_pragmas)
        return created
    return create_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True, pool_timeout=5)


_sessions: sessionmaker[Session] | None = None


@contextmanager
def session() -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises."""
    global _sessions
    if _sessions is None:
        _sessions = sessionmaker(engine(), expire_on_commit=False)
    with _sessions() as current, current.begin():
        yield current


Recorded = TypeVar("Recorded", Charge, ConfirmationEmail)


def replay(model: type[Recorded], idempotency_key: str) -> Recorded | None:
    """The row recorded under ``idempotency_key``, its ``replays`` counted up; ``None`` if there is none."""
    with session() as current:  # reads first: the usual answer is none, and needs no write lock
        if current.scalars(select(model.id).where(model.idempotency_key == idempotency_key)).first() is None:
            return None
        current.execute(update(model).where(model.idempotency_key == idempotency_key).values(replays=model.replays + 1))
        return current.scalars(select(model).where(model.idempotency_key == idempotency_key)).one()


def record(model: type[Recorded], idempotency_key: str, **values: Any) -> tuple[Recorded, bool]:
    """Insert a row under ``idempotency_key``; returns it and whether this call created it.

    If a concurrent request recorded one under the key first, returns that row (its ``replays``
    counted up) and ``False``.
    """
    try:
        with session() as current:
            row = model(idempotency_key=idempotency_key, **values)
            current.add(row)
        return row, True
    except IntegrityError:
        winner = replay(model, idempotency_key)
        if winner is None:  # not a clash on the key
            raise
        return winner, False


def ensure_schema() -> None:
    """Create the tables and seed products, customers and a history of orders, once.

    Safe to call from several processes at once (web workers and Celery workers start together).
    """
    for attempt in range(5):
        try:
            Base.metadata.create_all(engine())
            break
        except (OperationalError, ProgrammingError):  # another process created a table in between
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    try:
        with session() as current:
            if current.scalar(select(func.count()).select_from(Product)):
                return
            _seed(current)
    except IntegrityError:
        pass  # another process seeded it at the same moment


def _seed(current: Session) -> None:
    generator = random.Random(7)
    products = [
        Product(
            sku=f"SKU-{number:04d}",
            name=f"{_ADJECTIVES[number % len(_ADJECTIVES)]} {_NOUNS[number % len(_NOUNS)]} {number}",
            price_cents=generator.randrange(500, 20000, 5),
            stock=generator.randrange(200, 1000),
        )
        for number in range(1, PRODUCTS + 1)
    ]
    customers = [Customer(name=f"Customer {n}", email=f"customer{n}@example.com") for n in range(1, CUSTOMERS + 1)]
    current.add_all(products + customers)
    current.flush()
    for _ in range(SEED_ORDERS):
        chosen = generator.sample(products, generator.randint(1, 3))
        lines = [
            OrderLine(product_id=product.id, quantity=generator.randint(1, 3), price_cents=product.price_cents)
            for product in chosen
        ]
        current.add(
            Order(
                customer_id=generator.choice(customers).id,
                status="confirmed",
                lines=lines,
                total_cents=sum(line.quantity * line.price_cents for line in lines),
                payment_attempts=1,
            )
        )
