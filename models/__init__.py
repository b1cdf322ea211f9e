"""Persistence: typed SQLAlchemy models, the engine and session factory, migrations.

Never imports Flask or reads the environment; the web app, the CLI, the jobs and Alembic
all use it directly.
"""

from models.base import Base, iso_from_unix, iso_utc, table_of, utcnow
from models.db import make_engine, make_session_factory, run_in_transaction
from models.ledger import (
    Charge,
    CheckoutSession,
    Dispute,
    ApplierHeartbeat,
    EventFailure,
    Order,
    PaymentIntent,
    Refund,
    StripeEvent,
)
from models import payments as _payments  # noqa: F401  (registers the tables)
from models.web import LoginThrottle, WebSession
from models.reconciliation import (
    ACTIVE_CASE_STATUSES,
    CASE_STATUSES,
    AlertSent,
    AttemptAction,
    CaseKind,
    CaseStatus,
    AuditEntry,
    CaseCharge,
    DuplicateCase,
    ReconciliationRun,
    RefundAttempt,
    RunLease,
    SchedulerHeartbeat,
    UNLINKED_ORDER_PREFIX,
    is_unlinked_order,
)

__all__ = [
    "ACTIVE_CASE_STATUSES",
    "CASE_STATUSES",
    "AlertSent",
    "AttemptAction",
    "CaseKind",
    "CaseStatus",
    "AuditEntry",
    "CaseCharge",
    "DuplicateCase",
    "ReconciliationRun",
    "RefundAttempt",
    "RunLease",
    "SchedulerHeartbeat",
    "UNLINKED_ORDER_PREFIX",
    "is_unlinked_order",
    "Base",
    "Charge",
    "CheckoutSession",
    "Dispute",
    "ApplierHeartbeat",
    "EventFailure",
    "Order",
    "PaymentIntent",
    "Refund",
    "StripeEvent",
    "LoginThrottle",
    "WebSession",
    "make_engine",
    "make_session_factory",
    "run_in_transaction",
    "iso_from_unix",
    "iso_utc",
    "table_of",
    "utcnow",
]
