"""The lean ingest path for new charges (PostgreSQL) writes what the general path writes.

The same event sequence (new charges, duplicates, double charges on one order, older
snapshots after newer ones, ties, refunds and disputes that arrive before their charge,
a charge whose order is known only through its PaymentIntent, a charge with no order,
legacy charges embedding refunds, a conflicting order link, failure records) goes into two
fresh databases, once through the lean path and once through the general one; every
ledger row must come out the same. Plus copies of one event racing on the lean path.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from app.services.ingest import WebhookIngestor
from config import Settings
from models import Charge, Dispute, EventFailure, Order, PaymentIntent, Refund, StripeEvent, make_engine, make_session_factory
from tests import stripe_payloads as p
from tests.databases import throwaway_database

pytestmark = pytest.mark.postgres

SECRET = "whsec_lean_0123456789abcdef"
T = 1_700_000_000
IGNORED = {"received_at", "first_seen_at", "updated_at", "created_at", "resolved_at", "first_failed_at", "last_failed_at"}


def _settings(url: str) -> Settings:
    return Settings(database_url=url, stripe_webhook_secrets=(SECRET,), api_token="lean-token-0123456789")


def _sequence() -> list[bytes]:
    events = []

    def add(type_: str, obj: dict, created: int) -> bytes:
        body = p.encode(p.event(type_, obj, created=created))
        events.append(body)
        return body

    # 1. A new charge with its order in metadata, then the same delivery again.
    c1 = p.charge(amount=2500, payment_intent="pi_lean_1", created=T, metadata={"order_id": "ord_lean_1"})
    body = add("charge.succeeded", c1, T)
    events.append(body)
    # 2. A double charge on the same order.
    add("charge.succeeded", p.charge(amount=2500, payment_intent="pi_lean_1", created=T + 1, metadata={"order_id": "ord_lean_1"}), T + 1)
    # 3. A newer snapshot first (refunded), then the older charge.succeeded.
    c3 = p.charge(id="ch_lean_3", amount=4000, payment_intent="pi_lean_3", created=T, metadata={"order_id": "ord_lean_3"})
    add("charge.refunded", dict(c3, amount_refunded=4000, refunded=True), T + 20)
    add("charge.succeeded", c3, T)
    # 4. A tie: pending and succeeded with the same event time, succeeded first.
    c4 = p.charge(id="ch_lean_4", amount=999, payment_intent="pi_lean_4", created=T, metadata={"order_id": "ord_lean_4"})
    add("charge.succeeded", c4, T + 5)
    add("charge.updated", dict(c4, status="pending", captured=False, amount_captured=0), T + 5)
    # 5. A refund and a dispute before their charges.
    add("refund.created", p.refund(charge="ch_lean_5", amount=1000, created=T + 3), T + 3)
    add("charge.succeeded", p.charge(id="ch_lean_5", amount=3000, payment_intent="pi_lean_5", created=T, metadata={"order_id": "ord_lean_5"}), T + 2)
    add("charge.dispute.created", p.dispute(charge="ch_lean_6", amount=1500, created=T + 4), T + 4)
    add("charge.succeeded", p.charge(id="ch_lean_6", amount=1500, created=T, metadata={"order_id": "ord_lean_6"}), T + 1)
    # 6. The order known only through the PaymentIntent; then a charge with no order.
    intent = p.payment_intent(id="pi_lean_7", amount=1200, status="processing", metadata={"order_id": "ord_lean_7", "order_total": "1200"}, created=T)
    add("payment_intent.processing", intent, T)  # stored, not applied
    add("payment_intent.payment_failed", dict(intent, status="requires_payment_method"), T)
    add("charge.succeeded", p.charge(id="ch_lean_7", amount=1200, payment_intent="pi_lean_7", created=T), T + 1)
    add("charge.succeeded", p.charge(id="ch_lean_8", amount=700, created=T), T + 1)
    add("charge.succeeded", p.charge(id="ch_lean_9", amount=700, payment_intent="pi_lean_unknown", created=T), T + 1)
    # 7. A failed charge; a legacy charge embedding a refund (general path on both sides).
    add("charge.failed", p.charge(id="ch_lean_10", amount=800, status="failed", captured=False, payment_intent="pi_lean_10", metadata={"order_id": "ord_lean_10"}, created=T), T)
    legacy = p.charge(
        id="ch_lean_11", amount=5000, payment_intent="pi_lean_11", metadata={"order_id": "ord_lean_11"}, created=T,
        refunds=[p.refund(charge="ch_lean_11", amount=2000, created=T + 1, api_version=p.LEGACY_API_VERSION)],
        api_version=p.LEGACY_API_VERSION,
    )
    events.append(p.encode(p.event("charge.refunded", legacy, created=T + 1, api_version=p.LEGACY_API_VERSION)))
    # 8. A charge linked to one order, then a snapshot naming another.
    c12 = p.charge(id="ch_lean_12", amount=600, payment_intent="pi_lean_12", created=T, metadata={"order_id": "ord_lean_12"})
    add("charge.succeeded", c12, T)
    add("charge.updated", dict(c12, metadata={"order_id": "ord_lean_other"}), T + 1)
    # 9. An uncaptured authorisation, captured later.
    c13 = p.charge(id="ch_lean_13", amount=900, captured=False, payment_intent="pi_lean_13", metadata={"order_id": "ord_lean_13"}, created=T)
    add("charge.succeeded", c13, T)
    add("charge.captured", p.charge(id="ch_lean_13", amount=900, payment_intent="pi_lean_13", metadata={"order_id": "ord_lean_13"}, created=T), T + 9)
    return events


def _rows(session_factory) -> dict[str, list[dict]]:  # type: ignore[no-untyped-def]
    out: dict[str, list[dict]] = {}
    with session_factory() as session:
        for model, key in ((StripeEvent, "event_id"), (Charge, "id"), (Order, "id"), (Refund, "id"), (Dispute, "id"), (PaymentIntent, "id"), (EventFailure, "event_id")):
            rows = session.scalars(select(model).order_by(getattr(model, key))).all()
            out[model.__tablename__] = [
                {c.name: getattr(r, c.key) for c in model.__table__.columns if c.name not in IGNORED} for r in rows
            ]
        out["resolved"] = [bool(f.resolved_at) for f in session.scalars(select(EventFailure).order_by(EventFailure.event_id))]
    return out


def _run(server_url: str, bodies: list[bytes], *, lean: bool) -> tuple[dict, list[tuple[int, dict]]]:
    with throwaway_database(server_url, prefix="reconciler_lean") as url:
        engine = make_engine(url)
        factory = make_session_factory(engine)
        ingestor = WebhookIngestor(_settings(url), factory, lean=lean)
        assert ingestor.lean is lean
        # A failure recorded earlier for the first event: the delivery that applies it resolves it.
        with factory() as session, session.begin():
            first = json.loads(bodies[0])["id"]
            session.add(EventFailure(event_id=first, type="charge.succeeded", attempts=2, last_error="boom"))
        answers = []
        for body in bodies:
            result = ingestor.ingest(body, p.sign(body, SECRET))
            answers.append((result.http_status, result.body))
        rows = _rows(factory)
        engine.dispose()
    return rows, answers


def test_lean_and_general_paths_write_the_same_ledger() -> None:
    bodies = _sequence()
    server = os.environ["TEST_DATABASE_URL"]
    lean_rows, lean_answers = _run(server, bodies, lean=True)
    general_rows, general_answers = _run(server, bodies, lean=False)
    assert lean_answers == general_answers
    assert [a[1]["status"] for a in lean_answers].count("duplicate") == 1
    for table in general_rows:
        assert lean_rows[table] == general_rows[table], table
    orders = {o["id"]: o for o in lean_rows["orders"]}
    assert orders["ord_lean_1"]["status"] == "paid" and orders["ord_lean_1"]["version"] == 2
    assert orders["ord_lean_3"]["status"] == "refunded"
    assert orders["ord_lean_5"]["status"] == "partially_refunded"
    assert orders["ord_lean_6"]["status"] == "disputed"
    assert "ord_lean_other" not in orders
    assert {c["id"]: c["order_id"] for c in lean_rows["charges"]}["ch_lean_7"] == "ord_lean_7"
    assert lean_rows["resolved"] == [True]


def test_copies_of_a_new_charge_racing_on_the_lean_path_apply_once() -> None:
    server = os.environ["TEST_DATABASE_URL"]
    with throwaway_database(server, prefix="reconciler_lean") as url:
        engine = make_engine(url, pool_size=20)
        factory = make_session_factory(engine)
        ingestor = WebhookIngestor(_settings(url), factory)
        assert ingestor.lean
        order = "ord_lean_race"
        # Copies of one event, and two other charges of the same order, all at once.
        same = p.encode(p.event("charge.succeeded", p.charge(amount=1000, payment_intent="pi_race", metadata={"order_id": order}), created=T))
        others = [
            p.encode(p.event("charge.succeeded", p.charge(amount=1000, payment_intent=f"pi_race_{i}", metadata={"order_id": order}), created=T))
            for i in range(2)
        ]
        bodies = [same] * 20 + others * 5
        barrier = threading.Barrier(10)

        def post(index: int) -> list[tuple[int, str]]:
            barrier.wait()
            out = []
            for body in bodies[index::10]:
                result = ingestor.ingest(body, p.sign(body, SECRET))
                out.append((result.http_status, result.body.get("status")))
            return out

        with ThreadPoolExecutor(10) as pool:
            answers = [a for chunk in pool.map(post, range(10)) for a in chunk]
        assert all(status == 200 for status, _ in answers)
        assert sorted(s for _, s in answers).count("processed") == 3
        with factory() as session:
            assert len(session.scalars(select(StripeEvent)).all()) == 3
            charges = session.scalars(select(Charge)).all()
            assert len(charges) == 3 and {c.order_id for c in charges} == {order}
            placed = session.get(Order, order)
            assert placed.status == "paid" and placed.version == 2  # one status change
        engine.dispose()


def _protocol_trace(raw_connection, run) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(direction, message type) of every protocol message ``run()`` exchanges on
    ``raw_connection`` (libpq's trace)."""
    with tempfile.TemporaryFile("w+") as trace:
        raw_connection.pgconn.trace(trace.fileno())
        try:
            run()
        finally:
            raw_connection.pgconn.untrace()
        trace.seek(0)
        rows = [line.split("\t") for line in trace.read().splitlines()]
    return [(r[1], r[3]) for r in rows if len(r) > 3]


