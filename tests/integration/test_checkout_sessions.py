"""Checkout Sessions in the ledger, end to end: signed webhooks into the real app, the
reconciliation pass through the real stripe-python SDK against the project's Stripe fake
(tests/stripe_fake/), payloads in Stripe's shapes of two API versions.

The order id sits only on the session (``client_reference_id`` or metadata); the
PaymentIntents and charges Checkout makes carry no order metadata."""

from __future__ import annotations

import time
from typing import Any

import pytest
import stripe
from sqlalchemy import select

from domain.stripe.gateway import StripeGateway
from domain.ledger.handlers import CheckoutLinking
from domain.stripe.shapes import checkout_session_snapshot
from config import Settings, SettingsError
from jobs.reconcile import run_reconciliation
from models import Charge, CheckoutSession, DuplicateCase, Order, PaymentIntent
from tests import stripe_payloads as p
from tests.stripe_fake import API

NOW = int(time.time())
VERSIONS = [p.LEGACY_API_VERSION, p.CURRENT_API_VERSION]


@pytest.fixture
def job_settings(settings: Settings) -> Settings:
    return settings.with_overrides(stripe_api_base=API, stripe_max_network_retries=0, refund_mode="auto")


@pytest.fixture
def reconcile(session_factory, job_settings):  # type: ignore[no-untyped-def]
    gateway = StripeGateway.from_settings(job_settings)

    def _run(**options: Any):  # type: ignore[no-untyped-def]
        options.setdefault("sleep", lambda seconds: None)
        return run_reconciliation(session_factory, gateway, options.pop("settings", job_settings), **options)

    return _run


def ok(response) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "received", response.get_json()


def cases(ledger, order_id: str) -> list[DuplicateCase]:  # type: ignore[no-untyped-def]
    return sorted(ledger.all(DuplicateCase, DuplicateCase.order_id == order_id), key=lambda c: c.id)


def open_tab(stripe_api, order_id: str, *, created: int, version: str, **fields: Any) -> dict:  # type: ignore[no-untyped-def]
    """A customer opens Checkout for ``order_id`` (the order named only on the session)."""
    fields.setdefault("client_reference_id", order_id)
    return stripe_api.add_checkout_session(status="open", amount_total=4999, created=created, api_version=version, **fields)


def ledger_rows(session_factory) -> dict:  # type: ignore[no-untyped-def]
    """What the ledger holds, without bookkeeping columns (times we set ourselves)."""
    skip = {"first_seen_at", "updated_at", "created_at", "version", "last_event_created"}

    def rows(session, model) -> list[dict]:  # type: ignore[no-untyped-def]
        columns = [c.key for c in model.__table__.columns if c.key not in skip]
        return sorted(
            ({c: getattr(o, c) for c in columns} for o in session.scalars(select(model))), key=lambda r: r["id"]
        )

    with session_factory() as session:
        return {m.__tablename__: rows(session, m) for m in (Order, Charge, PaymentIntent, CheckoutSession)}


