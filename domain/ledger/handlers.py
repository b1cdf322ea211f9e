"""Which event type changes which ledger rows: one handler per applied type.

A handler runs inside the applier's transaction (a savepoint per event), is safe to run
again on the same event, and leaves the ledger the same whatever order the events of an
object arrive in (the upserts' ``as_of`` guards). A type that is not in :data:`HANDLERS`
is stored as ``ignored`` and never applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from sqlalchemy.orm import Session

from config import Settings
from domain.ledger import upserts
from domain.ledger.envelope import EventEnvelope
from domain.stripe.shapes import (
    CheckoutSessionSnapshot,
    charge_snapshot,
    checkout_session_snapshot,
    dispute_snapshot,
    payment_intent_snapshot,
    refund_snapshot,
)

Handler = Callable[[Session, EventEnvelope, "CheckoutLinking"], None]


@dataclass(frozen=True, slots=True)
class CheckoutLinking:
    """How a Checkout Session names its order (settings CHECKOUT_ORDER_METADATA_KEY and
    PAYMENT_LINK_ORDERS)."""

    metadata_key: str = "order_id"
    payment_link_orders: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> "CheckoutLinking":
        return cls(settings.checkout_order_metadata_key, dict(settings.payment_link_orders))

    def snapshot(self, obj: Mapping[str, object]) -> CheckoutSessionSnapshot:
        return checkout_session_snapshot(obj, metadata_key=self.metadata_key, payment_link_orders=self.payment_link_orders)


def _charge(session: Session, event: EventEnvelope, linking: CheckoutLinking) -> None:
    upserts.apply_charge(session, charge_snapshot(event.object), as_of=event.created, account=event.account)


def _charge_expired(session: Session, event: EventEnvelope, linking: CheckoutLinking) -> None:
    """An uncaptured authorisation expired: Stripe released the funds."""
    charge = upserts.apply_charge(session, charge_snapshot(event.object), as_of=event.created, account=event.account)
    upserts.release_charges(session, charge_id=charge.id)


def _refund(session: Session, event: EventEnvelope, linking: CheckoutLinking) -> None:
    upserts.apply_refund(session, refund_snapshot(event.object), as_of=event.created, account=event.account)


def _dispute(session: Session, event: EventEnvelope, linking: CheckoutLinking) -> None:
    upserts.apply_dispute(session, dispute_snapshot(event.object), as_of=event.created, account=event.account)


def _payment_intent(session: Session, event: EventEnvelope, linking: CheckoutLinking) -> None:
    upserts.apply_payment_intent(session, payment_intent_snapshot(event.object), as_of=event.created, account=event.account)


def _checkout_session(session: Session, event: EventEnvelope, linking: CheckoutLinking) -> None:
    upserts.apply_checkout_session(
        session,
        linking.snapshot(event.object),
        as_of=event.created,
        account=event.account,
        payment_failed=event.type == "checkout.session.async_payment_failed",
    )


# Charge events whose whole effect is the charge upsert: the applier may apply a batch of
# them set-based (domain/ledger/charge_batch.py) when the charge is new to the ledger.
PLAIN_CHARGE_TYPES = frozenset(
    {"charge.succeeded", "charge.failed", "charge.captured", "charge.updated", "charge.refunded"}
)

# The handler the set-based path stands in for (a replaced handler disables it).
PLAIN_CHARGE_HANDLER: Handler = _charge

HANDLERS: dict[str, Handler] = {
    **{event_type: _charge for event_type in PLAIN_CHARGE_TYPES},
    "charge.expired": _charge_expired,
    # Before API version 2024-10-28 card refunds were reported through this event.
    "charge.refund.updated": _refund,
    "charge.dispute.created": _dispute,
    "charge.dispute.updated": _dispute,
    "charge.dispute.closed": _dispute,
    "payment_intent.succeeded": _payment_intent,
    "payment_intent.payment_failed": _payment_intent,
    "payment_intent.canceled": _payment_intent,
    "refund.created": _refund,
    "refund.updated": _refund,
    "refund.failed": _refund,
    # Checkout: the session names the order of its PaymentIntent and charges.
    "checkout.session.completed": _checkout_session,
    "checkout.session.async_payment_succeeded": _checkout_session,
    "checkout.session.async_payment_failed": _checkout_session,
    "checkout.session.expired": _checkout_session,
}
