"""Reconciliation state: duplicate cases, refund attempts, runs, the run lease, alerts sent,
and the audit log.

Invariants the schema carries:

* ``duplicate_cases``: at most one *active* case (``open``, ``refunding``, ``failed``) per
  order (a partial unique index), so two passes, or a pass and a person, never open two
  cases for the same order. A ``dismissed`` or ``refunded`` case is history: a later
  duplicate on the same order opens a new case.
* ``refund_attempts``: one row per refund we ask Stripe for, written and committed
  *before* the call, with the idempotency key ``dup-refund-<charge_id>-<n>`` (unique, and
  ``(charge_id, n)`` unique). ``n`` grows only after an attempt is confirmed failed, so a
  crash or a rerun resumes the same key and Stripe replays instead of refunding again.
  The money itself is counted only from ``refunds`` (Stripe's refund objects, by id), never
  from attempts, so an attempt and the refund event that reports it are never counted twice.
* ``run_leases``: the cross-process guard for the reconciliation pass on SQLite (on
  PostgreSQL an advisory lock does this; the lease is still written for visibility).
* ``alerts_sent``: one row per alert key (``case-opened:<id>``, ``refund-failed:<key>``,
  ...): an alert goes out once, not every night.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, utcnow
from models.ledger import CURRENCY, STRIPE_ID



class CaseStatus(StrEnum):
    """A duplicate case's status. Only :mod:`domain.cases.lifecycle` changes it."""

    OPEN = "open"  # needs a decision (a person's, or the job's in auto mode)
    REFUNDING = "refunding"  # refunds/releases approved, not all settled yet
    REFUNDED = "refunded"  # settled, and the order then held no more than its total
    DISMISSED = "dismissed"  # a person decided not to refund, for the state they saw
    FAILED = "failed"  # a refund failed (at once or later): back to a person


class CaseKind(StrEnum):
    """What a case is about."""

    DUPLICATE = "duplicate"  # captured charges holding more than the order's total
    AUTHORIZATION = "authorization"  # an uncaptured authorisation the order does not need
    # Possible duplicate, no order: paid charges of one card (or customer), amount and
    # currency within minutes of each other, none naming an order. Review only: never
    # refunded by the service. Kept on a synthetic order row (see UNLINKED_ORDER_PREFIX).
    UNLINKED = "unlinked"


# The synthetic order an unlinked case hangs on: "~unlinked:<fp_...|cus_...>:<first charge>".
# "~" can never start a merchant's order id (domain.stripe.shapes.ORDER_ID, checked on every way
# in), so such a row is never a real order, and a real order is never taken for one.
UNLINKED_ORDER_PREFIX = "~unlinked:"


def is_unlinked_order(order_id: str | None) -> bool:
    return order_id is not None and order_id.startswith(UNLINKED_ORDER_PREFIX)


class AttemptAction(StrEnum):
    """What a refund attempt asks Stripe for."""

    REFUND = "refund"  # refund captured money
    RELEASE = "release"  # release an uncaptured authorisation (cancel its PaymentIntent, or refund the bare charge)


CASE_STATUSES = tuple(s.value for s in CaseStatus)
ACTIVE_CASE_STATUSES = (CaseStatus.OPEN.value, CaseStatus.REFUNDING.value, CaseStatus.FAILED.value)


