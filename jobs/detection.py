"""Detection: find the orders that may hold too much, apply the rule, keep cases in step.

Set-based where it matters: one ``GROUP BY order_id HAVING count(*) > 1`` over paid charges
narrows a million orders to the few with two or more paid charges; only those are loaded,
in chunks, with their refunds and disputes. Incremental passes look only at orders whose
charges, refunds, disputes or totals changed since the last pass started (plus every order
with an active case).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

from sqlalchemy import func, select, union
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app.services import ledger
from jobs.rules import Assessment, ChargeFacts, OrderFacts, assess
from models import (
    ACTIVE_CASE_STATUSES,
    AuditEntry,
    CaseCharge,
    Charge,
    Dispute,
    DuplicateCase,
    Order,
    Refund,
    run_in_transaction,
    utcnow,
)

log = logging.getLogger(__name__)

CHUNK = 500


@dataclass
class DetectionSummary:
    orders_examined: int = 0
    cases_opened: list[int] = field(default_factory=list)
    cases_updated: int = 0
    cases_resolved: int = 0
    # dry-run: what would have been opened (order id -> automatic?)
    would_open: dict[str, bool] = field(default_factory=dict)
    automatic_open_cases: list[int] = field(default_factory=list)


def candidate_orders(session: Session, *, touched_since: datetime | None) -> list[str]:
    """Orders with two or more paid charges, plus orders with an active case; on an
    incremental pass (``touched_since``) only those whose order, charges, refunds or
    disputes changed since then, so the cost follows the day's volume. Sorted, so passes
    are deterministic."""
    paid = (
        select(Charge.order_id)
        .where(Charge.order_id.is_not(None), Charge.status == "succeeded", Charge.captured.is_(True))
        .group_by(Charge.order_id)
        .having(func.count() > 1)
    )
    active = select(DuplicateCase.order_id).where(DuplicateCase.status.in_(ACTIVE_CASE_STATUSES))
    if touched_since is not None:
        touched = union(
            select(Charge.order_id).where(Charge.updated_at >= touched_since, Charge.order_id.is_not(None)),
            select(Order.id).where(Order.updated_at >= touched_since),
            select(Charge.order_id)
            .join(Refund, Refund.charge_id == Charge.id)
            .where(Refund.updated_at >= touched_since, Charge.order_id.is_not(None)),
            select(Charge.order_id)
            .join(Dispute, Dispute.charge_id == Charge.id)
            .where(Dispute.updated_at >= touched_since, Charge.order_id.is_not(None)),
            select(DuplicateCase.order_id).where(DuplicateCase.updated_at >= touched_since),
        ).subquery()
        paid = paid.where(Charge.order_id.in_(select(touched.c[0])))
        active = active.where(DuplicateCase.order_id.in_(select(touched.c[0])))
    ids = set(session.scalars(paid))
    ids.update(session.scalars(active))
    return sorted(ids)


def assess_orders(
    session: Session, order_ids: list[str], *, window_seconds: int, auto_refund_unknown_total: bool
) -> Iterator[tuple[Order, list[ledger.ChargePosition], Assessment]]:
    """The rule's verdict for each order, loading its charges, refunds and disputes once."""
    orders = {o.id: o for o in session.scalars(select(Order).where(Order.id.in_(order_ids)))}
    charges: dict[str, list[Charge]] = {oid: [] for oid in order_ids}
    for charge in session.scalars(
        select(Charge).where(Charge.order_id.in_(order_ids)).order_by(Charge.created, Charge.id)
    ):
        charges[charge.order_id].append(charge)  # type: ignore[index]
    all_charges = [c for cs in charges.values() for c in cs]
    positions_by_id = {p.charge.id: p for p in ledger.charge_positions(session, all_charges)}
    for order_id in order_ids:
        order = orders.get(order_id)
        if order is None:
            continue
        positions = [positions_by_id[c.id] for c in charges[order_id]]
        verdict = assess(
            OrderFacts(order.id, order.amount, order.currency, order.payment_intent_id),
            [facts(p) for p in positions],
            window_seconds=window_seconds,
            auto_refund_unknown_total=auto_refund_unknown_total,
        )
        yield order, positions, verdict


def facts(position: ledger.ChargePosition) -> ChargeFacts:
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
        released=not charge.captured and charge.reported_refunded >= charge.amount,
        dispute_status=position.dispute.status if position.dispute is not None else None,
        account=charge.account,
        payment_intent_id=charge.payment_intent_id,
    )


def detect(
    session_factory: sessionmaker[Session],
    *,
    window_seconds: int,
    auto_refund_unknown_total: bool,
    touched_since: datetime | None,
    dry_run: bool,
    run_id: int | None,
) -> DetectionSummary:
    """Open, update or resolve cases for every candidate order; one transaction per chunk.

    ``dry_run`` writes nothing: it reports what would be opened."""
    summary = DetectionSummary()
    with session_factory() as session:
        order_ids = candidate_orders(session, touched_since=touched_since)
    for start in range(0, len(order_ids), CHUNK):
        chunk = order_ids[start : start + CHUNK]

        def work(session: Session) -> DetectionSummary:
            part = DetectionSummary()
            # The chunk's cases in one query (charges included), locked: no query per
            # order, and no plan that degrades as the cases table grows during the pass.
            cases = _cases_of(session, chunk, lock=not dry_run)
            opened: list[DuplicateCase] = []
            for order, positions, verdict in assess_orders(
                session, chunk, window_seconds=window_seconds, auto_refund_unknown_total=auto_refund_unknown_total
            ):
                part.orders_examined += 1
                if dry_run:
                    if verdict.needs_case and _would_open(cases.get(order.id, []), verdict):
                        part.would_open[order.id] = verdict.automatic
                    continue
                new_case = sync_case(session, order, positions, verdict, run_id=run_id, summary=part, cases=cases.get(order.id, []))
                if new_case is not None:
                    opened.append(new_case)
            _record_opened(session, opened, part)
            return part

        if dry_run:
            with session_factory() as session:
                part = work(session)
                session.rollback()
        else:
            part = run_in_transaction(session_factory, work)
        summary.orders_examined += part.orders_examined
        summary.cases_opened += part.cases_opened
        summary.cases_updated += part.cases_updated
        summary.cases_resolved += part.cases_resolved
        summary.would_open.update(part.would_open)
        summary.automatic_open_cases += part.automatic_open_cases
    return summary


