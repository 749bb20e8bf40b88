"""A stand-in for an external payment provider: slow, and declining a share of charges."""

from __future__ import annotations

import random
import time

from opentelemetry import trace

from demo_app import faults

__all__ = ["PaymentDeclined", "PaymentError", "ProviderUnavailable", "charge"]

PROVIDER = "payments.example"
_tracer = trace.get_tracer("demo_app.payment")


class PaymentError(Exception):
    """The charge did not go through; worth retrying."""


class PaymentDeclined(PaymentError):
    """The provider declined the charge."""


class ProviderUnavailable(PaymentError):
    """The provider did not answer (an outage)."""


def charge(order_id: int, amount_cents: int, latency_ms: float) -> str:
    """Charge ``amount_cents`` for ``order_id``; returns the provider's charge id or raises :class:`PaymentError`."""
    switches = faults.current()
    attributes = {"server.address": PROVIDER, "http.request.method": "POST", "demo.order.id": order_id}
    with _tracer.start_as_current_span("POST /v1/charges", kind=trace.SpanKind.CLIENT, attributes=attributes) as span:
        # Log-normal latency around the typical value: most calls fast, a long tail.
        delay = latency_ms / 1000.0 * random.lognormvariate(0.0, 0.5) if latency_ms else 0.0
        if switches.payment_outage:
            time.sleep(min(delay * 3, 5.0))
            span.set_attribute("http.response.status_code", 503)
            raise ProviderUnavailable(f"{PROVIDER} is unavailable (payment outage switch)")
        time.sleep(delay)
        if random.random() < switches.payment_failure_rate:
            span.set_attribute("http.response.status_code", 402)
            raise PaymentDeclined(f"{PROVIDER} declined the charge of order {order_id}")
        span.set_attribute("http.response.status_code", 201)
        return f"ch_{order_id}_{random.getrandbits(32):08x}"
