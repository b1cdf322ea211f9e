"""The ledger: Stripe events as received (the inbox) and the orders, charges, refunds,
disputes and PaymentIntents they describe.

* :mod:`domain.ledger.balance`: an order's balance and the duplicate rule's verdict on it.
* :mod:`domain.ledger.envelope`: a webhook body read into an :class:`EventEnvelope`.
* :mod:`domain.ledger.upserts`: the write rules (idempotent, order-independent upserts).
* :mod:`domain.ledger.positions`: what a charge still holds, an order's status.
* :mod:`domain.ledger.inbox`: the accept path (verify, store once, answer).
* :mod:`domain.ledger.applier`: the batch applier that turns stored events into ledger rows.

The write rules and positions are re-exported here: ``from domain import ledger`` then
``ledger.apply_charge(...)``.
"""

from domain.ledger.positions import (
    INACTIVE_REFUND_STATUSES,
    OPEN_DISPUTE_STATUSES,
    ChargePosition,
    captured_refunded_amount,
    charge_positions,
    held_amount,
    order_status,
    refunded_amount,
)
from domain.ledger.upserts import (
    ATTEMPT_METADATA_KEY,
    apply_charge,
    apply_checkout_session,
    apply_dispute,
    apply_payment_intent,
    apply_refund,
    charge_row,
    ensure_order,
    refresh_order,
    release_charges,
    released_by_snapshot,
    settle_refund_attempt,
)

__all__ = [
    "ATTEMPT_METADATA_KEY",
    "INACTIVE_REFUND_STATUSES",
    "OPEN_DISPUTE_STATUSES",
    "ChargePosition",
    "apply_charge",
    "apply_checkout_session",
    "apply_dispute",
    "apply_payment_intent",
    "apply_refund",
    "captured_refunded_amount",
    "charge_positions",
    "charge_row",
    "ensure_order",
    "held_amount",
    "order_status",
    "refresh_order",
    "refunded_amount",
    "release_charges",
    "released_by_snapshot",
    "settle_refund_attempt",
]
