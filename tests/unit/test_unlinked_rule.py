"""The "possible duplicate, no order" rule (domain.cases.rules.unlinked_groups), as a table."""

from __future__ import annotations

import pytest

from domain.cases.rules import UnlinkedChargeFacts as C
from domain.cases.rules import unlinked_groups

W = 600  # UNLINKED_WINDOW_MINUTES = 10
T = 1_700_000_000


def card(id: str, dt: int, *, amount: int = 4999, currency: str = "usd", fp: str | None = "fpA", **kw) -> C:  # noqa: A002
    return C(id=id, amount=amount, currency=currency, created=T + dt, fingerprint=fp, **kw)


CASES = [
    ("same card twice within the window", [card("ch_1", 0), card("ch_2", 300)], [("ch_1", "ch_2")]),
    ("exactly at the window", [card("ch_1", 0), card("ch_2", W)], [("ch_1", "ch_2")]),
    ("same card two hours apart", [card("ch_1", 0), card("ch_2", 7200)], []),
    ("just past the window", [card("ch_1", 0), card("ch_2", W + 1)], []),
    ("same amount, different cards", [card("ch_1", 0, fp="fpA"), card("ch_2", 60, fp="fpB")], []),
    ("same card, different amounts", [card("ch_1", 0), card("ch_2", 60, amount=5000)], []),
    ("same card, different currencies", [card("ch_1", 0), card("ch_2", 60, currency="eur")], []),
    ("one linked, one not", [card("ch_1", 0, order_id="ord_1"), card("ch_2", 60)], []),
    ("a later charge linked to another order", [card("ch_1", 0), card("ch_2", 60, order_id="ord_2")], []),
    (
        "different descriptions",
        [card("ch_1", 0, description="T-shirt"), card("ch_2", 60, description="Mug")],
        [],
    ),
    (
        "same description",
        [card("ch_1", 0, description="T-shirt"), card("ch_2", 60, description="T-shirt")],
        [("ch_1", "ch_2")],
    ),
    ("one description missing", [card("ch_1", 0, description="T-shirt"), card("ch_2", 60)], [("ch_1", "ch_2")]),
    (
        "same customer, no card fingerprint",
        [card("ch_1", 0, fp=None, customer="cus_1"), card("ch_2", 60, fp=None, customer="cus_1")],
        [("ch_1", "ch_2")],
    ),
    (
        "no fingerprint and no customer",
        [card("ch_1", 0, fp=None), card("ch_2", 60, fp=None)],
        [],
    ),
    ("a refunded repeat holds nothing", [card("ch_1", 0), card("ch_2", 60, held=0)], []),
    ("three in a chain", [card("ch_1", 0), card("ch_2", 480), card("ch_3", 960)], [("ch_1", "ch_2", "ch_3")]),
    (
        "two separate pairs",
        [card("ch_1", 0), card("ch_2", 60), card("ch_3", 7200), card("ch_4", 7260)],
        [("ch_1", "ch_2"), ("ch_3", "ch_4")],
    ),
    ("a single charge", [card("ch_1", 0)], []),
    ("same second, ordered by id", [card("ch_b", 0), card("ch_a", 0)], [("ch_a", "ch_b")]),
]


@pytest.mark.parametrize("charges, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_unlinked_groups(charges: list[C], expected: list[tuple[str, ...]]) -> None:
    assert [g.charge_ids for g in unlinked_groups(charges, window_seconds=W)] == expected
    # the input order never matters
    assert [g.charge_ids for g in unlinked_groups(list(reversed(charges)), window_seconds=W)] == expected


def test_group_names_the_card_amount_and_times() -> None:
    (group,) = unlinked_groups([card("ch_1", 0), card("ch_2", 120)], window_seconds=W)
    assert group.key == ("fingerprint", "fpA")
    assert (group.amount, group.currency) == (4999, "usd")
    assert (group.first_created, group.last_created) == (T, T + 120)
    assert group.first_charge_id == "ch_1" and group.repeats == ("ch_2",)


def test_group_by_customer_is_named_by_customer() -> None:
    (group,) = unlinked_groups(
        [card("ch_1", 0, fp="fpA", customer="cus_1"), card("ch_2", 60, fp="fpB", customer="cus_1")], window_seconds=W
    )
    assert group.key == ("customer", "cus_1")
