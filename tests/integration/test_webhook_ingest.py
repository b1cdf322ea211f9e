"""POST /webhooks/stripe: verified, stored once in the inbox; the applier applies it once."""

from __future__ import annotations

import json
import time

import pytest

from sqlalchemy import update

from domain.ledger import handlers
from models import Charge, EventFailure, Order, Refund, StripeEvent
from tests import stripe_payloads as p
from tests.conftest import ROTATED_SECRET, WEBHOOK_SECRET


def succeeded_charge_event(order_id: str = "ord_1", **charge_fields):  # type: ignore[no-untyped-def]
    charge = p.charge(metadata={"order_id": order_id}, **charge_fields)
    return p.event("charge.succeeded", charge)


def test_event_is_stored_and_applied(app, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    event = succeeded_charge_event(amount=4999)
    response = deliver(event, apply=False)
    assert response.status_code == 200
    assert response.get_json() == {"status": "received", "event_id": event["id"]}
    # Answered once stored; nothing applied yet.
    assert ledger.get(StripeEvent, event["id"]).status == "received"
    assert ledger.count(Charge) == 0
    app.extensions["reconciler"].applier.drain()
    stored = ledger.get(StripeEvent, event["id"])
    assert stored.status == "applied" and stored.type == "charge.succeeded" and stored.applied_at is not None
    assert json.loads(stored.payload) == event
    charge = ledger.get(Charge, event["data"]["object"]["id"])
    assert (charge.amount, charge.currency, charge.status, charge.order_id) == (4999, "usd", "succeeded", "ord_1")
    assert ledger.get(Order, "ord_1").status == "paid"


def test_same_event_twice_is_applied_once(deliver, ledger, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    applied: list[str] = []
    original = handlers.HANDLERS["charge.succeeded"]

    def counting(session, event, linking):  # type: ignore[no-untyped-def]
        applied.append(event.id)
        original(session, event, linking)

    monkeypatch.setitem(handlers.HANDLERS, "charge.succeeded", counting)
    event = succeeded_charge_event()
    first = deliver(event)
    second = deliver(event)
    assert first.get_json()["status"] == "received"
    assert second.status_code == 200
    assert second.get_json() == {"status": "duplicate", "event_id": event["id"]}
    assert applied == [event["id"]]
    assert ledger.count(StripeEvent) == 1
    assert ledger.count(Charge) == 1


def test_unknown_type_is_stored_and_ignored(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    event = p.event("customer.created", {"id": "cus_123", "object": "customer", "livemode": False})
    response = deliver(event)
    assert response.status_code == 200
    assert response.get_json() == {"status": "ignored", "event_id": event["id"], "reason": "type_not_applied"}
    assert ledger.get(StripeEvent, event["id"]).status == "ignored"
    assert deliver(event).get_json()["status"] == "duplicate"


def test_other_livemode_is_ignored_without_effect(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    event = p.event("charge.succeeded", p.charge(livemode=True, metadata={"order_id": "ord_live"}), livemode=True)
    response = deliver(event)
    assert response.status_code == 200
    assert response.get_json()["status"] == "ignored"
    assert ledger.count(StripeEvent) == 0
    assert ledger.count(Charge) == 0
    assert ledger.count(Order) == 0


def test_rotated_second_secret_is_accepted(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    event = succeeded_charge_event()
    assert deliver(event, secret=ROTATED_SECRET).status_code == 200
    assert ledger.count(StripeEvent) == 1


def _make_ready(session_factory, event_id: str) -> None:  # type: ignore[no-untyped-def]
    """Skip the failed event's backoff: its next try is due now."""
    with session_factory.begin() as session:
        session.execute(update(StripeEvent).where(StripeEvent.event_id == event_id).values(next_attempt_at=None))


def test_handler_failure_rolls_back_records_failure_and_a_retry_applies(app, deliver, ledger, monkeypatch, client, api_headers, session_factory) -> None:  # type: ignore[no-untyped-def]
    original = handlers.HANDLERS["charge.refunded"]

    def explode_after_partial_work(session, event, linking):  # type: ignore[no-untyped-def]
        original(session, event, linking)  # the charge and its order are written...
        raise RuntimeError("ledger exploded")  # ...and then the handler fails

    monkeypatch.setitem(handlers.HANDLERS, "charge.refunded", explode_after_partial_work)
    charge = p.charge(amount=2500, amount_refunded=2500, metadata={"order_id": "ord_poison"})
    event = p.event("charge.refunded", charge)
    applier = app.extensions["reconciler"].applier

    response = deliver(event)  # stored, then the apply fails
    assert response.status_code == 200 and response.get_json()["status"] == "received"
    assert deliver(event).get_json()["status"] == "duplicate"  # a redelivery changes nothing
    _make_ready(session_factory, event["id"])
    applier.drain()
    # Nothing of the handler's work survived: no charge, no order; the event waits.
    assert ledger.count(Charge) == 0
    assert ledger.count(Order) == 0
    stored = ledger.get(StripeEvent, event["id"])
    assert stored.status == "failed" and stored.attempts == 2 and stored.next_attempt_at is not None
    failure = ledger.get(EventFailure, event["id"])
    assert failure.attempts == 2 and "ledger exploded" in failure.last_error and failure.resolved_at is None
    # In backoff: a drain does not retry it before its time.
    applier.drain()
    assert ledger.get(StripeEvent, event["id"]).attempts == 2
    visible = client.get(f"/api/events/{event['id']}", headers=api_headers)
    assert visible.status_code == 200
    assert visible.get_json()["status"] == "failed"
    assert visible.get_json()["attempts"] == 2 and visible.get_json()["failure"]["attempts"] == 2
    listed = client.get("/api/events?status=failed", headers=api_headers)
    assert [f["event_id"] for f in listed.get_json()["data"]] == [event["id"]]

    monkeypatch.setitem(handlers.HANDLERS, "charge.refunded", original)
    _make_ready(session_factory, event["id"])
    applier.drain()
    assert ledger.get(StripeEvent, event["id"]).status == "applied"
    assert ledger.get(Charge, charge["id"]).reported_refunded == 2500
    assert ledger.get(EventFailure, event["id"]).resolved_at is not None
    assert ledger.order("ord_poison")["status"] == "refunded"
    listed = client.get("/api/events?status=failed", headers=api_headers)
    assert listed.get_json()["data"] == []


def test_malformed_object_in_signed_event_is_stored_and_fails_to_apply(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    """A signed event is Stripe's word: it is kept (nothing is lost), and its apply fails
    visibly instead of the delivery being refused."""
    charge = p.charge()
    charge["amount"] = 49.99  # never a float
    event = p.event("charge.succeeded", charge)
    response = deliver(event)
    assert response.status_code == 200 and response.get_json()["status"] == "received"
    assert ledger.get(StripeEvent, event["id"]).status == "failed"
    assert ledger.count(Charge) == 0
    failure = ledger.get(EventFailure, event["id"])
    assert failure.attempts == 1 and "ShapeError" in failure.last_error


# -- bad input: every one a 4xx with an error code, nothing stored -------------------------

def _signed(body: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> dict[str, str]:
    return {"Stripe-Signature": p.sign(body, secret, timestamp=timestamp)}


def _valid_body() -> bytes:
    return p.encode(succeeded_charge_event())


def _event_without(key: str) -> bytes:
    event = succeeded_charge_event()
    del event[key]
    return p.encode(event)


def _event_with(**fields) -> bytes:  # type: ignore[no-untyped-def]
    event = succeeded_charge_event()
    event.update(fields)
    return p.encode(event)


def _cases():  # type: ignore[no-untyped-def]
    body = _valid_body()
    now = int(time.time())
    good = p.sign(body, WEBHOOK_SECRET)
    timestamp, signature = good.split(",")
    yield "missing header", body, {}, 400, "missing_signature"
    yield "empty header", body, {"Stripe-Signature": ""}, 400, "missing_signature"
    yield "wrong secret", body, _signed(body, "whsec_someone_else"), 400, "signature_mismatch"
    yield "tampered body", body.replace(b"4999", b"4998", 1), {"Stripe-Signature": good}, 400, "signature_mismatch"
    yield "stale timestamp", body, _signed(body, timestamp=now - 301), 400, "timestamp_outside_tolerance"
    yield "future timestamp", body, _signed(body, timestamp=now + 3600), 400, "timestamp_outside_tolerance"
    yield "no t=", body, {"Stripe-Signature": signature}, 400, "malformed_signature"
    yield "no v1=", body, {"Stripe-Signature": timestamp}, 400, "malformed_signature"
    yield "only v0", body, {"Stripe-Signature": f"{timestamp},v0={signature[3:]}"}, 400, "malformed_signature"
    yield "non-ascii v1", body, {"Stripe-Signature": f"{timestamp},v1=\u00e9\u00e9".encode().decode("latin-1")}, 400, "malformed_signature"
    nul = _event_with(account="acct_\u0000x")
    yield "NUL in a signed event", nul, _signed(nul), 400, "invalid_event"
    yield "garbage header", body, {"Stripe-Signature": "hello world"}, 400, "malformed_signature"
    yield "non-numeric t", body, {"Stripe-Signature": f"t=abc,{signature}"}, 400, "malformed_signature"
    yield "huge t", body, {"Stripe-Signature": f"t={'9' * 40},{signature}"}, 400, "malformed_signature"
    yield "signature of other timestamp", body, {"Stripe-Signature": f"t={now - 5},{signature}"}, 400, "signature_mismatch"
    yield "empty body", b"", _signed(b""), 400, "invalid_json"
    yield "malformed json", b'{"id": "evt_1",', _signed(b'{"id": "evt_1",'), 400, "invalid_json"
    yield "json list", b"[1, 2]", _signed(b"[1, 2]"), 400, "not_an_event"
    yield "json string", b'"evt"', _signed(b'"evt"'), 400, "not_an_event"
    yield "json null", b"null", _signed(b"null"), 400, "not_an_event"
    yield "not utf-8", b"\xff\xfe{}", {"Stripe-Signature": f"t={now},v1=00"}, 400, "invalid_encoding"
    deep = b"[" * 100000 + b"]" * 100000
    yield "deeply nested", deep, _signed(deep), 413, "payload_too_large"
    nested = b'{"a":' * 5000 + b"1" + b"}" * 5000
    yield "nested past recursion limit", nested, _signed(nested), 400, "invalid_json"
    for key in ("id", "type", "data", "object", "created", "livemode"):
        broken = _event_without(key)
        yield f"missing {key}", broken, _signed(broken), 400, "invalid_event" if key != "object" else "not_an_event"
    for name, fields in {
        "id not evt_": {"id": "ch_123"},
        "id not a string": {"id": 123},
        "type not a string": {"type": ["charge.succeeded"]},
        "type with spaces": {"type": "charge succeeded"},
        "data without object": {"data": {}},
        "data.object a string": {"data": {"object": "ch_1"}},
        "created a string": {"created": "1700000000"},
        "created a float": {"created": 1700000000.5},
        "livemode a string": {"livemode": "false"},
        "account not acct_": {"account": "ch_1"},
        "thin v2 event": {"object": "v2.core.event"},
    }.items():
        broken = _event_with(**fields)
        code = "not_an_event" if name == "thin v2 event" else "invalid_event"
        yield name, broken, _signed(broken), 400, code
    big = p.encode(p.event("charge.succeeded", p.charge(metadata={"pad": "x" * 70_000})))
    yield "over the size limit", big, _signed(big), 413, "payload_too_large"


CASES = list(_cases())


def test_there_are_at_least_thirty_kinds_of_bad_input() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_bad_input_is_a_clear_4xx_and_stores_nothing(client, ledger, name) -> None:  # type: ignore[no-untyped-def]
    # Built now, not at collection: the signatures carry the current time, and a long
    # suite reaches this test minutes after collecting it.
    _, body, headers, status, code = next(c for c in _cases() if c[0] == name)
    response = client.post("/webhooks/stripe", data=body, headers={"Content-Type": "application/json", **headers})
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    assert response.get_json()["error"] == code
    assert ledger.count(StripeEvent) == 0
    assert ledger.count(EventFailure) == 0
    assert ledger.count(Charge) == 0
    assert ledger.count(Order) == 0


def test_wrong_method_is_json_405(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/webhooks/stripe")
    assert response.status_code == 405
    assert response.get_json()["error"] == "method_not_allowed"


def test_without_a_configured_secret_every_delivery_is_refused(app, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    services = app.extensions["reconciler"]
    object.__setattr__(services.inbox, "_settings", services.settings.with_overrides(stripe_webhook_secrets=()))
    response = deliver(succeeded_charge_event())
    assert response.status_code == 503
    assert response.get_json()["error"] == "webhook_secret_not_configured"
    assert ledger.count(StripeEvent) == 0


# -- signed events with extreme values: never a 5xx (PostgreSQL enforces column sizes) ----


def _extreme_events():  # type: ignore[no-untyped-def]
    def charge_with(**fields):  # type: ignore[no-untyped-def]
        charge = p.charge()
        charge.update(fields)
        return p.event("charge.succeeded", charge)

    yield "huge amount", charge_with(amount=10**30), 422
    yield "huge created", charge_with(created=10**30), 422
    yield "long charge id", charge_with(id="ch_" + "x" * 300), 422
    yield "long payment_intent id", charge_with(payment_intent="pi_" + "x" * 300), 422
    yield "long customer id", charge_with(customer="cus_" + "x" * 300), 422
    yield "long order id in metadata", charge_with(metadata={"order_id": "o" * 500}), 200
    yield "superscript digit order_total", p.event("payment_intent.succeeded", p.payment_intent(metadata={"order_id": "ord_sup", "order_total": "\u00b2"})), 200
    yield "order id with spaces", charge_with(metadata={"order_id": "order 1; DROP TABLE"}), 200
    yield "long failure message", charge_with(failure_message="m" * 5000), 200
    yield "long card brand", charge_with(payment_method_details={"type": "card", "card": {"brand": "b" * 500, "last4": "42424"}}), 200
    yield "unicode everywhere", charge_with(description="☃" * 1000, metadata={"order_id": "ord_☃"}), 200
    refund = p.refund(charge="ch_" + "y" * 400, amount=100)
    yield "refund with long charge id", p.event("refund.created", refund), 422
    long_reason = p.refund(charge="ch_1", amount=100, reason="r" * 300)
    yield "refund with long reason", p.event("refund.created", long_reason), 200
    event = p.event("charge.succeeded", p.charge())
    event["api_version"] = "v" * 64
    yield "64-char api version", event, 200
    event = p.event("a" * 50 + "." + "b" * 49, {"id": "x", "object": "thing"})
    yield "100-char unknown type", event, 200
    event = p.event("a" * 60 + "." + "b" * 60, {"id": "x", "object": "thing"})
    yield "over-long type", event, 400
    huge_id = p.event("charge.succeeded", p.charge())
    huge_id["id"] = "evt_" + "z" * 300
    yield "over-long event id", huge_id, 400


EXTREMES = list(_extreme_events())


@pytest.mark.parametrize(("name", "event", "status"), EXTREMES, ids=[e[0] for e in EXTREMES])
def test_signed_events_with_extreme_values_never_5xx(deliver, ledger, name, event, status) -> None:  # type: ignore[no-untyped-def]
    """422 here means: stored, and its apply fails visibly (the object is out of bounds)."""
    response = deliver(event)
    assert response.status_code == (200 if status == 422 else status), response.get_json()
    if status == 422:
        assert ledger.get(StripeEvent, event["id"]).status == "failed"
        assert ledger.get(EventFailure, event["id"]).attempts == 1
    elif status == 200:
        assert ledger.get(StripeEvent, event["id"]).status in ("applied", "ignored")
