"""Duplicate cases for people: views, finance decisions, the audit trail and the report.

Every decision goes through here whichever door it came in by (page, JSON API, CLI), so
all three behave the same: approving runs the one phased refund path
(:mod:`domain.cases.refunds`), dismissing needs a note, and each action writes an
``audit_log`` row in the same transaction as its effect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable, Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from domain.bounds import MAX_ID, DateParamError, parse_day
from domain.errors import DomainError, Kind
from domain.cases import lifecycle
from domain import ledger
from domain.ledger.balance import load_balance
from domain.cases.lifecycle import CaseAction, CaseTransitionRefused, DismissedState
from domain.cases.reasons import REASON_KINDS, ReasonContext, case_reason_text, explain, reason_code, reason_sentences
from domain.cases.refunds import CaseRefundResult, PlannedRefund, RefundRefused, RefundService
from models import (
    ACTIVE_CASE_STATUSES,
    CASE_STATUSES,
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
    run_in_transaction,
    utcnow,
)
from models.money import decimals, format_amounts, format_money, major_units

MAX_NOTE = 2000
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


class CaseActionError(DomainError):
    """A decision or a review query that cannot be taken; ``code`` is the JSON error code."""


# -- reading -------------------------------------------------------------------------------


def dashboard_url(charge: Charge) -> str:
    mode = "" if charge.livemode else "test/"
    account = f"connect/accounts/{charge.account}/" if charge.account else ""
    return f"https://dashboard.stripe.com/{account}{mode}payments/{charge.payment_intent_id or charge.id}"


# Columns the queue sorts by (``sort=``), each ascending with ``dir=asc``.
SORT_KEYS = ("id", "order", "status", "amount", "currency", "age", "reason", "action")
MAX_AMOUNT_FILTER = Decimal("1000000000000")
_MAJOR_FILTER = re.compile(r"^\d{1,13}(\.\d{1,3})?$")


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


def _major_param(args: dict[str, Any], name: str) -> Decimal | None:
    text = (args.get(name) or "").strip().replace(" ", "")
    if not text:
        return None
    if not _MAJOR_FILTER.match(text):
        raise CaseActionError("invalid_amount", f"{name} is an amount such as 49.99 (major units, no sign or grouping)")
    value = Decimal(text)
    if value > MAX_AMOUNT_FILTER:
        raise CaseActionError("invalid_amount", f"{name} is too large")
    return value


def parse_filter(args: dict[str, Any], *, default_per_page: int = 25) -> CaseFilter:
    """Validate filter parameters from a query string; :class:`CaseActionError` 400 if bad."""
    status = (args.get("status") or "").strip() or None
    if status is not None and status not in CASE_STATUSES:
        raise CaseActionError("invalid_status", f"status must be one of {', '.join(CASE_STATUSES)}")
    currency = (args.get("currency") or "").strip().lower() or None
    if currency is not None and (len(currency) != 3 or not currency.isascii() or not currency.isalpha()):
        raise CaseActionError("invalid_currency", "currency is a three-letter ISO code")
    dates = {}
    for name in ("from", "until"):
        try:
            day = parse_day(args.get(name), name)
        except DateParamError as exc:
            raise CaseActionError(exc.code, exc.message) from None
        if day is not None:
            dates[name] = day
    try:
        page = int(args.get("page") or 1)
        per_page = int(args.get("per_page") or default_per_page)
    except ValueError:
        raise CaseActionError("invalid_page", "page and per_page are whole numbers") from None
    if not (1 <= page <= 100_000 and 1 <= per_page <= 200):
        raise CaseActionError("invalid_page", "page >= 1 and 1 <= per_page <= 200")
    until = dates.get("until")
    if until is not None:
        until = until + timedelta(days=1)  # "until" is inclusive: the whole day
    if "from" in dates and until is not None and dates["from"] >= until:
        raise CaseActionError("invalid_date", "from must be on or before until")
    reason = (args.get("reason") or "").strip() or None
    if reason is not None and reason not in REASON_KINDS:
        raise CaseActionError("invalid_reason", f"reason must be one of {', '.join(REASON_KINDS)}")
    amount_min, amount_max = _major_param(args, "amount_min"), _major_param(args, "amount_max")
    if amount_min is not None and amount_max is not None and amount_min > amount_max:
        raise CaseActionError("invalid_amount", "amount_min must not be above amount_max")
    sort = (args.get("sort") or "").strip() or None
    if sort is not None and sort not in SORT_KEYS:
        raise CaseActionError("invalid_sort", f"sort must be one of {', '.join(SORT_KEYS)}")
    direction = (args.get("dir") or "asc").strip()
    if direction not in ("asc", "desc"):
        raise CaseActionError("invalid_sort", "dir is asc or desc")
    return CaseFilter(
        status, currency, dates.get("from"), until, page, per_page,
        reason=reason, amount_min=amount_min, amount_max=amount_max, sort=sort, descending=direction == "desc",
    )


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


def list_cases(session: Session, case_filter: CaseFilter, *, rows: bool = False) -> dict[str, Any]:
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
        "cases": queue_rows(session, page) if rows else [case_view(session, case.id, compact=True) for case in page],
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


def queue_rows(session: Session, cases: list[DuplicateCase]) -> list[dict[str, Any]]:
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
    rows = []
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


def _unlinked_counts(cases: list[DuplicateCase]) -> dict[str, Any]:
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


def _totals(session: Session, cases: list[DuplicateCase], ids: list[int]) -> dict[str, dict[str, Any]]:
    totals: dict[str, dict[str, Any]] = {}
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
    for currency, bucket in totals.items():
        bucket["excess_display"] = format_money(bucket["excess"], currency)
        bucket["refunded_display"] = format_money(bucket["refunded"], currency)
    return dict(sorted(totals.items()))


def case_view(session: Session, case_id: int, *, compact: bool = False) -> dict[str, Any] | None:
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
    view = {**_case_fields(case, order, members, proposed), "charges": charge_views}
    if not compact:
        attempts = session.scalars(select(RefundAttempt).where(RefundAttempt.case_id == case.id).order_by(RefundAttempt.id))
        view["attempts"] = [_attempt_view(a) for a in attempts]
        view["audit"] = [
            {"at": iso_utc(e.at), "actor": e.actor, "action": e.action, "note": e.note, "details": e.details}
            for e in session.scalars(select(AuditEntry).where(AuditEntry.case_id == case.id).order_by(AuditEntry.id))
        ]
    return view


def _charge_view(case: DuplicateCase, member: CaseCharge, charge: Charge, position: ledger.ChargePosition) -> dict[str, Any]:
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


def _case_fields(case: DuplicateCase, order: Order | None, members: list[CaseCharge], proposed: dict[str, int]) -> dict[str, Any]:
    """The case itself: its order, kind, reasons in words, decision and times."""
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
    }


def _attempt_view(attempt: RefundAttempt) -> dict[str, Any]:
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


def run_views(session: Session, limit: int = 50) -> list[dict[str, Any]]:
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


# -- deciding ------------------------------------------------------------------------------


def parse_refund_plan(body: Any) -> list[PlannedRefund] | None:
    """``{"refunds": [{"charge_id": ..., "amount": ...}, ...]}`` or no ``refunds`` (the
    proposal). :class:`CaseActionError` 400/422 for anything else."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise CaseActionError("invalid_json", "The body must be a JSON object.")
    if "refunds" not in body:
        return None
    items = body["refunds"]
    if not isinstance(items, list) or not items or len(items) > 100:
        raise CaseActionError("invalid_refunds", "refunds is a non-empty list of {charge_id, amount}", kind=Kind.REFUSED)
    plan = []
    for item in items:
        if not isinstance(item, dict):
            raise CaseActionError("invalid_refunds", "each refund is an object {charge_id, amount}", kind=Kind.REFUSED)
        charge_id, amount = item.get("charge_id"), item.get("amount")
        if not isinstance(charge_id, str) or not charge_id.startswith(("ch_", "py_")) or len(charge_id) > 255:
            raise CaseActionError("invalid_charge_id", "charge_id must be a Stripe charge id", kind=Kind.REFUSED)
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= 10**12:
            raise CaseActionError("invalid_amount", "amount is a positive integer in minor units", kind=Kind.REFUSED)
        plan.append(PlannedRefund(charge_id, amount))
    return plan