def test_a_new_charge_costs_four_round_trips_and_no_ping() -> None:
    """What the lean path sends for a new charge whose order changes status: BEGIN; the
    event, PaymentIntent lock and charge; the order lock, link and reads; the status
    update with the COMMIT. The pool's pre-ping sends nothing on a healthy connection."""
    server = os.environ["TEST_DATABASE_URL"]
    with throwaway_database(server, prefix="reconciler_lean") as url:
        engine = make_engine(url, pool_size=1)
        factory = make_session_factory(engine)
        ingestor = WebhookIngestor(_settings(url), factory)
        bodies = [
            p.encode(p.event("charge.succeeded", p.charge(amount=1000, payment_intent=f"pi_rt_{i}", metadata={"order_id": f"ord_rt_{i}"}), created=T))
            for i in range(8)
        ]
        for body in bodies[:7]:  # past psycopg's prepare threshold
            assert ingestor.ingest(body, p.sign(body, SECRET)).body["status"] == "processed"
        with engine.connect() as connection:
            raw = connection.connection.driver_connection
        answers = []
        messages = _protocol_trace(raw, lambda: answers.append(ingestor.ingest(bodies[7], p.sign(bodies[7], SECRET))))
        assert answers[0].body["status"] == "processed"
        sent = [kind for direction, kind in messages if direction == "F"]
        round_trips = sum(1 for i, (d, _) in enumerate(messages) if d == "F" and (i == 0 or messages[i - 1][0] == "B"))
        assert round_trips == 4, messages
        assert "Query" not in sent  # neither the ping (";") nor a separate COMMIT
        with factory() as session:
            assert session.get(Order, "ord_rt_7").status == "paid"
            assert session.get(StripeEvent, json.loads(bodies[7])["id"]) is not None
        engine.dispose()


