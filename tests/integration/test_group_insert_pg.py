"""The accept path's group insert on PostgreSQL: concurrent requests of one process share
one statement and one commit, and each answer still follows the commit of its own row.

Real threads and real commits; the flush lock is held by the test where a test needs
several rows to be in one statement for certain.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from domain.ledger.inbox import _ROW_KEYS, GroupInsert, StoreFailed
from models import StripeEvent, utcnow
from tests import stripe_payloads as p
from tests.conftest import WEBHOOK_SECRET

pytestmark = pytest.mark.postgres


def _row(event_id: str, **changes: object) -> dict:
    row = {
        "event_id": event_id, "type": "charge.succeeded", "api_version": "2024-06-20", "livemode": False,
        "account": None, "created": 1_700_000_000, "received_at": utcnow(), "status": "received",
        "object_id": "ch_x", "payload": "{}", "attempts": 0,
    }
    row.update(changes)
    return row


def _in_one_statement(group: GroupInsert, rows: list[dict]) -> list[bool | BaseException]:
    """Queue every row while the test holds the flush lock, then let them go: the first
    request to take the lock carries all of them in one statement."""
    results: list[bool | BaseException] = [False] * len(rows)
    statements: list[int] = []
    original = group._run

    def counting(batch):  # type: ignore[no-untyped-def]
        statements.append(len(batch))
        original(batch)

    group._run = counting  # type: ignore[method-assign]

    def insert(index: int) -> None:
        try:
            results[index] = group.insert(rows[index])
        except StoreFailed as exc:
            results[index] = exc

    with group._flush:
        threads = [threading.Thread(target=insert, args=(i,)) for i in range(len(rows))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(group._pending) < len(rows) and time.monotonic() < deadline:
            time.sleep(0.005)
    for thread in threads:
        thread.join(10)
    assert statements == [len(rows)], statements
    return results


def _stored(session_factory, ids: list[str]) -> set[str]:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        return set(session.scalars(select(StripeEvent.event_id).where(StripeEvent.event_id.in_(ids))))


def test_queued_rows_go_in_one_statement_and_each_learns_its_own_outcome(engine, session_factory) -> None:  # type: ignore[no-untyped-def]
    group = GroupInsert(engine, _ROW_KEYS)
    assert group.insert(_row("evt_grp_before")) is True  # an earlier copy, already stored
    rows = [_row("evt_grp_a"), _row("evt_grp_b"), _row("evt_grp_before"), _row("evt_grp_a"), _row("evt_grp_c")]
    results = _in_one_statement(group, rows)
    # every new id is inserted exactly once; the stored one and the second copy are duplicates
    assert sorted(zip([r["event_id"] for r in rows], results)) == [
        ("evt_grp_a", False), ("evt_grp_a", True), ("evt_grp_b", True), ("evt_grp_before", False), ("evt_grp_c", True),
    ]
    assert _stored(session_factory, ["evt_grp_a", "evt_grp_b", "evt_grp_c"]) == {"evt_grp_a", "evt_grp_b", "evt_grp_c"}


def test_a_failing_statement_fails_every_request_it_carried_and_stores_none_of_them(engine, session_factory) -> None:  # type: ignore[no-untyped-def]
    group = GroupInsert(engine, _ROW_KEYS)
    rows = [_row("evt_grp_f1"), _row("evt_grp_f2", type=None), _row("evt_grp_f3")]  # type is NOT NULL
    results = _in_one_statement(group, rows)
    assert all(isinstance(result, StoreFailed) for result in results)
    assert _stored(session_factory, ["evt_grp_f1", "evt_grp_f2", "evt_grp_f3"]) == set()
    # the group is usable again at once: the next statement stores the good rows
    assert group.insert(_row("evt_grp_f1")) is True and group.insert(_row("evt_grp_f3")) is True


def test_busy_worker_threads_share_statements_and_every_answer_follows_its_commit(app, session_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Through the real endpoint: 16 threads, 160 distinct events. Each request, once
    answered, finds its row committed (read on another connection); there are fewer
    statements than events."""
    group = app.extensions["reconciler"].inbox._group
    sizes: list[int] = []
    original = group._run

    def slow_counting(batch):  # type: ignore[no-untyped-def]
        sizes.append(len(batch))
        time.sleep(0.005)  # a statement in flight long enough for the next batch to form
        original(batch)

    monkeypatch.setattr(group, "_run", slow_counting)
    events = [p.event("charge.succeeded", p.charge()) for _ in range(160)]
    bodies = [p.encode(e) for e in events]

    def post(body: bytes) -> tuple[int, str, bool]:
        response = app.test_client().post("/webhooks/stripe", data=body, headers={"Stripe-Signature": p.sign(body, WEBHOOK_SECRET)})
        event_id = response.get_json()["event_id"]
        return response.status_code, response.get_json()["status"], bool(_stored(session_factory, [event_id]))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(post, bodies))
    assert results == [(200, "received", True)] * len(bodies)
    assert sum(sizes) == len(bodies)
    assert len(sizes) < len(bodies) and max(sizes) > 1, sizes
