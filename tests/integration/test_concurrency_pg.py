"""Concurrency on PostgreSQL with real threads, real processes and real commits.

Stripe redelivers, and several web processes on several hosts share one database: the
copies of an event can arrive at the same instant on different processes, and several
appliers drain the inbox side by side. These tests check that exactly one copy is stored,
every copy gets a 200, and the event is applied exactly once.
"""

from __future__ import annotations

import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from domain.ledger import handlers
from tests.appliers import drain_with_appliers
from models import Charge, Order, StripeEvent
from tests import stripe_payloads as p
from tests.conftest import API_TOKEN, WEBHOOK_SECRET
from tests.servers import reconciler_serve, wait_for_workers, wait_until_applied

pytestmark = pytest.mark.postgres

COPIES = 50
THREADS = 10


def _post_all(post, bodies: list[bytes], threads: int) -> list[tuple[int, dict]]:  # type: ignore[no-untyped-def]
    barrier = threading.Barrier(threads)

    def worker(index: int) -> list[tuple[int, dict]]:
        barrier.wait()  # release every thread at the same instant
        return [post(body) for body in bodies[index::threads]]

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(worker, range(threads)))
    return [r for chunk in results for r in chunk]


def test_fifty_copies_from_ten_threads_apply_once(app, ledger, session_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    applied: list[str] = []
    lock = threading.Lock()
    original = handlers.HANDLERS["charge.succeeded"]

    def slow_counting(session, event, linking):  # type: ignore[no-untyped-def]
        with lock:
            applied.append(event.id)
        time.sleep(0.2)  # hold the batch open so the other appliers pile up on it
        original(session, event, linking)

    monkeypatch.setitem(handlers.HANDLERS, "charge.succeeded", slow_counting)
    event = p.event("charge.succeeded", p.charge(amount=4999, metadata={"order_id": "ord_race"}))
    body = p.encode(event)

    def post(raw: bytes) -> tuple[int, dict]:
        client = app.test_client()
        response = client.post("/webhooks/stripe", data=raw, headers={"Stripe-Signature": p.sign(raw, WEBHOOK_SECRET)})
        return response.status_code, response.get_json()

    results = _post_all(post, [body] * COPIES, THREADS)
    assert [status for status, _ in results] == [200] * COPIES
    statuses = sorted(body["status"] for _, body in results)
    assert statuses == ["duplicate"] * (COPIES - 1) + ["received"]
    appliers = drain_with_appliers(session_factory, 4, batch_size=1)
    assert applied == [event["id"]]
    assert sum(a.applied_total for a in appliers) == 1
    assert ledger.count(StripeEvent) == 1
    assert ledger.count(Charge) == 1
    assert ledger.order("ord_race")["totals"]["usd"]["held"] == 4999


def test_a_charge_and_its_payment_intent_at_the_same_instant_always_link(app, ledger, session_factory) -> None:  # type: ignore[no-untyped-def]
    """Each event looks for the other; without the PaymentIntent lock one of every few
    pairs would leave the charge unlinked. Appliers with batches of one take the two
    halves of a pair side by side."""
    pairs = []
    for n in range(60):
        pi_id = p.new_id("pi")
        charge = p.charge(payment_intent=pi_id)  # no metadata on the charge
        intent = p.payment_intent(id=pi_id, latest_charge=charge["id"], metadata={"order_id": f"ord_pair_{n}"})
        pairs.append(p.encode(p.event("charge.succeeded", charge)))
        pairs.append(p.encode(p.event("payment_intent.succeeded", intent)))

    def post(raw: bytes) -> tuple[int, dict]:
        response = app.test_client().post("/webhooks/stripe", data=raw, headers={"Stripe-Signature": p.sign(raw, WEBHOOK_SECRET)})
        return response.status_code, response.get_json()

    # Two threads, each taking one half of every pair, so the halves race.
    results = _post_all(post, pairs, 2)
    assert all(status == 200 for status, _ in results), results
    drain_with_appliers(session_factory, 2, batch_size=1)
    unlinked = ledger.all(Charge, Charge.order_id.is_(None))
    assert unlinked == []
    assert ledger.count(Order) == 60


def test_many_charges_of_one_order_at_once_do_not_deadlock(app, ledger, session_factory) -> None:  # type: ignore[no-untyped-def]
    bodies = [p.encode(p.event("charge.succeeded", p.charge(amount=100, metadata={"order_id": "ord_many"}))) for _ in range(16)]

    def post(raw: bytes) -> tuple[int, dict]:
        started = time.monotonic()
        response = app.test_client().post("/webhooks/stripe", data=raw, headers={"Stripe-Signature": p.sign(raw, WEBHOOK_SECRET)})
        assert time.monotonic() - started < 5, "waited on a lock"
        return response.status_code, response.get_json()

    results = _post_all(post, bodies, 8)
    assert [status for status, _ in results] == [200] * 16
    started = time.monotonic()
    drain_with_appliers(session_factory, 4, batch_size=2)
    assert time.monotonic() - started < 10, "waited on a lock"
    assert ledger.order("ord_many")["totals"]["usd"]["held"] == 1600


def test_a_storm_of_events_about_one_order_ends_as_if_applied_in_order(app, ledger, session_factory) -> None:  # type: ignore[no-untyped-def]
    t0 = 1_763_700_000
    pi_id = p.new_id("pi")
    charges = [p.charge(amount=2000, payment_intent=pi_id, created=t0 + i, metadata={"order_id": "ord_storm"}) for i in range(4)]
    events = []
    for i, charge in enumerate(charges):
        events.append(p.event("charge.succeeded", charge, created=t0 + i))
        events.append(p.event("charge.updated", dict(charge, description="updated"), created=t0 + 100 + i))
    refund = p.refund(charge=charges[1]["id"], amount=2000, created=t0 + 200)
    events.append(p.event("refund.created", refund, created=t0 + 200))
    events.append(p.event("refund.failed", dict(refund, status="failed"), created=t0 + 300))
    second_refund = p.refund(charge=charges[2]["id"], amount=500, created=t0 + 250)
    events.append(p.event("refund.created", second_refund, created=t0 + 250))
    events.append(p.event("payment_intent.succeeded", p.payment_intent(id=pi_id, amount=2000, latest_charge=charges[3]["id"], metadata={"order_id": "ord_storm"}), created=t0 + 400))
    bodies = [p.encode(e) for e in events] * 3  # every event delivered three times
    random.Random(7).shuffle(bodies)

    def post(raw: bytes) -> tuple[int, dict]:
        response = app.test_client().post("/webhooks/stripe", data=raw, headers={"Stripe-Signature": p.sign(raw, WEBHOOK_SECRET)})
        return response.status_code, response.get_json()

    results = _post_all(post, bodies, 8)
    assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200]
    assert sum(body["status"] == "received" for _, body in results) == len(events)
    drain_with_appliers(session_factory, 3, batch_size=3)
    assert ledger.count(StripeEvent, StripeEvent.status == "applied") == len(events)
    view = ledger.order("ord_storm")
    held = {c["id"]: c["held_amount"] for c in view["charges"]}
    assert held == {charges[0]["id"]: 2000, charges[1]["id"]: 2000, charges[2]["id"]: 1500, charges[3]["id"]: 2000}
    assert view["totals"]["usd"] == {"charged": 8000, "refunded": 500, "held": 7500}


