"""What a charge still holds, and the order status that follows: pure reads of ledger rows.

Guarantees: the functions here never write; given the same rows they give the same
amounts whatever order the rows arrived in. Money is integer minor units of the charge's
currency; a refund that failed or was canceled gives the money back to the charge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Charge, Dispute, Refund
from models.db import one_of

INACTIVE_REFUND_STATUSES = frozenset({"failed", "canceled"})
OPEN_DISPUTE_STATUSES = frozenset(
    {"warning_needs_response", "warning_under_review", "needs_response", "under_review"}
)


def refunded_amount(charge: Charge, refunds: Iterable[Refund]) -> int:
    """What has been refunded from ``charge``: its refunds that have not failed or been
    canceled, so a refund that fails days later gives the money back to the ledger.

    Newer API versions no longer embed refunds in the charge, and before 2024-10-28 a
    refund raised no event of its own: a ``charge.refunded`` may be all we hear. So the
    freshest source wins: the charge's own ``amount_refunded`` when the charge snapshot is
    newer than everything we know about its refunds, our refund records when one of them
    changed later (e.g. a refund that failed after the charge was last updated).
    """
    refunds = list(refunds)
    active = sum(r.amount for r in refunds if r.status not in INACTIVE_REFUND_STATUSES)
    newest_refund = max((r.last_event_created for r in refunds), default=None)
    if newest_refund is None or charge.last_event_created > newest_refund:
        refunded = charge.reported_refunded
    elif charge.last_event_created == newest_refund:
        # Same second: the charge snapshot may predate a refund that failed or was
        # canceled in that second. Such a refund is assumed not yet reflected in it, so the
        # money it gave back is never hidden (an over-held order then shows; every refund
        # call re-reads Stripe before it goes).
        returned = sum(
            r.amount
            for r in refunds
            if r.status in INACTIVE_REFUND_STATUSES and r.last_event_created >= charge.last_event_created
        )
        refunded = max(charge.reported_refunded - returned, active)
    else:
        refunded = active
    return min(refunded, charge.amount)


def captured_refunded_amount(charge: Charge, refunds: Iterable[Refund]) -> int:
    """What has been refunded out of the money the charge captured.

    A partial capture releases the rest, and Stripe counts the release in
    ``amount_refunded`` ("any additional amount will be automatically refunded"), so the
    captured money still held is ``amount - refunded``, never more than was captured.
    """
    if charge.status != "succeeded" or not charge.captured:
        return 0
    still_held = min(charge.amount_captured, max(0, charge.amount - refunded_amount(charge, refunds)))
    return charge.amount_captured - still_held


def held_amount(charge: Charge, refunds: Iterable[Refund], dispute: Dispute | None) -> int:
    """Money ``charge`` still holds: captured and successful, minus refunds; a lost dispute
    holds nothing. An uncaptured authorisation holds nothing (yet)."""
    if charge.status != "succeeded" or not charge.captured:
        return 0
    if dispute is not None and dispute.status == "lost":
        return 0
    return charge.amount_captured - captured_refunded_amount(charge, refunds)


@dataclass(frozen=True, slots=True)
class ChargePosition:
    """One charge with what it holds, as the order view and detection need it."""

    charge: Charge
    refunds: tuple[Refund, ...]
    dispute: Dispute | None
    refunded: int
    held: int


def charge_positions(session: Session, charges: list[Charge]) -> list[ChargePosition]:
    """Each charge with its refunds, dispute and the amounts that follow from them."""
    ids = [c.id for c in charges]
    # Keyed like Refund.charge_id and Dispute.charge_id (nullable); the rows selected
    # below all name one of ``ids``.
    refunds: dict[str | None, list[Refund]] = {i: [] for i in ids}
    disputes: dict[str | None, Dispute] = {}
    if ids:
        for refund in session.scalars(
            select(Refund).where(one_of(session, Refund.charge_id, ids)).order_by(Refund.created, Refund.id)
        ):
            refunds[refund.charge_id].append(refund)
        for dispute in session.scalars(
            select(Dispute).where(one_of(session, Dispute.charge_id, ids)).order_by(Dispute.created)
        ):
            disputes[dispute.charge_id] = dispute
    return [
        ChargePosition(
            charge=c,
            refunds=tuple(refunds[c.id]),
            dispute=disputes.get(c.id),
            refunded=captured_refunded_amount(c, refunds[c.id]),
            held=held_amount(c, refunds[c.id], disputes.get(c.id)),
        )
        for c in charges
    ]


def order_status(positions: list[ChargePosition]) -> str:
    """pending | paid | partially_refunded | refunded | disputed, from the order's charges."""
    paid = [p for p in positions if p.charge.status == "succeeded" and p.charge.captured]
    if not paid:
        return "pending"
    if any(p.dispute is not None and (p.dispute.status in OPEN_DISPUTE_STATUSES or p.dispute.status == "lost") for p in paid):
        return "disputed"
    held = sum(p.held for p in paid)
    refunded = sum(p.refunded for p in paid)
    if held == 0:
        return "refunded"
    return "partially_refunded" if refunded else "paid"


