"""PaymentIntent client_secrets are never stored in clear: the attempt keeps them sealed
with a key derived from SECRET_KEY, a stored Idempotency-Key reply keeps them sealed too,
and answers (replays included) still carry the secret, read again from Stripe when the
key changed."""

from __future__ import annotations

from models.payments import IdempotencyRecord, PaymentAttempt
from tests.integration.test_pay_endpoint import make_app, new_order, pay, pay_client  # noqa: F401 (fixtures)


def _stored_text(ledger) -> str:  # type: ignore[no-untyped-def]
    (attempt,) = ledger.all(PaymentAttempt)
    records = ledger.all(IdempotencyRecord)
    return " ".join([str(attempt.client_secret_sealed)] + [str(r.response_body) for r in records])


def test_client_secret_is_sealed_in_attempts_and_replies(pay_client, ledger, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_sealed")
    first = pay(pay_client, "ord_sealed", headers={"Idempotency-Key": "k-sealed"})
    assert first.status_code == 201
    secret = first.get_json()["client_secret"]
    assert secret and "_secret_" in secret
    stored = _stored_text(ledger)
    assert secret not in stored and secret.split("_secret_")[1] not in stored
    (attempt,) = ledger.all(PaymentAttempt)
    assert attempt.client_secret_sealed.startswith("fernet:v1:")
    # Replays and later answers still give the checkout backend its secret.
    replay = pay(pay_client, "ord_sealed", headers={"Idempotency-Key": "k-sealed"})
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.get_json() == first.get_json()
    again = pay(pay_client, "ord_sealed")
    assert again.status_code == 200 and again.get_json()["client_secret"] == secret


def test_after_secret_key_changes_the_secret_is_read_again_from_stripe(make_app, ledger, stripe_double) -> None:  # type: ignore[no-untyped-def]
    before = make_app(secret_key="first-secret-key-0123456789abcdef").test_client()
    new_order(before, "ord_rotate")
    first = pay(before, "ord_rotate", headers={"Idempotency-Key": "k-rotate"}).get_json()
    after = make_app(secret_key="second-secret-key-0123456789abcdef").test_client()
    replay = pay(after, "ord_rotate", headers={"Idempotency-Key": "k-rotate"})
    assert replay.status_code == 201 and replay.get_json()["client_secret"] == first["client_secret"]
    again = pay(after, "ord_rotate")
    assert again.status_code == 200 and again.get_json()["client_secret"] == first["client_secret"]
    assert first["client_secret"] not in _stored_text(ledger)
