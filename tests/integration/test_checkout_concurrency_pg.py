"""The checkout endpoint under 20 concurrent requests for one order on PostgreSQL (the
order row lock and the one-live-attempt index are PostgreSQL's here, not SQLite's
database-wide writer lock), against a slow Stripe double: one open session, every answer
that session or 409, never a 5xx; and 20 concurrent replace requests still leave exactly
one open session, every expire before its successor's create."""

from __future__ import annotations

import pytest

from app import create_app
from models.payments import CheckoutAttempt
from tests.conftest import API_TOKEN
from tests.integration.test_pay_concurrency_pg import _all_at_once

pytestmark = pytest.mark.postgres

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
REQUESTS = 20


def _app(settings, session_factory, stripe_double):  # type: ignore[no-untyped-def]
    return create_app(
        settings.with_overrides(checkout_success_url="https://shop.example/done", stripe_max_network_retries=0),
        session_factory=session_factory, stripe=stripe_double.client(),
    )


def test_twenty_concurrent_requests_for_one_order_leave_one_open_session(settings, session_factory, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    stripe_double.delay = 0.1
    app = _app(settings, session_factory, stripe_double)
    assert app.test_client().post("/api/orders", json={"id": "ord_co_pg", "amount": 4999, "currency": "usd"}, headers=AUTH).status_code == 201

    def post() -> tuple[int, dict]:
        response = app.test_client().post("/orders/ord_co_pg/checkout", headers=AUTH)
        return response.status_code, response.get_json()

    results = _all_at_once(post, REQUESTS, REQUESTS)
    statuses = [status for status, _, _ in results]
    assert all(status < 500 for status in statuses), results
    assert stripe_double.session_creates == 1
    [open_session] = stripe_double.open_sessions("ord_co_pg")
    for status, body, _ in results:
        assert (status in (200, 201) and body["url"] == open_session["url"]) or (
            status == 409 and body["error"] == "payment_in_progress"), (status, body)
    assert statuses.count(201) == 1
    [row] = ledger.all(CheckoutAttempt, CheckoutAttempt.order_id == "ord_co_pg")
    assert (row.attempt, row.status, row.session_id) == (1, "open", open_session["id"])


def test_twenty_concurrent_replace_requests_never_leave_two_open_sessions(settings, session_factory, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    stripe_double.delay = 0.05
    app = _app(settings, session_factory, stripe_double)
    client = app.test_client()
    assert client.post("/api/orders", json={"id": "ord_co_pg_r", "amount": 4999, "currency": "usd"}, headers=AUTH).status_code == 201
    first = client.post("/orders/ord_co_pg_r/checkout", headers=AUTH).get_json()

    def post() -> tuple[int, dict]:
        response = app.test_client().post("/orders/ord_co_pg_r/checkout", json={"replace": True}, headers=AUTH)
        return response.status_code, response.get_json()

    results = _all_at_once(post, REQUESTS, REQUESTS)
    assert all(status < 500 for status, _, _ in results), results
    assert all(status in (200, 201) or body["error"] == "payment_in_progress" for status, body, _ in results), results
    [open_session] = stripe_double.open_sessions("ord_co_pg_r")
    assert stripe_double.sessions[first["id"]]["status"] == "expired"
    # Every session but the open one was expired at Stripe before the next was created.
    with stripe_double.lock:
        log = [(m, path) for m, path in stripe_double.requests if path.startswith("/v1/checkout/sessions")]
    created = [s["id"] for s in sorted(stripe_double.sessions.values(), key=lambda s: s["metadata"]["attempt"] and int(s["metadata"]["attempt"]))]
    creates = [i for i, (m, path) in enumerate(log) if (m, path) == ("POST", "/v1/checkout/sessions")]
    for n, session_id in enumerate(created[:-1]):
        expire_at = log.index(("POST", f"/v1/checkout/sessions/{session_id}/expire"))
        assert expire_at < creates[n + 1], (session_id, log)
    rows = ledger.all(CheckoutAttempt, CheckoutAttempt.order_id == "ord_co_pg_r")
    assert [r.session_id for r in rows if r.status == "open"] == [open_session["id"]]
