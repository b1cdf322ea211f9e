"""The review queue as a table (/review): one row per case, sortable and filterable, the
totals of the filter on top, and "approve selected" for clear cases (page and JSON API),
each approval its own phased refund and audit entry; reasons in words and timestamps with
their offset everywhere (page, API, CSV, CLI); ``/`` redirects to the queue.

Stripe is the FakeStripe double; the five cases:

=========  ===================================  ==============================
order      charges                              what the rule says
=========  ===================================  ==============================
ord_a      2 x 49.99 USD, total 49.99 USD       clear duplicate, full refund
ord_b      2 x 10.00 USD, total 10.00 USD       clear duplicate, full refund
ord_c      2 x 5,000 JPY, total 5,000 JPY       clear duplicate, full refund
ord_d      50.00 + 15.00 USD, total 50.00 USD   no clear duplicate
ord_e      2 x 49.99 USD, total unknown         total unknown (a person decides)
=========  ===================================  ==============================
"""

from __future__ import annotations

import csv
import io
import re
from datetime import datetime

import pytest
from click.testing import CliRunner

from app import create_app
from cli import main as cli
from domain.stripe.gateway import StripeGateway
from jobs.reconcile import run_reconciliation
from models import AuditEntry, DuplicateCase, RefundAttempt
from tests.conftest import API_TOKEN
from tests.integration.test_api_scopes import bearer, entries
from tests.integration.test_reconcile import NOW, make_order
from tests.integration.test_review_page import (  # noqa: F401 (fixtures)
    APPROVER,
    VIEWER,
    login,
    post,
    review_app,
    review_settings,
    token,
    web,
)

ROW = re.compile(r'<tr class="case [^"]*" data-case-id="(\d+)"')


@pytest.fixture
def queue(stripe_api, session_factory, review_settings, ledger):  # type: ignore[no-untyped-def]
    """Five cases (see the module doc); {order id: case id}."""

    def charge(order_id: str, amount: int, currency: str = "usd", created: int = NOW - 30) -> None:
        stripe_api.add_charge(amount=amount, currency=currency, metadata={"order_id": order_id}, created=created)

    for order_id, amount, currency in (("ord_a", 4999, "usd"), ("ord_b", 1000, "usd"), ("ord_c", 5000, "jpy")):
        make_order(session_factory, order_id, amount, currency)
        charge(order_id, amount, currency)
        charge(order_id, amount, currency)
    make_order(session_factory, "ord_d", 5000)
    charge("ord_d", 5000, created=NOW - 40)
    charge("ord_d", 1500, created=NOW - 20)
    charge("ord_e", 4999)
    charge("ord_e", 4999)
    run_reconciliation(session_factory, StripeGateway.from_settings(review_settings), review_settings, sleep=lambda s: None)
    found = {c.order_id: c.id for c in ledger.all(DuplicateCase)}
    assert set(found) == {"ord_a", "ord_b", "ord_c", "ord_d", "ord_e"}
    return found


def rows(html: str) -> list[int]:
    return [int(i) for i in ROW.findall(html)]


def selectable(html: str) -> set[int]:
    return {int(i) for i in re.findall(r'name="case_id" value="(\d+)"', html)}


# -- the table -----------------------------------------------------------------------------


def test_one_row_per_case_with_reason_in_words_and_totals(web, queue) -> None:  # type: ignore[no-untyped-def]
    login(web, VIEWER)
    html = web.get("/review").get_data(as_text=True)
    assert sorted(rows(html)) == sorted(queue.values())
    assert "<th" in html and 'href="/review?sort=amount&amp;dir=asc"' in html
    # reasons in words, amounts in major units, currency codes in capitals
    assert "2 charges hold 65.00 USD but none repeats another; a person must decide." in html
    assert "Clear duplicate: refunding 5,000 JPY leaves the order holding its total of 5,000 JPY; ready to approve." in html
    assert "The order&#39;s total is not known, so no refund is made automatically; a person must decide." in html
    assert "no_clear_duplicate" not in html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    assert "Open case" not in html
    # totals of the filter: cases and excess per currency
    totals = html.split('<table class="totals">', 1)[1].split("</table>", 1)[0]
    assert re.search(r"<td>JPY</td><td class=\"num\">1</td><td class=\"num\">5,000 JPY</td>", totals)
    assert re.search(r"<td>USD</td><td class=\"num\">4</td><td class=\"num\">124.98 USD</td>", totals)
    # a viewer gets no checkboxes and no bulk form
    assert selectable(html) == set() and "Approve selected" not in html


