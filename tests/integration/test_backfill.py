"""Backfill's watermarks (one per listing), the second a read object counts as of, and
the connected account of a charge's PaymentIntent: the reconciliation pass against the
real stripe-python SDK, with Stripe played by tests/stripe_fake/."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from sqlalchemy import select

from domain.stripe.gateway import StripeGateway
from config import Settings
from jobs.reconcile import OVERLAP_SECONDS, run_reconciliation
from models import Charge, PaymentIntent, ReconciliationRun, Refund, make_session_factory, run_in_transaction
from tests import stripe_payloads as p
from tests.stripe_fake import API

NOW = int(time.time())
LISTING_PATHS = {"charges": "/v1/charges", "refunds": "/v1/refunds", "disputes": "/v1/disputes", "checkout_sessions": "/v1/checkout/sessions", "events": "/v1/events"}


@pytest.fixture
def job_settings(settings: Settings) -> Settings:
    return settings.with_overrides(stripe_api_base=API, stripe_max_network_retries=0, refund_mode="review")


@pytest.fixture
def reconcile(session_factory, job_settings):  # type: ignore[no-untyped-def]
    def _run(**options: Any):  # type: ignore[no-untyped-def]
        options.setdefault("sleep", lambda seconds: None)
        options.setdefault("mode", "review")
        return run_reconciliation(session_factory, StripeGateway.from_settings(job_settings), job_settings, **options)

    return _run


class Clock:
    """A host clock the test moves (the fake moves it while Stripe 'answers')."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def list_starts(stripe_api, listing: str) -> list[int]:  # type: ignore[no-untyped-def]
    """The ``created[gt]`` of each first page of ``listing`` requested so far."""
    starts = []
    for url in stripe_api.list_requests:
        parsed = urlparse(url)
        query = parse_qs(parsed.query)
        if parsed.path == LISTING_PATHS[listing] and "starting_after" not in query and "charge" not in query:
            starts.append(int(query["created[gt]"][0]))
    return starts


# -- per-listing watermarks ------------------------------------------------------------------


def test_a_charge_created_while_a_slow_pass_lists_refunds_is_read_by_the_next_pass(
    stripe_api, reconcile, ledger
) -> None:  # type: ignore[no-untyped-def]
    # The charge listing ends with a charge created at NOW - 10000. While the pass is busy
    # elsewhere, a charge is created (NOW - 9000); then the refund listing sees a refund
    # from NOW - 100. One watermark over both listings would jump to NOW - 100, and the
    # next pass (from NOW - 100 - 1 h) would never list the charge in between.
    old = stripe_api.add_charge(metadata={"order_id": "ord_old"}, created=NOW - 10000)
    stripe_api.add_refund(old["id"], 1000, created=NOW - 100)
    late: dict[str, Any] = {}

    def charge_created_meanwhile(listing: str, page: int) -> None:
        if listing == "refunds" and not late:
            late.update(stripe_api.add_charge(metadata={"order_id": "ord_late"}, created=NOW - 9000))

    stripe_api.on_list = charge_created_meanwhile
    first = reconcile()
    assert first.status == "succeeded", first.errors
    assert ledger.get(Charge, late["id"]) is None  # listed by neither listing of this pass

    stripe_api.on_list = None
    stripe_api.list_requests.clear()
    second = reconcile()
    assert second.status == "succeeded", second.errors
    charge = ledger.get(Charge, late["id"])
    assert charge is not None and charge.order_id == "ord_late"
    # every listing started from the oldest watermark minus the overlap
    start = NOW - 10000 - OVERLAP_SECONDS
    assert second.backfill_from == start
    assert {listing: list_starts(stripe_api, listing) for listing in LISTING_PATHS} == {
        listing: [start - 1] for listing in LISTING_PATHS
    }
    run = ledger.get(ReconciliationRun, first.run_id)
    assert run.watermarks == {"charges": NOW - 10000, "refunds": NOW - 100, "disputes": NOW - 100, "checkout_sessions": NOW - 100, "events": NOW - 100}
    assert run.watermark == NOW - 10000  # the oldest, for display and older readers
    assert ledger.get(ReconciliationRun, second.run_id).watermarks["charges"] == NOW - 100


