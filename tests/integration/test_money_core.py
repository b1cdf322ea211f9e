"""The order's balance is the truth, every pass and every refund.

Each test reproduces one way the money went wrong when a case was treated as a one-time
snapshot (a closed case hiding a later excess, a refund resumed without looking at the
whole order, a failed refund of an older case breaking the webhook), end to end: signed
webhooks, the reconciliation pass, the review API, with Stripe played by the stateful
double behind `responses` and the real stripe-python SDK."""

from __future__ import annotations

from typing import Any

import pytest

from models import AlertSent, AuditEntry, DuplicateCase, Refund, RefundAttempt
from tests import stripe_payloads as p
from tests.integration.test_reconcile import (  # noqa: F401  (fixtures)
    NOW,
    cases,
    gateway,
    job_settings,
    make_order,
    reconcile,
)

DAY = 86400


@pytest.fixture
def api(job_settings, session_factory):  # type: ignore[no-untyped-def]
    """The web app pointed at the Stripe double (the review API's approvals call Stripe)."""
    from app import create_app

    return create_app(job_settings, session_factory=session_factory).test_client()


def _charges(stripe_api, session_factory, order_id: str, n: int, *, amount: int = 4999, created: int = NOW - 30, deliver=None, **fields: Any) -> list[dict]:  # type: ignore[no-untyped-def]
    make_order(session_factory, order_id, amount)
    made = [stripe_api.add_charge(amount=amount, metadata={"order_id": order_id}, created=created, **fields) for _ in range(n)]
    if deliver is not None:
        for charge in made:
            assert deliver(p.event("charge.succeeded", charge, created=created)).status_code == 200
    return sorted(made, key=lambda c: c["id"])  # keeper first (same second: smallest id)


def _alerts(ledger, prefix: str) -> list[AlertSent]:  # type: ignore[no-untyped-def]
    return [a for a in ledger.all(AlertSent) if a.key.startswith(prefix)]


def _fail_refund(stripe_api, deliver, refund: dict, *, status: str = "failed", webhook: bool = True, created: int = NOW + 3 * DAY) -> dict:  # type: ignore[no-untyped-def]
    failed = dict(refund, status=status, failure_reason="expired_or_canceled_card" if status == "failed" else None)
    stripe_api.refunds[failed["id"]] = failed
    if webhook:
        response = deliver(p.event(f"refund.{'failed' if status == 'failed' else 'updated'}", failed, created=created))
        assert response.status_code == 200, response.get_json()
    return failed


def _refunded_then_another_charge(stripe_api, session_factory, deliver, reconcile, ledger, order_id: str):  # type: ignore[no-untyped-def]
    """A double click refunded by us (case 1), then a third charge of another amount: an
    open case 2. Returns the refunded duplicate and case 2."""
    keeper, duplicate = _charges(stripe_api, session_factory, order_id, 2, deliver=deliver)
    reconcile(mode="auto")
    (first,) = cases(ledger, order_id)
    assert first.status == "refunded"
    third = stripe_api.add_charge(amount=1500, metadata={"order_id": order_id}, created=NOW - 20)
    assert deliver(p.event("charge.succeeded", third)).status_code == 200
    reconcile(mode="review")
    second = cases(ledger, order_id)[1]
    assert second.status == "open"
    return duplicate, second


# -- 1. a closed case never hides a later excess --------------------------------------------


@pytest.mark.parametrize("status", ["failed", "canceled"])
@pytest.mark.parametrize("full", [False, True])
def test_outside_refund_that_fails_reopens_the_external_case(stripe_api, reconcile, session_factory, deliver, ledger, status, full) -> None:  # type: ignore[no-untyped-def]
    keeper, duplicate = _charges(stripe_api, session_factory, "ord_ext", 2)
    reconcile(mode="review")
    (case,) = cases(ledger, "ord_ext")
    assert case.status == "open"

    outside = stripe_api.add_refund(duplicate["id"], 4999)  # support refunded it in the Dashboard
    reconcile(mode="review")
    (case,) = cases(ledger, "ord_ext")
    assert case.status == "refunded" and case.decision == "external"

    _fail_refund(stripe_api, deliver, outside, status=status)
    assert ledger.order("ord_ext")["totals"]["usd"]["held"] == 2 * 4999
    summary = reconcile(mode="review", full=full)
    (case,) = cases(ledger, "ord_ext")  # the same case, reopened: no second case
    assert case.status == "open" and case.decision is None and not case.automatic
    assert case.excess == {"usd": 4999}
    assert summary.detection["cases_reopened"] == [case.id]
    assert "reopened_excess" in [e.action for e in ledger.all(AuditEntry, AuditEntry.case_id == case.id)]
    assert _alerts(ledger, "case-reopened_excess:")
    # reopened cases go to a person, even in auto mode
    reconcile(mode="auto")
    assert stripe_api.refund_creates == 0 and cases(ledger, "ord_ext")[0].status == "open"