def test_sorting_by_a_column_header(web, queue) -> None:  # type: ignore[no-untyped-def]
    login(web, VIEWER)
    ascending = rows(web.get("/review?sort=amount&dir=asc").get_data(as_text=True))
    # excess in major units: 10.00 USD, 15.00 USD, 49.99 USD (twice: ids ascending), 5,000 JPY
    assert ascending == [queue["ord_b"], queue["ord_d"], *sorted([queue["ord_a"], queue["ord_e"]]), queue["ord_c"]]
    descending = web.get("/review?sort=amount&dir=desc").get_data(as_text=True)
    assert rows(descending) == list(reversed(ascending))
    assert 'aria-sort="descending"' in descending
    assert rows(web.get("/review?sort=id").get_data(as_text=True)) == sorted(queue.values())
    assert rows(web.get("/review?sort=order&dir=desc").get_data(as_text=True)) == [queue[o] for o in ("ord_e", "ord_d", "ord_c", "ord_b", "ord_a")]
    for column in ("status", "currency", "age", "reason", "action"):
        assert sorted(rows(web.get(f"/review?sort={column}").get_data(as_text=True))) == sorted(queue.values())
    # the page links keep the sort
    assert "sort=amount" in web.get("/review?sort=amount&dir=desc&per_page=2").get_data(as_text=True).split('rel="next"')[0].rsplit("href=", 1)[1]


def test_filters_by_reason_currency_amount_and_status(web, queue) -> None:  # type: ignore[no-untyped-def]
    login(web, VIEWER)

    def shown(query: str) -> set[int]:
        response = web.get(f"/review?{query}")
        assert response.status_code == 200, query
        return set(rows(response.get_data(as_text=True)))

    assert shown("reason=clear") == {queue["ord_a"], queue["ord_b"], queue["ord_c"]}
    assert shown("reason=no_clear_duplicate") == {queue["ord_d"]}
    assert shown("reason=total_unknown") == {queue["ord_e"]}
    assert shown("currency=jpy") == {queue["ord_c"]}
    assert shown("amount_min=15&amount_max=49.99") == {queue["ord_a"], queue["ord_d"], queue["ord_e"]}
    assert shown("amount_min=1000") == {queue["ord_c"]}
    assert shown("currency=usd&amount_max=10") == {queue["ord_b"]}
    assert shown("status=open&reason=clear&currency=usd") == {queue["ord_a"], queue["ord_b"]}
    html = web.get("/review?reason=clear&currency=usd").get_data(as_text=True)
    assert re.search(r"<td>USD</td><td class=\"num\">2</td><td class=\"num\">59.99 USD</td>", html)
    for bad in ("reason=whatever", "amount_min=abc", "amount_min=-1", "amount_min=5&amount_max=1", "amount_max=1e3",
                "sort=price", "dir=up", "from=2024-02-01&until=2024-01-01", "per_page=0"):
        response = web.get(f"/review?{bad}")
        assert response.status_code == 400, bad
        assert 'role="alert"' in response.get_data(as_text=True)


def test_a_hundred_rows_a_page_by_default(web, stripe_api, session_factory, review_settings) -> None:  # type: ignore[no-untyped-def]
    for n in range(105):
        order_id = f"ord_many_{n:03d}"
        make_order(session_factory, order_id, 1000 + n)
        for _ in range(2):
            stripe_api.add_charge(amount=1000 + n, metadata={"order_id": order_id}, created=NOW - 30)
    run_reconciliation(session_factory, StripeGateway.from_settings(review_settings), review_settings, sleep=lambda s: None)
    login(web, VIEWER)
    first = web.get("/review").get_data(as_text=True)
    assert len(rows(first)) == 100 and "Page 1 of 2" in first and "105 case(s) match" in first
    assert len(rows(web.get("/review?page=2").get_data(as_text=True))) == 5
    assert len(rows(web.get("/review?per_page=50").get_data(as_text=True))) == 50


def test_slash_redirects_to_the_queue(web) -> None:  # type: ignore[no-untyped-def]
    response = web.get("/")
    assert response.status_code == 302 and response.headers["Location"] == "/review"


# -- approve selected (page) ---------------------------------------------------------------


