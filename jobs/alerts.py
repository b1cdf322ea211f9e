"""Which alerts are due: refund failures and poison events not alerted yet. Sending (the
channels, once per key) is :mod:`app.services.alerts`, shared with the web app."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.services.alerts import Alert, Alerter
from models import AlertSent, EventFailure, RefundAttempt

__all__ = ["Alert", "Alerter", "pending_alerts"]


def pending_alerts(session: Session) -> list[Alert]:
    """Refund failures and poison events not alerted yet."""
    sent = select(AlertSent.key)
    alerts: list[Alert] = []
    for attempt in session.scalars(
        select(RefundAttempt).where(RefundAttempt.status == "failed").order_by(RefundAttempt.id)
    ):
        key = f"refund-failed:{attempt.idempotency_key}"
        alerts.append(
            Alert(
                key,
                f"Refund failed: {attempt.amount} {attempt.currency.upper()} on {attempt.charge_id}",
                f"Refund attempt {attempt.idempotency_key} for order {attempt.order_id} "
                f"(case {attempt.case_id}) failed: {attempt.error}. The case is in 'failed' "
                f"for finance; the customer still holds a duplicate charge.",
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
