"""POST /orders/<id>/pay against the Stripe double (the real SDK over real sockets), on
SQLite and PostgreSQL: outcomes, Stripe failures, crashes, webhooks, bad input."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import stripe
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from app import create_app
from domain.payments import service as payments_service
from models import Order, PaymentIntent, utcnow
from models.payments import IdempotencyRecord, PaymentAttempt
from tests import stripe_payloads as p
from tests.conftest import API_TOKEN
from tests.stripe_fake import card_declined

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture
def make_app(settings, session_factory, stripe_double):  # type: ignore[no-untyped-def]
    def _make(*, timeout: float = 10.0, retries: int = 0, **overrides):  # type: ignore[no-untyped-def]
        app = create_app(
            settings.with_overrides(**{"pay_wait_seconds": 2.0, "stripe_max_network_retries": retries, **overrides}),
            session_factory=session_factory,
            stripe=stripe_double.client(timeout=timeout, max_network_retries=retries),
        )
        app.config["TESTING"] = True
        return app

    return _make


@pytest.fixture
def pay_client(make_app):  # type: ignore[no-untyped-def]
    return make_app().test_client()


def new_order(client, order_id: str, amount: int = 4999, currency: str = "usd") -> None:  # type: ignore[no-untyped-def]
    response = client.post("/api/orders", json={"id": order_id, "amount": amount, "currency": currency}, headers=AUTH)
    assert response.status_code == 201, response.get_json()


def pay(client, order_id: str, body=None, headers=None):  # type: ignore[no-untyped-def]
    return client.post(f"/orders/{order_id}/pay", json=body, headers={**AUTH, **(headers or {})})


def attempts(ledger, order_id: str) -> list[PaymentAttempt]:  # type: ignore[no-untyped-def]
    return sorted(ledger.all(PaymentAttempt, PaymentAttempt.order_id == order_id), key=lambda a: a.attempt)


def age_attempt(session_factory, order_id: str, attempt: int, *, created: timedelta, claimed: timedelta, **values) -> None:  # type: ignore[no-untyped-def]
    now = utcnow()
    with session_factory() as session, session.begin():
        session.execute(
            update(PaymentAttempt)
            .where(PaymentAttempt.order_id == order_id, PaymentAttempt.attempt == attempt)
            .values(created_at=now - created, updated_at=now - claimed, **values)
        )


def leave_creating(session_factory, order_id: str, *, created: timedelta, claimed: timedelta, amount: int = 4999) -> None:  # type: ignore[no-untyped-def]
    """What a process that crashed in phase 2 leaves behind."""
    now = utcnow()
    with session_factory() as session, session.begin():
        session.add(
            PaymentAttempt(
                order_id=order_id, attempt=1, idempotency_key=f"order-{order_id}-pi-1", status="creating",
                amount=amount, currency="usd", calls=1, created_at=now - created, updated_at=now - claimed,
            )
        )


# -- the happy path ----------------------------------------------------------------------


def test_first_request_creates_the_payment_intent_with_our_key_and_metadata(pay_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_pay_1", 4999, "eur")
    response = pay(pay_client, "ord_pay_1", {"payment_method": "pm_card_visa", "customer": "cus_Abc123"})
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    intent = stripe_double.intents[body["id"]]
    assert body == {
        "id": intent["id"], "client_secret": intent["client_secret"], "status": "requires_payment_method",
        "amount": 4999, "currency": "eur", "order_id": "ord_pay_1", "attempt": 1, "created": True,
    }
    assert stripe_double.keys.keys() == {"order-ord_pay_1-pi-1"}
    assert intent["metadata"] == {"order_id": "ord_pay_1", "attempt": "1", "order_total": "4999"}
    assert (intent["amount"], intent["currency"], intent["customer"]) == (4999, "eur", "cus_Abc123")
    [attempt] = attempts(ledger, "ord_pay_1")
    assert (attempt.status, attempt.payment_intent_id, attempt.idempotency_key) == ("created", intent["id"], "order-ord_pay_1-pi-1")
    assert ledger.get(Order, "ord_pay_1").payment_intent_id == intent["id"]
    assert ledger.get(PaymentIntent, intent["id"]).order_id == "ord_pay_1"


def test_next_request_returns_the_same_payment_intent_without_calling_stripe(pay_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_pay_2")
    first = pay(pay_client, "ord_pay_2").get_json()
    second = pay(pay_client, "ord_pay_2")
    assert second.status_code == 200
    assert second.get_json() == {**first, "created": False}
    assert stripe_double.creates == 1 and stripe_double.create_requests == 1


def test_concurrent_requests_in_one_process_create_one_payment_intent(make_app, stripe_double) -> None:  # type: ignore[no-untyped-def]
    stripe_double.delay = 0.2
    app = make_app()
    new_order(app.test_client(), "ord_pay_threads")
    barrier = threading.Barrier(8)
    results: list[tuple[int, dict]] = []

    def worker() -> None:
        client = app.test_client()
        barrier.wait()
        response = pay(client, "ord_pay_threads")
        results.append((response.status_code, response.get_json()))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stripe_double.creates == 1
    ids = {body["id"] for status, body in results if status in (200, 201)}
    assert len(ids) == 1 and sorted(s for s, _ in results).count(201) == 1, results
    assert all(s in (200, 201) or body["error"] == "payment_in_progress" for s, body in results)


# -- AC3: paid, declined, canceled ----------------------------------------------------------


def test_paid_order_is_409_and_stripe_is_not_called(pay_client, stripe_double, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_paid")
    intent = pay(pay_client, "ord_paid").get_json()
    succeeded = dict(stripe_double.intents[intent["id"]], status="succeeded", latest_charge=p.new_id("ch"))
    assert deliver(p.event("payment_intent.succeeded", succeeded)).status_code == 200
    assert ledger.get(Order, "ord_paid").status == "paid"
    assert attempts(ledger, "ord_paid")[0].status == "succeeded"

    calls = len(stripe_double.requests)
    response = pay(pay_client, "ord_paid")
    assert response.status_code == 409
    assert response.get_json()["error"] == "order_already_paid"
    assert len(stripe_double.requests) == calls


def test_order_paid_by_a_charge_made_elsewhere_is_409_without_stripe(pay_client, stripe_double, deliver) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_paid_elsewhere")
    deliver(p.event("charge.succeeded", p.charge(amount=4999, metadata={"order_id": "ord_paid_elsewhere"})))
    response = pay(pay_client, "ord_paid_elsewhere")
    assert (response.status_code, response.get_json()["error"]) == (409, "order_already_paid")
    assert stripe_double.requests == []


def test_declined_payment_intent_is_returned_again(pay_client, stripe_double, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_declined")
    first = pay(pay_client, "ord_declined").get_json()
    declined = dict(
        stripe_double.intents[first["id"]], status="requires_payment_method",
        last_payment_error={"type": "card_error", "code": "card_declined", "message": "Your card was declined."},
    )
    deliver(p.event("payment_intent.payment_failed", declined, created=int(time.time()) + 1))
    response = pay(pay_client, "ord_declined")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["id"], body["status"], body["created"], body["client_secret"]) == (first["id"], "requires_payment_method", False, first["client_secret"])
    assert stripe_double.creates == 1
    assert [a.status for a in attempts(ledger, "ord_declined")] == ["created"]


def test_canceled_payment_intent_gets_a_new_one_with_attempt_2(pay_client, stripe_double, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_canceled")
    first = pay(pay_client, "ord_canceled").get_json()
    canceled = dict(stripe_double.intents[first["id"]], status="canceled", cancellation_reason="abandoned")
    deliver(p.event("payment_intent.canceled", canceled, created=int(time.time()) + 1))
    assert attempts(ledger, "ord_canceled")[0].status == "canceled"

    response = pay(pay_client, "ord_canceled")
    assert response.status_code == 201
    second = response.get_json()
    assert second["id"] != first["id"] and second["attempt"] == 2 and second["created"] is True
    assert stripe_double.intents[second["id"]]["metadata"]["attempt"] == "2"
    assert "order-ord_canceled-pi-2" in stripe_double.keys
    assert [(a.attempt, a.status) for a in attempts(ledger, "ord_canceled")] == [(1, "canceled"), (2, "created")]
    assert ledger.get(Order, "ord_canceled").payment_intent_id == second["id"]


def test_cancel_whose_webhook_is_lost_is_confirmed_by_retrieving_it(pay_client, stripe_double, ledger, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_cancel_quiet")
    first = pay(pay_client, "ord_cancel_quiet").get_json()
    stripe_double.set_status(first["id"], "canceled")  # canceled at Stripe, no webhook
    monkeypatch.setattr(payments_service, "STATUS_FRESH_SECONDS", 0.0)
    response = pay(pay_client, "ord_cancel_quiet")
    assert response.status_code == 201 and response.get_json()["attempt"] == 2
    assert stripe_double.count("GET", f"/v1/payment_intents/{first['id']}") == 1
    assert [a.status for a in attempts(ledger, "ord_cancel_quiet")] == ["canceled", "created"]


def test_fresh_knowledge_is_not_reread_from_stripe(pay_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_fresh")
    pay(pay_client, "ord_fresh")
    pay(pay_client, "ord_fresh")
    assert stripe_double.count("GET", "/v1/payment_intents") == 0


# -- an attempt in flight ---------------------------------------------------------------------


def test_attempt_in_flight_is_waited_for_then_409(make_app, session_factory, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    client = make_app(pay_wait_seconds=0.3).test_client()
    new_order(client, "ord_inflight")
    leave_creating(session_factory, "ord_inflight", created=timedelta(0), claimed=timedelta(0))
    started = time.monotonic()
    response = pay(client, "ord_inflight")
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 409
    assert response.get_json()["error"] == "payment_in_progress"
    assert response.headers["Retry-After"] == "1"
    assert stripe_double.requests == []


# -- AC5: Stripe errors leave no half-state ----------------------------------------------------


def test_card_error_fails_the_attempt_and_the_next_request_starts_attempt_2(pay_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_card")
    stripe_double.fail_next("error", status=402, error=card_declined())
    response = pay(pay_client, "ord_card", {"payment_method": "pm_card_chargeDeclined"})
    assert response.status_code == 402
    assert response.get_json()["error"] == "payment_method_declined"
    assert response.get_json()["stripe_code"] == "card_declined"
    [failed] = attempts(ledger, "ord_card")
    assert failed.status == "failed" and failed.payment_intent_id is None

    retry = pay(pay_client, "ord_card", {"payment_method": "pm_card_visa"})
    assert retry.status_code == 201 and retry.get_json()["attempt"] == 2
    assert stripe_double.creates == 1
    assert [a.status for a in attempts(ledger, "ord_card")] == ["failed", "created"]


def test_invalid_request_error_is_422_and_leaves_no_live_attempt(pay_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_invalid")
    stripe_double.fail_next("error", status=400, error={"type": "invalid_request_error", "code": "resource_missing", "message": "No such customer: 'cus_Gone'"})
    response = pay(pay_client, "ord_invalid", {"customer": "cus_Gone"})
    assert (response.status_code, response.get_json()["error"]) == (422, "stripe_rejected")
    assert pay(pay_client, "ord_invalid").status_code == 201
    assert stripe_double.creates == 1


def test_500_then_the_next_request_retries_the_same_key(pay_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_500")
    stripe_double.fail_next("error", status=500, store=False)
    response = pay(pay_client, "ord_500")
    assert (response.status_code, response.get_json()["error"]) == (503, "stripe_unavailable")
    assert attempts(ledger, "ord_500")[0].status == "unknown"

    retry = pay(pay_client, "ord_500")
    assert retry.status_code == 201 and retry.get_json()["attempt"] == 1
    assert stripe_double.creates == 1
    assert stripe_double.count("POST", "/v1/payment_intents") == 2  # the same key twice
    assert [a.status for a in attempts(ledger, "ord_500")] == ["created"]


def test_500_after_stripe_created_it_is_resolved_by_the_look_up(pay_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_500_created")
    stripe_double.fail_next("create_then_error", status=500)  # Stripe replays this 500 for the key
    assert pay(pay_client, "ord_500_created").status_code == 503
    [made] = stripe_double.intents.values()

    retry = pay(pay_client, "ord_500_created")
    assert retry.status_code == 201
    assert retry.get_json()["id"] == made["id"]
    assert stripe_double.creates == 1
    assert stripe_double.count("GET", "/v1/payment_intents") == 1  # the look-up
    assert [a.status for a in attempts(ledger, "ord_500_created")] == ["created"]


def test_replayed_500_and_nothing_at_stripe_stays_unknown_until_the_call_is_long_over(pay_client, stripe_double, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_500_none")
    stripe_double.fail_next("error", status=500)  # stored: the key replays it
    assert pay(pay_client, "ord_500_none").status_code == 503
    # Just after: Stripe shows nothing, but our first call might still be in flight.
    assert pay(pay_client, "ord_500_none").status_code == 503
    assert stripe_double.creates == 0
    assert [a.status for a in attempts(ledger, "ord_500_none")] == ["unknown"]
    # Long after the last call: the look-up is conclusive, attempt 2 goes ahead.
    age_attempt(session_factory, "ord_500_none", 1, created=timedelta(minutes=10), claimed=timedelta(minutes=10))
    response = pay(pay_client, "ord_500_none")
    assert response.status_code == 201 and response.get_json()["attempt"] == 2
    assert stripe_double.creates == 1
    assert [a.status for a in attempts(ledger, "ord_500_none")] == ["failed", "created"]


def test_timeout_then_the_next_request_gets_the_payment_intent_stripe_made(make_app, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    client = make_app(timeout=0.3).test_client()
    new_order(client, "ord_timeout")
    stripe_double.fail_next("slow", seconds=0.8)
    response = pay(client, "ord_timeout")
    assert (response.status_code, response.get_json()["error"]) == (503, "stripe_unavailable")
    assert attempts(ledger, "ord_timeout")[0].status == "unknown"
    deadline = time.monotonic() + 5
    while stripe_double.creates == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # Stripe finishes the request we gave up on
    time.sleep(0.1)

    retry = pay(client, "ord_timeout")
    assert retry.status_code == 201
    assert retry.get_json()["id"] in stripe_double.intents
    assert stripe_double.creates == 1


def test_crash_within_24h_is_resolved_with_the_same_key(pay_client, session_factory, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_crash")
    # The crashed process had reached Stripe: the key holds a PaymentIntent.
    made = stripe_double.client().v1.payment_intents.create(
        params={"amount": 4999, "currency": "usd", "metadata": {"order_id": "ord_crash", "attempt": "1", "order_total": "4999"}},
        options={"idempotency_key": "order-ord_crash-pi-1"},
    )
    leave_creating(session_factory, "ord_crash", created=timedelta(minutes=1), claimed=timedelta(minutes=1))
    response = pay(pay_client, "ord_crash")
    assert response.status_code == 201 and response.get_json()["id"] == made.id
    assert stripe_double.creates == 1
    assert [(a.status, a.payment_intent_id, a.calls) for a in attempts(ledger, "ord_crash")] == [("created", made.id, 2)]


def test_crash_beyond_24h_is_resolved_by_the_look_up_without_a_create(pay_client, session_factory, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_old_crash")
    made = stripe_double.add_intent(
        amount=4999, metadata={"order_id": "ord_old_crash", "attempt": "1"}, created=int(time.time()) - 25 * 3600 + 5
    )
    stripe_double.add_intent(amount=4999, metadata={"order_id": "ord_other", "attempt": "1"})
    leave_creating(session_factory, "ord_old_crash", created=timedelta(hours=25), claimed=timedelta(hours=25))
    response = pay(pay_client, "ord_old_crash")
    assert response.status_code == 201 and response.get_json()["id"] == made["id"]
    assert stripe_double.create_requests == 0
    assert attempts(ledger, "ord_old_crash")[0].status == "created"


def test_crash_beyond_24h_with_nothing_at_stripe_looks_up_first_then_starts_attempt_2(pay_client, session_factory, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_old_nothing")
    leave_creating(session_factory, "ord_old_nothing", created=timedelta(hours=25), claimed=timedelta(hours=25))
    response = pay(pay_client, "ord_old_nothing")
    assert response.status_code == 201 and response.get_json()["attempt"] == 2
    assert [m for m, _ in stripe_double.requests] == ["GET", "POST"]  # look-up, then create
    assert [a.status for a in attempts(ledger, "ord_old_nothing")] == ["failed", "created"]


def test_stripe_down_during_resolution_keeps_the_attempt_unknown(settings, session_factory, pay_client, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_down")
    leave_creating(session_factory, "ord_down", created=timedelta(hours=25), claimed=timedelta(hours=25))
    # Nothing listens on 127.0.0.1:9: every call is a connection error.
    unreachable = stripe.StripeClient(
        "sk_test_unit", base_addresses={"api": "http://127.0.0.1:9"},
        http_client=stripe.RequestsClient(timeout=1), max_network_retries=0,
    )
    client = create_app(settings.with_overrides(stripe_max_network_retries=0), session_factory=session_factory, stripe=unreachable).test_client()
    response = pay(client, "ord_down")
    assert (response.status_code, response.get_json()["error"]) == (503, "stripe_unavailable")
    assert [a.status for a in attempts(ledger, "ord_down")] == ["unknown"]


# -- webhooks ------------------------------------------------------------------------------------


def test_succeeded_webhook_before_phase_3_still_settles_the_attempt(pay_client, stripe_double, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_early_event")
    first = pay(pay_client, "ord_early_event").get_json()
    deliver(p.event("payment_intent.succeeded", dict(stripe_double.intents[first["id"]], status="succeeded"), created=int(time.time()) + 2))
    assert attempts(ledger, "ord_early_event")[0].status == "succeeded"
    assert pay(pay_client, "ord_early_event").status_code == 409


# -- the constraint behind it all ---------------------------------------------------------------


def test_schema_allows_one_live_attempt_per_order(pay_client, session_factory) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_schema")

    def add(n: int, status: str) -> None:
        with session_factory() as session, session.begin():
            session.add(PaymentAttempt(order_id="ord_schema", attempt=n, idempotency_key=f"order-ord_schema-pi-{n}",
                                       status=status, amount=1, currency="usd", calls=1))

    add(1, "canceled")
    add(2, "failed")
    add(3, "created")
    for status in ("creating", "unknown", "created", "succeeded"):
        with pytest.raises(IntegrityError):
            add(4, status)
    add(4, "canceled")


# -- errors: auth, order, bad input -------------------------------------------------------------


def test_unknown_order_is_404(pay_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    for order_id in ("ord_nope", "bad%00id", "-dash-first"):
        response = pay(pay_client, order_id)
        assert (response.status_code, response.get_json()["error"]) == (404, "order_not_found")
    assert stripe_double.requests == []


def test_order_without_amount_is_422(pay_client, deliver, stripe_double) -> None:  # type: ignore[no-untyped-def]
    deliver(p.event("charge.failed", p.charge(status="failed", metadata={"order_id": "ord_no_amount"})))
    response = pay(pay_client, "ord_no_amount")
    assert (response.status_code, response.get_json()["error"]) == (422, "order_amount_unknown")
    assert stripe_double.requests == []


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": API_TOKEN}])
def test_missing_or_wrong_token_is_401(make_app, headers, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    client = make_app().test_client()
    new_order(client, "ord_auth")
    response = client.post("/orders/ord_auth/pay", headers=headers)
    assert (response.status_code, response.get_json()["error"]) == (401, "unauthorized")
    assert stripe_double.requests == [] and attempts(ledger, "ord_auth") == []


BAD_BODIES = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b'"pm_card_visa"', 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    (b"[" * 50_000, 400, "invalid_json"),
    (b'{"customer": "' + b"x" * 70_000 + b'"}', 413, "payload_too_large"),
    (b'{"payment_method": 42}', 400, "invalid_payment_method"),
    (b'{"payment_method": "tok_visa"}', 400, "invalid_payment_method"),
    (b'{"payment_method": "pm_\\u0000x"}', 400, "invalid_payment_method"),
    (b'{"customer": ["cus_1"]}', 400, "invalid_customer"),
    (b'{"customer": "bob@example.com"}', 400, "invalid_customer"),
    (b'{"customer": "cus_' + b"a" * 300 + b'"}', 400, "invalid_customer"),
    (b'{"amount": 1}', 400, "unknown_field"),
]


@pytest.mark.parametrize("raw, status, code", BAD_BODIES)
def test_bad_body_is_a_4xx_json_error_and_changes_nothing(pay_client, stripe_double, ledger, raw, status, code) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_bad_body")
    response = pay_client.post("/orders/ord_bad_body/pay", data=raw, headers={**AUTH, "Content-Type": "application/json", "Idempotency-Key": "k-bad"})
    assert (response.status_code, response.get_json()["error"]) == (status, code)
    assert stripe_double.requests == [] and attempts(ledger, "ord_bad_body") == []
    assert ledger.count(IdempotencyRecord) == 0


@pytest.mark.parametrize("key", ["", " ", "k" * 256, "caf\u00e9", "tab\there"])
def test_bad_idempotency_key_is_400_and_changes_nothing(pay_client, stripe_double, ledger, key) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_bad_key")
    response = pay_client.post("/orders/ord_bad_key/pay", headers={**AUTH, "Idempotency-Key": key})
    assert (response.status_code, response.get_json()["error"]) == (400, "invalid_idempotency_key")
    assert stripe_double.requests == [] and attempts(ledger, "ord_bad_key") == []
    assert ledger.count(IdempotencyRecord) == 0


def test_empty_body_and_empty_object_are_the_same_request(pay_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_empty")
    first = pay_client.post("/orders/ord_empty/pay", headers={**AUTH, "Idempotency-Key": "k-empty"})
    second = pay_client.post("/orders/ord_empty/pay", json={}, headers={**AUTH, "Idempotency-Key": "k-empty"})
    assert first.status_code == second.status_code == 201
    assert second.headers.get("Idempotent-Replayed") == "true"


def test_a_race_caught_by_the_constraints_is_decided_again_not_a_500(pay_client, stripe_double, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_constraint_race")
    original = payments_service.PaymentService._decide
    raised: list[bool] = []

    def lose_once(self, session, request):  # type: ignore[no-untyped-def]
        if not raised:
            raised.append(True)
            raise IntegrityError("INSERT INTO payment_attempts", {}, Exception("unique violation"))
        return original(self, session, request)

    monkeypatch.setattr(payments_service.PaymentService, "_decide", lose_once)
    response = pay(pay_client, "ord_constraint_race")
    assert response.status_code == 201 and raised == [True]
    assert stripe_double.creates == 1


# -- PaymentIntents in API versions before 2019-02-11 --------------------------------------------


def test_pre_2019_requires_source_from_stripe_is_requires_payment_method(pay_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    stripe_double.api_version = p.PRE_2019_API_VERSION  # answers with requires_source & co.
    new_order(pay_client, "ord_pre_2019")
    response = pay(pay_client, "ord_pre_2019")
    assert response.status_code == 201, response.get_data(as_text=True)
    first = response.get_json()
    assert stripe_double.intents[first["id"]]["status"] == "requires_source"
    assert first["status"] == "requires_payment_method"
    assert ledger.get(PaymentIntent, first["id"]).status == "requires_payment_method"
    assert [a.status for a in attempts(ledger, "ord_pre_2019")] == ["created"]

    assert stripe_double.creates == 1


def test_pre_2019_requires_source_action_found_at_stripe_is_requires_action(pay_client, session_factory, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    stripe_double.api_version = p.PRE_2019_API_VERSION
    new_order(pay_client, "ord_pre_2019_action")
    # A crashed attempt whose PaymentIntent Stripe made, now waiting for 3-D Secure.
    made = stripe_double.add_intent(amount=4999, status="requires_source_action",
                                    metadata={"order_id": "ord_pre_2019_action", "attempt": "1"})
    assert made["status"] == "requires_source_action"
    leave_creating(session_factory, "ord_pre_2019_action", created=timedelta(hours=25), claimed=timedelta(hours=25))
    response = pay(pay_client, "ord_pre_2019_action")
    assert response.status_code == 201, response.get_data(as_text=True)
    assert (response.get_json()["id"], response.get_json()["status"]) == (made["id"], "requires_action")
    assert ledger.get(PaymentIntent, made["id"]).status == "requires_action"
    assert attempts(ledger, "ord_pre_2019_action")[0].status == "created"