def test_a_connection_the_server_closed_is_replaced_at_checkout() -> None:
    """The pre-ping skips its round trip only while the socket is quiet: a backend the
    server terminated is detected and replaced, and the event is applied."""
    server = os.environ["TEST_DATABASE_URL"]
    with throwaway_database(server, prefix="reconciler_lean") as url:
        engine = make_engine(url, pool_size=1)
        ingestor = WebhookIngestor(_settings(url), make_session_factory(engine))
        first = p.encode(p.event("charge.succeeded", p.charge(amount=500, metadata={"order_id": "ord_kill_1"}), created=T))
        assert ingestor.ingest(first, p.sign(first, SECRET)).body["status"] == "processed"
        with engine.connect() as connection:
            pid = connection.connection.driver_connection.info.backend_pid
        admin = make_engine(url)
        with admin.connect() as connection:
            connection.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        admin.dispose()
        time.sleep(0.2)
        second = p.encode(p.event("charge.succeeded", p.charge(amount=500, metadata={"order_id": "ord_kill_2"}), created=T))
        result = ingestor.ingest(second, p.sign(second, SECRET))
        assert result.http_status == 200 and result.body["status"] == "processed"
        with engine.connect() as connection:
            assert connection.connection.driver_connection.info.backend_pid != pid
        engine.dispose()
