"""Pay endpoint state: PaymentIntent creation attempts and client Idempotency-Key replays.

Tables: ``payment_attempts`` and ``idempotency_keys``.

Invariants the schema carries (the pay service and the ledger rely on them):

* One row per attempt to create a PaymentIntent for an order, numbered ``attempt`` = 1, 2,
  ... per order (unique ``(order_id, attempt)``), with the Stripe idempotency key
  ``order-<order_id>-pi-<attempt>`` (unique). The key is derived from our row, never
  random, so every retry of an attempt sends the same key and Stripe creates at most one
  PaymentIntent for it.
* At most one *live* attempt per order: a partial unique index on ``order_id`` over the
  statuses ``creating``, ``unknown``, ``created`` and ``succeeded`` (on SQLite and on
  PostgreSQL). Whatever the application code does, our tables can never hold two payable
  PaymentIntents for one order; a new attempt needs the previous one ``canceled`` or
  ``failed`` first.
* A PaymentIntent belongs to at most one attempt (unique ``payment_intent_id``).
* At most one change of a live PaymentIntent (an amount update, or a cancel to make room
  for attempt ``n + 1``) per attempt at a time: ``change_key`` names it (its Stripe
  idempotency key) until its outcome is recorded; ``change_claimed_at`` is set while its
  Stripe call is in flight and cleared when the outcome is unknown.
* An Idempotency-Key is stored once per scope (unique ``(scope, key)``) with the SHA-256
  fingerprint of the request it first came with, and the response to replay.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow
from models.ledger import CURRENCY, STRIPE_ID

# -- attempts ----------------------------------------------------------------------------

class AttemptStatus(StrEnum):
    """Where a pay attempt (``payment_attempts.status``) stands; a Checkout attempt uses
    CREATING, UNKNOWN and FAILED too (see :class:`CheckoutStatus`)."""

    #: The Stripe call is in flight (phase 2); ``updated_at`` is when it was claimed.
    CREATING = "creating"
    #: The call's outcome is unknown (timeout, connection error, Stripe 5xx or 409, crash):
    #: resolved with the same key or a look-up at Stripe before anything new is created.
    UNKNOWN = "unknown"
    #: Stripe returned the PaymentIntent; it is payable (any status but canceled/succeeded).
    CREATED = "created"
    SUCCEEDED = "succeeded"
    CANCELED = "canceled"
    #: Stripe refused the create definitively and no PaymentIntent exists for the key.
    FAILED = "failed"


CREATING = AttemptStatus.CREATING
UNKNOWN = AttemptStatus.UNKNOWN
CREATED = AttemptStatus.CREATED
SUCCEEDED = AttemptStatus.SUCCEEDED
CANCELED = AttemptStatus.CANCELED
FAILED = AttemptStatus.FAILED

#: Statuses that hold the order's one slot (see the partial unique index below).
LIVE_ATTEMPT_STATUSES = (CREATING, UNKNOWN, CREATED, SUCCEEDED)
ATTEMPT_STATUSES = (*LIVE_ATTEMPT_STATUSES, CANCELED, FAILED)

_LIVE_SQL = "status IN ('creating', 'unknown', 'created', 'succeeded')"


def attempt_key(order_id: str, attempt: int) -> str:
    """The Stripe idempotency key of an attempt: stable, so a retry replays, never repeats."""
    return f"order-{order_id}-pi-{attempt}"


def amount_update_key(order_id: str, attempt: int, amount: int, sequence: int) -> str:
    """The Stripe idempotency key of an attempt's ``sequence``-th change when it updates
    the amount to ``amount``: a retry of the same change sends the same key, and a later
    change back to an earlier amount gets a new one (Stripe would replay the earlier
    answer, and change nothing, for a reused key)."""
    return f"order-{order_id}-pi-{attempt}-amount-{amount}-{sequence}"


def cancel_key(order_id: str, attempt: int, sequence: int) -> str:
    """The Stripe idempotency key of an attempt's ``sequence``-th change when it cancels
    the PaymentIntent (a refused cancel, say while processing, must not block a later one)."""
    return f"order-{order_id}-pi-{attempt}-cancel-{sequence}"


def attempt_status_for(payment_intent_status: str) -> str:
    """The attempt status a PaymentIntent status means: Stripe has no ``failed`` status
    (a declined PaymentIntent goes back to ``requires_payment_method`` and can still be
    paid), so only ``succeeded`` and ``canceled`` end an attempt."""
    if payment_intent_status == "succeeded":
        return SUCCEEDED
    if payment_intent_status == "canceled":
        return CANCELED
    return CREATED


class PaymentAttempt(Base):
    """One attempt to create the PaymentIntent of an order, in rocket-rides phases:
    recorded ``creating`` and committed before Stripe is called, then updated with the
    result in a transaction of its own."""

    __tablename__ = "payment_attempts"
    __table_args__ = (UniqueConstraint("order_id", "attempt", name="uq_payment_attempts_order_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    # creating | unknown | created | succeeded | canceled | failed (see the constants)
    status: Mapped[str] = mapped_column(String(16))
    # The parameters sent to Stripe, kept so a retry with the same key sends exactly the
    # same request (Stripe rejects a key reused with other parameters). Once the
    # PaymentIntent exists (``created``), ``amount`` is its amount as we last set it (an
    # amount update changes it; no create is ever sent again for a created attempt).
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(CURRENCY)
    customer: Mapped[str | None] = mapped_column(STRIPE_ID)
    payment_method: Mapped[str | None] = mapped_column(STRIPE_ID)
    payment_intent_id: Mapped[str | None] = mapped_column(STRIPE_ID, unique=True)
    # The PaymentIntent's client_secret, handed back to the checkout backend on every
    # answer, sealed with a key derived from SECRET_KEY (domain/payments/sealing.py); None or
    # unreadable: read again from Stripe when needed. Never stored in clear.
    client_secret_sealed: Mapped[str | None] = mapped_column(String(512))
    # How many times phase 2 was entered for this attempt (first call plus resolutions).
    calls: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # A change of the created PaymentIntent not yet recorded: its Stripe idempotency key,
    # the new amount (None: a cancel), and when its call was claimed (None: not in flight,
    # outcome unknown; the next request sends the same change again).
    change_key: Mapped[str | None] = mapped_column(String(255))
    change_amount: Mapped[int | None] = mapped_column(BigInteger)
    change_claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Changes (updates, cancels) Stripe answered so far: numbers the next change's key.
    change_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # For a ``creating`` attempt: when the Stripe call was (last) claimed.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


# The backstop: at most one live attempt (so at most one payable PaymentIntent) per order.
Index(
    "uq_payment_attempts_one_live_per_order",
    PaymentAttempt.order_id,
    unique=True,
    sqlite_where=text(_LIVE_SQL),
    postgresql_where=text(_LIVE_SQL),
)


# -- Idempotency-Key replay store ----------------------------------------------------------

class KeyStatus(StrEnum):
    """A client Idempotency-Key (``idempotency_keys.status``)."""

    IN_FLIGHT = "in_flight"  # the first request that used it is still being answered
    DONE = "done"  # answered; the answer is replayed


IN_FLIGHT = KeyStatus.IN_FLIGHT
DONE = KeyStatus.DONE


class IdempotencyRecord(Base):
    """A client ``Idempotency-Key``: the fingerprint of the first request that used it and,
    once answered, the response to replay. Expires after ``IDEMPOTENCY_KEY_TTL_HOURS``."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("scope", "key", name="uq_idempotency_keys_scope_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Which endpoint family the key belongs to (e.g. "pay"); keys of different scopes
    # never collide.
    scope: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    # sha256 hex of method, path and canonical body.
    fingerprint: Mapped[str] = mapped_column(String(64))
    # in_flight | done
    status: Mapped[str] = mapped_column(String(16))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # For an in-flight key: when the request holding it started (a crashed holder is
    # taken over after a while).
    locked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