def test_a_refund_listing_failing_on_its_second_page_keeps_the_refunds_watermark(
    stripe_api, reconcile, ledger
) -> None:  # type: ignore[no-untyped-def]
    first_charge = stripe_api.add_charge(metadata={"order_id": "ord_first"}, created=NOW - 20000)
    stripe_api.add_refund(first_charge["id"], 100, created=NOW - 19990)
    first = reconcile()
    assert ledger.get(ReconciliationRun, first.run_id).watermarks == dict.fromkeys(LISTING_PATHS, NOW - 19990) | {
        "charges": NOW - 20000
    }

    # 150 refunds: two pages; the second one fails (a Stripe 500)
    big = stripe_api.add_charge(amount=100_000, metadata={"order_id": "ord_big"}, created=NOW - 6000)
    for i in range(150):
        stripe_api.add_refund(big["id"], 1, created=NOW - 5000 + i)
    stripe_api.fail_list_pages[("refunds", 2)] = 500
    failed = reconcile()

    assert failed.status == "partial" and any("backfill stopped" in e for e in failed.errors)
    assert failed.backfill["charges"] == 2 and failed.backfill["refunds"] == 100  # page 1 was applied
    run = ledger.get(ReconciliationRun, failed.run_id)
    # charges completed and advance; refunds raised and keep theirs; disputes and events
    # were never listed and keep theirs too
    assert run.watermarks == {"charges": NOW - 6000, "refunds": NOW - 19990, "disputes": NOW - 19990, "checkout_sessions": NOW - 19990, "events": NOW - 19990}
    assert run.watermark == NOW - 19990
    assert ledger.count(Refund) == 1 + 100

    stripe_api.list_requests.clear()
    again = reconcile()
    assert again.status == "succeeded", again.errors
    assert list_starts(stripe_api, "refunds") == [NOW - 19990 - OVERLAP_SECONDS - 1]  # re-read from there
    assert ledger.count(Refund) == 1 + 150
    marks = ledger.get(ReconciliationRun, again.run_id).watermarks
    assert marks == {"charges": NOW - 6000, "refunds": NOW - 5000 + 149, "disputes": NOW - 5000 + 149, "checkout_sessions": NOW - 5000 + 149, "events": NOW - 5000 + 149}


def test_a_quiet_listing_does_not_hold_the_start_back(stripe_api, reconcile, ledger) -> None:  # type: ignore[no-untyped-def]
    # Charges are quiet (the last one is old); refunds keep coming. A completed listing
    # covered its kind up to anything known to exist before it started, so the charges
    # watermark follows the refunds of the previous pass instead of pinning every start.
    old = stripe_api.add_charge(amount=10_000, metadata={"order_id": "ord_quiet"}, created=NOW - 50000)
    stripe_api.add_refund(old["id"], 100, created=NOW - 200)
    first = reconcile()
    assert ledger.get(ReconciliationRun, first.run_id).watermarks["charges"] == NOW - 50000

    reconcile()  # no new charge: its charge listing completes having seen only the old one
    stripe_api.add_refund(old["id"], 100, created=NOW - 100)
    stripe_api.list_requests.clear()
    third = reconcile()
    assert third.backfill_from == NOW - 200 - OVERLAP_SECONDS
    assert list_starts(stripe_api, "charges") == [NOW - 200 - OVERLAP_SECONDS - 1]
    assert ledger.get(ReconciliationRun, third.run_id).watermarks == {
        "charges": NOW - 200,
        "refunds": NOW - 100,
        "disputes": NOW - 100,
        "checkout_sessions": NOW - 100,
        "events": NOW - 100,
    }


