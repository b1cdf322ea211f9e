"""The set-based apply of charges new to the ledger: the common case of a batch (a
``charge.succeeded`` for a charge we have never seen), in a handful of statements for the
whole batch instead of a dozen per event.

It follows :func:`domain.ledger.upserts.apply_charge` exactly for that case, and takes the
same locks in the same order (PaymentIntent keys, then the charges it inserts, then their
orders): insert the charge if new, link it to the order its metadata, its PaymentIntent or
its Checkout Session names, and recompute that order's status. A charge already in the
ledger is left to the per-event path (``apply_charge`` merges snapshots by age).
tests/integration/test_event_applier.py checks both paths leave the same rows.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any, Iterable, Sequence, cast

from sqlalchemy import Update, bindparam, func, select, text, update
from sqlalchemy.orm import Session

from domain.ledger.envelope import EventEnvelope
from domain.ledger.positions import ChargePosition, charge_positions, order_status
from domain.stripe.shapes import ChargeSnapshot
from domain.ledger.upserts import charge_row
from models import Charge, CheckoutSession, Order, PaymentIntent, table_of, utcnow
from models.db import dialect_insert, one_of

NewCharge = tuple[EventEnvelope, ChargeSnapshot]

_charges = table_of(Charge)
_orders = table_of(Order)
_LINK = update(_charges).where(_charges.c.id == bindparam("b_id")).values(order_id=bindparam("b_order"))
_STATUS = (
    update(_orders)
    .where(_orders.c.id == bindparam("b_id"))
    .values(status=bindparam("b_status"), version=_orders.c.version + 1, updated_at=bindparam("b_now"))
)


def eligible(snapshot: ChargeSnapshot) -> bool:
    """A snapshot the set-based path may take: it embeds no refunds."""
    return not snapshot.refunds


def apply_new_charges(session: Session, items: Sequence[NewCharge]) -> set[str]:
    """Insert the charges of ``items`` that the ledger does not hold yet, link them and
    refresh their orders. Returns the ids of the events fully applied; every other item
    (its charge was already there) must go through the per-event path. Each charge id
    must appear once in ``items``."""
    if not items:
        return set()
    postgres = session.get_bind().dialect.name == "postgresql"
    now = utcnow()
    intents = sorted({s.payment_intent_id for _, s in items if s.payment_intent_id})
    if postgres and intents:
        # apply_charge's first lock, for every PaymentIntent of the batch, in one order.
        session.execute(
            text("SELECT count(pg_advisory_xact_lock(hashtext('payment_intent'), hashtext(k))) FROM unnest(CAST(:keys AS text[])) AS k"),
            {"keys": intents},
        )
    inserted = _insert_new(session, items, now, postgres)
    new = [(event, snapshot) for event, snapshot in items if snapshot.id in inserted]
    links = _orders_named(session, [s for _, s in new])
    if links:
        _link(session, links, now, postgres)
    return {event.id for event, _ in new}


def _insert_new(session: Session, items: Sequence[NewCharge], now: datetime, postgres: bool) -> set[str]:
    insert = dialect_insert(session.get_bind().dialect.name)
    rows = [
        {**charge_row(s, as_of=e.created, account=e.account), "order_id": None, "first_seen_at": now, "updated_at": now}
        for e, s in items
    ]
    if postgres:
        # One array per column, unnested in step: the statement's text is the same for any
        # batch size, so it is parsed and prepared once (a multi-row VALUES list is a new
        # statement for every batch size and costs the driver more to send than the rows).
        from sqlalchemy.dialects.postgresql import ARRAY

        columns = [c for c in _charges.c if c.key in rows[0]]
        arrays = [bindparam(None, [r[c.key] for r in rows], type_=ARRAY(c.type)) for c in columns]
        statement = (
            insert(_charges)
            .from_select([c.key for c in columns], select(*[func.unnest(a) for a in arrays]))
            .on_conflict_do_nothing()
            .returning(_charges.c.id)
        )
        return set(session.execute(statement).scalars())
    # A list of parameter sets: SQLAlchemy sends them as multi-row INSERTs ("insertmanyvalues")
    # from one cached compilation, RETURNING the ids it inserted.
    statement = insert(_charges).on_conflict_do_nothing().returning(_charges.c.id)
    return set(session.execute(statement, rows).scalars())


def _orders_named(session: Session, snapshots: Iterable[ChargeSnapshot]) -> dict[str, str]:
    """charge id -> the order its metadata names, else its PaymentIntent's order, else the
    first Checkout Session's of that PaymentIntent (as apply_charge looks them up)."""
    links: dict[str, str] = {}
    by_intent: dict[str, list[str]] = defaultdict(list)
    for s in snapshots:
        if s.order_id:
            links[s.id] = s.order_id
        elif s.payment_intent_id:
            by_intent[s.payment_intent_id].append(s.id)
    if by_intent:
        # Both queries keep only rows with every column set (IS NOT NULL, or in a list of
        # ids), but the columns are nullable: the casts say what the rows hold.
        intent_orders = cast(
            dict[str, str],
            dict(
                session.execute(
                    select(PaymentIntent.id, PaymentIntent.order_id).where(
                        one_of(session, PaymentIntent.id, by_intent), PaymentIntent.order_id.is_not(None)
                    )
                ).all()
            ),
        )
        missing = [i for i in by_intent if i not in intent_orders]
        if missing:
            named = session.execute(
                select(CheckoutSession.payment_intent_id, CheckoutSession.order_id)
                .where(one_of(session, CheckoutSession.payment_intent_id, missing), CheckoutSession.order_id.is_not(None))
                .order_by(CheckoutSession.created.desc(), CheckoutSession.id.desc())
            ).all()
            for intent_id, order_id in cast(list[tuple[str, str]], named):
                intent_orders[intent_id] = order_id  # the last one written is the first in order
        for intent_id, charge_ids in by_intent.items():
            if intent_id in intent_orders:
                links.update((charge_id, intent_orders[intent_id]) for charge_id in charge_ids)
    return links


