"""Duplicate authorisations: an uncaptured authorisation on an order already paid opens a
case of kind "authorization" whose proposal is to release it, never to capture it. Auto mode
releases the clear ones under a deterministic key: cancel the PaymentIntent awaiting
capture, or refund the bare charge. Before API version 2025-03-31 a cancellation also made
a Refund object; from then on it does not: the ledger reads both as released."""

from __future__ import annotations

import pytest

from models import AuditEntry, CaseCharge, Charge, RefundAttempt
from tests import stripe_payloads as p
from tests.integration.test_money_core import api  # noqa: F401  (fixture)
from tests.integration.test_reconcile import (  # noqa: F401  (fixtures)
    NOW,
    cases,
    gateway,
    job_settings,
    make_order,
    reconcile,
)

BASIL = "2025-03-31.basil"


def _paid_then_authorised(stripe_api, session_factory, deliver, order_id: str, *, auth_amount: int = 4999, with_intent: bool = True):  # type: ignore[no-untyped-def]
    make_order(session_factory, order_id, 4999)
    paid = stripe_api.add_charge(amount=4999, metadata={"order_id": order_id}, created=NOW - 60)
    auth = stripe_api.add_authorization(amount=auth_amount, metadata={"order_id": order_id}, created=NOW - 50, with_intent=with_intent)
    for charge in (paid, auth):
        assert deliver(p.event("charge.succeeded", charge)).status_code == 200
    return paid, auth


@pytest.mark.parametrize("api_version", [p.CURRENT_API_VERSION, BASIL])
def test_authorisation_next_to_a_paid_charge_is_released_by_canceling_its_payment_intent(stripe_api, reconcile, session_factory, deliver, ledger, api_version) -> None:  # type: ignore[no-untyped-def]
    stripe_api.api_version = api_version
    paid, auth = _paid_then_authorised(stripe_api, session_factory, deliver, "ord_auth")

    reconcile(mode="review")
    (case,) = cases(ledger, "ord_auth")
    assert case.kind == "authorization" and case.status == "open" and case.automatic
    assert case.keeper_charge_id == paid["id"]
    members = {cc.charge_id: (cc.role, cc.proposed_refund) for cc in ledger.all(CaseCharge, CaseCharge.case_id == case.id)}
    assert members[auth["id"]] == ("authorization", 4999)

    summary = reconcile(mode="auto")
    assert [r["result"] for r in summary.refunds] == ["released"]
    (cancel,) = stripe_api.cancel_requests
    assert cancel["_intent"] == auth["payment_intent"]
    assert cancel["_idempotency_key"] == f"dup-release-{auth['id']}-1"
    assert cancel["cancellation_reason"] == "duplicate"
    assert stripe_api.refund_requests == []  # nothing captured, nothing refunded
    assert stripe_api.charges[paid["id"]]["captured"] and not stripe_api.charges[auth["id"]]["captured"]
    assert ledger.get(Charge, auth["id"]).released
    (case,) = cases(ledger, "ord_auth")
    assert case.status == "refunded"
    (attempt,) = ledger.all(RefundAttempt)
    assert attempt.action == "release" and attempt.status == "succeeded"

    # Stripe's own events for the release, in this version's shape, change nothing more,
    # and later passes (full too) keep the case closed.
    canceled = stripe_api.payment_intents[auth["payment_intent"]]
    assert deliver(p.event("payment_intent.canceled", canceled, api_version=api_version)).status_code == 200
    assert deliver(p.event("charge.refunded" if api_version < "2025-03-31" else "charge.updated", stripe_api.charge(auth["id"]))).status_code == 200
    reconcile(mode="auto", full=True)
    assert [c.status for c in cases(ledger, "ord_auth")] == ["refunded"]
    assert len(stripe_api.cancel_requests) == 1


