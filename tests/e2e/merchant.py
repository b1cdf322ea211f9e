"""What the end-to-end tests do as the merchant's checkout and as Stripe's webhook sender,
against an emulator: charge a card there, and post that charge to us as a signed
``charge.succeeded``."""

from __future__ import annotations

from typing import Any

import requests
import stripe

from tests import stripe_payloads as p


def emulator_client(api_key: str, base_url: str) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key, base_addresses={"api": base_url}, http_client=stripe.RequestsClient(), max_network_retries=0
    )


def charge(checkout: stripe.StripeClient, order_id: str, amount: int) -> dict[str, Any]:
    created = checkout.v1.charges.create(
        params={"amount": amount, "currency": "usd", "source": "tok_visa", "metadata": {"order_id": order_id}}
    )
    assert created.status == "succeeded"
    # The emulator's own JSON for the charge, read back as a webhook sender would render it.
    return checkout.v1.charges.retrieve(created.id).to_dict()


def deliver(service: str, charge_json: dict[str, Any], secret: str) -> None:
    # The emulator renders charges with their refunds embedded: the pre-2022-11-15 shape.
    event = p.event("charge.succeeded", charge_json, api_version=p.LEGACY_API_VERSION, request_id=p.new_id("req"))
    body = p.encode(event)
    response = requests.post(
        f"{service}/webhooks/stripe", data=body, headers={"Stripe-Signature": p.sign(body, secret)}, timeout=10
    )
    assert response.status_code == 200 and response.json()["status"] == "received", response.text
