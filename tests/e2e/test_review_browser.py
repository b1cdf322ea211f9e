"""End to end in a real browser: a finance approver logs in to ``reconciler serve`` (a real
process on http://127.0.0.1), finds the open case on /review, opens it and approves the
proposed refund; the Stripe emulator (stripe-stateful-mock, a real Node process on
127.0.0.1) then holds exactly one refund, on the duplicate charge.

The browser is Debian's chromium at /usr/bin/chromium driven by Playwright; no browser is
ever downloaded (``scripts/setup-dev.sh`` installs the Debian package). The login runs
over plain http to 127.0.0.1 with ``DEV_ALLOW_HTTP_LOOPBACK=true``, so this also shows
that the session cookie works there (it is Secure everywhere else; see app/web_security.py).

The case is seeded as in production: two 49.99 charges for one order at the emulator,
their ``charge.succeeded`` webhooks (signed, built from the emulator's own charge JSON),
the order through the JSON API, and ``reconciler reconcile --mode review`` as a process.

A full-page screenshot of the review list is saved to ``artifacts/review-page.png``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import stripe
from werkzeug.security import generate_password_hash

from tests import stripe_payloads as p
from tests.emulator import StatefulMock
from tests.e2e import merchant
from tests.servers import ROOT, reconciler_serve

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts"
SECRET = "whsec_review_browser_0123456789abcdef"
TOKEN = "e2e-review-browser-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USERNAME = "finance-approver"
PASSWORD = "browser test password 0123"

if not CHROMIUM.exists():
    pytest.skip(
        "needs Debian's chromium at /usr/bin/chromium (scripts/setup-dev.sh installs it); "
        "the test never downloads a browser",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def emulator() -> Iterator[StatefulMock]:
    with StatefulMock() as mock:
        yield mock


@pytest.fixture
def env(emulator: StatefulMock, database_url: str) -> dict[str, str]:
    password_hash = generate_password_hash(PASSWORD)  # werkzeug's default; weak hashes are refused
    return {
        "DATABASE_URL": database_url,
        "STRIPE_API_KEY": p.new_id("sk_test"),
        "STRIPE_API_BASE": emulator.base_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_MAX_NETWORK_RETRIES": "0",
        "API_TOKEN": TOKEN,
        "SECRET_KEY": "review-browser-secret-key-0123456789abcdef",
        "REVIEW_USERS": f"{USERNAME}:approver:{password_hash}",
        # The service is on plain http://127.0.0.1: the session cookie may go without
        # Secure only with this development setting (README, Security).
        "DEV_ALLOW_HTTP_LOOPBACK": "true",
        "REFUND_MODE": "review",
        "BACKFILL_DAYS": "1",
        "LOG_LEVEL": "WARNING",
    }


def _environ(env: dict[str, str]) -> dict[str, str]:
    """Our subprocesses' environment: no alert targets (nothing may leave 127.0.0.1), no
    proxies for loopback, no stray Stripe or review settings."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ALERT_", "SMTP_", "STRIPE_", "REFUND_", "BACKFILL_", "DUPLICATE_", "AUTO_REFUND_", "REVIEW_"))
    }
    base["NO_PROXY"] = base["no_proxy"] = "127.0.0.1,localhost"
    return {**base, "PYTHONPATH": str(ROOT), **env}


@pytest.fixture
def service(env: dict[str, str], session_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:  # type: ignore[no-untyped-def]
    # reconciler_serve layers env over os.environ: keep stray alert settings out.
    for key in list(os.environ):
        if key.startswith(("ALERT_", "SMTP_", "REVIEW_")):
            monkeypatch.delenv(key)
    with reconciler_serve(["--workers", "1", "--no-migrate"], env, tmp_path / "serve.log") as base:
        yield base


@pytest.fixture
def checkout(emulator: StatefulMock, env: dict[str, str]) -> stripe.StripeClient:
    return merchant.emulator_client(env["STRIPE_API_KEY"], emulator.base_url)


def deliver(service: str, charge_json: dict[str, Any]) -> None:
    merchant.deliver(service, charge_json, SECRET)


def reconcile_for_review(env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "cli", "reconcile", "--mode", "review", "--json"],
        cwd=ROOT,
        env=_environ(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return json.loads(result.stdout)


def test_an_approver_approves_a_double_click_in_the_browser_and_the_emulator_refunds_once(service, checkout, env) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect, sync_playwright

    order_id = f"ord_{p.new_id('b')[2:14].lower()}"
    first, second = merchant.charge(checkout, order_id, 4999), merchant.charge(checkout, order_id, 4999)
    for charge_json in (first, second):
        deliver(service, charge_json)
    response = requests.post(f"{service}/api/orders", json={"id": order_id, "amount": 4999, "currency": "usd"}, headers=AUTH, timeout=10)
    assert response.status_code in (200, 201), response.text
    run = reconcile_for_review(env)
    assert run["status"] == "succeeded" and run["errors"] == [], run
    cases = requests.get(f"{service}/api/duplicates?status=open", headers=AUTH, timeout=10).json()["cases"]
    (case,) = [c for c in cases if c["order_id"] == order_id]
    keeper = case["keeper_charge_id"]
    (duplicate,) = [c["id"] for c in case["charges"] if c["id"] != keeper]
    assert {keeper, duplicate} == {first["id"], second["id"]}

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--no-proxy-server"], headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{service}/review")
            assert page.url.startswith(f"{service}/review/login?next=/review")

            page.get_by_label("Username").fill(USERNAME)
            page.get_by_label("Password").fill("not the password")
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("alert")).to_have_text("Invalid username or password")

            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("heading", name="Duplicate charge cases")).to_be_visible()
            # The queue: one row per case; the charges are on the case's page.
            row = page.locator("table.queue tr.case", has_text=order_id)
            expect(row).to_contain_text("open")
            expect(row).to_contain_text("49.99 USD")
            page.screenshot(path=str(ARTIFACTS / "review-page.png"), full_page=True)

            row.get_by_role("link", name=f"Case {case['id']}", exact=True).click()
            expect(page.get_by_role("heading", level=1)).to_contain_text(f"Case {case['id']}")
            expect(page.locator("table.charges")).to_contain_text(duplicate)
            page.get_by_role("button", name="Approve the proposed refund").click()
            expect(page.get_by_role("status")).to_contain_text("1 refund(s) issued; case is now refunded")
            expect(page.locator("h1 .status")).to_have_text("refunded")
            expect(page.locator("table.audit")).to_contain_text(USERNAME)
            page.screenshot(path=str(ARTIFACTS / "review-case-approved.png"), full_page=True)

            # The session cookie the browser holds: HttpOnly, Lax, not Secure on plain http to loopback.
            (cookie,) = page.context.cookies()
            assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]
        finally:
            browser.close()

    refunds = {cid: list(checkout.v1.refunds.list(params={"charge": cid}).data) for cid in (keeper, duplicate)}
    assert refunds[keeper] == []
    (refund,) = refunds[duplicate]
    assert refund.amount == 4999 and refund.reason == "duplicate" and refund.status == "succeeded"
    assert (ARTIFACTS / "review-page.png").stat().st_size > 10_000