# Refusals that are about the state of things rather than the request: 404/409.
# What sort of refusal each of the refund service's codes is (any other: REFUSED).
_REFUSAL_KIND = {
    "case_not_found": Kind.NOT_FOUND,
    "case_not_open": Kind.CONFLICT,
    "stripe_not_configured": Kind.CONFLICT,
    "refund_in_flight": Kind.CONFLICT,
}


def approve(
    refunds: RefundService,
    case_id: int,
    *,
    actor: str,
    plan: Iterable[PlannedRefund] | None = None,
    note: str | None = None,
) -> CaseRefundResult:
    """Finance approves the proposal (``plan`` None) or its own choice of charges and
    amounts. Runs the phased refund path; a second approval of the same case is refused
    (``case_not_open``), so approving twice refunds once."""
    note = _clean_note(note, required=False)
    try:
        refunds.approve(case_id, plan, origin="finance", actor=actor, note=note)
    except RefundRefused as exc:
        raise CaseActionError(exc.code, exc.message, kind=_REFUSAL_KIND.get(exc.code, Kind.REFUSED)) from None
    return refunds.execute_case(case_id)


# "Approve selected": how many cases one request may name, and how long it may spend on
# them before leaving the rest untouched (a web worker is stopped after 30 s; each case is
# a few Stripe calls).
MAX_BULK = 100
BULK_TIME_BUDGET = 20.0


