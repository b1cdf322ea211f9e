"""Finance's JSON API and CLI over duplicate cases, and the report: same decisions, same
refund path, same audit trail as the page."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from click.testing import CliRunner

from app import create_app
from cli import main as cli
from jobs.reconcile import run_reconciliation
from domain.stripe.gateway import StripeGateway
from domain.cases.report import REPORT_COLUMNS
from models import AuditEntry, DuplicateCase
from tests.conftest import API_TOKEN
from tests.stripe_fake import API
from tests.integration.test_reconcile import NOW, _double_click, make_order


@pytest.fixture
def review_settings(settings):  # type: ignore[no-untyped-def]
    return settings.with_overrides(stripe_api_base=API, stripe_max_network_retries=0, refund_mode="review")


@pytest.fixture
def api(review_settings, session_factory):  # type: ignore[no-untyped-def]
    return create_app(review_settings, session_factory=session_factory).test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}", "X-Actor": "dana"}


@pytest.fixture
def open_cases(stripe_api, session_factory, review_settings, ledger):  # type: ignore[no-untyped-def]
    """Two open cases: a clear double click (ord_dc) and a 5000 + 1500 overpay (ord_over)."""
    _double_click(stripe_api, session_factory)
    make_order(session_factory, "ord_over", 5000)
    stripe_api.add_charge(amount=5000, metadata={"order_id": "ord_over"}, created=NOW - 20)
    stripe_api.add_charge(amount=1500, metadata={"order_id": "ord_over"}, created=NOW - 10)
    run_reconciliation(session_factory, StripeGateway.from_settings(review_settings), review_settings, sleep=lambda s: None)
    return {c.order_id: c.id for c in ledger.all(DuplicateCase)}


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/api/duplicates"),
        ("get", "/api/duplicates/1"),
        ("post", "/api/duplicates/1/refund"),
        ("post", "/api/duplicates/1/dismiss"),
        ("get", "/api/runs"),
    ],
)
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789", "Basic abc"])
def test_every_route_needs_the_token(api, method, path, header) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": header} if header else {}
    response = getattr(api, method)(path, headers=headers)
    assert response.status_code == 401 and response.get_json()["error"] == "unauthorized"


def test_list_and_show(api, auth, open_cases) -> None:  # type: ignore[no-untyped-def]
    listing = api.get("/api/duplicates?status=open", headers=auth).get_json()
    assert listing["total"] == 2
    assert listing["totals"]["usd"]["excess"] == 4999 + 1500
    case = api.get(f"/api/duplicates/{open_cases['ord_dc']}", headers=auth).get_json()
    assert case["automatic"] is True and case["proposed_refunds"] == {"usd": 4999}
    assert [c["keeper"] for c in case["charges"]] == [True, False]
    assert case["charges"][1]["dashboard_url"].startswith("https://dashboard.stripe.com/test/payments/")
    assert api.get("/api/duplicates?status=closed", headers=auth).status_code == 400
    assert api.get("/api/duplicates?from=yesterday", headers=auth).status_code == 400
    assert api.get("/api/duplicates/999", headers=auth).status_code == 404


def test_refund_twice_refunds_once_and_is_audited(api, auth, open_cases, stripe_api, ledger) -> None:  # type: ignore[no-untyped-def]
    case_id = open_cases["ord_dc"]
    first = api.post(f"/api/duplicates/{case_id}/refund", headers=auth)
    second = api.post(f"/api/duplicates/{case_id}/refund", headers=auth)
    assert first.status_code == 200 and first.get_json()["case"]["status"] == "refunded"
    assert second.status_code == 409 and second.get_json()["error"] == "case_not_open"
    assert stripe_api.refund_creates == 1
    audit = ledger.all(AuditEntry, AuditEntry.case_id == case_id, AuditEntry.action == "approve")
    assert [a.actor for a in audit] == ["api:dana"]


def test_chosen_refunds_are_checked(api, auth, open_cases, stripe_api, ledger) -> None:  # type: ignore[no-untyped-def]
    case_id = open_cases["ord_over"]
    case = api.get(f"/api/duplicates/{case_id}", headers=auth).get_json()
    keeper, extra = case["charges"][0]["id"], case["charges"][1]["id"]
    for body, code in [
        ({"refunds": [{"charge_id": keeper, "amount": 100}]}, "keeper_charge"),
        ({"refunds": [{"charge_id": extra, "amount": 1501}]}, "exceeds_held"),
        ({"refunds": [{"charge_id": extra, "amount": 10.5}]}, "invalid_amount"),
        ({"refunds": [{"charge_id": extra, "amount": -1}]}, "invalid_amount"),
        ({"refunds": []}, "invalid_refunds"),
        ({"refunds": [{"charge_id": "ch_not_in_case", "amount": 1}]}, "charge_not_in_case"),
    ]:
        response = api.post(f"/api/duplicates/{case_id}/refund", headers=auth, json=body)
        assert response.status_code == 422 and response.get_json()["error"] == code, (body, response.get_json())
    assert api.post(f"/api/duplicates/{case_id}/refund", headers=auth, data="[1", content_type="application/json").status_code == 400
    assert stripe_api.refund_requests == []
    assert ledger.get(DuplicateCase, case_id).status == "open"

    partial = api.post(f"/api/duplicates/{case_id}/refund", headers=auth, json={"refunds": [{"charge_id": extra, "amount": 1000}], "note": "customer keeps 5.00 as credit"})
    assert partial.status_code == 200, partial.get_json()
    assert stripe_api.refund_requests[0]["amount"] == "1000"
    assert partial.get_json()["case"]["note"] == "customer keeps 5.00 as credit"


def test_dismiss_needs_a_note(api, auth, open_cases, ledger) -> None:  # type: ignore[no-untyped-def]
    case_id = open_cases["ord_over"]
    assert api.post(f"/api/duplicates/{case_id}/dismiss", headers=auth).get_json()["error"] == "note_required"
    assert api.post(f"/api/duplicates/{case_id}/dismiss", headers=auth, json={"note": "   "}).status_code == 422
    assert ledger.get(DuplicateCase, case_id).status == "open"
    response = api.post(f"/api/duplicates/{case_id}/dismiss", headers=auth, json={"note": "tip added by the customer"})
    assert response.status_code == 200 and response.get_json()["status"] == "dismissed"
    assert response.get_json()["audit"][-1]["note"] == "tip added by the customer"
    assert api.post(f"/api/duplicates/{case_id}/dismiss", headers=auth, json={"note": "again"}).status_code == 409


def test_runs(api, auth, open_cases) -> None:  # type: ignore[no-untyped-def]
    runs = api.get("/api/runs", headers=auth).get_json()["data"]
    assert runs[0]["mode"] == "review" and runs[0]["counts"]["cases_opened"] == 2


# -- CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def run_cli(review_settings, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DATABASE_URL", review_settings.database_url)
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_cli")
    monkeypatch.setenv("STRIPE_API_BASE", API)
    monkeypatch.setenv("STRIPE_MAX_NETWORK_RETRIES", "0")
    monkeypatch.setenv("LOG_LEVEL", "ERROR")

    def _run(*args: str):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    return _run


def test_cli_review_list_show_approve_dismiss(run_cli, open_cases, stripe_api, ledger) -> None:  # type: ignore[no-untyped-def]
    listing = run_cli("review", "list", "--status", "open")
    assert listing.exit_code == 0 and "ord_dc" in listing.output and "ord_over" in listing.output
    shown = run_cli("review", "show", str(open_cases["ord_dc"]))
    assert "keeper" in shown.output and "propose refund 49.99 USD" in shown.output
    approved = run_cli("review", "approve", str(open_cases["ord_dc"]), "--by", "dana")
    assert approved.exit_code == 0 and "refunded" in approved.output
    again = run_cli("review", "approve", str(open_cases["ord_dc"]), "--by", "dana")
    assert again.exit_code != 0 and "case_not_open" in again.output
    assert stripe_api.refund_creates == 1
    refused = run_cli("review", "dismiss", str(open_cases["ord_over"]), "--by", "dana", "--note", " ")
    assert refused.exit_code != 0 and "note_required" in refused.output
    dismissed = run_cli("review", "dismiss", str(open_cases["ord_over"]), "--by", "dana", "--note", "agreed with customer")
    assert dismissed.exit_code == 0
    case = ledger.get(DuplicateCase, open_cases["ord_over"])
    assert (case.status, case.decided_by, case.note) == ("dismissed", "dana", "agreed with customer")


def test_report_csv_round_trips_with_major_units(run_cli, open_cases, api, auth, stripe_api) -> None:  # type: ignore[no-untyped-def]
    api.post(f"/api/duplicates/{open_cases['ord_dc']}/refund", headers=auth)
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    result = run_cli("report", "--since", today)
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert list(rows[0].keys()) == REPORT_COLUMNS
    by_charge = {r["charge_id"]: r for r in rows}
    assert len(rows) == 4
    dc = [r for r in rows if r["order_id"] == "ord_dc"]
    assert {r["role"] for r in dc} == {"keeper", "duplicate"}
    duplicate = next(r for r in dc if r["role"] == "duplicate")
    assert (duplicate["charge_amount"], duplicate["currency"], duplicate["refunded"], duplicate["held"]) == ("49.99", "USD", "49.99", "0.00")
    assert duplicate["decision"] == "finance" and duplicate["decided_by"] == "api:dana" and duplicate["refund_origin"] == "finance"
    assert all(Decimal(r["charge_amount"]) > 0 for r in by_charge.values())
    as_json = json.loads(run_cli("report", "--since", today, "--format", "json").output)
    assert as_json == rows
    assert run_cli("report", "--since", "2999-01-01").output.strip() == ",".join(REPORT_COLUMNS)


def test_report_amounts_for_zero_decimal_currencies(run_cli, stripe_api, session_factory, review_settings) -> None:  # type: ignore[no-untyped-def]
    make_order(session_factory, "ord_jpy", 5000, "jpy")
    for created in (NOW - 5, NOW - 4):
        stripe_api.add_charge(amount=5000, currency="jpy", metadata={"order_id": "ord_jpy"}, created=created)
    run_reconciliation(session_factory, StripeGateway.from_settings(review_settings), review_settings, sleep=lambda s: None)
    rows = list(csv.DictReader(io.StringIO(run_cli("report", "--since", "2000-01-01").output)))
    assert {(r["charge_amount"], r["currency"], r["order_total"]) for r in rows} == {("5000", "JPY", "5000")}


def test_report_cells_cannot_become_formulas(api, auth, open_cases, run_cli) -> None:  # type: ignore[no-untyped-def]
    api.post(f"/api/duplicates/{open_cases['ord_over']}/dismiss", headers=auth, json={"note": "=HYPERLINK(\"http://x\")"})
    rows = list(csv.DictReader(io.StringIO(run_cli("report", "--since", "2000-01-01").output)))
    note = next(r["note"] for r in rows if r["order_id"] == "ord_over")
    assert note.startswith("'=")


def test_cli_reconcile_runs_and_a_second_pass_is_refused(run_cli, stripe_api, session_factory, ledger) -> None:  # type: ignore[no-untyped-def]
    from jobs.lease import exclusive_pass

    _double_click(stripe_api, session_factory)
    with exclusive_pass(session_factory):
        refused = run_cli("reconcile", "--mode", "auto")
    assert refused.exit_code == 3 and "another reconcile pass is running" in refused.output
    assert stripe_api.refund_requests == []
    ran = run_cli("reconcile", "--mode", "auto", "--json")
    assert ran.exit_code == 0, ran.output
    report = json.loads(ran.output)
    assert report["status"] == "succeeded" and report["counts"]["refunds_issued"] == 1
    runs = run_cli("runs")
    assert "auto" in runs.output and "succeeded" in runs.output
