"""One module turns Stripe's shapes, in any API version, into our snapshots."""

from __future__ import annotations

import pytest

from domain.stripe.shapes import (
    ShapeError,
    charge_snapshot,
    dispute_snapshot,
    payment_intent_snapshot,
    refund_snapshot,
)
from tests import stripe_payloads as p


def test_current_charge_has_no_embedded_refunds() -> None:
    raw = p.charge(amount=4999, amount_refunded=1000, metadata={"order_id": " ord_1 "}, payment_intent="pi_1", customer="cus_1")
    snap = charge_snapshot(raw)
    assert "refunds" not in raw
    assert snap.refunds is None  # unknown, not "none"
    assert (snap.amount, snap.amount_refunded, snap.currency) == (4999, 1000, "usd")
    assert (snap.order_id, snap.payment_intent_id, snap.customer_id) == ("ord_1", "pi_1", "cus_1")
    assert (snap.card_brand, snap.card_last4) == ("visa", "4242")


def test_legacy_charge_embeds_its_refunds() -> None:
    refund = p.refund(charge="ch_x", amount=700, api_version=p.LEGACY_API_VERSION)
    raw = p.charge(id="ch_x", amount=2000, refunds=[refund], api_version=p.LEGACY_API_VERSION)
    snap = charge_snapshot(raw)
    assert snap.refunds is not None and [r.id for r in snap.refunds] == [refund["id"]]
    assert snap.refunds[0].charge_id == "ch_x" and snap.refunds[0].amount == 700


def test_very_old_shapes_bare_refund_list_paid_status_and_card_source() -> None:
    raw = p.charge(id="ch_old", amount=1500, api_version=p.LEGACY_API_VERSION)
    raw["status"] = "paid"
    raw["refunds"] = [p.refund(charge="ch_old", amount=500)]
    raw["payment_method_details"] = None
    raw["source"] = {"id": "card_1", "object": "card", "brand": "MasterCard", "last4": "4444"}
    del raw["amount_captured"]
    snap = charge_snapshot(raw)
    assert snap.status == "succeeded" and snap.amount_captured == 1500
    assert snap.refunds is not None and snap.refunds[0].amount == 500
    assert (snap.card_brand, snap.card_last4) == ("mastercard", "4444")


def test_expanded_fields_are_reduced_to_ids() -> None:
    raw = p.charge()
    raw["payment_intent"] = {"id": "pi_expanded", "object": "payment_intent"}
    raw["customer"] = {"id": "cus_expanded", "object": "customer"}
    snap = charge_snapshot(raw)
    assert (snap.payment_intent_id, snap.customer_id) == ("pi_expanded", "cus_expanded")


def test_payment_intent_in_both_versions() -> None:
    charge = p.charge(payment_intent="pi_v")
    current = payment_intent_snapshot(p.payment_intent(id="pi_v", latest_charge=charge["id"], metadata={"order_id": "o", "order_total": "9998"}))
    assert current.latest_charge_id == charge["id"] and current.charges == ()
    assert (current.order_id, current.order_total) == ("o", 9998)
    legacy = payment_intent_snapshot(p.payment_intent(id="pi_v", latest_charge=charge, api_version=p.LEGACY_API_VERSION))
    assert [c.id for c in legacy.charges] == [charge["id"]] and legacy.latest_charge_id == charge["id"]


@pytest.mark.parametrize("total", ["49.99", "1e3", "-5", "", "abc", "0"])
def test_order_total_metadata_that_is_not_minor_units_is_ignored(total: str) -> None:
    snap = payment_intent_snapshot(p.payment_intent(metadata={"order_id": "o", "order_total": total}))
    assert snap.order_total is None


def test_refund_and_dispute() -> None:
    refund = refund_snapshot(p.refund(charge="ch_1", amount=100, status="failed", failure_reason="lost_or_stolen_card"))
    assert (refund.status, refund.failure_reason, refund.charge_id) == ("failed", "lost_or_stolen_card", "ch_1")
    dispute = dispute_snapshot(p.dispute(charge="ch_1", amount=100, status="lost"))
    assert (dispute.status, dispute.charge_id, dispute.amount) == ("lost", "ch_1", 100)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount", 49.99),
        ("amount", "4999"),
        ("amount", None),
        ("amount", True),
        ("currency", "dollars"),
        ("status", "exploded"),
        ("id", ""),
        ("object", "refund"),
        ("created", "yesterday"),
        ("metadata", "order_1"),
        ("captured", "yes"),
        ("payment_intent", 12),
    ],
)
def test_malformed_charges_raise_shape_error(field: str, value: object) -> None:
    raw = p.charge()
    raw[field] = value
    with pytest.raises(ShapeError):
        charge_snapshot(raw)


@pytest.mark.parametrize(
    "status, current",
    [("requires_payment_method", "requires_payment_method"), ("requires_action", "requires_action"),
     ("requires_source", "requires_payment_method"), ("requires_source_action", "requires_action")],
)
def test_pre_2019_payment_intent_statuses_are_read_in_current_names(status: str, current: str) -> None:
    raw = p.payment_intent(id="pi_old", status=status, metadata={"order_id": "ord_old"}, api_version=p.PRE_2019_API_VERSION)
    assert raw["status"] == {"requires_payment_method": "requires_source", "requires_action": "requires_source_action"}.get(status, status)
    assert "next_source_action" in raw and "allowed_source_types" in raw
    snap = payment_intent_snapshot(raw)
    assert (snap.status, snap.order_id) == (current, "ord_old")


def test_unknown_payment_intent_status_is_still_a_shape_error() -> None:
    raw = p.payment_intent(api_version=p.PRE_2019_API_VERSION)
    raw["status"] = "requires_sauce"
    with pytest.raises(ShapeError, match="requires_sauce"):
        payment_intent_snapshot(raw)