# -- two tabs ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_two_paid_sessions_for_one_order_open_one_case_and_refund_the_later_charge_once(
    stripe_api, deliver, reconcile, ledger, version
) -> None:  # type: ignore[no-untyped-def]
    stripe_api.api_version = version
    tab_a = open_tab(stripe_api, "ord_tabs", created=NOW - 600, version=version)
    tab_b = open_tab(stripe_api, "ord_tabs", created=NOW - 590, version=version)
    session_a, intent_a, charge_a = stripe_api.pay_checkout_session(tab_a["id"], created=NOW - 120, api_version=version)
    session_b, intent_b, charge_b = stripe_api.pay_checkout_session(tab_b["id"], created=NOW - 60, api_version=version)
    assert charge_a["metadata"] == {} and charge_b["metadata"] == {} and intent_a["metadata"] == {}

    # Tab A: the session's event first, then the charge's. Tab B: the other way round, with
    # its PaymentIntent's event as well.
    ok(deliver(p.event("checkout.session.completed", session_a, created=NOW - 119, api_version=version)))
    ok(deliver(p.event("charge.succeeded", charge_a, created=NOW - 118, api_version=version)))
    ok(deliver(p.event("charge.succeeded", charge_b, created=NOW - 59, api_version=version)))
    ok(deliver(p.event("payment_intent.succeeded", intent_b, created=NOW - 59, api_version=version)))
    ok(deliver(p.event("checkout.session.completed", session_b, created=NOW - 58, api_version=version)))

    order = ledger.get(Order, "ord_tabs")
    assert (order.amount, order.currency, order.amount_source) == (4999, "usd", "checkout")
    assert {c.id: c.order_id for c in ledger.all(Charge)} == {charge_a["id"]: "ord_tabs", charge_b["id"]: "ord_tabs"}
    assert ledger.get(PaymentIntent, intent_b["id"]).order_id == "ord_tabs"
    assert ledger.order("ord_tabs")["totals"]["usd"]["held"] == 9998

    summary = reconcile()
    assert summary.status == "succeeded", summary.errors
    (case,) = cases(ledger, "ord_tabs")
    assert case.keeper_charge_id == charge_a["id"] and case.status == "refunded" and case.decision == "auto"
    assert stripe_api.refund_creates == 1
    (request,) = stripe_api.refund_requests
    assert request["charge"] == charge_b["id"] and request["amount"] == "4999"

    again = reconcile()
    assert again.status == "succeeded", again.errors
    assert stripe_api.refund_creates == 1 and len(cases(ledger, "ord_tabs")) == 1
    assert ledger.order("ord_tabs")["totals"]["usd"] == {"charged": 9998, "refunded": 4999, "held": 4999}


# -- whichever event comes first -----------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_session_before_or_after_its_charge_gives_the_same_ledger(
    stripe_api, deliver, session_factory, ledger, version
) -> None:  # type: ignore[no-untyped-def]
    def run(session_first: bool) -> dict:
        stripe_api.api_version = version
        tab = open_tab(
            stripe_api, "ord_order", created=NOW - 300, version=version, client_reference_id=None,
            metadata={"order_id": "ord_order"}, customer="cus_" + "A" * 14,
        )
        session, intent, charge = stripe_api.pay_checkout_session(tab["id"], created=NOW - 100, api_version=version)
        events = [
            p.event("checkout.session.completed", session, created=NOW - 99, api_version=version),
            p.event("charge.succeeded", charge, created=NOW - 99, api_version=version),
        ]
        for event in events if session_first else reversed(events):
            ok(deliver(event))
        rows = ledger_rows(session_factory)
        # ids differ between the runs: compare the shape with ids replaced
        for table in rows.values():
            for row in table:
                for key, value in row.items():
                    if value in (session["id"], intent["id"], charge["id"]):
                        row[key] = {session["id"]: "<session>", intent["id"]: "<intent>", charge["id"]: "<charge>"}[value]
        return rows

    first = run(session_first=True)
    assert first["orders"][0]["status"] == "paid" and first["orders"][0]["amount_source"] == "checkout"
    assert first["charges"][0]["order_id"] == "ord_order"
    assert first["checkout_sessions"][0]["payment_intent_id"] == "<intent>"
    with session_factory.kw["bind"].begin() as connection:  # start over with the other order
        for table in ("charges", "checkout_sessions", "payment_intents", "stripe_events", "orders"):
            connection.exec_driver_sql(f"DELETE FROM {table}")
    second = run(session_first=False)
    assert first == second


# -- async payments ------------------------------------------------------------------------


