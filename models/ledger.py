"""The ledger: Stripe events as received, and the orders, charges, refunds, disputes and
PaymentIntents they describe.

Invariants the schema carries (the services rely on them):

* ``stripe_events.event_id`` is the primary key: an event id is stored at most once. A
  row is ``applied`` only in the same transaction as the event's effects, so an applied
  event always has its effects, and an event is applied at most once.
* Every Stripe object is keyed by Stripe's own id, so every write path (webhook, backfill,
  our own API calls) upserts the same row.
* Money is ``BigInteger`` minor units plus a three-letter currency; there is no float
  column anywhere.
* ``last_event_created`` on each Stripe object is the Stripe ``created`` time of the newest
  snapshot applied to it; an older snapshot never overwrites a newer one.
* Refunds and disputes reference their charge by id without a foreign key: Stripe may
  tell us about a refund before it tells us about the charge.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, utcnow

STRIPE_ID = String(255)
CURRENCY = String(3)


class EventStatus(StrEnum):
    """Where a stored event stands (``stripe_events.status``)."""

    RECEIVED = "received"  # stored, waiting for the applier
    APPLIED = "applied"  # its effects are in the ledger (same transaction as this status)
    FAILED = "failed"  # its last apply raised; retried after next_attempt_at
    IGNORED = "ignored"  # a type we keep but never apply


class StripeEvent(Base):
    """One Stripe event, stored once: the inbox and the event log in one table.

    The accept path inserts the row (``received``, or ``ignored`` for a type we do not
    apply) and answers; the applier turns ``received`` rows into ledger rows and marks them
    ``applied`` in the same transaction, so an ``applied`` event always has its effects.
    A failed apply leaves the row ``failed`` with ``attempts`` and ``next_attempt_at`` (its
    backoff); it is claimed again once that time has passed.
    """

    __tablename__ = "stripe_events"

    event_id: Mapped[str] = mapped_column(STRIPE_ID, primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    api_version: Mapped[str | None] = mapped_column(String(64))
    livemode: Mapped[bool] = mapped_column(Boolean)
    account: Mapped[str | None] = mapped_column(STRIPE_ID)  # Connect account, if any
    created: Mapped[int] = mapped_column(BigInteger)  # Stripe's unix seconds
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # an EventStatus
    status: Mapped[str] = mapped_column(String(16))
    object_id: Mapped[str | None] = mapped_column(STRIPE_ID)
    payload: Mapped[str] = mapped_column(Text)  # the body exactly as signed
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # The applier's queue: only rows still to apply are in it, oldest Stripe time first.
        Index(
            "ix_stripe_events_inbox",
            "created",
            "event_id",
            postgresql_where=text("status IN ('received', 'failed')"),
            sqlite_where=text("status IN ('received', 'failed')"),
        ),
    )


class ApplierHeartbeat(Base):
    """One row per running applier (process), beaten every few seconds: what /healthz and
    /metrics read to tell a live applier from a dead one."""

    __tablename__ = "applier_heartbeats"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # host:pid
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    applied: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)


class EventFailure(Base):
    """An event whose application failed, written outside the rolled-back transaction.

    It makes a poison event visible (and alertable) while Stripe keeps redelivering it;
    ``resolved_at`` is set by the delivery that finally applies it.
    """

    __tablename__ = "event_failures"

    event_id: Mapped[str] = mapped_column(STRIPE_ID, primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text)
    first_failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Order(Base):
    """A merchant order. ``amount`` is the order's total when known (from the orders API,
    an import, or ``metadata.order_total`` on its PaymentIntent); ``None`` means unknown."""

    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    amount: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(CURRENCY)
    # Where the total came from: "api", "import", "metadata" or "checkout" (a Checkout
    # Session's amount_total); None while unknown.
    amount_source: Mapped[str | None] = mapped_column(String(16))
    customer: Mapped[str | None] = mapped_column(String(255))
    # pending | paid | partially_refunded | refunded; derived from the order's charges.
    status: Mapped[str] = mapped_column(String(24), default="pending")
    payment_intent_id: Mapped[str | None] = mapped_column(STRIPE_ID)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    charges: Mapped[list["Charge"]] = relationship(
        back_populates="order", order_by="(Charge.created, Charge.id)"
    )

    __mapper_args__ = {"version_id_col": version}


class Charge(Base):
    """A Stripe charge. What it still holds follows from its refunds and dispute."""

    __tablename__ = "charges"

    id: Mapped[str] = mapped_column(STRIPE_ID, primary_key=True)
    # Indexed by ix_charges_order_currency (order_id first).
    order_id: Mapped[str | None] = mapped_column(ForeignKey("orders.id"))
    payment_intent_id: Mapped[str | None] = mapped_column(STRIPE_ID, index=True)
    customer: Mapped[str | None] = mapped_column(STRIPE_ID)
    account: Mapped[str | None] = mapped_column(STRIPE_ID)
    livemode: Mapped[bool] = mapped_column(Boolean, default=False)
    amount: Mapped[int] = mapped_column(BigInteger)
    amount_captured: Mapped[int] = mapped_column(BigInteger, default=0)
    currency: Mapped[str] = mapped_column(CURRENCY)
    # pending | succeeded | failed (Stripe's charge statuses).
    status: Mapped[str] = mapped_column(String(16))
    captured: Mapped[bool] = mapped_column(Boolean, default=False)
    # Stripe's amount_refunded as of the newest charge snapshot applied (see ledger service).
    reported_refunded: Mapped[int] = mapped_column(BigInteger, default=0)
    # An uncaptured authorisation that no longer holds the customer's funds: released by
    # a refund, its PaymentIntent canceled, or expired. Never goes back.
    released: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    created: Mapped[int] = mapped_column(BigInteger)
    card_brand: Mapped[str | None] = mapped_column(String(32))
    card_last4: Mapped[str | None] = mapped_column(String(4))
    # payment_method_details.card.fingerprint (the same card, whoever charges it) and the
    # charge's description: the evidence the unlinked-charges rule groups and tells apart by.
    card_fingerprint: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(Text)
    last_event_created: Mapped[int] = mapped_column(BigInteger)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    order: Mapped[Order | None] = relationship(back_populates="charges")


class Refund(Base):
    """A Stripe refund, upserted by its id from every path (webhook, backfill, our calls)."""

    __tablename__ = "refunds"

    id: Mapped[str] = mapped_column(STRIPE_ID, primary_key=True)
    charge_id: Mapped[str | None] = mapped_column(STRIPE_ID, index=True)
    payment_intent_id: Mapped[str | None] = mapped_column(STRIPE_ID)
    account: Mapped[str | None] = mapped_column(STRIPE_ID)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(CURRENCY)
    # pending | requires_action | succeeded | failed | canceled
    status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(String(64))
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    # external (made outside this service), auto (duplicate job), finance (a person here)
    origin: Mapped[str] = mapped_column(String(16), default="external")
    created: Mapped[int] = mapped_column(BigInteger)
    last_event_created: Mapped[int] = mapped_column(BigInteger)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class Dispute(Base):
    """A Stripe dispute on a charge (a charge has at most one)."""

    __tablename__ = "disputes"

    id: Mapped[str] = mapped_column(STRIPE_ID, primary_key=True)
    charge_id: Mapped[str | None] = mapped_column(STRIPE_ID, index=True)
    account: Mapped[str | None] = mapped_column(STRIPE_ID)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(CURRENCY)
    # warning_needs_response | warning_under_review | warning_closed | needs_response |
    # under_review | won | lost (Stripe's dispute statuses)
    status: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(64))
    created: Mapped[int] = mapped_column(BigInteger)
    last_event_created: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class PaymentIntent(Base):
    """A Stripe PaymentIntent, known from webhooks, backfill or the pay endpoint."""

    __tablename__ = "payment_intents"

    id: Mapped[str] = mapped_column(STRIPE_ID, primary_key=True)
    order_id: Mapped[str | None] = mapped_column(ForeignKey("orders.id"), index=True)
    account: Mapped[str | None] = mapped_column(STRIPE_ID)
    livemode: Mapped[bool] = mapped_column(Boolean, default=False)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(CURRENCY)
    # requires_payment_method | requires_confirmation | requires_action | processing |
    # requires_capture | canceled | succeeded
    status: Mapped[str] = mapped_column(String(32))
    customer: Mapped[str | None] = mapped_column(STRIPE_ID)
    latest_charge_id: Mapped[str | None] = mapped_column(STRIPE_ID)
    # metadata.order_total, when the merchant's checkout sets it: the order's known total.
    order_total: Mapped[int | None] = mapped_column(BigInteger)
    created: Mapped[int] = mapped_column(BigInteger)
    last_event_created: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class CheckoutSession(Base):
    """A Stripe Checkout Session: the order it names (``client_reference_id``, metadata, or
    its Payment Link) is the order of its PaymentIntent and so of that PaymentIntent's
    charges, whichever of them Stripe reports first."""

    __tablename__ = "checkout_sessions"

    id: Mapped[str] = mapped_column(STRIPE_ID, primary_key=True)
    order_id: Mapped[str | None] = mapped_column(ForeignKey("orders.id"), index=True)
    payment_intent_id: Mapped[str | None] = mapped_column(STRIPE_ID, index=True)
    account: Mapped[str | None] = mapped_column(STRIPE_ID)
    livemode: Mapped[bool] = mapped_column(Boolean, default=False)
    mode: Mapped[str] = mapped_column(String(16))  # payment | setup | subscription
    status: Mapped[str] = mapped_column(String(16))  # open | complete | expired
    payment_status: Mapped[str] = mapped_column(String(24))  # paid | unpaid | no_payment_required
    # True once checkout.session.async_payment_failed was applied (never goes back).
    payment_failed: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    amount_total: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(CURRENCY)
    client_reference_id: Mapped[str | None] = mapped_column(String(255))
    payment_link: Mapped[str | None] = mapped_column(STRIPE_ID)
    customer: Mapped[str | None] = mapped_column(STRIPE_ID)
    created: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    last_event_created: Mapped[int] = mapped_column(BigInteger)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


Index("ix_charges_order_currency", Charge.order_id, Charge.currency)
# Incremental reconciliation reads "what changed since the last pass" through these.
Index("ix_charges_updated_at", Charge.updated_at)
# Detection's look for uncaptured authorisations still holding funds (rare next to the rest).
Index(
    "ix_charges_unreleased_authorizations",
    Charge.order_id,
    sqlite_where=text("status = 'succeeded' AND captured = 0 AND released = 0"),
    postgresql_where=text("status = 'succeeded' AND NOT captured AND NOT released"),
)
# The unlinked-charges rule: charges of one card (or customer), amount and currency, in time.
Index("ix_charges_fingerprint_amount", Charge.card_fingerprint, Charge.currency, Charge.amount, Charge.created)
Index("ix_charges_customer_amount", Charge.customer, Charge.currency, Charge.amount, Charge.created)
Index("ix_refunds_updated_at", Refund.updated_at)
Index("ix_disputes_updated_at", Dispute.updated_at)
Index("ix_orders_updated_at", Order.updated_at)
