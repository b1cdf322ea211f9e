"""The applier as a process: ``reconciler applier`` and the child that ``reconciler serve``
starts beside its web workers. The work itself is :class:`domain.ledger.applier.Applier`.

Several of these (threads, processes, hosts) may run against one PostgreSQL: each batch is
claimed with ``FOR UPDATE SKIP LOCKED``. On SQLite one thread applies (the database has one
writer at a time anyway).

CPU priority (PostgreSQL, ``APPLIER_IDLE_CPU``, on by default): the applier threads run
under Linux's ``SCHED_IDLE`` policy, so they get only CPU time that nothing else on the
machine wants, and the web workers, which Stripe waits on, keep every core at a peak (the
kernel also places a waking web thread on a core that runs only idle-policy work, as on an
idle core). A guard thread at the process's ordinary priority (``APPLIER_NICE``) checks
the inbox every second: once the next event to apply has waited
``APPLIER_LAG_GUARD_SECONDS``, it pauses the idle threads and applies batches itself until
less than a batch is left, so a machine that stays saturated still applies. An unprivileged
thread cannot leave ``SCHED_IDLE`` again, hence a second thread rather than a switch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from domain.alerts import Alert, Alerter
from config import Settings
from domain.ledger.applier import HEARTBEAT_SECONDS, Applier, oldest_ready_seconds
from domain.ledger.handlers import CheckoutLinking
from models import make_engine, make_session_factory

log = logging.getLogger(__name__)


def make_applier(
    settings: Settings,
    session_factory: sessionmaker[Session],
    *,
    alerter: Alerter | None = None,
    name: str | None = None,
) -> Applier:
    """The one construction of an applier from the settings."""
    alerter = alerter or Alerter(settings, session_factory)
    return Applier(
        session_factory,
        linking=CheckoutLinking.from_settings(settings),
        batch_size=settings.applier_batch_size,
        linger_seconds=settings.applier_linger_ms / 1000,
        alert_after=settings.event_alert_attempts,
        alert=lambda key, subject, body: alerter.send(Alert(key, subject, body)),
        name=name,
    )


class LagGuard:
    """Applies at ordinary priority while the idle-priority appliers fall behind: see the
    module docstring."""

    def __init__(
        self,
        applier: Applier,
        session_factory: sessionmaker[Session],
        *,
        max_lag_seconds: float,
        pause: threading.Event,
        check_seconds: float = 1.0,
    ) -> None:
        self._applier = applier
        self._session_factory = session_factory
        self._max_lag = max_lag_seconds
        self._pause = pause
        self._check_seconds = check_seconds

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self._check_seconds):
            try:
                self.check(stop)
            except Exception:  # noqa: BLE001 - the guard outlives any one failure (the database down)
                log.exception("applier lag guard failed; checking again")

    def check(self, stop: threading.Event) -> int:
        """One look at the inbox; when the next event has waited too long, apply batches
        (with the idle appliers paused) until less than a batch is left. Returns the
        events applied."""
        lag = oldest_ready_seconds(self._session_factory)
        if lag is None or lag < self._max_lag:
            return 0
        log.warning("the idle-priority applier is %.1f s behind; applying at ordinary priority", lag, extra={"lag_seconds": round(lag, 1)})
        applied = 0
        next_beat = 0.0
        self._pause.set()
        try:
            while not stop.is_set():
                if time.monotonic() >= next_beat:  # alive on /healthz while the idle ones may not be
                    self._applier.beat()
                    next_beat = time.monotonic() + HEARTBEAT_SECONDS
                outcome = self._applier.apply_batch()
                applied += outcome.applied
                if outcome.busy:  # another applier (here, or on another host) has the turn
                    lag = oldest_ready_seconds(self._session_factory)
                    if lag is None or lag < self._max_lag:
                        break
                    stop.wait(0.05)
                elif outcome.claimed < self._applier.batch_size:
                    break
        finally:
            self._pause.clear()
            with contextlib.suppress(Exception):
                self._applier.beat(stopping=True)
        log.info("applier caught up at ordinary priority", extra={"applied": applied})
        return applied


def enter_idle_cpu() -> bool:
    """Put the calling thread under SCHED_IDLE (Linux); False where that does not exist.
    Lowering a thread's own priority needs no privilege."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread, on Linux
    except OSError:
        log.warning("SCHED_IDLE refused; the applier keeps its ordinary priority", exc_info=True)
        return False
    return True


def run_applier(settings: Settings, *, threads: int = 1, stop: threading.Event | None = None) -> None:
    """Apply the inbox until SIGTERM/SIGINT (or ``stop``). Each thread is an applier of its
    own with its own heartbeat; on PostgreSQL with ``APPLIER_IDLE_CPU`` they run at idle
    CPU priority beside a :class:`LagGuard`."""
    if settings.applier_nice:
        # Below the web workers: at a peak the accept path gets the cores first (Stripe
        # waits on it) and the applier takes what is left; on an idle machine it runs at
        # full speed all the same.
        os.nice(settings.applier_nice)
    engine = make_engine(settings.database_url, pool_size=threads + 2)  # and the guard
    if engine.dialect.name == "sqlite":
        threads = 1
    session_factory = make_session_factory(engine)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    host = socket.gethostname()
    appliers = [make_applier(settings, session_factory, name=f"{host}:{os.getpid()}:{i}") for i in range(threads)]
    idle_cpu = settings.applier_idle_cpu and engine.dialect.name == "postgresql"
    pause = threading.Event()
    workers = [
        threading.Thread(target=_apply, args=(a, stop, pause, idle_cpu), name=f"applier-{i}", daemon=True)
        for i, a in enumerate(appliers)
    ]
    if idle_cpu:
        guard = LagGuard(
            make_applier(settings, session_factory, name=f"{host}:{os.getpid()}:guard"),
            session_factory,
            max_lag_seconds=settings.applier_lag_guard_seconds,
            pause=pause,
        )
        workers.append(threading.Thread(target=guard.run, args=(stop,), name="applier-guard", daemon=True))
    log.info("applier started", extra={"threads": threads, "pid": os.getpid(), "idle_cpu": idle_cpu})
    for worker in workers:
        worker.start()
    try:
        while any(w.is_alive() for w in workers):
            for worker in workers:
                worker.join(timeout=0.5)
    finally:
        stop.set()
        engine.dispose()
    log.info("applier stopped", extra={"applied": sum(a.applied_total for a in appliers)})


def _apply(applier: Applier, stop: threading.Event, pause: threading.Event, idle_cpu: bool) -> None:
    if idle_cpu:
        enter_idle_cpu()
    applier.run(stop, pause=pause)
