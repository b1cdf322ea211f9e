"""An order's balance: its charges with what each still holds, read from the ledger, and the
duplicate rule's verdict on them.

This is the one reading of "does this order hold more than its total?" that detection,
settling a case, a dismissal and the check before every refund share, so they can never
disagree about the same ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain import ledger
from domain.cases.rules import Assessment, ChargeFacts, OrderFacts, assess
from models import Charge, Order


@dataclass(frozen=True, slots=True)
class OrderBalance:
    """One order and every charge linked to it, with refunds and disputes applied."""

    order: Order
    positions: tuple[ledger.ChargePosition, ...]

    @property
    def order_facts(self) -> OrderFacts:
        o = self.order
        return OrderFacts(o.id, o.amount, o.currency, o.payment_intent_id)

    @property
    def charge_facts(self) -> list[ChargeFacts]:
        return [charge_facts(p) for p in self.positions]

    @property
    def held(self) -> dict[str, int]:
        """Captured money still held, per currency (currencies holding nothing left out)."""
        totals: dict[str, int] = {}
        for p in self.positions:
            if p.held > 0:
                totals[p.charge.currency] = totals.get(p.charge.currency, 0) + p.held
        return dict(sorted(totals.items()))

    @property
    def held_charges(self) -> frozenset[str]:
        """Charges holding the customer's money: captured money, or an authorisation not
        yet released."""
        return frozenset(
            p.charge.id
            for p in self.positions
            if p.held > 0 or (p.charge.status == "succeeded" and not p.charge.captured and not charge_facts(p).released)
        )

    def assess(self, *, window_seconds: int = 0, auto_refund_unknown_total: bool = False) -> Assessment:
        """The duplicate rule on this balance. ``needs_case`` (whether the order holds more
        than it should) depends on neither option; the roles and the plan do."""
        return assess(
            self.order_facts,
            self.charge_facts,
            window_seconds=window_seconds,
            auto_refund_unknown_total=auto_refund_unknown_total,
        )

    def over_held(self) -> dict[str, int]:
        """Per currency, what the order holds more than it should; empty when it does not."""
        verdict = self.assess()
        return dict(verdict.excess) if verdict.needs_case else {}


def charge_facts(position: ledger.ChargePosition) -> ChargeFacts:
    charge = position.charge
    return ChargeFacts(
        id=charge.id,
        amount=charge.amount,
        currency=charge.currency,
        created=charge.created,
        status=charge.status,
        captured=charge.captured,
        held=position.held,
        refunded=position.refunded,
        amount_captured=charge.amount_captured,
        # An authorisation Stripe released (expired or canceled) reports its whole amount
        # as refunded.
        released=not charge.captured and (charge.released or charge.reported_refunded >= charge.amount),
        dispute_status=position.dispute.status if position.dispute is not None else None,
        account=charge.account,
        payment_intent_id=charge.payment_intent_id,
    )


def load_balances(session: Session, order_ids: Iterable[str]) -> dict[str, OrderBalance]:
    """The balances of ``order_ids`` (unknown orders left out), loading their charges,
    refunds and disputes in three queries."""
    ids = list(order_ids)
    if not ids:
        return {}
    orders = {o.id: o for o in session.scalars(select(Order).where(Order.id.in_(ids)))}
    # Keyed like Charge.order_id (nullable); the charges selected below all name one of ``ids``.
    charges: dict[str | None, list[Charge]] = {oid: [] for oid in ids}
    for charge in session.scalars(select(Charge).where(Charge.order_id.in_(ids)).order_by(Charge.created, Charge.id)):
        charges[charge.order_id].append(charge)
    positions = {p.charge.id: p for p in ledger.charge_positions(session, [c for cs in charges.values() for c in cs])}
    return {
        oid: OrderBalance(orders[oid], tuple(positions[c.id] for c in charges[oid]))
        for oid in ids
        if oid in orders
    }


def load_balance(session: Session, order_id: str) -> OrderBalance | None:
    return load_balances(session, [order_id]).get(order_id)
