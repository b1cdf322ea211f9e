"""Alerts reach Slack (intercepted with `responses`) and e-mail (a real SMTP server on
127.0.0.1, aiosmtpd) once per key; a broken channel is logged and the pass succeeds."""

from __future__ import annotations

import json
import socket
from typing import Iterator

import pytest
from aiosmtpd.controller import Controller

from domain.stripe.gateway import StripeGateway
from config import Settings
from jobs.alerts import Alert, Alerter
from jobs.reconcile import run_reconciliation
from models import AlertSent, EventFailure, run_in_transaction, utcnow
from tests.stripe_fake import API, FakeStripe
from tests.integration.test_reconcile import _double_click

SLACK = "https://hooks.slack.test/services/T000/B000/XXXX"


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], str]] = []

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content.decode("utf-8", "replace")))
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def _alert_settings(settings: Settings, smtp_port: int) -> Settings:
    return settings.with_overrides(
        stripe_api_base=API,
        stripe_max_network_retries=0,
        refund_mode="auto",
        alert_slack_webhook_url=SLACK,
        smtp_host="127.0.0.1",
        smtp_port=smtp_port,
        # This local test server offers no TLS; no password is configured (SMTP_TLS=none
        # allows plain SMTP only then: tests/integration/test_smtp_tls.py).
        smtp_tls="none",
        alert_email_from="reconciler@merchant.test",
        alert_email_to=("finance@merchant.test",),
    )


def test_a_pass_that_finds_duplicates_alerts_slack_and_email_once(mock, smtp, settings, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    inbox, port = smtp
    slack = mock.post(SLACK, body="ok")
    stripe_api = FakeStripe(mock)
    _double_click(stripe_api, session_factory)
    alert_settings = _alert_settings(settings, port)
    gateway = StripeGateway.from_settings(alert_settings)

    summary = run_reconciliation(session_factory, gateway, alert_settings, sleep=lambda s: None)
    assert summary.status == "succeeded" and summary.alerts_sent == 1
    assert slack.call_count == 1
    text = json.loads(slack.calls[0].request.body)["text"]
    assert "1 case(s) opened" in text and "49.99 USD" in text
    assert len(inbox.messages) == 1
    mail_from, recipients, content = inbox.messages[0]
    assert mail_from == "reconciler@merchant.test" and recipients == ["finance@merchant.test"]
    assert "Subject: [reconciler] Reconciliation run" in content and "refunded automatically" in content

    # the next pass finds nothing new: no alert
    again = run_reconciliation(session_factory, gateway, alert_settings, sleep=lambda s: None)
    assert again.alerts_sent == 0 and slack.call_count == 1 and len(inbox.messages) == 1


def test_a_poison_event_is_alerted_once(mock, smtp, settings, session_factory) -> None:  # type: ignore[no-untyped-def]
    inbox, port = smtp
    slack = mock.post(SLACK, body="ok")
    FakeStripe(mock)

    def poison(session):  # type: ignore[no-untyped-def]
        session.add(EventFailure(event_id="evt_poison", type="charge.succeeded", attempts=3, last_error="boom", first_failed_at=utcnow(), last_failed_at=utcnow()))

    run_in_transaction(session_factory, poison)
    alert_settings = _alert_settings(settings, port)
    gateway = StripeGateway.from_settings(alert_settings)
    run_reconciliation(session_factory, gateway, alert_settings, mode="review", sleep=lambda s: None)
    run_reconciliation(session_factory, gateway, alert_settings, mode="review", sleep=lambda s: None)
    poison_mails = [m for m in inbox.messages if "evt_poison" in m[2]]
    assert len(poison_mails) == 1
    assert sum("evt_poison" in c.request.body.decode() for c in slack.calls) == 1


def test_broken_channels_are_logged_and_the_pass_succeeds(mock, settings, session_factory, ledger, caplog) -> None:  # type: ignore[no-untyped-def]
    mock.post(SLACK, status=500, body="upstream broken")
    stripe_api = FakeStripe(mock)
    _double_click(stripe_api, session_factory)
    closed_port = _free_port()  # nothing listens there
    alert_settings = _alert_settings(settings, closed_port)
    summary = run_reconciliation(session_factory, StripeGateway.from_settings(alert_settings), alert_settings, sleep=lambda s: None)
    assert summary.status == "succeeded"
    assert stripe_api.refund_creates == 1
    (sent,) = ledger.all(AlertSent)
    assert sent.channels["log"] == "ok"
    assert sent.channels["slack"].startswith("error") and sent.channels["email"].startswith("error")
    assert "alert channel slack failed" in caplog.text and "alert channel email failed" in caplog.text


def test_alerter_sends_a_key_once_even_when_asked_twice(mock, smtp, settings, session_factory) -> None:  # type: ignore[no-untyped-def]
    inbox, port = smtp
    slack = mock.post(SLACK, body="ok")
    alerter = Alerter(_alert_settings(settings, port), session_factory)
    alert = Alert("case-opened:1", "Case 1", "body")
    assert alerter.send(alert) is True
    assert alerter.send(alert) is False
    assert slack.call_count == 1 and len(inbox.messages) == 1
