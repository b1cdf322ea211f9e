"""Duplicate cases for people: views, finance decisions, the audit trail and the report.

Every decision goes through here whichever door it came in by (page, JSON API, CLI), so
all three behave the same: approving runs the one phased refund path
(:mod:`app.services.refunds`), dismissing needs a note, and each action writes an
``audit_log`` row in the same transaction as its effect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.converters import DateParamError, parse_day
from app.services import case_lifecycle as lifecycle
from domain import ledger
from app.services.balance import load_balance
from app.services.case_lifecycle import CaseAction, CaseTransitionRefused, DismissedState
from app.services.refunds import CaseRefundResult, PlannedRefund, RefundRefused, RefundService
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
    run_in_transaction,
)
from models.money import format_amount, major_units

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


class CaseActionError(Exception):
    """A decision that cannot be taken; ``code`` is the JSON error code."""

    def __init__(self, http_status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message


# -- reading -------------------------------------------------------------------------------


def dashboard_url(charge: Charge) -> str:
    mode = "" if charge.livemode else "test/"
    account = f"connect/accounts/{charge.account}/" if charge.account else ""
    return f"https://dashboard.stripe.com/{account}{mode}payments/{charge.payment_intent_id or charge.id}"


@dataclass(frozen=True)
class CaseFilter:
    status: str | None = None
    currency: str | None = None
    opened_from: datetime | None = None
    opened_until: datetime | None = None
    page: int = 1
    per_page: int = 25

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


def parse_filter(args: dict[str, Any]) -> CaseFilter:
    """Validate filter parameters from a query string; :class:`CaseActionError` 400 if bad."""
    status = (args.get("status") or "").strip() or None
    if status is not None and status not in CASE_STATUSES:
        raise CaseActionError(400, "invalid_status", f"status must be one of {', '.join(CASE_STATUSES)}")
    currency = (args.get("currency") or "").strip().lower() or None
    if currency is not None and (len(currency) != 3 or not currency.isascii() or not currency.isalpha()):
        raise CaseActionError(400, "invalid_currency", "currency is a three-letter ISO code")
    dates = {}
    for name in ("from", "until"):
        try:
            day = parse_day(args.get(name), name)
        except DateParamError as exc:
            raise CaseActionError(exc.http_status, exc.code, str(exc)) from None
        if day is not None:
            dates[name] = day
    try:
        page = int(args.get("page") or 1)
        per_page = int(args.get("per_page") or 25)
    except ValueError:
        raise CaseActionError(400, "invalid_page", "page and per_page are whole numbers") from None
    if not (1 <= page <= 100_000 and 1 <= per_page <= 200):
        raise CaseActionError(400, "invalid_page", "page >= 1 and 1 <= per_page <= 200")
    until = dates.get("until")
    if until is not None:
        until = until + timedelta(days=1)  # "until" is inclusive: the whole day
    return CaseFilter(status, currency, dates.get("from"), until, page, per_page)


def list_cases(session: Session, case_filter: CaseFilter) -> dict[str, Any]:
    """A page of cases (open and failed first, newest first within), the total count, and
    per-currency totals of excess and refunded over every case the filter matches."""
    where = case_filter.where()
    total = session.scalar(select(func.count()).select_from(DuplicateCase).where(*where)) or 0
    rows = list(
        session.scalars(
            select(DuplicateCase)
            .where(*where)
            .order_by(
                _status_order(),
                # possible duplicates with no order (review only) after the real cases
                (DuplicateCase.kind == CaseKind.UNLINKED.value).asc(),
                DuplicateCase.opened_at.desc(),
                DuplicateCase.id.desc(),
            )
            .offset((case_filter.page - 1) * case_filter.per_page)
            .limit(case_filter.per_page)
        )
    )
    return {
        "cases": [case_view(session, case.id, compact=True) for case in rows],
        "total": total,
        "page": case_filter.page,
        "per_page": case_filter.per_page,
        # Real cases only: possible duplicates with no order are counted apart, so
        # they cannot drown the money orders hold too much of.
        "totals": _totals(session, [*where, DuplicateCase.kind != CaseKind.UNLINKED.value]),
        "unlinked": _unlinked_counts(session, where),
    }


def _unlinked_counts(session: Session, where: list[Any]) -> dict[str, Any]:
    """How many "possible duplicate, no order" cases the filter matches (and how many are
    active), and what their repeated charges hold per currency: review only, apart."""
    unlinked = [*where, DuplicateCase.kind == CaseKind.UNLINKED.value]
    count = session.scalar(select(func.count()).select_from(DuplicateCase).where(*unlinked)) or 0
    active = (
        session.scalar(
            select(func.count())
            .select_from(DuplicateCase)
            .where(*unlinked, DuplicateCase.status.in_(ACTIVE_CASE_STATUSES))
        )
        or 0
    )
    held: dict[str, int] = {}
    for excess in session.scalars(
        select(DuplicateCase.excess).where(*unlinked, DuplicateCase.status.in_(ACTIVE_CASE_STATUSES))
    ):
        for currency, amount in (excess or {}).items():
            held[currency] = held.get(currency, 0) + amount
    return {
        "count": count,
        "active": active,
        "held": dict(sorted(held.items())),
        "held_display": {c: format_amount(a, c) for c, a in sorted(held.items())},
    }


def _status_order():  # type: ignore[no-untyped-def]
    from sqlalchemy import case as sql_case

    return sql_case(_STATUS_RANK, value=DuplicateCase.status, else_=9)


def _totals(session: Session, where: list[Any]) -> dict[str, dict[str, Any]]:
    ids = select(DuplicateCase.id).where(*where)
    totals: dict[str, dict[str, Any]] = {}
    for excess in session.scalars(select(DuplicateCase.excess).where(DuplicateCase.id.in_(ids))):
        for currency, amount in (excess or {}).items():
            bucket = totals.setdefault(currency, {"excess": 0, "refunded": 0})
            bucket["excess"] += amount
    refunded = session.execute(
        select(Refund.currency, func.sum(Refund.amount))
        .join(RefundAttempt, RefundAttempt.refund_id == Refund.id)
        .where(RefundAttempt.case_id.in_(ids), Refund.status.not_in(tuple(ledger.INACTIVE_REFUND_STATUSES)))
        .group_by(Refund.currency)
    )
    for currency, amount in refunded:
        totals.setdefault(currency, {"excess": 0, "refunded": 0})["refunded"] += int(amount or 0)
    for currency, bucket in totals.items():
        bucket["excess_display"] = format_amount(bucket["excess"], currency)
        bucket["refunded_display"] = format_amount(bucket["refunded"], currency)
    return dict(sorted(totals.items()))


def case_view(session: Session, case_id: int, *, compact: bool = False) -> dict[str, Any] | None:
    """The case as plain data: order, charges (with what each holds now), the proposal,
    refunds and attempts, and the audit trail."""
    case = session.get(DuplicateCase, case_id)
    if case is None:
        return None
    order = session.get(Order, case.order_id)
    members = list(case.charges)
    charges = {c.id: c for c in session.scalars(select(Charge).where(Charge.id.in_([m.charge_id for m in members])))}
    positions = {p.charge.id: p for p in ledger.charge_positions(session, list(charges.values()))}
    attempts = list(session.scalars(select(RefundAttempt).where(RefundAttempt.case_id == case.id).order_by(RefundAttempt.id)))
    charge_views = []
    for member in members:
        charge = charges.get(member.charge_id)
        position = positions.get(member.charge_id)
        if charge is None or position is None:
            continue
        charge_views.append(
            {
                "id": charge.id,
                "role": member.role,
                "keeper": member.charge_id == case.keeper_charge_id,
                "amount": charge.amount,
                "currency": charge.currency,
                "amount_display": format_amount(charge.amount, charge.currency),
                "created": charge.created,
                "created_at": datetime.fromtimestamp(charge.created, timezone.utc).isoformat(),
                "card_brand": charge.card_brand,
                "card_last4": charge.card_last4,
                "customer": charge.customer,
                "payment_intent_id": charge.payment_intent_id,
                "account": charge.account,
                "status": charge.status,
                "captured": charge.captured,
                "refunded_amount": position.refunded,
                "refunded_display": format_amount(position.refunded, charge.currency),
                "held_amount": position.held,
                "held_display": format_amount(position.held, charge.currency),
                "dispute_status": position.dispute.status if position.dispute else None,
                "refunds": [
                    {"id": r.id, "amount": r.amount, "status": r.status, "reason": r.reason, "origin": r.origin}
                    for r in position.refunds
                ],
                "proposed_refund": member.proposed_refund,
                "proposed_refund_display": format_amount(member.proposed_refund, charge.currency) if member.proposed_refund else None,
                # refund | release (an uncaptured authorisation is released whole, never captured)
                "proposed_action": "release" if member.role == "authorization" else "refund",
                # never for a possible duplicate with no order: review only
                "refundable": case.kind != CaseKind.UNLINKED.value
                and position.dispute is None
                and member.charge_id != case.keeper_charge_id
                and (position.held > 0 or (member.role == "authorization" and not charge.released and not charge.captured)),
                "dashboard_url": dashboard_url(charge),
            }
        )
    proposed: dict[str, int] = {}
    for view in charge_views:
        if view["proposed_refund"]:
            proposed[view["currency"]] = proposed.get(view["currency"], 0) + view["proposed_refund"]
    view: dict[str, Any] = {
        "id": case.id,
        "status": case.status,
        "order_id": case.order_id,
        "order_amount": case.order_amount if order is None else order.amount,
        "order_currency": case.currency if order is None else order.currency,
        "order_amount_display": (
            format_amount(order.amount, order.currency) if order is not None and order.amount is not None and order.currency else None
        ),
        "kind": case.kind,
        "review_only": case.kind == CaseKind.UNLINKED.value,
        "kind_label": _KIND_LABELS.get(case.kind, case.kind),
        "keeper_charge_id": case.keeper_charge_id,
        "automatic": case.automatic,
        "escalation": case.escalation,
        "review_reasons": list(case.review_reasons or []),
        "excess": dict(case.excess or {}),
        "excess_display": {c: format_amount(a, c) for c, a in (case.excess or {}).items()},
        "proposed_refunds": proposed,
        "proposed_refunds_display": {c: format_amount(a, c) for c, a in proposed.items()},
        "decision": case.decision,
        "decided_by": case.decided_by,
        "decided_at": case.decided_at.isoformat() if case.decided_at else None,
        "note": case.note,
        "failure": case.failure,
        "opened_at": case.opened_at.isoformat(),
        "updated_at": case.updated_at.isoformat(),
        "charges": charge_views,
    }
    if not compact:
        view["attempts"] = [
            {
                "idempotency_key": a.idempotency_key,
                "charge_id": a.charge_id,
                "amount": a.amount,
                "currency": a.currency,
                "status": a.status,
                "refund_id": a.refund_id,
                "origin": a.origin,
                "requested_by": a.requested_by,
                "error": a.error,
                "created_at": a.created_at.isoformat(),
            }
            for a in attempts
        ]
        view["audit"] = [
            {"at": e.at.isoformat(), "actor": e.actor, "action": e.action, "note": e.note, "details": e.details}
            for e in session.scalars(select(AuditEntry).where(AuditEntry.case_id == case.id).order_by(AuditEntry.id))
        ]
    return view


def run_views(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    return [
        {
            "id": r.id,
            "mode": r.mode,
            "trigger": r.trigger,
            "status": r.status,
            "full": r.full,
            "started_at": r.started_at.isoformat(),
            "finished_at": r.finished_at.isoformat() if r.finished_at else None,
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
        raise CaseActionError(400, "invalid_json", "The body must be a JSON object.")
    if "refunds" not in body:
        return None
    items = body["refunds"]
    if not isinstance(items, list) or not items or len(items) > 100:
        raise CaseActionError(422, "invalid_refunds", "refunds is a non-empty list of {charge_id, amount}")
    plan = []
    for item in items:
        if not isinstance(item, dict):
            raise CaseActionError(422, "invalid_refunds", "each refund is an object {charge_id, amount}")
        charge_id, amount = item.get("charge_id"), item.get("amount")
        if not isinstance(charge_id, str) or not charge_id.startswith(("ch_", "py_")) or len(charge_id) > 255:
            raise CaseActionError(422, "invalid_charge_id", "charge_id must be a Stripe charge id")
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= 10**12:
            raise CaseActionError(422, "invalid_amount", "amount is a positive integer in minor units")
        plan.append(PlannedRefund(charge_id, amount))
    return plan


# Refusals that are about the state of things rather than the request: 404/409.
_REFUSAL_STATUS = {"case_not_found": 404, "case_not_open": 409, "stripe_not_configured": 409, "refund_in_flight": 409}


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
        raise CaseActionError(_REFUSAL_STATUS.get(exc.code, 422), exc.code, exc.message) from None
    return refunds.execute_case(case_id)


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
            raise CaseActionError(409, "case_not_dismissed", f"case {case_id} is {case.status}; only dismissed cases reopen")
        other = session.scalar(
            select(DuplicateCase.id).where(
                DuplicateCase.order_id == case.order_id,
                DuplicateCase.status.in_(ACTIVE_CASE_STATUSES),
                DuplicateCase.id != case.id,
            )
        )
        if other is not None:
            raise CaseActionError(409, "order_has_active_case", f"order {case.order_id} already has case {other} open")
        _change(session, case, CaseAction.REOPEN, actor=actor, note=text)

    run_in_transaction(session_factory, work)


def _change(session: Session, case: DuplicateCase, action: CaseAction, **options: Any) -> None:
    try:
        lifecycle.change(session, case, action, **options)
    except CaseTransitionRefused as exc:
        raise CaseActionError(409, "case_not_open", str(exc)) from None


def _clean_note(note: Any, *, required: bool) -> str | None:
    if note is not None and not isinstance(note, str):
        raise CaseActionError(422, "invalid_note", "note is text")
    text = (note or "").strip()
    if "\x00" in text:
        raise CaseActionError(422, "invalid_note", "note contains a NUL character")
    if required and not text:
        raise CaseActionError(422, "note_required", "A note saying why is required.")
    if len(text) > MAX_NOTE:
        raise CaseActionError(422, "note_too_long", f"A note is at most {MAX_NOTE} characters.")
    return text or None


def _locked(session: Session, case_id: int) -> DuplicateCase:
    case = session.execute(
        select(DuplicateCase).where(DuplicateCase.id == case_id).with_for_update().execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if case is None:
        raise CaseActionError(404, "case_not_found", f"No case {case_id}.")
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
