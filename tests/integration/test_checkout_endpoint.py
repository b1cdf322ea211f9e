"""POST /orders/<id>/checkout against the Stripe double (the real SDK over real sockets):
one open Checkout Session per order, handed out again, replaced only after Stripe expired
the old one, refused for a paid order, scoped, and strict about its body."""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from app import create_app
from models import utcnow
from models.payments import CheckoutAttempt
from tests.conftest import API_TOKEN

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
URLS = {"success_url": "https://shop.example/thanks?o=1", "cancel_url": "https://shop.example/cart"}


@pytest.fixture
def make_app(settings, session_factory, stripe_double):  # type: ignore[no-untyped-def]
    def _make(**overrides):  # type: ignore[no-untyped-def]
        app = create_app(
            settings.with_overrides(**{"pay_wait_seconds": 2.0, "checkout_success_url": "https://shop.example/done", "stripe_max_network_retries": 0, **overrides}),
            session_factory=session_factory,
            stripe=stripe_double.client(timeout=10.0, max_network_retries=0),
        )
        app.config["TESTING"] = True
        return app

    return _make


@pytest.fixture
def co_client(make_app):  # type: ignore[no-untyped-def]
    return make_app().test_client()


def new_order(client, order_id: str, amount: int = 4999, currency: str = "usd") -> None:  # type: ignore[no-untyped-def]
    response = client.post("/api/orders", json={"id": order_id, "amount": amount, "currency": currency}, headers=AUTH)
    assert response.status_code in (200, 201), response.get_json()


def checkout(client, order_id: str, body=None, headers=None):  # type: ignore[no-untyped-def]
    return client.post(f"/orders/{order_id}/checkout", json=body, headers={**AUTH, **(headers or {})})


def rows(ledger, order_id: str) -> list[CheckoutAttempt]:  # type: ignore[no-untyped-def]
    return sorted(ledger.all(CheckoutAttempt, CheckoutAttempt.order_id == order_id), key=lambda a: a.attempt)


def session_requests(double) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    with double.lock:
        return [(m, path) for m, path in double.requests if path.startswith("/v1/checkout/")]