@dataclass(frozen=True)
class BulkResult:
    """What "approve selected" did with one case."""

    case_id: int
    # refunded (approved, every refund issued, the case settled) | approved (approved;
    # the case is refunding or failed: see message) | refused (nothing changed) |
    # not_started (the time budget ran out first; nothing changed)
    result: str
    message: str
    code: str | None = None
    status: str | None = None
    order_id: str | None = None
    refunded: dict[str, int] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "order_id": self.order_id,
            "result": self.result,
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "refunded": dict(self.refunded or {}),
            "refunded_display": format_amounts(self.refunded or {}, empty="") or None,
        }


def parse_case_ids(raw: Any) -> list[int]:
    """Case ids as sent (form values or a JSON list): whole numbers, each once, in the
    order given, at most :data:`MAX_BULK`. :class:`CaseActionError` 422 otherwise."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise CaseActionError("invalid_ids", "Select at least one case (ids: a list of case ids).", kind=Kind.REFUSED)
    if len(raw) > MAX_BULK:
        raise CaseActionError("too_many_ids", f"At most {MAX_BULK} cases at once.", kind=Kind.REFUSED)
    ids: list[int] = []
    for item in raw:
        if isinstance(item, bool):
            raise CaseActionError("invalid_ids", "Case ids are whole numbers.", kind=Kind.REFUSED)
        if isinstance(item, str) and re.fullmatch(r"\s*\d{1,12}\s*", item):
            item = int(item)
        if not isinstance(item, int) or not 1 <= item <= MAX_ID:
            raise CaseActionError("invalid_ids", f"Case ids are whole numbers from 1 to {MAX_ID}.", kind=Kind.REFUSED)
        if item not in ids:
            ids.append(item)
    return ids


def approve_many(
    refunds: RefundService,
    session_factory: sessionmaker[Session],
    case_ids: Iterable[int],
    *,
    actor: str,
    note: str | None = None,
    budget: float = BULK_TIME_BUDGET,
    clock: Any = None,
) -> list[BulkResult]:
    """Approve each case's proposal, one case at a time, exactly as approving it alone
    does (:func:`approve`: its own phased refund, its own audit entry), but only cases
    :func:`bulk_refusal` lets through: every other case is refused with the reason and
    left as it was. One case's refusal or failure never stops the others."""
    import time

    now = clock or time.monotonic
    note = _clean_note(note, required=False)
    started = now()
    results: list[BulkResult] = []
    for case_id in case_ids:
        if now() - started > budget:
            results.append(BulkResult(case_id, "not_started", "not started: this request ran out of time first; nothing changed, select it again"))
            continue
        with session_factory() as session:
            case = session.get(DuplicateCase, case_id)
            if case is None:
                results.append(BulkResult(case_id, "refused", f"refused: there is no case {case_id}", "case_not_found"))
                continue
            refusal = bulk_refusal(case, list(case.charges))
            order_id, status = case.order_id, case.status
        if refusal is not None:
            results.append(BulkResult(case_id, "refused", f"refused: {refusal}", "not_eligible", status, order_id))
            continue
        try:
            outcome = approve(refunds, case_id, actor=actor, note=note)
        except CaseActionError as exc:
            results.append(BulkResult(case_id, "refused", f"refused: {exc.message}", exc.code, status, order_id))
            continue
        done = [o for o in outcome.outcomes if o.result in ("refunded", "adopted", "released")]
        refunded: dict[str, int] = {}
        for o in done:
            refunded[o.currency] = refunded.get(o.currency, 0) + o.amount
        other = [o for o in outcome.outcomes if o not in done]
        message = f"approved: {format_amounts(refunded, empty='nothing')} refunded; the case is now {outcome.status}"
        if other:
            message += ". Not done: " + "; ".join(
                f"{o.charge_id} {o.result}" + (f" ({o.message})" if o.message else "") for o in other
            )
        result = "refunded" if outcome.status == CaseStatus.REFUNDED.value and not other else "approved"
        results.append(BulkResult(case_id, result, message, None, outcome.status, order_id, refunded))
    return results


