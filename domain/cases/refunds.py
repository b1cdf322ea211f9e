"""The one refund path, used by the reconciliation job and by finance (page, API, CLI).

Phases, each its own unit of work, so a crash anywhere leaves a state the next run resumes
without refunding twice:

1. **Record.** Under the case's row lock: check the case may be refunded (``open`` or
   ``failed``; ``refunding``/``refunded`` means someone already did, so approving twice
   refunds once), check every charge against our ledger (never the keeper, never a
   disputed charge, never more than it holds), and commit one ``refund_attempts`` row per
   charge with the idempotency key ``dup-refund-<charge_id>-<n>``. An attempt left
   ``recorded`` by a crash is reused, key and all; ``n`` grows only after a failure was
   confirmed by Stripe and the charge's refunds were listed.
2. **Re-read.** The charge and all its refunds from Stripe, applied to the ledger. A refund
   already carrying this attempt's key in its metadata (the call went through before a
   crash) is adopted: no call. If the charge no longer holds the amount (refunded
   elsewhere, disputed), nothing is sent and the case goes back to ``open``.
3. **Call** Stripe with the attempt's key, ``reason=duplicate`` and stable metadata,
   through the gateway, which paces and retries every call under one policy (a job's
   refunds go through :meth:`StripeGateway.patient`: 429 and 5xx retried with backoff,
   the same key on every try); what still fails is left for the next run (the attempt
   stays ``recorded``, the same key is used again).
4. **Record the result**: the refund upserted by its id through the ledger, which ties it
   to the attempt. A refund event that arrived first was tied already; the money is
   counted from the refund row only, so nothing is counted twice.
"""

from __future__ import annotations

import logging
import time
from datetime import timezone
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from domain.stripe.gateway import GatewayError, StripeGateway, StripeRejected
from domain.cases import lifecycle
from domain import ledger
from domain.ledger.balance import OrderBalance, load_balance
from domain.cases.lifecycle import TRANSITIONS, CaseAction
from domain.stripe.shapes import charge_snapshot, payment_intent_snapshot, refund_snapshot
from models import (
    AttemptAction,
    CaseKind,
    CaseCharge,
    CaseStatus,
    Charge,
    DuplicateCase,
    Order,
    RefundAttempt,
    run_in_transaction,
)
from models.money import format_amounts, format_money

log = logging.getLogger(__name__)