def test_approve_selected_approves_each_clear_case_on_its_own(web, stripe_api, ledger, queue) -> None:  # type: ignore[no-untyped-def]
    login(web)
    html = web.get("/review?sort=id").get_data(as_text=True)
    assert selectable(html) == {queue["ord_a"], queue["ord_b"], queue["ord_c"]}
    assert f'aria-label="Case {queue["ord_d"]} cannot be approved with others' in html

    chosen = [queue["ord_a"], queue["ord_c"], queue["ord_d"], 999999]
    response = web.post(
        "/review/approve-selected",
        data={"csrf_token": token(web), "case_id": [str(i) for i in chosen], "back": "/review?sort=id"},
    )
    assert response.status_code == 303 and response.headers["Location"] == "/review?sort=id"
    page = web.get(response.headers["Location"]).get_data(as_text=True)
    results = page.split('class="notice bulk-results"', 1)[1].split("</section>", 1)[0]
    assert "Approve selected: 2 approved and refunded, 2 refused or not started." in results
    assert f"Case {queue['ord_a']} (order ord_a): approved: 49.99 USD refunded; the case is now refunded." in results
    assert f"Case {queue['ord_c']} (order ord_c): approved: 5,000 JPY refunded; the case is now refunded." in results
    assert f"Case {queue['ord_d']} (order ord_d): refused: a person must decide it on its own page: 2 charges hold 65.00 USD" in results
    assert "Case 999999: refused: there is no case 999999." in results

    # one refund per approved case at Stripe, one approve audit entry each, by the person
    assert stripe_api.refund_creates == 2
    assert sorted(r["amount"] for r in stripe_api.refund_requests) == ["4999", "5000"]
    approvals = ledger.all(AuditEntry, AuditEntry.action == "approve")
    assert sorted(e.case_id for e in approvals) == sorted([queue["ord_a"], queue["ord_c"]])
    assert {e.actor for e in approvals} == {APPROVER}
    assert ledger.get(DuplicateCase, queue["ord_a"]).status == "refunded"
    untouched = ledger.get(DuplicateCase, queue["ord_d"])
    assert untouched.status == "open" and untouched.decided_by is None
    # refunded cases lose their checkbox
    assert selectable(web.get("/review").get_data(as_text=True)) == {queue["ord_b"]}

    # approving again (a second tab) refunds nothing more
    again = web.post("/review/approve-selected", data={"csrf_token": token(web), "case_id": [str(queue["ord_a"])]})
    assert again.status_code == 303 and again.headers["Location"] == "/review"
    assert "refused: it is refunded, not open" in web.get("/review").get_data(as_text=True)
    assert stripe_api.refund_creates == 2


def test_approve_selected_needs_the_token_the_role_and_a_selection(web, stripe_api, ledger, queue) -> None:  # type: ignore[no-untyped-def]
    ids = [str(queue["ord_a"]), str(queue["ord_b"])]
    assert web.post("/review/approve-selected", data={"case_id": ids}).status_code == 302  # not logged in
    login(web, VIEWER)
    assert web.post("/review/approve-selected", data={"case_id": ids}).status_code == 400  # no CSRF token
    refused = web.post("/review/approve-selected", data={"csrf_token": token(web), "case_id": ids})
    assert refused.status_code == 403 and "Only approvers" in refused.get_data(as_text=True)
    web.post("/review/logout", data={"csrf_token": token(web)})
    login(web)
    assert web.post("/review/approve-selected", data={"csrf_token": "forged", "case_id": ids}).status_code == 400
    for data, message in (
        ({}, "Nothing was approved: Select at least one case"),
        ({"case_id": ["abc"]}, "Nothing was approved: Case ids are whole numbers"),
        ({"case_id": ["99999999999"]}, "Nothing was approved: Case ids are whole numbers"),
        ({"case_id": [str(i) for i in range(1, 102)]}, "Nothing was approved: At most 100 cases at once."),
    ):
        response = web.post("/review/approve-selected", data={"csrf_token": token(web), **data})
        assert response.status_code == 303, data
        assert message in web.get(response.headers["Location"]).get_data(as_text=True), data
    assert stripe_api.refund_creates == 0 and ledger.count(RefundAttempt) == 0
    assert ledger.count(AuditEntry, AuditEntry.action == "approve") == 0


# -- approve selected (API) ----------------------------------------------------------------


@pytest.fixture
def scoped(review_settings, session_factory):  # type: ignore[no-untyped-def]
    app = create_app(review_settings.with_overrides(api_tokens=entries(), api_token=None), session_factory=session_factory)
    return app.test_client()