def dismiss(session_factory: sessionmaker[Session], case_id: int, *, actor: str, note: str | None) -> None:
    """Close an open or failed case without refunding. A note is required.

    The dismissal records what the person saw (the money each currency held and the
    charges holding it): it stands while the order holds no more than that, over no
    other charge; any later excess opens a new case."""
    text = _clean_note(note, required=True)

    def work(session: Session) -> None:
        case = _locked(session, case_id)
        if case.kind == CaseKind.UNLINKED:
            # No order to read: the person saw these charges, holding this much.
            held: dict[str, int] = {}
            for member in case.charges:
                held[member.currency] = held.get(member.currency, 0) + member.held
            state = DismissedState(held, frozenset(cc.charge_id for cc in case.charges))
        else:
            balance = load_balance(session, case.order_id)
            state = DismissedState(balance.held, balance.held_charges) if balance is not None else DismissedState({}, frozenset())
        _change(session, case, CaseAction.DISMISS, actor=actor, note=text, dismissed_state=state)

    run_in_transaction(session_factory, work)


def reopen(session_factory: sessionmaker[Session], case_id: int, *, actor: str, note: str | None) -> None:
    """Reopen a dismissed case (the order must have no other active case)."""
    text = _clean_note(note, required=False)

    def work(session: Session) -> None:
        case = _locked(session, case_id)
        if case.status != CaseStatus.DISMISSED:
            raise CaseActionError("case_not_dismissed", f"case {case_id} is {case.status}; only dismissed cases reopen", kind=Kind.CONFLICT)
        other = session.scalar(
            select(DuplicateCase.id).where(
                DuplicateCase.order_id == case.order_id,
                DuplicateCase.status.in_(ACTIVE_CASE_STATUSES),
                DuplicateCase.id != case.id,
            )
        )
        if other is not None:
            raise CaseActionError("order_has_active_case", f"order {case.order_id} already has case {other} open", kind=Kind.CONFLICT)
        _change(session, case, CaseAction.REOPEN, actor=actor, note=text)

    run_in_transaction(session_factory, work)


def _change(session: Session, case: DuplicateCase, action: CaseAction, **options: Any) -> None:
    try:
        lifecycle.change(session, case, action, **options)
    except CaseTransitionRefused as exc:
        raise CaseActionError("case_not_open", str(exc), kind=Kind.CONFLICT) from None


