"""The gateway drives the real stripe-python SDK; `responses` intercepts its HTTP calls."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlparse

import pytest
import responses

from domain.stripe.gateway import (
    StripeGateway,
    StripeNotConfigured,
    StripeNotFound,
    StripeRateLimited,
    StripeUnavailable,
    build_stripe_client,
)
from config import Settings
from tests import stripe_payloads as p

API = "http://127.0.0.1:9"  # never reached: responses answers first


@pytest.fixture
def gateway() -> StripeGateway:
    settings = Settings(
        database_url="sqlite://",
        stripe_api_key="sk_test_gateway",
        stripe_api_base=API,
        stripe_max_network_retries=1,
    )
    return StripeGateway.from_settings(settings)


@responses.activate
def test_retrieve_charge_returns_plain_dicts_and_sends_the_key(gateway: StripeGateway) -> None:
    charge = p.charge(metadata={"order_id": "ord_1"})
    responses.get(f"{API}/v1/charges/{charge['id']}", json=charge)
    result = gateway.retrieve_charge(charge["id"])
    assert type(result) is dict and result["metadata"] == {"order_id": "ord_1"}
    request = responses.calls[0].request
    assert request.headers["Authorization"] == "Bearer sk_test_gateway"


@responses.activate
def test_connected_account_header(gateway: StripeGateway) -> None:
    charge = p.charge()
    responses.get(f"{API}/v1/charges/{charge['id']}", json=charge)
    gateway.retrieve_charge(charge["id"], account="acct_1X")
    assert responses.calls[0].request.headers["Stripe-Account"] == "acct_1X"


@responses.activate
def test_list_charges_follows_every_page(gateway: StripeGateway) -> None:
    first = [p.charge() for _ in range(2)]
    second = [p.charge()]
    responses.get(f"{API}/v1/charges", json={"object": "list", "data": first, "has_more": True, "url": "/v1/charges"})
    responses.get(f"{API}/v1/charges", json={"object": "list", "data": second, "has_more": False, "url": "/v1/charges"})
    ids = [c["id"] for c in gateway.list_charges(created_gte=1_700_000_000, page_size=2)]
    assert ids == [c["id"] for c in first + second]
    second_query = parse_qs(urlparse(responses.calls[1].request.url).query)
    assert second_query["starting_after"] == [first[-1]["id"]]
    assert second_query["created[gt]"] == ["1699999999"]


@responses.activate
def test_5xx_is_retried_by_the_sdk_then_reported_unavailable(gateway: StripeGateway) -> None:
    error = {"error": {"type": "api_error", "message": "boom"}}
    responses.get(f"{API}/v1/charges/ch_1", json=error, status=500)
    with pytest.raises(StripeUnavailable):
        gateway.retrieve_charge("ch_1")
    assert len(responses.calls) == 2  # max_network_retries=1


@responses.activate
def test_429_is_not_retried_blindly(gateway: StripeGateway) -> None:
    error = {"error": {"type": "invalid_request_error", "code": "rate_limit", "message": "slow down"}}
    responses.get(f"{API}/v1/charges/ch_1", json=error, status=429)
    with pytest.raises(StripeRateLimited):
        gateway.retrieve_charge("ch_1")
    assert len(responses.calls) == 1


@responses.activate
def test_404_is_not_found(gateway: StripeGateway) -> None:
    error = {"error": {"type": "invalid_request_error", "code": "resource_missing", "message": "No such charge"}}
    responses.get(f"{API}/v1/charges/ch_missing", json=error, status=404)
    with pytest.raises(StripeNotFound):
        gateway.retrieve_charge("ch_missing")


def test_without_a_key_calls_fail_clearly() -> None:
    gateway = StripeGateway.from_settings(Settings(database_url="sqlite://"))
    assert not gateway.configured
    with pytest.raises(StripeNotConfigured):
        gateway.retrieve_charge("ch_1")


def test_client_uses_requests_and_the_configured_base() -> None:
    settings = Settings(database_url="sqlite://", stripe_api_key="sk_test_x", stripe_api_base=API, stripe_max_network_retries=3)
    client = build_stripe_client(settings)
    assert client is not None
    requestor = client._requestor  # the SDK keeps these on its requestor
    assert requestor._options.base_addresses["api"] == API
    assert requestor._options.max_network_retries == 3
    assert type(requestor._client).__name__ == "RequestsClient"