def test_outside_refund_failure_seen_only_by_backfill_reopens_the_case(stripe_api, reconcile, session_factory, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    _, duplicate = _charges(stripe_api, session_factory, "ord_bf", 2)
    reconcile(mode="review")
    outside = stripe_api.add_refund(duplicate["id"], 4999, created=NOW - 10)
    reconcile(mode="review")
    assert cases(ledger, "ord_bf")[0].status == "refunded"
    _fail_refund(stripe_api, deliver, outside, webhook=False)  # no webhook: backfill reads it
    reconcile(mode="review")
    assert cases(ledger, "ord_bf")[0].status == "open"


def test_pending_outside_refund_that_fails_long_after_is_read_again_every_pass(stripe_api, reconcile, session_factory, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    # Charges and a pending outside refund from before the backfill window, known from their
    # webhooks; the refund's failure sends no webhook (or it is lost) and no listing shows
    # it again (listings go by creation time): every pass re-reads unsettled refunds.
    old = NOW - 9 * DAY
    keeper, duplicate = _charges(stripe_api, session_factory, "ord_pending", 2, created=old, deliver=deliver)
    reconcile(mode="review")
    outside = stripe_api.add_refund(duplicate["id"], 4999, status="pending", created=old + 60)
    assert deliver(p.event("refund.created", outside, created=old + 60)).status_code == 200
    reconcile(mode="review")
    assert cases(ledger, "ord_pending")[0].status == "refunded"  # external, while pending
    _fail_refund(stripe_api, deliver, outside, webhook=False)
    summary = reconcile(mode="review")
    assert summary.backfill["refunds_rechecked"] == 1
    (case,) = cases(ledger, "ord_pending")
    assert case.status == "open"


def test_our_refund_failing_after_the_case_closed_with_a_later_dismissed_case(stripe_api, reconcile, session_factory, deliver, ledger, client, api, api_headers) -> None:  # type: ignore[no-untyped-def]
    duplicate, second = _refunded_then_another_charge(stripe_api, session_factory, deliver, reconcile, ledger, "ord_later")
    # finance dismisses the second case
    response = api.post(f"/api/duplicates/{second.id}/dismiss", headers=api_headers, json={"note": "tip"})
    assert response.status_code == 200

    (our_refund,) = stripe_api.refunds_of(duplicate["id"])
    _fail_refund(stripe_api, deliver, our_refund)
    reconcile(mode="review", full=True)
    active = [c for c in cases(ledger, "ord_later") if c.status in ("open", "refunding", "failed")]
    assert len(active) == 1, [(c.id, c.status) for c in cases(ledger, "ord_later")]
    assert active[0].excess == {"usd": 4999 + 1500}


# -- 2. a partly skipped case goes back to a person ------------------------------------------


def test_partly_skipped_case_is_not_closed_as_refunded(stripe_api, reconcile, session_factory, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    # Old charges (outside the backfill window) whose webhooks came at the time; support
    # then refunded 10.00 of one in the Dashboard, and that news never reached us.
    old = NOW - 9 * DAY
    keeper, b, c = _charges(stripe_api, session_factory, "ord_skip", 3, created=old, deliver=deliver)
    stripe_api.add_refund(c["id"], 1000, created=old + 60)

    summary = reconcile(mode="auto")
    results = {r["charge_id"]: r["result"] for r in summary.refunds}
    assert results[c["id"]] == "skipped"
    assert results[b["id"]] == "refunded"
    (case,) = cases(ledger, "ord_skip")
    assert case.status == "open" and not case.automatic, case.status
    assert any(r.startswith("refund_skipped") for r in case.review_reasons)
    assert any(r.startswith("still_over_total") for r in case.review_reasons)
    assert "returned_to_review" in [e.action for e in ledger.all(AuditEntry, AuditEntry.case_id == case.id)]
    assert _alerts(ledger, "case-returned_to_review:")
    # and the next pass keeps it in front of a person with current figures
    reconcile(mode="auto")
    (case,) = cases(ledger, "ord_skip")
    assert case.status == "open" and case.excess == {"usd": 3999}
    assert stripe_api.refund_creates == 1


# -- 3. a refund.failed for an older case while a newer case is active ----------------------


@pytest.mark.parametrize("path", ["webhook", "backfill"])
def test_older_case_refund_failing_while_a_newer_case_is_active(stripe_api, reconcile, session_factory, deliver, ledger, path) -> None:  # type: ignore[no-untyped-def]
    duplicate, second = _refunded_then_another_charge(stripe_api, session_factory, deliver, reconcile, ledger, "ord_two")

    (our_refund,) = stripe_api.refunds_of(duplicate["id"])
    _fail_refund(stripe_api, deliver, our_refund, webhook=path == "webhook")
    summary = reconcile(mode="review")
    assert summary.status == "succeeded", summary.errors
    first, second = cases(ledger, "ord_two")
    assert first.status == "refunded" and second.status == "open"
    assert "merged" in [e.action for e in ledger.all(AuditEntry, AuditEntry.case_id == first.id)]
    assert "merged" in [e.action for e in ledger.all(AuditEntry, AuditEntry.case_id == second.id)]
    (attempt,) = ledger.all(RefundAttempt)
    assert attempt.status == "failed"
    assert ledger.order("ord_two")["totals"]["usd"]["held"] == 2 * 4999 + 1500  # the money is back
    assert second.excess == {"usd": 4999 + 1500}
    assert _alerts(ledger, "case-merged:")


# -- 4. a deferred refund is resumed only if the whole order still needs it -----------------


@pytest.mark.parametrize("change", ["keeper_refunded", "keeper_disputed", "keeper_partly_refunded"])
def test_resumed_refund_rechecks_the_whole_order(stripe_api, reconcile, session_factory, ledger, change) -> None:  # type: ignore[no-untyped-def]
    keeper, duplicate = _charges(stripe_api, session_factory, "ord_resume", 2)
    stripe_api.fail_refunds_with = [500, 500, 500]
    first = reconcile(mode="auto")
    assert first.refunds[0]["result"] == "deferred"
    assert cases(ledger, "ord_resume")[0].status == "refunding"

    # In between, the keeper changed at Stripe (and no webhook told us).
    if change == "keeper_refunded":
        stripe_api.add_refund(keeper["id"], 4999, created=NOW - 7200 * 2)
    elif change == "keeper_partly_refunded":
        stripe_api.add_refund(keeper["id"], 1000, created=NOW - 7200 * 2)
    else:
        stripe_api.charges[keeper["id"]]["disputed"] = True

    second = reconcile(mode="auto")
    assert stripe_api.refund_creates == 0, "the duplicate was refunded although the keeper no longer holds the sale"
    assert [r["result"] for r in second.refunds if r["charge_id"] == duplicate["id"]] == ["skipped"]
    (case,) = cases(ledger, "ord_resume")
    assert "returned_to_review" in [e.action for e in ledger.all(AuditEntry, AuditEntry.case_id == case.id)]
    if change == "keeper_refunded":
        # the duplicate is now the only charge holding the sale: nothing more to do
        assert case.status == "refunded" and case.decision == "external"
    else:
        assert case.status == "open" and not case.automatic
    held = sum(stripe_api.charge(x["id"])["amount"] - stripe_api.charge(x["id"])["amount_refunded"] for x in (keeper, duplicate))
    assert held >= 4999


def test_resumed_refund_never_takes_the_order_below_its_total(stripe_api, reconcile, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    # Triple click: both duplicates approved; the first call (the latest charge) fails with
    # 500s and is deferred, the other goes through. Before the next pass, support gives
    # the customer 10.00 back on the keeper: the deferred duplicate must not go now.
    keeper, b, c = _charges(stripe_api, session_factory, "ord_floor", 3)
    stripe_api.fail_refunds_with = [500, 500, 500]
    first = reconcile(mode="auto")
    assert sorted(r["result"] for r in first.refunds) == ["deferred", "refunded"]
    stripe_api.add_refund(keeper["id"], 1000, created=NOW - 9 * DAY)
    second = reconcile(mode="auto")
    assert [r["result"] for r in second.refunds] == ["skipped"]
    assert stripe_api.refund_creates == 1
    held = sum(stripe_api.charge(x["id"])["amount"] - stripe_api.charge(x["id"])["amount_refunded"] for x in (keeper, b, c))
    assert held == 3999 + 4999  # above the total: a person decides the rest
    assert cases(ledger, "ord_floor")[0].status == "open"


# -- also found -------------------------------------------------------------------------------


def test_approving_without_an_api_key_is_refused_and_changes_nothing(stripe_api, reconcile, session_factory, ledger, settings, app, api_headers) -> None:  # type: ignore[no-untyped-def]
    from app import create_app

    _charges(stripe_api, session_factory, "ord_nokey", 2)
    reconcile(mode="review")
    (case,) = cases(ledger, "ord_nokey")
    keyless = create_app(settings.with_overrides(stripe_api_key=None), session_factory=session_factory)
    response = keyless.test_client().post(f"/api/duplicates/{case.id}/refund", headers=api_headers)
    assert response.status_code == 409
    assert response.get_json()["error"] == "stripe_not_configured"
    (case,) = cases(ledger, "ord_nokey")
    assert case.status == "open" and case.decision is None
    assert ledger.all(RefundAttempt) == []
    assert stripe_api.refund_requests == []


def test_reapproving_a_failed_case_proposes_only_what_is_still_held(stripe_api, reconcile, session_factory, deliver, ledger, client, api, api_headers) -> None:  # type: ignore[no-untyped-def]
    keeper, b, c = _charges(stripe_api, session_factory, "ord_again", 3, deliver=deliver)
    reconcile(mode="auto")
    assert stripe_api.refund_creates == 2
    (refund_c,) = stripe_api.refunds_of(c["id"])
    _fail_refund(stripe_api, deliver, refund_c)
    (case,) = cases(ledger, "ord_again")
    assert case.status == "failed"

    response = api.post(f"/api/duplicates/{case.id}/refund", headers=api_headers)
    assert response.status_code == 200, response.get_json()
    new_requests = stripe_api.refund_requests[2:]
    assert [(r["charge"], r["amount"], r["_idempotency_key"]) for r in new_requests] == [
        (c["id"], "4999", f"dup-refund-{c['id']}-2")
    ]
    assert cases(ledger, "ord_again")[0].status == "refunded"


def test_refund_path_on_a_connected_account_sends_the_account_on_every_call(stripe_api, mock, reconcile, session_factory, ledger, client, api, api_headers) -> None:  # type: ignore[no-untyped-def]
    keeper, duplicate = _charges(stripe_api, session_factory, "ord_connect", 2)
    for charge in (keeper, duplicate):
        event = p.event("charge.succeeded", stripe_api.charge(charge["id"]), account="acct_1Connected")
        assert client.post("/webhooks/stripe", data=p.encode(event), headers={"Stripe-Signature": p.sign(p.encode(event), _secret()), "Content-Type": "application/json"}).status_code == 200
    reconcile(mode="review")  # connected accounts are never automatic
    (case,) = cases(ledger, "ord_connect")
    calls_before = len(mock.calls)
    response = api.post(f"/api/duplicates/{case.id}/refund", headers=api_headers)
    assert response.status_code == 200, response.get_json()
    refund_path_calls = mock.calls[calls_before:]
    assert refund_path_calls, "the approval made no Stripe call"
    for call in refund_path_calls:
        assert call.request.headers.get("Stripe-Account") == "acct_1Connected", call.request.url
    assert any("/v1/refunds?" in call.request.url for call in refund_path_calls)  # the listing too
    assert stripe_api.refund_creates == 1


def _secret() -> str:
    from tests.conftest import WEBHOOK_SECRET

    return WEBHOOK_SECRET


def test_dismissal_stands_only_for_the_state_the_person_saw(stripe_api, reconcile, session_factory, deliver, ledger, client, api, api_headers) -> None:  # type: ignore[no-untyped-def]
    keeper, b, c = _charges(stripe_api, session_factory, "ord_dis", 3, deliver=deliver)
    reconcile(mode="review")
    (case,) = cases(ledger, "ord_dis")
    assert api.post(f"/api/duplicates/{case.id}/dismiss", headers=api_headers, json={"note": "two items"}).status_code == 200
    case = cases(ledger, "ord_dis")[0]
    assert case.dismissed_state == {"held": {"usd": 3 * 4999}, "charges": sorted(x["id"] for x in (keeper, b, c))}

    # less held than when dismissed (support refunded one): the dismissal still stands
    refund = stripe_api.add_refund(c["id"], 4999)
    assert deliver(p.event("refund.created", refund)).status_code == 200
    reconcile(mode="review", full=True)
    assert [x.status for x in cases(ledger, "ord_dis")] == ["dismissed"]

    # that refund fails: back to exactly what the person saw, still covered
    _fail_refund(stripe_api, deliver, refund)
    reconcile(mode="review", full=True)
    assert [x.status for x in cases(ledger, "ord_dis")] == ["dismissed"]

    # a new charge of any amount: more than the person saw, a new case
    extra = stripe_api.add_charge(amount=100, metadata={"order_id": "ord_dis"}, created=NOW - 5)
    assert deliver(p.event("charge.succeeded", extra)).status_code == 200
    reconcile(mode="review")
    statuses = [x.status for x in cases(ledger, "ord_dis")]
    assert statuses == ["dismissed", "open"]


def test_a_person_cannot_refund_an_order_below_its_total(stripe_api, reconcile, session_factory, deliver, ledger, client, api, api_headers) -> None:  # type: ignore[no-untyped-def]
    keeper, duplicate = _charges(stripe_api, session_factory, "ord_person", 2, deliver=deliver)
    # the keeper was partly refunded by support (and we heard of it)
    refund = stripe_api.add_refund(keeper["id"], 1000)
    assert deliver(p.event("refund.created", refund)).status_code == 200
    reconcile(mode="review")
    (case,) = cases(ledger, "ord_person")
    response = api.post(
        f"/api/duplicates/{case.id}/refund", headers=api_headers,
        json={"refunds": [{"charge_id": duplicate["id"], "amount": 4999}]},
    )
    assert response.status_code == 422 and response.get_json()["error"] == "below_order_total"
    assert stripe_api.refund_requests == [] and ledger.all(RefundAttempt) == []
    ok = api.post(
        f"/api/duplicates/{case.id}/refund", headers=api_headers,
        json={"refunds": [{"charge_id": duplicate["id"], "amount": 3999}]},
    )
    assert ok.status_code == 200, ok.get_json()
    assert ledger.order("ord_person")["totals"]["usd"]["held"] == 4999
    assert cases(ledger, "ord_person")[0].status == "refunded"
    assert sum(r.amount for r in ledger.all(Refund) if r.status == "succeeded") == 1000 + 3999
    assert ledger.get(DuplicateCase, case.id).status == "refunded"


def test_an_order_the_rule_cannot_assess_does_not_stop_the_pass(stripe_api, reconcile, session_factory, ledger, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from domain.ledger import balance as balance_module

    _charges(stripe_api, session_factory, "ord_fine", 2)
    _charges(stripe_api, session_factory, "ord_broken", 2)
    real = balance_module.OrderBalance.assess

    def flaky(self, **options):  # type: ignore[no-untyped-def]
        if self.order.id == "ord_broken":
            raise RuntimeError("unexpected data")
        return real(self, **options)

    monkeypatch.setattr(balance_module.OrderBalance, "assess", flaky)
    summary = reconcile(mode="auto")
    assert summary.status == "partial"
    assert any("ord_broken" in e for e in summary.errors)
    assert [c.status for c in cases(ledger, "ord_fine")] == ["refunded"]  # the rest went on


@pytest.mark.postgres
def test_refund_failures_racing_a_pass_on_postgres_keep_one_active_case(stripe_api, reconcile, session_factory, deliver, ledger, app) -> None:  # type: ignore[no-untyped-def]
    """Copies of the refund.failed of an older case's refund, from ten threads, while a
    pass runs over the same order (which has a newer open case): every copy is answered
    200, the failure is applied once, and the order never has two active cases."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import WEBHOOK_SECRET

    duplicate, second = _refunded_then_another_charge(stripe_api, session_factory, deliver, reconcile, ledger, "ord_race")
    (our_refund,) = stripe_api.refunds_of(duplicate["id"])
    failed = dict(our_refund, status="failed", failure_reason="expired_or_canceled_card")
    stripe_api.refunds[failed["id"]] = failed
    bodies = [p.encode(p.event("refund.failed", failed, created=NOW + DAY)) for _ in range(3)]  # three distinct events
    barrier = threading.Barrier(11)

    def post(index: int) -> list[int]:
        barrier.wait()
        client = app.test_client()
        return [
            client.post("/webhooks/stripe", data=body, headers={"Stripe-Signature": p.sign(body, WEBHOOK_SECRET)}).status_code
            for body in bodies * 2
        ]

    def run_pass() -> str:
        barrier.wait()
        return reconcile(mode="review", full=True).status

    with ThreadPoolExecutor(11) as pool:
        posts = [pool.submit(post, i) for i in range(10)]
        passed = pool.submit(run_pass)
        statuses = [s for f in posts for s in f.result()]
        assert passed.result() in ("succeeded", "partial")
    assert statuses == [200] * len(statuses)
    reconcile(mode="review")
    active = [c for c in cases(ledger, "ord_race") if c.status in ("open", "refunding", "failed")]
    assert len(active) == 1
    assert active[0].excess == {"usd": 4999 + 1500}
    (attempt,) = ledger.all(RefundAttempt)
    assert attempt.status == "failed"
