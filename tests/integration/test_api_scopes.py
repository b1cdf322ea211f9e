"""Scoped API tokens: each client's token opens only its part of the API, its name is the
actor in the audit log (X-Actor only adds a person beside it), the legacy API_TOKEN stays
a full-scope token with a warning at start, and /metrics needs a metrics token."""

from __future__ import annotations

import hashlib
import logging

import pytest
from click.testing import CliRunner

from app import create_app
from cli import main as cli
from config import Settings, SettingsError
from models import AuditEntry
from tests.conftest import API_TOKEN
from tests.integration.test_duplicates_api import open_cases, review_settings  # noqa: F401 (fixtures)

TOKENS = {
    "checkout": ("pay", "rt_checkout_token_0123456789abcdefghijklmnop"),
    "finance-tool": ("finance", "rt_finance_token_0123456789abcdefghijklmnopq"),
    "dashboard": ("read", "rt_read_token_0123456789abcdefghijklmnopqrstu"),
    "prometheus": ("metrics", "rt_metrics_token_0123456789abcdefghijklmnopq"),
}


def entries() -> tuple[tuple[str, str, str], ...]:
    return tuple(
        (name, scope, "sha256:" + hashlib.sha256(token.encode()).hexdigest()) for name, (scope, token) in TOKENS.items()
    )


def bearer(name: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][1]}", **extra}


@pytest.fixture
def scoped(review_settings, session_factory):  # type: ignore[no-untyped-def]
    """An app with the four scoped tokens and no legacy API_TOKEN."""
    app = create_app(review_settings.with_overrides(api_tokens=entries(), api_token=None), session_factory=session_factory)
    return app.test_client()


def test_a_pay_token_cannot_refund_dismiss_or_read_cases(scoped, open_cases, ledger) -> None:  # type: ignore[no-untyped-def]
    case_id = open_cases["ord_dc"]
    audit_before = ledger.count(AuditEntry)
    for method, path in [
        ("post", f"/api/duplicates/{case_id}/refund"),
        ("post", f"/api/duplicates/{case_id}/dismiss"),
        ("get", f"/api/duplicates/{case_id}"),
        ("get", "/api/duplicates"),
        ("get", "/api/runs"),
        ("get", "/metrics"),
    ]:
        response = getattr(scoped, method)(path, json={"note": "x"} if method == "post" else None, headers=bearer("checkout"))
        assert response.status_code == 403, (path, response.status_code)
        body = response.get_json()
        assert body["error"] == "insufficient_scope" and "checkout" in body["message"]
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    assert ledger.count(AuditEntry) == audit_before  # nothing was decided
    # ... but it does what the checkout backend needs.
    assert scoped.post("/api/orders", json={"id": "ord_new", "amount": 100, "currency": "usd"}, headers=bearer("checkout")).status_code == 201
    assert scoped.get("/api/orders/ord_new", headers=bearer("checkout")).status_code == 200
    assert scoped.post("/orders/no-such-order/pay", headers=bearer("checkout")).status_code == 404


def test_a_finance_token_decides_under_its_own_name(scoped, open_cases, ledger) -> None:  # type: ignore[no-untyped-def]
    case_id = open_cases["ord_over"]
    assert scoped.get(f"/api/duplicates/{case_id}", headers=bearer("finance-tool")).status_code == 200
    response = scoped.post(
        f"/api/duplicates/{case_id}/dismiss", json={"note": "customer kept both"}, headers=bearer("finance-tool", **{"X-Actor": "dana"})
    )
    assert response.status_code == 200
    other = open_cases["ord_dc"]
    assert scoped.post(f"/api/duplicates/{other}/dismiss", json={"note": "n"}, headers=bearer("finance-tool")).status_code == 200
    actors = {e.case_id: e.actor for e in ledger.all(AuditEntry, AuditEntry.action == "dismiss")}
    # The token's name is the actor; X-Actor only adds the person, it cannot replace it.
    assert actors == {case_id: "api:finance-tool (dana)", other: "api:finance-tool"}
    # Nor can it pose as another token: brackets are not accepted in the person's name.
    assert scoped.post("/api/orders", json={"id": "o", "amount": 1, "currency": "usd"}, headers=bearer("finance-tool")).status_code == 403
    assert scoped.post("/orders/o/pay", headers=bearer("finance-tool")).status_code == 403