def _clean_note(note: Any, *, required: bool) -> str | None:
    if note is not None and not isinstance(note, str):
        raise CaseActionError("invalid_note", "note is text", kind=Kind.REFUSED)
    text = (note or "").strip()
    if "\x00" in text:
        raise CaseActionError("invalid_note", "note contains a NUL character", kind=Kind.REFUSED)
    if required and not text:
        raise CaseActionError("note_required", "A note saying why is required.", kind=Kind.REFUSED)
    if len(text) > MAX_NOTE:
        raise CaseActionError("note_too_long", f"A note is at most {MAX_NOTE} characters.", kind=Kind.REFUSED)
    return text or None


def _locked(session: Session, case_id: int) -> DuplicateCase:
    case = session.execute(
        select(DuplicateCase).where(DuplicateCase.id == case_id).with_for_update().execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if case is None:
        raise CaseActionError("case_not_found", f"No case {case_id}.", kind=Kind.NOT_FOUND)
    return case


# -- report --------------------------------------------------------------------------------

REPORT_COLUMNS = [
    "case_id",
    "case_status",
    "opened_at",
    "order_id",
    "order_total",
    "order_currency",
    "charge_id",
    "role",
    "charge_created_at",
    "charge_amount",
    "currency",
    "refunded",
    "held",
    "refund_ids",
    "refund_origin",
    "decision",
    "decided_by",
    "decided_at",
    "note",
    "review_reasons",
    "kind",
    # the reasons in words, as the page shows them (added after the columns above, which
    # keep their order)
    "reason_text",
]


def report_rows(session: Session, *, since: datetime, until: datetime | None) -> list[dict[str, str]]:
    """One row per charge of every case opened in ``[since, until)``; amounts in major
    units as decimal strings next to their currency (a spreadsheet reads them as numbers)."""
    where = [DuplicateCase.opened_at >= since]
    if until is not None:
        where.append(DuplicateCase.opened_at < until)
    rows: list[dict[str, str]] = []
    for case in session.scalars(select(DuplicateCase).where(*where).order_by(DuplicateCase.id)):
        view = case_view(session, case.id, compact=True)
        assert view is not None
        for charge in view["charges"]:
            currency = charge["currency"]
            rows.append(
                {
                    "case_id": str(case.id),
                    "case_status": case.status,
                    "opened_at": view["opened_at"],
                    "order_id": case.order_id,
                    "order_total": major_units(view["order_amount"], view["order_currency"]) if view["order_amount"] is not None and view["order_currency"] else "",
                    "order_currency": (view["order_currency"] or "").upper(),
                    "charge_id": charge["id"],
                    "role": charge["role"],
                    "charge_created_at": charge["created_at"],
                    "charge_amount": major_units(charge["amount"], currency),
                    "currency": currency.upper(),
                    "refunded": major_units(charge["refunded_amount"], currency),
                    "held": major_units(charge["held_amount"], currency),
                    "refund_ids": " ".join(r["id"] for r in charge["refunds"]),
                    "refund_origin": " ".join(sorted({r["origin"] for r in charge["refunds"]})),
                    "decision": case.decision or "",
                    "decided_by": case.decided_by or "",
                    "decided_at": view["decided_at"] or "",
                    "note": case.note or "",
                    "review_reasons": "; ".join(case.review_reasons or []),
                    "kind": case.kind,
                    "reason_text": view["reason_text"],
                }
            )
    return rows


_PLAIN_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def spreadsheet_safe(text: str) -> str:
    """A cell starting with = + - @ (or a tab or CR) is a formula to a spreadsheet (CSV
    injection): prefixed with ``'`` so it is shown as text. A plain number is left alone."""
    if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def report_csv(rows: list[dict[str, str]]) -> str:
    """The report as CSV text (header row first), as the CLI prints it and the page serves it."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=REPORT_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    # Every cell, whatever its column: ids and names come from Stripe events and people.
    writer.writerows({key: spreadsheet_safe(str(value)) for key, value in row.items()} for row in rows)
    return out.getvalue()
