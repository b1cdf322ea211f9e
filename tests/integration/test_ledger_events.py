"""The ledger under Stripe's real delivery patterns: out of order, late, in two API versions."""

from __future__ import annotations

import pytest

from models import Charge, Dispute, Order, PaymentIntent, Refund
from tests import stripe_payloads as p

VERSIONS = [p.LEGACY_API_VERSION, p.CURRENT_API_VERSION]
T0 = 1_763_700_000


def charge_event(type_: str, charge: dict, created: int, version: str = p.CURRENT_API_VERSION) -> dict:
    return p.event(type_, charge, created=created, api_version=version)


# -- out of order --------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_refunded_before_succeeded_ends_refunded(deliver, ledger, version) -> None:  # type: ignore[no-untyped-def]
    charge_id = p.new_id("ch")
    refund = p.refund(charge=charge_id, amount=4999, created=T0 + 60, api_version=version)
    succeeded = p.charge(id=charge_id, created=T0, metadata={"order_id": "ord_ooo"}, api_version=version)
    refunded = p.charge(
        id=charge_id, created=T0, amount_refunded=4999, refunds=[refund], metadata={"order_id": "ord_ooo"}, api_version=version
    )
    assert deliver(charge_event("charge.refunded", refunded, T0 + 60, version)).status_code == 200
    assert deliver(charge_event("charge.succeeded", succeeded, T0, version)).status_code == 200

    charge = ledger.get(Charge, charge_id)
    assert charge.status == "succeeded" and charge.reported_refunded == 4999
    view = ledger.order("ord_ooo")
    assert view["status"] == "refunded"
    assert view["charges"][0]["refunded_amount"] == 4999
    assert view["charges"][0]["held_amount"] == 0


