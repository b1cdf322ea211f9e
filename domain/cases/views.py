"""What people see of duplicate cases: typed read models for the review page, the JSON
API and the CLI, built from the ledger as it is now.

Every view is a :class:`~typing.TypedDict`: plain data (the JSON API serialises it as is,
templates and the CLI read it by key), with its fields and types written down here.
``*_display`` fields are amounts formatted for people (major units and currency); the
integer fields beside them stay in minor units.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Iterable, NotRequired, TypedDict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from domain import ledger
from domain.cases.reasons import ReasonContext, case_reason_text, explain, reason_code, reason_sentences
from models import (
    ACTIVE_CASE_STATUSES,
    AuditEntry,
    CaseKind,
    CaseStatus,
    CaseCharge,
    Charge,
    DuplicateCase,
    Order,
    ReconciliationRun,
    Refund,
    RefundAttempt,
    iso_from_unix,
    iso_utc,
    utcnow,
)
from models.money import decimals, format_amounts, format_money

class RefundLine(TypedDict):
    """A refund of a charge, as the ledger holds it."""

    id: str
    amount: int
    status: str
    reason: str | None
    origin: str


class ChargeView(TypedDict):
    """One charge of a case: what it is, what it holds now, what the case proposes for it."""

    id: str
    role: str
    keeper: bool
    amount: int
    currency: str
    amount_display: str
    created: int
    created_at: str | None
    card_brand: str | None
    card_last4: str | None
    card_display: str | None
    customer: str | None
    payment_intent_id: str | None
    account: str | None
    status: str
    captured: bool
    refunded_amount: int
    refunded_display: str
    held_amount: int
    held_display: str
    dispute_status: str | None
    refunds: list[RefundLine]
    proposed_refund: int
    proposed_refund_display: str | None
    proposed_action: str
    refundable: bool
    dashboard_url: str


class ReasonLine(TypedDict):
    code: str | None
    text: str


class CaseView(TypedDict):
    """A case as the page, the API and the CLI show it: its order, kind, reasons in words,
    decision and times, its charges; ``attempts`` and ``audit`` are left out of the compact
    view."""

    id: int
    status: str
    order_id: str
    order_amount: int | None
    order_currency: str | None
    order_amount_display: str | None
    kind: str
    review_only: bool
    kind_label: str
    keeper_charge_id: str | None
    automatic: bool
    escalation: str | None
    review_reasons: list[Any]
    reasons: list[ReasonLine]
    reason_text: str
    escalation_text: str | None
    proposed_action_text: str
    bulk_approvable: bool
    bulk_refusal: str | None
    excess: dict[str, int]
    excess_display: dict[str, str]
    proposed_refunds: dict[str, int]
    proposed_refunds_display: dict[str, str]
    decision: str | None
    decided_by: str | None
    decided_at: str | None
    note: str | None
    failure: str | None
    opened_at: str | None
    updated_at: str | None
    charges: list[ChargeView]
    attempts: NotRequired[list[AttemptView]]
    audit: NotRequired[list[AuditLine]]


class AttemptView(TypedDict):
    """One refund (or release) we asked Stripe for, under our own idempotency key."""

    idempotency_key: str
    charge_id: str
    amount: int
    currency: str
    status: str
    refund_id: str | None
    origin: str
    requested_by: str | None
    error: str | None
    created_at: str | None


class AuditLine(TypedDict):
    at: str | None
    actor: str
    action: str
    note: str | None
    details: Any


class QueueRow(TypedDict):
    """One line of the review queue (no ledger positions: cheap for a whole page)."""

    id: int
    order_id: str
    status: str
    kind: str
    review_only: bool
    kind_label: str
    excess: dict[str, int]
    excess_display: dict[str, str]
    currencies: list[str]
    opened_at: str | None
    age_seconds: int
    reason_kinds: list[str]
    reason_text: str
    proposed_refunds: dict[str, int]
    proposed_action: str
    card: str | None
    bulk_approvable: bool
    bulk_refusal: str | None


class CurrencyTotals(TypedDict):
    """What the matching cases hold too much of, and what was refunded, in one currency."""

    excess: int
    refunded: int
    excess_display: str
    refunded_display: str


class UnlinkedCounts(TypedDict):
    """Possible duplicates with no order: counted apart, review only."""

    count: int
    active: int
    held: dict[str, int]
    held_display: dict[str, str]


class CasePage(TypedDict):
    """A page of the queue with the counts and totals over every matching case."""

    cases: list[CaseView] | list[QueueRow]
    total: int
    page: int
    per_page: int
    totals: dict[str, CurrencyTotals]
    case_counts: dict[str, int]
    unlinked: UnlinkedCounts


class RunView(TypedDict):
    """One reconciliation pass, as ``GET /api/runs`` and ``reconciler runs`` list them."""

    id: int
    mode: str
    trigger: str
    status: str
    full: bool
    started_at: str | None
    finished_at: str | None
    backfill_from: int | None
    watermark: int | None
    counts: dict[str, Any] | None
    errors: list[Any] | None


# Open and failed cases need a person: they come first.
_STATUS_RANK = {
    CaseStatus.OPEN.value: 0,
    CaseStatus.FAILED.value: 1,
    CaseStatus.REFUNDING.value: 2,
    CaseStatus.REFUNDED.value: 3,
    CaseStatus.DISMISSED.value: 4,
}


_KIND_LABELS = {
    CaseKind.DUPLICATE.value: "duplicate",
    CaseKind.AUTHORIZATION.value: "duplicate authorisation",
    CaseKind.UNLINKED.value: "possible duplicate, no order",
}




def dashboard_url(charge: Charge) -> str:
    mode = "" if charge.livemode else "test/"
    account = f"connect/accounts/{charge.account}/" if charge.account else ""
    return f"https://dashboard.stripe.com/{account}{mode}payments/{charge.payment_intent_id or charge.id}"


# Columns the queue sorts by (``sort=``), each ascending with ``dir=asc``.
SORT_KEYS = ("id", "order", "status", "amount", "currency", "age", "reason", "action")


@dataclass(frozen=True)
class CaseFilter:
    status: str | None = None
    currency: str | None = None
    opened_from: datetime | None = None
    opened_until: datetime | None = None
    page: int = 1
    per_page: int = 25
    # A reason kind (a key of domain.cases.reasons.REASON_KINDS): "clear" or a reason code.
    reason: str | None = None
    # Excess in major units (as typed: 49.99), inclusive; in the currency filtered on, or
    # in any currency the case holds too much of.
    amount_min: Decimal | None = None
    amount_max: Decimal | None = None
    # One of SORT_KEYS, or None for the work order (open and failed first, newest first).
    sort: str | None = None
    descending: bool = False

    def where(self) -> list[Any]:
        clauses: list[Any] = []
        if self.status:
            clauses.append(DuplicateCase.status == self.status)
        if self.currency:
            clauses.append(DuplicateCase.id.in_(select(CaseCharge.case_id).where(CaseCharge.currency == self.currency)))
        if self.opened_from:
            clauses.append(DuplicateCase.opened_at >= self.opened_from)
        if self.opened_until:
            clauses.append(DuplicateCase.opened_at < self.opened_until)
        return clauses

    @property
    def sifts(self) -> bool:
        """Whether some of the filter is applied to the cases read (reason, amounts)."""
        return self.reason is not None or self.amount_min is not None or self.amount_max is not None

    def keeps(self, case: DuplicateCase) -> bool:
        """The reason and amount filters, on a case the database filters kept."""
        if self.reason is not None and self.reason not in reason_kinds(case):
            return False
        if self.amount_min is None and self.amount_max is None:
            return True
        for currency, amount in (case.excess or {}).items():
            if self.currency and currency != self.currency:
                continue
            value = Decimal(int(amount)).scaleb(-decimals(currency))
            if (self.amount_min is None or value >= self.amount_min) and (self.amount_max is None or value <= self.amount_max):
                return True
        return False


def reason_kinds(case: DuplicateCase) -> set[str]:
    """The reason kinds a case is filed under: its reasons' codes, or "clear" for a clear
    duplicate with nothing for a person to weigh."""
    reasons = list(case.review_reasons or [])
    if not reasons:
        return {"clear"} if case.kind != CaseKind.UNLINKED.value else set()
    return {code for code in (reason_code(r) for r in reasons) if code}


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _excess_value(case: DuplicateCase) -> Decimal:
    """The largest excess of the case in major units (what the amount column sorts by)."""
    values = [Decimal(int(a)).scaleb(-decimals(c)) for c, a in (case.excess or {}).items()]
    return max(values, default=Decimal(0))


def _action_rank(case: DuplicateCase) -> int:
    if case.kind == CaseKind.UNLINKED.value:
        return 3
    if case.status not in (CaseStatus.OPEN.value, CaseStatus.FAILED.value):
        return 4
    return 0 if case.automatic and not case.review_reasons else 1 if case.kind == CaseKind.DUPLICATE.value else 2


def _sort_key(name: str) -> Callable[[DuplicateCase], tuple[Any, ...]]:
    keys: dict[str, Callable[[DuplicateCase], tuple[Any, ...]]] = {
        "id": lambda c: (c.id,),
        "order": lambda c: (c.order_id, c.id),
        "status": lambda c: (_STATUS_RANK.get(c.status, 9), c.id),
        "amount": lambda c: (_excess_value(c), c.id),
        "currency": lambda c: (",".join(sorted(c.excess or {})) or (c.currency or ""), c.id),
        # youngest first when ascending
        "age": lambda c: (-_aware(c.opened_at).timestamp(), -c.id),
        "reason": lambda c: (min(reason_kinds(c) or {"~"}), c.id),
        "action": lambda c: (_action_rank(c), c.id),
    }
    return keys[name]


def _work_order(case: DuplicateCase) -> tuple[int, bool, float, int]:
    # open and failed first; possible duplicates with no order after the real cases;
    # newest first within
    return (
        _STATUS_RANK.get(case.status, 9),
        case.kind == CaseKind.UNLINKED.value,
        -_aware(case.opened_at).timestamp(),
        -case.id,
    )


def _matching(session: Session, case_filter: CaseFilter) -> list[DuplicateCase]:
    """Every case the filter matches, in the order asked for."""
    cases = [c for c in session.scalars(select(DuplicateCase).where(*case_filter.where())) if case_filter.keeps(c)]
    if case_filter.sort is None:
        return sorted(cases, key=_work_order)
    return sorted(cases, key=_sort_key(case_filter.sort), reverse=case_filter.descending)


def list_cases(session: Session, case_filter: CaseFilter, *, rows: bool = False) -> CasePage:
    """A page of cases (sorted as the filter says; by default open and failed first,
    newest first within), the total count, and per-currency totals of excess and refunded
    over every case the filter matches.

    ``cases`` holds each case's full view (:func:`case_view`, compact); with ``rows`` it
    holds the lighter queue rows of :func:`queue_rows` instead (the review page's table)."""
    matching = _matching(session, case_filter)
    start = (case_filter.page - 1) * case_filter.per_page
    page = matching[start : start + case_filter.per_page]
    real = [c.id for c in matching if c.kind != CaseKind.UNLINKED.value]
    unlinked = [c for c in matching if c.kind == CaseKind.UNLINKED.value]
    return {
        "cases": queue_rows(session, page) if rows else _compact_views(session, page),
        "total": len(matching),
        "page": case_filter.page,
        "per_page": case_filter.per_page,
        # Real cases only: possible duplicates with no order are counted apart, so
        # they cannot drown the money orders hold too much of.
        "totals": _totals(session, [c for c in matching if c.kind != CaseKind.UNLINKED.value], real),
        # How many of those real cases hold too much in each currency.
        "case_counts": _case_counts(c for c in matching if c.kind != CaseKind.UNLINKED.value),
        "unlinked": _unlinked_counts(unlinked),
    }


def bulk_refusal(case: DuplicateCase, members: Iterable[CaseCharge]) -> str | None:
    """Why "approve selected" may not approve this case, in words; None when it may.

    Only an open case of clear duplicates whose proposal is a full refund of each
    duplicate charge goes through in bulk: nothing for a person to weigh (no reasons, never
    sent back to a person), no authorisation to release, nothing partial. Everything else
    is decided on its own page."""
    if case.kind == CaseKind.UNLINKED.value:
        return "it is a possible duplicate with no order: review only, never refunded by the service"
    if case.status != CaseStatus.OPEN.value:
        return f"it is {case.status}, not open"
    if case.kind != CaseKind.DUPLICATE.value:
        return "it releases an authorisation: decide it on its own page"
    if case.review_reasons or case.escalation or not case.automatic:
        return "a person must decide it on its own page: " + case_reason_text(
            status=case.status, kind=case.kind, automatic=case.automatic, review_reasons=case.review_reasons or [],
            currency=case.currency, order_amount=case.order_amount,
        )
    proposed = [m for m in members if m.proposed_refund > 0]
    if not proposed:
        return "it proposes no refund"
    if any(m.role != "duplicate" or m.proposed_refund != m.amount for m in proposed):
        return "its proposal is not a full refund of clear duplicates"
    return None


def _compact_views(session: Session, cases: list[DuplicateCase]) -> list[CaseView]:
    views = [case_view(session, case.id, compact=True) for case in cases]
    return [view for view in views if view is not None]


def queue_rows(session: Session, cases: list[DuplicateCase]) -> list[QueueRow]:
    """One row per case for the review queue: what the table shows, without the charges'
    ledger positions (three queries for the whole page, not several per case)."""
    ids = [c.id for c in cases]
    members: dict[int, list[CaseCharge]] = {i: [] for i in ids}
    if ids:
        for member in session.scalars(select(CaseCharge).where(CaseCharge.case_id.in_(ids)).order_by(CaseCharge.case_id, CaseCharge.position)):
            members[member.case_id].append(member)
    keepers = {c.keeper_charge_id for c in cases if c.keeper_charge_id}
    cards = {
        cid: (brand, last4)
        for cid, brand, last4 in (
            session.execute(select(Charge.id, Charge.card_brand, Charge.card_last4).where(Charge.id.in_(keepers))) if keepers else []
        )
    }
    now = utcnow()
    rows: list[QueueRow] = []
    for case in cases:
        proposed: dict[str, int] = {}
        for m in members[case.id]:
            if m.proposed_refund:
                proposed[m.currency] = proposed.get(m.currency, 0) + m.proposed_refund
        brand, last4 = cards.get(case.keeper_charge_id, (None, None))
        refusal = bulk_refusal(case, members[case.id])
        opened = _aware(case.opened_at)
        rows.append(
            {
                "id": case.id,
                "order_id": case.order_id,
                "status": case.status,
                "kind": case.kind,
                "review_only": case.kind == CaseKind.UNLINKED.value,
                "kind_label": _KIND_LABELS.get(case.kind, case.kind),
                "excess": dict(sorted((case.excess or {}).items())),
                "excess_display": {c: format_money(a, c) for c, a in sorted((case.excess or {}).items())},
                "currencies": sorted(case.excess or {}) or ([case.currency] if case.currency else []),
                "opened_at": iso_utc(opened),
                "age_seconds": max(0, int((now - opened).total_seconds())),
                "reason_kinds": sorted(reason_kinds(case)),
                "reason_text": case_reason_text(
                    status=case.status, kind=case.kind, automatic=case.automatic, review_reasons=case.review_reasons or [],
                    currency=case.currency, order_amount=case.order_amount, proposed=proposed,
                ),
                "proposed_refunds": proposed,
                "proposed_action": proposed_action(case, proposed),
                "card": _card(brand, last4),
                "bulk_approvable": refusal is None,
                "bulk_refusal": refusal,
            }
        )
    return rows


def proposed_action(case: DuplicateCase, proposed: dict[str, int]) -> str:
    """What deciding the case would do, in a few words."""
    if case.kind == CaseKind.UNLINKED.value:
        return "Review only: refund in the Dashboard or dismiss"
    if case.status == CaseStatus.REFUNDING.value:
        return "Refunds on their way"
    if case.status == CaseStatus.REFUNDED.value:
        return "None: refunded"
    if case.status == CaseStatus.DISMISSED.value:
        return "None: dismissed"
    if not proposed:
        return "A person chooses"
    verb = "Release" if case.kind == CaseKind.AUTHORIZATION.value else "Refund"
    return f"{verb} {format_amounts(proposed)}"


def _unlinked_counts(cases: list[DuplicateCase]) -> UnlinkedCounts:
    """How many "possible duplicate, no order" cases the filter matches (and how many are
    active), and what their repeated charges hold per currency: review only, apart."""
    active = [c for c in cases if c.status in ACTIVE_CASE_STATUSES]
    held: dict[str, int] = {}
    for case in active:
        for currency, amount in (case.excess or {}).items():
            held[currency] = held.get(currency, 0) + amount
    return {
        "count": len(cases),
        "active": len(active),
        "held": dict(sorted(held.items())),
        "held_display": {c: format_money(a, c) for c, a in sorted(held.items())},
    }


def _case_counts(cases: Iterable[DuplicateCase]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for case in cases:
        for currency in case.excess or {}:
            counts[currency] = counts.get(currency, 0) + 1
    return dict(sorted(counts.items()))


def _totals(session: Session, cases: list[DuplicateCase], ids: list[int]) -> dict[str, CurrencyTotals]:
    totals: dict[str, dict[str, int]] = {}
    for case in cases:
        for currency, amount in (case.excess or {}).items():
            bucket = totals.setdefault(currency, {"excess": 0, "refunded": 0})
            bucket["excess"] += amount
    for chunk in (ids[i : i + 2000] for i in range(0, len(ids), 2000)):
        refunded = session.execute(
            select(Refund.currency, func.sum(Refund.amount))
            .join(RefundAttempt, RefundAttempt.refund_id == Refund.id)
            .where(RefundAttempt.case_id.in_(chunk), Refund.status.not_in(tuple(ledger.INACTIVE_REFUND_STATUSES)))
            .group_by(Refund.currency)
        )
        for currency, amount in refunded:
            totals.setdefault(currency, {"excess": 0, "refunded": 0})["refunded"] += int(amount or 0)
    return {
        currency: {
            "excess": bucket["excess"],
            "refunded": bucket["refunded"],
            "excess_display": format_money(bucket["excess"], currency),
            "refunded_display": format_money(bucket["refunded"], currency),
        }
        for currency, bucket in sorted(totals.items())
    }


def case_view(session: Session, case_id: int, *, compact: bool = False) -> CaseView | None:
    """The case as plain data: order, charges (with what each holds now), the proposal,
    refunds and attempts, and the audit trail (``compact``: without the last two)."""
    case = session.get(DuplicateCase, case_id)
    if case is None:
        return None
    order = session.get(Order, case.order_id)
    members = list(case.charges)
    charges = {c.id: c for c in session.scalars(select(Charge).where(Charge.id.in_([m.charge_id for m in members])))}
    positions = {p.charge.id: p for p in ledger.charge_positions(session, list(charges.values()))}
    charge_views = [
        _charge_view(case, member, charges[member.charge_id], positions[member.charge_id])
        for member in members
        if member.charge_id in charges and member.charge_id in positions
    ]
    proposed: dict[str, int] = {}
    for charge_view in charge_views:
        if charge_view["proposed_refund"]:
            proposed[charge_view["currency"]] = proposed.get(charge_view["currency"], 0) + charge_view["proposed_refund"]
    view = _case_fields(case, order, members, proposed, charge_views)
    if not compact:
        attempts = session.scalars(select(RefundAttempt).where(RefundAttempt.case_id == case.id).order_by(RefundAttempt.id))
        view["attempts"] = [_attempt_view(a) for a in attempts]
        view["audit"] = [
            {"at": iso_utc(e.at), "actor": e.actor, "action": e.action, "note": e.note, "details": e.details}
            for e in session.scalars(select(AuditEntry).where(AuditEntry.case_id == case.id).order_by(AuditEntry.id))
        ]
    return view


def _charge_view(case: DuplicateCase, member: CaseCharge, charge: Charge, position: ledger.ChargePosition) -> ChargeView:
    """One charge of a case: what it is, what it holds now, what the case proposes for it."""
    return {
        "id": charge.id,
        "role": member.role,
        "keeper": member.charge_id == case.keeper_charge_id,
        "amount": charge.amount,
        "currency": charge.currency,
        "amount_display": format_money(charge.amount, charge.currency),
        "created": charge.created,
        "created_at": iso_from_unix(charge.created),
        "card_brand": charge.card_brand,
        "card_last4": charge.card_last4,
        "card_display": _card(charge.card_brand, charge.card_last4),
        "customer": charge.customer,
        "payment_intent_id": charge.payment_intent_id,
        "account": charge.account,
        "status": charge.status,
        "captured": charge.captured,
        "refunded_amount": position.refunded,
        "refunded_display": format_money(position.refunded, charge.currency),
        "held_amount": position.held,
        "held_display": format_money(position.held, charge.currency),
        "dispute_status": position.dispute.status if position.dispute else None,
        "refunds": [
            {"id": r.id, "amount": r.amount, "status": r.status, "reason": r.reason, "origin": r.origin}
            for r in position.refunds
        ],
        "proposed_refund": member.proposed_refund,
        "proposed_refund_display": format_money(member.proposed_refund, charge.currency) if member.proposed_refund else None,
        # refund | release (an uncaptured authorisation is released whole, never captured)
        "proposed_action": "release" if member.role == "authorization" else "refund",
        # never for a possible duplicate with no order: review only
        "refundable": case.kind != CaseKind.UNLINKED.value
        and position.dispute is None
        and member.charge_id != case.keeper_charge_id
        and (position.held > 0 or (member.role == "authorization" and not charge.released and not charge.captured)),
        "dashboard_url": dashboard_url(charge),
    }


def _case_fields(
    case: DuplicateCase, order: Order | None, members: list[CaseCharge], proposed: dict[str, int], charges: list[ChargeView]
) -> CaseView:
    """The case itself (its order, kind, reasons in words, decision and times) and its
    charges."""
    return {
        "id": case.id,
        "status": case.status,
        "order_id": case.order_id,
        "order_amount": case.order_amount if order is None else order.amount,
        "order_currency": case.currency if order is None else order.currency,
        "order_amount_display": (
            format_money(order.amount, order.currency) if order is not None and order.amount is not None and order.currency else None
        ),
        "kind": case.kind,
        "review_only": case.kind == CaseKind.UNLINKED.value,
        "kind_label": _KIND_LABELS.get(case.kind, case.kind),
        "keeper_charge_id": case.keeper_charge_id,
        "automatic": case.automatic,
        "escalation": case.escalation,
        "review_reasons": list(case.review_reasons or []),
        # The same reasons in words (major units, currency codes in capitals): one sentence
        # per reason, and the whole as one text (also for clear cases, which have none).
        "reasons": [
            {"code": reason_code(r), "text": t}
            for r, t in zip(case.review_reasons or [], reason_sentences(case.review_reasons or [], _context(case)))
        ],
        "reason_text": case_reason_text(
            status=case.status, kind=case.kind, automatic=case.automatic, review_reasons=case.review_reasons or [],
            currency=case.currency, order_amount=case.order_amount, proposed=proposed,
        ),
        "escalation_text": " ".join(explain(case.escalation, _context(case), tail=False)) if case.escalation else None,
        "proposed_action_text": proposed_action(case, proposed),
        "bulk_approvable": bulk_refusal(case, members) is None,
        "bulk_refusal": bulk_refusal(case, members),
        "excess": dict(case.excess or {}),
        "excess_display": {c: format_money(a, c) for c, a in (case.excess or {}).items()},
        "proposed_refunds": proposed,
        "proposed_refunds_display": {c: format_money(a, c) for c, a in proposed.items()},
        "decision": case.decision,
        "decided_by": case.decided_by,
        "decided_at": iso_utc(case.decided_at),
        "note": case.note,
        "failure": case.failure,
        "opened_at": iso_utc(case.opened_at),
        "updated_at": iso_utc(case.updated_at),
        "charges": charges,
    }


def _attempt_view(attempt: RefundAttempt) -> AttemptView:
    return {
        "idempotency_key": attempt.idempotency_key,
        "charge_id": attempt.charge_id,
        "amount": attempt.amount,
        "currency": attempt.currency,
        "status": attempt.status,
        "refund_id": attempt.refund_id,
        "origin": attempt.origin,
        "requested_by": attempt.requested_by,
        "error": attempt.error,
        "created_at": iso_utc(attempt.created_at),
    }


def _context(case: DuplicateCase) -> ReasonContext:
    return ReasonContext(currency=case.currency, active=case.status in (CaseStatus.OPEN.value, CaseStatus.FAILED.value))


def _card(brand: str | None, last4: str | None) -> str | None:
    """``visa ···· 4242`` (what the page shows for a card)."""
    if not last4:
        return brand or None
    return f"{brand or 'card'} ···· {last4}"


def run_views(session: Session, limit: int = 50) -> list[RunView]:
    """The latest passes, newest first."""
    return [
        {
            "id": r.id,
            "mode": r.mode,
            "trigger": r.trigger,
            "status": r.status,
            "full": r.full,
            "started_at": iso_utc(r.started_at),
            "finished_at": iso_utc(r.finished_at),
            "backfill_from": r.backfill_from,
            "watermark": r.watermark,
            "counts": r.counts,
            "errors": r.errors,
        }
        for r in session.scalars(select(ReconciliationRun).order_by(ReconciliationRun.id.desc()).limit(limit))
    ]


