"""AC1 and AC2: many concurrent pay requests for one order on PostgreSQL, from threads of
one process and from several gunicorn worker processes, against a slow Stripe double that
counts creates: exactly one PaymentIntent, every answer that one or 409, never a 5xx."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app import create_app
from models.payments import PaymentAttempt
from tests.conftest import API_TOKEN
from tests.servers import reconciler_serve

pytestmark = pytest.mark.postgres

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
REQUESTS = 50
THREADS = 50


def _all_at_once(post, count: int, threads: int) -> list[tuple[int, dict, float]]:  # type: ignore[no-untyped-def]
    barrier = threading.Barrier(threads)

    def worker(index: int) -> list[tuple[int, dict, float]]:
        barrier.wait()
        results = []
        for _ in range(index, count, threads):
            started = time.monotonic()
            status, body = post()
            results.append((status, body, time.monotonic() - started))
        return results

    with ThreadPoolExecutor(threads) as pool:
        return [r for chunk in pool.map(worker, range(threads)) for r in chunk]


def _check(results: list[tuple[int, dict, float]], double, label: str) -> str:  # type: ignore[no-untyped-def]
    statuses = [status for status, _, _ in results]
    assert all(status < 500 for status in statuses), results
    assert double.creates == 1, double.creates
    [intent_id] = list(double.intents)
    for status, body, _ in results:
        assert (status in (200, 201) and body["id"] == intent_id) or (
            status == 409 and body["error"] == "payment_in_progress"
        ), (status, body)
    assert statuses.count(201) == 1
    times = sorted(t for _, _, t in results)
    print(
        f"\n{label}: {len(results)} requests, {statuses.count(201)}x201 {statuses.count(200)}x200 "
        f"{statuses.count(409)}x409; latency median {times[len(times) // 2] * 1000:.0f} ms, "
        f"max {times[-1] * 1000:.0f} ms; Stripe creates {double.creates}, create requests {double.create_requests}"
    )
    return intent_id


def test_ac1_fifty_concurrent_requests_in_threads_create_one_payment_intent(settings, session_factory, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    stripe_double.delay = 0.1
    app = create_app(settings.with_overrides(stripe_max_network_retries=0), session_factory=session_factory, stripe=stripe_double.client())
    assert app.test_client().post("/api/orders", json={"id": "ord_ac1", "amount": 4999, "currency": "usd"}, headers=AUTH).status_code == 201

    def post() -> tuple[int, dict]:
        response = app.test_client().post("/orders/ord_ac1/pay", headers=AUTH)
        return response.status_code, response.get_json()

    started = time.monotonic()
    results = _all_at_once(post, REQUESTS, THREADS)
    intent_id = _check(results, stripe_double, f"AC1 threads (total {time.monotonic() - started:.2f} s)")
    [attempt] = ledger.all(PaymentAttempt, PaymentAttempt.order_id == "ord_ac1")
    assert (attempt.attempt, attempt.status, attempt.payment_intent_id) == (1, "created", intent_id)


def test_ac1_requests_for_many_orders_at_once_create_one_each(settings, session_factory, stripe_double) -> None:  # type: ignore[no-untyped-def]
    stripe_double.delay = 0.05
    app = create_app(settings.with_overrides(stripe_max_network_retries=0), session_factory=session_factory, stripe=stripe_double.client())
    orders = [f"ord_many_{n}" for n in range(10)]
    for order_id in orders:
        app.test_client().post("/api/orders", json={"id": order_id, "amount": 100, "currency": "usd"}, headers=AUTH)
    counter = iter(range(10_000))
    lock = threading.Lock()

    def post() -> tuple[int, dict]:
        with lock:
            order_id = orders[next(counter) % len(orders)]
        response = app.test_client().post(f"/orders/{order_id}/pay", headers=AUTH)
        return response.status_code, response.get_json()

    results = _all_at_once(post, 60, 30)
    assert all(status in (200, 201) or body["error"] == "payment_in_progress" for status, body, _ in results)
    assert stripe_double.creates == len(orders)
    by_order: dict[str, set[str]] = {}
    for intent in stripe_double.intents.values():
        by_order.setdefault(intent["metadata"]["order_id"], set()).add(intent["id"])
    assert all(len(ids) == 1 for ids in by_order.values()) and set(by_order) == set(orders)


@pytest.fixture
def served(database_url, session_factory, stripe_double, tmp_path):  # type: ignore[no-untyped-def]
    """`reconciler serve` with four worker processes, its Stripe the double."""
    log_path = tmp_path / "serve.log"
    env = {
        "DATABASE_URL": database_url,
        "STRIPE_API_KEY": "sk_test_unit",
        "STRIPE_API_BASE": stripe_double.base_url,
        "API_TOKEN": API_TOKEN,
        "LOG_LEVEL": "WARNING",
    }
    with reconciler_serve(["--workers", "4", "--no-migrate"], env, log_path) as base:
        yield base, log_path


def test_ac2_fifty_concurrent_requests_across_four_worker_processes_create_one(served, stripe_double) -> None:  # type: ignore[no-untyped-def]
    base, log_path = served
    stripe_double.delay = 0.1
    created = requests.post(f"{base}/api/orders", json={"id": "ord_ac2", "amount": 1250, "currency": "eur"}, headers=AUTH, timeout=10)
    assert created.status_code == 201

    def post() -> tuple[int, dict]:
        response = requests.post(f"{base}/orders/ord_ac2/pay", headers=AUTH, timeout=30)
        return response.status_code, response.json()

    started = time.monotonic()
    results = _all_at_once(post, REQUESTS, 10)
    _check(results, stripe_double, f"AC2 4 workers (total {time.monotonic() - started:.2f} s)")
    pids = set(re.findall(r'pid=<(\d+)> .*"POST /orders/ord_ac2/pay', log_path.read_text()))
    assert len(pids) >= 2, log_path.read_text()[-2000:]


@pytest.mark.parametrize("currency", ["usd", "eur"], ids=["update_in_place", "cancel_and_attempt_2"])
def test_concurrent_requests_after_an_amount_change_end_with_one_live_payment_intent_at_the_new_amount(settings, session_factory, stripe_double, ledger, currency) -> None:  # type: ignore[no-untyped-def]
    stripe_double.delay = 0.1
    app = create_app(settings.with_overrides(stripe_max_network_retries=0), session_factory=session_factory, stripe=stripe_double.client())
    client = app.test_client()
    assert client.post("/api/orders", json={"id": "ord_amt_race", "amount": 4999, "currency": "usd"}, headers=AUTH).status_code == 201
    first = client.post("/orders/ord_amt_race/pay", headers=AUTH).get_json()
    assert client.post("/api/orders", json={"id": "ord_amt_race", "amount": 7300, "currency": currency}, headers=AUTH).status_code == 200

    def post() -> tuple[int, dict]:
        response = app.test_client().post("/orders/ord_amt_race/pay", headers=AUTH)
        return response.status_code, response.get_json()

    results = _all_at_once(post, 30, 30)
    assert all(status in (200, 201) or body["error"] == "payment_in_progress" for status, body, _ in results), results
    live = [i for i in stripe_double.intents.values() if i["status"] not in ("canceled", "succeeded")]
    assert len(live) == 1 and (live[0]["amount"], live[0]["currency"]) == (7300, currency)
    answered = {(body["id"], body["amount"], body["currency"]) for status, body, _ in results if status in (200, 201)}
    assert answered == {(live[0]["id"], 7300, currency)}
    if currency == "usd":
        assert live[0]["id"] == first["id"] and stripe_double.creates == 1
        assert stripe_double.count("POST", f"/v1/payment_intents/{first['id']}") == 1  # one update, not 30
    else:
        assert stripe_double.creates == 2 and stripe_double.count("POST", f"/v1/payment_intents/{first['id']}/cancel") == 1
    rows = ledger.all(PaymentAttempt, PaymentAttempt.order_id == "ord_amt_race")
    assert sorted((a.attempt, a.status, a.amount) for a in rows if a.status == "created") == [
        (1 if currency == "usd" else 2, "created", 7300)]
