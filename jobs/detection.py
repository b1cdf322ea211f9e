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
from enum import StrEnum
from typing import Any, Iterator

from sqlalchemy import func, select, union
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app.services import case_lifecycle as lifecycle
from app.services.balance import OrderBalance, load_balances
from app.services.case_lifecycle import CaseAction, DismissedState, is_active
from jobs.rules import Assessment
from models import (
    ACTIVE_CASE_STATUSES,
    CaseCharge,
    CaseKind,
    CaseStatus,
    Charge,
    Dispute,
    DuplicateCase,
    Order,
    Refund,
    run_in_transaction,
)
from models.money import format_amount

log = logging.getLogger(__name__)

CHUNK = 500


@dataclass
class DetectionSummary:
    orders_examined: int = 0
    cases_opened: list[int] = field(default_factory=list)
    cases_updated: int = 0
    cases_resolved: int = 0
    cases_reopened: list[int] = field(default_factory=list)
    orders_failed: list[str] = field(default_factory=list)  # the rule raised on these
    # dry-run: what would have been opened or refreshed (order id -> automatic?), and per
    # order what would be done (see _planned)
    would_open: dict[str, bool] = field(default_factory=dict)
    plan: list[dict[str, Any]] = field(default_factory=list)
    automatic_open_cases: list[int] = field(default_factory=list)

    def merge(self, part: "DetectionSummary") -> None:
        self.orders_examined += part.orders_examined
        self.cases_opened += part.cases_opened
        self.cases_updated += part.cases_updated
        self.cases_resolved += part.cases_resolved
        self.cases_reopened += part.cases_reopened
        self.orders_failed += part.orders_failed
        self.would_open.update(part.would_open)
        self.plan += part.plan
        self.automatic_open_cases += part.automatic_open_cases


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
    # Uncaptured authorisations still holding the customer's funds (duplicate authorisations).
    authorized = (
        select(Charge.order_id)
        .where(
            Charge.order_id.is_not(None),
            Charge.status == "succeeded",
            Charge.captured.is_(False),
            Charge.released.is_(False),
            Charge.reported_refunded < Charge.amount,
        )
        .distinct()
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
        authorized = authorized.where(Charge.order_id.in_(select(touched.c[0])))
        active = active.where(DuplicateCase.order_id.in_(select(touched.c[0])))
    ids = set(session.scalars(paid))
    ids.update(session.scalars(authorized))
    ids.update(session.scalars(active))
    return sorted(ids)


def assess_orders(
    session: Session,
    order_ids: list[str],
    *,
    window_seconds: int,
    auto_refund_unknown_total: bool,
    failed: list[str] | None = None,
) -> Iterator[tuple[OrderBalance, Assessment]]:
    """The rule's verdict for each order, loading its charges, refunds and disputes once.

    An order the rule cannot assess (a bug, or data it never expected) is logged and
    listed in ``failed`` instead of stopping the pass for every other order."""
    balances = load_balances(session, order_ids)
    for order_id in order_ids:
        balance = balances.get(order_id)
        if balance is None:
            continue
        try:
            verdict = balance.assess(window_seconds=window_seconds, auto_refund_unknown_total=auto_refund_unknown_total)
        except Exception:
            log.exception("the duplicate rule failed on an order", extra={"order_id": order_id})
            if failed is None:
                raise
            failed.append(order_id)
            continue
        yield balance, verdict


class Step(StrEnum):
    """What a pass does about one order's cases."""

    NOTHING = "nothing"  # holds no more than it should, and no active case
    RESOLVE = "resolve"  # the active case's excess went back outside: close it as external
    REFRESH = "refresh"  # update the open (or failed) case's figures and proposal
    IN_FLIGHT = "in_flight"  # a case is refunding: the refund path settles it
    DISMISSED = "dismissed"  # a person's dismissal made for this very state stands
    REOPEN = "reopen"  # the last case was settled, yet the order holds too much again
    OPEN = "open"  # a new case


def decide(cases: list[DuplicateCase], verdict: Assessment, balance: OrderBalance) -> Step:
    """The step for one order, from its cases (oldest first) and the rule's verdict.

    The order's balance is the truth, not what a case saw: a ``refunded`` case (by us or
    outside) covers nothing once the order holds more than it should again, and a dismissal
    stands only for the state the person saw (see :class:`DismissedState`)."""
    active = next((c for c in cases if is_active(c)), None)
    if not verdict.needs_case:
        if active is not None and active.status in (CaseStatus.OPEN, CaseStatus.FAILED):
            return Step.RESOLVE
        return Step.IN_FLIGHT if active is not None else Step.NOTHING
    if active is not None:
        return Step.IN_FLIGHT if active.status == CaseStatus.REFUNDING else Step.REFRESH
    latest = cases[-1] if cases else None
    if latest is None:
        return Step.OPEN
    if latest.status == CaseStatus.DISMISSED:
        return Step.DISMISSED if _dismissal_stands(latest, verdict, balance) else Step.OPEN
    # Settled (by us or outside), yet the order holds too much now: the same charges
    # holding money again (a refund failed or was canceled) reopen that case; a charge it
    # never saw is a new incident and a new case.
    covered = {cc.charge_id for cc in latest.charges}
    return Step.REOPEN if balance.held_charges <= covered else Step.OPEN


def _dismissal_stands(case: DuplicateCase, verdict: Assessment, balance: OrderBalance) -> bool:
    state = DismissedState.from_json(case.dismissed_state)
    if state is not None:
        return state.stands_for(balance.held, balance.held_charges)
    # Dismissed before the state was recorded: it covers the charges it listed.
    covered = {cc.charge_id for cc in case.charges}
    return {cid for cid, role in verdict.roles if role != "keeper"} <= covered


def detect(
    session_factory: sessionmaker[Session],
    *,
    window_seconds: int,
    auto_refund_unknown_total: bool,
    touched_since: datetime | None,
    dry_run: bool,
    run_id: int | None,
) -> DetectionSummary:
    """Open, refresh, reopen or resolve cases for every candidate order; one transaction
    per chunk. After it, every candidate order that holds more than it should has an
    active case or a dismissal made for its current state.

    ``dry_run`` writes nothing: it reports, per order, what a pass would do."""
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
            for balance, verdict in assess_orders(
                session, chunk, window_seconds=window_seconds, auto_refund_unknown_total=auto_refund_unknown_total,
                failed=part.orders_failed,
            ):
                part.orders_examined += 1
                order_cases = cases.get(balance.order.id, [])
                step = decide(order_cases, verdict, balance)
                if dry_run:
                    if step in (Step.OPEN, Step.REOPEN, Step.REFRESH):
                        planned = _planned(balance, verdict, step, order_cases)
                        part.would_open[balance.order.id] = planned["action"] == "refund"
                        part.plan.append(planned)
                    continue
                new_case = apply_step(session, step, balance, verdict, run_id=run_id, summary=part, cases=order_cases)
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
        summary.merge(part)
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


def apply_step(
    session: Session,
    step: Step,
    balance: OrderBalance,
    verdict: Assessment,
    *,
    run_id: int | None,
    summary: DetectionSummary,
    cases: list[DuplicateCase],
) -> DuplicateCase | None:
    """Make the order's cases agree with the verdict (see :func:`decide`).

    Returns a new case, unflushed (the caller flushes a chunk's new cases at once)."""
    active = next((c for c in cases if is_active(c)), None)
    if step is Step.RESOLVE:
        assert active is not None
        lifecycle.change(
            session, active, CaseAction.RESOLVE_EXTERNAL, reason="the order no longer holds more than its total"
        )
        summary.cases_resolved += 1
    elif step is Step.REFRESH:
        assert active is not None
        _fill(active, balance, verdict)
        summary.cases_updated += 1
        if active.status == CaseStatus.OPEN and active.automatic:
            summary.automatic_open_cases.append(active.id)
    elif step is Step.REOPEN:
        latest = cases[-1]
        lifecycle.change(
            session,
            latest,
            CaseAction.REOPEN_EXCESS,
            reason=(
                f"reopened: the order holds {_amounts(verdict.excess)} more than it should again "
                f"(the case was closed as {latest.decision or 'refunded'})"
            ),
            details={"excess": dict(verdict.excess), "held": balance.held},
        )
        _fill(latest, balance, verdict)
        summary.cases_reopened.append(latest.id)
    elif step is Step.OPEN:
        case = lifecycle.new_case(balance.order.id, kind=CaseKind(verdict.kind), run_id=run_id)
        _fill(case, balance, verdict)
        session.add(case)
        # Not flushed here: the chunk's new cases go in one batched INSERT ... RETURNING
        # (see _record_opened), not one round trip each.
        return case
    return None


def _record_opened(session: Session, opened: list[DuplicateCase], summary: DetectionSummary) -> None:
    """Flush the chunk's new cases at once, then their audit entries and ids."""
    if not opened:
        return
    session.flush()
    for case in opened:
        lifecycle.record_opened(session, case, details={"automatic": case.automatic, "reasons": list(case.review_reasons)})
        summary.cases_opened.append(case.id)
        if case.automatic:
            summary.automatic_open_cases.append(case.id)


def _planned(balance: OrderBalance, verdict: Assessment, step: Step, cases: list[DuplicateCase]) -> dict[str, Any]:
    """What a pass would do about one order, as data (the dry run prints it)."""
    by_id = {p.charge.id: p.charge for p in balance.positions}
    active = next((c for c in cases if is_active(c)), None)
    # What auto mode would do: refund a new clear case, or an open one never sent back to
    # a person; everything else waits for a person.
    automatic = verdict.automatic and (
        step is Step.OPEN
        or (step is Step.REFRESH and active is not None and active.status == CaseStatus.OPEN and not active.escalation)
    )
    return {
        "order_id": balance.order.id,
        "order_total": balance.order.amount,
        "order_currency": balance.order.currency,
        "case_id": active.id if active is not None else (cases[-1].id if step is Step.REOPEN else None),
        "step": step.value,
        "keeper_charge_id": verdict.keeper_charge_id,
        "excess": dict(verdict.excess),
        "action": "refund" if automatic else "review",
        "kind": verdict.kind,
        "refunds": [
            {"charge_id": cid, "amount": amount, "currency": by_id[cid].currency}
            for cid, amount in verdict.proposed_refunds.items()
        ],
        "releases": [
            {"charge_id": cid, "amount": amount, "currency": by_id[cid].currency}
            for cid, amount in verdict.releases.items()
        ],
        "reasons": list(verdict.review_reasons)
        + (["reopened: a settled case's order holds too much again; a person decides"] if step is Step.REOPEN else []),
    }


def _amounts(amounts: dict[str, int]) -> str:
    return ", ".join(format_amount(v, c) for c, v in sorted(amounts.items())) or "nothing"


def _fill(case: DuplicateCase, balance: OrderBalance, verdict: Assessment) -> None:
    order, positions = balance.order, balance.positions
    roles = dict(verdict.roles)
    case.keeper_charge_id = verdict.keeper_charge_id  # type: ignore[assignment]
    case.kind = verdict.kind
    case.order_amount = order.amount
    case.currency = order.currency
    case.excess = dict(verdict.excess)
    case.review_reasons = list(verdict.review_reasons) + (
        [f"sent_to_person: {case.escalation}"] if case.escalation else []
    )
    # A case that went back to a person once stays with people.
    case.automatic = verdict.automatic and not case.escalation
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
        # For an authorisation the proposal is its release (the authorised amount).
        member.proposed_refund = verdict.proposed_refunds.get(charge.id, 0) or verdict.releases.get(charge.id, 0)