# -- several processes: gunicorn workers ------------------------------------------------


@pytest.fixture
def served(database_url, session_factory, tmp_path):  # type: ignore[no-untyped-def]
    """`reconciler serve` with four worker processes (and its applier child) on the test
    database."""
    log_path = tmp_path / "serve.log"
    env = {
        "DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "API_TOKEN": API_TOKEN,
        "LOG_LEVEL": "WARNING",
    }
    with reconciler_serve(["--workers", "4", "--no-migrate"], env, log_path) as base:
        wait_for_workers(base, log_path, 2)
        yield base, log_path


def test_fifty_copies_across_four_worker_processes_apply_once(served, ledger) -> None:  # type: ignore[no-untyped-def]
    base, log_path = served
    event = p.event("charge.succeeded", p.charge(amount=1250, currency="eur", metadata={"order_id": "ord_procs"}))
    body = p.encode(event)

    def post(raw: bytes) -> tuple[int, dict]:
        response = requests.post(
            f"{base}/webhooks/stripe",
            data=raw,
            headers={"Stripe-Signature": p.sign(raw, WEBHOOK_SECRET), "Content-Type": "application/json"},
            timeout=30,
        )
        return response.status_code, response.json()

    results = _post_all(post, [body] * COPIES, THREADS)
    assert [status for status, _ in results] == [200] * COPIES
    statuses = sorted(body["status"] for _, body in results)
    assert statuses == ["duplicate"] * (COPIES - 1) + ["received"]
    assert ledger.count(StripeEvent) == 1
    wait_until_applied(base, event["id"])
    assert ledger.order("ord_procs")["totals"] == {"eur": {"charged": 1250, "refunded": 0, "held": 1250}}
    # The access log names the worker pid: more than one process answered.
    pids = set(re.findall(r'pid=<(\d+)> .*"POST /webhooks/stripe', log_path.read_text()))
    assert len(pids) >= 2, log_path.read_text()[-2000:]
