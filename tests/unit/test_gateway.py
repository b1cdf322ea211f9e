"""The gateway drives the real stripe-python SDK; `responses` intercepts its HTTP calls."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlparse

import pytest
import responses

from domain.stripe.gateway import (
    PATIENT_TRIES,
    RetryPolicy,
    StripeGateway,
    StripeNotConfigured,
    StripeNotFound,
    StripeRateLimited,
    StripeUnavailable,
    build_stripe_client,
)
from config import Settings
from domain.stripe.ratelimit import RateLimiter
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


# -- the call policy: one retry loop, one limiter, our key on every try ----------------------


class CountingLimiter(RateLimiter):
    """A limiter that never waits and records each token taken, in ``events``."""

    def __init__(self, events: list[str]) -> None:
        super().__init__(1_000_000.0)
        self.events = events

    def acquire(self) -> None:
        self.events.append("token")


def _gateway(*, sdk_retries: int, policy: RetryPolicy, events: list[str] | None = None) -> StripeGateway:
    settings = Settings(
        database_url="sqlite://", stripe_api_key="sk_test_gateway", stripe_api_base=API,
        stripe_max_network_retries=sdk_retries,
    )
    limiter = CountingLimiter(events if events is not None else [])
    return StripeGateway(build_stripe_client(settings), policy=policy, limiter=limiter)


def _refund(gateway: StripeGateway) -> dict:
    return gateway.create_refund(charge_id="ch_1", amount=100, idempotency_key="dup-refund-ch_1-1", metadata={})


@responses.activate
def test_a_retried_refund_sends_our_key_on_every_try_and_the_sdk_adds_no_tries() -> None:
    sleeps: list[float] = []
    # The client would retry twice on its own; the gateway's policy is the only one.
    gateway = _gateway(sdk_retries=2, policy=RetryPolicy(tries=3, sleep=sleeps.append))
    error = {"error": {"type": "api_error", "message": "boom"}}
    responses.post(f"{API}/v1/refunds", json=error, status=500)
    responses.post(f"{API}/v1/refunds", json=error, status=503)
    responses.post(f"{API}/v1/refunds", json=p.refund(charge="ch_1", amount=100))
    assert _refund(gateway)["amount"] == 100
    assert [c.request.headers["Idempotency-Key"] for c in responses.calls] == ["dup-refund-ch_1-1"] * 3
    assert len(sleeps) == 2 and 0.4 <= sleeps[0] <= 0.6 and 0.8 <= sleeps[1] <= 1.2


@responses.activate
def test_tries_are_at_most_the_policy_s_whatever_the_client_says() -> None:
    gateway = _gateway(sdk_retries=3, policy=RetryPolicy(tries=2, sleep=lambda s: None))
    responses.post(f"{API}/v1/refunds", json={"error": {"type": "api_error", "message": "boom"}}, status=500)
    with pytest.raises(StripeUnavailable):
        _refund(gateway)
    assert len(responses.calls) == 2


@responses.activate
def test_a_429_is_waited_out_only_by_a_patient_gateway() -> None:
    sleeps: list[float] = []
    error = {"error": {"type": "invalid_request_error", "code": "rate_limit", "message": "slow down"}}
    responses.post(f"{API}/v1/refunds", json=error, status=429)
    hurried = _gateway(sdk_retries=0, policy=RetryPolicy(tries=3, sleep=sleeps.append))
    with pytest.raises(StripeRateLimited):
        _refund(hurried)
    assert len(responses.calls) == 1 and sleeps == []

    patient = hurried.patient(sleep=sleeps.append)
    assert patient.policy.tries == PATIENT_TRIES
    with pytest.raises(StripeRateLimited):
        _refund(patient)
    assert len(responses.calls) == 1 + PATIENT_TRIES and len(sleeps) == PATIENT_TRIES - 1


@responses.activate
def test_stripe_should_retry_decides_when_stripe_sends_it() -> None:
    gateway = _gateway(sdk_retries=0, policy=RetryPolicy(tries=3, sleep=lambda s: None))
    rate = {"error": {"type": "invalid_request_error", "code": "lock_timeout", "message": "retry"}}
    responses.get(f"{API}/v1/charges/ch_1", json=rate, status=429, headers={"Stripe-Should-Retry": "true"})
    responses.get(f"{API}/v1/charges/ch_1", json=p.charge(id="ch_1"))
    assert gateway.retrieve_charge("ch_1")["id"] == "ch_1"
    assert len(responses.calls) == 2

    boom = {"error": {"type": "api_error", "message": "stored"}}
    responses.get(f"{API}/v1/charges/ch_2", json=boom, status=500, headers={"Stripe-Should-Retry": "false"})
    with pytest.raises(StripeUnavailable):
        gateway.retrieve_charge("ch_2")
    assert len(responses.calls) == 3


@responses.activate
def test_every_try_and_every_page_takes_a_token_of_the_one_limiter() -> None:
    events: list[str] = []
    gateway = _gateway(sdk_retries=0, policy=RetryPolicy(tries=2, sleep=lambda s: None), events=events)
    patient = gateway.patient(sleep=lambda s: None)  # shares the limiter
    responses.get(f"{API}/v1/charges/ch_1", json={"error": {"type": "api_error", "message": "boom"}}, status=500)
    responses.get(f"{API}/v1/charges/ch_1", json=p.charge(id="ch_1"))
    gateway.retrieve_charge("ch_1")
    assert events == ["token", "token"]

    first, second = [p.charge() for _ in range(2)], [p.charge()]
    responses.get(f"{API}/v1/charges", json={"object": "list", "data": first, "has_more": True, "url": "/v1/charges"})
    responses.get(f"{API}/v1/charges", json={"object": "list", "data": second, "has_more": False, "url": "/v1/charges"})
    events.clear()
    ticks = iter([100.2, 101.7])

    def clock() -> float:
        events.append("stamp")
        return next(ticks)

    pages = list(patient.list_charges(created_gte=1_700_000_000, page_size=2).pages(clock))
    assert [(page.as_of, [c["id"] for c in page.items]) for page in pages] == [
        (100, [c["id"] for c in first]), (101, [c["id"] for c in second])
    ]
    # each page: the limiter first, then the stamp, then the request
    assert events == ["token", "stamp", "token", "stamp"]
