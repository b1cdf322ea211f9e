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
3. **Call** Stripe with the attempt's key, ``reason=duplicate`` and stable metadata, under
   the client-side rate limit; 429 and 5xx are retried with backoff, then left for the
   next run (the attempt stays ``recorded``, the same key is used again).
4. **Record the result**: the refund upserted by its id through the ledger, which ties it
   to the attempt. A refund event that arrived first was tied already; the money is
   counted from the refund row only, so nothing is counted twice.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import timezone
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.gateway import GatewayError, StripeGateway, StripeRejected
from app.services import ledger
from app.services.ratelimit import RateLimiter
from app.services.stripe_shapes import charge_snapshot, refund_snapshot
from models import (
    AuditEntry,
    CaseCharge,
    Charge,
    DuplicateCase,
    RefundAttempt,
    run_in_transaction,
    utcnow,
)

log = logging.getLogger(__name__)

REFUNDABLE_CASE_STATUSES = ("open", "failed")


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
    or the environment."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        gateway: StripeGateway,
        *,
        limiter: RateLimiter,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_tries: int = 3,
        after_call: Callable[[RefundAttempt, dict[str, Any]], None] | None = None,
    ) -> None:
        self._session_factory = session_factory
        self._gateway = gateway
        self._limiter = limiter
        self._clock = clock
        self._sleep = sleep
        self._max_tries = max_tries
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

        def record(session: Session) -> list[str]:
            case = _locked_case(session, case_id)
            if case.status not in REFUNDABLE_CASE_STATUSES:
                raise RefundRefused(
                    "case_not_open", f"case {case_id} is {case.status}; nothing to approve"
                )
            members = {cc.charge_id: cc for cc in case.charges}
            chosen = list(plan) if plan is not None else [
                PlannedRefund(cc.charge_id, cc.proposed_refund)
                for cc in case.charges
                if cc.proposed_refund > 0
            ]
            if not chosen:
                raise RefundRefused("nothing_to_refund", f"case {case_id} proposes no refund")
            if len({p.charge_id for p in chosen}) != len(chosen):
                raise RefundRefused("charge_repeated", "each charge may appear once")
            charges = {
                c.id: c
                for c in session.scalars(
                    select(Charge)
                    .where(Charge.id.in_([p.charge_id for p in chosen]))
                    .order_by(Charge.id)
                    .with_for_update()
                )
            }
            positions = {p.charge.id: p for p in ledger.charge_positions(session, list(charges.values()))}
            keys: list[str] = []
            for planned in chosen:
                self._check(case, members, charges, positions, planned)
                attempt = _record_attempt(
                    session, case, charges[planned.charge_id], planned.amount, origin, actor
                )
                keys.append(attempt.idempotency_key)
            case.status = "refunding"
            case.decision = origin
            case.decided_by = actor
            case.decided_at = utcnow()
            case.failure = None
            if note:
                case.note = note
            session.add(
                AuditEntry(
                    actor=actor,
                    action="approve" if origin == "finance" else "auto_refund",
                    case_id=case.id,
                    note=note,
                    details={
                        "refunds": [
                            {"charge_id": p.charge_id, "amount": p.amount, "currency": charges[p.charge_id].currency}
                            for p in chosen
                        ],
                        "attempts": keys,
                    },
                )
            )
            return keys

        return run_in_transaction(self._session_factory, record)

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
        if planned.amount > position.held:
            raise RefundRefused(
                "exceeds_held",
                f"{planned.charge_id} holds {position.held} {position.charge.currency}; "
                f"{planned.amount} asked",
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

        # Phase 2: what Stripe says the charge holds now, and whether our refund exists.
        try:
            charge_obj = self._stripe(lambda: self._gateway.retrieve_charge(attempt.charge_id, account=account))
            refunds = self._stripe(lambda: list(self._gateway.list_refunds(charge_id=attempt.charge_id)))
        except GatewayError as exc:
            return self._defer(attempt, f"re-read failed: {exc}")
        as_of = int(self._clock())

        def reconcile_charge(session: Session) -> RefundAttempt:
            ledger.apply_charge(session, charge_snapshot(charge_obj), as_of=as_of, account=account)
            for refund in refunds:
                ledger.apply_refund(session, refund_snapshot(refund, charge_id=attempt.charge_id), as_of=as_of, account=account)
            return session.get(RefundAttempt, attempt.id, populate_existing=True)  # type: ignore[return-value]

        attempt = run_in_transaction(self._session_factory, reconcile_charge)
        if attempt.status != "recorded":
            log.info("refund found at Stripe, adopted without a call", extra=_log_extra(attempt))
            return _outcome(attempt, "adopted" if attempt.status == "succeeded" else attempt.status)

        remaining = _stripe_remaining(charge_obj)
        problem = None
        if charge_obj.get("disputed"):
            problem = "the charge is disputed at Stripe"
        elif charge_obj.get("status") != "succeeded" or not charge_obj.get("captured"):
            problem = f"the charge is {charge_obj.get('status')}, captured={charge_obj.get('captured')}"
        elif remaining < attempt.amount and not _may_replay(attempt, self._clock()):
            problem = f"the charge holds {remaining} at Stripe; the attempt wanted {attempt.amount}"
        if problem:
            return self._skip(attempt, problem)
        # (When the call may already have gone out and the key is young enough, it is sent
        # again even if Stripe's lists do not show the refund yet: Stripe replays the first
        # result, or refuses an over-refund. Either way nothing is refunded twice.)

        # Phase 3: the call, under our key. Counted before it is made: calls > 0 is the
        # recovery point that says "this key may have reached Stripe".
        _count_call(self._session_factory, attempt.id)
        metadata = {
            ledger.ATTEMPT_METADATA_KEY: attempt.idempotency_key,
            "order_id": attempt.order_id or "",
            "case_id": str(attempt.case_id or ""),
            "attempt": str(attempt.n),
        }
        try:
            refund_obj = self._stripe(
                lambda: self._gateway.create_refund(
                    charge_id=attempt.charge_id,
                    amount=attempt.amount,
                    idempotency_key=attempt.idempotency_key,
                    metadata=metadata,
                    reason="duplicate",
                    account=account,
                )
            )
        except StripeRejected as exc:
            return self._fail(attempt, f"Stripe refused the refund: {exc}")
        except GatewayError as exc:
            return self._defer(attempt, f"Stripe unavailable: {exc}")
        if self._after_call is not None:
            self._after_call(attempt, refund_obj)

        # Phase 4: the result, through the same upsert as every other path.
        stamp = max(int(self._clock()), int(refund_obj.get("created") or 0))

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

    def settle_case(self, case_id: int) -> str:
        """Set the case's status from its attempts: any failed → failed; any still
        recorded → refunding; all skipped → open again; otherwise refunded."""

        def settle(session: Session) -> str:
            case = _locked_case(session, case_id)
            if case.status != "refunding":
                return case.status
            attempts = session.scalars(
                select(RefundAttempt).where(RefundAttempt.case_id == case_id).order_by(RefundAttempt.n)
            )
            # The latest attempt per charge decides: an earlier failed one was retried.
            current = list({a.charge_id: a for a in attempts}.values())
            statuses = {a.status for a in current}
            if "failed" in statuses:
                case.status = "failed"
                case.failure = "; ".join(a.error or "" for a in current if a.status == "failed")
            elif "recorded" in statuses:
                return case.status
            elif statuses == {"skipped"}:
                case.status = "open"
                case.decision = None
                case.note = "; ".join(a.error or "" for a in current)
            else:
                case.status = "refunded"
            session.add(
                AuditEntry(
                    actor="reconciler",
                    action=f"case_{case.status}",
                    case_id=case.id,
                    details={"attempts": {a.idempotency_key: a.status for a in current}},
                )
            )
            return case.status

        return run_in_transaction(self._session_factory, settle)

    # -- helpers ---------------------------------------------------------------------------

    def _stripe(self, call: Callable[[], Any]) -> Any:
        """One Stripe call under the rate limit; 429 and 5xx retried with backoff."""
        for attempt in range(1, self._max_tries + 1):
            self._limiter.acquire()
            try:
                return call()
            except GatewayError as exc:
                if not exc.retryable or attempt == self._max_tries:
                    raise
                delay = min(8.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                log.warning("Stripe call failed (%s); retry %d in %.1fs", type(exc).__name__, attempt, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

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
    attempt = RefundAttempt(
        idempotency_key=f"dup-refund-{charge.id}-{n}",
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
