"""`reconciler serve` on the embedded default, from nothing: migrates SQLite and answers."""

from __future__ import annotations

import os
import re

from models.migrate import head_revision

import requests
from sqlalchemy.orm import sessionmaker

from app import create_app
from cli import main as cli
from config import Settings
from models import make_engine
from tests import stripe_payloads as p
from tests.conftest import API_TOKEN, WEBHOOK_SECRET
from tests.servers import reconciler_serve, wait_until_applied


def test_serve_on_a_fresh_sqlite_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # No DATABASE_URL: the default, instance/reconciler.db under the working directory.
    env = {"STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET, "API_TOKEN": API_TOKEN, "DATABASE_URL": ""}
    with reconciler_serve([], env, tmp_path / "serve.log", cwd=tmp_path) as base:
        event = p.event("charge.succeeded", p.charge(amount=5000, currency="jpy", metadata={"order_id": "ord_srv"}))
        body = p.encode(event)
        response = requests.post(f"{base}/webhooks/stripe", data=body, headers={"Stripe-Signature": p.sign(body, WEBHOOK_SECRET)}, timeout=10)
        assert response.status_code == 200 and response.json()["status"] == "received"
        wait_until_applied(base, event["id"])  # by the applier process serve started
        order = requests.get(f"{base}/api/orders/ord_srv", headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10).json()
        assert order["totals"] == {"jpy": {"charged": 5000, "refunded": 0, "held": 5000}}
    assert (tmp_path / "instance" / "reconciler.db").exists()
    log = (tmp_path / "serve.log").read_text()
    # uvicorn, the default server, under its process manager: one worker per two cores
    workers = int(re.search(r"server config: server=uvicorn workers=(\d+) threads=8", log).group(1))  # type: ignore[union-attr]
    assert workers == max(1, min(8, (os.cpu_count() or 1) // 2))
    assert "Started parent process" in log and log.count("Started server process") == workers


def test_serve_refuses_an_unmigrated_database_unless_told(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    result = create_app(Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"})).test_cli_runner().invoke(
        cli, ["serve", "--no-migrate"]
    )
    assert result.exit_code != 0 and "reconciler db upgrade" in result.output


def test_db_upgrade_and_current(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'up.db'}")
    runner = create_app(Settings.from_env({})).test_cli_runner()
    assert runner.invoke(cli, ["db", "upgrade"]).exit_code == 0
    current = runner.invoke(cli, ["db", "current"])
    head = head_revision()
    assert f"current: {head}" in current.output and f"head: {head}" in current.output


def test_bad_setting_stops_the_cli_naming_the_variable(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("STRIPE_WEBHOOK_TOLERANCE", "soon")
    result = create_app(Settings.from_env({})).test_cli_runner().invoke(cli, ["db", "current"])
    assert result.exit_code == 2 and "STRIPE_WEBHOOK_TOLERANCE" in result.output


def test_healthz_is_503_when_the_database_is_unreachable(settings) -> None:  # type: ignore[no-untyped-def]
    unreachable = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    app = create_app(settings, session_factory=sessionmaker(bind=unreachable))
    response = app.test_client().get("/healthz")
    assert response.status_code == 503 and response.get_json()["status"] == "unavailable"


def test_healthz_is_200(client) -> None:  # type: ignore[no-untyped-def]
    health = client.get("/healthz").get_json()
    assert (health["status"], health["database"], health["applier"]) == ("ok", "ok", "idle")
    assert health["inbox"] == {"pending": 0, "failed": 0, "oldest_pending_seconds": None}


def test_reads_do_not_queue_behind_a_writer(client, api_headers, session_factory) -> None:  # type: ignore[no-untyped-def]
    """On SQLite every write transaction holds the database lock (BEGIN IMMEDIATE); reads
    begin DEFERRED and read their WAL snapshot instead of waiting for it."""
    import time

    from models import Order

    with session_factory() as writer, writer.begin():
        writer.add(Order(id="ord_locked", status="pending"))
        writer.flush()  # the write lock is now held until this block ends
        started = time.monotonic()
        assert client.get("/healthz").status_code == 200
        assert client.get("/api/orders/ord_locked", headers=api_headers).status_code == 404  # not committed
        assert time.monotonic() - started < 2
    assert client.get("/api/orders/ord_locked", headers=api_headers).status_code == 200
