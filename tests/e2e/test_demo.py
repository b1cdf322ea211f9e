"""`reconciler demo` runs to completion, quickly, and its summary is what the database holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from models import Charge, DuplicateCase, Refund, StripeEvent, make_engine, make_session_factory

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stripe_choice", ["simulated", "auto"])
def test_demo_summary_matches_the_database(tmp_path: Path, stripe_choice: str) -> None:
    database = tmp_path / "demo.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "ALERT_", "SMTP_", "DATABASE_URL", "REVIEW_", "REFUND_"))}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--json", "--stripe", stripe_choice, "--database", str(database)],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert elapsed < 120
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Review page: http://127.0.0.1:" in result.stdout and summary["password"] in result.stdout

    engine = make_engine(f"sqlite:///{database}")
    try:
        with make_session_factory(engine)() as session:
            cases = {c.order_id: c.status for c in session.scalars(select(DuplicateCase))}
            refunds = list(session.scalars(select(Refund).where(Refund.status == "succeeded")))
            events = session.scalar(select(func.count()).select_from(StripeEvent))
            charges = session.scalar(select(func.count()).select_from(Charge))
    finally:
        engine.dispose()
    assert summary["cases"] == cases
    assert cases == {"demo-double-click": "refunded", "demo-two-tabs": "refunded", "demo-triple-yen": "refunded", "demo-overpaid": "open"}
    by_currency: dict[str, int] = {}
    for refund in refunds:
        assert refund.origin == "auto" and refund.reason == "duplicate"
        by_currency[refund.currency] = by_currency.get(refund.currency, 0) + refund.amount
    assert summary["refunded_by_currency"] == by_currency == {"usd": 4999, "eur": 12000, "jpy": 10000}
    assert sorted(r["refund_id"] for r in summary["refunds"]) == sorted(r.id for r in refunds)
    assert summary["events_processed"] == events == 11 and summary["events_duplicate"] == 1
    assert summary["charges_in_ledger"] == charges == 12
