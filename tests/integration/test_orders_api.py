"""/api/orders, /api/events and `reconciler orders import`."""

from __future__ import annotations

import pytest

from cli import main as cli
from models import Order
from tests import stripe_payloads as p


def test_api_requires_the_bearer_token(client) -> None:  # type: ignore[no-untyped-def]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="}):
        response = client.get("/api/orders/ord_1", headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"] == "unauthorized"


def test_create_update_and_read_an_order(client, api_headers, ledger) -> None:  # type: ignore[no-untyped-def]
    body = {"id": "ord_100", "amount": 4999, "currency": "USD", "customer": "cus_42"}
    created = client.post("/api/orders", json=body, headers=api_headers)
    assert created.status_code == 201
    assert created.get_json()["amount"] == 4999 and created.get_json()["currency"] == "usd"
    again = client.post("/api/orders", json=body, headers=api_headers)
    assert again.status_code == 200
    changed = client.post("/api/orders", json={**body, "amount": 5999}, headers=api_headers)
    assert changed.status_code == 200 and changed.get_json()["amount"] == 5999
    view = client.get("/api/orders/ord_100", headers=api_headers).get_json()
    assert view["amount"] == 5999 and view["customer"] == "cus_42" and view["status"] == "pending"
    assert view["charges"] == []


def test_amount_and_currency_freeze_once_an_order_is_paid(client, api_headers, deliver, ledger) -> None:  # type: ignore[no-untyped-def]
    client.post("/api/orders", json={"id": "ord_f", "amount": 4999, "currency": "usd"}, headers=api_headers)
    deliver(p.event("charge.succeeded", p.charge(amount=4999, metadata={"order_id": "ord_f"})))
    for change in ({"amount": 9998}, {"currency": "eur"}):
        response = client.post("/api/orders", json={"id": "ord_f", "amount": 4999, "currency": "usd", **change}, headers=api_headers)
        assert response.status_code == 409
        assert response.get_json()["error"] == "order_amount_frozen"
    order = ledger.get(Order, "ord_f")
    assert (order.amount, order.currency) == (4999, "usd")
    # The same values, or a new customer, are still fine.
    same = client.post("/api/orders", json={"id": "ord_f", "amount": 4999, "currency": "usd", "customer": "cus_9"}, headers=api_headers)
    assert same.status_code == 200
    view = same.get_json()
    assert view["status"] == "paid" and view["charges"][0]["amount"] == 4999


def test_unknown_total_of_a_paid_order_can_be_set_once(client, api_headers, deliver) -> None:  # type: ignore[no-untyped-def]
    deliver(p.event("charge.succeeded", p.charge(amount=2500, metadata={"order_id": "ord_u"})))
    response = client.post("/api/orders", json={"id": "ord_u", "amount": 2500, "currency": "usd"}, headers=api_headers)
    assert response.status_code == 200 and response.get_json()["amount"] == 2500
    frozen = client.post("/api/orders", json={"id": "ord_u", "amount": 5000, "currency": "usd"}, headers=api_headers)
    assert frozen.status_code == 409


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"amount": 100, "currency": "usd"}, "invalid_order_id"),
        ({"id": "", "amount": 100, "currency": "usd"}, "invalid_order_id"),
        ({"id": "a b", "amount": 100, "currency": "usd"}, "invalid_order_id"),
        ({"id": "x" * 300, "amount": 100, "currency": "usd"}, "invalid_order_id"),
        ({"id": 12, "amount": 100, "currency": "usd"}, "invalid_order_id"),
        ({"id": "o1", "amount": 49.99, "currency": "usd"}, "invalid_amount"),
        ({"id": "o1", "amount": "4999", "currency": "usd"}, "invalid_amount"),
        ({"id": "o1", "amount": True, "currency": "usd"}, "invalid_amount"),
        ({"id": "o1", "amount": -5, "currency": "usd"}, "invalid_amount"),
        ({"id": "o1", "amount": 0, "currency": "usd"}, "invalid_amount"),
        ({"id": "o1", "amount": 10**15, "currency": "usd"}, "invalid_amount"),
        ({"id": "o1", "amount": 12345, "currency": "kwd"}, "invalid_amount"),
        ({"id": "o1", "amount": 100}, "invalid_currency"),
        ({"id": "o1", "amount": 100, "currency": "dollars"}, "invalid_currency"),
        ({"id": "o1", "amount": 100, "currency": "usd", "customer": 7}, "invalid_customer"),
        ({"id": "o1", "amount": 100, "currency": "usd", "total": 100}, "unknown_field"),
        ({"id": "o1", "amount": 100, "currency": "usd", "customer": "a\x00b"}, "invalid_customer"),
        ({"id": "o1", "amount": 100, "currency": "usd", "customer": "\ud800"}, "invalid_customer"),
    ],
)
def test_bad_order_input_is_400_and_changes_nothing(client, api_headers, ledger, body, code) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/api/orders", json=body, headers=api_headers)
    assert response.status_code == 400
    assert response.get_json()["error"] == code
    assert ledger.count(Order) == 0


