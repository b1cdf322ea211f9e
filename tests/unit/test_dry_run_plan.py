"""The dry run's per-order plan as text and as data (cli.plan_lines / plan_data)."""

from __future__ import annotations

from cli import plan_data, plan_lines


def _entry(**fields):  # type: ignore[no-untyped-def]
    entry = {
        "order_id": "ord_x",
        "order_total": 4999,
        "order_currency": "usd",
        "case_id": None,
        "step": "open",
        "keeper_charge_id": "ch_keep",
        "excess": {},
        "action": "refund",
        "refunds": [],
        "reasons": [],
    }
    entry.update(fields)
    return entry


PLAN = [
    # given out of order: printed by order id
    _entry(
        order_id="ord_z_review",
        order_total=None,
        order_currency=None,
        step="refresh",
        case_id=7,
        action="review",
        keeper_charge_id="ch_k3",
        excess={"usd": 1000},
        refunds=[{"charge_id": "ch_p", "amount": 1000, "currency": "usd"}],
        reasons=[
            "total_unknown: the order's total is not known, so no refund is automatic",
            "partial_refund: ch_x has 1000 of 4999 usd refunded",
        ],
    ),
    _entry(
        order_id="ord_jpy",
        order_total=5000,
        order_currency="jpy",
        keeper_charge_id="ch_k2",
        excess={"jpy": 5000},
        refunds=[{"charge_id": "ch_j", "amount": 5000, "currency": "jpy"}],
    ),
    _entry(
        order_id="ord_auth",
        keeper_charge_id="ch_k1",
        excess={"usd": 4999},
        releases=[{"charge_id": "ch_auth", "amount": 4999, "currency": "usd"}],
    ),
]


def test_lines_per_order_by_order_id() -> None:
    assert plan_lines(PLAN) == [
        "would act on 3 order(s):",
        "order ord_auth (49.99 USD): new case, keep ch_k1",
        "  release authorisation ch_auth 49.99 USD",
        "order ord_jpy (5,000 JPY): new case, keep ch_k2",
        "  refund ch_j 5,000 JPY",
        "order ord_z_review (total unknown): case 7, keep ch_k3",
        "  to finance: The order's total is not known, so no refund is made automatically. "
        "Charge ch_x already has 10.00 USD of 49.99 USD refunded; a person must decide.",
        "  suggested: refund ch_p 10.00 USD",
    ]


def test_nothing_to_do_is_one_line() -> None:
    assert plan_lines([]) == ["nothing would be done: no refund, release or case for finance"]


def test_data_has_minor_units_currency_and_display() -> None:
    auth, jpy, review = plan_data(PLAN)
    assert auth["releases"] == [{"charge_id": "ch_auth", "amount": 4999, "currency": "usd", "display": "49.99 USD"}]
    assert auth["refunds"] == []
    assert jpy["order_total"] == {"amount": 5000, "currency": "jpy", "display": "5,000 JPY"}
    assert jpy["refunds"] == [{"charge_id": "ch_j", "amount": 5000, "currency": "jpy", "display": "5,000 JPY"}]
    assert jpy["releases"] == []  # absent in the entry
    assert review["order_total"] == {"amount": None, "currency": None, "display": "total unknown"}
    assert (review["step"], review["case_id"], review["action"]) == ("refresh", 7, "review")
    assert review["reasons"][1] == "partial_refund: ch_x has 1000 of 4999 usd refunded"


def test_reopen_names_the_case() -> None:
    lines = plan_lines([_entry(step="reopen", case_id=3, action="review", reasons=["reopened: a settled case's order holds too much again; a person decides"])])
    assert lines[1:] == [
        "order ord_x (49.99 USD): reopens case 3, keep ch_keep",
        "  to finance: A settled case's order holds too much again; a person must decide.",
    ]