def test_a_listing_that_never_completed_is_read_from_where_the_previous_pass_started(
    stripe_api, reconcile, job_settings, ledger
) -> None:  # type: ignore[no-untyped-def]
    charge = stripe_api.add_charge(metadata={"order_id": "ord_never"}, created=NOW - 100)
    stripe_api.add_refund(charge["id"], 100, created=NOW - 90)
    stripe_api.fail_list_pages[("refunds", 1)] = 500
    clock = Clock(NOW)
    first = reconcile(clock=clock)
    assert first.status == "partial"
    assert first.backfill_from == NOW - job_settings.backfill_days * 86400
    assert ledger.get(ReconciliationRun, first.run_id).watermarks == {"charges": NOW - 100}

    clock.now += 86400  # the next night: refunds were never listed from the first start
    stripe_api.list_requests.clear()
    second = reconcile(clock=clock)
    assert second.status == "succeeded", second.errors
    assert second.backfill_from == first.backfill_from
    assert list_starts(stripe_api, "refunds") == [first.backfill_from - 1]
    assert ledger.get(ReconciliationRun, second.run_id).watermarks == {
        "charges": NOW - 100,
        "refunds": NOW - 90,
        "disputes": NOW - 90,
        "checkout_sessions": NOW - 90,
        "events": NOW - 90,
    }


def test_a_run_recorded_before_per_listing_watermarks_still_sets_the_start(
    stripe_api, reconcile, session_factory, ledger
) -> None:  # type: ignore[no-untyped-def]
    def older_run(session) -> None:  # type: ignore[no-untyped-def]
        session.add(ReconciliationRun(mode="review", status="succeeded", watermark=NOW - 7200, counts={}, errors=[]))

    run_in_transaction(session_factory, older_run)
    summary = reconcile()
    assert summary.backfill_from == NOW - 7200 - OVERLAP_SECONDS
    assert list_starts(stripe_api, "charges") == [NOW - 7200 - OVERLAP_SECONDS - 1]
    # nothing listed: every listing completed and keeps the old watermark
    assert ledger.get(ReconciliationRun, summary.run_id).watermarks == dict.fromkeys(LISTING_PATHS, NOW - 7200)


def test_an_events_api_that_is_not_there_does_not_hold_the_start_back(stripe_api, reconcile, ledger) -> None:  # type: ignore[no-untyped-def]
    stripe_api.events_api = False
    stripe_api.add_charge(metadata={"order_id": "ord_noevents"}, created=NOW - 100)
    first = reconcile()
    assert any("Events API is not available" in n for n in first.backfill["notes"])
    assert ledger.get(ReconciliationRun, first.run_id).watermarks == dict.fromkeys(LISTING_PATHS, NOW - 100)
    stripe_api.list_requests.clear()
    reconcile()
    assert list_starts(stripe_api, "charges") == [NOW - 100 - OVERLAP_SECONDS - 1]


def test_migration_0005_keeps_older_runs_and_their_watermark(is_postgres) -> None:  # type: ignore[no-untyped-def]
    # Down to 0004, a run as older code recorded it, then up again: the run keeps its
    # watermark, has no per-listing ones, and stands for every listing.
    from alembic import command
    from sqlalchemy import create_engine, text

    from jobs.reconcile import _previous_watermarks
    from models.migrate import alembic_config, upgrade
    from tests.databases import throwaway_database

    with throwaway_database(os.environ.get("TEST_DATABASE_URL") if is_postgres else None, prefix="reconciler_migration") as url:
        command.downgrade(alembic_config(url), "0004")
        engine = create_engine(url)
        try:
            with engine.begin() as connection:
                connection.execute(
                    text(
                        "INSERT INTO reconciliation_runs (mode, \"full\", \"trigger\", status, started_at, backfill_from, watermark, counts, errors)"
                        " VALUES ('review', false, 'manual', 'succeeded', CURRENT_TIMESTAMP, :start, :mark, '{}', '[]')"
                    ),
                    {"start": NOW - 9000, "mark": NOW - 5000},
                )
            upgrade(url)
            with make_session_factory(engine)() as session:
                (run,) = session.scalars(select(ReconciliationRun)).all()
                assert run.watermark == NOW - 5000 and run.watermarks is None
                assert _previous_watermarks(run) == dict.fromkeys(LISTING_PATHS, NOW - 5000)
                run.watermarks = {"charges": NOW - 10}
                session.commit()
                assert session.scalars(select(ReconciliationRun)).one().watermarks == {"charges": NOW - 10}
        finally:
            engine.dispose()


