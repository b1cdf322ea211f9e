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
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, Callable, Iterator, cast

from sqlalchemy import and_, func, or_, select, union
from sqlalchemy.orm import Session, aliased, selectinload, sessionmaker

from domain.cases import lifecycle
from domain import ledger
from domain.ledger.balance import OrderBalance, load_balances
from domain.cases.lifecycle import CaseAction, DismissedState, is_active
from domain.cases.rules import Assessment, UnlinkedChargeFacts, UnlinkedGroup, unlinked_groups
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
    UNLINKED_ORDER_PREFIX,
    run_in_transaction,
)
from models.db import insert_ignore
from models.money import format_amounts, format_money

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
    # "possible duplicate, no order" cases (kind unlinked), counted apart from the rest:
    # review only, never in automatic_open_cases
    unlinked_groups_found: int = 0
    unlinked_opened: list[int] = field(default_factory=list)
    unlinked_updated: int = 0
    unlinked_resolved: int = 0
    would_open_unlinked: list[str] = field(default_factory=list)  # dry run: their synthetic order ids

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
        self.unlinked_groups_found += part.unlinked_groups_found
        self.unlinked_opened += part.unlinked_opened
        self.unlinked_updated += part.unlinked_updated
        self.unlinked_resolved += part.unlinked_resolved
        self.would_open_unlinked += part.would_open_unlinked


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
    # Unlinked cases hang on synthetic orders with no charges: detect_unlinked keeps them.
    active = select(DuplicateCase.order_id).where(
        DuplicateCase.status.in_(ACTIVE_CASE_STATUSES), DuplicateCase.kind != CaseKind.UNLINKED.value
    )
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
    # Each query keeps only rows with an order (IS NOT NULL, or a non-null column), though
    # Charge.order_id is typed nullable.
    return sorted(cast(set[str], ids))


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
    progress: Callable[[int, int], None] | None = None,
) -> DetectionSummary:
    """Open, refresh, reopen or resolve cases for every candidate order; one transaction
    per chunk. After it, every candidate order that holds more than it should has an
    active case or a dismissal made for its current state.

    ``dry_run`` writes nothing: it reports, per order, what a pass would do.
    ``progress(orders_done_in_this_chunk, candidate_orders)`` is called after each chunk
    (and once before the first, with 0); it may raise to stop the pass between chunks."""
    summary = DetectionSummary()
    with session_factory() as session:
        order_ids = candidate_orders(session, touched_since=touched_since)
    if progress:
        progress(0, len(order_ids))
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
        if progress:
            progress(len(chunk), len(order_ids))
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
    return format_amounts(amounts)


def _fill(case: DuplicateCase, balance: OrderBalance, verdict: Assessment) -> None:
    order, positions = balance.order, balance.positions
    roles = dict(verdict.roles)
    assert verdict.keeper_charge_id is not None  # every verdict that needs a case names its keeper
    case.keeper_charge_id = verdict.keeper_charge_id
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


# -- charges that name no order ------------------------------------------------------------
#
# A review-only signal next to the order rule. Its cases (kind "unlinked") hang on a
# synthetic order row "~unlinked:<fp_...|cus_...>:<first charge id>": no real order can
# have such an id ("~" cannot start one), the order row has no charges, no total and is
# never a candidate of the order rule, and the one-active-case-per-order index keeps one
# active case per group without a schema change to duplicate_cases. A case keeps its
# synthetic order for life: a group that grows (a third charge) or is found again after a
# dismissal is matched to its case by its charges, not by recomputing the id.

MAX_CHAIN_ROUNDS = 20


def unlinked_order_id(group: UnlinkedGroup) -> str:
    kind, value = group.key
    tag = f"fp_{value}" if kind == "fingerprint" else value
    order_id = f"{UNLINKED_ORDER_PREFIX}{tag}:{group.first_charge_id}"
    if len(order_id) > 255:  # a very long customer id: keep the id within the column
        import hashlib

        order_id = f"{UNLINKED_ORDER_PREFIX}h_{hashlib.sha256(tag.encode()).hexdigest()[:32]}:{group.first_charge_id}"[:255]
    return order_id


