"""Backfill's watermarks (one per listing), the second a read object counts as of, and
the connected account of a charge's PaymentIntent: the reconciliation pass against the
real stripe-python SDK, with Stripe played by tests/fake_stripe.py."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from app.gateway import StripeGateway
from config import Settings
from jobs.reconcile import OVERLAP_SECONDS, run_reconciliation
from models import Charge, PaymentIntent, ReconciliationRun, Refund, run_in_transaction
from tests import stripe_payloads as p
from tests.fake_stripe import API

NOW = int(time.time())
LISTING_PATHS = {"charges": "/v1/charges", "refunds": "/v1/refunds", "disputes": "/v1/disputes", "events": "/v1/events"}


@pytest.fixture
def job_settings(settings: Settings) -> Settings:
    return settings.with_overrides(stripe_api_base=API, stripe_max_network_retries=0, refund_mode="review")


@pytest.fixture
def reconcile(session_factory, job_settings):  # type: ignore[no-untyped-def]
    def _run(**options: Any):  # type: ignore[no-untyped-def]
        options.setdefault("sleep", lambda seconds: None)
        options.setdefault("mode", "review")
        return run_reconciliation(session_factory, StripeGateway.from_settings(job_settings), job_settings, **options)

    return _run


class Clock:
    """A host clock the test moves (the fake moves it while Stripe 'answers')."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def list_starts(stripe_api, listing: str) -> list[int]:  # type: ignore[no-untyped-def]
    """The ``created[gt]`` of each first page of ``listing`` requested so far."""
    starts = []
    for url in stripe_api.list_requests:
        parsed = urlparse(url)
        query = parse_qs(parsed.query)
        if parsed.path == LISTING_PATHS[listing] and "starting_after" not in query and "charge" not in query:
            starts.append(int(query["created[gt]"][0]))
    return starts


# -- the second a read object counts as of ---------------------------------------------------


def test_a_refund_failing_in_the_second_it_was_read_still_fails_it(
    stripe_api, reconcile, deliver, ledger
) -> None:  # type: ignore[no-untyped-def]
    charge = stripe_api.add_charge(metadata={"order_id": "ord_read"}, created=NOW - 60)
    refund = stripe_api.add_refund(charge["id"], 1000, status="pending", created=NOW - 50)
    clock = Clock(NOW + 0.6)

    def slow_answer(listing: str, page: int) -> None:
        if listing == "refunds":
            clock.now += 0.7  # Stripe reads the refund in second NOW and answers in NOW + 1

    stripe_api.on_list = slow_answer
    assert reconcile(clock=clock).status == "succeeded"
    assert ledger.get(Refund, refund["id"]).status == "pending"

    # The refund failed later in that same second; its event arrives after the backfill.
    failed = dict(refund, status="failed", failure_reason="expired_or_canceled_card")
    assert deliver(p.event("refund.failed", failed, created=NOW)).status_code == 200
    row = ledger.get(Refund, refund["id"])
    assert row.status == "failed" and row.failure_reason == "expired_or_canceled_card"


def test_a_charge_captured_in_the_second_it_was_read_is_captured(
    stripe_api, reconcile, deliver, ledger
) -> None:  # type: ignore[no-untyped-def]
    charge = stripe_api.add_charge(captured=False, metadata={"order_id": "ord_capture"}, created=NOW - 60)
    clock = Clock(NOW + 0.6)

    def slow_answer(listing: str, page: int) -> None:
        if listing == "charges":
            clock.now += 0.7

    stripe_api.on_list = slow_answer
    assert reconcile(clock=clock).status == "succeeded"
    assert ledger.get(Charge, charge["id"]).captured is False

    captured = dict(charge, captured=True, amount_captured=charge["amount"])
    assert deliver(p.event("charge.captured", captured, created=NOW)).status_code == 200
    assert ledger.get(Charge, charge["id"]).captured is True


# -- Connect: the PaymentIntent of a connected account's charge --------------------------------


def test_payment_intent_of_a_connected_charge_is_read_on_its_account(
    stripe_api, mock, reconcile, deliver, ledger
) -> None:  # type: ignore[no-untyped-def]
    account = "acct_1ConnectedAccount00"
    intent = p.payment_intent(metadata={"order_id": "ord_connect"}, created=NOW - 40)
    stripe_api.payment_intents[intent["id"]] = intent
    charge = p.charge(payment_intent=intent["id"], created=NOW - 40)  # names no order
    assert deliver(p.event("charge.succeeded", charge, account=account)).status_code == 200
    assert ledger.get(Charge, charge["id"]).order_id is None

    assert reconcile().status == "succeeded"

    (call,) = [c for c in mock.calls if urlparse(c.request.url).path == f"/v1/payment_intents/{intent['id']}"]
    assert call.request.headers.get("Stripe-Account") == account
    row = ledger.get(PaymentIntent, intent["id"])
    assert row is not None and row.account == account
    assert ledger.get(Charge, charge["id"]).order_id == "ord_connect"  # linked through it