class RefundRefused(Exception):
    """A refund request that must not run; ``code`` is the JSON error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class PlannedRefund:
    charge_id: str
    amount: int


@dataclass(frozen=True, slots=True)
class RefundOutcome:
    """What became of one attempt in this run."""

    attempt_key: str
    charge_id: str
    amount: int
    currency: str
    # refunded | adopted (found at Stripe, no call) | skipped | failed | deferred
    result: str
    refund_id: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class CaseRefundResult:
    case_id: int
    status: str
    outcomes: tuple[RefundOutcome, ...]


class RefundService:
    """Runs the phased refund path. Dependencies are injected; nothing here reads settings
    or the environment. Every Stripe call goes straight to ``gateway``, whose policy paces
    and retries it: the app passes its own gateway (a web request does not wait out a
    429), a job passes ``gateway.patient()``."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        gateway: StripeGateway,
        *,
        clock: Callable[[], float] = time.time,
        after_call: Callable[[RefundAttempt, dict[str, Any]], None] | None = None,
    ) -> None:
        self._session_factory = session_factory
        self._gateway = gateway
        self._clock = clock
        # Test hook: runs between the Stripe call and phase 4 (to simulate a crash there).
        self._after_call = after_call

    # -- phase 1 ---------------------------------------------------------------------------

    def approve(
        self,
        case_id: int,
        plan: Iterable[PlannedRefund] | None = None,
        *,
        origin: str,
        actor: str,
        note: str | None = None,
    ) -> list[str]:
        """Commit the decision and its refund attempts; returns the attempt keys.

        ``plan`` None means the case's proposed refund. Raises :class:`RefundRefused` when
        the case is not open (or failed), or a charge may not be refunded as asked.
        """

        if not self._gateway.configured:
            raise RefundRefused(
                "stripe_not_configured",
                "STRIPE_API_KEY is not set, so no refund can be sent; nothing was changed",
            )
        action = CaseAction.APPROVE if origin == "finance" else CaseAction.AUTO_REFUND

        def record(session: Session) -> list[str]:
            return self._record(session, case_id, plan, action=action, origin=origin, actor=actor, note=note)

        return run_in_transaction(self._session_factory, record)

    def _record(
        self,
        session: Session,
        case_id: int,
        plan: Iterable[PlannedRefund] | None,
        *,
        action: CaseAction,
        origin: str,
        actor: str,
        note: str | None,
    ) -> list[str]:
        """Phase 1 in one transaction: the case locked first, then the chosen charges in id
        order; every check; one attempt per charge; the case's status change."""
        case = _approvable_case(session, case_id, action)
        members = {cc.charge_id: cc for cc in case.charges}
        balance = load_balance(session, case.order_id)
        chosen = _chosen_refunds(case, balance, plan)
        charges = _locked_charges(session, chosen)
        positions = {p.charge.id: p for p in ledger.charge_positions(session, list(charges.values()))}
        for planned in chosen:
            self._check(case, members, charges, positions, planned)
        _check_order_stays_whole(case, balance, chosen, charges)
        assert balance is not None  # _check_order_stays_whole refused an order not in the ledger
        keeper = members.get(case.keeper_charge_id)
        if keeper is not None:
            # What the keeper holds now: before each call Stripe must still show it.
            keeper.held = next((p.held for p in balance.positions if p.charge.id == case.keeper_charge_id), 0)
        keys = [
            _record_attempt(session, case, charges[p.charge_id], p.amount, origin, actor).idempotency_key
            for p in chosen
        ]
        lifecycle.change(
            session,
            case,
            action,
            actor=actor,
            note=note,
            details={
                "refunds": [
                    {"charge_id": p.charge_id, "amount": p.amount, "currency": charges[p.charge_id].currency}
                    for p in chosen
                ],
                "attempts": keys,
            },
        )
        return keys

    @staticmethod
    def _check(
        case: DuplicateCase,
        members: dict[str, CaseCharge],
        charges: dict[str, Charge],
        positions: dict[str, ledger.ChargePosition],
        planned: PlannedRefund,
    ) -> None:
        if planned.charge_id not in members or planned.charge_id not in charges:
            raise RefundRefused("charge_not_in_case", f"{planned.charge_id} is not a charge of case {case.id}")
        if planned.charge_id == case.keeper_charge_id:
            raise RefundRefused("keeper_charge", f"{planned.charge_id} is the charge the order keeps")
        if isinstance(planned.amount, bool) or not isinstance(planned.amount, int) or planned.amount <= 0:
            raise RefundRefused("invalid_amount", "a refund amount is a positive integer in minor units")
        position = positions[planned.charge_id]
        if position.dispute is not None:
            raise RefundRefused(
                "disputed_charge", f"{planned.charge_id} is disputed ({position.dispute.status})"
            )
        if _is_authorization(position.charge):
            # Released whole, never captured: the authorised amount or nothing.
            if planned.amount != position.charge.amount:
                raise RefundRefused(
                    "invalid_amount",
                    f"{planned.charge_id} is an uncaptured authorisation of "
                    f"{format_money(position.charge.amount, position.charge.currency)}; it is released whole",
                )
            return
        if planned.amount > position.held:
            raise RefundRefused(
                "exceeds_held",
                f"{planned.charge_id} holds {format_money(position.held, position.charge.currency)}; "
                f"{format_money(planned.amount, position.charge.currency)} asked",
            )

    # -- phases 2 to 4 ---------------------------------------------------------------------

    def execute_case(self, case_id: int) -> CaseRefundResult:
        """Run every ``recorded`` attempt of the case, then settle the case's status."""
        with self._session_factory() as session:
            attempt_ids = list(
                session.scalars(
                    select(RefundAttempt.id)
                    .where(RefundAttempt.case_id == case_id, RefundAttempt.status == "recorded")
                    .order_by(RefundAttempt.id)
                )
            )
        outcomes = tuple(self.execute_attempt(attempt_id) for attempt_id in attempt_ids)
        status = self.settle_case(case_id)
        return CaseRefundResult(case_id=case_id, status=status, outcomes=outcomes)

    def execute_attempt(self, attempt_id: int) -> RefundOutcome:
        attempt, account = _read_attempt(self._session_factory, attempt_id)
        if attempt.status != "recorded":
            return _outcome(attempt, "refunded" if attempt.status == "succeeded" else attempt.status)
        if attempt.action == AttemptAction.RELEASE:
            return self._execute_release(attempt, account)
        checked = self._reread_for_refund(attempt, account)
        if isinstance(checked, RefundOutcome):
            return checked
        # (When the call may already have gone out and the key is young enough, it is sent
        # again even if Stripe's lists do not show the refund yet: Stripe replays the first
        # result, or refuses an over-refund. Either way nothing is refunded twice.)
        return self._refund(checked, account)

    def _reread_for_refund(self, attempt: RefundAttempt, account: str | None) -> RefundAttempt | RefundOutcome:
        """Phase 2 of a refund: the attempt, still ``recorded`` and clear to send; or what
        became of it (adopted, skipped, deferred)."""
        # Phase 2: what Stripe says about every charge of the order now, and whether our
        # refund exists. The stamp is taken before the reads: a webhook event from the same
        # second as the read then ties with it instead of losing to it.
        as_of = int(self._clock())
        order_charges = _order_charges(self._session_factory, attempt)
        try:
            charge_objs = self._read_charges(order_charges)
            refunds = list(self._gateway.list_refunds(charge_id=attempt.charge_id, account=account))
        except GatewayError as exc:
            return self._defer(attempt, f"re-read failed: {exc}")

        def reconcile_order(session: Session) -> tuple[RefundAttempt, str | None]:
            for charge_id, charge_obj in charge_objs.items():
                acct = order_charges[charge_id]
                ledger.apply_charge(session, charge_snapshot(charge_obj), as_of=as_of, account=acct)
            for refund in refunds:
                ledger.apply_refund(session, refund_snapshot(refund, charge_id=attempt.charge_id), as_of=as_of, account=account)
            found = session.get(RefundAttempt, attempt.id, populate_existing=True)
            assert found is not None
            if found.status != "recorded":
                return found, None
            return found, _order_problem(session, found, charge_objs, may_replay=_may_replay(found, self._clock()))

        attempt, problem = run_in_transaction(self._session_factory, reconcile_order)
        if attempt.status != "recorded":
            log.info("refund found at Stripe, adopted without a call", extra=_log_extra(attempt))
            return _outcome(attempt, "adopted" if attempt.status == "succeeded" else attempt.status)
        if problem:
            return self._skip(attempt, problem)
        return attempt

    def _refund(self, attempt: RefundAttempt, account: str | None) -> RefundOutcome:
        """Phases 3 and 4 of a refund: the call, then its result in the ledger."""
        # Phase 3: the call, under our key. Counted before it is made: calls > 0 is the
        # recovery point that says "this key may have reached Stripe".
        _count_call(self._session_factory, attempt.id)
        call_stamp = int(self._clock())
        try:
            refund_obj = self._send_refund(attempt, account)
        except StripeRejected as exc:
            return self._fail(attempt, f"Stripe refused the refund: {exc}")
        except GatewayError as exc:
            return self._defer(attempt, f"Stripe unavailable: {exc}")
        if self._after_call is not None:
            self._after_call(attempt, refund_obj)

        # Phase 4: the result, through the same upsert as every other path (stamped as of
        # the moment before the call, or the refund's own creation if later).
        stamp = max(call_stamp, int(refund_obj.get("created") or 0))

        def record_result(session: Session) -> RefundAttempt:
            refund = ledger.apply_refund(
                session, refund_snapshot(refund_obj, charge_id=attempt.charge_id), as_of=stamp, account=account
            )
            # By key as well as by metadata: an emulator may not echo the metadata back.
            ledger.settle_refund_attempt(session, refund, attempt.idempotency_key)
            found = session.get(RefundAttempt, attempt.id, populate_existing=True)
            assert found is not None
            return found

        attempt = run_in_transaction(self._session_factory, record_result)
        log.info("refund issued", extra=_log_extra(attempt))
        return _outcome(attempt, "refunded" if attempt.status == "succeeded" else attempt.status)

    def _execute_release(self, attempt: RefundAttempt, account: str | None) -> RefundOutcome:
        """Release an uncaptured authorisation the order does not need, in the same phases
        as a refund: re-read the order at Stripe (and the charge's PaymentIntent), check,
        then cancel the PaymentIntent when it awaits capture, or refund the bare charge
        (Stripe's way to release one) — under the attempt's key, never capturing."""
        checked = self._reread_for_release(attempt, account)
        if isinstance(checked, RefundOutcome):
            return checked
        attempt, intent_id, intent_obj = checked
        return self._release(attempt, account, intent_id, intent_obj)

    def _reread_for_release(
        self, attempt: RefundAttempt, account: str | None
    ) -> tuple[RefundAttempt, str | None, dict[str, Any] | None] | RefundOutcome:
        """Phase 2 of a release: the attempt, still ``recorded`` and clear to send, with
        the charge's PaymentIntent (id and object, if it has one); or what became of it."""
        as_of = int(self._clock())
        order_charges = _order_charges(self._session_factory, attempt)
        try:
            charge_objs = self._read_charges(order_charges)
            intent_id = _id_of(charge_objs[attempt.charge_id].get("payment_intent"))
            intent_obj = self._gateway.retrieve_payment_intent(intent_id, account=account) if intent_id else None
        except GatewayError as exc:
            return self._defer(attempt, f"re-read failed: {exc}")

        def reconcile_order(session: Session) -> tuple[RefundAttempt, str | None]:
            for charge_id, charge_obj in charge_objs.items():
                ledger.apply_charge(session, charge_snapshot(charge_obj), as_of=as_of, account=order_charges[charge_id])
            if intent_obj is not None:
                ledger.apply_payment_intent(session, payment_intent_snapshot(intent_obj), as_of=as_of, account=account)
            found = session.get(RefundAttempt, attempt.id, populate_existing=True)
            assert found is not None
            if found.status != "recorded":
                return found, None
            charge = session.get(Charge, attempt.charge_id, populate_existing=True)
            assert charge is not None
            if charge.released and found.calls > 0:
                found.status = "succeeded"  # our release went through before a crash
                return found, None
            return found, _release_problem(session, found, charge, charge_objs)

        attempt, problem = run_in_transaction(self._session_factory, reconcile_order)
        if attempt.status != "recorded":
            return _outcome(attempt, "adopted" if attempt.status == "succeeded" else attempt.status)
        if problem:
            return self._skip(attempt, problem)
        return attempt, intent_id, intent_obj

    def _release(
        self, attempt: RefundAttempt, account: str | None, intent_id: str | None, intent_obj: dict[str, Any] | None
    ) -> RefundOutcome:
        """Phases 3 and 4 of a release: the call, then its result in the ledger."""
        _count_call(self._session_factory, attempt.id)
        call_stamp = int(self._clock())
        cancel = intent_obj is not None and intent_obj.get("status") == "requires_capture"
        if cancel:
            assert intent_id is not None  # intent_obj was read by this id
        try:
            result = self._send_release(attempt, account, intent_id if cancel else None)
        except StripeRejected as exc:
            return self._fail(attempt, f"Stripe refused the release: {exc}")
        except GatewayError as exc:
            return self._defer(attempt, f"Stripe unavailable: {exc}")
        if self._after_call is not None:
            self._after_call(attempt, result)

        stamp = max(call_stamp, int(result.get("created") or 0)) if not cancel else call_stamp

        def record_result(session: Session) -> RefundAttempt:
            if cancel:
                ledger.apply_payment_intent(session, payment_intent_snapshot(result), as_of=stamp, account=account)
            else:
                refund = ledger.apply_refund(
                    session, refund_snapshot(result, charge_id=attempt.charge_id), as_of=stamp, account=account
                )
                ledger.settle_refund_attempt(session, refund, attempt.idempotency_key)
            ledger.release_charges(session, charge_id=attempt.charge_id)
            found = session.get(RefundAttempt, attempt.id, populate_existing=True, with_for_update=True)
            assert found is not None
            if found.status == "recorded":
                found.status = "succeeded"
            return found

        attempt = run_in_transaction(self._session_factory, record_result)
        log.info("authorisation released", extra=_log_extra(attempt))
        return _outcome(attempt, "released" if attempt.status == "succeeded" else attempt.status)

    def settle_case(self, case_id: int) -> str:
        """Set the case's status from its attempts and the order's balance.

        Any attempt failed → ``failed``; any still recorded → stays ``refunding``; any
        skipped, or the order still holding more than it should → back to ``open`` for a
        person, with the reason (and an alert, see jobs.alerts); otherwise ``refunded``:
        a case is refunded only when, after its refunds, the order holds no more than its
        total."""

        def settle(session: Session) -> str:
            case = _locked_case(session, case_id)
            if case.status != CaseStatus.REFUNDING:
                return case.status
            attempts = session.scalars(
                select(RefundAttempt).where(RefundAttempt.case_id == case_id).order_by(RefundAttempt.n)
            )
            # The latest attempt per charge decides: an earlier failed one was retried.
            current = list({a.charge_id: a for a in attempts}.values())
            statuses = {a.status for a in current}
            details = {"attempts": {a.idempotency_key: a.status for a in current}}
            if "failed" in statuses:
                failure = "; ".join(a.error or "" for a in current if a.status == "failed")
                lifecycle.change(session, case, CaseAction.SETTLE_FAILED, reason=failure, details=details)
                return case.status
            if "recorded" in statuses:
                return case.status
            reasons = [f"refund_skipped: {a.charge_id}: {a.error}" for a in current if a.status == "skipped"]
            balance = load_balance(session, case.order_id)
            excess = balance.over_held() if balance is not None else {}
            if excess:
                reasons.append(
                    "still_over_total: after its refunds the order still holds "
                    + format_amounts(excess)
                    + " more than it should"
                )
            if reasons:
                case.review_reasons = list(case.review_reasons or []) + reasons
                lifecycle.change(
                    session, case, CaseAction.RETURN_TO_REVIEW, reason="; ".join(reasons), details={**details, "excess": excess}
                )
            else:
                lifecycle.change(session, case, CaseAction.SETTLE_REFUNDED, details=details)
            return case.status

        return run_in_transaction(self._session_factory, settle)

    # -- helpers ---------------------------------------------------------------------------

    def _read_charges(self, order_charges: dict[str, str | None]) -> dict[str, dict[str, Any]]:
        """Every charge of the order as Stripe shows it now, each on its own account."""
        return {
            charge_id: self._gateway.retrieve_charge(charge_id, account=acct) for charge_id, acct in order_charges.items()
        }

    def _send_release(self, attempt: RefundAttempt, account: str | None, cancel_intent: str | None) -> dict[str, Any]:
        """The release call: cancel ``cancel_intent`` (the charge's PaymentIntent, awaiting
        capture) under the attempt's key, or else refund the bare charge in full."""
        if cancel_intent is not None:
            return self._gateway.cancel_payment_intent(
                cancel_intent,
                idempotency_key=attempt.idempotency_key,
                cancellation_reason="duplicate",
                account=account,
            )
        return self._send_refund(attempt, account)

    def _send_refund(self, attempt: RefundAttempt, account: str | None) -> dict[str, Any]:
        """The refund call itself: the attempt's key, ``reason=duplicate``, our metadata."""
        return self._gateway.create_refund(
            charge_id=attempt.charge_id,
            amount=attempt.amount,
            idempotency_key=attempt.idempotency_key,
            metadata=_metadata(attempt),
            reason="duplicate",
            account=account,
        )

    def _defer(self, attempt: RefundAttempt, message: str) -> RefundOutcome:
        _update_attempt(self._session_factory, attempt.id, error=message)
        log.warning("refund left for the next run: %s", message, extra=_log_extra(attempt))
        return _outcome(attempt, "deferred", message)

    def _skip(self, attempt: RefundAttempt, message: str) -> RefundOutcome:
        _update_attempt(self._session_factory, attempt.id, only_if_recorded=True, status="skipped", error=message)
        log.warning("refund not sent: %s", message, extra=_log_extra(attempt))
        return _outcome(attempt, "skipped", message)

    def _fail(self, attempt: RefundAttempt, message: str) -> RefundOutcome:
        _update_attempt(self._session_factory, attempt.id, status="failed", error=message)
        log.error("refund failed: %s", message, extra=_log_extra(attempt))
        return _outcome(attempt, "failed", message)


