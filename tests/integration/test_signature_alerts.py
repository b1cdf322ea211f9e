"""Many signature failures in a short time raise one alert (per window, across workers);
other bad input does not count."""

from __future__ import annotations

from app import create_app
from domain.alerts import Alert
from app.services.signature_watch import SignatureFailureWatch
from models import AlertSent
from tests import stripe_payloads as p


def test_a_burst_of_bad_signatures_alerts_once(settings, session_factory, ledger, caplog) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings.with_overrides(signature_alert_threshold=5, signature_alert_window_seconds=300), session_factory=session_factory)
    client = app.test_client()
    body = p.encode(p.event("charge.succeeded", p.charge()))
    watch = app.extensions["reconciler"].signature_watch
    for _ in range(4):
        assert client.post("/webhooks/stripe", data=body, headers={"Stripe-Signature": p.sign(body, "whsec_wrong_secret_0123456789")}).status_code == 400
    assert watch.last_alert is None  # below the threshold
    # bad JSON with a valid signature is not a signature failure
    assert client.post("/webhooks/stripe", data=b"{", headers={"Stripe-Signature": p.sign(b"{", "whsec_test_primary_0123456789abcdef")}).status_code == 400
    assert watch.last_alert is None
    for _ in range(10):
        client.post("/webhooks/stripe", data=body)  # missing header
    assert watch.last_alert is not None
    watch.last_alert.join(5)
    (sent,) = ledger.all(AlertSent)
    assert sent.key.startswith("signature-failures:") and "signature failures" in sent.subject
    assert "webhook signature failures" in caplog.text and "missing_signature x" in caplog.text


def test_the_window_key_makes_several_workers_send_one_alert() -> None:
    sent: list[str] = []
    claimed: set[str] = set()

    def send(alert: Alert) -> bool:  # what the alerts_sent claim does
        if alert.key in claimed:
            return False
        claimed.add(alert.key)
        sent.append(alert.key)
        return True

    now = [1_000_000.0]
    workers = [SignatureFailureWatch(send, threshold=3, window_seconds=60, clock=lambda: now[0]) for _ in range(2)]
    for worker in workers:
        for _ in range(3):
            worker.record("signature_mismatch")
        worker.last_alert.join(5)  # type: ignore[union-attr]
    assert len(sent) == 1
    now[0] += 120  # a later window alerts again
    for _ in range(3):
        workers[0].record("timestamp_outside_tolerance")
    workers[0].last_alert.join(5)  # type: ignore[union-attr]
    assert len(sent) == 2
    workers[1].record("invalid_json")  # not a signature code
