"""The pay endpoint's logic: at most one payable PaymentIntent per order, whatever the
number of concurrent requests, processes or hosts, and whatever Stripe or we do wrong.

Defence in depth, as rocket-rides-atomic does it, one transaction per phase:

1. **Decide** (short transaction, the order row locked: ``SELECT ... FOR UPDATE`` under
   the engine's ``lock_timeout`` on PostgreSQL; ``BEGIN IMMEDIATE`` already serialises
   writers on SQLite). Paid, an existing payable PaymentIntent, an attempt in flight, an
   attempt to resolve, or a new attempt ``n`` recorded as ``creating`` and committed
   before Stripe is called.
2. **Call Stripe** with no lock and no transaction held, under the idempotency key
   ``order-<order_id>-pi-<n>`` derived from the attempt row and with the parameters
   stored in it, so every retry of the attempt is the same request to Stripe.
3. **Record** (short transaction): the PaymentIntent in the attempt, in the ledger's
   ``payment_intents`` and as the order's current PaymentIntent.

Guarantees:

* A new attempt (``n + 1``) is only recorded when no attempt of the order is live: the
  previous PaymentIntent is confirmed canceled (by a webhook in our ledger, or by
  retrieving it), or Stripe definitively refused to create it. The partial unique index
  on ``payment_attempts`` enforces it even if this code were wrong.
* An attempt whose outcome is unknown (timeout, connection error, Stripe 5xx, a crash
  that left it ``creating``) is resolved before anything new: the same key again while
  Stripe still keeps it (23 h of its 24 h, to be safe), or else a look-up of the
  PaymentIntents created since the attempt with its ``order_id`` and ``attempt``
  metadata. Never a blind new create.
* A paid order (by its charges, or a succeeded PaymentIntent) never reaches Stripe.

Decisions worth knowing:

* A definitive refusal of the create (a 4xx other than 409/429; Stripe stores it for the
  key and would replay it) fails the attempt, since no PaymentIntent exists for its key;
  the next request starts attempt ``n + 1`` with a new key, so a corrected request (say,
  another payment method) is not stuck behind the replayed error. If the error carries a
  PaymentIntent (a decline while confirming creates one), that PaymentIntent is kept.
* An attempt resolved by the look-up is only given up (``failed``, then ``n + 1``) when
  nothing is found at Stripe *and* its last Stripe call is long finished
  (:data:`ABANDON_AFTER_SECONDS`) *and* its key can no longer create anything (expired,
  or Stripe answered it with a stored error). Otherwise it stays ``unknown`` and the
  request gets a 503.
* The parameters of a resolved attempt are the ones it was first sent with; the body of
  the request that resolves it does not change them.

An order's amount may change (``POST /api/orders``) after its PaymentIntent was created.
The live PaymentIntent is then changed before it is handed out, in the same phases, one
change per attempt at a time (``change_key`` on the attempt, like ``creating``):

* same currency and a status Stripe allows an amount update in
  (:data:`AMOUNT_UPDATABLE`): the amount is updated at Stripe under the key
  ``order-<order_id>-pi-<n>-amount-<amount>-<k>`` and recorded in the attempt and the
  ledger;
* otherwise (another currency, ``requires_capture``) it is canceled under
  ``order-<order_id>-pi-<n>-cancel-<k>`` (reason ``abandoned``), the attempt recorded
  ``canceled``, and attempt ``n + 1`` is created at the new amount;
* ``processing``: nothing can change; 409 ``payment_in_progress``.

A change whose outcome is unknown (timeout, 5xx) stays on the attempt and is sent again,
with the same key, before anything else happens to the order; a change Stripe refuses
(the PaymentIntent moved on meanwhile) is followed by a re-read of the PaymentIntent.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain.stripe.gateway import (
    GatewayError,
    StripeGateway,
    StripeNotConfigured,
    StripeNotFound,
    StripeRateLimited,
    StripeRejected,
    StripeUnavailable,
)
from domain.errors import DomainError, Kind
from domain.ledger import apply_payment_intent
from domain.payments.sealing import Sealer
from domain.stripe.shapes import payment_intent_snapshot
from config import Settings
from models import Order, PaymentIntent, run_in_transaction, utcnow
from models.money import format_money
from models.db import lock_key
from models.payments import (
    CANCELED,
    CHECKOUT_COMPLETE,
    CHECKOUT_PAID_STATUSES,
    CheckoutAttempt,
    CREATED,
    CREATING,
    FAILED,
    LIVE_ATTEMPT_STATUSES,
    LIVE_CHECKOUT_STATUSES,
    SUCCEEDED,
    UNKNOWN,
    PaymentAttempt,
    amount_update_key,
    attempt_key,
    attempt_status_for,
    cancel_key,
)

log = logging.getLogger(__name__)

#: Order statuses that mean "a payment succeeded": no new PaymentIntent for them (a
#: refunded or disputed order is settled by refunds and disputes, not a second payment).
PAID_ORDER_STATUSES = frozenset({"paid", "partially_refunded", "refunded", "disputed"})
#: A ``creating`` attempt whose Stripe call was claimed longer ago than this is presumed
#: abandoned (its process crashed or was killed) and is resolved by the next request. Safe
#: even if it is still running: the resolution sends the same idempotency key.
CREATING_STALE_SECONDS = 10.0
#: Longer than any Stripe call of ours can take (SDK timeouts x retries); gunicorn kills
#: a worker after 30 s anyway. Only beyond this may an attempt that Stripe shows no
#: PaymentIntent for be given up.
ABANDON_AFTER_SECONDS = 150.0
#: How long Stripe is trusted to keep an idempotency key (it keeps them at least 24 h).
KEY_WINDOW = timedelta(hours=23)
#: Clock slack between our hosts and Stripe for the look-up's ``created`` filter.
LOOKUP_SLACK_SECONDS = 300
#: An existing PaymentIntent whose state we learned longer ago than this is re-read from
#: Stripe before it is handed out (a cancel whose webhook is late or lost).
STATUS_FRESH_SECONDS = 5.0
POLL_SECONDS = 0.05
#: Decide/act rounds per request other than waiting (canceled -> new attempt, a failed
#: resolution -> new attempt); more means something keeps changing under us.
MAX_ROUNDS = 4
#: PaymentIntent statuses in which Stripe accepts a new amount.
AMOUNT_UPDATABLE = frozenset({"requires_payment_method", "requires_confirmation", "requires_action"})
#: The cancellation_reason of a PaymentIntent replaced because the order's total changed.
CANCELLATION_REASON = "abandoned"


class PayError(DomainError):
    """The pay or checkout request ends with an error answer: ``code``, ``message``, its
    ``kind``, and ``details`` (``retry_after`` seconds when retrying later is the remedy,
    ``stripe_code`` when Stripe refused)."""

    @classmethod
    def stripe_unavailable(cls) -> PayError:
        return cls("stripe_unavailable", "Stripe did not answer; retry shortly (retrying is safe).",
                   retry_after=1, kind=Kind.UNAVAILABLE)

    @classmethod
    def stripe_not_configured(cls) -> PayError:
        return cls("stripe_not_configured", "Payments are not configured on this server.", kind=Kind.UNAVAILABLE)


@dataclass(frozen=True, slots=True)
class PayRequest:
    order_id: str
    customer: str | None = None
    payment_method: str | None = None


@dataclass(frozen=True, slots=True)
class PayResult:
    """``created`` when this request recorded the PaymentIntent, not when it was already
    known; ``body`` is the JSON answer."""

    created: bool
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Attempt:
    """An attempt as read in phase 1 (plain values, usable after the commit)."""

    id: int
    order_id: str
    attempt: int
    key: str
    amount: int
    currency: str
    customer: str | None
    payment_method: str | None
    payment_intent_id: str | None
    # Sealed as stored (domain/payments/sealing.py); ``client_secret`` is only ever the
    # clear value in memory, once opened or read from Stripe.
    sealed_client_secret: str | None
    created_at: datetime
    # When the previous Stripe call of this attempt was claimed (None: never called).
    previous_call_at: datetime | None

    @classmethod
    def of(cls, row: PaymentAttempt, previous_call_at: datetime | None) -> "_Attempt":
        return cls(
            id=row.id,
            order_id=row.order_id,
            attempt=row.attempt,
            key=row.idempotency_key,
            amount=row.amount,
            currency=row.currency,
            customer=row.customer,
            payment_method=row.payment_method,
            payment_intent_id=row.payment_intent_id,
            sealed_client_secret=row.client_secret_sealed,
            created_at=_aware(row.created_at),
            previous_call_at=previous_call_at,
        )

    client_secret: str | None = None

    @property
    def metadata(self) -> dict[str, str]:
        # order_total lets detection know the order's total from Stripe alone.
        return {"order_id": self.order_id, "attempt": str(self.attempt), "order_total": str(self.amount)}


# Phase 1 decisions.
@dataclass(frozen=True, slots=True)
class _Paid:
    pass


@dataclass(frozen=True, slots=True)
class _Wait:
    pass


@dataclass(frozen=True, slots=True)
class _Existing:
    attempt: _Attempt
    status: str
    stale: bool


@dataclass(frozen=True, slots=True)
class _Call:
    attempt: _Attempt
    resolving: bool


@dataclass(frozen=True, slots=True)
class _Change:
    """Phase 2 changes the attempt's PaymentIntent: ``amount`` set, or canceled (None)."""

    attempt: _Attempt
    key: str
    amount: int | None