def _paid(model: Any) -> Any:
    return and_(model.status == "succeeded", model.captured.is_(True))


def unlinked_candidates(session: Session, *, window_seconds: int, touched_since: datetime | None) -> list[Charge]:
    """Paid charges that may form a "possible duplicate, no order" group, set-based.

    Seeds: paid charges naming no order, with a card fingerprint or a customer, changed
    since ``touched_since`` (all on a full pass), plus the charges of active unlinked
    cases. Then, in one self-join per round, every paid charge (linked or not: a linked
    one is what says "repeat purchase") with the same card or customer, amount and
    currency within the window of one already found, until nothing new joins."""
    seed = select(Charge.id).where(
        Charge.order_id.is_(None),
        _paid(Charge),
        or_(Charge.card_fingerprint.is_not(None), Charge.customer.is_not(None)),
    )
    if touched_since is not None:
        seed = seed.where(Charge.updated_at >= touched_since)
    active_members = (
        select(CaseCharge.charge_id)
        .join(DuplicateCase, DuplicateCase.id == CaseCharge.case_id)
        .where(DuplicateCase.kind == CaseKind.UNLINKED.value, DuplicateCase.status.in_(ACTIVE_CASE_STATUSES))
    )
    found: dict[str, Charge] = {}
    frontier: Any = union(seed, active_members).subquery()
    for _ in range(MAX_CHAIN_ROUNDS):
        near = aliased(Charge)
        anchor = aliased(Charge)
        close = and_(
            near.currency == anchor.currency,
            near.amount == anchor.amount,
            near.created >= anchor.created - window_seconds,
            near.created <= anchor.created + window_seconds,
        )
        anchors = select(frontier.c[0])
        by_card = (
            select(near.id)
            .join(anchor, and_(close, anchor.card_fingerprint.is_not(None), near.card_fingerprint == anchor.card_fingerprint))
            .where(anchor.id.in_(anchors), _paid(near))
        )
        by_customer = (
            select(near.id)
            .join(anchor, and_(close, anchor.customer.is_not(None), near.customer == anchor.customer))
            .where(anchor.id.in_(anchors), _paid(near))
        )
        ids = set(session.scalars(union(by_card, by_customer))) - set(found)
        if not ids:
            break
        for start in range(0, len(ids), CHUNK):
            for charge in session.scalars(select(Charge).where(Charge.id.in_(sorted(ids)[start : start + CHUNK]))):
                found[charge.id] = charge
        frontier = select(Charge.id).where(Charge.id.in_(sorted(ids))).subquery()
    return sorted(found.values(), key=lambda c: (c.created, c.id))


