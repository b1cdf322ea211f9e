"""A pass that dies or is stopped says so: its run is ``aborted``, and the next pass runs at
once. Real ``reconciler reconcile`` processes, killed or signalled half way through their
backfill (a Stripe that accepts the connection and never answers keeps them there), on
SQLite and on PostgreSQL (TEST_DATABASE_URL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

from domain.stripe.gateway import StripeGateway
from config import Settings
from jobs.reconcile import RunInProgress, run_reconciliation
from models import ReconciliationRun, RunLease

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def silent_stripe() -> Iterator[str]:
    """An address that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def start_pass(database_url: str, stripe_base: str, tmp_path: Path) -> subprocess.Popen[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "DATABASE_URL", "REFUND_", "LOG_"))},
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "STRIPE_API_KEY": "sk_test_abort",
        "STRIPE_API_BASE": stripe_base,
        "STRIPE_MAX_NETWORK_RETRIES": "0",
        "LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "reconcile", "--mode", "review"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_until_running(session_factory, process: subprocess.Popen[str], timeout: float = 60) -> ReconciliationRun:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_factory() as session:
            run = session.scalars(select(ReconciliationRun).where(ReconciliationRun.status == "running")).first()
        if run is not None:
            time.sleep(0.5)  # into the backfill's first call, which never returns
            return run
        if process.poll() is not None:
            raise AssertionError(f"the pass ended early: {process.communicate()}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no running pass after {timeout} s: {process.communicate()}")


def run_status(session_factory, run_id: int) -> ReconciliationRun:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        run = session.get(ReconciliationRun, run_id)
        assert run is not None
        return run


def next_pass(session_factory, settings: Settings):  # type: ignore[no-untyped-def]
    """A pass in this process (no Stripe key: no backfill), retried for a short moment
    only on PostgreSQL, where the server drops a dead client's lock as soon as it sees
    the connection closed."""
    offline = settings.with_overrides(stripe_api_key=None)
    deadline = time.monotonic() + (5 if settings.database_url.startswith("postgresql") else 0)
    while True:
        try:
            return run_reconciliation(session_factory, StripeGateway.from_settings(offline), offline, mode="review")
        except RunInProgress:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_killed_pass_is_recorded_aborted_by_the_next_one_which_runs_at_once(
    session_factory, settings, silent_stripe, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    process = start_pass(settings.database_url, silent_stripe, tmp_path)
    killed = wait_until_running(session_factory, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert run_status(session_factory, killed.id).status == "running"  # it could not say anything

    started = time.monotonic()
    summary = next_pass(session_factory, settings)
    assert time.monotonic() - started < 10  # not after the SQLite lease's five minutes

    assert summary.status == "succeeded"
    assert any(f"run(s) {killed.id} had stopped without finishing" in w for w in summary.warnings)
    old = run_status(session_factory, killed.id)
    assert old.status == "aborted" and old.finished_at is not None
    assert any("its process stopped without finishing" in e for e in old.errors)
    with session_factory() as session:
        assert session.scalars(select(RunLease)).all() == []  # released by the new pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: signal.Signals(s).name)
def test_a_signal_during_a_pass_records_it_aborted_and_exits_non_zero(
    session_factory, settings, silent_stripe, tmp_path, signum: int
) -> None:  # type: ignore[no-untyped-def]
    process = start_pass(settings.database_url, silent_stripe, tmp_path)
    running = wait_until_running(session_factory, process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=30)

    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, (stdout, stderr)
    assert "Traceback" not in stderr
    assert f"run {running.id} aborted: interrupted by {name}; recorded as aborted" in stderr.strip().splitlines()[-1]
    run = run_status(session_factory, running.id)
    assert run.status == "aborted" and run.finished_at is not None
    assert f"aborted: interrupted by {name}" in run.errors
    with session_factory() as session:
        assert session.scalars(select(RunLease)).all() == []  # the lease went with it
    # The lock is free: the next pass runs now, and has nothing to clean up.
    summary = next_pass(session_factory, settings)
    assert summary.status == "succeeded" and not any("stopped without finishing" in w for w in summary.warnings)
