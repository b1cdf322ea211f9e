"""Which alerts are due: refund failures and poison events not alerted yet. Sending (the
channels, once per key) is :mod:`domain.alerts`, shared with the web app."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain.alerts import Alert, Alerter
from domain.cases.lifecycle import CaseAction
from domain.cases.reasons import ReasonContext, explain
from models import AlertSent, AuditEntry, DuplicateCase, EventFailure, RefundAttempt, utcnow
from models.money import format_money

__all__ = ["Alert", "Alerter", "pending_alerts"]


# Case changes that mean "the money is not where the service left it": a person must look.
_CASE_ALERTS = {
    CaseAction.RETURN_TO_REVIEW.value: "went back to review",
    CaseAction.REOPEN_EXCESS.value: "was reopened: the order holds too much again",
    CaseAction.MERGE.value: "took news of another case's failed refund",
}
CASE_ALERT_DAYS = 30


def pending_alerts(session: Session) -> list[Alert]:
    """Refund failures, cases sent back to a person, and poison events not alerted yet."""
    sent = select(AlertSent.key)
    alerts: list[Alert] = []
    for attempt in session.scalars(
        select(RefundAttempt).where(RefundAttempt.status == "failed").order_by(RefundAttempt.id)
    ):
        key = f"refund-failed:{attempt.idempotency_key}"
        alerts.append(
            Alert(
                key,
                f"Refund failed: {format_money(attempt.amount, attempt.currency)} on {attempt.charge_id}",
                f"The refund of {format_money(attempt.amount, attempt.currency)} on {attempt.charge_id} "
                f"(attempt {attempt.idempotency_key}, order {attempt.order_id}, case {attempt.case_id}) failed: "
                f"{attempt.error}. The case is in 'failed' for finance; the customer still holds a duplicate charge.",
            )
        )
    for entry, order_id, currency in session.execute(
        select(AuditEntry, DuplicateCase.order_id, DuplicateCase.currency)
        .join(DuplicateCase, DuplicateCase.id == AuditEntry.case_id)
        .where(AuditEntry.action.in_(list(_CASE_ALERTS)), AuditEntry.at >= utcnow() - timedelta(days=CASE_ALERT_DAYS))
        .order_by(AuditEntry.id)
    ):
        if entry.action == CaseAction.MERGE.value and (entry.details or {}).get("into_case"):
            continue  # alerted once, on the case that took the news
        alerts.append(
            Alert(
                f"case-{entry.action}:{entry.id}",
                f"Case {entry.case_id} (order {order_id}) {_CASE_ALERTS[entry.action]}",
                f"Case {entry.case_id} for order {order_id} {_CASE_ALERTS[entry.action]}. "
                + " ".join(explain(entry.note or "", ReasonContext(currency=currency), tail=False))
                + " A person needs to decide it on the review page.",
            )
        )
    for failure in session.scalars(
        select(EventFailure).where(EventFailure.resolved_at.is_(None)).order_by(EventFailure.first_failed_at)
    ):
        alerts.append(
            Alert(
                f"poison-event:{failure.event_id}",
                f"Webhook event {failure.event_id} ({failure.type}) keeps failing",
                f"{failure.attempts} attempt(s); last error: {failure.last_error}",
            )
        )
    already = set(session.scalars(sent.where(AlertSent.key.in_([a.key for a in alerts])))) if alerts else set()
    return [a for a in alerts if a.key not in already]