def detect_unlinked(
    session_factory: sessionmaker[Session],
    *,
    window_seconds: int,
    touched_since: datetime | None,
    dry_run: bool,
    run_id: int | None,
) -> DetectionSummary:
    """Open (or refresh) a review-only case for each group of charges naming no order
    (:func:`domain.cases.rules.unlinked_groups`); close as ``external`` an active one whose
    repeats no longer hold money. Never automatic, never in ``automatic_open_cases``."""

    def work(session: Session) -> DetectionSummary:
        part = DetectionSummary()
        charges = unlinked_candidates(session, window_seconds=window_seconds, touched_since=touched_since)
        positions = {p.charge.id: p for p in ledger.charge_positions(session, charges)}
        groups = unlinked_groups(_unlinked_facts(charges, positions), window_seconds=window_seconds)
        part.unlinked_groups_found = len(groups)
        by_id = {c.id: c for c in charges}
        member_ids = sorted({cid for g in groups for cid in g.charge_ids})
        cases = _unlinked_cases(session, member_ids, lock=not dry_run)
        matched: set[int] = set()
        opened: list[DuplicateCase] = []
        for group in groups:
            mine = sorted(
                {c.id: c for cid in group.charge_ids for c in cases.get(cid, [])}.values(), key=lambda c: c.id
            )
            active = next((c for c in mine if is_active(c)), None)
            if active is not None:
                matched.add(active.id)
                if dry_run:
                    continue
                if {cc.charge_id for cc in active.charges} != set(group.charge_ids) or active.excess != _unlinked_excess(group, positions):
                    _fill_unlinked(active, group, by_id, positions, window_seconds)
                    part.unlinked_updated += 1
                continue
            latest = mine[-1] if mine else None
            if latest is not None and latest.status == CaseStatus.DISMISSED and _unlinked_dismissal_stands(latest, group):
                continue
            order_id = latest.order_id if latest is not None else unlinked_order_id(group)
            if dry_run:
                part.would_open_unlinked.append(order_id)
                continue
            insert_ignore(session, Order, {"id": order_id, "status": "pending", "version": 1})
            case = lifecycle.new_case(order_id, kind=CaseKind.UNLINKED, run_id=run_id)
            _fill_unlinked(case, group, by_id, positions, window_seconds)
            session.add(case)
            opened.append(case)
        if not dry_run:
            _resolve_stale_unlinked(session, matched, part)
        _record_unlinked_opened(session, opened, part)
        return part

    if dry_run:
        with session_factory() as session:
            part = work(session)
            session.rollback()
            return part
    return run_in_transaction(session_factory, work)


def _unlinked_facts(charges: list[Charge], positions: dict[str, ledger.ChargePosition]) -> list[UnlinkedChargeFacts]:
    """What the unlinked rule reads of each candidate charge, with what it holds now."""
    return [
        UnlinkedChargeFacts(
            id=c.id,
            amount=c.amount,
            currency=c.currency,
            created=c.created,
            fingerprint=c.card_fingerprint,
            customer=c.customer,
            description=c.description,
            order_id=c.order_id,
            held=positions[c.id].held,
        )
        for c in charges
    ]


def _record_unlinked_opened(session: Session, opened: list[DuplicateCase], part: DetectionSummary) -> None:
    """The opening audit entry of each new unlinked case, once the cases have ids."""
    if not opened:
        return
    session.flush()
    for case in opened:
        lifecycle.record_opened(
            session, case, details={"automatic": False, "reasons": list(case.review_reasons), "kind": case.kind}
        )
        part.unlinked_opened.append(case.id)


def _unlinked_cases(session: Session, charge_ids: list[str], *, lock: bool) -> dict[str, list[DuplicateCase]]:
    """Unlinked cases holding any of ``charge_ids``, by charge id (oldest case first)."""
    result: dict[str, list[DuplicateCase]] = {}
    for start in range(0, len(charge_ids), CHUNK):
        chunk = charge_ids[start : start + CHUNK]
        statement = (
            select(DuplicateCase)
            .where(
                DuplicateCase.kind == CaseKind.UNLINKED.value,
                DuplicateCase.id.in_(select(CaseCharge.case_id).where(CaseCharge.charge_id.in_(chunk))),
            )
            .order_by(DuplicateCase.id)
            .options(selectinload(DuplicateCase.charges))
        )
        if lock:
            statement = statement.with_for_update()
        for case in session.scalars(statement):
            for member in case.charges:
                if member.charge_id in chunk and case not in result.get(member.charge_id, []):
                    result.setdefault(member.charge_id, []).append(case)
    return result


def _unlinked_dismissal_stands(case: DuplicateCase, group: UnlinkedGroup) -> bool:
    """A dismissed unlinked case covers the charges the person saw; a charge it never saw
    (a third one) is news, and opens a new case."""
    state = DismissedState.from_json(case.dismissed_state)
    seen = state.charges if state is not None and state.charges else frozenset(cc.charge_id for cc in case.charges)
    return set(group.charge_ids) <= seen