class DuplicateCase(Base):
    """An order holding more than it should: extra successful charges, or charges in more
    than one currency. Finance decides it, or the job refunds it when the rule is clear."""

    __tablename__ = "duplicate_cases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), index=True)
    # a CaseStatus; changed only through domain.cases.lifecycle
    status: Mapped[str] = mapped_column(String(16))
    # a CaseKind
    kind: Mapped[str] = mapped_column(String(16), default=CaseKind.DUPLICATE.value, server_default="duplicate")
    keeper_charge_id: Mapped[str] = mapped_column(STRIPE_ID)
    # The order's total when the case was assessed (None: unknown) and its currency.
    order_amount: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(CURRENCY)
    # {currency: minor units} the order holds above its total (or above the keeper when
    # the total is unknown). JSON so mixed-currency cases keep every currency.
    excess: Mapped[dict[str, int]] = mapped_column(JSON)
    # Why the rule could not decide alone (None for automatic cases); codes + numbers.
    review_reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    automatic: Mapped[bool] = mapped_column(Boolean, default=False)
    # auto | finance | external (refunded outside this service) | None while undecided
    decision: Mapped[str | None] = mapped_column(String(16))
    decided_by: Mapped[str | None] = mapped_column(String(255))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    note: Mapped[str | None] = mapped_column(Text)
    failure: Mapped[str | None] = mapped_column(Text)
    # What the person saw when dismissing: {"held": {currency: minor units}, "charges":
    # [held charge ids]}. The dismissal stands only while the order holds no more than
    # this, over no other charge.
    dismissed_state: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Why the case went back to a person after a decision (a skipped refund, an excess
    # that came back, another case's failed refund). Set once, never cleared: such a case
    # is never refunded automatically again.
    escalation: Mapped[str | None] = mapped_column(Text)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    opened_by_run_id: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    charges: Mapped[list["CaseCharge"]] = relationship(
        back_populates="case", order_by="CaseCharge.position", cascade="all, delete-orphan"
    )


Index(
    "uq_duplicate_cases_active_order",
    DuplicateCase.order_id,
    unique=True,
    sqlite_where=text("status IN ('open', 'refunding', 'failed')"),
    postgresql_where=text("status IN ('open', 'refunding', 'failed')"),
)
Index("ix_duplicate_cases_status_opened", DuplicateCase.status, DuplicateCase.opened_at)


class CaseCharge(Base):
    """One charge of a case as assessed: its role, what it held, and the refund proposed."""

    __tablename__ = "case_charges"

    case_id: Mapped[int] = mapped_column(ForeignKey("duplicate_cases.id"), primary_key=True)
    charge_id: Mapped[str] = mapped_column(STRIPE_ID, primary_key=True)
    position: Mapped[int] = mapped_column(Integer)  # keeper order: 0 is the keeper
    # keeper | duplicate (a clear duplicate) | extra (held, but not a clear duplicate) | other
    role: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(CURRENCY)
    held: Mapped[int] = mapped_column(BigInteger)
    proposed_refund: Mapped[int] = mapped_column(BigInteger, default=0)

    case: Mapped[DuplicateCase] = relationship(back_populates="charges")


class RefundAttempt(Base):
    """A refund we asked (or are about to ask) Stripe for. Committed before the call."""

    __tablename__ = "refund_attempts"
    __table_args__ = (UniqueConstraint("charge_id", "n"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    charge_id: Mapped[str] = mapped_column(STRIPE_ID, index=True)
    n: Mapped[int] = mapped_column(Integer)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("duplicate_cases.id"), index=True)
    order_id: Mapped[str | None] = mapped_column(String(255))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(CURRENCY)
    # auto | finance
    origin: Mapped[str] = mapped_column(String(16))
    # an AttemptAction: refund captured money, or release an authorisation
    action: Mapped[str] = mapped_column(String(16), default=AttemptAction.REFUND.value, server_default="refund")
    requested_by: Mapped[str | None] = mapped_column(String(255))
    # recorded (committed, call not known to have happened) | succeeded (Stripe returned a
    # refund) | failed (Stripe refused, or the refund failed/was canceled later) |
    # skipped (the re-read showed the charge no longer holds it; nothing was sent)
    status: Mapped[str] = mapped_column(String(16), default="recorded")
    refund_id: Mapped[str | None] = mapped_column(STRIPE_ID, unique=True)
    error: Mapped[str | None] = mapped_column(Text)
    calls: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class ReconciliationRun(Base):
    """One reconciliation pass: when, how, what it found, and the watermark it reached."""

    __tablename__ = "reconciliation_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    mode: Mapped[str] = mapped_column(String(16))  # review | auto | dry-run
    full: Mapped[bool] = mapped_column(Boolean, default=False)
    trigger: Mapped[str] = mapped_column(String(16), default="manual")  # manual | schedule
    # running | succeeded | failed (an error stopped it) | partial (finished with errors)
    status: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Stripe ``created`` (unix seconds) the backfill started from and reached.
    backfill_from: Mapped[int | None] = mapped_column(BigInteger)
    # The oldest of ``watermarks`` (kept for display and for code that predates them).
    watermark: Mapped[int | None] = mapped_column(BigInteger)
    # One watermark per backfill listing ({"charges": ..., "refunds": ..., "disputes": ...,
    # "events": ...}), each the newest Stripe ``created`` that listing has covered; None on
    # runs recorded before revision 0004 (only ``watermark``).
    watermarks: Mapped[dict[str, int] | None] = mapped_column(JSON)
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    errors: Mapped[list[str]] = mapped_column(JSON, default=list)
    host: Mapped[str | None] = mapped_column(String(255))


class RunLease(Base):
    """Who holds the reconciliation pass, until when (renewed by a heartbeat)."""

    __tablename__ = "run_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AlertSent(Base):
    """An alert that went out (to at least the log), by its dedup key."""

    __tablename__ = "alerts_sent"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    subject: Mapped[str] = mapped_column(Text)
    channels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)  # channel -> ok|error
    sent_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEntry(Base):
    """Who did what to a case, when, and why. Never updated or deleted."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(255))  # a user, or "reconciler" for the job
    action: Mapped[str] = mapped_column(String(32))
    case_id: Mapped[int | None] = mapped_column(ForeignKey("duplicate_cases.id"), index=True)
    note: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


# Incremental detection looks for what changed since the last pass.
Index("ix_refund_attempts_case_status", RefundAttempt.case_id, RefundAttempt.status)


class SchedulerHeartbeat(Base):
    """A live scheduler process and when it will start the next pass.

    One row per scheduler (``holder`` is ``host:pid``), written when it starts, after each
    pass and every minute; deleted when it stops. A row whose ``seen_at`` is older than a
    few minutes belongs to a scheduler that died without saying so and is ignored. Several
    hosts may run a scheduler: the pass lock keeps their passes apart, and the next pass is
    the earliest ``next_pass_at`` among the live rows.
    """

    __tablename__ = "scheduler_heartbeats"

    holder: Mapped[str] = mapped_column(String(255), primary_key=True)
    next_pass_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cron: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
