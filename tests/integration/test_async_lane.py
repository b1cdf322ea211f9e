"""The ASGI door of ``POST /webhooks/stripe`` (app/asgi.py, the default server's app): the
same answers as the WSGI door for every input, the rest of the app behind it, and on
PostgreSQL the event loop's group insert (real commits, read back on other connections).

The ASGI app is driven in this process, one event loop per test, with the messages an
ASGI server sends; `reconciler serve` runs it under uvicorn in tests/integration/test_serve.py
and every end-to-end test.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy import func, select, text

from app.asgi import asgi_app
from domain.ledger.inbox import _ROW_KEYS, AsyncGroupInsert, StoreFailed, _LoopConnectionWriter
from models import Charge, EventFailure, Order, StripeEvent, make_engine
from tests import stripe_payloads as p
from tests.conftest import WEBHOOK_SECRET
from tests.integration.test_webhook_ingest import _cases
from tests.integration.test_group_insert_pg import _row, _stored


class Answer:
    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""

    def json(self) -> Any:
        return json.loads(self.body)


async def _call(app, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, *,  # type: ignore[no-untyped-def]
                chunks: int = 1, disconnect: bool = False, on_start=None) -> Answer:
    """One request through the ASGI app: the body in ``chunks`` messages (no
    Content-Length when more than one, as with a chunked upload), or a disconnect instead
    of a body."""
    raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if chunks == 1 and not disconnect:
        raw_headers.append((b"content-length", str(len(body)).encode()))
    size = max(1, -(-len(body) // chunks))
    messages: list[dict] = [{"type": "http.disconnect"}] if disconnect else [
        {"type": "http.request", "body": body[i * size:(i + 1) * size], "more_body": i < chunks - 1} for i in range(chunks)
    ]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": raw_headers,
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }
    answer = Answer()

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = {k.decode(): v.decode() for k, v in message["headers"]}
            if on_start is not None:
                on_start(answer)
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")

    await app(scope, receive, send)
    return answer


def _post(app, body: bytes, headers: dict[str, str] | None = None, **kwargs) -> Answer:  # type: ignore[no-untyped-def]
    return asyncio.run(_call(app, "POST", "/webhooks/stripe", body, {"Content-Type": "application/json", **(headers or {})}, **kwargs))


def _signed_post(app, event: dict, **kwargs) -> Answer:  # type: ignore[no-untyped-def]
    body = p.encode(event)
    return _post(app, body, {"Stripe-Signature": p.sign(body, WEBHOOK_SECRET)}, **kwargs)


@pytest.fixture
def asgi(app):  # type: ignore[no-untyped-def]
    return asgi_app(app, threads=4)


def test_an_event_is_received_once_then_a_duplicate(asgi, ledger) -> None:  # type: ignore[no-untyped-def]
    event = p.event("charge.succeeded", p.charge())
    first, second = _signed_post(asgi, event), _signed_post(asgi, event)
    assert (first.status, first.json()) == (200, {"status": "received", "event_id": event["id"]})
    assert (second.status, second.json()) == (200, {"status": "duplicate", "event_id": event["id"]})
    assert first.headers["content-type"] == "application/json" and first.headers["cache-control"] == "no-store"
    assert ledger.get(StripeEvent, event["id"]).status == "received"
    assert ledger.count(StripeEvent) == 1


def test_other_livemode_and_unhandled_types_are_answered_as_by_the_wsgi_door(asgi, client, ledger) -> None:  # type: ignore[no-untyped-def]
    for event in (p.event("charge.succeeded", p.charge(), livemode=True), p.event("customer.created", {"id": "cus_1", "object": "customer"})):
        body = p.encode(event)
        headers = {"Stripe-Signature": p.sign(body, WEBHOOK_SECRET), "Content-Type": "application/json"}
        ours = _post(asgi, body, headers)
        event["id"] += "_wsgi"  # a second id, so that the WSGI door's answer is not a duplicate
        body = p.encode(event)
        theirs = client.post("/webhooks/stripe", data=body, headers={**headers, "Stripe-Signature": p.sign(body, WEBHOOK_SECRET)})
        assert ours.status == theirs.status_code == 200
        assert {**ours.json(), "event_id": None} == {**theirs.get_json(), "event_id": None}


@pytest.mark.parametrize("name", [c[0] for c in _cases()])
def test_bad_input_gets_the_wsgi_doors_answer_and_stores_nothing(asgi, client, ledger, name) -> None:  # type: ignore[no-untyped-def]
    _, body, headers, status, code = next(c for c in _cases() if c[0] == name)
    ours = _post(asgi, body, headers)
    theirs = client.post("/webhooks/stripe", data=body, headers={"Content-Type": "application/json", **headers})
    assert (ours.status, ours.json()) == (theirs.status_code, theirs.get_json())
    assert ours.status == status and ours.json()["error"] == code
    for model in (StripeEvent, EventFailure, Charge, Order):
        assert ledger.count(model) == 0


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(asgi, settings, ledger) -> None:  # type: ignore[no-untyped-def]
    event = p.event("charge.succeeded", p.charge(metadata={"pad": "x" * (settings.webhook_max_bytes + 10)}))
    answer = _signed_post(asgi, event, chunks=8)
    assert (answer.status, answer.json()["error"]) == (413, "payload_too_large")
    small = p.event("charge.succeeded", p.charge())
    assert _signed_post(asgi, small, chunks=3).json() == {"status": "received", "event_id": small["id"]}
    assert ledger.count(StripeEvent) == 1


def test_a_client_gone_before_its_body_gets_no_answer_and_stores_nothing(asgi, ledger) -> None:  # type: ignore[no-untyped-def]
    answer = _post(asgi, b"", disconnect=True)
    assert answer.status is None and ledger.count(StripeEvent) == 0


def test_wrong_method_is_json_405_with_allow(asgi) -> None:  # type: ignore[no-untyped-def]
    answer = asyncio.run(_call(asgi, "GET", "/webhooks/stripe"))
    assert (answer.status, answer.json()["error"], answer.headers["allow"]) == (405, "method_not_allowed", "POST")


def test_every_other_path_is_the_flask_app(asgi, api_headers) -> None:  # type: ignore[no-untyped-def]
    health = asyncio.run(_call(asgi, "GET", "/healthz"))
    assert health.status == 200
    missing = asyncio.run(_call(asgi, "GET", "/api/orders/ord_none", headers=api_headers))
    assert missing.status == 404 and missing.json()["error"] == "order_not_found"
    refused = asyncio.run(_call(asgi, "GET", "/api/orders/ord_none"))
    assert refused.status == 401


# -- the event loop's group insert (PostgreSQL: one statement on the loop's connection;
# SQLite: one transaction, written in a thread) --------------------------------------------

postgres = pytest.mark.postgres


def test_concurrent_webhooks_on_one_loop_share_statements_and_each_answer_follows_its_commit(app, asgi, session_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    group = app.extensions["reconciler"].inbox._async_group
    sizes: list[int] = []
    original = group._run

    async def counting(batch):  # type: ignore[no-untyped-def]
        sizes.append(len(batch))
        await original(batch)

    monkeypatch.setattr(group, "_run", counting)
    events = [p.event("charge.succeeded", p.charge()) for _ in range(120)]
    stored_at_answer: dict[str, bool] = {}

    def check(event_id: str):  # type: ignore[no-untyped-def]
        # read on another connection the moment the answer starts: the row is committed
        return lambda answer: stored_at_answer.__setitem__(event_id, bool(_stored(session_factory, [event_id])))

    async def post_all() -> list[Answer]:
        calls = []
        for event in events:
            body = p.encode(event)
            calls.append(_call(asgi, "POST", "/webhooks/stripe", body, {"Stripe-Signature": p.sign(body, WEBHOOK_SECRET)}, on_start=check(event["id"])))
        return await asyncio.gather(*calls)

    answers = asyncio.run(post_all())
    assert [(a.status, a.json()["status"]) for a in answers] == [(200, "received")] * len(events)
    assert stored_at_answer == {e["id"]: True for e in events}
    assert sum(sizes) == len(events) and len(sizes) < len(events) and max(sizes) > 1, sizes


def test_copies_of_one_event_in_one_statement_are_one_received_and_the_rest_duplicates(asgi, ledger) -> None:  # type: ignore[no-untyped-def]
    event = p.event("charge.succeeded", p.charge())
    body = p.encode(event)

    async def copies() -> list[Answer]:
        return await asyncio.gather(*[
            _call(asgi, "POST", "/webhooks/stripe", body, {"Stripe-Signature": p.sign(body, WEBHOOK_SECRET)}) for _ in range(10)
        ])

    statuses = sorted(a.json()["status"] for a in asyncio.run(copies()))
    assert statuses == ["duplicate"] * 9 + ["received"]
    assert ledger.count(StripeEvent) == 1


def test_a_failing_statement_fails_every_row_it_carried_and_stores_none(app, session_factory) -> None:  # type: ignore[no-untyped-def]
    inbox = app.extensions["reconciler"].inbox
    group = inbox._async_group

    def _converted(row: dict) -> dict:
        return {key: inbox._processors[key](value) if key in inbox._processors else value for key, value in row.items()}

    rows = [_converted(_row("evt_agrp_f1")), _converted(_row("evt_agrp_f2", type=None)), _converted(_row("evt_agrp_f3"))]  # type is NOT NULL

    async def together() -> list[Any]:
        # queued in one tick: the statement started by the first carries all three
        return await asyncio.gather(*[group.insert(row) for row in rows], return_exceptions=True)

    results = asyncio.run(together())
    assert all(isinstance(result, StoreFailed) for result in results), results
    assert _stored(session_factory, ["evt_agrp_f1", "evt_agrp_f2", "evt_agrp_f3"]) == set()

    async def again() -> list[Any]:
        return await asyncio.gather(group.insert(rows[0]), group.insert(rows[2]))

    assert asyncio.run(again()) == [True, True]  # a new loop (on PostgreSQL a new connection)
    assert _stored(session_factory, ["evt_agrp_f1", "evt_agrp_f3"]) == {"evt_agrp_f1", "evt_agrp_f3"}


@postgres
def test_the_loop_writer_opens_its_own_connection_and_commits_each_statement(engine, session_factory) -> None:  # type: ignore[no-untyped-def]
    group = AsyncGroupInsert(_LoopConnectionWriter(engine, _ROW_KEYS))

    async def one() -> bool:
        return await group.insert(_row("evt_agrp_own"))

    assert asyncio.run(one()) is True
    assert _stored(session_factory, ["evt_agrp_own"]) == {"evt_agrp_own"}


@postgres
def test_a_connection_the_server_dropped_is_replaced_and_the_event_stored(app, asgi, engine, ledger) -> None:  # type: ignore[no-untyped-def]
    group = app.extensions["reconciler"].inbox._async_group
    first, second = p.event("charge.succeeded", p.charge()), p.event("charge.succeeded", p.charge())

    async def scenario() -> tuple[Answer, Answer]:
        before = await _call_signed(asgi, first)
        pid = group._write_rows._connection.info.backend_pid
        with engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        return before, await _call_signed(asgi, second)

    before, after = asyncio.run(scenario())
    assert before.json()["status"] == after.json()["status"] == "received"
    assert ledger.count(StripeEvent) == 2


@postgres
def test_database_down_is_503_and_nothing_is_stored(settings, ledger, session_factory) -> None:  # type: ignore[no-untyped-def]
    from app import create_app

    down = make_engine("postgresql+psycopg://postgres@127.0.0.1:9/nowhere")
    app = create_app(settings, session_factory=type(session_factory)(bind=down))
    answer = _signed_post(asgi_app(app), p.event("charge.succeeded", p.charge()))
    assert (answer.status, answer.json()["error"]) == (503, "event_not_stored")
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(StripeEvent)) == 0


async def _call_signed(app, event: dict) -> Answer:  # type: ignore[no-untyped-def]
    body = p.encode(event)
    return await _call(app, "POST", "/webhooks/stripe", body, {"Stripe-Signature": p.sign(body, WEBHOOK_SECRET)})