def test_older_charge_updated_never_overwrites_newer_state(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    charge_id = p.new_id("ch")
    newer = p.charge(id=charge_id, created=T0, amount_refunded=1000, metadata={"order_id": "ord_upd"})
    older = p.charge(id=charge_id, created=T0, amount_refunded=0, metadata={"order_id": "ord_upd"})
    deliver(charge_event("charge.updated", newer, T0 + 100))
    deliver(charge_event("charge.updated", older, T0 + 50))
    assert ledger.get(Charge, charge_id).reported_refunded == 1000
    assert ledger.get(Charge, charge_id).last_event_created == T0 + 100


def test_succeeded_never_goes_back_to_pending_even_on_a_tie(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    charge_id = p.new_id("ch")
    deliver(charge_event("charge.succeeded", p.charge(id=charge_id, created=T0), T0 + 5))
    # Stripe timestamps have one-second resolution: the same second, an earlier state.
    deliver(charge_event("charge.updated", p.charge(id=charge_id, created=T0, status="pending", captured=False), T0 + 5))
    deliver(charge_event("charge.updated", p.charge(id=charge_id, created=T0, status="pending", captured=False), T0 + 9))
    charge = ledger.get(Charge, charge_id)
    assert charge.status == "succeeded" and charge.captured is True


@pytest.mark.parametrize("failure_event", ["refund.failed", "refund.updated", "charge.refund.updated"])
def test_refund_that_fails_later_gives_the_money_back(deliver, ledger, failure_event) -> None:  # type: ignore[no-untyped-def]
    charge_id = p.new_id("ch")
    refund_id = p.new_id("re")
    deliver(charge_event("charge.succeeded", p.charge(id=charge_id, amount=3000, created=T0, metadata={"order_id": "ord_rf"}), T0))
    refund = p.refund(id=refund_id, charge=charge_id, amount=3000, created=T0 + 10)
    deliver(p.event("refund.created", refund, created=T0 + 10))
    deliver(charge_event("charge.refunded", p.charge(id=charge_id, amount=3000, amount_refunded=3000, created=T0, metadata={"order_id": "ord_rf"}), T0 + 10))
    assert ledger.order("ord_rf")["charges"][0]["refunded_amount"] == 3000
    assert ledger.order("ord_rf")["status"] == "refunded"

    failed = p.refund(id=refund_id, charge=charge_id, amount=3000, created=T0 + 10, status="failed", failure_reason="expired_or_canceled_card")
    deliver(p.event(failure_event, failed, created=T0 + 3 * 86400))
    assert ledger.get(Refund, refund_id).status == "failed"
    view = ledger.order("ord_rf")
    assert view["charges"][0]["refunded_amount"] == 0
    assert view["charges"][0]["held_amount"] == 3000
    assert view["status"] == "paid"

    # A late, older "succeeded" copy of the refund does not resurrect it.
    deliver(p.event("refund.updated", refund, created=T0 + 11))
    assert ledger.get(Refund, refund_id).status == "failed"


def test_failed_refund_never_comes_back_on_a_tie(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    charge_id = p.new_id("ch")
    refund_id = p.new_id("re")
    failed = p.refund(id=refund_id, charge=charge_id, amount=100, status="failed", created=T0)
    pending = p.refund(id=refund_id, charge=charge_id, amount=100, status="pending", created=T0)
    deliver(p.event("refund.failed", failed, created=T0 + 1))
    deliver(p.event("refund.created", pending, created=T0 + 1))
    assert ledger.get(Refund, refund_id).status == "failed"


def test_partial_refunds_sum_and_only_active_ones_count(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    charge_id = p.new_id("ch")
    deliver(charge_event("charge.succeeded", p.charge(id=charge_id, amount=10000, created=T0, metadata={"order_id": "ord_pr"}), T0))
    deliver(p.event("refund.created", p.refund(charge=charge_id, amount=1500, created=T0 + 1), created=T0 + 1))
    deliver(p.event("refund.created", p.refund(charge=charge_id, amount=2500, created=T0 + 2), created=T0 + 2))
    deliver(p.event("refund.created", p.refund(charge=charge_id, amount=500, status="canceled", created=T0 + 3), created=T0 + 3))
    view = ledger.order("ord_pr")
    assert view["charges"][0]["refunded_amount"] == 4000
    assert view["charges"][0]["held_amount"] == 6000
    assert view["status"] == "partially_refunded"
    assert view["totals"] == {"usd": {"charged": 10000, "refunded": 4000, "held": 6000}}


def test_refund_before_its_charge_is_kept_and_counted(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    charge_id = p.new_id("ch")
    deliver(p.event("refund.created", p.refund(charge=charge_id, amount=700, created=T0 + 5), created=T0 + 5))
    assert ledger.get(Charge, charge_id) is None
    deliver(charge_event("charge.succeeded", p.charge(id=charge_id, amount=700, created=T0, metadata={"order_id": "ord_rb"}), T0))
    view = ledger.order("ord_rb")
    assert view["charges"][0]["refunded_amount"] == 700
    assert view["status"] == "refunded"


# -- disputes ------------------------------------------------------------------------------


def test_dispute_lifecycle_and_lost_dispute_holds_nothing(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    charge_id = p.new_id("ch")
    dispute_id = p.new_id("dp")
    deliver(charge_event("charge.succeeded", p.charge(id=charge_id, amount=5000, created=T0, metadata={"order_id": "ord_dp"}), T0))
    deliver(p.event("charge.dispute.created", p.dispute(id=dispute_id, charge=charge_id, amount=5000, created=T0 + 10), created=T0 + 10))
    assert ledger.order("ord_dp")["status"] == "disputed"
    assert ledger.order("ord_dp")["charges"][0]["dispute"]["status"] == "needs_response"
    deliver(p.event("charge.dispute.closed", p.dispute(id=dispute_id, charge=charge_id, amount=5000, status="lost", created=T0 + 10), created=T0 + 99))
    # An older update arriving late does not reopen it.
    deliver(p.event("charge.dispute.updated", p.dispute(id=dispute_id, charge=charge_id, amount=5000, status="under_review", created=T0 + 10), created=T0 + 50))
    assert ledger.get(Dispute, dispute_id).status == "lost"
    assert ledger.order("ord_dp")["charges"][0]["held_amount"] == 0


# -- linking -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_linked_through_charge_metadata(deliver, ledger, version) -> None:  # type: ignore[no-untyped-def]
    charge = p.charge(metadata={"order_id": "ord_meta"}, payment_intent=p.new_id("pi"), api_version=version)
    deliver(charge_event("charge.succeeded", charge, T0, version))
    assert ledger.get(Charge, charge["id"]).order_id == "ord_meta"
    order = ledger.get(Order, "ord_meta")
    assert order is not None and order.amount is None  # total unknown until told


@pytest.mark.parametrize("version", VERSIONS)
def test_linked_through_payment_intent_metadata(deliver, ledger, version) -> None:  # type: ignore[no-untyped-def]
    pi_id = p.new_id("pi")
    charge = p.charge(payment_intent=pi_id, created=T0, api_version=version)  # no metadata
    intent = p.payment_intent(
        id=pi_id, latest_charge=charge, metadata={"order_id": "ord_pimeta", "order_total": "4999"}, created=T0, api_version=version
    )
    response = deliver(p.event("payment_intent.succeeded", intent, created=T0 + 1, api_version=version))
    assert response.status_code == 200, response.get_json()
    # Current versions carry only the charge's id; the legacy list embeds the charge itself.
    deliver(charge_event("charge.succeeded", charge, T0 + 1, version))
    assert ledger.get(Charge, charge["id"]).order_id == "ord_pimeta"
    assert ledger.get(PaymentIntent, pi_id).order_id == "ord_pimeta"
    order = ledger.get(Order, "ord_pimeta")
    assert (order.amount, order.currency, order.amount_source) == (4999, "usd", "metadata")
    assert order.payment_intent_id == pi_id


@pytest.mark.parametrize("version", VERSIONS)
def test_charge_seen_before_its_payment_intent_is_linked_later(deliver, ledger, version) -> None:  # type: ignore[no-untyped-def]
    pi_id = p.new_id("pi")
    charge = p.charge(payment_intent=pi_id, created=T0, api_version=version)
    deliver(charge_event("charge.succeeded", charge, T0, version))
    assert ledger.get(Charge, charge["id"]).order_id is None  # unlinked, but kept

    intent = p.payment_intent(id=pi_id, latest_charge=charge["id"], metadata={"order_id": "ord_late"}, created=T0, api_version=version)
    if version == p.LEGACY_API_VERSION:
        intent["charges"]["data"] = []  # the legacy list need not carry it: late link by id
    deliver(p.event("payment_intent.succeeded", intent, created=T0 + 2, api_version=version))
    assert ledger.get(Charge, charge["id"]).order_id == "ord_late"
    assert ledger.order("ord_late")["status"] == "paid"


def test_charge_after_known_payment_intent_is_linked_through_it(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    pi_id = p.new_id("pi")
    intent = p.payment_intent(id=pi_id, status="requires_payment_method", metadata={"order_id": "ord_pi_first"}, created=T0)
    deliver(p.event("payment_intent.payment_failed", intent, created=T0 + 1))
    charge = p.charge(payment_intent=pi_id, created=T0 + 5)
    deliver(charge_event("charge.succeeded", charge, T0 + 5))
    assert ledger.get(Charge, charge["id"]).order_id == "ord_pi_first"


def test_a_conflicting_link_never_moves_a_charge(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    charge = p.charge(metadata={"order_id": "ord_a"}, created=T0)
    deliver(charge_event("charge.succeeded", charge, T0))
    moved = dict(charge, metadata={"order_id": "ord_b"})
    deliver(charge_event("charge.updated", moved, T0 + 10))
    assert ledger.get(Charge, charge["id"]).order_id == "ord_a"


def test_connect_account_is_kept(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    charge = p.charge(metadata={"order_id": "ord_connect"})
    deliver(p.event("charge.succeeded", charge, account="acct_1Connected000001"))
    assert ledger.get(Charge, charge["id"]).account == "acct_1Connected000001"


# -- money ---------------------------------------------------------------------------------


def test_zero_decimal_currency_is_stored_exactly(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    charge = p.charge(amount=5000, currency="jpy", metadata={"order_id": "ord_jpy"})
    deliver(p.event("charge.succeeded", charge))
    stored = ledger.get(Charge, charge["id"])
    assert stored.amount == 5000 and isinstance(stored.amount, int) and stored.currency == "jpy"
    view = ledger.order("ord_jpy")
    assert view["charges"][0]["amount_display"] == "5,000 JPY"
    assert view["totals"]["jpy"]["held"] == 5000


def test_uncaptured_authorisation_holds_nothing_until_captured(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    charge_id = p.new_id("ch")
    auth = p.charge(id=charge_id, amount=8000, captured=False, created=T0, metadata={"order_id": "ord_auth"})
    deliver(charge_event("charge.succeeded", auth, T0))
    assert ledger.order("ord_auth")["charges"][0]["held_amount"] == 0
    assert ledger.order("ord_auth")["status"] == "pending"
    captured = p.charge(id=charge_id, amount=8000, captured=True, created=T0, metadata={"order_id": "ord_auth"})
    deliver(charge_event("charge.captured", captured, T0 + 30))
    assert ledger.order("ord_auth")["charges"][0]["held_amount"] == 8000
    assert ledger.order("ord_auth")["status"] == "paid"


@pytest.mark.parametrize("release_reported", [True, False])
def test_partial_capture_holds_what_was_captured(deliver, ledger, release_reported) -> None:  # type: ignore[no-untyped-def]
    """Capturing 6000 of a 10000 authorisation: Stripe refunds the other 4000 and counts it
    in amount_refunded. Held is 6000 either way; a later 1000 refund leaves 5000."""
    charge_id = p.new_id("ch")
    auth = p.charge(id=charge_id, amount=10000, captured=False, created=T0, metadata={"order_id": "ord_pc"})
    deliver(charge_event("charge.succeeded", auth, T0))
    captured = p.charge(id=charge_id, amount=10000, captured=True, created=T0, amount_refunded=4000 if release_reported else 0, metadata={"order_id": "ord_pc"})
    captured["amount_captured"] = 6000
    deliver(charge_event("charge.captured", captured, T0 + 60))
    assert ledger.order("ord_pc")["totals"]["usd"] == {"charged": 6000, "refunded": 0, "held": 6000}
    assert ledger.order("ord_pc")["status"] == "paid"
    if release_reported:
        later = dict(captured, amount_refunded=5000)
        deliver(charge_event("charge.refunded", later, T0 + 120))
        assert ledger.order("ord_pc")["totals"]["usd"] == {"charged": 6000, "refunded": 1000, "held": 5000}


# -- PaymentIntents of API versions before 2019-02-11 -------------------------------------------


@pytest.mark.parametrize("version", [p.PRE_2019_API_VERSION, "2018-09-24"])
def test_pre_2019_payment_intent_statuses_are_applied_in_current_names(deliver, ledger, version) -> None:  # type: ignore[no-untyped-def]
    # A declined payment sends an old PaymentIntent back to requires_source.
    intent = p.payment_intent(id="pi_pre_2019", amount=2500, status="requires_source",
                              metadata={"order_id": "ord_pre_2019"}, api_version=version)
    assert intent["status"] == "requires_source"
    response = deliver(p.event("payment_intent.payment_failed", intent, api_version=version))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "received"
    stored = ledger.get(PaymentIntent, "pi_pre_2019")
    assert (stored.status, stored.order_id, stored.amount) == ("requires_payment_method", "ord_pre_2019", 2500)
    assert ledger.get(Order, "ord_pre_2019").payment_intent_id == "pi_pre_2019"

    # Later the same PaymentIntent succeeds: the old name never blocked its progress.
    succeeded = dict(intent, status="succeeded", amount_received=2500)
    assert deliver(p.event("payment_intent.succeeded", succeeded, created=intent["created"] + 1, api_version=version)).status_code == 200
    assert ledger.get(PaymentIntent, "pi_pre_2019").status == "succeeded"
    assert ledger.get(Order, "ord_pre_2019").status == "paid"


def test_pre_2019_requires_source_action_is_applied_as_requires_action(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    # Whichever handled event carries the old name, it is read, never refused with a 422
    # (Stripe would redeliver it for days).
    intent = p.payment_intent(id="pi_pre_2019_action", status="requires_source_action",
                              metadata={"order_id": "ord_pre_2019_action"}, api_version=p.PRE_2019_API_VERSION)
    assert intent["status"] == "requires_source_action" and intent["next_source_action"]["type"] == "authorize_with_url"
    response = deliver(p.event("payment_intent.payment_failed", intent, api_version=p.PRE_2019_API_VERSION))
    assert response.status_code == 200, response.get_json()
    stored = ledger.get(PaymentIntent, "pi_pre_2019_action")
    assert (stored.status, stored.order_id) == ("requires_action", "ord_pre_2019_action")


def test_from_2019_02_11_the_current_names_arrive_unchanged(deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    intent = p.payment_intent(id="pi_2019_02_11", status="requires_payment_method",
                              metadata={"order_id": "ord_2019_02_11"}, api_version="2019-02-11")
    assert intent["status"] == "requires_payment_method" and "payment_method_types" in intent
    assert deliver(p.event("payment_intent.payment_failed", intent, api_version="2019-02-11")).status_code == 200
    assert ledger.get(PaymentIntent, "pi_2019_02_11").status == "requires_payment_method"