def _approvable_case(session: Session, case_id: int, action: CaseAction) -> DuplicateCase:
    """The case, locked, if ``action`` may take it into the refund path."""
    case = _locked_case(session, case_id)
    if case.kind == CaseKind.UNLINKED:
        # "Possible duplicate, no order": no order says what the customer owes, so
        # no whole-order check can make a refund safe. Review only, by any origin.
        raise RefundRefused(
            "review_only",
            f"case {case_id} is a possible duplicate with no order: the service never refunds it; "
            f"refund in the Stripe Dashboard if it is a duplicate, or dismiss it with a note",
        )
    if case.status not in (s.value for s in TRANSITIONS[action][0] if s is not None):
        raise RefundRefused(
            "case_not_open", f"case {case_id} is {case.status}; nothing to approve"
        )
    return case


def _chosen_refunds(
    case: DuplicateCase, balance: OrderBalance | None, plan: Iterable[PlannedRefund] | None
) -> list[PlannedRefund]:
    """``plan``, or the case's proposal; each charge at most once, something to refund."""
    # What each charge could still give back now: captured money held, or a whole
    # authorisation not yet released.
    held_now = {
        p.charge.id: p.charge.amount if _is_authorization(p.charge) else p.held
        for p in (balance.positions if balance is not None else ())
    }
    # The proposal, capped at what each charge still holds: re-approving a failed
    # case proposes only what is still there to refund.
    chosen = list(plan) if plan is not None else [
        PlannedRefund(cc.charge_id, min(cc.proposed_refund, held_now.get(cc.charge_id, 0)))
        for cc in case.charges
        if min(cc.proposed_refund, held_now.get(cc.charge_id, 0)) > 0
    ]
    if not chosen:
        raise RefundRefused("nothing_to_refund", f"case {case.id} proposes no refund")
    if len({p.charge_id for p in chosen}) != len(chosen):
        raise RefundRefused("charge_repeated", "each charge may appear once")
    return chosen