@dataclass(slots=True)
class _Again:
    """Go back to phase 1 (the attempt ended: canceled, failed or orphaned)."""

    reason: str = field(default="")


class PaymentService:
    """``pay`` for one order; thread-safe, holds no state between calls."""

    def __init__(
        self,
        settings: Settings,
        session_factory: Callable[[], Session],
        gateway: StripeGateway,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        sealer: Sealer | None = None,
    ) -> None:
        # Without a sealer no client_secret is stored at all: each answer reads it from Stripe.
        self._sealer = sealer
        self._settings = settings
        self._session_factory = session_factory
        self._gateway = gateway
        self._sleep = sleep
        self._monotonic = monotonic

    def pay(self, request: PayRequest) -> PayResult:
        """Create or return the order's one payable PaymentIntent.

        Raises :class:`PayError`: 404 ``order_not_found``, 422 ``order_amount_unknown``,
        409 ``order_already_paid``, 409 ``payment_in_progress`` (another request is
        creating it; retry shortly), 402/422 when Stripe refuses the PaymentIntent, 503
        ``stripe_unavailable`` (outcome unknown; retrying is safe).
        """
        deadline = self._monotonic() + self._settings.pay_wait_seconds
        rounds = 0
        while True:
            try:
                decision = run_in_transaction(self._session_factory, lambda s: self._decide(s, request))
            except IntegrityError:
                # The unique constraints caught a race the lock should have prevented
                # (another attempt became live meanwhile): decide again, it will be seen.
                log.warning("pay: lost a race to the attempt constraints", extra={"order_id": request.order_id})
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
            elif isinstance(decision, _Change):
                outcome = self._change(decision)
            else:
                outcome = self._call(decision.attempt, resolving=decision.resolving)
            if isinstance(outcome, PayResult):
                return outcome
            log.info("pay: deciding again", extra={"order_id": request.order_id, "reason": outcome.reason})

    # -- phase 1 ---------------------------------------------------------------------------

    def _decide(self, session: Session, request: PayRequest) -> _Paid | _Wait | _Existing | _Change | _Call:
        """What to do for this request, under the order's row lock: at most one live
        attempt per order, so at most one PaymentIntent per order."""
        now = utcnow()
        order = locked_order(session, request.order_id)
        attempts = list(
            session.scalars(
                select(PaymentAttempt)
                .where(PaymentAttempt.order_id == order.id)
                .order_by(PaymentAttempt.attempt.desc())
                .execution_options(populate_existing=True)
            )
        )
        live = next((a for a in attempts if a.status in LIVE_ATTEMPT_STATUSES), None)
        if (live is not None and live.status == SUCCEEDED) or order_paid(session, order):
            return _Paid()

        if live is not None and live.status == CREATED:
            decided = _decide_created(session, order, live, now)
            if decided is not None:
                return decided
            live = None  # canceled: the order's slot is free for attempt n + 1 below
        if live is not None:  # creating or unknown
            return _decide_unresolved(order, live, now)
        return self._new_attempt(session, order, attempts, request, now)

    def _new_attempt(
        self, session: Session, order: Order, attempts: list[PaymentAttempt], request: PayRequest, now: datetime
    ) -> _Call:
        """Attempt n + 1 (status creating, its own key), when the order may be paid."""
        amount, currency = payable_amount(order)
        # Never a PaymentIntent beside a Checkout Session of ours that could still be paid
        # (read under the same order lock the checkout endpoint takes).
        if session.scalar(
            select(CheckoutAttempt.id)
            .where(CheckoutAttempt.order_id == order.id, CheckoutAttempt.status.in_(LIVE_CHECKOUT_STATUSES))
            .limit(1)
        ):
            raise PayError(
                "checkout_session_open",
                f"Order {order.id} has a Checkout Session that can still be paid; pay there, or let it expire.", kind=Kind.CONFLICT,
            )
        number = attempts[0].attempt + 1 if attempts else 1
        row = PaymentAttempt(
            order_id=order.id,
            attempt=number,
            idempotency_key=attempt_key(order.id, number),
            status=CREATING,
            amount=amount,
            currency=currency,
            customer=request.customer,
            payment_method=request.payment_method,
            calls=1,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        session.flush()
        return _Call(_Attempt.of(row, None), resolving=False)

    # -- phase 2 ---------------------------------------------------------------------------

    def _existing(self, decision: _Existing) -> PayResult | _Again:
        attempt = replace(decision.attempt, client_secret=self._open(decision.attempt.sealed_client_secret))
        if not decision.stale and attempt.client_secret is not None:
            return _answer(attempt, decision.status, created=False)
        # Stale, or its client_secret cannot be opened (SECRET_KEY changed, or the row
        # predates sealing): read the PaymentIntent again; Stripe always has the secret.
        try:
            intent = self._gateway.retrieve_payment_intent(attempt.payment_intent_id or "")
        except GatewayError as exc:
            if attempt.client_secret is None:
                raise _transient(exc, attempt) from None
            # Our ledger's view is still a safe answer: the intent was payable when we
            # last heard, and a canceled one cannot be paid by mistake.
            log.warning("pay: could not re-read the PaymentIntent (%s); answering from the ledger", type(exc).__name__,
                        extra={"order_id": attempt.order_id, "payment_intent_id": attempt.payment_intent_id})
            return _answer(attempt, decision.status, created=False)
        return self._record(attempt, intent, created=False)

    def _seal(self, value: str | None) -> str | None:
        return self._sealer.seal(value) if self._sealer is not None and value else None

    def _open(self, sealed: str | None) -> str | None:
        return self._sealer.open(sealed) if self._sealer is not None else None

    def _call(self, attempt: _Attempt, *, resolving: bool) -> PayResult | _Again:
        key_alive = utcnow() - attempt.created_at < KEY_WINDOW
        replayed_error = False
        last_error: GatewayError | None = None
        if key_alive:
            try:
                intent = self._gateway.create_payment_intent(
                    attempt.amount,
                    attempt.currency,
                    idempotency_key=attempt.key,
                    metadata=attempt.metadata,
                    customer=attempt.customer,
                    payment_method=attempt.payment_method,
                )
                return self._record(attempt, intent, created=True)
            except StripeNotConfigured:
                self._mark(attempt, FAILED, "STRIPE_API_KEY is not set")
                raise PayError.stripe_not_configured() from None
            except GatewayError as exc:
                carried = getattr(exc, "payment_intent", None)
                if carried:
                    return self._record(attempt, carried, created=True)
                if _definitive(exc):
                    return self._refused(attempt, exc, resolving=resolving)
                if not resolving:
                    self._mark(attempt, UNKNOWN, _describe(exc))
                    raise _transient(exc, attempt) from None
                # A 5xx is an answer: Stripe stored it for the key (and replays it), so
                # the key will create nothing now. A timeout or connection error is not:
                # our call may still be running at Stripe.
                replayed_error = isinstance(exc, StripeUnavailable) and (exc.http_status or 0) >= 500
                last_error = exc
        return self._look_up(attempt, key_alive=key_alive, replayed_error=replayed_error, last_error=last_error)

    def _look_up(self, attempt: _Attempt, *, key_alive: bool, replayed_error: bool, last_error: GatewayError | None) -> PayResult | _Again:
        """Find the attempt's PaymentIntent at Stripe by its metadata (the key cannot say)."""
        since = int(attempt.created_at.timestamp()) - LOOKUP_SLACK_SECONDS
        try:
            found = [
                intent
                for intent in self._gateway.list_payment_intents(created_gte=since, customer=attempt.customer)
                if (intent.get("metadata") or {}).get("order_id") == attempt.order_id
                and (intent.get("metadata") or {}).get("attempt") == str(attempt.attempt)
            ]
        except GatewayError as exc:
            self._mark(attempt, UNKNOWN, f"look-up failed: {_describe(exc)}")
            raise _transient(exc, attempt) from None
        if found:
            found.sort(key=lambda intent: (intent.get("created", 0), intent["id"]))
            if len(found) > 1:
                log.error(
                    "pay: several PaymentIntents carry one attempt's metadata; keeping the first",
                    extra={"order_id": attempt.order_id, "attempt": attempt.attempt, "payment_intent_ids": [i["id"] for i in found]},
                )
            log.info("pay: attempt resolved by the look-up", extra={"order_id": attempt.order_id, "attempt": attempt.attempt})
            return self._record(attempt, found[0], created=True)
        quiet = attempt.previous_call_at is None or (
            utcnow() - attempt.previous_call_at
        ).total_seconds() >= ABANDON_AFTER_SECONDS
        if quiet and (not key_alive or replayed_error):
            self._mark(attempt, FAILED, "no PaymentIntent at Stripe for this attempt; given up for a new one")
            log.warning("pay: attempt given up after the look-up found nothing",
                        extra={"order_id": attempt.order_id, "attempt": attempt.attempt})
            return _Again("unknown attempt given up")
        self._mark(attempt, UNKNOWN, _describe(last_error) if last_error else "not found at Stripe yet")
        raise PayError(
            "stripe_unavailable",
            "The outcome of an earlier payment attempt is not known yet; retry shortly.",
            retry_after=2, kind=Kind.UNAVAILABLE,
        )

    def _refused(self, attempt: _Attempt, exc: GatewayError, *, resolving: bool) -> PayResult | _Again:
        self._mark(attempt, FAILED, _describe(exc))
        log.warning("pay: Stripe refused the PaymentIntent", extra={"order_id": attempt.order_id, "attempt": attempt.attempt, "stripe_code": exc.code})
        if resolving:
            # The request that made this attempt has been answered long ago; this one
            # goes on with a fresh attempt and its own parameters.
            return _Again("earlier attempt was refused by Stripe")
        if exc.http_status == 402:
            raise PayError("payment_method_declined", str(exc), stripe_code=exc.code, kind=Kind.DECLINED) from None
        raise PayError("stripe_rejected", str(exc), stripe_code=exc.code, kind=Kind.REFUSED) from None

    def _change(self, decision: _Change) -> PayResult | _Again:
        """Update the amount of, or cancel, the attempt's PaymentIntent (no lock held)."""
        attempt = decision.attempt
        intent_id = attempt.payment_intent_id or ""
        extra = {"order_id": attempt.order_id, "attempt": attempt.attempt, "payment_intent_id": intent_id,
                 "change_key": decision.key}
        try:
            if decision.amount is None:
                intent = self._gateway.cancel_payment_intent(
                    intent_id, idempotency_key=decision.key, cancellation_reason=CANCELLATION_REASON
                )
            else:
                intent = self._gateway.update_payment_intent_amount(
                    intent_id, decision.amount, idempotency_key=decision.key
                )
        except StripeNotConfigured:
            self._release_change(attempt, decision.key)
            raise PayError.stripe_not_configured() from None
        except GatewayError as exc:
            if not _definitive(exc):
                # Outcome unknown: the change stays on the attempt and the next request
                # sends it again under the same key before anything else.
                self._release_change(attempt, decision.key)
                log.warning("pay: PaymentIntent change outcome unknown (%s)", type(exc).__name__, extra=extra)
                raise _transient(exc, attempt) from None
            # Refused: the PaymentIntent moved on (processing, succeeded, canceled) since
            # we last heard. Learn where it is and decide again.
            log.warning("pay: Stripe refused the PaymentIntent change (%s); re-reading it", exc.code, extra=extra)
            try:
                intent = self._gateway.retrieve_payment_intent(intent_id)
            except GatewayError as read_exc:
                self._release_change(attempt, decision.key)
                raise _transient(read_exc, attempt) from None
            return self._record_change(decision, intent, applied=False)
        log.info("pay: PaymentIntent %s", "canceled" if decision.amount is None else "amount updated", extra=extra)
        return self._record_change(decision, intent, applied=True)

    # -- phase 3 ---------------------------------------------------------------------------

    def _record_change(self, decision: _Change, intent: dict[str, Any], *, applied: bool) -> _Again:
        """Record the PaymentIntent as Stripe returned it after the change (``applied``) or
        after refusing it; the caller decides again (hands out the updated PaymentIntent,
        creates attempt ``n + 1`` after a cancel, or answers 409)."""
        snapshot = payment_intent_snapshot(intent)
        attempt = decision.attempt

        def work(session: Session) -> None:
            lock_key(session, "payment_intent", snapshot.id)
            session.execute(
                select(Order).where(Order.id == attempt.order_id).with_for_update().execution_options(populate_existing=True)
            ).scalar_one()
            row = session.execute(
                select(PaymentAttempt).where(PaymentAttempt.id == attempt.id).with_for_update()
                .execution_options(populate_existing=True)
            ).scalar_one()
            if row.change_key != decision.key:
                return  # recorded by another request that took the change over
            known = session.get(PaymentIntent, snapshot.id)
            as_of = max(snapshot.created, known.last_event_created if known is not None else 0)
            ledger_intent = apply_payment_intent(session, snapshot, as_of=as_of, account=None)
            if applied and decision.amount is not None and snapshot.amount == decision.amount:
                # Stripe sends no event for an amount update: this answer is the news.
                row.amount = snapshot.amount
                if ledger_intent.status not in ("canceled", "succeeded"):
                    ledger_intent.amount = snapshot.amount
            row.change_count += 1
            _clear_change(row)
            if row.status in (CREATED, UNKNOWN, CREATING):
                row.status = attempt_status_for(ledger_intent.status)
            if applied and decision.amount is None and snapshot.status == "canceled":
                row.status = CANCELED

        run_in_transaction(self._session_factory, work)
        return _Again(f"PaymentIntent {snapshot.id} changed ({'applied' if applied else 'refused'})")

    def _release_change(self, attempt: _Attempt, key: str) -> None:
        """The change's call is over without a known outcome: not in flight any more, but
        still to be sent again (same key) by the next request."""

        def work(session: Session) -> None:
            row = session.execute(
                select(PaymentAttempt).where(PaymentAttempt.id == attempt.id).with_for_update()
                .execution_options(populate_existing=True)
            ).scalar_one()
            if row.change_key == key:
                row.change_claimed_at = None

        run_in_transaction(self._session_factory, work)

    def _record(self, attempt: _Attempt, intent: dict[str, Any], *, created: bool) -> PayResult | _Again:
        snapshot = payment_intent_snapshot(intent)

        def work(session: Session) -> tuple[str, str]:
            # Lock order as the ledger's: the PaymentIntent key, the order, then its rows.
            lock_key(session, "payment_intent", snapshot.id)
            order = session.execute(
                select(Order).where(Order.id == attempt.order_id).with_for_update().execution_options(populate_existing=True)
            ).scalar_one()
            row = session.execute(
                select(PaymentAttempt)
                .where(PaymentAttempt.id == attempt.id)
                .with_for_update()
                .execution_options(populate_existing=True)
            ).scalar_one()
            if row.status in (FAILED, CANCELED) and row.payment_intent_id is None:
                # Given up while this call was running (it outlived ABANDON_AFTER_SECONDS):
                # keep the PaymentIntent on record for reconciliation, never as payable.
                row.payment_intent_id = snapshot.id
                row.error = f"orphaned PaymentIntent {snapshot.id}: the attempt had been given up"
                log.error("pay: PaymentIntent arrived for a given-up attempt",
                          extra={"order_id": order.id, "payment_intent_id": snapshot.id})
                session.flush()
                apply_payment_intent(session, snapshot, as_of=snapshot.created, account=None)
                return "orphaned", row.status
            row.payment_intent_id = snapshot.id
            row.client_secret_sealed = self._seal(intent.get("client_secret")) or row.client_secret_sealed
            row.error = None
            session.flush()
            known = session.get(PaymentIntent, snapshot.id)
            # Read after everything the ledger applied: at least as new as its newest
            # event (on a tie the status only moves forward), and Stripe's own clock.
            as_of = max(snapshot.created, known.last_event_created if known is not None else 0)
            applied = apply_payment_intent(session, snapshot, as_of=as_of, account=None)
            # The ledger's merged status, not the snapshot's: a webhook may have told us
            # more (canceled, succeeded) while this call was under way.
            if row.status in (CREATING, UNKNOWN, CREATED):
                row.status = attempt_status_for(applied.status)
            order.payment_intent_id = snapshot.id
            return applied.status, row.status

        intent_status, attempt_status = run_in_transaction(self._session_factory, work)
        recorded = replace(
            attempt,
            payment_intent_id=snapshot.id,
            client_secret=intent.get("client_secret") or attempt.client_secret or self._open(attempt.sealed_client_secret),
        )
        log.info("pay: PaymentIntent recorded", extra={"order_id": attempt.order_id, "attempt": attempt.attempt,
                                                      "payment_intent_id": snapshot.id, "status": intent_status})
        if attempt_status == SUCCEEDED:
            raise PayError("order_already_paid", f"Order {attempt.order_id} is already paid.", kind=Kind.CONFLICT)
        if attempt_status != CREATED:  # canceled, or given up: decide again
            return _Again(f"PaymentIntent {snapshot.id} is {intent_status}; attempt {attempt_status}")
        return _answer(recorded, intent_status, created=created)

    def _mark(self, attempt: _Attempt, status: str, error: str) -> None:
        """Move a ``creating`` attempt to ``unknown`` or ``failed`` after its Stripe call."""

        def work(session: Session) -> None:
            row = session.execute(
                select(PaymentAttempt).where(PaymentAttempt.id == attempt.id).with_for_update()
                .execution_options(populate_existing=True)
            ).scalar_one()
            if row.status in (CREATING, UNKNOWN):
                row.status = status
                row.error = error[:2000]

        run_in_transaction(self._session_factory, work)


def order_paid(session: Session, order: Order) -> bool:
    """Whether the order is paid, by any route we know of: its status (from its charges),
    a succeeded PaymentIntent naming it (the ledger knows every one, ours or not), a pay
    attempt that succeeded, or a Checkout Session of ours that completed paid. Read under
    the order's row lock by the pay and checkout endpoints alike."""
    if order.status in PAID_ORDER_STATUSES:
        return True
    if session.scalar(
        select(PaymentIntent.id)
        .where(PaymentIntent.order_id == order.id, PaymentIntent.status == "succeeded")
        .limit(1)
    ):
        return True
    if session.scalar(
        select(PaymentAttempt.id).where(PaymentAttempt.order_id == order.id, PaymentAttempt.status == SUCCEEDED).limit(1)
    ):
        return True
    return bool(
        session.scalar(
            select(CheckoutAttempt.id)
            .where(
                CheckoutAttempt.order_id == order.id,
                CheckoutAttempt.status == CHECKOUT_COMPLETE,
                CheckoutAttempt.payment_status.in_(CHECKOUT_PAID_STATUSES),
            )
            .limit(1)
        )
    )


def locked_order(session: Session, order_id: str) -> Order:
    """The order, its row locked for this transaction (the lock that serialises every
    decision about paying it); :class:`PayError` ``order_not_found`` when unknown."""
    # populate_existing: always read under the lock, never the identity map's copy.
    order = session.get(Order, order_id, with_for_update=True, populate_existing=True)
    if order is None:
        raise PayError("order_not_found", f"No order {order_id}.", kind=Kind.NOT_FOUND)
    return order


def payable_amount(order: Order) -> tuple[int, str]:
    """The order's total and currency; :class:`PayError` ``order_amount_unknown`` when it
    has none yet (nothing is ever asked of Stripe for an unknown amount)."""
    if order.amount is None or order.currency is None:
        raise PayError(
            "order_amount_unknown", f"Order {order.id} has no amount yet; set it with POST /api/orders.", kind=Kind.REFUSED
        )
    return order.amount, order.currency


def _decide_created(
    session: Session, order: Order, live: PaymentAttempt, now: datetime
) -> _Paid | _Existing | _Change | _Wait | None:
    """The live attempt has its PaymentIntent: paid, to be changed (amount or cancel), or
    the one to answer with; None when it was canceled (the order's slot is free)."""
    intent = session.get(PaymentIntent, live.payment_intent_id) if live.payment_intent_id else None
    status = intent.status if intent is not None else "requires_payment_method"
    attempt_status = attempt_status_for(status)
    if attempt_status == SUCCEEDED:
        live.status = SUCCEEDED
        return _Paid()
    if attempt_status == CANCELED:
        live.status = CANCELED
        _clear_change(live)
        return None
    change = _decide_change(order, live, status, now)
    if change is not None:
        return change
    known_at = _aware(live.updated_at)
    if intent is not None:
        known_at = max(known_at, _aware(intent.updated_at))
    stale = (now - known_at).total_seconds() > STATUS_FRESH_SECONDS
    return _Existing(_Attempt.of(live, None), status, stale)


def _decide_unresolved(order: Order, live: PaymentAttempt, now: datetime) -> _Wait | _Call:
    """The live attempt is creating or unknown: wait while another request is creating it,
    else ask Stripe again under the same key (the create replays, never a second one)."""
    claimed_at = _aware(live.updated_at)
    if live.status == CREATING and (now - claimed_at).total_seconds() < CREATING_STALE_SECONDS:
        return _Wait()
    previous_call_at = claimed_at if live.calls else None
    log.warning(
        "pay: resolving an attempt whose outcome is unknown",
        extra={"order_id": order.id, "attempt": live.attempt, "status": live.status},
    )
    live.status = CREATING
    live.calls += 1
    live.updated_at = now
    return _Call(_Attempt.of(live, previous_call_at), resolving=True)


def _decide_change(order: Order, live: PaymentAttempt, status: str, now: datetime) -> _Wait | _Change | None:
    """Phase 1 for a created attempt: the change its PaymentIntent needs before it is
    handed out (claimed on the locked row), a wait for one in flight, or None."""
    if live.change_key is not None:
        claimed_at = live.change_claimed_at
        if claimed_at is not None and (now - _aware(claimed_at)).total_seconds() < CREATING_STALE_SECONDS:
            return _Wait()
        # Unknown outcome, or a claim whose process died: the same change, same key.
        live.change_claimed_at = now
        return _Change(_Attempt.of(live, None), live.change_key, live.change_amount)
    if order.amount is None or order.currency is None or (live.amount, live.currency) == (order.amount, order.currency):
        return None
    if status == "processing":
        raise PayError(
            "payment_in_progress",
            f"The PaymentIntent of order {order.id} is processing a payment of {format_money(live.amount, live.currency)}; "
            "it cannot be changed to the order's new amount until that payment succeeds or fails.",
            retry_after=5,
            payment_intent_id=live.payment_intent_id, kind=Kind.CONFLICT,
        )
    sequence = live.change_count + 1
    if status in AMOUNT_UPDATABLE and live.currency == order.currency:
        key, amount = amount_update_key(order.id, live.attempt, order.amount, sequence), order.amount
    else:
        key, amount = cancel_key(order.id, live.attempt, sequence), None
    log.info(
        "pay: the order's amount changed; %s its PaymentIntent", "updating" if amount is not None else "canceling",
        extra={"order_id": order.id, "attempt": live.attempt, "payment_intent_id": live.payment_intent_id},
    )
    live.change_key, live.change_amount, live.change_claimed_at = key, amount, now
    return _Change(_Attempt.of(live, None), key, amount)


def _clear_change(row: PaymentAttempt) -> None:
    row.change_key = None
    row.change_amount = None
    row.change_claimed_at = None


def _answer(attempt: _Attempt, status: str, *, created: bool) -> PayResult:
    return PayResult(
        created,
        {
            "id": attempt.payment_intent_id,
            "client_secret": attempt.client_secret,
            "status": status,
            "amount": attempt.amount,
            "currency": attempt.currency,
            "order_id": attempt.order_id,
            "attempt": attempt.attempt,
            "created": created,
        },
    )


def _definitive(exc: GatewayError) -> bool:
    """Stripe looked at the request and refused it for good (no PaymentIntent exists for
    the key): a 4xx other than 409 (the key is in use by a concurrent request) and 429,
    and other than an idempotency error (our key with other parameters: a bug to look
    into, not proof that nothing was created)."""
    if isinstance(exc, (StripeUnavailable, StripeRateLimited)):
        return False
    if not isinstance(exc, (StripeRejected, StripeNotFound)):
        return False
    if exc.http_status in (None, 409, 429) or (exc.code or "").startswith("idempotency"):
        return False
    return exc.http_status is not None and 400 <= exc.http_status < 500


def _transient(exc: GatewayError, attempt: _Attempt) -> PayError:
    log.warning("pay: outcome unknown (%s)", type(exc).__name__, extra={"order_id": attempt.order_id, "attempt": attempt.attempt})
    if exc.http_status == 409:
        return _in_progress(attempt.order_id)
    return PayError.stripe_unavailable()


def _in_progress(order_id: str) -> PayError:
    return PayError(
        "payment_in_progress",
        f"Another request is creating the PaymentIntent of order {order_id}; retry shortly.",
        retry_after=1, kind=Kind.CONFLICT,
    )


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "http_status", None)
    code = getattr(exc, "code", None)
    return f"{type(exc).__name__} (http {status}, code {code}): {exc}"


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for timezone-aware columns; they were written in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=utcnow().tzinfo)


