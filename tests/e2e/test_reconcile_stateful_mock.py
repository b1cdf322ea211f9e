"""End to end: ``reconciler reconcile --mode auto`` against stripe-stateful-mock, a Stripe
emulator running as a real Node process on 127.0.0.1 that honours Idempotency-Key and
refuses over-refunds.

The test plays the merchant's checkout and Stripe's webhook sender: it creates charges at
the emulator with the SDK, then posts each one to our endpoint as a signed
``charge.succeeded`` event built from the emulator's own charge JSON (the emulator sends no
events). One webhook is "missed" on purpose, so only the backfill can find that charge.
The emulator is then asked, charge by charge, which refunds exist.

The emulator's store is shared by every test in the module and never flushed, and its
charge list ignores ``created`` filters, so the backfill reads every charge it holds:
order ids are unique per test and only this test's charges are asserted on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import stripe

from tests import stripe_payloads as p
from tests.emulator import StatefulMock
from tests.e2e import merchant
from tests.servers import ROOT, reconciler_serve

pytestmark = pytest.mark.e2e

SECRET = "whsec_stateful_mock_0123456789abcdef"
TOKEN = "e2e-stateful-mock-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def emulator() -> Iterator[StatefulMock]:
    with StatefulMock() as mock:
        yield mock


@pytest.fixture
def env(emulator: StatefulMock, database_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "STRIPE_API_KEY": p.new_id("sk_test"),  # one per test; the emulator's store is shared anyway
        "STRIPE_API_BASE": emulator.base_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "API_TOKEN": TOKEN,
        "STRIPE_MAX_NETWORK_RETRIES": "0",
        "BACKFILL_DAYS": "1",
        "REFUND_MODE": "review",  # the command's --mode auto is what turns refunds on
        "LOG_LEVEL": "WARNING",
    }


def _clean_environ(env: dict[str, str]) -> dict[str, str]:
    """The process environment for our subprocesses: no alert targets (nothing may leave
    127.0.0.1) and no proxies for loopback."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ALERT_", "SMTP_", "STRIPE_", "REFUND_", "BACKFILL_", "DUPLICATE_", "AUTO_REFUND_"))
    }
    base["NO_PROXY"] = base["no_proxy"] = "127.0.0.1,localhost"
    return {**base, "PYTHONPATH": str(ROOT), **env}


