"""A stand-in for an external payment provider: slow, declining a share of charges, and idempotent.

Like real providers (an ``Idempotency-Key`` header), it charges once per idempotency key: a request
that repeats the key of a charge it made gets that charge back, not a second one. The shop's key is
the order (:func:`order_key`), so a ``charge_payment`` task delivered again after its worker died
between the charge and recording the order as paid does not charge the customer twice. The
provider's ledger is the ``payment_charges`` table (:class:`demo_app.models.Charge`). A declined
charge records nothing: the next attempt with the same key is a new try. Half the latency passes
before the provider records the charge and half after, while its answer travels back: a worker
that dies then has charged the order without knowing it.
"""

from __future__ import annotations

import random
import time

from opentelemetry import trace

from demo_app import db, faults
from demo_app.models import Charge

__all__ = [
    "IdempotencyKeyReused",
    "PaymentDeclined",
    "PaymentError",
    "ProviderUnavailable",
    "charge",
    "order_key",
]

PROVIDER = "payments.example"
_tracer = trace.get_tracer("demo_app.payment")


class PaymentError(Exception):
    """The charge did not go through; worth retrying."""


class PaymentDeclined(PaymentError):
    """The provider declined the charge."""


class ProviderUnavailable(PaymentError):
    """The provider did not answer (an outage)."""


class IdempotencyKeyReused(ValueError):
    """The idempotency key was used before for a different amount (a bug in the caller, not worth retrying)."""


def order_key(order_id: int) -> str:
    """The idempotency key of an order's charge: one charge per order, however often it is asked for."""
    return f"order-{order_id}"


def charge(order_id: int, amount_cents: int, latency_ms: float, idempotency_key: str | None = None) -> str:
    """Charge ``amount_cents`` for ``order_id`` once per ``idempotency_key`` (default :func:`order_key`).

    Returns the provider's charge id: a new one, or the one recorded under the key. Raises
    :class:`PaymentError` when the charge does not go through.
    """
    key = idempotency_key or order_key(order_id)
    switches = faults.current()
    attributes = {"server.address": PROVIDER, "http.request.method": "POST", "demo.order.id": order_id}
    with _tracer.start_as_current_span("POST /v1/charges", kind=trace.SpanKind.CLIENT, attributes=attributes) as span:
        # Log-normal latency around the typical value: most calls fast, a long tail.
        delay = latency_ms / 1000.0 * random.lognormvariate(0.0, 0.5) if latency_ms else 0.0
        if switches.payment_outage:
            time.sleep(min(delay * 3, 5.0))
            span.set_attribute("http.response.status_code", 503)
            raise ProviderUnavailable(f"{PROVIDER} is unavailable (payment outage switch)")
        time.sleep(delay / 2)  # the request on its way; the provider records the charge, then answers
        recorded = db.replay(Charge, key)
        if recorded is None:
            if random.random() < switches.payment_failure_rate:
                time.sleep(delay / 2)
                span.set_attribute("http.response.status_code", 402)
                raise PaymentDeclined(f"{PROVIDER} declined the charge of order {order_id}")
            new_id = f"ch_{order_id}_{random.getrandbits(32):08x}"
            recorded, created = db.record(Charge, key, order_id=order_id, charge_id=new_id, amount_cents=amount_cents)
        else:
            created = False
        time.sleep(delay / 2)  # the answer on its way back: a caller that dies now has been charged
        if recorded.amount_cents != amount_cents:
            span.set_attribute("http.response.status_code", 422)
            raise IdempotencyKeyReused(
                f"idempotency key {key!r} was used for {recorded.amount_cents} cents, not {amount_cents}"
            )
        span.set_attribute("http.response.status_code", 201 if created else 200)
        span.set_attribute("demo.payment.replayed", not created)
        return recorded.charge_id