def test_an_async_payment_that_fails_opens_no_case(stripe_api, deliver, reconcile, ledger) -> None:  # type: ignore[no-untyped-def]
    # Tab A: a bank debit that fails days later; tab B: a card payment that succeeds.
    tab_a = open_tab(stripe_api, "ord_async", created=NOW - 900, version=p.CURRENT_API_VERSION)
    tab_b = open_tab(stripe_api, "ord_async", created=NOW - 800, version=p.CURRENT_API_VERSION)
    session_a, _, pending = stripe_api.pay_checkout_session(tab_a["id"], created=NOW - 700, async_payment="processing")
    assert session_a["payment_status"] == "unpaid"
    ok(deliver(p.event("checkout.session.completed", session_a, created=NOW - 699)))
    assert deliver(p.event("charge.pending", pending, created=NOW - 699)).status_code == 200  # stored, not applied
    session_b, _, paid = stripe_api.pay_checkout_session(tab_b["id"], created=NOW - 600)
    ok(deliver(p.event("charge.succeeded", paid, created=NOW - 599)))
    ok(deliver(p.event("checkout.session.completed", session_b, created=NOW - 598)))

    # The debit fails: the charge fails, the session stays complete and unpaid.
    failed = dict(stripe_api.charges[pending["id"]], status="failed", failure_code="insufficient_funds")
    stripe_api.charges[pending["id"]] = failed
    ok(deliver(p.event("charge.failed", stripe_api.charge(pending["id"]), created=NOW - 100)))
    ok(deliver(p.event("checkout.session.async_payment_failed", session_a, created=NOW - 100)))

    row = ledger.get(CheckoutSession, session_a["id"])
    assert row.payment_failed and row.status == "complete" and row.payment_status == "unpaid"
    assert row.order_id == "ord_async"
    assert {c.id: (c.order_id, c.status) for c in ledger.all(Charge)} == {
        pending["id"]: ("ord_async", "failed"),
        paid["id"]: ("ord_async", "succeeded"),
    }
    order = ledger.get(Order, "ord_async")
    assert order.status == "paid" and order.amount == 4999 and order.amount_source == "checkout"

    summary = reconcile()
    assert summary.status == "succeeded", summary.errors
    assert cases(ledger, "ord_async") == [] and stripe_api.refund_creates == 0


