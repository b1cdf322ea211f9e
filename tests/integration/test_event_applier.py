"""The applier: set-based and per-event paths agree, one bad event never blocks its batch,
failures back off and alert once, a killed applier loses nothing and applies nothing twice,
and the accept path answers 503 (storing nothing) when the database is down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import sessionmaker

from app import create_app
from domain.ledger import handlers
from domain.ledger.applier import Applier, backoff
from domain.ledger.inbox import Inbox
from models import Charge, CheckoutSession, EventFailure, Order, PaymentIntent, StripeEvent, make_engine
from tests import stripe_payloads as p
from tests.conftest import WEBHOOK_SECRET

ROOT = Path(__file__).resolve().parents[2]


def _store(settings, session_factory, events) -> None:  # type: ignore[no-untyped-def]
    inbox = Inbox(settings, session_factory.kw["bind"])
    for event in events:
        assert inbox.store(p.encode(event)).status == "received"


def _mixed_events() -> list[dict]:
    """New charges named by metadata, by their PaymentIntent, by a Checkout Session, not
    at all; charges with refunds embedded; one charge told twice; several per order."""
    t0 = 1_763_000_000
    events: list[dict] = []
    for api_version in (p.LEGACY_API_VERSION, p.CURRENT_API_VERSION):
        pi_known = p.new_id("pi")
        events.append(p.event("payment_intent.succeeded", p.payment_intent(id=pi_known, metadata={"order_id": f"ord_pi_{api_version}"}), created=t0, api_version=api_version))
        pi_checkout = p.new_id("pi")
        events.append(p.event("checkout.session.completed", p.checkout_session(payment_intent=pi_checkout, client_reference_id=f"ord_cs_{api_version}", payment_status="paid"), created=t0, api_version=api_version))
        for n in range(3):
            events.append(p.event("charge.succeeded", p.charge(amount=1000 + n, metadata={"order_id": f"ord_meta_{api_version}"}), created=t0 + 10 + n, api_version=api_version))
        events.append(p.event("charge.succeeded", p.charge(amount=700, payment_intent=pi_known), created=t0 + 20, api_version=api_version))
        events.append(p.event("charge.succeeded", p.charge(amount=800, payment_intent=pi_checkout), created=t0 + 21, api_version=api_version))
        events.append(p.event("charge.succeeded", p.charge(amount=900), created=t0 + 22, api_version=api_version))  # names no order
        twice = p.charge(amount=1500, metadata={"order_id": f"ord_twice_{api_version}"})
        events.append(p.event("charge.succeeded", twice, created=t0 + 30, api_version=api_version))
        events.append(p.event("charge.refunded", dict(twice, amount_refunded=1500, refunded=True), created=t0 + 31, api_version=api_version))
        events.append(p.event("charge.succeeded", p.charge(amount=600, amount_refunded=200, metadata={"order_id": f"ord_refunded_{api_version}"}), created=t0 + 40, api_version=api_version))
        events.append(p.event("charge.failed", p.charge(amount=300, status="failed", metadata={"order_id": f"ord_failed_{api_version}"}), created=t0 + 41, api_version=api_version))
    return events


def _ledger_rows(session_factory) -> dict[str, list]:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        return {
            "charges": sorted(
                (c.id, c.order_id, c.payment_intent_id, c.amount, c.amount_captured, c.currency, c.status, c.captured,
                 c.reported_refunded, c.released, c.last_event_created)
                for c in session.scalars(select(Charge))
            ),
            "orders": sorted((o.id, o.status, o.amount, o.payment_intent_id) for o in session.scalars(select(Order))),
            "events": sorted((e.event_id, e.status) for e in session.scalars(select(StripeEvent))),
        }


def _empty(session_factory) -> None:  # type: ignore[no-untyped-def]
    engine = session_factory.kw["bind"]
    with engine.begin() as connection:
        for table in ("refunds", "charges", "checkout_sessions", "payment_intents", "orders", "event_failures", "stripe_events"):
            connection.execute(text(f"DELETE FROM {table}"))


def test_the_set_based_path_leaves_the_same_rows_as_one_event_at_a_time(settings, session_factory) -> None:  # type: ignore[no-untyped-def]
    events = _mixed_events()
    results = []
    for set_based in (True, False):
        _store(settings, session_factory, events)
        applier = Applier(session_factory, batch_size=500, set_based=set_based)
        assert applier.drain().applied == len(events)
        results.append(_ledger_rows(session_factory))
        _empty(session_factory)
    batched, one_by_one = results
    assert batched == one_by_one
    assert len(batched["charges"]) == 18
    linked = {row[0]: row[1] for row in batched["charges"]}
    assert sum(1 for order in linked.values() if order is None) == 2  # the charges that name no order
    assert all(status == "applied" for _, status in batched["events"])


def test_the_set_based_path_is_taken_for_new_charges(settings, session_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Ten new charges of one batch go through charge_batch, not ten apply_charge calls."""
    calls: list[str] = []
    original = handlers.upserts.apply_charge

    def counting(session, snapshot, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(snapshot.id)
        return original(session, snapshot, **kwargs)

    monkeypatch.setattr(handlers.upserts, "apply_charge", counting)
    _store(settings, session_factory, [p.event("charge.succeeded", p.charge(metadata={"order_id": f"ord_{n % 3}"})) for n in range(10)])
    assert Applier(session_factory).drain().applied == 10
    assert calls == []
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Charge).where(Charge.order_id.is_not(None))) == 10
        assert {o.status for o in session.scalars(select(Order))} == {"paid"}