# -- stored replies (Idempotency-Key) ------------------------------------------------------


def reply_to_store(body: dict[str, Any], sealer: Sealer) -> dict[str, Any]:
    """The answer as kept for an Idempotency-Key replay: its ``client_secret`` sealed."""
    secret = body.get("client_secret")
    if not isinstance(secret, str):
        return body
    return {**body, "client_secret": sealer.seal(secret)}


def restore_reply(body: dict[str, Any], sealer: Sealer, gateway: StripeGateway) -> dict[str, Any]:
    """A stored answer ready to send again: its ``client_secret`` opened, or read again
    from Stripe when it cannot be (another SECRET_KEY, or a reply stored before sealing).
    Raises :class:`PayError` 503 when Stripe cannot be asked (nothing is changed)."""
    if "client_secret" not in body or not isinstance(body.get("id"), str):
        return body
    secret = sealer.open(body["client_secret"]) if isinstance(body["client_secret"], str) else None
    if secret is None:
        try:
            secret = gateway.retrieve_payment_intent(body["id"]).get("client_secret")
        except GatewayError as exc:
            log.warning("pay: could not read a replayed PaymentIntent's client_secret (%s)", type(exc).__name__,
                        extra={"payment_intent_id": body["id"]})
            raise PayError.stripe_unavailable() from None
    return {**body, "client_secret": secret}
