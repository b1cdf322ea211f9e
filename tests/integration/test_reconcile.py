"""The reconciliation pass against the real stripe-python SDK, with Stripe played by a
stateful double behind `responses` (tests/stripe_fake/): backfill, detection, the phased
refund path, crash recovery, modes, failures and alerts."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from domain.stripe.gateway import StripeGateway
from domain.orders import OrderInput, upsert_order
from domain.cases.refunds import RefundService
from config import Settings
from jobs.lease import exclusive_pass
from jobs.reconcile import RunInProgress, run_reconciliation
from models import AlertSent, AuditEntry, DuplicateCase, ReconciliationRun, Refund, RefundAttempt, run_in_transaction
from tests import stripe_payloads as p
from tests.stripe_fake import API

NOW = int(time.time())


@pytest.fixture
def job_settings(settings: Settings) -> Settings:
    return settings.with_overrides(stripe_api_base=API, stripe_max_network_retries=0, refund_mode="auto")


@pytest.fixture
def gateway(job_settings: Settings) -> StripeGateway:
    return StripeGateway.from_settings(job_settings)


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def reconcile(session_factory, gateway, job_settings):  # type: ignore[no-untyped-def]
    sleeps = Sleeps()

    def _run(**options: Any):  # type: ignore[no-untyped-def]
        options.setdefault("sleep", sleeps)
        settings = options.pop("settings", job_settings)
        return run_reconciliation(session_factory, options.pop("gateway", gateway), settings, **options)

    _run.sleeps = sleeps  # type: ignore[attr-defined]
    return _run


def make_order(session_factory, order_id: str, amount: int | None, currency: str = "usd") -> None:  # type: ignore[no-untyped-def]
    if amount is None:
        return
    run_in_transaction(
        session_factory,
        lambda s: upsert_order(s, OrderInput(order_id, amount, currency, None), source="api"),
    )


def cases(ledger, order_id: str | None = None) -> list[DuplicateCase]:  # type: ignore[no-untyped-def]
    where = [DuplicateCase.order_id == order_id] if order_id else []
    return sorted(ledger.all(DuplicateCase, *where), key=lambda c: c.id)


# -- AC2: a missed webhook is backfilled and refunded --------------------------------------


def test_charge_only_the_api_knows_is_backfilled_and_refunded(
    stripe_api, reconcile, session_factory, deliver, ledger
) -> None:  # type: ignore[no-untyped-def]
    make_order(session_factory, "ord_missed", 4999)
    first = stripe_api.add_charge(metadata={"order_id": "ord_missed"}, created=NOW - 60)
    second = stripe_api.add_charge(metadata={"order_id": "ord_missed"}, created=NOW - 59)
    assert deliver(p.event("charge.succeeded", first)).status_code == 200  # the second webhook never came

    summary = reconcile()

    assert summary.status == "succeeded", summary.errors
    assert summary.backfill["charges"] == 2
    assert stripe_api.refund_creates == 1
    (request,) = stripe_api.refund_requests
    assert request["charge"] == second["id"] and request["amount"] == "4999" and request["reason"] == "duplicate"
    assert request["_idempotency_key"] == f"dup-refund-{second['id']}-1"
    assert request["metadata[order_id]"] == "ord_missed"
    (case,) = cases(ledger, "ord_missed")
    assert case.status == "refunded" and case.decision == "auto" and case.keeper_charge_id == first["id"]
    assert ledger.order("ord_missed")["totals"]["usd"] == {"charged": 9998, "refunded": 4999, "held": 4999}
    (refund,) = ledger.all(Refund)
    assert refund.charge_id == second["id"] and refund.origin == "auto" and refund.amount == 4999
    run = ledger.get(ReconciliationRun, summary.run_id)
    assert run.status == "succeeded" and run.watermark == NOW - 59 and run.counts["refunds_issued"] == 1


def test_backfill_pages_to_the_end_and_keeps_its_watermark(stripe_api, reconcile, ledger) -> None:  # type: ignore[no-untyped-def]
    for i in range(250):
        stripe_api.add_charge(metadata={"order_id": f"ord_page_{i}"}, created=NOW - 1000 + i)
    summary = reconcile(mode="review")
    assert summary.backfill["charges"] == 250
    charge_lists = [u for u in stripe_api.list_requests if "/v1/charges" in u]
    assert len(charge_lists) == 3 and "starting_after" in charge_lists[2]
    assert summary.watermark == NOW - 1000 + 249

    stripe_api.list_requests.clear()
    later = stripe_api.add_charge(metadata={"order_id": "ord_later"}, created=NOW + 5)
    second = reconcile(mode="review")
    first_list = next(u for u in stripe_api.list_requests if "/v1/charges" in u)
    # starts from the last watermark minus the overlap, in Stripe's time
    assert f"created%5Bgt%5D={NOW - 1000 + 249 - 3600 - 1}" in first_list
    assert second.watermark == later["created"]
    # the overlap re-reads the last hour: every charge again here, applied idempotently
    assert second.backfill["charges"] == 251


# -- AC3: reruns, crashes and concurrent passes --------------------------------------------


def _double_click(stripe_api, session_factory, order_id: str = "ord_dc", amount: int = 4999):  # type: ignore[no-untyped-def]
    make_order(session_factory, order_id, amount)
    a = stripe_api.add_charge(amount=amount, metadata={"order_id": order_id}, created=NOW - 30)
    b = stripe_api.add_charge(amount=amount, metadata={"order_id": order_id}, created=NOW - 30)
    keeper, duplicate = sorted([a, b], key=lambda c: c["id"])
    return keeper, duplicate


def test_rerun_issues_no_second_refund(stripe_api, reconcile, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    _double_click(stripe_api, session_factory)
    reconcile()
    reconcile()
    reconcile(full=True)
    assert stripe_api.refund_creates == 1
    assert len(stripe_api.refund_requests) == 1
    assert len(cases(ledger)) == 1


@pytest.mark.parametrize("listing_shows_the_refund", [True, False])
def test_crash_between_the_call_and_our_commit_refunds_once(
    stripe_api, reconcile, session_factory, gateway, job_settings, ledger, listing_shows_the_refund
) -> None:  # type: ignore[no-untyped-def]
    keeper, duplicate = _double_click(stripe_api, session_factory)

    def crash(attempt, refund):  # type: ignore[no-untyped-def]
        raise SystemExit("killed after Stripe answered")

    crashing = RefundService(session_factory, gateway, after_call=crash)
    with pytest.raises(SystemExit):
        reconcile(refund_service=crashing)
    assert stripe_api.refund_creates == 1
    (attempt,) = ledger.all(RefundAttempt)
    assert attempt.status == "recorded" and attempt.refund_id is None  # our commit never happened

    stripe_api.hide_refunds_from_lists = not listing_shows_the_refund
    summary = reconcile()
    assert stripe_api.refund_creates == 1  # no second refund
    if listing_shows_the_refund:
        # adopted from Stripe's refunds (backfill or the re-read saw our key): no call
        assert len(stripe_api.refund_requests) == 1
    else:
        # the same key again: Stripe replays the first refund
        assert [r["_idempotency_key"] for r in stripe_api.refund_requests] == [attempt.idempotency_key] * 2
    (attempt,) = ledger.all(RefundAttempt)
    assert attempt.status == "succeeded" and attempt.refund_id is not None
    (case,) = cases(ledger)
    assert case.status == "refunded"
    assert len(ledger.all(Refund)) == 1


def test_two_passes_at_once_only_one_runs(stripe_api, reconcile, session_factory) -> None:  # type: ignore[no-untyped-def]
    with exclusive_pass(session_factory):
        with pytest.raises(RunInProgress):
            reconcile()
    # released afterwards
    assert reconcile(mode="review").status == "succeeded"


@pytest.mark.postgres
def test_two_passes_started_together_on_postgres(stripe_api, session_factory, gateway, job_settings, ledger) -> None:  # type: ignore[no-untyped-def]
    _double_click(stripe_api, session_factory)
    barrier = threading.Barrier(2)
    results: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        try:
            run_reconciliation(session_factory, gateway, job_settings, sleep=lambda s: None)
            outcome = "ran"
        except RunInProgress:
            outcome = "refused"
        with lock:
            results.append(outcome)

    # responses patches requests globally, so threads share the double.
    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) in (["ran", "refused"], ["ran", "ran"])
    assert stripe_api.refund_creates == 1
    assert len(cases(ledger)) == 1


# -- AC4: Stripe's failures ------------------------------------------------------------------


def test_429_then_200_issues_the_refund_after_backing_off(stripe_api, reconcile, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    _double_click(stripe_api, session_factory)
    stripe_api.fail_refunds_with = [429]
    summary = reconcile()
    assert stripe_api.refund_creates == 1
    assert summary.refunds[0]["result"] == "refunded"
    assert reconcile.sleeps and reconcile.sleeps[0] >= 0.4  # our own backoff, not a hot loop
    assert cases(ledger)[0].status == "refunded"


def test_500_three_times_is_left_for_the_next_pass_which_issues_it(
    stripe_api, reconcile, session_factory, ledger
) -> None:  # type: ignore[no-untyped-def]
    _, duplicate = _double_click(stripe_api, session_factory)
    stripe_api.fail_refunds_with = [500, 500, 500]
    first = reconcile()
    assert stripe_api.refund_creates == 0
    assert first.status == "partial" and first.refunds[0]["result"] == "deferred"
    (case,) = cases(ledger)
    assert case.status == "refunding"
    assert ledger.get(AlertSent, f"run:{first.run_id}") is not None  # the failure was alerted

    second = reconcile()
    assert stripe_api.refund_creates == 1
    keys = {r["_idempotency_key"] for r in stripe_api.refund_requests}
    assert keys == {f"dup-refund-{duplicate['id']}-1"}  # the same key throughout
    assert cases(ledger)[0].status == "refunded"
    assert second.status == "succeeded"


def test_stripe_refusing_the_refund_fails_the_case_for_finance(
    stripe_api, reconcile, session_factory, ledger
) -> None:  # type: ignore[no-untyped-def]
    _double_click(stripe_api, session_factory)
    stripe_api.reject_next_refund = "charge_already_refunded"
    summary = reconcile()
    assert summary.refunds[0]["result"] == "failed"
    (case,) = cases(ledger)
    assert case.status == "failed" and "charge_already_refunded" in (case.failure or "") or "refused" in (case.failure or "")
    (attempt,) = ledger.all(RefundAttempt)
    assert ledger.get(AlertSent, f"refund-failed:{attempt.idempotency_key}") is not None
    # a rerun neither refunds nor alerts again
    reconcile()
    assert stripe_api.refund_creates == 0
    assert len([a for a in ledger.all(AlertSent) if a.key.startswith("refund-failed:")]) == 1


def test_refund_failed_days_later_fails_the_case_and_gives_the_money_back(
    stripe_api, reconcile, session_factory, deliver, ledger
) -> None:  # type: ignore[no-untyped-def]
    _, duplicate = _double_click(stripe_api, session_factory)
    reconcile()
    (refund_obj,) = stripe_api.refunds_of(duplicate["id"])
    assert ledger.order("ord_dc")["totals"]["usd"]["held"] == 4999

    failed = dict(refund_obj, status="failed", failure_reason="expired_or_canceled_card")
    stripe_api.refunds[failed["id"]] = failed
    response = deliver(p.event("refund.failed", failed, created=NOW + 86400 * 3))
    assert response.status_code == 200

    (case,) = cases(ledger)
    assert case.status == "failed" and "expired_or_canceled_card" in case.failure
    assert ledger.order("ord_dc")["totals"]["usd"]["held"] == 2 * 4999  # held again
    summary = reconcile()
    (attempt,) = ledger.all(RefundAttempt)
    assert attempt.status == "failed"
    assert ledger.get(AlertSent, f"refund-failed:{attempt.idempotency_key}") is not None
    assert summary.alerts_sent >= 1
    assert stripe_api.refund_creates == 1  # a failed case waits for finance: no automatic retry
    audit = [e.action for e in ledger.all(AuditEntry, AuditEntry.case_id == case.id)]
    assert "refund_failed" in audit


# -- AC5: modes --------------------------------------------------------------------------------


def _automatic_and_review(stripe_api, session_factory) -> None:  # type: ignore[no-untyped-def]
    _double_click(stripe_api, session_factory, "ord_auto")
    make_order(session_factory, "ord_review", 5000)
    stripe_api.add_charge(amount=5000, metadata={"order_id": "ord_review"}, created=NOW - 20)
    stripe_api.add_charge(amount=1500, metadata={"order_id": "ord_review"}, created=NOW - 10)


def test_review_mode_opens_cases_and_refunds_nothing(stripe_api, reconcile, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    _automatic_and_review(stripe_api, session_factory)
    summary = reconcile(mode="review")
    assert stripe_api.refund_requests == []
    assert {c.order_id: c.status for c in cases(ledger)} == {"ord_auto": "open", "ord_review": "open"}
    assert {c.order_id: c.automatic for c in cases(ledger)} == {"ord_auto": True, "ord_review": False}
    assert summary.counts()["cases_opened"] == 2


def test_dry_run_creates_no_case_calls_no_write_api_and_reports(stripe_api, reconcile, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    _automatic_and_review(stripe_api, session_factory)
    summary = reconcile(mode="dry-run")
    assert stripe_api.refund_requests == []
    assert cases(ledger) == []
    assert summary.detection["would_open"] == {"ord_auto": True, "ord_review": False}
    assert ledger.all(AlertSent) == []
    run = ledger.get(ReconciliationRun, summary.run_id)
    assert run.mode == "dry-run" and run.counts["would_refund_automatically"] == 1


def test_auto_mode_refunds_only_the_automatic_cases(stripe_api, reconcile, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    _automatic_and_review(stripe_api, session_factory)
    reconcile(mode="auto")
    assert stripe_api.refund_creates == 1
    assert {c.order_id: c.status for c in cases(ledger)} == {"ord_auto": "refunded", "ord_review": "open"}


def test_an_open_case_refunded_outside_is_closed_as_external(stripe_api, reconcile, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    _, duplicate = _double_click(stripe_api, session_factory)
    reconcile(mode="review")
    stripe_api.add_refund(duplicate["id"], 4999, created=NOW + 10)
    reconcile(mode="review")
    (case,) = cases(ledger)
    assert case.status == "refunded" and case.decision == "external"


def test_dismissed_case_stays_dismissed_until_a_new_duplicate(stripe_api, reconcile, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    _double_click(stripe_api, session_factory)
    reconcile(mode="review")
    (case,) = cases(ledger)

    def dismiss(session):  # type: ignore[no-untyped-def]
        session.get(DuplicateCase, case.id).status = "dismissed"

    run_in_transaction(session_factory, dismiss)
    reconcile(mode="review", full=True)
    assert [c.status for c in cases(ledger)] == ["dismissed"]

    stripe_api.add_charge(metadata={"order_id": "ord_dc"}, created=NOW + 20)
    reconcile(mode="review")
    assert [c.status for c in cases(ledger)] == ["dismissed", "open"]


def test_disputed_duplicate_is_never_refunded(stripe_api, reconcile, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    _, duplicate = _double_click(stripe_api, session_factory)
    stripe_api.add_dispute(duplicate["id"], status="needs_response", created=NOW - 5)
    reconcile(mode="auto")
    assert stripe_api.refund_requests == []
    (case,) = cases(ledger)
    assert case.status == "open" and not case.automatic


def test_no_api_key_skips_backfill_with_a_warning_and_still_detects(
    stripe_api, session_factory, job_settings, deliver, ledger
) -> None:  # type: ignore[no-untyped-def]
    make_order(session_factory, "ord_nokey", 4999)
    for _ in range(2):
        charge = p.charge(metadata={"order_id": "ord_nokey"}, created=NOW - 5)
        deliver(p.event("charge.succeeded", charge))
    settings = job_settings.with_overrides(stripe_api_key=None)
    summary = run_reconciliation(session_factory, StripeGateway.from_settings(settings), settings, mode="auto", sleep=lambda s: None)
    assert any("STRIPE_API_KEY" in w for w in summary.warnings)
    # auto mode could not refund the automatic case: that is an error, not a warning
    assert summary.status == "partial" and any("no refund was issued" in e for e in summary.errors)
    assert stripe_api.list_requests == [] and stripe_api.refund_requests == []
    (case,) = cases(ledger)
    assert case.status == "open"


def test_since_overrides_the_watermark(stripe_api, reconcile) -> None:  # type: ignore[no-untyped-def]
    since = datetime(2026, 11, 1, tzinfo=timezone.utc)
    summary = reconcile(mode="review", since=since)
    assert summary.backfill_from == int(since.timestamp())
    assert any(f"created%5Bgt%5D={int(since.timestamp()) - 1}" in u for u in stripe_api.list_requests)


def test_undelivered_events_are_replayed_once(stripe_api, reconcile, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    make_order(session_factory, "ord_evt", 4999)
    charge = p.charge(metadata={"order_id": "ord_evt"}, created=NOW - 100)
    stripe_api.undelivered_events.append(p.event("charge.succeeded", charge, created=NOW - 100))
    first = reconcile(mode="review")
    second = reconcile(mode="review")
    assert first.backfill["events_applied"] == 1 and second.backfill["events_applied"] == 0
    assert ledger.order("ord_evt")["status"] == "paid"


def test_incremental_pass_examines_only_what_changed(stripe_api, reconcile, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    for order_id, created in (("ord_old", NOW - 7200), ("ord_new", NOW - 30)):
        make_order(session_factory, order_id, 4999)
        for _ in range(2):
            stripe_api.add_charge(metadata={"order_id": order_id}, created=created)
    first = reconcile(mode="review")
    assert first.detection["orders_examined"] == 2 and len(cases(ledger)) == 2
    # Nothing new. The pass after the one that opened the cases looks at their orders once
    # more (a case changed since it started); after that, only what backfill's overlap (the
    # last hour before the watermark) re-reads: at most ord_new (only if the re-read changed
    # its row, i.e. the clock moved to another second), never the two-hour-old ord_old.
    reconcile(mode="review")
    quiet = reconcile(mode="review")
    assert quiet.detection["orders_examined"] <= 1
    assert reconcile(mode="review", full=True).detection["orders_examined"] == 2
    # a refund made elsewhere on ord_old touches it: it is examined (and its case closed)
    duplicate = max((c for c in stripe_api.charges.values() if c["metadata"]["order_id"] == "ord_old"), key=lambda c: c["id"])
    stripe_api.add_refund(duplicate["id"], 4999, created=NOW + 30)
    touched = reconcile(mode="review")
    assert touched.detection["orders_examined"] in (1, 2) and touched.detection["cases_resolved"] == 1
