"""The operator's view of passes: the SQLite lease and its refusals, stop requests, progress
reports, the capped summary, the scheduler's heartbeat on /healthz and in ``reconciler
runs``."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from domain.stripe.gateway import StripeGateway
from jobs.progress import LogProgress
from jobs.lease import RunInProgress, exclusive_pass, holder_is_dead
from jobs.reconcile import PassAborted, run_reconciliation
from jobs.schedule_state import record_heartbeat, remove_heartbeat, schedule_view
from models import ReconciliationRun, RunLease, SchedulerHeartbeat, run_in_transaction


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def put_lease(session_factory, holder: str, minutes: int = 5) -> None:  # type: ignore[no-untyped-def]
    def write(session) -> None:  # type: ignore[no-untyped-def]
        session.add(RunLease(name="reconcile", holder=holder, expires_at=datetime.now(timezone.utc) + timedelta(minutes=minutes)))

    run_in_transaction(session_factory, write)


@pytest.fixture
def sqlite_only(is_postgres: bool) -> None:
    if is_postgres:
        pytest.skip("the lease row is the SQLite lock; PostgreSQL uses an advisory lock")


# -- the SQLite lease ------------------------------------------------------------------------


def test_holder_is_dead_only_for_a_gone_process_of_this_host() -> None:
    host = socket.gethostname()
    assert holder_is_dead(f"{host}:{dead_pid()}:abcd1234")
    assert not holder_is_dead(f"{host}:{os.getpid()}:abcd1234")  # this process
    assert not holder_is_dead(f"{host}:1:abcd1234")  # alive
    assert not holder_is_dead(f"another-host:{dead_pid()}:abcd1234")  # cannot tell: wait for expiry
    assert not holder_is_dead("garbage")


def test_lease_of_a_dead_holder_on_this_host_is_taken_over_at_once(session_factory, sqlite_only) -> None:  # type: ignore[no-untyped-def]
    put_lease(session_factory, f"{socket.gethostname()}:{dead_pid()}:deadbeef")
    with exclusive_pass(session_factory) as holder:
        with session_factory() as session:
            assert session.get(RunLease, "reconcile").holder == holder  # type: ignore[union-attr]


def test_lease_of_a_live_or_remote_holder_is_refused_saying_when_it_expires(session_factory, sqlite_only) -> None:  # type: ignore[no-untyped-def]
    for holder in (f"{socket.gethostname()}:1:cafe0001", "other-host:4242:cafe0002"):
        put_lease(session_factory, holder, minutes=4)
        with pytest.raises(RunInProgress) as refused:
            with exclusive_pass(session_factory):
                pass
        message = str(refused.value)
        assert holder in message and "the lease expires at" in message and "+00:00" in message
        run_in_transaction(session_factory, lambda s: s.query(RunLease).delete())


# -- stop requests -----------------------------------------------------------------------------


def test_a_stop_request_aborts_the_pass_at_its_next_checkpoint(session_factory, settings) -> None:  # type: ignore[no-untyped-def]
    offline = settings.with_overrides(stripe_api_key=None)
    with pytest.raises(PassAborted):
        run_reconciliation(session_factory, StripeGateway.from_settings(offline), offline, should_stop=lambda: "stop requested")
    with session_factory() as session:
        (run,) = session.scalars(select(ReconciliationRun)).all()
    assert run.status == "aborted" and run.errors == ["aborted: stop requested"] and run.finished_at is not None


def test_scheduler_pass_stopped_by_its_control_reports_aborted(session_factory, settings) -> None:  # type: ignore[no-untyped-def]
    from jobs.scheduler import PassControl, _wind_down, nightly_pass

    offline = settings.with_overrides(stripe_api_key=None)
    control = PassControl()
    control.should_stop = lambda: "the scheduler was stopped (SIGTERM)"  # type: ignore[method-assign]
    nightly_pass(offline, session_factory, StripeGateway.from_settings(offline), control=control)
    assert control.aborted and control.idle.is_set()
    record_heartbeat(session_factory, "here:1", next_pass_at=None, cron="0 2 * * *")
    assert _wind_down(control, session_factory, "here:1") == 1  # non-zero: a pass was aborted
    with session_factory() as session:
        (run,) = session.scalars(select(ReconciliationRun)).all()
        assert run.status == "aborted" and run.trigger == "schedule"
        assert session.scalars(select(SchedulerHeartbeat)).all() == []  # gone with the scheduler


def test_a_pass_that_does_not_stop_in_time_is_recorded_aborted_by_the_scheduler(session_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from jobs import scheduler as scheduler_module

    def stuck(session) -> int:  # type: ignore[no-untyped-def]
        run = ReconciliationRun(mode="review", status="running", trigger="schedule", counts={}, errors=[])
        session.add(run)
        session.flush()
        return run.id

    run_id = run_in_transaction(session_factory, stuck)
    control = scheduler_module.PassControl()
    control.idle.clear()  # the pass thread never comes back
    control.run_id = run_id
    control.stop_reason = "the scheduler was stopped (SIGTERM)"
    exits: list[int] = []
    monkeypatch.setattr(scheduler_module, "PASS_STOP_SECONDS", 0.1)
    monkeypatch.setattr(scheduler_module.os, "_exit", exits.append)
    scheduler_module._wind_down(control, session_factory, "here:1")
    assert exits == [1]
    with session_factory() as session:
        run = session.get(ReconciliationRun, run_id)
        assert run is not None and run.status == "aborted" and run.errors == ["aborted: the scheduler was stopped (SIGTERM)"]


# -- progress ----------------------------------------------------------------------------------


def test_log_progress_reports_each_phase_with_counts_and_rate(caplog) -> None:  # type: ignore[no-untyped-def]
    now = [0.0]
    progress = LogProgress(interval=2.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="reconciler.progress")
    for _ in range(5):
        now[0] += 1.0
        progress("backfill charges", 100)
    progress("detection", 0, 1200)
    now[0] += 3.0
    progress("detection", 500, 1200)
    progress.close()
    records = [(r.phase, r.done, r.total, r.finished) for r in caplog.records]  # type: ignore[attr-defined]
    assert records == [
        ("backfill charges", 300, None, False),
        ("backfill charges", 500, None, False),
        ("backfill charges", 500, None, True),
        ("detection", 500, 1200, False),
        ("detection", 500, 1200, True),
    ]
    assert caplog.records[2].rate_per_s == 125.0  # type: ignore[attr-defined]  # 500 since the first page, 4 s ago


def test_terminal_progress_draws_a_line_per_phase_with_counts_and_rate() -> None:
    import io

    from rich.console import Console

    from jobs.progress import TerminalProgress

    screen = io.StringIO()
    with TerminalProgress(Console(file=screen, force_terminal=True, width=120, color_system=None)) as progress:
        progress("backfill charges", 100)
        progress("backfill charges", 150)
        progress("detection", 0, 1200)
        progress("detection", 500, 1200)
        progress("detection", 700, 1200)
        progress("refunds", 0, 3)
        progress("refunds", 1, 3)
    last_frame = screen.getvalue().rsplit("\x1b[1A\x1b[2K", 1)[-1]
    lines = [line.split() for line in last_frame.splitlines() if line.strip("\x1b[?25h")]
    assert [(line[0], line[1], line[-3]) for line in lines[:1]] == [("✓", "backfill", "250/250")]
    assert [line[1] for line in lines] == ["backfill", "detection", "refunds"]
    assert "1200/1200" in lines[1] and lines[1][-2].endswith("/s")  # counts, then the rate
    assert "1/3" in lines[2]  # a counted phase keeps its total


def test_reconcile_off_a_terminal_writes_progress_as_json_lines(run_cli_env, session_factory) -> None:  # type: ignore[no-untyped-def]
    from cli import main as cli

    result = CliRunner().invoke(cli, ["reconcile", "--mode", "review"], env={**run_cli_env, "LOG_LEVEL": "INFO", "LOG_FORMAT": "json"})
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    progress = [line for line in lines if line["logger"] == "reconciler.progress"]
    assert [p["phase"] for p in progress] == ["detection"] and progress[0]["finished"] is True
    assert {"done", "total", "rate_per_s", "elapsed_s"} <= set(progress[0])


def test_stripe_request_logging_is_at_warning_unless_debug() -> None:
    from app.logs import configure_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json")
        assert logging.getLogger("stripe").level == logging.WARNING
        configure_logging("DEBUG", "json")
        assert logging.getLogger("stripe").level == logging.DEBUG
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("stripe").setLevel(logging.WARNING)


@pytest.fixture
def run_cli_env(settings) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"DATABASE_URL": settings.database_url, "STRIPE_API_KEY": "", "LOG_LEVEL": "ERROR"}


# -- the printed summary ---------------------------------------------------------------------


def test_the_printed_summary_lists_the_first_20_new_cases_and_points_to_the_rest(capsys) -> None:  # type: ignore[no-untyped-def]
    from cli import _print_summary

    summary = SimpleNamespace(
        run_id=7, mode="review", status="succeeded", watermark=None, warnings=[], errors=[],
        detection={"cases_opened": list(range(100, 125))},
        counts=lambda: {
            "charges_backfilled": 0, "refunds_backfilled": 0, "events_replayed": 0, "orders_examined": 25,
            "cases_opened": 25, "cases_resolved": 0, "refunds_issued": 0, "refunded_amounts": {},
            "refunds_failed": 0, "refunds_deferred": 0, "refunds_skipped": 0, "alerts_sent": 0,
        },
    )
    _print_summary(summary)
    out = capsys.readouterr().out
    assert "  new cases: " + ", ".join(str(i) for i in range(100, 120)) + "\n" in out
    assert "... and 5 more: see the review page (/review)" in out and "reconciler report --since" in out


def test_dry_run_plan_text_is_capped() -> None:
    from cli import plan_lines

    plan = [
        {"order_id": f"ord_{i:03}", "order_total": 100, "order_currency": "usd", "case_id": None, "step": "open",
         "action": "refund", "keeper_charge_id": "ch_k", "excess": {"usd": 100},
         "refunds": [{"charge_id": f"ch_{i}", "amount": 100, "currency": "usd"}], "releases": [], "reasons": []}
        for i in range(23)
    ]
    lines = plan_lines(plan, limit=20)
    assert lines[0] == "would act on 23 order(s):"
    assert sum(1 for line in lines if line.startswith("order ")) == 20
    assert lines[-1] == "... and 3 more order(s): `reconciler reconcile --mode dry-run --json` lists them all"
    assert len(plan_lines(plan)) == 1 + 2 * 23  # uncapped when asked


# -- when the next pass is due ---------------------------------------------------------------


def test_healthz_and_runs_show_the_next_pass(client, session_factory, settings) -> None:  # type: ignore[no-untyped-def]
    from cli import main as cli

    due = datetime(2031, 1, 2, 2, 0, tzinfo=timezone.utc)
    record_heartbeat(session_factory, "web-1:100", next_pass_at=due, cron="0 2 * * *")
    record_heartbeat(session_factory, "web-2:200", next_pass_at=due + timedelta(hours=1), cron="0 3 * * *")
    health = client.get("/healthz").get_json()
    assert (health["status"], health["scheduler"], health["next_pass_at"]) == ("ok", "running", "2031-01-02T02:00:00+00:00")
    result = CliRunner().invoke(cli, ["runs"], env={"DATABASE_URL": settings.database_url, "LOG_LEVEL": "ERROR"})
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "next pass: 2031-01-02T02:00:00+00:00 (scheduler running on web-1:100, web-2:200)"

    remove_heartbeat(session_factory, "web-1:100")
    remove_heartbeat(session_factory, "web-2:200")
    health = client.get("/healthz").get_json()
    assert (health["scheduler"], health["next_pass_at"], health["scheduler_last_seen"]) == ("not running", None, None)


def test_a_scheduler_that_stopped_writing_is_not_running(session_factory) -> None:  # type: ignore[no-untyped-def]
    record_heartbeat(session_factory, "old:1", next_pass_at=datetime(2031, 1, 2, tzinfo=timezone.utc), cron="0 2 * * *")
    with session_factory() as session:
        later = datetime.now(timezone.utc) + timedelta(minutes=10)
        view = schedule_view(session, now=later)
    assert view.live == [] and view.stale == ["old:1"] and view.next_pass_at is None
    assert view.as_json()["scheduler"] == "not running"
    assert view.describe().startswith("next pass: unknown, no scheduler has been seen since")


def test_settings_warn_without_a_persistent_secret_key() -> None:
    from config import Settings

    assert any("SECRET_KEY is not set" in w for w in Settings.from_env({}).warnings())
    assert Settings.from_env({"SECRET_KEY": "x" * 32}).warnings() == []


def test_a_pass_reports_every_phase_it_goes_through(stripe_api, session_factory, settings) -> None:  # type: ignore[no-untyped-def]
    from tests.stripe_fake import API
    from tests.integration.test_reconcile import _double_click

    _double_click(stripe_api, session_factory)
    job_settings = settings.with_overrides(stripe_api_base=API, stripe_max_network_retries=0, refund_mode="auto")
    seen: list[tuple[str, int, int | None]] = []
    summary = run_reconciliation(
        session_factory, StripeGateway.from_settings(job_settings), job_settings, sleep=lambda s: None,
        progress=lambda phase, count, total: seen.append((phase, count, total)),
    )
    assert summary.status == "succeeded" and summary.counts()["refunds_issued"] == 1
    phases = list(dict.fromkeys(phase for phase, _, _ in seen))
    # A listing reports per page it read (the fake has no refunds or disputes to list).
    assert phases == ["backfill charges", "detection", "refunds"]
    assert sum(count for phase, count, _ in seen if phase == "backfill charges") == 2
    assert [(count, total) for phase, count, total in seen if phase == "detection"] == [(0, 1), (1, 1)]
    assert [(count, total) for phase, count, total in seen if phase == "refunds"] == [(0, 1), (1, 1)]
