"""AC4: the client Idempotency-Key on POST /orders/<id>/pay: replay, reuse with another
request (422), a key in flight (409), expiry and clean-up."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from domain.payments import idempotency
from domain.payments.idempotency import purge_expired_idempotency_keys
from models import utcnow
from models.payments import IdempotencyRecord
from tests.integration.test_pay_endpoint import AUTH, make_app, new_order, pay, pay_client  # noqa: F401 (fixtures)


def keyed(client, order_id: str, key: str, body=None):  # type: ignore[no-untyped-def]
    return pay(client, order_id, body, headers={"Idempotency-Key": key})


def test_same_key_and_body_replays_the_first_answer(pay_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_idem")
    first = keyed(pay_client, "ord_idem", "checkout-1", {"payment_method": "pm_card_visa"})
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    again = keyed(pay_client, "ord_idem", "checkout-1", {"payment_method": "pm_card_visa"})
    assert again.status_code == 201  # the same status, not the 200 a fresh request gets
    assert again.get_data() == first.get_data()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert stripe_double.create_requests == 1
    # Without the key, the endpoint answers for the order as it stands now.
    assert pay(pay_client, "ord_idem", {"payment_method": "pm_card_visa"}).status_code == 200


def test_same_key_with_another_body_or_order_is_422(pay_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_idem_a")
    new_order(pay_client, "ord_idem_b")
    assert keyed(pay_client, "ord_idem_a", "k-reuse", {"customer": "cus_A"}).status_code == 201
    other_body = keyed(pay_client, "ord_idem_a", "k-reuse", {"customer": "cus_B"})
    assert (other_body.status_code, other_body.get_json()["error"]) == (422, "idempotency_key_reused")
    other_order = keyed(pay_client, "ord_idem_b", "k-reuse", {"customer": "cus_A"})
    assert (other_order.status_code, other_order.get_json()["error"]) == (422, "idempotency_key_reused")
    assert stripe_double.create_requests == 1


def test_key_in_flight_is_409_then_replays_once_answered(make_app, stripe_double, ledger) -> None:  # type: ignore[no-untyped-def]
    stripe_double.delay = 0.6
    app = make_app()
    new_order(app.test_client(), "ord_idem_flight")
    first: list = []
    thread = threading.Thread(target=lambda: first.append(keyed(app.test_client(), "ord_idem_flight", "k-flight")))
    thread.start()
    deadline = time.monotonic() + 5
    while ledger.count(IdempotencyRecord) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    during = keyed(app.test_client(), "ord_idem_flight", "k-flight")
    assert (during.status_code, during.get_json()["error"]) == (409, "idempotency_key_in_flight")
    thread.join()
    assert first[0].status_code == 201
    after = keyed(app.test_client(), "ord_idem_flight", "k-flight")
    assert (after.status_code, after.get_data()) == (201, first[0].get_data())
    assert stripe_double.creates == 1


def test_a_transient_answer_is_not_kept_so_a_retry_does_the_work(pay_client, stripe_double) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_idem_503")
    stripe_double.fail_next("error", status=500, store=False)
    assert keyed(pay_client, "ord_idem_503", "k-503").status_code == 503
    retry = keyed(pay_client, "ord_idem_503", "k-503")
    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers


def test_a_final_error_is_kept_and_replayed(pay_client, stripe_double, deliver) -> None:  # type: ignore[no-untyped-def]
    response = keyed(pay_client, "ord_idem_none", "k-404")
    assert response.status_code == 404
    new_order(pay_client, "ord_idem_none")
    replay = keyed(pay_client, "ord_idem_none", "k-404")
    assert (replay.status_code, replay.headers["Idempotent-Replayed"]) == (404, "true")
    assert stripe_double.requests == []


def test_keys_expire_after_the_ttl_and_are_then_new(make_app, session_factory, stripe_double) -> None:  # type: ignore[no-untyped-def]
    client = make_app(idempotency_key_ttl_hours=1).test_client()
    new_order(client, "ord_idem_ttl")
    keyed(client, "ord_idem_ttl", "k-ttl", {"customer": "cus_A"})
    with session_factory() as session:
        record = session.query(IdempotencyRecord).one()
        assert timedelta(minutes=59) < idempotency._aware(record.expires_at) - utcnow() <= timedelta(hours=1)
    with session_factory() as session, session.begin():
        session.execute(update(IdempotencyRecord).values(expires_at=utcnow() - timedelta(seconds=1)))
    # Expired: another body is no longer a reuse; it is a new request.
    fresh = keyed(client, "ord_idem_ttl", "k-ttl", {"customer": "cus_B"})
    assert fresh.status_code == 200 and "Idempotent-Replayed" not in fresh.headers


def test_purge_removes_expired_keys_only(pay_client, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    now = utcnow()
    rows = [
        ("expired-done", "done", now - timedelta(hours=25), now - timedelta(hours=1)),
        ("live-done", "done", now, now + timedelta(hours=23)),
        ("expired-held", "in_flight", now - timedelta(seconds=30), now - timedelta(seconds=1)),
        ("expired-abandoned", "in_flight", now - timedelta(hours=25), now - timedelta(hours=1)),
    ]
    with session_factory() as session, session.begin():
        for key, status, locked_at, expires_at in rows:
            session.add(IdempotencyRecord(scope="pay", key=key, fingerprint="0" * 64, status=status,
                                          response_status=200 if status == "done" else None,
                                          response_body="{}" if status == "done" else None,
                                          created_at=locked_at, locked_at=locked_at, expires_at=expires_at))
    assert purge_expired_idempotency_keys(session_factory, now) == 2
    assert sorted(r.key for r in ledger.all(IdempotencyRecord)) == ["expired-held", "live-done"]
    assert purge_expired_idempotency_keys(session_factory, now) == 0


def test_expired_keys_are_purged_opportunistically_when_a_new_key_arrives(pay_client, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    old = utcnow() - timedelta(days=2)
    with session_factory() as session, session.begin():
        for n in range(3):
            session.add(IdempotencyRecord(scope="pay", key=f"old-{n}", fingerprint="0" * 64, status="done",
                                          response_status=201, response_body="{}", created_at=old, locked_at=old,
                                          expires_at=old + timedelta(hours=24)))
    new_order(pay_client, "ord_idem_purge")
    keyed(pay_client, "ord_idem_purge", "k-new")
    assert [r.key for r in ledger.all(IdempotencyRecord)] == ["k-new"]


def test_an_abandoned_in_flight_key_is_taken_over(pay_client, session_factory) -> None:  # type: ignore[no-untyped-def]
    new_order(pay_client, "ord_idem_crash")
    fp = idempotency.fingerprint("POST", "/orders/ord_idem_crash/pay", {})
    stale = utcnow() - timedelta(seconds=idempotency.IN_FLIGHT_TAKEOVER_SECONDS + 1)
    with session_factory() as session, session.begin():
        session.add(IdempotencyRecord(scope="pay", key="k-crashed", fingerprint=fp, status="in_flight",
                                      created_at=stale, locked_at=stale, expires_at=stale + timedelta(hours=24)))
    response = keyed(pay_client, "ord_idem_crash", "k-crashed")
    assert response.status_code == 201
    assert keyed(pay_client, "ord_idem_crash", "k-crashed").headers["Idempotent-Replayed"] == "true"
