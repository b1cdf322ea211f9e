"""No 500 for client input: ids beyond the id columns' range (2^31 on PostgreSQL, 2^63 anywhere), dates at the end of the calendar, Stripe ids
with a trailing newline, chunked webhook bodies over the limit; and the CSV report escapes
a formula in any column."""

from __future__ import annotations

import csv
import io

import pytest

from domain.cases.report import REPORT_COLUMNS, report_csv
from tests.conftest import API_TOKEN
from tests import stripe_payloads as p
from tests.integration.test_review_page import login, review_app, review_settings, token, web  # noqa: F401 (fixtures)

HUGE = str(2**64)  # beyond BIGINT: the database cannot even compare it
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.mark.parametrize("case_id", [HUGE, str(2**63), "9" * 40, str(2**31)])
def test_huge_case_ids_are_404_on_the_api(client, case_id) -> None:  # type: ignore[no-untyped-def]
    for method, path in [
        ("get", f"/api/duplicates/{case_id}"),
        ("post", f"/api/duplicates/{case_id}/refund"),
        ("post", f"/api/duplicates/{case_id}/dismiss"),
    ]:
        response = getattr(client, method)(path, headers=AUTH, json={"note": "n"} if method == "post" else None)
        assert response.status_code == 404, (path, response.status_code)
        assert response.is_json and response.get_json()["error"] in ("not_found", "case_not_found")
    # The largest id the column can hold is still just "not found".
    assert client.get(f"/api/duplicates/{2**31 - 1}", headers=AUTH).status_code == 404


def test_huge_case_ids_are_404_on_the_review_page(web) -> None:  # type: ignore[no-untyped-def]
    login(web)
    assert web.get(f"/review/cases/{HUGE}").status_code == 404
    csrf = token(web)
    for action in ("approve", "refund", "dismiss"):
        response = web.post(f"/review/cases/{HUGE}/{action}", data={"csrf_token": csrf, "note": "n"})
        assert response.status_code == 404, (action, response.status_code)


def test_dates_at_the_end_of_the_calendar_are_400(client, web) -> None:  # type: ignore[no-untyped-def]
    for query in ("until=9999-12-31", "from=9999-12-31", "until=0001-01-01"):
        response = client.get(f"/api/duplicates?{query}", headers=AUTH)
        assert response.status_code == 400 and response.get_json()["error"] == "invalid_date", query
    assert client.get("/api/duplicates?until=9998-12-31", headers=AUTH).status_code == 200
    login(web)
    assert web.get("/review?until=9999-12-31").status_code == 400
    assert web.get("/review/report.csv?since=2020-01-01&until=9999-12-31").status_code == 400
    assert web.get("/review/report.csv?since=9999-12-31").status_code == 400
    assert web.get("/review/report.csv?since=2020-01-01&until=9998-12-31").status_code == 200


@pytest.mark.parametrize(
    "body, code",
    [
        ({"payment_method": "pm_abc\n"}, "invalid_payment_method"),
        ({"payment_method": "card_abc\n"}, "invalid_payment_method"),
        ({"customer": "cus_abc\n"}, "invalid_customer"),
    ],
)
def test_stripe_ids_with_a_trailing_newline_are_refused(client, body, code) -> None:  # type: ignore[no-untyped-def]
    client.post("/api/orders", json={"id": "ord_nl", "amount": 100, "currency": "usd"}, headers=AUTH)
    response = client.post("/orders/ord_nl/pay", json=body, headers=AUTH)
    assert response.status_code == 400 and response.get_json()["error"] == code


def test_an_order_id_with_a_trailing_newline_is_no_order(client) -> None:  # type: ignore[no-untyped-def]
    client.post("/api/orders", json={"id": "ord_x", "amount": 100, "currency": "usd"}, headers=AUTH)
    response = client.post("/orders/ord_x%0A/pay", headers=AUTH)
    assert response.status_code == 404 and response.get_json()["error"] in ("not_found", "order_not_found")


def test_a_chunked_webhook_body_over_the_limit_is_413(client, settings) -> None:  # type: ignore[no-untyped-def]
    event = p.event("charge.succeeded", p.charge(metadata={"order_id": "ord_big", "pad": "x" * settings.webhook_max_bytes}))
    body = p.encode(event)
    assert len(body) > settings.webhook_max_bytes
    response = client.post(
        "/webhooks/stripe",
        input_stream=io.BytesIO(body),
        headers={"Transfer-Encoding": "chunked", "Stripe-Signature": p.sign(body, "whsec_test_primary_0123456789abcdef"),
                 "Content-Type": "application/json"},
        # What a server that reads chunked bodies (gunicorn) tells the app.
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413 and response.get_json()["error"] == "payload_too_large"


def test_the_csv_report_escapes_formulas_in_every_column() -> None:
    hostile = '=HYPERLINK("https://evil.test","refund")'
    row = {column: hostile for column in REPORT_COLUMNS}
    row.update(case_id="7", charge_amount="49.99", refunded="0.00")
    parsed = list(csv.DictReader(io.StringIO(report_csv([row]))))
    assert len(parsed) == 1
    for column in REPORT_COLUMNS:
        cell = parsed[0][column]
        if column in ("case_id", "charge_amount", "refunded"):
            assert cell == row[column]  # numbers stay numbers
        else:
            assert cell == "'" + hostile, column
    for prefix in ("+", "-", "@", "\t", "\r"):
        assert list(csv.reader(io.StringIO(report_csv([{**row, "charge_id": prefix + "cmd"}]))))[1][REPORT_COLUMNS.index("charge_id")] == "'" + prefix + "cmd"