@pytest.fixture
def service(env: dict[str, str], session_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:  # type: ignore[no-untyped-def]
    # reconciler_serve layers env over os.environ: keep stray alert settings out.
    for key in list(os.environ):
        if key.startswith(("ALERT_", "SMTP_")):
            monkeypatch.delenv(key)
    with reconciler_serve(["--workers", "2", "--no-migrate"], env, tmp_path / "serve.log") as base:
        yield base


@pytest.fixture
def checkout(emulator: StatefulMock, env: dict[str, str]) -> stripe.StripeClient:
    return merchant.emulator_client(env["STRIPE_API_KEY"], emulator.base_url)


def reconcile(env: dict[str, str], mode: str = "auto") -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "cli", "reconcile", "--mode", mode, "--json"],
        cwd=ROOT,
        env=_clean_environ(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return json.loads(result.stdout)


def create_order(service: str, order_id: str, amount: int) -> None:
    response = requests.post(
        f"{service}/api/orders", json={"id": order_id, "amount": amount, "currency": "usd"}, headers=AUTH, timeout=10
    )
    assert response.status_code == 201, response.text


def deliver(service: str, charge_json: dict[str, Any]) -> None:
    merchant.deliver(service, charge_json, SECRET)


def later(charges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rule's keeper order: earliest ``created`` first, then the smallest id."""
    return sorted(charges, key=lambda c: (c["created"], c["id"]))


def refunds_at_emulator(checkout: stripe.StripeClient, charge_ids: list[str]) -> dict[str, list[Any]]:
    return {cid: list(checkout.v1.refunds.list(params={"charge": cid}).data) for cid in charge_ids}


def order_view(service: str, order_id: str) -> dict[str, Any]:
    response = requests.get(f"{service}/api/orders/{order_id}", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("missed_webhook", ["a_duplicate", "a_keeper"])
def test_auto_reconcile_refunds_exactly_the_duplicates_at_the_emulator_and_a_rerun_adds_none(service, checkout, env, missed_webhook) -> None:  # type: ignore[no-untyped-def]
    """``missed_webhook``: whose charge.succeeded never arrives, the triple click's
    duplicate that gets refunded or the double click's keeper. The second case also runs
    against an emulator still holding the first case's charges and refunds."""
    run = p.new_id("t")[2:12].lower()
    double, triple, mixed, ambiguous = (f"ord_{run}_{name}" for name in ("double", "triple", "mixed", "ambiguous"))
    create_order(service, double, 4999)
    create_order(service, triple, 9998)
    create_order(service, mixed, 10000)
    create_order(service, ambiguous, 5000)

    charges = {
        double: [merchant.charge(checkout, double, 4999), merchant.charge(checkout, double, 4999)],
        triple: [merchant.charge(checkout, triple, 4999) for _ in range(3)],
        mixed: [merchant.charge(checkout, mixed, 4000), merchant.charge(checkout, mixed, 6000), merchant.charge(checkout, mixed, 6000)],
        ambiguous: [merchant.charge(checkout, ambiguous, 5000), merchant.charge(checkout, ambiguous, 1500)],
    }
    mine = [c["id"] for cs in charges.values() for c in cs]

    # The duplicate the rule refunds: the last in keeper order among each order's twins.
    expected = {
        double: later(charges[double])[-1],
        triple: later(charges[triple])[-1],
        mixed: later([c for c in charges[mixed] if c["amount"] == 6000])[-1],
    }
    # Its webhook never arrives: only the backfill can find it.
    missed = expected[triple] if missed_webhook == "a_duplicate" else later(charges[double])[0]
    missed_order = triple if missed_webhook == "a_duplicate" else double
    for cs in charges.values():
        for c in cs:
            if c["id"] != missed["id"]:
                deliver(service, c)
    assert missed["id"] not in {c["id"] for c in order_view(service, missed_order)["charges"]}

    first = reconcile(env)
    assert first["status"] == "succeeded" and first["mode"] == "auto", first
    assert first["errors"] == [], first
    counts = first["counts"]
    assert counts["refunds_issued"] == 3, first
    assert counts["refunded_amounts"] == {"usd": 4999 + 4999 + 6000}, first
    assert counts["refunds_failed"] == 0 and counts["refunds_deferred"] == 0, first
    # Every charge the emulator holds is read (it ignores the created filter): ours and
    # those of earlier tests in this module.
    assert counts["charges_backfilled"] >= len(mine), first

    # The emulator: exactly one full refund, reason duplicate, on each expected duplicate;
    # nothing on keepers or on the ambiguous order.
    refunds = refunds_at_emulator(checkout, mine)
    expected_ids = {c["id"]: c["amount"] for c in expected.values()}
    for charge_id, found in refunds.items():
        if charge_id in expected_ids:
            assert len(found) == 1, (charge_id, found)
            assert found[0].amount == expected_ids[charge_id]
            assert found[0].reason == "duplicate"
            assert found[0].status == "succeeded"
        else:
            assert found == [], (charge_id, found)
    for charge_id, amount in expected_ids.items():
        emulated = checkout.v1.charges.retrieve(charge_id)
        assert emulated.refunded is True and emulated.amount_refunded == amount

    # A rerun refunds nothing more.
    second = reconcile(env)
    assert second["status"] == "succeeded", second
    assert second["counts"]["refunds_issued"] == 0, second
    assert second["counts"]["refunds_failed"] == 0, second
    again = refunds_at_emulator(checkout, mine)
    assert {cid: [r.id for r in rs] for cid, rs in again.items()} == {cid: [r.id for r in rs] for cid, rs in refunds.items()}

    # Our cases: the three clear duplicates refunded automatically, the ambiguous order
    # left open for a person.
    listed = requests.get(f"{service}/api/duplicates", params={"per_page": 200}, headers=AUTH, timeout=10)
    assert listed.status_code == 200, listed.text
    cases = {c["order_id"]: (c["status"], c["automatic"]) for c in listed.json()["cases"] if c["order_id"] in charges}
    assert cases == {
        double: ("refunded", True),
        triple: ("refunded", True),
        mixed: ("refunded", True),
        ambiguous: ("open", False),
    }

    # Our ledger agrees.
    totals = {order_id: order_view(service, order_id)["totals"] for order_id in charges}
    assert totals == {
        double: {"usd": {"charged": 9998, "refunded": 4999, "held": 4999}},
        triple: {"usd": {"charged": 14997, "refunded": 4999, "held": 9998}},
        mixed: {"usd": {"charged": 16000, "refunded": 6000, "held": 10000}},
        ambiguous: {"usd": {"charged": 6500, "refunded": 0, "held": 6500}},
    }
    assert missed["id"] in {c["id"] for c in order_view(service, missed_order)["charges"]}
    ledger_refunds = {
        c["id"]: [(r["amount"], r["status"], r["reason"]) for r in c["refunds"]]
        for order_id in charges
        for c in order_view(service, order_id)["charges"]
    }
    assert ledger_refunds == {
        cid: ([(expected_ids[cid], "succeeded", "duplicate")] if cid in expected_ids else []) for cid in mine
    }


def test_approved_refunds_are_checked_against_the_whole_order_at_the_emulator(service, checkout, env) -> None:  # type: ignore[no-untyped-def]
    """A triple click found by a review pass; before finance approves, support refunds
    10.00 of one duplicate at Stripe (no webhook). The approval re-reads every charge of
    the order at the emulator: that duplicate is skipped (it no longer holds its refund),
    the other is refunded once, and the case goes back to a person instead of closing."""
    order_id = f"ord_{p.new_id('t')[2:12].lower()}_whole"
    create_order(service, order_id, 4999)
    charges = later([merchant.charge(checkout, order_id, 4999) for _ in range(3)])
    for c in charges:
        deliver(service, c)
    first = reconcile(env, mode="review")
    assert first["status"] == "succeeded", first
    listed = requests.get(f"{service}/api/duplicates", params={"per_page": 200}, headers=AUTH, timeout=10).json()
    (case,) = [c for c in listed["cases"] if c["order_id"] == order_id]
    assert case["automatic"] and case["status"] == "open"

    keeper, middle, last = charges
    checkout.v1.refunds.create(params={"charge": last["id"], "amount": 1000})  # support, outside the service
    approved = requests.post(f"{service}/api/duplicates/{case['id']}/refund", headers=AUTH, timeout=30)
    assert approved.status_code == 200, approved.text
    outcomes = {o["charge_id"]: o["result"] for o in approved.json()["outcomes"]}
    assert outcomes == {middle["id"]: "refunded", last["id"]: "skipped"}, approved.json()

    refunds = refunds_at_emulator(checkout, [c["id"] for c in charges])
    assert refunds[keeper["id"]] == []
    assert [(r.amount, r.reason) for r in refunds[middle["id"]]] == [(4999, "duplicate")]
    assert [r.amount for r in refunds[last["id"]]] == [1000]  # only the outside refund
    held = sum(checkout.v1.charges.retrieve(c["id"]).amount - checkout.v1.charges.retrieve(c["id"]).amount_refunded for c in charges)
    assert held == 4999 + 3999  # never below the total; the rest is a person's decision
    view = requests.get(f"{service}/api/duplicates/{case['id']}", headers=AUTH, timeout=10).json()
    assert view["status"] == "open" and not view["automatic"]
    assert any(r.startswith("refund_skipped") for r in view["review_reasons"]), view["review_reasons"]
