"""The fake Stripe (tests/stripe_fake): its two transports answer alike, and the demo takes
it from the repository, never from the installed package."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Iterator

import pytest
import responses
import stripe

from tests.stripe_fake import API, FakeStripe, StripeDouble, StripeModel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["responses", "http"])
def fake(request: pytest.FixtureRequest) -> Iterator[tuple[StripeModel, stripe.StripeClient]]:
    """The same model behind each transport, with a client of the real SDK."""
    if request.param == "responses":
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            model = FakeStripe(mock)
            yield model, stripe.StripeClient("sk_test_unit", base_addresses={"api": API}, max_network_retries=0)
    else:
        with StripeDouble() as double:
            yield double, double.client()


def test_a_refund_key_replays_its_first_answer_and_refuses_other_parameters(fake: Any) -> None:
    model, client = fake
    charge = model.add_charge(amount=5000)
    options = {"idempotency_key": "refund-1"}
    first = client.v1.refunds.create(params={"charge": charge["id"], "amount": 2000}, options=options)
    again = client.v1.refunds.create(params={"charge": charge["id"], "amount": 2000}, options=options)
    assert again.id == first.id and model.refund_creates == 1
    assert again.last_response.headers.get("Idempotent-Replayed") == "true"
    with pytest.raises(stripe.IdempotencyError):
        client.v1.refunds.create(params={"charge": charge["id"], "amount": 1000}, options=options)
    with pytest.raises(stripe.InvalidRequestError) as too_much:
        client.v1.refunds.create(params={"charge": charge["id"], "amount": 3001})
    assert too_much.value.code == "charge_already_refunded"
    assert model.charge(charge["id"])["amount_refunded"] == 2000


def test_lists_page_newest_first_and_count_their_pages(fake: Any) -> None:
    model, client = fake
    made = [model.add_charge(created=1_700_000_000 + i)["id"] for i in range(5)]
    model.fail_list_pages[("charges", 2)] = 500
    since: Any = {"gt": 1_700_000_000}
    first = client.v1.charges.list(params={"limit": 2, "created": since})
    assert [c.id for c in first.data] == [made[4], made[3]] and first.has_more
    with pytest.raises(stripe.APIError):
        client.v1.charges.list(params={"limit": 2, "created": since, "starting_after": first.data[-1].id})
    second = client.v1.charges.list(params={"limit": 2, "created": since, "starting_after": first.data[-1].id})
    assert [c.id for c in second.data] == [made[2], made[1]] and not second.has_more
    assert len(model.list_requests) == 3


def test_payment_intents_and_sessions_follow_stripe_rules(fake: Any) -> None:
    model, client = fake
    intent = client.v1.payment_intents.create(params={"amount": 1000, "currency": "usd", "metadata": {"order_id": "o1"}}, options={"idempotency_key": "pi-1"})
    assert (intent.status, intent.metadata.to_dict()) == ("requires_payment_method", {"order_id": "o1"}) and model.creates == 1
    model.set_status(intent.id, "processing")
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.payment_intents.cancel(intent.id)
    assert refused.value.code == "payment_intent_unexpected_state"
    session = client.v1.checkout.sessions.create(params={
        "mode": "payment", "success_url": "https://shop.example/ok", "client_reference_id": "o2",
        "line_items": [{"quantity": 2, "price_data": {"currency": "eur", "unit_amount": 700, "product_data": {"name": "x"}}}],
        "payment_intent_data": {"metadata": {"order_id": "o2"}},
    })
    assert (session.status, session.amount_total, session.currency) == ("open", 1400, "eur")
    assert "_pi_metadata" not in session and model.sessions[session.id]["_pi_metadata"] == {"order_id": "o2"}
    paid = model.complete_session(session.id)
    assert model.payment_intents[paid["payment_intent"]]["metadata"] == {"order_id": "o2"}
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.checkout.sessions.expire(session.id)
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v1.payment_intents.retrieve("pi_missing")
    assert unknown.value.http_status == 404 and unknown.value.code == "resource_missing"


def test_the_wheel_ships_no_stripe_fake() -> None:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not [pattern for pattern in include for name in ("tests", "tests.stripe_fake") if fnmatch(name, pattern)]
    assert not list((ROOT / "app").rglob("*stripe*.py"))  # no Stripe double inside the shipped packages


def test_without_a_checkout_the_demo_says_what_it_needs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An installed wheel has neither the emulator nor the fake (both live in tests/)."""
    import app.demo as demo

    monkeypatch.setattr(demo, "ROOT", tmp_path)
    monkeypatch.setattr(demo, "EMULATOR_DIR", tmp_path / "tests" / "emulator" / "stateful_mock")
    for choice in ("auto", "simulated"):
        with pytest.raises(demo.DemoError, match=r"not part of the installed package\. Run the demo from a checkout of the repository"):
            with demo._stripe(choice, tmp_path):
                pass
    with pytest.raises(demo.DemoError, match="stripe-stateful-mock is not installed"):
        with demo._stripe("emulator", tmp_path):
            pass
