"""Orders: what the merchant says an order costs, and what Stripe says was paid for it.

An order's amount and currency are the yardstick duplicate detection measures charges
against, so once the order has a successful charge they are frozen: changing them then
would turn a double charge into an apparently correct one (or the reverse). Setting a
total that was unknown (an order first seen through a charge's metadata) is allowed.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain import ledger
from domain.errors import DomainError, Kind
from domain.stripe.shapes import ORDER_ID
from models import Charge, EventFailure, Order, StripeEvent, iso_utc
from models.db import insert_ignore
from models.money import MoneyError, check_amount, format_amount, normalise_currency

MAX_CUSTOMER = 255


class OrderError(DomainError):
    """A request about orders that cannot be honoured; ``code`` is the JSON error code."""

    def __init__(self, code: str, message: str, *, kind: Kind | None = None, field: str | None = None) -> None:
        super().__init__(code, message, kind=kind, **({"field": field} if field else {}))
        self.field = field


def _storable(value: str) -> bool:
    """Text every database accepts: valid UTF-8 (no lone surrogates) and no NUL."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


@dataclass(frozen=True, slots=True)
class OrderInput:
    """A validated order: id, total in minor units, currency, optional customer."""

    id: str
    amount: int
    currency: str
    customer: str | None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> "OrderInput":
        """Validate untrusted input (JSON body or CSV row); :class:`OrderError` (400) otherwise."""
        order_id = data.get("id", data.get("order_id"))
        if not isinstance(order_id, str) or not ORDER_ID.match(order_id.strip()):
            raise OrderError(
                "invalid_order_id",
                "id must be 1-255 characters: letters, digits and _ . : # / -",
                field="id",
            )
        try:
            currency = normalise_currency(data.get("currency"))
        except MoneyError as exc:
            raise OrderError("invalid_currency", str(exc), field="currency") from None
        try:
            amount = check_amount(data.get("amount"), currency)
        except MoneyError as exc:
            raise OrderError("invalid_amount", str(exc), field="amount") from None
        customer = data.get("customer")
        if customer is not None and (not isinstance(customer, str) or len(customer) > MAX_CUSTOMER or not _storable(customer)):
            raise OrderError("invalid_customer", "customer must be a string of at most 255 characters", field="customer")
        unknown = set(data) - {"id", "order_id", "amount", "currency", "customer"}
        if unknown:
            raise OrderError("unknown_field", f"unknown field(s): {', '.join(sorted(unknown))}")
        return cls(order_id.strip(), amount, currency, (customer or "").strip() or None)


def upsert_order(session: Session, order_input: OrderInput, *, source: str) -> tuple[Order, bool]:
    """Create the order, or update it. Returns ``(order, created)``.

    Raises :class:`OrderError` 409 ``order_amount_frozen`` when the order already has a
    successful charge and the request would change a known amount or currency.
    """
    created = insert_ignore(
        session,
        Order,
        {
            "id": order_input.id,
            "amount": order_input.amount,
            "currency": order_input.currency,
            "amount_source": source,
            "customer": order_input.customer,
            "status": "pending",
            "version": 1,
        },
    )
    order = session.execute(
        select(Order).where(Order.id == order_input.id).with_for_update().execution_options(populate_existing=True)
    ).scalar_one()
    if created:
        return order, True
    changes_money = order.amount is not None and (
        order.amount != order_input.amount or order.currency != order_input.currency
    )
    if changes_money and _has_successful_charge(session, order.id):
        assert order.amount is not None  # changes_money says so
        raise OrderError(
            "order_amount_frozen",
            f"Order {order.id} has a successful charge; its amount and currency "
            f"({format_amount(order.amount, order.currency or '')}) can no longer change.", kind=Kind.CONFLICT,
        )
    if order.amount != order_input.amount or order.currency != order_input.currency:
        order.amount = order_input.amount
        order.currency = order_input.currency
        order.amount_source = source
    if order_input.customer is not None:
        order.customer = order_input.customer
    return order, False


def _has_successful_charge(session: Session, order_id: str) -> bool:
    return (
        session.scalar(
            select(Charge.id).where(Charge.order_id == order_id, Charge.status == "succeeded").limit(1)
        )
        is not None
    )


@dataclass(frozen=True, slots=True)
class ImportReport:
    created: int
    updated: int
    unchanged: int


def parse_order_csv(text: str) -> tuple[list[OrderInput], list[str]]:
    """Parse a CSV with header ``order_id`` (or ``id``), ``amount``, ``currency`` and an
    optional ``customer``. Amounts are integer minor units. Returns ``(orders, errors)``;
    errors name the line."""
    reader = csv.DictReader(io.StringIO(text))
    header = {h.strip().lower() for h in (reader.fieldnames or [])}
    if not ({"amount", "currency"} <= header and header & {"order_id", "id"}):
        return [], ["line 1: header must name order_id, amount and currency (customer optional)"]
    orders: list[OrderInput] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        cleaned = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        if None in row:
            errors.append(f"line {line}: more fields than the header names")
            continue
        raw_amount = cleaned.get("amount", "")
        if not (raw_amount.isascii() and raw_amount.isdigit()):
            errors.append(f"line {line}: amount {raw_amount!r} is not an integer in minor units")
            continue
        fields: dict[str, Any] = {
            "id": cleaned.get("order_id") or cleaned.get("id") or "",
            "amount": int(raw_amount),
            "currency": cleaned.get("currency"),
            "customer": cleaned.get("customer") or None,
        }
        try:
            order = OrderInput.parse(fields)
        except OrderError as exc:
            errors.append(f"line {line}: {exc.message}")
            continue
        if order.id in seen:
            errors.append(f"line {line}: order {order.id} already appears on line {seen[order.id]}")
            continue
        seen[order.id] = line
        orders.append(order)
    return orders, errors