def test_one_bad_event_fails_alone_backs_off_and_alerts_once(settings, session_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    good = [p.event("charge.succeeded", p.charge(metadata={"order_id": f"ord_good_{n}"})) for n in range(5)]
    poison = p.event("refund.created", p.refund(charge="ch_missing", amount=100))
    original = handlers.HANDLERS["refund.created"]

    def explode(session, event, linking):  # type: ignore[no-untyped-def]
        original(session, event, linking)  # writes, then fails: the savepoint undoes it
        raise RuntimeError("refund handler exploded")

    monkeypatch.setitem(handlers.HANDLERS, "refund.created", explode)
    _store(settings, session_factory, [good[0], good[1], poison, *good[2:]])
    alerts: list[tuple[str, str, str]] = []
    applier = Applier(session_factory, alert_after=3, alert=lambda *a: alerts.append(a) or True)
    outcome = applier.apply_batch()
    assert (outcome.claimed, outcome.applied, outcome.failed) == (6, 5, 1)
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Charge)) == 5
        assert session.scalar(text("SELECT count(*) FROM refunds")) == 0
        row = session.get(StripeEvent, poison["id"])
        assert (row.status, row.attempts) == ("failed", 1)
        waited = row.next_attempt_at - row.received_at
        assert backoff(1).total_seconds() - 5 <= waited.total_seconds() <= backoff(1).total_seconds() + 5
    assert applier.apply_batch().claimed == 0  # in backoff
    for attempt in range(2, 6):
        with session_factory.begin() as session:
            session.execute(update(StripeEvent).where(StripeEvent.event_id == poison["id"]).values(next_attempt_at=None))
        assert applier.apply_batch().failed == 1
        with session_factory() as session:
            assert session.get(StripeEvent, poison["id"]).attempts == attempt
            assert session.get(EventFailure, poison["id"]).attempts == attempt
    assert [key for key, _, _ in alerts] == [f"poison-event:{poison['id']}"]
    assert "3 attempt(s)" in alerts[0][2] and "refund handler exploded" in alerts[0][2]
    assert backoff(5) > backoff(4) > backoff(1) and backoff(50).total_seconds() == 3600


