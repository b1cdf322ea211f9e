"""End to end: the service as a real process, the real stripe-python SDK, and the
localstripe emulator as a real process that delivers signed webhooks to us.

The emulator plays Stripe; the test plays the merchant's checkout (it creates and confirms
PaymentIntents with the SDK, as a checkout backend would). Its events come in API version
2017-08-15, a third shape next to the two the unit tests build.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import pytest
import requests
import stripe

from domain.stripe.gateway import StripeGateway
from config import Settings
from models import StripeEvent
from tests import stripe_payloads as p
from tests.servers import wait_until_applied
from tests.e2e import merchant
from tests.servers import reconciler_serve

pytestmark = pytest.mark.e2e

API_KEY = "sk_test_end_to_end"
SECRET = "whsec_end_to_end_0123456789abcdef"
TOKEN = "e2e-api-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


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
    with reconciler_serve(["--workers", "2", "--no-migrate"], env, tmp_path / "serve.log") as base:
        localstripe.flush()
        # Registered per test with a fresh id: localstripe cannot unregister, and would
        # otherwise keep posting to the previous test's (stopped) server.
        localstripe.register_webhook(p.new_id("we"), f"{base}/webhooks/stripe", SECRET)
        yield base


@pytest.fixture
def checkout(localstripe) -> stripe.StripeClient:  # type: ignore[no-untyped-def]
    return merchant.emulator_client(API_KEY, localstripe.base_url)


def wait_for(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


def pay(checkout: stripe.StripeClient, order_id: str, amount: int, currency: str = "usd") -> stripe.PaymentIntent:
    return checkout.v1.payment_intents.create(
        params={
            "amount": amount,
            "currency": currency,
            "payment_method": "pm_card_visa",
            "confirm": True,
            "metadata": {"order_id": order_id},
        }
    )


def test_a_double_payment_lands_in_the_ledger_from_real_webhooks(service, checkout, ledger) -> None:  # type: ignore[no-untyped-def]
    created = requests.post(f"{service}/api/orders", json={"id": "ord_e2e", "amount": 4999, "currency": "usd"}, headers=AUTH, timeout=10)
    assert created.status_code == 201

    first = pay(checkout, "ord_e2e", 4999)
    second = pay(checkout, "ord_e2e", 4999)  # the double click
    assert first.status == second.status == "succeeded"

    def both_charges() -> dict | None:
        view = requests.get(f"{service}/api/orders/ord_e2e", headers=AUTH, timeout=10).json()
        return view if len(view["charges"]) == 2 else None

    view = wait_for(both_charges)
    assert {c["payment_intent_id"] for c in view["charges"]} == {first.id, second.id}
    assert view["status"] == "paid"
    assert view["totals"] == {"usd": {"charged": 9998, "refunded": 0, "held": 9998}}
    events = ledger.all(StripeEvent)
    assert {e.type for e in events} == {"payment_intent.succeeded"}
    assert {e.api_version for e in events} == {"2017-08-15"}


def test_a_refund_read_back_through_the_gateway_is_applied(service, checkout, localstripe) -> None:  # type: ignore[no-untyped-def]
    intent = pay(checkout, "ord_refund", 1200, "eur")
    charge_id = intent.latest_charge.id
    wait_for(lambda: requests.get(f"{service}/api/orders/ord_refund", headers=AUTH, timeout=10).status_code == 200)

    checkout.v1.refunds.create(params={"charge": charge_id, "amount": 500})
    # localstripe sends no charge.* events: read the charge back through our gateway, as
    # the backfill will, and deliver it as Stripe would have.
    gateway = StripeGateway.from_settings(
        Settings(database_url="sqlite://", stripe_api_key=API_KEY, stripe_api_base=localstripe.base_url)
    )
    refunded_charge = gateway.retrieve_charge(charge_id)
    assert refunded_charge["amount_refunded"] == 500
    event = p.event("charge.refunded", refunded_charge, api_version=p.LEGACY_API_VERSION)
    body = p.encode(event)
    response = requests.post(f"{service}/webhooks/stripe", data=body, headers={"Stripe-Signature": p.sign(body, SECRET)}, timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "received"
    wait_until_applied(service, event["id"], token=TOKEN)

    view = requests.get(f"{service}/api/orders/ord_refund", headers=AUTH, timeout=10).json()
    assert view["status"] == "partially_refunded"
    assert view["totals"] == {"eur": {"charged": 1200, "refunded": 500, "held": 700}}
    assert [r["amount"] for r in view["charges"][0]["refunds"]] == [500]

    listed = [c["id"] for c in gateway.list_charges(created_gte=refunded_charge["created"])]
    assert charge_id in listed