def test_a_read_token_only_reads(scoped, open_cases) -> None:  # type: ignore[no-untyped-def]
    case_id = open_cases["ord_dc"]
    for path in ("/api/duplicates", f"/api/duplicates/{case_id}", "/api/runs", "/api/events?status=failed", "/api/orders/ord_dc"):
        assert scoped.get(path, headers=bearer("dashboard")).status_code == 200, path
    for path in (f"/api/duplicates/{case_id}/refund", f"/api/duplicates/{case_id}/dismiss", "/api/orders", "/orders/ord_dc/pay"):
        response = scoped.post(path, json={"note": "x"}, headers=bearer("dashboard"))
        assert response.status_code == 403 and response.get_json()["error"] == "insufficient_scope", path
    assert scoped.get("/metrics", headers=bearer("dashboard")).status_code == 403


def test_metrics_needs_a_metrics_token(scoped, client, settings, session_factory, api_headers) -> None:  # type: ignore[no-untyped-def]
    assert scoped.get("/metrics").status_code == 401
    assert scoped.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    response = scoped.get("/metrics", headers=bearer("prometheus"))
    assert response.status_code == 200 and b"reconciler_refunded_minor_units" in response.data
    assert scoped.get("/api/duplicates", headers=bearer("prometheus")).status_code == 403
    # The legacy full token scrapes too (client: API_TOKEN only); anonymous does not.
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=api_headers).status_code == 200
    # No token that could scrape: disabled.
    bare = create_app(settings.with_overrides(api_token=None), session_factory=session_factory).test_client()
    response = bare.get("/metrics")
    assert response.status_code == 404 and response.get_json()["error"] == "metrics_disabled"


def test_legacy_api_token_is_full_scope_with_a_warning(settings, session_factory, caplog, open_cases) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING):
        app = create_app(settings, session_factory=session_factory)
    assert any("API_TOKEN is deprecated" in r.getMessage() for r in caplog.records)
    client = app.test_client()
    legacy = {"Authorization": f"Bearer {API_TOKEN}"}
    assert client.get(f"/api/duplicates/{open_cases['ord_dc']}", headers=legacy).status_code == 200
    assert client.post("/api/orders", json={"id": "o1", "amount": 1, "currency": "usd"}, headers=legacy).status_code == 201
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_app(settings.with_overrides(api_token=None, api_tokens=entries()), session_factory=session_factory)
    assert not any("API_TOKEN is deprecated" in r.getMessage() for r in caplog.records)


def test_api_tokens_setting_and_the_cli_that_makes_them() -> None:
    result = CliRunner().invoke(cli, ["api-tokens", "create", "checkout", "pay"])
    assert result.exit_code == 0, result.output
    token = result.output.split("token:")[1].split()[0]
    entry = result.output.split("API_TOKENS entry:")[1].split()[0]
    assert token not in entry and entry == f"checkout:pay:sha256:{hashlib.sha256(token.encode()).hexdigest()}"
    settings = Settings.from_env({"API_TOKENS": f"{entry}\nops:metrics:sha256:{'a' * 64}"})
    assert [(n, s) for n, s, _ in settings.api_tokens] == [("checkout", "pay"), ("ops", "metrics")]
    assert "sha256" not in repr(settings)
    for bad in (
        "checkout:admin:sha256:" + "a" * 64,  # unknown scope
        "checkout:pay:" + "a" * 64,  # no algorithm
        "checkout:pay:pbkdf2:sha256:1$x$y",  # not what API_TOKENS takes
        f"a:pay:sha256:{'a' * 64},a:read:sha256:{'b' * 64}",  # a name twice
        f"a:pay:sha256:{'a' * 64},b:read:sha256:{'a' * 64}",  # a token twice
    ):
        with pytest.raises(SettingsError, match="API_TOKENS"):
            Settings.from_env({"API_TOKENS": bad})
    # Live mode accepts scoped tokens instead of API_TOKEN.
    live = {
        "STRIPE_LIVEMODE": "true",
        "STRIPE_API_KEY": "sk_live_x",
        "STRIPE_WEBHOOK_SECRET": "whsec_abc",
        "SECRET_KEY": "k" * 40,
        "API_TOKENS": entry,
    }
    assert Settings.from_env(live).api_token is None
