"""The shop's tables (SQLAlchemy 2 declarative): customers, products, orders and their lines.

Also the records of the two outside services the order chain calls, the payment provider's charges
and the confirmation e-mails sent, each kept under its idempotency key so that a task run twice (a
message delivered again after a worker died) charges and mails once.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "ORDER_STATUSES",
    "Base",
    "Charge",
    "ConfirmationEmail",
    "Customer",
    "Order",
    "OrderLine",
    "Product",
    "utcnow",
]

ORDER_STATUSES = ("pending", "reserved", "paid", "confirmed", "failed")


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base of the shop's models."""


class Customer(Base):
    """Someone who places orders."""

    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(200), unique=True)
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Product(Base):
    """Something for sale, with the stock left."""

    __tablename__ = "products"
    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    price_cents: Mapped[int]
    stock: Mapped[int]


class Order(Base):
    """An order and where it is in the reserve → charge → confirm chain."""

    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    failure_reason: Mapped[str | None] = mapped_column(String(200), default=None)
    total_cents: Mapped[int] = mapped_column(default=0)
    payment_attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    customer: Mapped[Customer] = relationship(back_populates="orders")
    lines: Mapped[list[OrderLine]] = relationship(back_populates="order", cascade="all, delete-orphan")


class OrderLine(Base):
    """One product and quantity of an order, at the price it was ordered at."""

    __tablename__ = "order_lines"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    quantity: Mapped[int]
    price_cents: Mapped[int]
    order: Mapped[Order] = relationship(back_populates="lines")
    product: Mapped[Product] = relationship()


class Charge(Base):
    """A charge the payment provider made (its side of the ledger), once per idempotency key.

    A request that repeats a key gets the recorded charge back instead of a new one (``replays``
    counts them), the way real providers treat an ``Idempotency-Key`` header.
    """

    __tablename__ = "payment_charges"
    id: Mapped[int] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    order_id: Mapped[int] = mapped_column(index=True)
    charge_id: Mapped[str] = mapped_column(String(64))
    amount_cents: Mapped[int]
    replays: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConfirmationEmail(Base):
    """A confirmation e-mail the mail service sent, once per idempotency key (``replays``: repeats absorbed)."""

    __tablename__ = "confirmation_emails"
    id: Mapped[int] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    order_id: Mapped[int] = mapped_column(index=True)
    replays: Mapped[int] = mapped_column(default=0)
    sent_at: Mapped[datetime] = mapped_column(default=utcnow)