def _link(session: Session, links: dict[str, str], now: datetime, postgres: bool) -> None:
    """Make sure the orders exist, lock them (in id order), link the charges and write
    each order's new status (with its version bumped, as the ORM would)."""
    insert = dialect_insert(session.get_bind().dialect.name)
    order_ids = sorted(set(links.values()))
    session.execute(
        insert(_orders).on_conflict_do_nothing(),
        [{"id": o, "status": "pending", "version": 1, "created_at": now, "updated_at": now} for o in order_ids],
    )
    current = dict(
        session.execute(
            select(_orders.c.id, _orders.c.status).where(one_of(session, _orders.c.id, order_ids)).order_by(_orders.c.id).with_for_update()
        ).all()
    )
    _update_each(session, _LINK, [{"b_id": c, "b_order": o} for c, o in links.items()], postgres)
    charges = list(
        session.scalars(
            select(Charge)
            .where(one_of(session, Charge.order_id, order_ids))
            .order_by(Charge.order_id, Charge.created, Charge.id)
            .execution_options(populate_existing=True)
        )
    )
    # Keyed like Charge.order_id (nullable); the charges selected above all have one.
    by_order: dict[str | None, list[ChargePosition]] = defaultdict(list)
    for position in charge_positions(session, charges):
        by_order[position.charge.order_id].append(position)
    changes = [
        {"b_id": o, "b_status": status, "b_now": now}
        for o in order_ids
        if (status := order_status(by_order.get(o, []))) != current.get(o)
    ]
    if changes:
        _update_each(session, _STATUS, changes, postgres)


def _update_each(session: Session, statement: Update, rows: list[dict[str, Any]], postgres: bool) -> None:
    """Run ``statement`` (_LINK or _STATUS above) for every row. On PostgreSQL as one UPDATE
    joined to the rows unnested from arrays (one statement, one round trip, one parse);
    elsewhere as an executemany."""
    if not postgres:
        session.execute(statement, rows)
        return
    from sqlalchemy.dialects.postgresql import ARRAY

    table, column = (_charges, "order_id") if statement is _LINK else (_orders, "status")
    value_key = "b_order" if statement is _LINK else "b_status"
    ids = bindparam(None, [r["b_id"] for r in rows], type_=ARRAY(table.c.id.type))
    values = bindparam(None, [r[value_key] for r in rows], type_=ARRAY(table.c[column].type))
    v = select(func.unnest(ids).label("id"), func.unnest(values).label("value")).subquery()
    update_ = update(table).where(table.c.id == v.c.id).values({column: v.c.value})
    if table is _orders:
        update_ = update_.values(version=_orders.c.version + 1, updated_at=rows[0]["b_now"])
    session.execute(update_)