def test_since_still_overrides_the_watermarks(stripe_api, reconcile) -> None:  # type: ignore[no-untyped-def]
    stripe_api.add_charge(metadata={"order_id": "ord_since"}, created=NOW - 100)
    reconcile()
    stripe_api.list_requests.clear()
    since = datetime.fromtimestamp(NOW - 86400 * 3, tz=timezone.utc)
    summary = reconcile(since=since)
    assert summary.backfill_from == NOW - 86400 * 3
    assert {listing: list_starts(stripe_api, listing) for listing in LISTING_PATHS} == {
        listing: [NOW - 86400 * 3 - 1] for listing in LISTING_PATHS
    }


# -- the second a read object counts as of ---------------------------------------------------


def test_a_refund_failing_in_the_second_it_was_read_still_fails_it(
    stripe_api, reconcile, deliver, ledger
) -> None:  # type: ignore[no-untyped-def]
    charge = stripe_api.add_charge(metadata={"order_id": "ord_read"}, created=NOW - 60)
    refund = stripe_api.add_refund(charge["id"], 1000, status="pending", created=NOW - 50)
    clock = Clock(NOW + 0.6)

    def slow_answer(listing: str, page: int) -> None:
        if listing == "refunds":
            clock.now += 0.7  # Stripe reads the refund in second NOW and answers in NOW + 1

    stripe_api.on_list = slow_answer
    assert reconcile(clock=clock).status == "succeeded"
    assert ledger.get(Refund, refund["id"]).status == "pending"

    # The refund failed later in that same second; its event arrives after the backfill.
    failed = dict(refund, status="failed", failure_reason="expired_or_canceled_card")
    assert deliver(p.event("refund.failed", failed, created=NOW)).status_code == 200
    row = ledger.get(Refund, refund["id"])
    assert row.status == "failed" and row.failure_reason == "expired_or_canceled_card"


def test_a_charge_captured_in_the_second_it_was_read_is_captured(
    stripe_api, reconcile, deliver, ledger
) -> None:  # type: ignore[no-untyped-def]
    charge = stripe_api.add_charge(captured=False, metadata={"order_id": "ord_capture"}, created=NOW - 60)
    clock = Clock(NOW + 0.6)

    def slow_answer(listing: str, page: int) -> None:
        if listing == "charges":
            clock.now += 0.7

    stripe_api.on_list = slow_answer
    assert reconcile(clock=clock).status == "succeeded"
    assert ledger.get(Charge, charge["id"]).captured is False

    captured = dict(charge, captured=True, amount_captured=charge["amount"])
    assert deliver(p.event("charge.captured", captured, created=NOW)).status_code == 200
    assert ledger.get(Charge, charge["id"]).captured is True


# -- Connect: the PaymentIntent of a connected account's charge --------------------------------


def test_payment_intent_of_a_connected_charge_is_read_on_its_account(
    stripe_api, mock, reconcile, deliver, ledger
) -> None:  # type: ignore[no-untyped-def]
    account = "acct_1ConnectedAccount00"
    intent = p.payment_intent(metadata={"order_id": "ord_connect"}, created=NOW - 40)
    stripe_api.payment_intents[intent["id"]] = intent
    charge = p.charge(payment_intent=intent["id"], created=NOW - 40)  # names no order
    assert deliver(p.event("charge.succeeded", charge, account=account)).status_code == 200
    assert ledger.get(Charge, charge["id"]).order_id is None

    assert reconcile().status == "succeeded"

    (call,) = [c for c in mock.calls if urlparse(c.request.url).path == f"/v1/payment_intents/{intent['id']}"]
    assert call.request.headers.get("Stripe-Account") == account
    row = ledger.get(PaymentIntent, intent["id"])
    assert row is not None and row.account == account
    assert ledger.get(Charge, charge["id"]).order_id == "ord_connect"  # linked through it