def _locked_charges(session: Session, chosen: list[PlannedRefund]) -> dict[str, Charge]:
    """The chosen charges, locked in id order (after the case's lock)."""
    return {
        c.id: c
        for c in session.scalars(
            select(Charge)
            .where(Charge.id.in_([p.charge_id for p in chosen]))
            .order_by(Charge.id)
            .with_for_update()
        )
    }


def _check_order_stays_whole(
    case: DuplicateCase, balance: OrderBalance | None, chosen: list[PlannedRefund], charges: dict[str, Charge]
) -> None:
    """No approval may take the order below its total (unknown total: below the keeper's
    holding), whatever a person types. The same check runs again, against Stripe, before
    each call."""
    if balance is None:
        raise RefundRefused("order_not_found", f"order {case.order_id} is not in the ledger")
    order, held = balance.order, balance.held
    if order.amount is not None and order.currency:
        floor = {order.currency: order.amount}
    else:
        keeper = next((p for p in balance.positions if p.charge.id == case.keeper_charge_id), None)
        floor = {keeper.charge.currency: keeper.held} if keeper is not None else {}
    releasing = {p.charge_id for p in chosen if _is_authorization(charges[p.charge_id])}
    if releasing and order.amount is not None and order.currency:
        # What pays the order once these authorisations are released: captured money,
        # then the authorisations kept.
        kept = sum(
            p.charge.amount
            for p in balance.positions
            if _is_authorization(p.charge) and p.charge.id not in releasing and p.charge.currency == order.currency
        )
        if held.get(order.currency, 0) + kept < order.amount:
            raise RefundRefused(
                "below_order_total",
                "releasing these authorisations would leave the order unpaid: it holds "
                f"{format_money(held.get(order.currency, 0), order.currency)} and keeps "
                f"{format_money(kept, order.currency)} authorised, against a total of "
                f"{format_money(order.amount, order.currency)}",
            )
    asked: dict[str, int] = {}
    for p in chosen:
        if p.charge_id in releasing:
            continue
        currency = charges[p.charge_id].currency
        asked[currency] = asked.get(currency, 0) + p.amount
    for currency, amount in asked.items():
        if currency in floor and held.get(currency, 0) - amount < floor[currency]:
            raise RefundRefused(
                "below_order_total",
                f"refunding {format_money(amount, currency)} would leave the order holding "
                f"{format_money(held.get(currency, 0) - amount, currency)}, below its total of "
                f"{format_money(floor[currency], currency)}",
            )


