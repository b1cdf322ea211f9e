"""Charges that name no order: "possible duplicate, no order" (case kind ``unlinked``).

Charges arrive as signed webhooks (``deliver``) and through the backfill from the Stripe
fake; the reconciliation pass runs in auto mode, and a review-only case must never be
refunded. Shapes come from tests/stripe_payloads.py (which renders
payment_method_details.card.fingerprint per brand and last4)."""

from __future__ import annotations

from typing import Any

import pytest

from app import create_app
from domain.cases.refunds import RefundRefused, RefundService
from models import AlertSent, AuditEntry, Charge, DuplicateCase, Order, Refund, RefundAttempt
from tests import stripe_payloads as p
from tests.conftest import API_TOKEN
from tests.integration.test_review_page import review_app, review_settings  # noqa: F401  (fixtures)
from tests.integration.test_reconcile import (  # noqa: F401  (fixtures)
    NOW,
    _double_click,
    gateway,
    job_settings,
    make_order,
    reconcile,
)


@pytest.fixture
def api(job_settings, session_factory):  # type: ignore[no-untyped-def]
    return create_app(job_settings, session_factory=session_factory).test_client()


AUTH = {"Authorization": f"Bearer {API_TOKEN}", "X-Actor": "dana"}


def paid(stripe_api, deliver, **fields: Any) -> dict:  # type: ignore[no-untyped-def]
    """A charge Stripe holds, reported by its signed charge.succeeded webhook."""
    charge = stripe_api.add_charge(**fields)
    assert deliver(p.event("charge.succeeded", charge, created=charge["created"])).status_code == 200
    return charge


def unlinked_cases(ledger) -> list[DuplicateCase]:  # type: ignore[no-untyped-def]
    return sorted(ledger.all(DuplicateCase, DuplicateCase.kind == "unlinked"), key=lambda c: c.id)


def members(session_factory, case_id: int) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        case = session.get(DuplicateCase, case_id)
        return [(cc.charge_id, cc.role) for cc in case.charges]


def test_same_card_twice_within_ten_minutes_opens_a_review_case_never_refunded(
    stripe_api, deliver, reconcile, session_factory, ledger, api, gateway
) -> None:  # type: ignore[no-untyped-def]
    first = paid(stripe_api, deliver, created=NOW - 400)
    second = paid(stripe_api, deliver, created=NOW - 100)
    fingerprint = first["payment_method_details"]["card"]["fingerprint"]
    assert ledger.get(Charge, first["id"]).card_fingerprint == fingerprint  # stored from the webhook
    assert ledger.get(Charge, second["id"]).card_fingerprint == fingerprint

    summary = reconcile()  # auto mode
    counts = summary.counts()
    assert counts["unlinked_cases_opened"] == 1 and counts["cases_opened"] == 0
    (case,) = unlinked_cases(ledger)
    assert case.status == "open" and case.automatic is False and case.decision is None
    assert case.order_id == f"~unlinked:fp_{fingerprint}:{first['id']}"
    assert members(session_factory, case.id) == [(first["id"], "earliest"), (second["id"], "repeat")]
    assert case.excess == {"usd": 4999} and case.order_amount is None
    evidence = " ".join(case.review_reasons)
    assert fingerprint in evidence and first["id"] in evidence and second["id"] in evidence and "49.99 USD" in evidence
    # the synthetic order is no real order and the order rule leaves it alone
    assert ledger.get(Order, case.order_id).amount is None
    assert summary.detection["automatic_open_cases"] == []
    # never refunded: not by the pass, not by a later pass, not when asked
    reconcile(full=True)
    assert ledger.count(RefundAttempt) == 0 and ledger.count(Refund) == 0
    assert stripe_api.refund_requests == [] and stripe_api.refund_creates == 0
    refunds = RefundService(session_factory, gateway)
    with pytest.raises(RefundRefused) as refused:
        refunds.approve(case.id, origin="auto", actor="reconciler")
    assert refused.value.code == "review_only"
    response = api.post(f"/api/duplicates/{case.id}/refund", headers=AUTH, json={})
    assert response.status_code == 422 and response.get_json()["error"] == "review_only"
    view = api.get(f"/api/duplicates/{case.id}", headers=AUTH).get_json()
    assert view["kind"] == "unlinked" and view["review_only"] is True
    assert [c["refundable"] for c in view["charges"]] == [False, False]
    assert ledger.get(DuplicateCase, case.id).status == "open"


def test_charges_only_the_api_knows_are_backfilled_and_grouped(stripe_api, reconcile, ledger) -> None:  # type: ignore[no-untyped-def]
    first = stripe_api.add_charge(created=NOW - 300, customer="cus_Bf1")
    second = stripe_api.add_charge(created=NOW - 240, customer="cus_Bf1")  # no webhook ever came
    assert reconcile().counts()["unlinked_cases_opened"] == 1
    (case,) = unlinked_cases(ledger)
    assert ledger.get(Charge, second["id"]).card_fingerprint == second["payment_method_details"]["card"]["fingerprint"]
    assert case.keeper_charge_id == first["id"] and case.status == "open" and ledger.count(RefundAttempt) == 0