def test_async_payment_succeeded_moves_the_session_to_paid(stripe_api, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    tab = open_tab(stripe_api, "ord_debit", created=NOW - 900, version=p.CURRENT_API_VERSION)
    session, _, _ = stripe_api.pay_checkout_session(tab["id"], created=NOW - 700, async_payment="processing")
    ok(deliver(p.event("checkout.session.completed", session, created=NOW - 699)))
    assert ledger.get(CheckoutSession, session["id"]).payment_status == "unpaid"
    ok(deliver(p.event("checkout.session.async_payment_succeeded", dict(session, payment_status="paid"), created=NOW - 10)))
    row = ledger.get(CheckoutSession, session["id"])
    assert (row.status, row.payment_status, row.payment_failed) == ("complete", "paid", False)


# -- replay and order ----------------------------------------------------------------------


def test_a_replayed_or_older_session_event_changes_nothing(stripe_api, deliver, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    tab = open_tab(stripe_api, "ord_replay", created=NOW - 900, version=p.CURRENT_API_VERSION)
    unpaid, _, charge = stripe_api.pay_checkout_session(tab["id"], created=NOW - 700, async_payment="processing")
    completed = p.event("checkout.session.completed", unpaid, created=NOW - 699)
    succeeded = p.event("checkout.session.async_payment_succeeded", dict(unpaid, payment_status="paid"), created=NOW - 10)
    ok(deliver(completed))
    ok(deliver(succeeded))
    ok(deliver(p.event("charge.succeeded", dict(charge, status="succeeded"), created=NOW - 10)))
    before = ledger_rows(session_factory)
    assert before["checkout_sessions"][0]["payment_status"] == "paid"

    # the same event again: answered duplicate
    again = deliver(completed)
    assert again.status_code == 200 and again.get_json()["status"] == "duplicate"
    # an older snapshot under a new event id, and one of the same second, still unpaid
    ok(deliver(p.event("checkout.session.completed", unpaid, created=NOW - 699)))
    ok(deliver(p.event("checkout.session.completed", unpaid, created=NOW - 10)))
    # an older expired-looking snapshot naming another order
    other = dict(unpaid, status="expired", client_reference_id="ord_other", amount_total=1)
    ok(deliver(p.event("checkout.session.expired", other, created=NOW - 800)))
    assert ledger_rows(session_factory) == before
    assert ledger.get(Order, "ord_other") is None


# -- backfill ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_backfill_finds_a_session_whose_webhook_never_came(
    stripe_api, deliver, reconcile, ledger, version
) -> None:  # type: ignore[no-untyped-def]
    stripe_api.api_version = version
    tab_a = open_tab(stripe_api, "ord_missed_session", created=NOW - 600, version=version, client_reference_id=None, metadata={"order_id": "ord_missed_session"})
    tab_b = open_tab(stripe_api, "ord_missed_session", created=NOW - 590, version=version, client_reference_id=None, metadata={"order_id": "ord_missed_session"})
    session_a, _, charge_a = stripe_api.pay_checkout_session(tab_a["id"], created=NOW - 120, api_version=version)
    _, _, charge_b = stripe_api.pay_checkout_session(tab_b["id"], created=NOW - 60, api_version=version)
    ok(deliver(p.event("checkout.session.completed", session_a, created=NOW - 119, api_version=version)))
    ok(deliver(p.event("charge.succeeded", charge_a, created=NOW - 118, api_version=version)))
    ok(deliver(p.event("charge.succeeded", charge_b, created=NOW - 59, api_version=version)))
    # tab B's session event never came: its charge names no order
    assert ledger.get(Charge, charge_b["id"]).order_id is None

    summary = reconcile()
    assert summary.status == "succeeded", summary.errors
    assert summary.backfill["checkout_sessions"] == 2
    assert any("/v1/checkout/sessions" in url for url in stripe_api.list_requests)
    assert ledger.get(Charge, charge_b["id"]).order_id == "ord_missed_session"
    assert ledger.get(CheckoutSession, tab_b["id"]).order_id == "ord_missed_session"
    (case,) = cases(ledger, "ord_missed_session")
    assert case.keeper_charge_id == charge_a["id"] and case.status == "refunded"
    assert stripe_api.refund_creates == 1 and stripe_api.refund_requests[0]["charge"] == charge_b["id"]
    assert summary.watermarks["checkout_sessions"] >= NOW - 590


def test_backfill_where_the_sessions_api_is_not_available(stripe_api, reconcile, ledger) -> None:  # type: ignore[no-untyped-def]
    stripe_api.checkout_api = False
    stripe_api.add_charge(metadata={"order_id": "ord_plain"}, created=NOW - 100)
    summary = reconcile()
    assert summary.status == "succeeded", summary.errors
    assert "checkout_sessions" in summary.watermarks
    assert ledger.get(Order, "ord_plain") is not None


# -- the fake's sessions API through the real SDK ------------------------------------------


def test_fake_checkout_sessions_api_create_retrieve_list_expire(stripe_api, job_settings) -> None:  # type: ignore[no-untyped-def]
    client = stripe.StripeClient(
        "sk_test_unit", base_addresses={"api": API}, http_client=stripe.RequestsClient(), max_network_retries=0
    )
    params = {
        "mode": "payment",
        "success_url": "https://example.com/ok",
        "client_reference_id": "ord_sdk",
        "metadata": {"order_id": "ord_sdk"},
        "line_items": [{"price_data": {"currency": "eur", "unit_amount": 1500, "product_data": {"name": "Mug"}}, "quantity": 2}],
    }
    created = client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "co-ord_sdk-1"})  # type: ignore[arg-type]
    assert created.id.startswith("cs_test_") and created.object == "checkout.session"
    assert (created.status, created.payment_status, created.amount_total, created.currency) == ("open", "unpaid", 3000, "eur")
    assert created.url and created.payment_intent is None and created.client_reference_id == "ord_sdk"
    replay = client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "co-ord_sdk-1"})  # type: ignore[arg-type]
    assert replay.id == created.id and len(stripe_api.checkout_sessions) == 1
    with pytest.raises(stripe.IdempotencyError):
        client.v1.checkout.sessions.create(params={**params, "client_reference_id": "ord_x"}, options={"idempotency_key": "co-ord_sdk-1"})  # type: ignore[arg-type]
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.checkout.sessions.create(params={"success_url": "https://example.com/ok"})  # type: ignore[arg-type]
    assert missing.value.code == "parameter_missing" and missing.value.param == "mode"

    assert client.v1.checkout.sessions.retrieve(created.id).metadata["order_id"] == "ord_sdk"
    listed = client.v1.checkout.sessions.list(params={"limit": 1})  # type: ignore[arg-type]
    assert [s.id for s in listed.data] == [created.id]

    expired = client.v1.checkout.sessions.expire(created.id)
    assert expired.status == "expired" and expired.url is None
    with pytest.raises(stripe.InvalidRequestError) as not_open:
        client.v1.checkout.sessions.expire(created.id)
    assert not_open.value.http_status == 400 and "status of \"expired\"" in str(not_open.value)
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v1.checkout.sessions.retrieve("cs_test_nope")
    assert unknown.value.http_status == 404 and unknown.value.code == "resource_missing"

    # the gateway pages through them (created[gt], starting_after)
    for i in range(5):
        stripe_api.add_checkout_session(created=NOW - 50 + i)
    gateway = StripeGateway.from_settings(job_settings)
    ids = [s["id"] for s in gateway.list_checkout_sessions(created_gte=NOW - 48, page_size=2)]
    assert len(ids) == 4 and len(set(ids)) == 4  # three seeded, and the one created above


