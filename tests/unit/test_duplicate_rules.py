"""The duplicate rule as a table: each row an order and its charges, and what must happen
(refund which charges automatically, send to review, or nothing)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from domain.cases.rules import ChargeFacts, OrderFacts, assess, keeper_order

T0 = 1_760_000_000
HOUR = 3600
WINDOW = 24 * HOUR


def paid(charge_id: str, amount: int, created: int = T0, currency: str = "usd", **extra: Any) -> ChargeFacts:
    facts = ChargeFacts(
        id=charge_id, amount=amount, currency=currency, created=created,
        held=amount, amount_captured=amount,
    )
    return replace(facts, **extra)


def refunded(charge: ChargeFacts, amount: int) -> ChargeFacts:
    return replace(charge, refunded=amount, held=charge.amount_captured - amount)


def order(amount: int | None, currency: str | None = "usd", pi: str | None = None) -> OrderFacts:
    return OrderFacts(id="ord_1", amount=amount, currency=currency, payment_intent_id=pi)


REFUND = "refund"
RELEASE = "release"  # an authorisation case released automatically
REVIEW = "review"
NOTHING = "nothing"

# (name, order, charges, expected, charges refunded automatically, review reason code, settings)
ROWS: list[tuple[str, OrderFacts, list[ChargeFacts], str, set[str], str | None, dict]] = [
    ("double click, same second", order(4999),
     [paid("ch_a", 4999), paid("ch_b", 4999)], REFUND, {"ch_b"}, None, {}),
    ("triple click", order(4999),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1), paid("ch_c", 4999, T0 + 2)],
     REFUND, {"ch_b", "ch_c"}, None, {}),
    ("declined then paid", order(4999),
     [paid("ch_a", 4999, status="failed", captured=False, held=0, amount_captured=0),
      paid("ch_b", 4999, T0 + 30)], NOTHING, set(), None, {}),
    ("exact split payment", order(4999),
     [paid("ch_a", 2500), paid("ch_b", 2499, T0 + 5)], NOTHING, set(), None, {}),
    ("split payment then a duplicate", order(4999),
     [paid("ch_a", 2500), paid("ch_b", 2499, T0 + 5), paid("ch_c", 2499, T0 + 6)],
     REFUND, {"ch_c"}, None, {}),
    ("overpay with another amount", order(5000),
     [paid("ch_a", 5000), paid("ch_b", 1500, T0 + 60)], REVIEW, set(), "no_clear_duplicate", {}),
    ("already refunded", order(4999),
     [paid("ch_a", 4999), refunded(paid("ch_b", 4999, T0 + 1), 4999)], NOTHING, set(), None, {}),
    ("partially refunded", order(4999),
     [paid("ch_a", 4999), refunded(paid("ch_b", 4999, T0 + 1), 1000)], REVIEW, set(), "partial_refund", {}),
    ("duplicate disputed", order(4999),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1, dispute_status="needs_response")],
     REVIEW, set(), "dispute_open", {}),
    ("first charge disputed", order(4999),
     [paid("ch_a", 4999, dispute_status="under_review"), paid("ch_b", 4999, T0 + 1)],
     REVIEW, set(), "dispute_open", {}),
    ("dispute lost on one charge: the other is the only one holding", order(4999),
     [paid("ch_a", 4999, dispute_status="lost", held=0), paid("ch_b", 4999, T0 + 1)],
     NOTHING, set(), None, {}),
    ("dispute lost, two others still hold", order(4999),
     [paid("ch_a", 4999, dispute_status="lost", held=0), paid("ch_b", 4999, T0 + 1),
      paid("ch_c", 4999, T0 + 2)], REVIEW, set(), "dispute_lost", {}),
    ("dispute won on the keeper does not block", order(4999),
     [paid("ch_a", 4999, dispute_status="won"), paid("ch_b", 4999, T0 + 1)], REFUND, {"ch_b"}, None, {}),
    ("dispute won on the duplicate: never refunded automatically", order(4999),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1, dispute_status="won")],
     REVIEW, set(), "refund_leaves_wrong_total", {}),
    ("uncaptured authorisation next to two captured", order(4999),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1),
      paid("ch_c", 4999, T0 + 2, captured=False, held=0, amount_captured=0)],
     REVIEW, set(), "uncaptured_authorization", {}),
    # An authorisation on an order already paid in full is a duplicate authorisation: it
    # is released (never captured). (Before the authorisation cases, this row expected
    # no case: capturing it later double-charged the customer.)
    ("uncaptured authorisation next to a captured charge of the same amount", order(4999),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1, captured=False, held=0, amount_captured=0)],
     RELEASE, {"ch_b"}, None, {}),
    ("authorisation of another amount on a paid order", order(4999),
     [paid("ch_a", 4999), paid("ch_b", 1500, T0 + 1, captured=False, held=0, amount_captured=0)],
     REVIEW, set(), "authorization_not_clear", {}),
    ("two authorisations, nothing captured", order(4999),
     [paid("ch_a", 4999, captured=False, held=0, amount_captured=0),
      paid("ch_b", 4999, T0 + 1, captured=False, held=0, amount_captured=0)],
     RELEASE, {"ch_b"}, None, {}),
    ("authorisation completing a split payment is needed", order(4999),
     [paid("ch_a", 2500), paid("ch_b", 2499, T0 + 1, captured=False, held=0, amount_captured=0)],
     NOTHING, set(), None, {}),
    ("a lone authorisation in another currency is the payment, not a duplicate", order(1000, "jpy"),
     [paid("ch_a", 500, captured=False, held=0, amount_captured=0)], NOTHING, set(), None, {}),
    ("an authorisation in another currency next to a full payment is extra", order(4999),
     [paid("ch_a", 4999), paid("ch_b", 4600, T0 + 1, currency="eur", captured=False, held=0, amount_captured=0)],
     REVIEW, set(), "authorization_not_clear", {}),
    ("a lone authorisation is the payment", order(4999),
     [paid("ch_a", 4999, captured=False, held=0, amount_captured=0)], NOTHING, set(), None, {}),
    ("authorisation next to a paid charge, total unknown", order(None, None),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1, captured=False, held=0, amount_captured=0)],
     REVIEW, set(), "total_unknown", {}),
    ("authorisation on a connected account", order(4999),
     [paid("ch_a", 4999, account="acct_1"),
      paid("ch_b", 4999, T0 + 1, captured=False, held=0, amount_captured=0, account="acct_1")],
     REVIEW, set(), "connected_account", {}),
    ("released authorisation does not block", order(4999),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1),
      paid("ch_c", 4999, T0 + 2, captured=False, held=0, amount_captured=0, released=True)],
     REFUND, {"ch_b"}, None, {}),
    ("outside the window", order(4999),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + WINDOW + 1)], REVIEW, set(), "no_clear_duplicate", {}),
    ("inside the window, to the second", order(4999),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + WINDOW)], REFUND, {"ch_b"}, None, {}),
    ("JPY (zero-decimal)", order(5000, "jpy"),
     [paid("ch_a", 5000, currency="jpy"), paid("ch_b", 5000, T0 + 1, currency="jpy")],
     REFUND, {"ch_b"}, None, {}),
    ("mixed currencies", order(4999),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1, currency="eur")], REVIEW, set(), "mixed_currencies", {}),
    ("mixed currencies, total unknown", order(None, None),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1, currency="eur")], REVIEW, set(), "mixed_currencies", {}),
    ("charges in another currency than the order", order(4999, "eur"),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1)], REVIEW, set(), "currency_differs", {}),
    ("unknown total, default setting", order(None, None),
     [paid("ch_a", 2500), paid("ch_b", 2500, T0 + 1)], REVIEW, set(), "total_unknown", {}),
    ("unknown total, AUTO_REFUND_UNKNOWN_TOTAL=true", order(None, None),
     [paid("ch_a", 2500), paid("ch_b", 2500, T0 + 1)], REFUND, {"ch_b"}, None,
     {"auto_refund_unknown_total": True}),
    ("unknown total allowed, but no clear duplicate", order(None, None),
     [paid("ch_a", 2500), paid("ch_b", 1500, T0 + 1)], REVIEW, set(), "no_clear_duplicate",
     {"auto_refund_unknown_total": True}),
    ("two items, three charges", order(9998),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1), paid("ch_c", 4999, T0 + 2)],
     REFUND, {"ch_c"}, None, {}),
    ("4000 + 6000 + 6000 for 10000", order(10000),
     [paid("ch_a", 4000), paid("ch_b", 6000, T0 + 1), paid("ch_c", 6000, T0 + 2)],
     REFUND, {"ch_c"}, None, {}),
    ("refund would go below the total", order(7000),
     [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1)], REVIEW, set(), "refund_leaves_wrong_total", {}),
    ("connected account", order(4999),
     [paid("ch_a", 4999, account="acct_1"), paid("ch_b", 4999, T0 + 1, account="acct_1")],
     REVIEW, set(), "connected_account", {}),
    ("single charge above the total is not a duplicate", order(4999),
     [paid("ch_a", 5999)], NOTHING, set(), None, {}),
    ("two charges exactly the total (deposit + balance)", order(10000),
     [paid("ch_a", 5000), paid("ch_b", 5000, T0 + HOUR)], NOTHING, set(), None, {}),
]


@pytest.mark.parametrize(
    "name, order_facts, charges, expected, refunds, reason, options", ROWS, ids=[r[0] for r in ROWS]
)
def test_rule_table(name, order_facts, charges, expected, refunds, reason, options) -> None:  # type: ignore[no-untyped-def]
    verdict = assess(order_facts, charges, window_seconds=WINDOW, **options)
    if expected == NOTHING:
        assert not verdict.needs_case, verdict
        return
    assert verdict.needs_case
    if expected == RELEASE:
        assert verdict.kind == "authorization" and verdict.automatic, verdict.review_reasons
        assert set(verdict.releases) == refunds and verdict.proposed_refunds == {}
        amounts = {c.id: c.amount for c in charges}
        assert all(amount == amounts[cid] for cid, amount in verdict.releases.items())
        assert verdict.keeper_charge_id not in verdict.releases
        return
    if expected == REFUND:
        assert verdict.automatic, verdict.review_reasons
        assert set(verdict.proposed_refunds) == refunds
        held = {c.id: c.held for c in charges}
        assert all(amount == held[cid] for cid, amount in verdict.proposed_refunds.items())
        assert verdict.keeper_charge_id not in verdict.proposed_refunds
    else:
        assert not verdict.automatic
        codes = [r.split(":")[0] for r in verdict.review_reasons]
        assert reason in codes, verdict.review_reasons


def test_keeper_is_the_current_payment_intents_charge_even_when_later() -> None:
    o = order(4999, pi="pi_current")
    charges = [paid("ch_early", 4999, T0), paid("ch_late", 4999, T0 + 5, payment_intent_id="pi_current")]
    verdict = assess(o, charges, window_seconds=WINDOW)
    assert verdict.keeper_charge_id == "ch_late"
    assert verdict.proposed_refunds == {"ch_early": 4999}


def test_keeper_order_breaks_same_second_ties_by_charge_id() -> None:
    charges = [paid("ch_b", 4999, T0), paid("ch_a", 4999, T0)]
    assert [c.id for c in keeper_order(order(4999), charges)] == ["ch_a", "ch_b"]
    # and the verdict does not depend on the order the charges arrive in
    one = assess(order(4999), charges, window_seconds=WINDOW)
    two = assess(order(4999), list(reversed(charges)), window_seconds=WINDOW)
    assert one == two


def test_review_proposal_never_touches_a_disputed_charge_or_goes_below_the_total() -> None:
    charges = [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1, dispute_status="needs_response"),
               paid("ch_c", 4999, T0 + 2)]
    verdict = assess(order(4999), charges, window_seconds=WINDOW)
    assert not verdict.automatic
    assert "ch_b" not in verdict.proposed_refunds
    assert verdict.proposed_refunds == {"ch_c": 4999}


def test_excess_is_per_currency() -> None:
    charges = [paid("ch_a", 4999), paid("ch_b", 4999, T0 + 1), paid("ch_c", 4500, T0 + 2, currency="eur")]
    verdict = assess(order(4999), charges, window_seconds=WINDOW)
    assert verdict.excess == {"eur": 4500, "usd": 4999}