def test_a_third_charge_joins_the_open_case(stripe_api, deliver, reconcile, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    first = paid(stripe_api, deliver, created=NOW - 900)
    second = paid(stripe_api, deliver, created=NOW - 500)
    reconcile()
    third = paid(stripe_api, deliver, created=NOW - 100)  # 400 s after the second, 800 s after the first
    assert reconcile().counts()["unlinked_cases_opened"] == 0
    (case,) = unlinked_cases(ledger)
    assert members(session_factory, case.id) == [(first["id"], "earliest"), (second["id"], "repeat"), (third["id"], "repeat")]
    assert case.excess == {"usd": 2 * 4999}


def test_dry_run_writes_nothing(stripe_api, deliver, reconcile, ledger) -> None:  # type: ignore[no-untyped-def]
    paid(stripe_api, deliver, created=NOW - 300)
    paid(stripe_api, deliver, created=NOW - 200)
    summary = reconcile(mode="dry-run")
    assert summary.counts()["would_open_unlinked"] == 1 and ledger.count(DuplicateCase) == 0
    assert ledger.count(Order) == 0


def test_same_card_two_hours_apart_opens_nothing(stripe_api, deliver, reconcile, ledger) -> None:  # type: ignore[no-untyped-def]
    first = paid(stripe_api, deliver, created=NOW - 7300)
    second = paid(stripe_api, deliver, created=NOW - 100)
    assert ledger.get(Charge, first["id"]).card_fingerprint == ledger.get(Charge, second["id"]).card_fingerprint
    summary = reconcile()
    assert summary.counts()["unlinked_cases_opened"] == 0
    assert ledger.count(DuplicateCase) == 0


def test_same_amount_on_different_cards_opens_nothing(stripe_api, deliver, reconcile, ledger) -> None:  # type: ignore[no-untyped-def]
    first = paid(stripe_api, deliver, created=NOW - 200, last4="4242")
    second = paid(stripe_api, deliver, created=NOW - 100, last4="1881")
    assert ledger.get(Charge, first["id"]).card_fingerprint != ledger.get(Charge, second["id"]).card_fingerprint
    assert reconcile().counts()["unlinked_cases_opened"] == 0
    assert ledger.count(DuplicateCase) == 0


def test_a_linked_charge_and_an_unlinked_one_open_nothing_from_this_rule(
    stripe_api, deliver, reconcile, session_factory, ledger
) -> None:  # type: ignore[no-untyped-def]
    make_order(session_factory, "ord_shirt", 4999)
    linked = paid(stripe_api, deliver, created=NOW - 200, metadata={"order_id": "ord_shirt"})
    loose = paid(stripe_api, deliver, created=NOW - 100)
    assert ledger.get(Charge, linked["id"]).card_fingerprint == ledger.get(Charge, loose["id"]).card_fingerprint
    summary = reconcile()
    assert summary.counts()["unlinked_cases_opened"] == 0 and summary.detection["unlinked_groups_found"] == 0
    assert ledger.count(DuplicateCase) == 0


def test_different_descriptions_are_two_purchases(stripe_api, deliver, reconcile, ledger) -> None:  # type: ignore[no-untyped-def]
    shirt = stripe_api.add_charge(created=NOW - 200)
    mug = stripe_api.add_charge(created=NOW - 100)
    shirt["description"], mug["description"] = "T-shirt, size M", "Mug"
    stripe_api.charges[shirt["id"]]["description"] = "T-shirt, size M"
    stripe_api.charges[mug["id"]]["description"] = "Mug"
    for charge in (shirt, mug):
        assert deliver(p.event("charge.succeeded", charge, created=charge["created"])).status_code == 200
    assert ledger.get(Charge, mug["id"]).description == "Mug"
    assert reconcile().counts()["unlinked_cases_opened"] == 0
    assert ledger.count(DuplicateCase) == 0


def test_same_customer_on_two_cards_opens_a_case_named_by_the_customer(
    stripe_api, deliver, reconcile, ledger
) -> None:  # type: ignore[no-untyped-def]
    first = paid(stripe_api, deliver, created=NOW - 200, customer="cus_Pq1", last4="4242")
    paid(stripe_api, deliver, created=NOW - 100, customer="cus_Pq1", last4="1881")
    assert reconcile().counts()["unlinked_cases_opened"] == 1
    (case,) = unlinked_cases(ledger)
    assert case.order_id == f"~unlinked:cus_Pq1:{first['id']}" and "customer cus_Pq1" in case.review_reasons[0]


def test_dismiss_with_a_note_stands_until_a_new_charge_joins(
    stripe_api, deliver, reconcile, session_factory, ledger, api
) -> None:  # type: ignore[no-untyped-def]
    paid(stripe_api, deliver, created=NOW - 500)
    paid(stripe_api, deliver, created=NOW - 400)
    reconcile()
    (case,) = unlinked_cases(ledger)
    assert api.post(f"/api/duplicates/{case.id}/dismiss", headers=AUTH, json={}).status_code == 422  # a note is required
    response = api.post(f"/api/duplicates/{case.id}/dismiss", headers=AUTH, json={"note": "two tickets, confirmed by phone"})
    assert response.status_code == 200, response.get_json()
    dismissed = ledger.get(DuplicateCase, case.id)
    assert dismissed.status == "dismissed" and dismissed.note == "two tickets, confirmed by phone"
    assert ledger.count(AuditEntry, AuditEntry.case_id == case.id, AuditEntry.action == "dismiss") == 1
    reconcile()
    reconcile(full=True)
    assert [c.status for c in unlinked_cases(ledger)] == ["dismissed"]  # the dismissal stands
    third = paid(stripe_api, deliver, created=NOW - 300)  # a third charge the person never saw
    assert reconcile().counts()["unlinked_cases_opened"] == 1
    old, new = unlinked_cases(ledger)
    assert (old.status, new.status) == ("dismissed", "open") and new.order_id == old.order_id
    assert third["id"] in [cid for cid, _ in members(session_factory, new.id)]


def test_refunded_outside_the_case_closes_as_external(stripe_api, deliver, reconcile, ledger) -> None:  # type: ignore[no-untyped-def]
    paid(stripe_api, deliver, created=NOW - 500)
    repeat = paid(stripe_api, deliver, created=NOW - 400)
    reconcile()
    (case,) = unlinked_cases(ledger)
    refund = stripe_api.add_refund(repeat["id"], 4999)  # refunded in the Dashboard
    assert deliver(p.event("refund.created", refund)).status_code == 200
    assert deliver(p.event("charge.refunded", stripe_api.charge(repeat["id"]))).status_code == 200
    assert reconcile().counts()["unlinked_cases_resolved"] == 1
    closed = ledger.get(DuplicateCase, case.id)
    assert closed.status == "refunded" and closed.decision == "external" and ledger.count(RefundAttempt) == 0


def test_unlinked_cases_are_counted_apart_from_real_cases(
    stripe_api, deliver, reconcile, session_factory, ledger, api
) -> None:  # type: ignore[no-untyped-def]
    _double_click(stripe_api, session_factory)  # a real duplicate on ord_dc (backfilled)
    for created in (NOW - 500, NOW - 400, NOW - 300):
        paid(stripe_api, deliver, created=created, amount=2500, last4="0005")
    summary = reconcile(mode="review")
    counts = summary.counts()
    assert counts["cases_opened"] == 1 and counts["unlinked_cases_opened"] == 1
    listing = api.get("/api/duplicates", headers=AUTH).get_json()
    assert listing["total"] == 2
    assert listing["totals"] == {"usd": {"excess": 4999, "refunded": 0, "excess_display": "49.99 USD", "refunded_display": "0.00 USD"}}
    assert listing["unlinked"] == {"count": 1, "active": 1, "held": {"usd": 5000}, "held_display": {"usd": "50.00 USD"}}
    assert [c["kind"] for c in listing["cases"]] == ["duplicate", "unlinked"]  # the real case first
    metrics = api.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'reconciler_duplicate_cases{status="open"} 1.0' in metrics
    assert 'reconciler_unlinked_cases{status="open"} 1.0' in metrics
    run_alert = ledger.get(AlertSent, f"run:{summary.run_id}")
    assert run_alert is not None and "duplicates found" in run_alert.subject
    # a run that finds only unlinked charges says so in its subject
    for created in (NOW - 90, NOW - 80):
        paid(stripe_api, deliver, created=created, amount=1200, last4="3220")
    only = reconcile(mode="review")
    assert only.counts()["cases_opened"] == 0 and only.counts()["unlinked_cases_opened"] == 1
    assert "possible duplicates with no order" in ledger.get(AlertSent, f"run:{only.run_id}").subject


def test_review_page_shows_it_as_review_only_and_dismisses_it(
    stripe_api, deliver, reconcile, session_factory, ledger, review_app
) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.test_review_page import login, post

    first = paid(stripe_api, deliver, created=NOW - 300)
    second = paid(stripe_api, deliver, created=NOW - 200)
    reconcile(mode="review")
    (case,) = unlinked_cases(ledger)
    web = review_app.test_client()
    login(web)
    listing = web.get("/review").get_data(as_text=True)
    assert "possible duplicate, no order" in listing and "Possible duplicates with no order" in listing
    page = web.get(f"/review/cases/{case.id}").get_data(as_text=True)
    assert "review only" in page and first["id"] in page and second["id"] in page
    assert f"/review/cases/{case.id}/refund" not in page and f"/review/cases/{case.id}/approve" not in page
    refused = post(web, f"/review/cases/{case.id}/refund", **{f"amount-{second['id']}": "49.99"})
    assert refused.status_code in (409, 422) and ledger.count(RefundAttempt) == 0
    response = post(web, f"/review/cases/{case.id}/dismiss", note="same customer bought two gift cards")
    assert response.status_code in (200, 302, 303)
    assert ledger.get(DuplicateCase, case.id).status == "dismissed"
