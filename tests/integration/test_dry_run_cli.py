"""``reconciler reconcile --mode dry-run`` prints, per order, what a pass would do, and
``--json`` gives the same as data; nothing changes."""

from __future__ import annotations

import json

from models import AlertSent, AuditEntry, DuplicateCase
from tests.integration.test_duplicates_api import review_settings, run_cli  # noqa: F401 (fixtures)
from tests.integration.test_reconcile import NOW, _double_click, make_order


def _plan_section(output: str) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  would act on") or line.startswith("  nothing would be done"))
    return lines[start:]


def test_dry_run_prints_per_order_what_it_would_do_and_changes_nothing(run_cli, stripe_api, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    keeper, duplicate = _double_click(stripe_api, session_factory)
    make_order(session_factory, "ord_over", 5000)
    first = stripe_api.add_charge(amount=5000, metadata={"order_id": "ord_over"}, created=NOW - 20)
    stripe_api.add_charge(amount=1500, metadata={"order_id": "ord_over"}, created=NOW - 10)

    result = run_cli("reconcile", "--mode", "dry-run")

    assert result.exit_code == 0, result.output
    assert _plan_section(result.output) == [
        "  would act on 2 order(s):",
        f"  order ord_dc (49.99 USD): new case, keep {keeper['id']}",
        f"    refund {duplicate['id']} 49.99 USD",
        f"  order ord_over (50.00 USD): new case, keep {first['id']}",
        "    to finance: 2 charges hold 65.00 USD but none repeats another; a person must decide.",
    ]

    as_json = run_cli("reconcile", "--mode", "dry-run", "--json")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.output)
    assert report["mode"] == "dry-run" and report["status"] == "succeeded"
    dc, over = report["plan"]
    assert dc == {
        "order_id": "ord_dc",
        "order_total": {"amount": 4999, "currency": "usd", "display": "49.99 USD"},
        "case_id": None,
        "step": "open",
        "action": "refund",
        "keeper_charge_id": keeper["id"],
        "excess": [{"amount": 4999, "currency": "usd", "display": "49.99 USD"}],
        "refunds": [{"charge_id": duplicate["id"], "amount": 4999, "currency": "usd", "display": "49.99 USD"}],
        "releases": [],
        "reasons": [],
    }
    assert over["order_id"] == "ord_over" and over["action"] == "review" and over["keeper_charge_id"] == first["id"]
    assert over["order_total"] == {"amount": 5000, "currency": "usd", "display": "50.00 USD"}
    assert over["excess"] == [{"amount": 1500, "currency": "usd", "display": "15.00 USD"}]
    assert over["refunds"] == [] and over["releases"] == []
    assert [r.split(":")[0] for r in over["reasons"]] == ["no_clear_duplicate"]

    # nothing changed: no case, no Stripe write, no alert
    assert ledger.all(DuplicateCase) == []
    assert ledger.all(AuditEntry) == []
    assert ledger.all(AlertSent) == []
    assert stripe_api.refund_requests == [] and stripe_api.refund_creates == 0


def test_dry_run_with_nothing_to_do_says_so_in_one_line(run_cli, stripe_api, session_factory) -> None:  # type: ignore[no-untyped-def]
    make_order(session_factory, "ord_fine", 4999)
    stripe_api.add_charge(amount=4999, metadata={"order_id": "ord_fine"}, created=NOW - 5)

    result = run_cli("reconcile", "--mode", "dry-run")

    assert result.exit_code == 0, result.output
    assert _plan_section(result.output) == ["  nothing would be done: no refund, release or case for finance"]
    assert json.loads(run_cli("reconcile", "--mode", "dry-run", "--json").output)["plan"] == []