def _cases_of(session: Session, order_ids: list[str], *, lock: bool) -> dict[str, list[DuplicateCase]]:
    statement = (
        select(DuplicateCase)
        .where(DuplicateCase.order_id.in_(order_ids))
        .order_by(DuplicateCase.id)
        .options(selectinload(DuplicateCase.charges))
    )
    if lock:
        statement = statement.with_for_update()
    cases: dict[str, list[DuplicateCase]] = {}
    for case in session.scalars(statement):
        cases.setdefault(case.order_id, []).append(case)
    return cases


def sync_case(
    session: Session,
    order: Order,
    positions: list[ledger.ChargePosition],
    verdict: Assessment,
    *,
    run_id: int | None,
    summary: DetectionSummary,
    cases: list[DuplicateCase],
) -> DuplicateCase | None:
    """Make the order's cases agree with the verdict.

    * No case needed: an ``open`` case is closed as ``refunded`` (decision ``external``:
      the money was returned outside this service); ``refunding``/``failed`` are left to
      the refund path and finance.
    * Case needed: an ``open`` case is refreshed; a ``refunding``/``failed`` one is left
      alone; otherwise a new case opens unless the latest closed case already covered
      every extra charge (a dismissal stands until another duplicate appears).

    Returns the new case, unflushed (the caller flushes a chunk's new cases at once).
    """
    active = next((c for c in cases if c.status in ACTIVE_CASE_STATUSES), None)
    if not verdict.needs_case:
        if active is not None and active.status == "open":
            active.status = "refunded"
            active.decision = "external"
            active.decided_by = "reconciler"
            active.decided_at = utcnow()
            session.add(
                AuditEntry(
                    actor="reconciler",
                    action="resolved_external",
                    case_id=active.id,
                    note="the order no longer holds more than its total",
                )
            )
            summary.cases_resolved += 1
        return None
    if active is not None:
        if active.status == "open":
            _fill(active, order, positions, verdict)
            summary.cases_updated += 1
            if active.automatic:
                summary.automatic_open_cases.append(active.id)
        return None
    if not _would_open(cases, verdict):
        return None
    case = DuplicateCase(order_id=order.id, status="open", opened_by_run_id=run_id)
    _fill(case, order, positions, verdict)
    session.add(case)
    # Not flushed here: the chunk's new cases go in one batched INSERT ... RETURNING
    # (see _record_opened), not one round trip each.
    return case


def _record_opened(session: Session, opened: list[DuplicateCase], summary: DetectionSummary) -> None:
    """Flush the chunk's new cases at once, then their audit entries and ids."""
    if not opened:
        return
    session.flush()
    for case in opened:
        session.add(
            AuditEntry(
                actor="reconciler",
                action="case_opened",
                case_id=case.id,
                details={"automatic": case.automatic, "reasons": list(case.review_reasons)},
            )
        )
        summary.cases_opened.append(case.id)
        if case.automatic:
            summary.automatic_open_cases.append(case.id)


def _would_open(cases: list[DuplicateCase], verdict: Assessment) -> bool:
    """No case yet, or the latest closed case did not cover every extra charge (a new
    duplicate after a dismissal). ``cases``: the order's cases, oldest first."""
    if not cases:
        return True
    latest = cases[-1]
    if latest.status in ACTIVE_CASE_STATUSES:
        return False
    covered = {cc.charge_id for cc in latest.charges}
    extras = {cid for cid, role in verdict.roles if role != "keeper"}
    return not extras <= covered


def _fill(
    case: DuplicateCase, order: Order, positions: list[ledger.ChargePosition], verdict: Assessment
) -> None:
    roles = dict(verdict.roles)
    case.keeper_charge_id = verdict.keeper_charge_id  # type: ignore[assignment]
    case.order_amount = order.amount
    case.currency = order.currency
    case.excess = dict(verdict.excess)
    case.review_reasons = list(verdict.review_reasons)
    case.automatic = verdict.automatic
    by_id = {cc.charge_id: cc for cc in case.charges}
    ordered = sorted(positions, key=lambda p: (list(roles).index(p.charge.id) if p.charge.id in roles else len(roles), p.charge.created, p.charge.id))
    for index, position in enumerate(ordered):
        charge = position.charge
        if charge.status != "succeeded":
            continue
        member = by_id.get(charge.id)
        if member is None:
            member = CaseCharge(charge_id=charge.id)
            case.charges.append(member)
        member.position = index
        member.role = roles.get(charge.id, "other")
        member.amount = charge.amount
        member.currency = charge.currency
        member.held = position.held
        member.proposed_refund = verdict.proposed_refunds.get(charge.id, 0)