@pytest.mark.parametrize("data", [b"not json", b"[1]", b"null", b'"x"', b""])
def test_non_object_body_is_400(client, api_headers, data) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/api/orders", data=data, headers={**api_headers, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_json"


def test_deeply_nested_json_is_400(client, api_headers) -> None:  # type: ignore[no-untyped-def]
    body = b"[" * 20000 + b"]" * 20000
    response = client.post("/api/orders", data=body, headers={**api_headers, "Content-Type": "application/json"})
    assert response.status_code == 400


def test_nul_in_a_path_is_404(client, api_headers) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/api/orders/a%00b", headers=api_headers).status_code == 404
    assert client.get("/api/events/evt_%00", headers=api_headers).status_code == 404


def test_unknown_order_and_event_are_404(client, api_headers) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/api/orders/nope", headers=api_headers).get_json()["error"] == "order_not_found"
    assert client.get("/api/events/evt_nope", headers=api_headers).status_code == 404


def test_event_status_is_visible(client, api_headers, deliver) -> None:  # type: ignore[no-untyped-def]
    event = p.event("charge.succeeded", p.charge(metadata={"order_id": "ord_e"}), account="acct_1Abc")
    deliver(event)
    view = client.get(f"/api/events/{event['id']}", headers=api_headers).get_json()
    assert view["status"] == "applied" and view["type"] == "charge.succeeded"
    assert view["account"] == "acct_1Abc" and view["object_id"] == event["data"]["object"]["id"]


# -- CSV import ----------------------------------------------------------------------------


@pytest.fixture
def runner(app, settings, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    return app.test_cli_runner()


def test_orders_import(runner, tmp_path, ledger) -> None:  # type: ignore[no-untyped-def]
    csv_file = tmp_path / "orders.csv"
    csv_file.write_text("order_id,amount,currency,customer\nord_a,4999,usd,cus_1\nord_b,5000,JPY,\n")
    result = runner.invoke(cli, ["orders", "import", str(csv_file)])
    assert result.exit_code == 0, result.output
    assert "2 created" in result.output
    assert (ledger.get(Order, "ord_b").amount, ledger.get(Order, "ord_b").currency) == (5000, "jpy")
    assert ledger.get(Order, "ord_a").amount_source == "import"
    again = runner.invoke(cli, ["orders", "import", str(csv_file)])
    assert "2 unchanged" in again.output


def test_orders_import_is_all_or_nothing(runner, tmp_path, ledger) -> None:  # type: ignore[no-untyped-def]
    csv_file = tmp_path / "orders.csv"
    csv_file.write_text("order_id,amount,currency\nord_ok,100,usd\nord_bad,49.99,usd\nord_dup,1,usd\nord_dup,2,usd\n")
    result = runner.invoke(cli, ["orders", "import", str(csv_file)])
    assert result.exit_code != 0
    assert "line 3" in result.output and "line 5" in result.output
    assert ledger.count(Order) == 0


def test_orders_import_refuses_to_change_a_paid_order(runner, tmp_path, deliver, ledger, client, api_headers) -> None:  # type: ignore[no-untyped-def]
    client.post("/api/orders", json={"id": "ord_paid", "amount": 4999, "currency": "usd"}, headers=api_headers)
    deliver(p.event("charge.succeeded", p.charge(amount=4999, metadata={"order_id": "ord_paid"})))
    csv_file = tmp_path / "orders.csv"
    csv_file.write_text("order_id,amount,currency\nord_new,100,usd\nord_paid,9998,usd\n")
    result = runner.invoke(cli, ["orders", "import", str(csv_file)])
    assert result.exit_code != 0 and "nothing imported" in result.output
    assert ledger.get(Order, "ord_new") is None
    assert ledger.get(Order, "ord_paid").amount == 4999


def test_event_listing_supports_only_the_failed_filter(client, api_headers) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/api/events?status=failed", headers=api_headers).get_json() == {"data": []}
    response = client.get("/api/events", headers=api_headers)
    assert response.status_code == 400 and response.get_json()["error"] == "unsupported_filter"
