"""Finance decisions on duplicate cases: approve (the proposal or a plan of one's own),
approve selected, dismiss, reopen, each with its audit trail.

Every decision goes through here whichever door it came in by (page, JSON API, CLI), so
all three behave the same: approving runs the one phased refund path
(:mod:`domain.cases.refunds`), dismissing needs a note, and each action writes an
``audit_log`` row in the same transaction as its effect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from domain.bounds import MAX_ID
from domain.errors import DomainError, Kind
from domain.cases import lifecycle
from domain.ledger.balance import load_balance
from domain.cases.lifecycle import CaseAction, CaseTransitionRefused, DismissedState
from domain.cases.refunds import CaseRefundResult, PlannedRefund, RefundRefused, RefundService
from domain.cases.views import bulk_refusal
from models import ACTIVE_CASE_STATUSES, CaseKind, CaseStatus, DuplicateCase, run_in_transaction
from models.money import format_amounts

MAX_NOTE = 2000


class CaseActionError(DomainError):
    """A decision or a review query that cannot be taken; ``code`` is the JSON error code."""




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
    case = session.get(DuplicateCase, case_id, with_for_update=True, populate_existing=True)
    if case is None:
        raise CaseActionError("case_not_found", f"No case {case_id}.", kind=Kind.NOT_FOUND)
    return case