def test_bulk_approve_api(scoped, stripe_api, ledger, queue) -> None:  # type: ignore[no-untyped-def]
    body = {"ids": [queue["ord_b"], queue["ord_e"]], "note": "double clicks of the morning"}
    assert scoped.post("/api/duplicates/approve", json=body, headers=bearer("dashboard")).status_code == 403
    assert scoped.post("/api/cases/approve", json=body, headers=bearer("checkout")).status_code == 403
    assert scoped.post("/api/cases/approve", json=body).status_code == 401
    response = scoped.post("/api/cases/approve", json=body, headers=bearer("finance-tool", **{"X-Actor": "dana"}))
    assert response.status_code == 200
    data = response.get_json()
    assert data["counts"] == {"refunded": 1, "approved": 0, "refused": 1, "not_started": 0}
    done, refused = data["results"]
    assert done["case_id"] == queue["ord_b"] and done["result"] == "refunded" and done["refunded"] == {"usd": 1000}
    assert done["refunded_display"] == "10.00 USD" and done["status"] == "refunded"
    assert refused["case_id"] == queue["ord_e"] and refused["result"] == "refused" and refused["code"] == "not_eligible"
    assert "The order's total is not known" in refused["message"]
    (entry,) = ledger.all(AuditEntry, AuditEntry.action == "approve")
    assert entry.case_id == queue["ord_b"] and entry.actor == "api:finance-tool (dana)" and entry.note == "double clicks of the morning"
    assert stripe_api.refund_creates == 1

    again = scoped.post("/api/duplicates/approve", json={"ids": [queue["ord_b"]]}, headers=bearer("finance-tool")).get_json()
    assert again["results"][0]["result"] == "refused" and "it is refunded, not open" in again["results"][0]["message"]
    assert stripe_api.refund_creates == 1


@pytest.mark.parametrize(
    "body, status, code",
    [
        (None, 400, "invalid_json"),
        ("[1, 2]", 400, "invalid_json"),
        ({}, 422, "invalid_ids"),
        ({"ids": []}, 422, "invalid_ids"),
        ({"ids": "1,2"}, 422, "invalid_ids"),
        ({"ids": [1, "x"]}, 422, "invalid_ids"),
        ({"ids": [True]}, 422, "invalid_ids"),
        ({"ids": [1.5]}, 422, "invalid_ids"),
        ({"ids": [0]}, 422, "invalid_ids"),
        ({"ids": [2**40]}, 422, "invalid_ids"),
        ({"ids": list(range(1, 102))}, 422, "too_many_ids"),
        ({"ids": [1], "note": 5}, 422, "invalid_note"),
    ],
)
def test_bulk_approve_api_refuses_bad_input(scoped, stripe_api, ledger, queue, body, status, code) -> None:  # type: ignore[no-untyped-def]
    headers = bearer("finance-tool")
    if isinstance(body, str):
        response = scoped.post("/api/duplicates/approve", data=body, headers={**headers, "Content-Type": "application/json"})
    else:
        response = scoped.post("/api/duplicates/approve", json=body, headers=headers) if body is not None else scoped.post("/api/duplicates/approve", headers=headers)
    assert response.status_code == status and response.get_json()["error"] == code
    assert stripe_api.refund_creates == 0 and ledger.count(AuditEntry, AuditEntry.action == "approve") == 0


# -- words and timestamps in the API, the CSV and the CLI ----------------------------------


def _has_offset(text: str) -> bool:
    return text.endswith("+00:00") and datetime.fromisoformat(text).utcoffset() is not None


def test_api_has_reason_text_and_timestamps_with_offset(web, queue) -> None:  # type: ignore[no-untyped-def]
    api = web  # the same app; the API needs the bearer token
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    listing = api.get("/api/duplicates?reason=no_clear_duplicate", headers=auth).get_json()
    (case,) = listing["cases"]
    assert case["review_reasons"][0].startswith("no_clear_duplicate: ")  # the code stays
    assert case["reasons"][0] == {"code": "no_clear_duplicate", "text": "2 charges hold 65.00 USD but none repeats another; a person must decide."}
    assert case["reason_text"] == "2 charges hold 65.00 USD but none repeats another; a person must decide."
    assert _has_offset(case["opened_at"]) and _has_offset(case["updated_at"])
    assert all(_has_offset(c["created_at"]) for c in case["charges"])
    clear = api.get(f"/api/duplicates/{queue['ord_a']}", headers=auth).get_json()
    assert clear["bulk_approvable"] is True and clear["reason_text"].startswith("Clear duplicate: refunding 49.99 USD")
    assert all(_has_offset(e["at"]) for e in clear["audit"])
    runs = api.get("/api/runs", headers=auth).get_json()["data"]
    assert runs and all(_has_offset(r["started_at"]) and _has_offset(r["finished_at"]) for r in runs)
    # sorted and filtered like the page
    amounts = [c["excess"] for c in api.get("/api/duplicates?sort=amount&dir=desc&currency=usd", headers=auth).get_json()["cases"]]
    assert amounts[0] == {"usd": 4999} and amounts[-1] == {"usd": 1000}