def _record_attempt(
    session: Session, case: DuplicateCase, charge: Charge, amount: int, origin: str, actor: str
) -> RefundAttempt:
    """The charge's attempt for this refund: a ``recorded`` one left by a crash is reused
    (same key: Stripe replays); otherwise the next ``n``."""
    existing = list(
        session.scalars(select(RefundAttempt).where(RefundAttempt.charge_id == charge.id).order_by(RefundAttempt.n))
    )
    for attempt in existing:
        if attempt.status == "recorded":
            if attempt.amount != amount:
                # Its call may have reached Stripe: it must finish before another amount.
                raise RefundRefused(
                    "refund_in_flight",
                    f"{charge.id} has an unfinished refund of {attempt.amount} ({attempt.idempotency_key})",
                )
            attempt.case_id = case.id
            return attempt
    n = (existing[-1].n + 1) if existing else 1
    action = AttemptAction.RELEASE if _is_authorization(charge) else AttemptAction.REFUND
    attempt = RefundAttempt(
        idempotency_key=f"dup-{action.value}-{charge.id}-{n}",
        action=action.value,
        charge_id=charge.id,
        n=n,
        case_id=case.id,
        order_id=case.order_id,
        amount=amount,
        currency=charge.currency,
        origin=origin,
        requested_by=actor,
        status="recorded",
        calls=0,
    )
    session.add(attempt)
    session.flush()
    return attempt


