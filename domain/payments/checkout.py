"""The checkout endpoint's logic: at most one open Stripe Checkout Session per order.

The pay endpoint's phases and lock discipline (:mod:`domain.payments.service`), one
transaction per phase:

1. **Decide** (short transaction, the order row locked): paid (409), an open session to
   hand out, an expire to send (replace), a call in flight to wait for, an attempt whose
   outcome is unknown to resolve, or a new attempt ``n`` recorded ``creating`` and
   committed before Stripe is called.
2. **Call Stripe** with no lock held: create under ``order-<order_id>-cs-<n>`` with the
   parameters stored in the attempt, expire under ``order-<order_id>-cs-<n>-expire-<k>``,
   or re-read a session whose state we learned a while ago.
3. **Record** (short transaction): the session (id, URL, status) in the attempt.

Guarantees:

* Attempt ``n + 1`` is only recorded when no attempt of the order is live (the partial
  unique index on ``checkout_attempts`` enforces it): the previous session is confirmed
  ``expired`` by Stripe (our expire's answer, or a read of the session), or Stripe refused
  its create for good, or its outcome is unknown but its ``expires_at`` (which we chose
  and sent) has passed, so nothing it may have created can still be paid.
* Replacing a session (``replace``, or the order's amount changed) expires the old one at
  Stripe first; an expire whose outcome is unknown leaves the old attempt live (503) and
  is sent again before anything else, never followed by a create.
* An unknown create (timeout, 5xx, crash) is resent under the same key while Stripe keeps
  it; never a blind new create.
* A paid order (by any route :func:`domain.payments.service.order_paid` knows) never
  reaches Stripe.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain.errors import Kind
from domain.stripe.gateway import GatewayError, StripeGateway, StripeNotConfigured
from domain.payments.service import (
    CREATING_STALE_SECONDS,
    KEY_WINDOW,
    LOOKUP_SLACK_SECONDS,
    MAX_ROUNDS,
    POLL_SECONDS,
    STATUS_FRESH_SECONDS,
    PayError,
    _aware,
    _definitive,
    _describe,
    locked_order,
    order_paid,
    payable_amount,
)
from config import Settings
from models import Order, run_in_transaction, utcnow
from models.payments import (
    CHECKOUT_COMPLETE,
    CHECKOUT_EXPIRED,
    CHECKOUT_OPEN,
    CHECKOUT_PAID_STATUSES,
    CREATED,
    CREATING,
    FAILED,
    LIVE_CHECKOUT_STATUSES,
    UNKNOWN,
    CheckoutAttempt,
    PaymentAttempt,
    checkout_expire_key,
    checkout_key,
)

log = logging.getLogger(__name__)

_SESSION_STATUSES = {"open": CHECKOUT_OPEN, "complete": CHECKOUT_COMPLETE, "expired": CHECKOUT_EXPIRED}


@dataclass(frozen=True, slots=True)
class CheckoutRequest:
    order_id: str
    replace: bool = False
    success_url: str | None = None
    cancel_url: str | None = None


@dataclass(frozen=True, slots=True)
class CheckoutResult:
    """``created`` when this request opened the session, not when it was already open;
    ``body`` is the JSON answer."""

    created: bool
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Attempt:
    id: int
    order_id: str
    attempt: int
    key: str
    amount: int
    currency: str
    success_url: str
    cancel_url: str
    expires_at: int
    session_id: str | None
    url: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: CheckoutAttempt) -> "_Attempt":
        return cls(
            id=row.id, order_id=row.order_id, attempt=row.attempt, key=row.idempotency_key, amount=row.amount,
            currency=row.currency, success_url=row.success_url, cancel_url=row.cancel_url, expires_at=row.expires_at,
            session_id=row.session_id, url=row.url, created_at=_aware(row.created_at),
        )

    @property
    def metadata(self) -> dict[str, str]:
        return {"order_id": self.order_id, "attempt": str(self.attempt), "order_total": str(self.amount)}


@dataclass(frozen=True, slots=True)
class _Paid:
    pass


@dataclass(frozen=True, slots=True)
class _Wait:
    pass


@dataclass(frozen=True, slots=True)
class _Existing:
    attempt: _Attempt
    stale: bool


@dataclass(frozen=True, slots=True)
class _Call:
    attempt: _Attempt
    resolving: bool


@dataclass(frozen=True, slots=True)
class _Expire:
    attempt: _Attempt
    key: str


@dataclass(frozen=True, slots=True)
class _Again:
    reason: str


class CheckoutService:
    """``checkout`` for one order; thread-safe, holds no state between calls."""

    def __init__(
        self,
        settings: Settings,
        session_factory: Callable[[], Session],
        gateway: StripeGateway,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._session_factory = session_factory
        self._gateway = gateway
        self._sleep = sleep
        self._monotonic = monotonic

    def checkout(self, request: CheckoutRequest) -> CheckoutResult:
        """Create or return the order's one open Checkout Session.

        Raises :class:`PayError`: 404 ``order_not_found``, 422 ``order_amount_unknown`` /
        ``checkout_urls_missing`` / ``stripe_rejected``, 409 ``order_already_paid``, 409
        ``payment_in_progress`` (another request is creating or replacing the session, or
        an async payment of a completed session is pending), 503 ``stripe_unavailable``.
        """
        deadline = self._monotonic() + self._settings.pay_wait_seconds
        rounds = 0
        replace = request.replace
        while True:
            wanted = replace
            try:
                decision = run_in_transaction(self._session_factory, lambda s: self._decide(s, request, wanted))
            except IntegrityError:
                log.warning("checkout: lost a race to the attempt constraints", extra={"order_id": request.order_id})
                rounds += 1
                if rounds > MAX_ROUNDS:
                    raise _in_progress(request.order_id) from None
                continue
            if isinstance(decision, _Paid):
                raise PayError("order_already_paid", f"Order {request.order_id} is already paid.", kind=Kind.CONFLICT)
            if isinstance(decision, _Wait):
                if self._monotonic() >= deadline:
                    raise _in_progress(request.order_id)
                self._sleep(POLL_SECONDS * random.uniform(0.8, 1.2))
                continue
            rounds += 1
            if rounds > MAX_ROUNDS:
                raise _in_progress(request.order_id)
            if isinstance(decision, _Existing):
                outcome = self._existing(decision)
            elif isinstance(decision, _Expire):
                # One replace per request: the session it expires is the one it was sent
                # for; the next round creates attempt n + 1 instead of expiring that too.
                replace = False
                outcome = self._expire(decision)
            else:
                if not decision.resolving:
                    replace = False
                outcome = self._call(decision.attempt, resolving=decision.resolving)
            if isinstance(outcome, CheckoutResult):
                return outcome
            log.info("checkout: deciding again", extra={"order_id": request.order_id, "reason": outcome.reason})

    # -- phase 1 ---------------------------------------------------------------------------

    def _decide(self, session: Session, request: CheckoutRequest, replace: bool) -> _Paid | _Wait | _Existing | _Call | _Expire:
        """What to do for this request, under the order's row lock: at most one live
        attempt per order, so at most one payable session per order."""
        now = utcnow()
        order = locked_order(session, request.order_id)
        if order_paid(session, order):
            return _Paid()
        attempts = list(
            session.scalars(
                select(CheckoutAttempt)
                .where(CheckoutAttempt.order_id == order.id)
                .order_by(CheckoutAttempt.attempt.desc())
                .execution_options(populate_existing=True)
            )
        )
        live = next((a for a in attempts if a.status in LIVE_CHECKOUT_STATUSES), None)
        if live is not None:
            decided = _decide_live(order, live, replace, now)
            if decided is not None:
                return decided
        return self._new_attempt(session, order, attempts, request, now)

    def _new_attempt(
        self, session: Session, order: Order, attempts: list[CheckoutAttempt], request: CheckoutRequest, now: datetime
    ) -> _Call:
        """Attempt n + 1 (status creating, its own key), when the order may be paid."""
        amount, currency = payable_amount(order)
        success_url = request.success_url or self._settings.checkout_success_url
        cancel_url = request.cancel_url or self._settings.checkout_cancel_url or success_url
        if success_url is None or cancel_url is None:
            raise PayError(
                "checkout_urls_missing",
                "No success_url: send one in the body or set CHECKOUT_SUCCESS_URL (and CHECKOUT_CANCEL_URL).", kind=Kind.REFUSED,
            )
        # Never a session beside a payable PaymentIntent of the pay endpoint's.
        if session.scalar(
            select(PaymentAttempt.id)
            .where(PaymentAttempt.order_id == order.id, PaymentAttempt.status.in_((CREATING, UNKNOWN, CREATED)))
            .limit(1)
        ):
            raise PayError(
                "payment_intent_open",
                f"Order {order.id} has a PaymentIntent from the pay endpoint that can still be paid; "
                "pay it, or cancel it first.", kind=Kind.CONFLICT,
            )
        number = attempts[0].attempt + 1 if attempts else 1
        row = CheckoutAttempt(
            order_id=order.id,
            attempt=number,
            idempotency_key=checkout_key(order.id, number),
            status=CREATING,
            amount=amount,
            currency=currency,
            success_url=success_url,
            cancel_url=cancel_url,
            expires_at=int((now + timedelta(minutes=self._settings.checkout_expires_minutes)).timestamp()),
            calls=1,
            expire_count=0,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        session.flush()
        return _Call(_Attempt.of(row), resolving=False)

    # -- phase 2 ---------------------------------------------------------------------------

    def _call(self, attempt: _Attempt, *, resolving: bool) -> CheckoutResult | _Again:
        if utcnow() - attempt.created_at >= KEY_WINDOW:
            # Stripe may have forgotten the key: a resend could create a second session.
            # Wait for the attempt's expires_at instead (then it is given up).
            self._mark(attempt, UNKNOWN, "idempotency key too old to resend; waiting for expires_at")
            raise PayError.stripe_unavailable()
        try:
            created = self._gateway.create_checkout_session(
                amount=attempt.amount,
                currency=attempt.currency,
                product_name=f"Order {attempt.order_id}",
                idempotency_key=attempt.key,
                client_reference_id=attempt.order_id,
                metadata=attempt.metadata,
                success_url=attempt.success_url,
                cancel_url=attempt.cancel_url,
                expires_at=attempt.expires_at,
            )
        except StripeNotConfigured:
            self._mark(attempt, FAILED, "STRIPE_API_KEY is not set")
            raise PayError.stripe_not_configured() from None
        except GatewayError as exc:
            if _definitive(exc):
                # Stripe refused the create (no session exists for the key).
                self._mark(attempt, FAILED, _describe(exc))
                if resolving:
                    return _Again("earlier checkout attempt was refused by Stripe")
                raise PayError("stripe_rejected", str(exc), stripe_code=exc.code, kind=Kind.REFUSED) from None
            self._mark(attempt, UNKNOWN, _describe(exc))
            log.warning("checkout: create outcome unknown (%s)", type(exc).__name__,
                        extra={"order_id": attempt.order_id, "attempt": attempt.attempt})
            if exc.http_status == 409:
                raise _in_progress(attempt.order_id) from None
            raise PayError.stripe_unavailable() from None
        return self._record(attempt, created, created=True)

    def _existing(self, decision: _Existing) -> CheckoutResult | _Again:
        attempt = decision.attempt
        if not decision.stale:
            return _answer(attempt, created=False)
        try:
            current = self._gateway.retrieve_checkout_session(attempt.session_id or "")
        except GatewayError as exc:
            log.warning("checkout: could not re-read the session (%s); answering from our record", type(exc).__name__,
                        extra={"order_id": attempt.order_id, "session_id": attempt.session_id})
            return _answer(attempt, created=False)
        return self._record(attempt, current, created=False)

    def _expire(self, decision: _Expire) -> CheckoutResult | _Again:
        attempt = decision.attempt
        extra = {"order_id": attempt.order_id, "attempt": attempt.attempt, "session_id": attempt.session_id}
        try:
            expired = self._gateway.expire_checkout_session(attempt.session_id or "", idempotency_key=decision.key)
        except GatewayError as exc:
            if isinstance(exc, StripeNotConfigured) or not _definitive(exc):
                # Outcome unknown: the old session may still be open. Nothing new is
                # created; the next request sends the expire again first.
                self._release_expire(attempt, decision.key)
                log.warning("checkout: expire outcome unknown (%s)", type(exc).__name__, extra=extra)
                raise PayError.stripe_unavailable() from None
            # Refused: the session is not open any more (completed or expired meanwhile).
            log.warning("checkout: Stripe refused the expire (%s); re-reading the session", exc, extra=extra)
            try:
                expired = self._gateway.retrieve_checkout_session(attempt.session_id or "")
            except GatewayError:
                self._release_expire(attempt, decision.key)
                raise PayError.stripe_unavailable() from None
        outcome = self._record(attempt, expired, created=False, expire_key=decision.key)
        if isinstance(outcome, CheckoutResult):
            # Still open after a refused expire (should not happen): never hand out a
            # session we meant to replace, never create beside it.
            log.error("checkout: session still open after an expire", extra=extra)
            raise PayError.stripe_unavailable()
        return outcome

    # -- phase 3 ---------------------------------------------------------------------------

    def _record(
        self, attempt: _Attempt, stripe_session: dict[str, Any], *, created: bool, expire_key: str | None = None
    ) -> CheckoutResult | _Again:
        status = _SESSION_STATUSES.get(str(stripe_session.get("status")), CHECKOUT_OPEN)
        payment_status = stripe_session.get("payment_status")

        def work(session: Session) -> tuple[str, _Attempt]:
            session.execute(
                select(Order).where(Order.id == attempt.order_id).with_for_update().execution_options(populate_existing=True)
            ).scalar_one()
            row = session.execute(
                select(CheckoutAttempt).where(CheckoutAttempt.id == attempt.id).with_for_update()
                .execution_options(populate_existing=True)
            ).scalar_one()
            if row.session_id is None and row.status in (FAILED, CHECKOUT_EXPIRED):
                # Given up while this call ran (only once its expires_at had passed, so
                # the session cannot be paid): kept on record, never handed out.
                row.session_id = stripe_session["id"]
                row.error = f"orphaned Checkout Session {stripe_session['id']}: the attempt had been given up"
                log.error("checkout: session arrived for a given-up attempt", extra={"order_id": row.order_id})
                return row.status, _Attempt.of(row)
            row.session_id = stripe_session["id"]
            row.url = stripe_session.get("url") or row.url
            row.payment_status = payment_status
            row.error = None
            if expire_key is not None and row.expire_key == expire_key:
                row.expire_key = None
                row.expire_claimed_at = None
            if row.status in (CREATING, UNKNOWN, CHECKOUT_OPEN):
                row.status = status
            row.updated_at = utcnow()
            return row.status, _Attempt.of(row)

        row_status, recorded = run_in_transaction(self._session_factory, work)
        log.info("checkout: session recorded", extra={"order_id": attempt.order_id, "attempt": attempt.attempt,
                                                     "session_id": stripe_session.get("id"), "status": row_status})
        if row_status == CHECKOUT_COMPLETE:
            if payment_status in CHECKOUT_PAID_STATUSES:
                raise PayError("order_already_paid", f"Order {attempt.order_id} is already paid.", kind=Kind.CONFLICT)
            raise PayError("payment_in_progress",
                           f"The Checkout Session of order {attempt.order_id} is complete and its payment is pending.",
                           retry_after=5, kind=Kind.CONFLICT)
        if row_status != CHECKOUT_OPEN:
            return _Again(f"session {stripe_session.get('id')} is {row_status}")
        return _answer(recorded, created=created)

    def _release_expire(self, attempt: _Attempt, key: str) -> None:
        def work(session: Session) -> None:
            row = session.execute(
                select(CheckoutAttempt).where(CheckoutAttempt.id == attempt.id).with_for_update()
                .execution_options(populate_existing=True)
            ).scalar_one()
            if row.expire_key == key:
                row.expire_claimed_at = None

        run_in_transaction(self._session_factory, work)

    def _mark(self, attempt: _Attempt, status: str, error: str) -> None:
        def work(session: Session) -> None:
            row = session.execute(
                select(CheckoutAttempt).where(CheckoutAttempt.id == attempt.id).with_for_update()
                .execution_options(populate_existing=True)
            ).scalar_one()
            if row.status in (CREATING, UNKNOWN):
                row.status = status
                row.error = error[:2000]

        run_in_transaction(self._session_factory, work)


def _decide_live(
    order: Order, live: CheckoutAttempt, replace: bool, now: datetime
) -> _Wait | _Existing | _Call | _Expire | None:
    """What the order's live attempt asks for; None when it turned out to be over (expired
    at Stripe, or given up), which frees the order's slot for attempt n + 1."""
    if live.expire_key is not None:
        # An expire is in flight, or its outcome is unknown: it goes first, before
        # anything else. Under a new key: expiring is idempotent in effect (an expired
        # session is refused and then read), and a 5xx Stripe stored for the old key
        # would otherwise be replayed for 24 h.
        claimed = live.expire_claimed_at
        if claimed is not None and (now - _aware(claimed)).total_seconds() < CREATING_STALE_SECONDS:
            return _Wait()
        return _expire(live, now)
    if live.status == CHECKOUT_COMPLETE:
        raise PayError(
            "payment_in_progress",
            f"The Checkout Session of order {order.id} is complete and its payment is pending.", retry_after=5, kind=Kind.CONFLICT,
        )
    if live.status == CHECKOUT_OPEN:
        if live.expires_at <= int(now.timestamp()):
            live.status = CHECKOUT_EXPIRED  # Stripe has expired it by itself by now
            return None
        if replace or (order.amount, order.currency) != (live.amount, live.currency):
            log.info("checkout: expiring the open session to replace it",
                     extra={"order_id": order.id, "attempt": live.attempt, "session_id": live.session_id})
            return _expire(live, now)
        stale = (now - _aware(live.updated_at)).total_seconds() > STATUS_FRESH_SECONDS
        return _Existing(_Attempt.of(live), stale)
    # creating or unknown
    claimed_at = _aware(live.updated_at)
    if live.status == CREATING and (now - claimed_at).total_seconds() < CREATING_STALE_SECONDS:
        return _Wait()
    if live.expires_at + LOOKUP_SLACK_SECONDS <= int(now.timestamp()):
        # Any session this attempt created has expired at Stripe (we chose its
        # expires_at): it cannot be paid, so the order is free for n + 1.
        live.status = FAILED
        live.error = (live.error or "") + " | given up after its expires_at passed"
        return None
    log.warning("checkout: resolving an attempt whose outcome is unknown",
                extra={"order_id": order.id, "attempt": live.attempt, "status": live.status})
    live.status = CREATING
    live.calls += 1
    live.updated_at = now
    return _Call(_Attempt.of(live), resolving=True)


def _expire(live: CheckoutAttempt, now: datetime) -> _Expire:
    """Claim an expire of the live session under a new key of its own."""
    live.expire_count += 1
    live.expire_key = checkout_expire_key(live.order_id, live.attempt, live.expire_count)
    live.expire_claimed_at = now
    return _Expire(_Attempt.of(live), live.expire_key)


def _answer(attempt: _Attempt, *, created: bool) -> CheckoutResult:
    return CheckoutResult(
        created,
        {
            "id": attempt.session_id,
            "url": attempt.url,
            "status": "open",
            "amount": attempt.amount,
            "currency": attempt.currency,
            "order_id": attempt.order_id,
            "attempt": attempt.attempt,
            "expires_at": attempt.expires_at,
            "created": created,
        },
    )


def _in_progress(order_id: str) -> PayError:
    return PayError(
        "payment_in_progress",
        f"Another request is creating or replacing the Checkout Session of order {order_id}; retry shortly.",
        retry_after=1, kind=Kind.CONFLICT,
    )