def test_csv_report_has_reason_text_and_timestamps_with_offset(web, queue) -> None:  # type: ignore[no-untyped-def]
    login(web, VIEWER)
    text = web.get("/review/report.csv?since=2000-01-01").get_data(as_text=True)
    rows_ = list(csv.DictReader(io.StringIO(text)))
    assert len(rows_) == 10 and list(rows_[0])[-1] == "reason_text"
    by_order = {r["order_id"]: r for r in rows_}
    assert by_order["ord_d"]["reason_text"] == "2 charges hold 65.00 USD but none repeats another; a person must decide."
    assert by_order["ord_d"]["review_reasons"].startswith("no_clear_duplicate: ")
    assert by_order["ord_c"]["reason_text"].startswith("Clear duplicate: refunding 5,000 JPY")
    for row in rows_:
        assert _has_offset(row["opened_at"]) and _has_offset(row["charge_created_at"])


def test_cli_review_list_and_show_speak_in_words(settings, queue, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    runner = CliRunner()
    listed = runner.invoke(cli, ["review", "list"])
    assert listed.exit_code == 0, listed.output
    assert "2 charges hold 65.00 USD but none repeats another; a person must decide." in listed.output
    assert "no_clear_duplicate" not in listed.output
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00", listed.output)
    shown = runner.invoke(cli, ["review", "show", str(queue["ord_c"])])
    assert shown.exit_code == 0, shown.output
    assert "why: Clear duplicate: refunding 5,000 JPY leaves the order holding its total of 5,000 JPY; ready to approve." in shown.output
    assert "visa ···· 4242" in shown.output
    assert re.search(r"opened \d{4}-\d\d-\d\dT[\d:.]+\+00:00", shown.output)


def test_order_and_event_views_have_timestamps_with_offset(web, queue) -> None:  # type: ignore[no-untyped-def]
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    order = web.get("/api/orders/ord_a", headers=auth).get_json()
    assert _has_offset(order["created_at"]) and _has_offset(order["updated_at"])


def test_alerts_speak_in_major_units_and_words(session_factory, queue) -> None:  # type: ignore[no-untyped-def]
    from domain.cases.lifecycle import CaseAction
    from jobs.alerts import pending_alerts
    from models import run_in_transaction

    def record(session) -> None:  # type: ignore[no-untyped-def]
        session.add(RefundAttempt(
            idempotency_key="dup-refund-ch_alert-1", charge_id="ch_alert", n=1, case_id=queue["ord_c"], order_id="ord_c",
            amount=5000, currency="jpy", origin="finance", status="failed", error="Stripe refused the refund: no", calls=1,
        ))
        session.add(AuditEntry(
            actor="reconciler", action=CaseAction.RETURN_TO_REVIEW.value, case_id=queue["ord_d"],
            note="refund_skipped: ch_x: the charge holds 0.00 USD at Stripe; the attempt wanted 15.00 USD; "
                 "still_over_total: after its refunds the order still holds 15.00 USD more than it should",
        ))

    run_in_transaction(session_factory, record)
    with session_factory() as session:
        alerts = {a.key.split(":")[0]: a for a in pending_alerts(session)}
    failed = alerts["refund-failed"]
    assert failed.subject == "Refund failed: 5,000 JPY on ch_alert" and "The refund of 5,000 JPY on ch_alert" in failed.body
    returned = alerts["case-returned_to_review"]
    assert "The refund on ch_x was not sent: the charge holds 0.00 USD at Stripe; the attempt wanted 15.00 USD." in returned.body
    assert "After its refunds the order still holds 15.00 USD more than it should." in returned.body
    assert "refund_skipped" not in returned.body and "still_over_total" not in returned.body