def test_bare_uncaptured_charge_is_released_by_a_refund(stripe_api, reconcile, session_factory, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    paid, auth = _paid_then_authorised(stripe_api, session_factory, deliver, "ord_bare", with_intent=False)
    reconcile(mode="auto")
    (request,) = stripe_api.refund_requests
    assert request["charge"] == auth["id"] and request["amount"] == "4999"
    assert request["_idempotency_key"] == f"dup-release-{auth['id']}-1"
    assert stripe_api.cancel_requests == []
    assert ledger.get(Charge, auth["id"]).released
    assert cases(ledger, "ord_bare")[0].status == "refunded"
    assert ledger.order("ord_bare")["totals"]["usd"]["held"] == 4999  # the sale is intact


def test_authorisation_of_another_amount_goes_to_finance_who_releases_it(stripe_api, reconcile, session_factory, deliver, ledger, api, api_headers) -> None:  # type: ignore[no-untyped-def]
    paid, auth = _paid_then_authorised(stripe_api, session_factory, deliver, "ord_other", auth_amount=1500)
    reconcile(mode="auto")
    assert stripe_api.cancel_requests == []
    (case,) = cases(ledger, "ord_other")
    assert case.kind == "authorization" and not case.automatic
    assert any(r.startswith("authorization_not_clear") for r in case.review_reasons)
    # a release is whole: another amount is refused
    partial = api.post(f"/api/duplicates/{case.id}/refund", headers=api_headers, json={"refunds": [{"charge_id": auth["id"], "amount": 500}]})
    assert partial.status_code == 422 and partial.get_json()["error"] == "invalid_amount"
    response = api.post(f"/api/duplicates/{case.id}/refund", headers=api_headers)
    assert response.status_code == 200, response.get_json()
    assert len(stripe_api.cancel_requests) == 1
    assert cases(ledger, "ord_other")[0].status == "refunded"
    assert "approve" in [e.action for e in ledger.all(AuditEntry, AuditEntry.case_id == case.id)]


def test_authorisation_captured_before_the_release_is_not_released(stripe_api, reconcile, session_factory, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    paid, auth = _paid_then_authorised(stripe_api, session_factory, deliver, "ord_cap")
    reconcile(mode="review")
    stripe_api.capture_charge(auth["id"])  # the merchant captured it meanwhile (no webhook yet)
    summary = reconcile(mode="auto")
    # the case is now about captured money: the release is not sent; the duplicate
    # capture is a refund case for the next pass (or a person)
    assert stripe_api.cancel_requests == []
    assert not [r for r in summary.refunds if r["result"] == "released"]
    assert any(c.status in ("open", "refunding", "refunded") for c in cases(ledger, "ord_cap"))
    reconcile(mode="review")
    active = [c for c in cases(ledger, "ord_cap") if c.status in ("open", "failed", "refunding")]
    refunded = [c for c in cases(ledger, "ord_cap") if c.status == "refunded"]
    assert active or refunded
    # whatever happened, the order never ends below its total and the keeper is intact
    assert stripe_api.charge(paid["id"])["amount_refunded"] == 0


def test_expired_authorisation_closes_its_case(stripe_api, reconcile, session_factory, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    paid, auth = _paid_then_authorised(stripe_api, session_factory, deliver, "ord_exp")
    reconcile(mode="review")
    assert cases(ledger, "ord_exp")[0].status == "open"
    expired = dict(stripe_api.charge(auth["id"]))  # 2025-03-31 and later: nothing on the charge says so
    assert deliver(p.event("charge.expired", expired, created=NOW + 7 * 86400)).status_code == 200
    assert ledger.get(Charge, auth["id"]).released
    reconcile(mode="review")
    (case,) = cases(ledger, "ord_exp")
    assert case.status == "refunded" and case.decision == "external"


def test_second_authorisation_before_any_capture_is_extra(stripe_api, reconcile, session_factory, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    make_order(session_factory, "ord_two_auth", 4999)
    first = stripe_api.add_authorization(metadata={"order_id": "ord_two_auth"}, created=NOW - 60, with_intent=True)
    second = stripe_api.add_authorization(metadata={"order_id": "ord_two_auth"}, created=NOW - 59, with_intent=True)
    reconcile(mode="auto")
    (cancel,) = stripe_api.cancel_requests
    assert cancel["_intent"] == second["payment_intent"]  # the first authorisation is the keeper
    assert stripe_api.payment_intents[first["payment_intent"]]["status"] == "requires_capture"