# -- settings: metadata key and Payment Links ----------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_order_from_metadata_key_and_payment_links(version) -> None:
    session = p.checkout_session(metadata={"cart": "ord_cart"}, api_version=version)
    assert checkout_session_snapshot(session).order_id is None
    assert checkout_session_snapshot(session, metadata_key="cart").order_id == "ord_cart"
    with_ref = dict(session, client_reference_id="ord_ref")
    assert checkout_session_snapshot(with_ref, metadata_key="cart").order_id == "ord_ref"

    link = p.checkout_session(payment_link="plink_1Mug", customer="cus_Alice", api_version=version)
    assert checkout_session_snapshot(link).payment_link_id == "plink_1Mug"
    assert checkout_session_snapshot(link).order_id is None  # default: off
    linking = CheckoutLinking(payment_link_orders={"plink_1Mug": "mug"})
    assert linking.snapshot(link).order_id == "mug:cus_Alice"
    guest = dict(link, customer=None)
    by_email = linking.snapshot(guest).order_id
    assert by_email is not None and by_email.startswith("mug:email-")
    assert linking.snapshot(dict(guest, customer_details={**guest["customer_details"], "email": "JENNY.ROSEN@example.com "})).order_id == by_email

    settings = Settings.from_env({"CHECKOUT_ORDER_METADATA_KEY": "cart", "PAYMENT_LINK_ORDERS": "plink_1Mug=mug, plink_2Cap=cap"})
    assert settings.checkout_order_metadata_key == "cart"
    assert settings.payment_link_orders == (("plink_1Mug", "mug"), ("plink_2Cap", "cap"))
    assert Settings.from_env({}).payment_link_orders == () and Settings.from_env({}).checkout_order_metadata_key == "order_id"
    with pytest.raises(SettingsError):
        Settings.from_env({"PAYMENT_LINK_ORDERS": "mug"})



# -- concurrency (PostgreSQL) --------------------------------------------------------------


@pytest.mark.postgres
def test_a_session_and_its_charge_at_the_same_instant_always_link(app, ledger, session_factory) -> None:  # type: ignore[no-untyped-def]
    """Each event looks for the other (the charge for the session's order, the session for
    the charges to link); the PaymentIntent lock keeps them from missing each other. Two
    appliers with batches of one apply the two halves side by side."""
    from tests.appliers import drain_with_appliers

    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import WEBHOOK_SECRET

    bodies: list[list[bytes]] = [[], []]
    for n in range(40):
        pi_id = p.new_id("pi")
        charge = p.charge(payment_intent=pi_id, created=NOW - 10)  # no order metadata
        session = p.checkout_session(payment_intent=pi_id, client_reference_id=f"ord_race_{n}", created=NOW - 20)
        bodies[0].append(p.encode(p.event("charge.succeeded", charge)))
        bodies[1].append(p.encode(p.event("checkout.session.completed", session)))

    barrier = threading.Barrier(2)

    def worker(index: int) -> list[int]:
        barrier.wait()
        client = app.test_client()
        return [
            client.post("/webhooks/stripe", data=raw, headers={"Stripe-Signature": p.sign(raw, WEBHOOK_SECRET)}).status_code
            for raw in bodies[index]
        ]

    with ThreadPoolExecutor(2) as pool:
        statuses = [s for chunk in pool.map(worker, range(2)) for s in chunk]
    assert statuses == [200] * 80
    drain_with_appliers(session_factory, 2, batch_size=1)
    assert ledger.all(Charge, Charge.order_id.is_(None)) == []
    assert ledger.count(Order) == 40