def test_the_accept_path_answers_503_and_stores_nothing_when_the_database_is_down(settings, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    unreachable = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    app = create_app(settings, session_factory=sessionmaker(bind=unreachable))
    body = p.encode(p.event("charge.succeeded", p.charge()))
    response = app.test_client().post("/webhooks/stripe", data=body, headers={"Stripe-Signature": p.sign(body, WEBHOOK_SECRET)})
    assert response.status_code == 503
    assert response.get_json()["error"] == "event_not_stored"
    assert ledger.count(StripeEvent) == 0


def test_a_running_applier_beats_and_health_shows_it(app, client, settings, session_factory, deliver) -> None:  # type: ignore[no-untyped-def]
    import threading

    response = deliver(p.event("charge.succeeded", p.charge(metadata={"order_id": "ord_hb"})), apply=False)
    assert response.get_json()["status"] == "received"
    health = client.get("/healthz").get_json()
    assert health["applier"] == "stale" and health["status"] == "degraded" and health["inbox"]["pending"] == 1
    stop = threading.Event()
    applier = Applier(session_factory, name="test:hb")
    worker = threading.Thread(target=applier.run, args=(stop,))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while client.get("/healthz").get_json()["inbox"]["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = client.get("/healthz").get_json()
        assert (health["status"], health["applier"], health["appliers_live"]) == ("ok", "ok", 1)
        assert health["inbox"]["pending"] == 0
    finally:
        stop.set()
        worker.join(timeout=10)
    assert client.get("/healthz").get_json()["applier"] == "idle"  # a stopping applier removes its heartbeat


_KILLABLE_APPLIER = textwrap.dedent(
    """
    import sys, time
    from domain.ledger import handlers
    from domain.ledger.applier import Applier
    from models import make_engine, make_session_factory

    original = handlers.HANDLERS["charge.succeeded"]

    def slow(session, event, linking):
        time.sleep(0.02)
        original(session, event, linking)

    handlers.HANDLERS["charge.succeeded"] = slow
    applier = Applier(make_session_factory(make_engine(sys.argv[1])), batch_size=25, set_based=False, name="killable")
    print("ready", flush=True)
    applier.drain()
    """
)


@pytest.mark.postgres
def test_an_applier_killed_mid_batch_loses_nothing_and_applies_nothing_twice(settings, session_factory, database_url) -> None:  # type: ignore[no-untyped-def]
    events = [p.event("charge.succeeded", p.charge(amount=100 + n, metadata={"order_id": f"ord_kill_{n % 7}"})) for n in range(200)]
    _store(settings, session_factory, events)
    child = subprocess.Popen([sys.executable, "-c", _KILLABLE_APPLIER, database_url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"

    def applied() -> int:
        with session_factory() as session:
            return session.scalar(select(func.count()).select_from(StripeEvent).where(StripeEvent.status == "applied")) or 0

    deadline = time.monotonic() + 30
    while applied() < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.13)  # somewhere inside a batch of 25 x 20 ms
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    before = applied()
    assert 50 <= before < 200 and before % 25 == 0, before  # whole batches only
    with session_factory() as session:
        # The killed batch left no effects: every charge in the ledger has its event applied.
        assert session.scalar(select(func.count()).select_from(Charge)) == before

    applier = Applier(session_factory, batch_size=25)
    outcome = applier.drain(timeout=60)
    assert outcome.applied == 200 - before and outcome.pending == 0
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Charge)) == 200
        totals = dict(session.execute(select(Charge.order_id, func.sum(Charge.amount)).group_by(Charge.order_id)).all())
    expected: dict[str, int] = {}
    for n in range(200):
        expected[f"ord_kill_{n % 7}"] = expected.get(f"ord_kill_{n % 7}", 0) + 100 + n
    assert totals == expected


def test_the_applier_lingers_only_in_a_burst(session_factory) -> None:  # type: ignore[no-untyped-def]
    """A batch between a tenth of the batch size and full means events are pouring in: wait
    for the next batch to fill. A lone event, a full batch, or linger off: go on at once."""
    applier = Applier(session_factory, batch_size=500, linger_seconds=0.25)
    assert [applier._should_linger(n) for n in (1, 49, 50, 499, 500)] == [False, False, True, True, False]
    assert Applier(session_factory, batch_size=500)._should_linger(100) is False
    assert Applier(session_factory, batch_size=5, linger_seconds=0.25)._should_linger(1) is False  # at least 2


@pytest.mark.postgres
def test_a_charge_another_writer_inserts_mid_batch_sends_the_batch_to_the_per_event_path(settings, session_factory, engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Between the set-based path's read of the charges it holds and its insert, another
    transaction commits one of the batch's charges (unlinked, as a backfill might). The
    insert sees one row fewer, the savepoint undoes the batch's writes, and the per-event
    path applies every event: each charge stored once, linked, each order paid."""
    from domain.ledger import charge_batch
    from models import Charge as ChargeModel, table_of

    events = [p.event("charge.succeeded", p.charge(amount=500 + n, metadata={"order_id": f"ord_race_{n}"})) for n in range(6)]
    raced = events[3]["data"]["object"]
    _store(settings, session_factory, events)
    original = charge_batch._orders_named
    fallbacks: list[str] = []

    def racing(session, snapshots):  # type: ignore[no-untyped-def]
        links = original(session, snapshots)
        with engine.begin() as other:  # another connection, committed before the batch inserts
            other.execute(table_of(ChargeModel).insert().values(
                id=raced["id"], amount=raced["amount"], amount_captured=raced["amount_captured"], currency=raced["currency"],
                status="succeeded", captured=True, created=raced["created"], last_event_created=raced["created"],
            ))
        return links

    def per_event_apply(*args, **kwargs):  # type: ignore[no-untyped-def]
        fallbacks.append("per-event")
        return original_apply(*args, **kwargs)

    original_apply = handlers.upserts.apply_charge
    monkeypatch.setattr(charge_batch, "_orders_named", racing)
    monkeypatch.setattr(handlers.upserts, "apply_charge", per_event_apply)
    assert Applier(session_factory).drain().applied == 6
    assert len(fallbacks) == 6  # the whole batch went event by event
    with session_factory() as session:
        charges = {c.id: c.order_id for c in session.scalars(select(Charge))}
        orders = {o.id: o.status for o in session.scalars(select(Order))}
    assert charges == {e["data"]["object"]["id"]: f"ord_race_{n}" for n, e in enumerate(events)}
    assert orders == {f"ord_race_{n}": "paid" for n in range(6)}
