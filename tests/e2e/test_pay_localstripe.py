"""AC6, end to end: the service as real worker processes, the real SDK, and the localstripe
emulator as a real process on 127.0.0.1.

localstripe ignores Idempotency-Key, so nothing at "Stripe" dedups our creates here: one
PaymentIntent out of twenty concurrent requests is the work of our own phases, row lock
and unique constraint alone.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import pytest
import requests
import stripe

from tests import stripe_payloads as p
from tests.e2e import merchant
from tests.servers import reconciler_serve

pytestmark = pytest.mark.e2e

API_KEY = "sk_test_pay_end_to_end"
SECRET = "whsec_pay_end_to_end_0123456789abcdef"
TOKEN = "e2e-pay-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONCURRENT = 20


@pytest.fixture
def service(localstripe, database_url, session_factory, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    env = {
        "DATABASE_URL": database_url,
        "STRIPE_API_KEY": API_KEY,
        "STRIPE_API_BASE": localstripe.base_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "API_TOKEN": TOKEN,
        "LOG_LEVEL": "WARNING",
    }
    with reconciler_serve(["--workers", "3", "--no-migrate"], env, tmp_path / "serve.log") as base:
        localstripe.flush()
        localstripe.register_webhook(p.new_id("we"), f"{base}/webhooks/stripe", SECRET)
        yield base


@pytest.fixture
def emulator_client(localstripe) -> stripe.StripeClient:  # type: ignore[no-untyped-def]
    return merchant.emulator_client(API_KEY, localstripe.base_url)


def intents_of(client: stripe.StripeClient, order_id: str) -> list[Any]:
    listed = client.v1.payment_intents.list(params={"limit": 100})
    return [pi for pi in listed.data if pi.metadata.to_dict().get("order_id") == order_id]


def wait_for(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)
    return value


def test_twenty_concurrent_pay_requests_make_one_payment_intent_at_the_emulator(service, emulator_client) -> None:  # type: ignore[no-untyped-def]
    created = requests.post(f"{service}/api/orders", json={"id": "ord_e2e_pay", "amount": 2599, "currency": "usd"}, headers=AUTH, timeout=10)
    assert created.status_code == 201
    barrier = threading.Barrier(CONCURRENT)

    def post(_: int) -> tuple[int, dict]:
        barrier.wait()
        response = requests.post(f"{service}/orders/ord_e2e_pay/pay", json={"payment_method": "pm_card_visa"}, headers=AUTH, timeout=30)
        return response.status_code, response.json()

    with ThreadPoolExecutor(CONCURRENT) as pool:
        results = list(pool.map(post, range(CONCURRENT)))

    [intent] = intents_of(emulator_client, "ord_e2e_pay")
    assert (intent.amount, intent.currency, intent.metadata.to_dict()) == (
        2599, "usd", {"order_id": "ord_e2e_pay", "attempt": "1", "order_total": "2599"},
    )
    assert all(status < 500 for status, _ in results), results
    assert [status for status, _ in results].count(201) == 1
    for status, body in results:
        assert (status in (200, 201) and body["id"] == intent.id and body["client_secret"] == intent.client_secret) or (
            status == 409 and body["error"] == "payment_in_progress"
        ), (status, body)


def test_paid_through_the_emulator_then_409_and_no_new_payment_intent(service, emulator_client) -> None:  # type: ignore[no-untyped-def]
    requests.post(f"{service}/api/orders", json={"id": "ord_e2e_paid", "amount": 1500, "currency": "eur"}, headers=AUTH, timeout=10)
    answer = requests.post(f"{service}/orders/ord_e2e_paid/pay", json={"payment_method": "pm_card_visa"}, headers=AUTH, timeout=30)
    assert answer.status_code == 201
    # The checkout confirms it (localstripe then posts a signed payment_intent.succeeded).
    confirmed = emulator_client.v1.payment_intents.confirm(answer.json()["id"])
    assert confirmed.status == "succeeded"

    wait_for(lambda: requests.get(f"{service}/api/orders/ord_e2e_paid", headers=AUTH, timeout=10).json()["status"] == "paid")
    again = requests.post(f"{service}/orders/ord_e2e_paid/pay", json={"payment_method": "pm_card_visa"}, headers=AUTH, timeout=30)
    assert (again.status_code, again.json()["error"]) == (409, "order_already_paid")
    assert len(intents_of(emulator_client, "ord_e2e_paid")) == 1
