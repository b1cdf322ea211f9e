"""The applier as a process: ``reconciler applier`` and the child that ``reconciler serve``
starts beside its web workers. The work itself is :class:`domain.ledger.applier.Applier`.

Several of these (threads, processes, hosts) may run against one PostgreSQL: each batch is
claimed with ``FOR UPDATE SKIP LOCKED``. On SQLite one thread applies (the database has one
writer at a time anyway).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from sqlalchemy.orm import Session, sessionmaker

from domain.alerts import Alert, Alerter
from config import Settings
from domain.ledger.applier import Applier
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


def run_applier(settings: Settings, *, threads: int = 1, stop: threading.Event | None = None) -> None:
    """Apply the inbox until SIGTERM/SIGINT (or ``stop``). Each thread is an applier of its
    own with its own heartbeat."""
    if settings.applier_nice:
        # Below the web workers: at a peak the accept path gets the cores first (Stripe
        # waits on it) and the applier takes what is left; on an idle machine it runs at
        # full speed all the same.
        os.nice(settings.applier_nice)
    engine = make_engine(settings.database_url, pool_size=threads + 1)
    if engine.dialect.name == "sqlite":
        threads = 1
    session_factory = make_session_factory(engine)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    host = socket.gethostname()
    appliers = [make_applier(settings, session_factory, name=f"{host}:{os.getpid()}:{i}") for i in range(threads)]
    workers = [threading.Thread(target=a.run, args=(stop,), name=f"applier-{i}", daemon=True) for i, a in enumerate(appliers)]
    log.info("applier started", extra={"threads": threads, "pid": os.getpid()})
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
