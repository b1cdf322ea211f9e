"""POST /orders/<id>/pay after the order's amount changed (POST /api/orders): the live
PaymentIntent is updated in place or canceled for attempt n + 1, never handed out at its
old amount, never two live. Against the Stripe double (the real SDK over real sockets)."""

from __future__ import annotations

import time

import pytest

from domain.payments import service as payments_service
from models import Order, PaymentIntent
from tests import stripe_payloads as p
from tests.integration.test_pay_endpoint import AUTH, attempts, make_app, new_order, pay, pay_client  # noqa: F401


def change_order(client, order_id: str, amount: int, currency: str = "usd") -> None:  # type: ignore[no-untyped-def]
    response = client.post("/api/orders", json={"id": order_id, "amount": amount, "currency": currency}, headers=AUTH)
    assert response.status_code in (200, 201), response.get_json()


def live_intents(double, order_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return [i for i in double.intents.values()
            if i["metadata"].get("order_id") == order_id and i["status"] not in ("canceled", "succeeded")]


def test_new_amount_updates_the_payment_intent_in_place(pay_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_amt_up", 4999)
    first = pay(pay_client, "ord_amt_up").get_json()
    change_order(pay_client, "ord_amt_up", 6500)

    response = pay(pay_client, "ord_amt_up")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["id"], body["client_secret"], body["amount"], body["currency"], body["attempt"], body["created"]) == (
        first["id"], first["client_secret"], 6500, "usd", 1, False)
    assert stripe_double.intents[first["id"]]["amount"] == 6500
    assert stripe_double.count("POST", f"/v1/payment_intents/{first['id']}") == 1
    assert "order-ord_amt_up-pi-1-amount-6500-1" in stripe_double.keys
    [attempt] = attempts(ledger, "ord_amt_up")
    assert (attempt.status, attempt.amount, attempt.change_key, attempt.change_count) == ("created", 6500, None, 1)
    assert ledger.get(PaymentIntent, first["id"]).amount == 6500
    assert stripe_double.creates == 1

    # Asked again: the recorded amount is the order's; Stripe is not called.
    calls = len(stripe_double.requests)
    again = pay(pay_client, "ord_amt_up")
    assert again.status_code == 200 and again.get_json() == body
    assert len(stripe_double.requests) == calls


def test_amount_changed_back_and_forth_gets_a_new_key_each_time(pay_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_amt_abab", 1000)
    intent_id = pay(pay_client, "ord_amt_abab").get_json()["id"]
    for amount in (2000, 1000, 2000):
        change_order(pay_client, "ord_amt_abab", amount)
        body = pay(pay_client, "ord_amt_abab").get_json()
        assert (body["id"], body["amount"]) == (intent_id, amount)
        # Stripe really holds it: a reused key would have replayed an old answer instead.
        assert stripe_double.intents[intent_id]["amount"] == amount
    assert {k for k in stripe_double.keys if "-amount-" in k} == {
        "order-ord_amt_abab-pi-1-amount-2000-1", "order-ord_amt_abab-pi-1-amount-1000-2", "order-ord_amt_abab-pi-1-amount-2000-3"}


def test_new_currency_cancels_the_payment_intent_and_creates_attempt_2(pay_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_amt_cur", 4999, "usd")
    first = pay(pay_client, "ord_amt_cur").get_json()
    change_order(pay_client, "ord_amt_cur", 4500, "eur")

    response = pay(pay_client, "ord_amt_cur")
    assert response.status_code == 201, response.get_json()
    second = response.get_json()
    assert second["id"] != first["id"]
    assert (second["amount"], second["currency"], second["attempt"], second["created"]) == (4500, "eur", 2, True)
    old = stripe_double.intents[first["id"]]
    assert (old["status"], old["cancellation_reason"]) == ("canceled", "abandoned")
    assert "order-ord_amt_cur-pi-1-cancel-1" in stripe_double.keys
    assert stripe_double.intents[second["id"]]["metadata"] == {"order_id": "ord_amt_cur", "attempt": "2", "order_total": "4500"}
    assert [(a.attempt, a.status, a.amount, a.currency) for a in attempts(ledger, "ord_amt_cur")] == [
        (1, "canceled", 4999, "usd"), (2, "created", 4500, "eur")]
    assert ledger.get(PaymentIntent, first["id"]).status == "canceled"
    assert ledger.get(Order, "ord_amt_cur").payment_intent_id == second["id"]
    assert [i["id"] for i in live_intents(stripe_double, "ord_amt_cur")] == [second["id"]]
    # Asked again: attempt 2 as it is, no Stripe call.
    calls = len(stripe_double.requests)
    assert pay(pay_client, "ord_amt_cur").get_json() == {**second, "created": False}
    assert len(stripe_double.requests) == calls


def test_authorised_payment_intent_is_canceled_for_attempt_2(pay_client, stripe_double, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_amt_cap", 4999)
    first = pay(pay_client, "ord_amt_cap").get_json()
    stripe_double.set_status(first["id"], "requires_capture")  # authorised; no handled event says so
    change_order(pay_client, "ord_amt_cap", 5999)

    response = pay(pay_client, "ord_amt_cap")
    assert response.status_code == 201, response.get_json()
    second = response.get_json()
    assert (second["attempt"], second["amount"]) == (2, 5999)
    assert stripe_double.intents[first["id"]]["status"] == "canceled"
    # Stripe refused the amount update (requires_capture), the re-read told us why.
    assert stripe_double.keys["order-ord_amt_cap-pi-1-amount-5999-1"][1] == 400
    assert "order-ord_amt_cap-pi-1-cancel-2" in stripe_double.keys
    assert [a.status for a in attempts(ledger, "ord_amt_cap")] == ["canceled", "created"]
    assert [i["id"] for i in live_intents(stripe_double, "ord_amt_cap")] == [second["id"]]


def test_requires_capture_known_to_the_ledger_is_canceled_without_trying_an_update(pay_client, stripe_double, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_amt_cap2", 4999)
    first = pay(pay_client, "ord_amt_cap2").get_json()
    stripe_double.set_status(first["id"], "requires_capture")
    # The ledger learns it from the endpoint's own re-read of stale knowledge.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(payments_service, "STATUS_FRESH_SECONDS", 0.0)
        assert pay(pay_client, "ord_amt_cap2").get_json()["status"] == "requires_capture"
    change_order(pay_client, "ord_amt_cap2", 5999)
    response = pay(pay_client, "ord_amt_cap2")
    assert response.status_code == 201 and response.get_json()["attempt"] == 2
    assert not any("-amount-" in k for k in stripe_double.keys)
    assert "order-ord_amt_cap2-pi-1-cancel-1" in stripe_double.keys


def test_processing_payment_intent_is_409_and_nothing_changes(pay_client, stripe_double, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_amt_proc", 4999)
    first = pay(pay_client, "ord_amt_proc").get_json()
    stripe_double.set_status(first["id"], "processing")  # no webhook yet: the ledger says requires_payment_method
    change_order(pay_client, "ord_amt_proc", 6000)

    response = pay(pay_client, "ord_amt_proc")
    assert response.status_code == 409, response.get_json()
    assert response.get_json()["error"] == "payment_in_progress"
    assert response.get_json()["payment_intent_id"] == first["id"]
    assert response.headers["Retry-After"] == "5"
    assert stripe_double.intents[first["id"]]["amount"] == 4999 and stripe_double.creates == 1
    [attempt] = attempts(ledger, "ord_amt_proc")
    assert (attempt.status, attempt.amount, attempt.change_key) == ("created", 4999, None)
    assert ledger.get(PaymentIntent, first["id"]).status == "processing"

    # Known to be processing now: 409 again without calling Stripe.
    calls = len(stripe_double.requests)
    assert pay(pay_client, "ord_amt_proc").status_code == 409
    assert len(stripe_double.requests) == calls


def test_stripe_failure_on_update_is_503_and_the_retry_sends_the_same_key(pay_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_amt_500", 4999)
    first = pay(pay_client, "ord_amt_500").get_json()
    change_order(pay_client, "ord_amt_500", 7000)
    stripe_double.fail_next("error", on="update", status=500, store=False)

    response = pay(pay_client, "ord_amt_500")
    assert (response.status_code, response.get_json()["error"]) == (503, "stripe_unavailable")
    [attempt] = attempts(ledger, "ord_amt_500")
    assert (attempt.status, attempt.amount, attempt.change_key, attempt.change_claimed_at) == (
        "created", 4999, "order-ord_amt_500-pi-1-amount-7000-1", None)

    retry = pay(pay_client, "ord_amt_500")
    assert retry.status_code == 200 and (retry.get_json()["id"], retry.get_json()["amount"]) == (first["id"], 7000)
    assert stripe_double.count("POST", f"/v1/payment_intents/{first['id']}") == 2  # the same key twice
    assert stripe_double.intents[first["id"]]["amount"] == 7000
    assert [(a.status, a.amount, a.change_key) for a in attempts(ledger, "ord_amt_500")] == [("created", 7000, None)]


def test_unknown_cancel_outcome_is_503_until_settled_and_never_two_live(pay_client, stripe_double, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_amt_cwh", 4999, "usd")
    first = pay(pay_client, "ord_amt_cwh").get_json()
    change_order(pay_client, "ord_amt_cwh", 4999, "gbp")
    stripe_double.fail_next("change_then_error", on="cancel", status=500)  # canceled, then a 500 Stripe replays

    response = pay(pay_client, "ord_amt_cwh")
    assert (response.status_code, response.get_json()["error"]) == (503, "stripe_unavailable")
    assert stripe_double.intents[first["id"]]["status"] == "canceled"
    assert [(a.status, a.change_key) for a in attempts(ledger, "ord_amt_cwh")] == [("created", "order-ord_amt_cwh-pi-1-cancel-1")]
    # The same cancel key replays the 500: still 503, and no attempt 2 while unknown.
    assert pay(pay_client, "ord_amt_cwh").status_code == 503
    assert stripe_double.creates == 1 and stripe_double.count("POST", f"/v1/payment_intents/{first['id']}/cancel") == 2

    # Stripe's own event settles it; then attempt 2 in the new currency.
    canceled = stripe_double.intents[first["id"]]
    assert deliver(p.event("payment_intent.canceled", canceled, created=int(time.time()) + 1)).status_code == 200
    response = pay(pay_client, "ord_amt_cwh")
    assert response.status_code == 201, response.get_json()
    assert (response.get_json()["attempt"], response.get_json()["currency"]) == (2, "gbp")
    assert [a.status for a in attempts(ledger, "ord_amt_cwh")] == ["canceled", "created"]
    assert len(live_intents(stripe_double, "ord_amt_cwh")) == 1