def import_orders(session: Session, orders: Iterable[OrderInput]) -> ImportReport:
    """Upsert every order in the caller's transaction: all of them or, on the first
    :class:`OrderError`, none (the caller rolls back)."""
    created = updated = unchanged = 0
    for order_input in orders:
        before = session.get(Order, order_input.id)
        snapshot = None if before is None else (before.amount, before.currency, before.customer)
        order, was_created = upsert_order(session, order_input, source="import")
        if was_created:
            created += 1
        elif snapshot == (order.amount, order.currency, order.customer):
            unchanged += 1
        else:
            updated += 1
    return ImportReport(created, updated, unchanged)


# -- read models ---------------------------------------------------------------------------


def order_view(session: Session, order_id: str) -> dict[str, Any] | None:
    """The order with its charges, refunds, disputes and money positions, as plain data."""
    if not _storable(order_id):
        return None
    order = session.get(Order, order_id)
    if order is None:
        return None
    charges = list(
        session.scalars(select(Charge).where(Charge.order_id == order_id).order_by(Charge.created, Charge.id))
    )
    positions = ledger.charge_positions(session, charges)
    totals: dict[str, dict[str, int]] = {}
    for position in positions:
        if position.charge.status != "succeeded":
            continue
        bucket = totals.setdefault(position.charge.currency, {"charged": 0, "refunded": 0, "held": 0})
        bucket["charged"] += position.charge.amount_captured if position.charge.captured else 0
        bucket["refunded"] += position.refunded
        bucket["held"] += position.held
    return {
        "id": order.id,
        "amount": order.amount,
        "currency": order.currency,
        "amount_display": format_amount(order.amount, order.currency) if order.amount is not None and order.currency else None,
        "amount_source": order.amount_source,
        "customer": order.customer,
        "status": order.status,
        "payment_intent_id": order.payment_intent_id,
        "totals": totals,
        "charges": [_charge_view(p) for p in positions],
        "created_at": iso_utc(order.created_at),
        "updated_at": iso_utc(order.updated_at),
    }


def _charge_view(position: ledger.ChargePosition) -> dict[str, Any]:
    charge = position.charge
    return {
        "id": charge.id,
        "payment_intent_id": charge.payment_intent_id,
        "amount": charge.amount,
        "amount_captured": charge.amount_captured,
        "currency": charge.currency,
        "amount_display": format_amount(charge.amount, charge.currency),
        "status": charge.status,
        "captured": charge.captured,
        "refunded_amount": position.refunded,
        "held_amount": position.held,
        "created": charge.created,
        "customer": charge.customer,
        "account": charge.account,
        "card_brand": charge.card_brand,
        "card_last4": charge.card_last4,
        "refunds": [
            {
                "id": r.id,
                "amount": r.amount,
                "currency": r.currency,
                "status": r.status,
                "reason": r.reason,
                "origin": r.origin,
                "created": r.created,
            }
            for r in position.refunds
        ],
        "dispute": None
        if position.dispute is None
        else {
            "id": position.dispute.id,
            "amount": position.dispute.amount,
            "status": position.dispute.status,
            "reason": position.dispute.reason,
        },
    }


def unresolved_failures(session: Session, *, limit: int = 100) -> list[dict[str, Any]]:
    """Events whose last delivery failed and that no later delivery has applied yet:
    the poison events, most recent failure first."""
    failures = session.scalars(
        select(EventFailure)
        .where(EventFailure.resolved_at.is_(None))
        .order_by(EventFailure.last_failed_at.desc())
        .limit(limit)
    )
    return [
        {
            "event_id": f.event_id,
            "type": f.type,
            "attempts": f.attempts,
            "last_error": f.last_error,
            "first_failed_at": iso_utc(f.first_failed_at),
            "last_failed_at": iso_utc(f.last_failed_at),
        }
        for f in failures
    ]


def event_view(session: Session, event_id: str) -> dict[str, Any] | None:
    """A stored event and where it stands: ``received`` (waiting for the applier),
    ``applied`` (its effects are in the ledger), ``failed`` (its last apply raised; retried
    after ``next_attempt_at``) or ``ignored``; with its failure record if it ever failed."""
    if not _storable(event_id):
        return None
    event = session.get(StripeEvent, event_id)
    failure = session.get(EventFailure, event_id)
    if event is None and failure is None:
        return None
    view: dict[str, Any] = {"event_id": event_id}
    if event is not None:
        view.update(
            type=event.type,
            status=event.status,
            attempts=event.attempts,
            api_version=event.api_version,
            livemode=event.livemode,
            account=event.account,
            created=event.created,
            object_id=event.object_id,
            received_at=_iso(event.received_at),
            applied_at=_iso(event.applied_at),
            next_attempt_at=_iso(event.next_attempt_at),
        )
    elif failure is not None:  # always, when there is no event (both missing returned above)
        view.update(type=failure.type, status="failed")
    if failure is not None:
        view["failure"] = {
            "attempts": failure.attempts,
            "last_error": failure.last_error,
            "first_failed_at": _iso(failure.first_failed_at),
            "last_failed_at": _iso(failure.last_failed_at),
            "resolved_at": _iso(failure.resolved_at),
        }
    return view


def _iso(moment: datetime | None) -> str | None:
    """ISO 8601 with the UTC offset (SQLite hands back naive UTC): :func:`models.iso_utc`."""
    return iso_utc(moment)