# Stripe keeps idempotency keys for at least 24 hours; past this age a repeated key may
# create a new refund, so it is no longer sent blindly.
KEY_REPLAY_SECONDS = 23 * 3600


def _may_replay(attempt: RefundAttempt, now: float) -> bool:
    created = attempt.created_at if attempt.created_at.tzinfo else attempt.created_at.replace(tzinfo=timezone.utc)
    return attempt.calls > 0 and now - created.timestamp() < KEY_REPLAY_SECONDS


def _count_call(session_factory: sessionmaker[Session], attempt_id: int) -> None:
    _update_attempt(session_factory, attempt_id, count_call=True)


def _update_attempt(
    session_factory: sessionmaker[Session],
    attempt_id: int,
    *,
    only_if_recorded: bool = False,
    count_call: bool = False,
    **changes: Any,
) -> None:
    """One short unit of work on an attempt, under its row lock."""

    def update(session: Session) -> None:
        found = session.get(RefundAttempt, attempt_id, with_for_update=True)
        assert found is not None
        if only_if_recorded and found.status != "recorded":
            return
        if count_call:
            found.calls += 1
        for name, value in changes.items():
            setattr(found, name, value)

    run_in_transaction(session_factory, update)


def _locked_case(session: Session, case_id: int) -> DuplicateCase:
    case = session.execute(
        select(DuplicateCase)
        .where(DuplicateCase.id == case_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if case is None:
        raise RefundRefused("case_not_found", f"no case {case_id}")
    return case


def _read_attempt(session_factory: sessionmaker[Session], attempt_id: int) -> tuple[RefundAttempt, str | None]:
    """The attempt (detached) and its charge's Connect account, in one read."""
    with session_factory() as session:
        attempt = session.get(RefundAttempt, attempt_id)
        assert attempt is not None
        account = session.scalar(select(Charge.account).where(Charge.id == attempt.charge_id))
        session.expunge(attempt)
        return attempt, account


def _is_authorization(charge: Charge) -> bool:
    """An uncaptured authorisation still holding the customer's funds."""
    return charge.status == "succeeded" and not charge.captured and not charge.released and charge.reported_refunded < charge.amount


def _order_charges(session_factory: sessionmaker[Session], attempt: RefundAttempt) -> dict[str, str | None]:
    """Every charge of the attempt's order (and the attempt's own), with its account."""
    with session_factory() as session:
        order_id = attempt.order_id or session.scalar(select(Charge.order_id).where(Charge.id == attempt.charge_id))
        where = Charge.id == attempt.charge_id
        if order_id:
            where = where | (Charge.order_id == order_id)
        return {cid: acct for cid, acct in session.execute(select(Charge.id, Charge.account).where(where).order_by(Charge.id))}


def _metadata(attempt: RefundAttempt) -> dict[str, str]:
    """What every refund of ours carries: the attempt key (so any path can tie it back)
    and the order, case and attempt number."""
    return {
        ledger.ATTEMPT_METADATA_KEY: attempt.idempotency_key,
        "order_id": attempt.order_id or "",
        "case_id": str(attempt.case_id or ""),
        "attempt": str(attempt.n),
    }


def _id_of(value: Any) -> str | None:
    """A Stripe reference that is an id or an expanded object."""
    if isinstance(value, dict):
        return value.get("id")
    return value if isinstance(value, str) and value else None


def _case_problem(
    session: Session, attempt: RefundAttempt, charge_objs: dict[str, dict[str, Any]]
) -> tuple[str | None, DuplicateCase | None]:
    """What rules out any refund or release on the order: a dispute on any of its charges
    at Stripe, no case, or the charge being the case's keeper."""
    disputed = sorted(cid for cid, obj in charge_objs.items() if obj.get("disputed"))
    if disputed:
        which = "the charge is" if disputed == [attempt.charge_id] else "charges of the order are"
        return f"{which} disputed at Stripe ({', '.join(disputed)})", None
    case = session.get(DuplicateCase, attempt.case_id) if attempt.case_id is not None else None
    if case is None:
        return "the attempt belongs to no case", None
    if attempt.charge_id == case.keeper_charge_id:
        return "the charge is the order's keeper", None
    return None, case


def _release_problem(
    session: Session, attempt: RefundAttempt, charge: Charge, charge_objs: dict[str, dict[str, Any]]
) -> str | None:
    """Why this authorisation must not be released now, judged on the whole order as
    Stripe just showed it; None when it may."""
    obj = charge_objs[attempt.charge_id]
    if obj.get("captured"):
        return "the authorisation was captured meanwhile: it is captured money now, for a refund case"
    if obj.get("status") != "succeeded" or charge.released:
        return f"the authorisation is no longer open (status {obj.get('status')}, released={charge.released})"
    problem, case = _case_problem(session, attempt, charge_objs)
    if problem or case is None:
        return problem
    order = session.get(Order, case.order_id)
    released = set(
        session.scalars(select(Charge.id).where(Charge.id.in_(list(charge_objs)), Charge.released.is_(True)))
    )
    in_flight = set(
        session.scalars(
            select(RefundAttempt.charge_id).where(
                RefundAttempt.charge_id.in_(list(charge_objs)),
                RefundAttempt.id != attempt.id,
                RefundAttempt.status == "recorded",
                RefundAttempt.action == AttemptAction.RELEASE.value,
            )
        )
    )
    paid = 0
    for cid, o in charge_objs.items():
        if cid == attempt.charge_id or o.get("status") != "succeeded":
            continue
        if order is not None and order.currency and str(o.get("currency", "")).lower() != order.currency:
            continue
        if o.get("captured"):
            paid += _stripe_remaining(o)
        elif cid not in released and cid not in in_flight and int(o.get("amount_refunded") or 0) < int(o.get("amount") or 0):
            paid += int(o.get("amount") or 0)
    floor = order.amount if order is not None and order.amount is not None else 1
    if paid < floor:
        currency = order.currency if order is not None and order.currency else attempt.currency
        return (
            f"without this authorisation the order would hold or keep authorised only "
            f"{format_money(paid, currency)}, below {format_money(floor, currency)}"
        )
    return None


def _order_problem(
    session: Session, attempt: RefundAttempt, charge_objs: dict[str, dict[str, Any]], *, may_replay: bool
) -> str | None:
    """Why this refund must not be sent now, judged on the whole order as Stripe just
    showed it; None when it may.

    The refund may go only if the charge still holds it, no charge of the order is
    disputed, the keeper still holds what it held when the refund was approved, and the
    order, after this refund and every other refund of ours that may be in flight, still
    holds at least its total (unknown total: the keeper's amount)."""
    charge_obj = charge_objs[attempt.charge_id]
    remaining = _stripe_remaining(charge_obj)
    if charge_obj.get("status") != "succeeded" or not charge_obj.get("captured"):
        return f"the charge is {charge_obj.get('status')}, captured={charge_obj.get('captured')}"
    if remaining < attempt.amount and not may_replay:
        return (
            f"the charge holds {format_money(remaining, attempt.currency)} at Stripe; "
            f"the attempt wanted {format_money(attempt.amount, attempt.currency)}"
        )
    problem, case = _case_problem(session, attempt, charge_objs)
    if problem or case is None:
        return problem
    keeper_obj = charge_objs.get(case.keeper_charge_id)
    if keeper_obj is None:
        return f"the keeper {case.keeper_charge_id} is no longer a charge of the order"
    return _keeper_problem(case, keeper_obj, attempt) or _below_floor_problem(
        session, attempt, case, charge_objs, keeper_obj, may_replay=may_replay
    )


def _keeper_holds(keeper_obj: dict[str, Any]) -> int:
    """What the keeper still holds at Stripe: captured money only."""
    return _stripe_remaining(keeper_obj) if keeper_obj.get("status") == "succeeded" and keeper_obj.get("captured") else 0


def _keeper_problem(case: DuplicateCase, keeper_obj: dict[str, Any], attempt: RefundAttempt) -> str | None:
    """Why the keeper rules the refund out: it no longer holds what it held when the
    refund was approved (or holds nothing); None when it still does."""
    keeper_member = next((cc for cc in case.charges if cc.charge_id == case.keeper_charge_id), None)
    keeper_holds = _keeper_holds(keeper_obj)
    keeper_needed = keeper_member.held if keeper_member is not None else 0
    if keeper_holds <= 0 or keeper_holds < keeper_needed:
        keeper_currency = str(keeper_obj.get("currency") or attempt.currency).lower()
        return (
            f"the keeper {case.keeper_charge_id} holds {format_money(keeper_holds, keeper_currency)} at Stripe, "
            f"not the {format_money(keeper_needed, keeper_currency)} it held when this was approved"
        )
    return None


def _below_floor_problem(
    session: Session,
    attempt: RefundAttempt,
    case: DuplicateCase,
    charge_objs: dict[str, dict[str, Any]],
    keeper_obj: dict[str, Any],
    *,
    may_replay: bool,
) -> str | None:
    """Why the order would hold less than its floor after this refund and every other
    refund of ours that may be in flight; None when it would not."""
    order = session.get(Order, case.order_id)
    currency = attempt.currency
    holds = sum(
        _stripe_remaining(obj)
        for obj in charge_objs.values()
        if obj.get("status") == "succeeded" and obj.get("captured") and str(obj.get("currency", "")).lower() == currency
    )
    in_flight = _in_flight_elsewhere(session, attempt, charge_objs)
    if order is not None and order.amount is not None and order.currency == currency:
        floor, what = order.amount, "its total"
    elif str(keeper_obj.get("currency", "")).lower() == currency:
        # Total unknown, or in another currency: the keeper's holding is the floor.
        floor, what = _keeper_holds(keeper_obj), "the keeper's amount"
    else:
        floor, what = 0, "nothing"
    # A call that may already have reached Stripe (a crash after it, a young key) may be
    # inside Stripe's numbers already, even where its refund is not listed yet: count at
    # most what the charge does not already show as refunded. Sending it again is then a
    # replay of the same key, not a second refund.
    pending = attempt.amount
    if may_replay:
        pending = max(0, attempt.amount - int(charge_objs[attempt.charge_id].get("amount_refunded") or 0))
    after = holds - in_flight - pending
    if after < floor:
        return (
            f"the order would hold {format_money(after, currency)} after this refund"
            + (f" and {format_money(int(in_flight), currency)} in flight" if in_flight else "")
            + f", below {what} ({format_money(floor, currency)})"
        )
    return None


def _in_flight_elsewhere(session: Session, attempt: RefundAttempt, charge_objs: dict[str, dict[str, Any]]) -> int:
    """Our other refunds on the order's charges, in the attempt's currency, whose call may
    have reached Stripe without their refund being known yet."""
    return session.scalar(
        select(func.coalesce(func.sum(RefundAttempt.amount), 0)).where(
            RefundAttempt.charge_id.in_(list(charge_objs)),
            RefundAttempt.id != attempt.id,
            RefundAttempt.status == "recorded",
            RefundAttempt.calls > 0,
            RefundAttempt.refund_id.is_(None),
            RefundAttempt.currency == attempt.currency,
        )
    ) or 0


def _stripe_remaining(charge_obj: dict[str, Any]) -> int:
    """Captured money the charge still holds, by Stripe's own numbers. ``amount_refunded``
    includes the released part of a partial capture, hence the min."""
    amount = int(charge_obj.get("amount") or 0)
    captured = int(charge_obj.get("amount_captured", amount) or 0)
    refunded = int(charge_obj.get("amount_refunded") or 0)
    return max(0, min(captured, amount - refunded))


def _outcome(attempt: RefundAttempt, result: str, message: str | None = None) -> RefundOutcome:
    return RefundOutcome(
        attempt_key=attempt.idempotency_key,
        charge_id=attempt.charge_id,
        amount=attempt.amount,
        currency=attempt.currency,
        result=result,
        refund_id=attempt.refund_id,
        message=message or attempt.error,
    )


def _log_extra(attempt: RefundAttempt) -> dict[str, Any]:
    return {
        "charge_id": attempt.charge_id,
        "case_id": attempt.case_id,
        "order_id": attempt.order_id,
        "attempt": attempt.idempotency_key,
        "amount": attempt.amount,
        "currency": attempt.currency,
    }


def pending_refund_cases(session: Session) -> list[int]:
    """Cases still ``refunding``: a crash, an outage, or a refund reported by backfill or a
    webhook before our own call returned. The next run resumes their ``recorded``
    attempts with the same keys and settles them."""
    return list(
        session.scalars(
            select(DuplicateCase.id).where(DuplicateCase.status == "refunding").order_by(DuplicateCase.id)
        )
    )