# -- Checkout Sessions (checkout endpoint) -------------------------------------------------

class CheckoutStatus(StrEnum):
    """Where a Checkout attempt (``checkout_attempts.status``) stands."""

    CREATING = "creating"  # as AttemptStatus.CREATING
    UNKNOWN = "unknown"  # as AttemptStatus.UNKNOWN
    #: The session is open at Stripe: its URL is handed out.
    OPEN = "open"
    #: Stripe says the session is complete (the customer paid, or an async payment is pending).
    COMPLETE = "complete"
    #: Expired at Stripe (by us, to replace it, or by its ``expires_at``): frees the order.
    EXPIRED = "expired"
    FAILED = "failed"  # as AttemptStatus.FAILED


CHECKOUT_OPEN = CheckoutStatus.OPEN
CHECKOUT_COMPLETE = CheckoutStatus.COMPLETE
CHECKOUT_EXPIRED = CheckoutStatus.EXPIRED

#: A complete session's ``payment_status`` values that mean the order is paid (``unpaid``:
#: an async payment method, e.g. a bank debit, is still pending).
CHECKOUT_PAID_STATUSES = ("paid", "no_payment_required")

#: Statuses that hold the order's one Checkout slot (see the partial unique index below).
LIVE_CHECKOUT_STATUSES = (CREATING, UNKNOWN, CHECKOUT_OPEN, CHECKOUT_COMPLETE)