def age(session_factory, order_id: str, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """Make what we know about the order's sessions ``seconds`` old (re-read from Stripe)."""
    with session_factory() as session, session.begin():
        session.execute(
            update(CheckoutAttempt).where(CheckoutAttempt.order_id == order_id)
            .values(updated_at=utcnow() - timedelta(seconds=seconds))
        )


# -- the happy path ----------------------------------------------------------------------


def test_first_request_creates_a_session_with_our_key_order_and_metadata(co_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_1", 4999, "eur")
    response = checkout(co_client, "ord_co_1", URLS)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    session = stripe_double.sessions[body["id"]]
    assert body["id"].startswith("cs_test_") and body["url"] == session["url"] and body["url"].startswith("https://checkout.stripe.com/")
    assert body == {
        "id": session["id"], "url": session["url"], "status": "open", "amount": 4999, "currency": "eur",
        "order_id": "ord_co_1", "attempt": 1, "expires_at": session["expires_at"], "created": True,
    }
    assert session["object"] == "checkout.session" and session["mode"] == "payment"
    assert (session["amount_total"], session["currency"], session["client_reference_id"]) == (4999, "eur", "ord_co_1")
    assert session["metadata"] == {"order_id": "ord_co_1", "attempt": "1", "order_total": "4999"}
    assert session["_pi_metadata"] == session["metadata"]  # payment_intent_data.metadata
    assert (session["success_url"], session["cancel_url"]) == (URLS["success_url"], URLS["cancel_url"])
    assert session["payment_intent"] is None and session["payment_status"] == "unpaid"
    assert "order-ord_co_1-cs-1" in stripe_double.keys
    [row] = rows(ledger, "ord_co_1")
    assert (row.status, row.session_id, row.idempotency_key, row.url) == ("open", session["id"], "order-ord_co_1-cs-1", session["url"])


def test_urls_come_from_the_settings_when_the_body_names_none(co_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_set")
    body = checkout(co_client, "ord_co_set").get_json()
    session = stripe_double.sessions[body["id"]]
    assert session["success_url"] == session["cancel_url"] == "https://shop.example/done"


def test_no_url_anywhere_is_a_422_and_reaches_no_stripe(make_app, stripe_double) -> None:  # type: ignore[no-untyped-def]
    client = make_app(checkout_success_url=None).test_client()
    new_order(client, "ord_co_nourl")
    response = checkout(client, "ord_co_nourl")
    assert response.status_code == 422 and response.get_json()["error"] == "checkout_urls_missing"
    assert session_requests(stripe_double) == []


def test_second_request_returns_the_same_url_without_calling_stripe(co_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_2")
    first = checkout(co_client, "ord_co_2").get_json()
    calls = len(session_requests(stripe_double))
    second = checkout(co_client, "ord_co_2")
    assert second.status_code == 200
    assert second.get_json() == {**first, "created": False}
    assert len(session_requests(stripe_double)) == calls == 1
    assert stripe_double.session_creates == 1


def test_a_session_known_a_while_ago_is_re_read_and_still_handed_out_when_open(co_client, stripe_double, session_factory) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_stale")
    first = checkout(co_client, "ord_co_stale").get_json()
    age(session_factory, "ord_co_stale", 60)
    again = checkout(co_client, "ord_co_stale")
    assert again.status_code == 200 and again.get_json()["url"] == first["url"]
    assert session_requests(stripe_double)[-1] == ("GET", f"/v1/checkout/sessions/{first['id']}")
    assert stripe_double.session_creates == 1


def test_concurrent_requests_in_one_process_create_one_session(make_app, stripe_double) -> None:  # type: ignore[no-untyped-def]
    stripe_double.delay = 0.2
    app = make_app()
    new_order(app.test_client(), "ord_co_threads")
    barrier = threading.Barrier(8)
    results: list[tuple[int, dict]] = []

    def worker() -> None:
        client = app.test_client()
        barrier.wait()
        response = checkout(client, "ord_co_threads")
        results.append((response.status_code, response.get_json()))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stripe_double.session_creates == 1
    [session_id] = list(stripe_double.sessions)
    assert [s for s, _ in results].count(201) == 1
    assert all((s in (200, 201) and b["id"] == session_id) or (s == 409 and b["error"] == "payment_in_progress") for s, b in results), results


# -- paid orders ---------------------------------------------------------------------------


def test_a_paid_order_gets_409_and_reaches_no_stripe(co_client, stripe_double, session_factory) -> None:  # type: ignore[no-untyped-def]
    from models import Order

    new_order(co_client, "ord_co_paid")
    with session_factory() as session, session.begin():
        session.execute(update(Order).where(Order.id == "ord_co_paid").values(status="paid"))
    response = checkout(co_client, "ord_co_paid")
    assert response.status_code == 409 and response.get_json()["error"] == "order_already_paid"
    assert session_requests(stripe_double) == []


def test_a_session_paid_at_stripe_makes_the_order_paid_for_checkout_and_for_pay(co_client, stripe_double, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_done")
    first = checkout(co_client, "ord_co_done").get_json()
    stripe_double.complete_session(first["id"])
    age(session_factory, "ord_co_done", 60)
    response = checkout(co_client, "ord_co_done")
    assert response.status_code == 409 and response.get_json()["error"] == "order_already_paid"
    replaced = checkout(co_client, "ord_co_done", {"replace": True})
    assert replaced.status_code == 409 and replaced.get_json()["error"] == "order_already_paid"
    assert stripe_double.session_creates == 1 and stripe_double.count("POST", "/v1/checkout/sessions/") == 0
    [row] = rows(ledger, "ord_co_done")
    assert (row.status, row.payment_status) == ("complete", "paid")
    # The pay endpoint sees it too: no PaymentIntent for an order paid through Checkout.
    pay = co_client.post("/orders/ord_co_done/pay", headers=AUTH)
    assert pay.status_code == 409 and pay.get_json()["error"] == "order_already_paid"


# -- replacing, expiry ---------------------------------------------------------------------


def test_replace_expires_the_old_session_first_then_creates_attempt_2(co_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_repl")
    first = checkout(co_client, "ord_co_repl").get_json()
    new_order(co_client, "ord_co_repl", 7300)  # the cart changed
    response = checkout(co_client, "ord_co_repl", {"replace": True})
    assert response.status_code == 201, response.get_json()
    second = response.get_json()
    assert second["id"] != first["id"] and second["attempt"] == 2 and second["amount"] == 7300
    assert session_requests(stripe_double) == [
        ("POST", "/v1/checkout/sessions"),
        ("POST", f"/v1/checkout/sessions/{first['id']}/expire"),
        ("POST", "/v1/checkout/sessions"),
    ]
    assert stripe_double.sessions[first["id"]]["status"] == "expired"
    assert [s["id"] for s in stripe_double.open_sessions("ord_co_repl")] == [second["id"]]
    assert stripe_double.sessions[second["id"]]["metadata"]["attempt"] == "2"
    assert {"order-ord_co_repl-cs-1-expire-1", "order-ord_co_repl-cs-2"} <= set(stripe_double.keys)
    assert [(r.attempt, r.status) for r in rows(ledger, "ord_co_repl")] == [(1, "expired"), (2, "open")]
    # And the next plain request hands out attempt 2.
    again = checkout(co_client, "ord_co_repl")
    assert again.status_code == 200 and again.get_json()["id"] == second["id"]


def test_an_amount_change_replaces_the_session_without_being_asked(co_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_amt")
    first = checkout(co_client, "ord_co_amt").get_json()
    new_order(co_client, "ord_co_amt", 1200)
    second = checkout(co_client, "ord_co_amt").get_json()
    assert (second["attempt"], second["amount"]) == (2, 1200)
    assert stripe_double.sessions[first["id"]]["status"] == "expired"
    assert [s["id"] for s in stripe_double.open_sessions("ord_co_amt")] == [second["id"]]


def test_expire_failing_with_5xx_is_a_503_and_no_second_session(co_client, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_5xx")
    first = checkout(co_client, "ord_co_5xx").get_json()
    stripe_double.fail_next("error", on="expire", status=500)
    response = checkout(co_client, "ord_co_5xx", {"replace": True})
    assert response.status_code == 503 and response.get_json()["error"] == "stripe_unavailable"
    assert response.headers["Retry-After"] == "1"
    assert stripe_double.session_creates == 1
    assert [s["id"] for s in stripe_double.open_sessions("ord_co_5xx")] == [first["id"]]
    [row] = rows(ledger, "ord_co_5xx")
    assert (row.status, row.expire_key) == ("open", "order-ord_co_5xx-cs-1-expire-1")
    # The next request (even without replace) sends the expire again first, with a new key
    # (Stripe replays the stored 500 for the old one), and only then creates attempt 2.
    retried = checkout(co_client, "ord_co_5xx")
    assert retried.status_code == 201 and retried.get_json()["attempt"] == 2
    assert session_requests(stripe_double)[-2:] == [
        ("POST", f"/v1/checkout/sessions/{first['id']}/expire"), ("POST", "/v1/checkout/sessions")]
    assert len(stripe_double.open_sessions("ord_co_5xx")) == 1
    assert "order-ord_co_5xx-cs-1-expire-2" in stripe_double.keys


def test_an_expire_refused_because_the_customer_paid_meanwhile_is_a_409_and_creates_nothing(co_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_race")
    first = checkout(co_client, "ord_co_race").get_json()
    stripe_double.complete_session(first["id"])
    response = checkout(co_client, "ord_co_race", {"replace": True})
    assert response.status_code == 409 and response.get_json()["error"] == "order_already_paid"
    assert stripe_double.session_creates == 1


def test_a_session_expired_at_stripe_frees_the_order_for_attempt_2(co_client, stripe_double, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_exp")
    first = checkout(co_client, "ord_co_exp").get_json()
    stripe_double.expire_session(first["id"])
    age(session_factory, "ord_co_exp", 60)
    response = checkout(co_client, "ord_co_exp")
    assert response.status_code == 201 and response.get_json()["attempt"] == 2
    assert stripe_double.count("POST", f"/v1/checkout/sessions/{first['id']}/expire") == 0
    assert [(r.attempt, r.status) for r in rows(ledger, "ord_co_exp")] == [(1, "expired"), (2, "open")]


# -- unknown outcomes ----------------------------------------------------------------------


def test_a_create_that_failed_with_5xx_is_resent_under_the_same_key(co_client, stripe_double, ledger, session_factory) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_unk")
    stripe_double.fail_next("error", on="session_create", status=500, store=False)
    response = checkout(co_client, "ord_co_unk")
    assert response.status_code == 503
    [row] = rows(ledger, "ord_co_unk")
    assert row.status == "unknown"
    retried = checkout(co_client, "ord_co_unk")
    assert retried.status_code == 201 and retried.get_json()["attempt"] == 1
    assert stripe_double.session_creates == 1
    assert list(stripe_double.keys) == ["order-ord_co_unk-cs-1"]


def test_a_create_whose_answer_was_lost_gets_the_same_session_back(co_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_lost")
    stripe_double.fail_next("create_then_error", on="session_create", status=500)
    assert checkout(co_client, "ord_co_lost").status_code == 503
    # Stripe replays the stored 500 for the key: the attempt stays unknown (503), and no
    # second session is ever created for it.
    assert checkout(co_client, "ord_co_lost").status_code == 503
    assert stripe_double.session_creates == 1


def test_an_unknown_attempt_past_its_expires_at_is_given_up_for_attempt_2(co_client, stripe_double, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_gone")
    stripe_double.fail_next("create_then_error", on="session_create", status=500)
    assert checkout(co_client, "ord_co_gone").status_code == 503
    with session_factory() as session, session.begin():
        session.execute(update(CheckoutAttempt).where(CheckoutAttempt.order_id == "ord_co_gone")
                        .values(expires_at=int(utcnow().timestamp()) - 3600))
    response = checkout(co_client, "ord_co_gone")
    assert response.status_code == 201 and response.get_json()["attempt"] == 2
    assert [(r.attempt, r.status) for r in rows(ledger, "ord_co_gone")] == [(1, "failed"), (2, "open")]


# -- the door ------------------------------------------------------------------------------


def test_scopes_a_pay_token_may_a_read_or_finance_token_may_not(settings, session_factory, stripe_double) -> None:  # type: ignore[no-untyped-def]
    tokens = {"shop": ("pay", "rt_shop_token_0123456789abcdefghijklmnopqr"),
              "books": ("finance", "rt_books_token_0123456789abcdefghijklmnopq"),
              "dash": ("read", "rt_dash_token_0123456789abcdefghijklmnopqr")}
    entries = tuple((n, s, "sha256:" + hashlib.sha256(t.encode()).hexdigest()) for n, (s, t) in tokens.items())
    app = create_app(
        settings.with_overrides(api_tokens=entries, api_token=None, checkout_success_url="https://shop.example/done", stripe_max_network_retries=0),
        session_factory=session_factory, stripe=stripe_double.client(),
    )
    client = app.test_client()

    def bearer(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[name][1]}"}

    assert client.post("/api/orders", json={"id": "ord_co_scope", "amount": 100, "currency": "usd"}, headers=bearer("shop")).status_code == 201
    for name in ("books", "dash"):
        response = client.post("/orders/ord_co_scope/checkout", headers=bearer(name))
        assert response.status_code == 403 and response.get_json()["error"] == "insufficient_scope", name
    assert client.post("/orders/ord_co_scope/checkout").status_code == 401
    assert session_requests(stripe_double) == []
    assert client.post("/orders/ord_co_scope/checkout", headers=bearer("shop")).status_code == 201


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        ('{"replace": "yes"}', "invalid_replace"),
        ('{"replace": 1}', "invalid_replace"),
        ('{"success_url": "javascript:alert(1)"}', "invalid_success_url"),
        ('{"cancel_url": "https://shop.example/a b"}', "invalid_cancel_url"),
        ('{"success_url": 5}', "invalid_success_url"),
        ('{"amount": 1}', "unknown_field"),
    ],
)
def test_a_bad_body_is_a_400_json_error_and_reaches_no_stripe(co_client, stripe_double, raw, code) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_bad")
    response = co_client.post("/orders/ord_co_bad/checkout", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400 and response.is_json
    assert response.get_json()["error"] == code and response.get_json()["message"]
    assert session_requests(stripe_double) == []


def test_unknown_order_is_404_order_not_found(co_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    for order_id in ("ord_nope", "bad id!"):
        response = checkout(co_client, order_id)
        assert response.status_code == 404 and response.get_json()["error"] == "order_not_found", order_id
    assert session_requests(stripe_double) == []


def test_never_a_session_beside_a_payable_payment_intent_nor_the_other_way_round(co_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(co_client, "ord_co_mix")
    assert co_client.post("/orders/ord_co_mix/pay", headers=AUTH).status_code == 201
    response = checkout(co_client, "ord_co_mix")
    assert response.status_code == 409 and response.get_json()["error"] == "payment_intent_open"
    assert stripe_double.session_creates == 0
    new_order(co_client, "ord_co_mix2")
    assert checkout(co_client, "ord_co_mix2").status_code == 201
    pay = co_client.post("/orders/ord_co_mix2/pay", headers=AUTH)
    assert pay.status_code == 409 and pay.get_json()["error"] == "checkout_session_open"
    assert stripe_double.creates == 1  # only ord_co_mix's PaymentIntent


@pytest.mark.parametrize("news", ["expired", "async_payment_failed"])
def test_the_webhook_of_an_ended_session_frees_the_order_without_a_stripe_read(co_client, stripe_double, deliver, ledger, news) -> None:  # type: ignore[no-untyped-def]
    """The ledger's checkout.session.* events settle the endpoint's attempt: an expired
    session, or a complete one whose asynchronous payment failed, frees the order for the
    next attempt at once (no 5-second-old re-read needed)."""
    from tests import stripe_payloads as p

    new_order(co_client, "ord_co_hook")
    first = checkout(co_client, "ord_co_hook").get_json()
    session = dict(stripe_double.sessions[first["id"]])
    if news == "expired":
        session.update(status="expired")
    else:
        session.update(status="complete", payment_status="unpaid")
    event = p.event(f"checkout.session.{news}", session)
    assert deliver(event).status_code == 200
    [row] = rows(ledger, "ord_co_hook")
    assert row.status == ("expired" if news == "expired" else "failed")
    reads_before = stripe_double.count("GET", f"/v1/checkout/sessions/{first['id']}")
    response = checkout(co_client, "ord_co_hook")
    assert response.status_code == 201 and response.get_json()["attempt"] == 2
    assert stripe_double.count("GET", f"/v1/checkout/sessions/{first['id']}") == reads_before
