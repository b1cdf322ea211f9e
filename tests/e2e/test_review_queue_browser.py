"""End to end in a real browser: the review queue with 120 cases. ``reconciler serve`` and
the Stripe emulator (stripe-stateful-mock) run as real processes on 127.0.0.1, started as
in tests/e2e/test_review_browser.py (whose fixtures this module shares).

Seeded as in production, through signed ``charge.succeeded`` webhooks, the orders API and
``reconciler reconcile --mode review``:

* 3 double clicks charged at the emulator (12.34, 23.45 and 34.56 USD): clear cases;
* 117 more cases from webhooks alone (charges the emulator never saw, so nobody may
  approve them here): 40 with no charge repeating another (50.00 + 15.00 USD against a
  50.00 total), 40 with an unknown total, 37 clear double clicks in USD, EUR and JPY.

The approver then sees 100 rows of 120, sorts by the excess column, filters by a reason,
and approves the 3 emulator cases with "approve selected": exactly 3 refunds at the
emulator (one per duplicate charge, none on a keeper) and 3 approve entries in the audit
log. A layout check in the page asserts that no id, amount or card text wraps.

Screenshots: ``artifacts/review-queue.png`` (the table of 100+ cases, full page),
``artifacts/review-queue-top.png`` (the first screen, as in the README) and
``artifacts/review-bulk-approved.png`` (the result of the bulk approval).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from models import AuditEntry
from tests import stripe_payloads as p
from tests.e2e import merchant
from tests.e2e.test_review_browser import (  # noqa: F401 (fixtures)
    ARTIFACTS,
    AUTH,
    CHROMIUM,
    PASSWORD,
    SECRET,
    USERNAME,
    checkout,
    deliver,
    emulator,
    env,
    reconcile_for_review,
    service,
)

pytestmark = pytest.mark.e2e

# Run in the page: every id, amount, currency, status and card text of the queue must sit
# on one line (an inline box has one client rect per line it spans).
NO_WRAP_CHECK = """() => {
  const selectors = ['table.queue td.id a', 'table.queue td.id code', 'table.queue td.amount .money',
                     'table.queue td.card span', 'table.queue td.nowrap span', 'table.queue .status',
                     'table.totals td.num'];
  const wrapped = [];
  let checked = 0;
  for (const el of document.querySelectorAll(selectors.join(','))) {
    checked += 1;
    const lines = el.tagName === 'TD' ? (el.scrollHeight > el.clientHeight + 1 ? 2 : 1) : el.getClientRects().length;
    if (lines !== 1) wrapped.push(el.textContent.trim());
  }
  return {checked, wrapped};
}"""


def _synthetic_charge(order_id: str, amount: int, currency: str = "usd", created: int | None = None) -> dict[str, Any]:
    return p.charge(
        amount=amount, currency=currency, metadata={"order_id": order_id}, created=created,
        api_version=p.LEGACY_API_VERSION, brand="mastercard", last4="4444",
    )


def _order(service: str, order_id: str, amount: int, currency: str = "usd") -> None:
    response = requests.post(
        f"{service}/api/orders", json={"id": order_id, "amount": amount, "currency": currency}, headers=AUTH, timeout=10
    )
    assert response.status_code in (200, 201), response.text


def _seed(service: str, checkout) -> dict[str, tuple[str, str]]:  # type: ignore[no-untyped-def]
    """The 120 cases; returns the emulator orders: {order id: (first charge, second charge)}."""
    real: dict[str, tuple[str, str]] = {}
    for n, amount in enumerate((1234, 2345, 3456)):
        order_id = f"ord_real_{n}_{p.new_id('x')[2:8].lower()}"
        first, second = merchant.charge(checkout, order_id, amount), merchant.charge(checkout, order_id, amount)
        for charge_json in (first, second):
            deliver(service, charge_json)
        _order(service, order_id, amount)
        real[order_id] = (first["id"], second["id"])
    # The 117 others, their kinds taking turns (so any page of the queue shows a mix).
    tag = p.new_id("s")[2:8].lower()
    turns = [(kind, i) for i in range(40) for kind in ("mix", "unknown", "clear") if kind != "clear" or i < 37]
    assert len(turns) == 117
    for k, (kind, index) in enumerate(turns):
        order_id = f"ord_{tag}_{k:03d}"
        if kind == "mix":  # no charge repeats another
            _order(service, order_id, 5000)
            deliver(service, _synthetic_charge(order_id, 5000))
            deliver(service, _synthetic_charge(order_id, 1500))
        elif kind == "unknown":  # the total is unknown
            for _ in range(2):
                deliver(service, _synthetic_charge(order_id, 2000 + index))
        else:  # clear, in three currencies
            currency, amount = (("usd", 1000 + index), ("eur", 900 + index), ("jpy", 300 + index))[index % 3]
            _order(service, order_id, amount, currency)
            for _ in range(2):
                deliver(service, _synthetic_charge(order_id, amount, currency))
    return real


def _major(text: str) -> Decimal:
    number, _, _ = text.strip().partition(" ")
    return Decimal(number.replace(",", ""))


def test_the_queue_with_120_cases_sorts_filters_and_approves_three_in_bulk(service, checkout, env, session_factory) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect, sync_playwright

    real = _seed(service, checkout)
    run = reconcile_for_review(env)
    assert run["status"] == "succeeded" and run["errors"] == [], run
    listing = requests.get(f"{service}/api/duplicates?per_page=200", headers=AUTH, timeout=30).json()
    assert listing["total"] == 120
    real_cases = {c["order_id"]: c for c in listing["cases"] if c["order_id"] in real}
    assert len(real_cases) == 3 and all(c["bulk_approvable"] for c in real_cases.values())

    ARTIFACTS.mkdir(exist_ok=True)
    docs_image = ARTIFACTS / "review-queue-top.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--no-proxy-server"], headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{service}/")  # "/" leads to the queue, through the login
            page.get_by_label("Username").fill(USERNAME)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("heading", name="Duplicate charge cases")).to_be_visible()
            assert page.url == f"{service}/review"

            # 100 rows of 120, the totals of all 120 on top
            rows = page.locator("table.queue tbody tr.case")
            expect(rows).to_have_count(100)
            expect(page.get_by_text("120 case(s) match")).to_be_visible()
            expect(page.locator("table.totals")).to_contain_text("USD")
            expect(page.locator("table.totals")).to_contain_text("JPY")
            layout = page.evaluate(NO_WRAP_CHECK)
            assert layout["checked"] > 500 and layout["wrapped"] == [], layout
            page.screenshot(path=str(docs_image))
            page.screenshot(path=str(ARTIFACTS / "review-queue.png"), full_page=True)

            # narrower: ids and amounts still do not wrap (the reason text does)
            page.set_viewport_size({"width": 1100, "height": 900})
            layout = page.evaluate(NO_WRAP_CHECK)
            assert layout["wrapped"] == [], layout
            page.set_viewport_size({"width": 1400, "height": 900})

            # sort by the excess column: click its header, then again for descending
            page.locator("table.queue thead").get_by_role("link", name="Excess").click()
            expect(page.locator('th[aria-sort="ascending"]')).to_contain_text("Excess")
            values = [_major(t) for t in page.locator("table.queue td.amount .money").all_inner_texts()]
            assert len(values) == 100 and values == sorted(values)
            page.locator("table.queue thead").get_by_role("link", name="Excess").click()
            expect(page.locator('th[aria-sort="descending"]')).to_contain_text("Excess")
            values = [_major(t) for t in page.locator("table.queue td.amount .money").all_inner_texts()]
            # the largest number first: 335 JPY (major units decide, whatever the currency)
            assert values == sorted(values, reverse=True) and values[0] == Decimal("335")

            # filter by reason (keyboard: the select and the Filter button are plain form controls)
            page.get_by_label("Reason").select_option("no_clear_duplicate")
            page.get_by_role("button", name="Filter").click()
            expect(rows).to_have_count(40)
            assert "reason=no_clear_duplicate" in page.url
            for text in page.locator("table.queue td.reason").all_inner_texts():
                assert text == "2 charges hold 65.00 USD but none repeats another; a person must decide.", text
            expect(page.locator("table.queue input[name=case_id]")).to_have_count(0)  # none may go in bulk

            # the clear USD cases: tick the three the emulator charged, approve them together
            page.get_by_role("link", name="Clear", exact=True).click()
            page.get_by_label("Reason").select_option("clear")
            page.get_by_role("textbox", name="Currency").fill("usd")
            page.get_by_role("button", name="Filter").click()
            expect(rows).to_have_count(3 + 13)
            for case in real_cases.values():
                page.get_by_label(f"Select case {case['id']}", exact=True).check()
            page.get_by_role("button", name="Approve selected").click()
            results = page.locator("section.bulk-results")
            expect(results).to_contain_text("Approve selected: 3 approved and refunded.")
            for order_id, case in real_cases.items():
                amount = f"{case['excess']['usd'] // 100}.{case['excess']['usd'] % 100:02d} USD"
                expect(results).to_contain_text(f"Case {case['id']} (order {order_id}): approved: {amount} refunded; the case is now refunded.")
            expect(page.locator("li.bulk-refused")).to_have_count(0)
            page.screenshot(path=str(ARTIFACTS / "review-bulk-approved.png"), full_page=True)
            for case in real_cases.values():
                expect(page.locator(f'tr[data-case-id="{case["id"]}"] .status')).to_have_text("refunded")
        finally:
            browser.close()

    # exactly three refunds at the emulator: one per duplicate, none on a keeper
    refunded = []
    for order_id, (first, second) in real.items():
        case = real_cases[order_id]
        keeper = case["keeper_charge_id"]
        duplicate = second if keeper == first else first
        assert checkout.v1.refunds.list(params={"charge": keeper}).data == []
        (refund,) = checkout.v1.refunds.list(params={"charge": duplicate}).data
        assert refund.reason == "duplicate" and refund.status == "succeeded" and refund.amount == case["excess"]["usd"]
        refunded.append(refund.id)
    assert len(set(refunded)) == 3
    assert len(checkout.v1.refunds.list(params={"limit": 100}).data) == 3
    # and three audit entries, one per case, by the approver
    with session_factory() as db:
        approvals = list(db.execute(select(AuditEntry.case_id, AuditEntry.actor).where(AuditEntry.action == "approve")))
        assert sorted(approvals) == sorted((c["id"], USERNAME) for c in real_cases.values())
        assert db.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.action.in_(("approve", "auto_refund")))) == 3
    assert docs_image.stat().st_size > 20_000
    assert re.match(r"\d{4}-\d\d-\d\dT", listing["cases"][0]["opened_at"])