_LIVE_CHECKOUT_SQL = "status IN ('creating', 'unknown', 'open', 'complete')"


def checkout_key(order_id: str, attempt: int) -> str:
    """The Stripe idempotency key of a Checkout attempt's create."""
    return f"order-{order_id}-cs-{attempt}"


def checkout_expire_key(order_id: str, attempt: int, sequence: int) -> str:
    """The key of the attempt's ``sequence``-th expire request. Expiring is idempotent in
    effect (a second expire of an expired session is refused, and we then read the
    session), so a retry after an unknown outcome may use a new key: a 5xx Stripe stored
    for the previous key is not replayed for ever."""
    return f"order-{order_id}-cs-{attempt}-expire-{sequence}"


class CheckoutAttempt(Base):
    """One attempt to create the Checkout Session of an order (``POST /orders/<id>/checkout``),
    in the pay endpoint's phases. A table of its own rather than a ``kind`` on
    ``payment_attempts``: its columns differ (URL, ``expires_at``, the expire in flight),
    and its own one-live-per-order index keeps the pay endpoint's invariant untouched."""

    __tablename__ = "checkout_attempts"
    __table_args__ = (UniqueConstraint("order_id", "attempt", name="uq_checkout_attempts_order_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    # creating | unknown | open | complete | expired | failed
    status: Mapped[str] = mapped_column(String(16))
    # The create's parameters, kept so a retry under the same key is the same request.
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(CURRENCY)
    success_url: Mapped[str] = mapped_column(String(2048))
    cancel_url: Mapped[str] = mapped_column(String(2048))
    # Unix time sent as the session's expires_at: no session this attempt creates can be
    # paid after it (an unknown outcome is given up once it has passed).
    expires_at: Mapped[int] = mapped_column(BigInteger)
    session_id: Mapped[str | None] = mapped_column(STRIPE_ID, unique=True)
    url: Mapped[str | None] = mapped_column(Text)
    payment_status: Mapped[str | None] = mapped_column(String(32))
    calls: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # An expire of the open session not yet recorded: its key, and when its call was
    # claimed (None: not in flight, outcome unknown; the next request sends it again).
    expire_key: Mapped[str | None] = mapped_column(String(255))
    expire_claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expire_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # For ``creating``: when the call was claimed; for ``open``: when its state was learned.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


# The backstop: at most one live Checkout attempt (so at most one open session) per order.
Index(
    "uq_checkout_attempts_one_live_per_order",
    CheckoutAttempt.order_id,
    unique=True,
    sqlite_where=text(_LIVE_CHECKOUT_SQL),
    postgresql_where=text(_LIVE_CHECKOUT_SQL),
)
