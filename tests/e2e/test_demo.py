"""`reconciler demo` runs to completion, quickly, and its summary is what the database holds."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from models import Charge, DuplicateCase, Refund, StripeEvent, make_engine, make_session_factory
from models.money import format_money

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stripe_choice", ["simulated", "auto"])
def test_demo_summary_matches_the_database(tmp_path: Path, stripe_choice: str) -> None:
    database = tmp_path / "demo.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "ALERT_", "SMTP_", "DATABASE_URL", "REVIEW_", "REFUND_"))}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--json", "--stripe", stripe_choice, "--database", str(database)],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert elapsed < 120
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # Without --serve nothing stays up to log in to: no review URL, no password.
    assert "/review" not in result.stdout and "password" not in result.stdout.replace('"password": ""', "")
    assert summary["password"] == "" and summary["review_url"] == ""
    # Amounts in major units with the currency in capitals.
    assert "50.00 USD + 15.00 USD on a 50.00 USD order" in result.stdout and format_money(5000, "jpy") in result.stdout

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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_demo_stops_cleanly_on_a_signal_and_says_so(tmp_path: Path, signum: int) -> None:
    from tests.integration.test_supervisor import alive, descendants

    database = tmp_path / "kept.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "ALERT_", "SMTP_", "DATABASE_URL", "REVIEW_", "REFUND_"))}
    demo = subprocess.Popen(
        [sys.executable, "-m", "cli", "demo", "--serve", "--stripe", "simulated", "--database", str(database)],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C (or SIGTERM) stops it"):
                break
        output = "".join(lines)
        assert "The service keeps running: open http://127.0.0.1:" in output, output
        service = re.search(r"Service: (http://127\.0\.0\.1:\d+) \(log: (.+)/serve\.log\)", output)
        assert service is not None, output
        base, workdir = service.group(1), Path(service.group(2))
        assert workdir.is_dir() and requests.get(f"{base}/healthz", timeout=5).status_code == 200
        processes = descendants(demo.pid)
        assert processes  # the service (and its workers)

        demo.send_signal(signum)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    name = signal.Signals(signum).name
    assert demo.returncode == 0, output + rest
    assert "Traceback" not in rest
    assert f"Stopped by {name}: the service is stopped, the built-in simulated Stripe is stopped, the temporary folder {workdir} is deleted; the database is kept at {database}." in rest
    assert not workdir.exists()
    assert [pid for pid in processes if alive(pid)] == []
    with pytest.raises(requests.RequestException):
        requests.get(f"{base}/healthz", timeout=2)
    assert database.exists()