def _unlinked_excess(group: UnlinkedGroup, positions: dict[str, Any]) -> dict[str, int]:
    held = sum(positions[cid].held for cid in group.repeats if cid in positions)
    return {group.currency: held} if held > 0 else {}


def _fill_unlinked(
    case: DuplicateCase,
    group: UnlinkedGroup,
    charges: dict[str, Charge],
    positions: dict[str, Any],
    window_seconds: int,
) -> None:
    """The evidence: the charges (earliest first), what ties them, when they were made."""
    first = charges[group.first_charge_id]
    kind, value = group.key
    times = ", ".join(
        f"{cid} at {datetime.fromtimestamp(charges[cid].created, tz=timezone.utc).isoformat()}" for cid in group.charge_ids
    )
    minutes = (group.last_created - group.first_created) / 60
    case.kind = CaseKind.UNLINKED.value
    case.keeper_charge_id = first.id
    case.order_amount = None
    case.currency = group.currency
    case.excess = _unlinked_excess(group, positions)
    case.automatic = False
    case.review_reasons = [
        f"unlinked_charges: {len(group.charge_ids)} charges of {format_money(group.amount, group.currency)} "
        f"with the same {'card (fingerprint ' + value + ')' if kind == 'fingerprint' else 'customer ' + value} "
        f"within {minutes:.1f} minutes (window {window_seconds // 60} min), none naming an order: {times}",
        "review_only: possible duplicate, no order; the service never refunds it. Refund in the Stripe "
        "Dashboard if it is a duplicate, or dismiss it with a note",
    ]
    by_id = {cc.charge_id: cc for cc in case.charges}
    for index, cid in enumerate(group.charge_ids):
        charge = charges[cid]
        member = by_id.get(cid)
        if member is None:
            member = CaseCharge(charge_id=cid)
            case.charges.append(member)
        member.position = index
        member.role = "earliest" if index == 0 else "repeat"
        member.amount = charge.amount
        member.currency = charge.currency
        member.held = positions[cid].held
        member.proposed_refund = 0
    # A charge that left the group (refunded, or now linked to an order) stays in the
    # evidence, after the group, with what it holds now.
    extra = [cc for cc in case.charges if cc.charge_id not in set(group.charge_ids)]
    for index, member in enumerate(sorted(extra, key=lambda cc: cc.position), start=len(group.charge_ids)):
        member.position = index
        member.role = "left_group"
        if member.charge_id in positions:
            member.held = positions[member.charge_id].held


def _resolve_stale_unlinked(session: Session, matched: set[int], summary: DetectionSummary) -> None:
    """Active unlinked cases no group matched this pass: once at most one of their charges
    still holds money (the repeats were refunded outside), they are closed as external.
    Otherwise (a charge got linked to an order, say) they stay with the person."""
    stale = list(
        session.scalars(
            select(DuplicateCase)
            .where(
                DuplicateCase.kind == CaseKind.UNLINKED.value,
                DuplicateCase.status.in_((CaseStatus.OPEN.value, CaseStatus.FAILED.value)),
                DuplicateCase.id.not_in(matched) if matched else DuplicateCase.id.is_not(None),
            )
            .order_by(DuplicateCase.id)
            .options(selectinload(DuplicateCase.charges))
            .with_for_update()
        )
    )
    for case in stale:
        members = list(session.scalars(select(Charge).where(Charge.id.in_([cc.charge_id for cc in case.charges]))))
        holding = [p for p in ledger.charge_positions(session, members) if p.held > 0]
        if len(holding) <= 1:
            lifecycle.change(
                session,
                case,
                CaseAction.RESOLVE_EXTERNAL,
                reason="no longer a possible duplicate: at most one of its charges still holds money",
            )
            case.excess = {}
            summary.unlinked_resolved += 1
