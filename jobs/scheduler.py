"""The scheduler process (``reconciler scheduler``): APScheduler 3 in a process of its own,
never inside web workers (a job store cannot be shared between processes).

Jobs, each with an explicit id, ``coalesce=True`` (a backlog of missed runs runs once),
``max_instances=1`` and an explicit misfire grace time:

* ``reconcile``: the pass, at ``RECONCILE_CRON`` (UTC). Other passes (``reconciler
  reconcile`` by hand, a second scheduler by mistake) are kept out by the pass lock.
* ``alerts``: every 10 minutes, alerts for refund failures and poison events that
  arrived since (a refund that fails days later should not wait for the night).
* ``housekeeping``: hourly, deletes expired client ``Idempotency-Key`` records of the pay
  endpoint (``IDEMPOTENCY_KEY_TTL_HOURS``).
* ``heartbeat``: every minute, records that this scheduler is alive and when its next pass
  is due (:mod:`jobs.schedule_state`; ``/healthz`` and ``reconciler runs`` show it).

Stopping (SIGTERM, SIGINT, SIGHUP; ``reconciler serve`` sends SIGTERM): no new job starts,
a pass in progress is asked to stop at its next checkpoint and records itself ``aborted``
(the process then exits 1); a pass that does not reach a checkpoint within
:data:`PASS_STOP_SECONDS` is recorded ``aborted`` from here and the process exits at once.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from datetime import datetime, timezone
from typing import Any

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.orm import Session, sessionmaker

from domain.stripe.gateway import StripeGateway
from domain.payments.idempotency import purge_expired_idempotency_keys
from config import Settings
from jobs.alerts import Alerter, pending_alerts
from jobs.reconcile import PassAborted, RunInProgress, run_reconciliation
from jobs.schedule_state import HEARTBEAT_SECONDS, record_heartbeat, remove_heartbeat, scheduler_holder
from models import ReconciliationRun, run_in_transaction

log = logging.getLogger(__name__)

MISFIRE_GRACE_SECONDS = 3 * 3600  # a pass missed by up to 3 h (a restart, a deploy) still runs
PASS_STOP_SECONDS = 15.0  # how long a stop waits for a running pass to reach a checkpoint


class PassControl:
    """The scheduler's handle on its pass: which run is in progress, and the stop request
    its checkpoints read (the pass runs in a worker thread; signals arrive in the main
    thread)."""

    def __init__(self) -> None:
        self.stop_reason: str | None = None
        self.run_id: int | None = None
        self.idle = threading.Event()
        self.idle.set()
        self.aborted = False

    def should_stop(self) -> str | None:
        return self.stop_reason


def build_scheduler(
    settings: Settings,
    session_factory: sessionmaker[Session],
    gateway: StripeGateway,
    *,
    scheduler: Any = None,
    control: PassControl | None = None,
    holder: str | None = None,
) -> Any:
    """The scheduler with its jobs added (not started)."""
    scheduler = scheduler or BlockingScheduler(timezone=timezone.utc)
    defaults = {"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_SECONDS}
    scheduler.add_job(
        nightly_pass,
        cron_trigger(settings.reconcile_cron),
        id="reconcile",
        name="reconciliation pass",
        args=(settings, session_factory, gateway),
        kwargs={"control": control, "on_done": (lambda: heartbeat(scheduler, settings, session_factory, holder)) if holder else None},
        replace_existing=True,
        **defaults,
    )
    if holder is not None:
        scheduler.add_job(
            heartbeat,
            IntervalTrigger(seconds=HEARTBEAT_SECONDS, timezone=timezone.utc),
            id="heartbeat",
            name="scheduler heartbeat and next pass time",
            args=(scheduler, settings, session_factory, holder),
            replace_existing=True,
            next_run_time=datetime.now(timezone.utc),  # at once: the row exists from the start
            **{**defaults, "misfire_grace_time": HEARTBEAT_SECONDS},
        )
    scheduler.add_job(
        send_pending_alerts,
        IntervalTrigger(minutes=10, timezone=timezone.utc),
        id="alerts",
        name="refund-failure and poison-event alerts",
        args=(settings, session_factory),
        replace_existing=True,
        **{**defaults, "misfire_grace_time": 600},
    )
    scheduler.add_job(
        housekeeping,
        IntervalTrigger(hours=1, timezone=timezone.utc),
        id="housekeeping",
        name="expired Idempotency-Key records",
        args=(session_factory,),
        replace_existing=True,
        **{**defaults, "misfire_grace_time": 3600},
    )
    return scheduler


_CRON_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def cron_trigger(expression: str) -> CronTrigger:
    """A trigger for a standard five-field cron expression, in UTC.

    Trap: APScheduler 3 numbers weekdays from Monday = 0, while cron numbers them from
    Sunday = 0 (and 7), and ``CronTrigger.from_crontab`` passes the numbers through, so
    ``1-5`` would run Tuesday to Saturday. Numeric weekdays are turned into names first.
    """
    minute, hour, day, month, day_of_week = expression.split()
    day_of_week = re.sub(r"\d+", lambda m: _CRON_DAYS[int(m.group())] if int(m.group()) < 8 else m.group(), day_of_week)
    return CronTrigger(
        minute=minute, hour=hour, day=day, month=month, day_of_week=day_of_week, timezone=timezone.utc
    )


def housekeeping(session_factory: sessionmaker[Session]) -> int:
    removed = purge_expired_idempotency_keys(session_factory)
    log.info("expired idempotency keys removed", extra={"removed": removed})
    return removed


def nightly_pass(
    settings: Settings,
    session_factory: sessionmaker[Session],
    gateway: StripeGateway,
    *,
    control: PassControl | None = None,
    on_done: Any = None,
) -> None:
    control = control or PassControl()
    if control.stop_reason:
        return
    from jobs.progress import LogProgress

    control.idle.clear()
    progress = LogProgress(interval=10.0)  # a log line per phase every 10 s, and when it ends
    try:
        summary = run_reconciliation(
            session_factory, gateway, settings, trigger="schedule", progress=progress,
            should_stop=control.should_stop, on_start=lambda run_id: setattr(control, "run_id", run_id),
        )
    except RunInProgress as exc:
        log.warning("scheduled pass not started: %s", exc)
        return
    except PassAborted as exc:
        control.aborted = True
        log.warning("scheduled pass aborted: %s", exc.reason, extra={"run_id": control.run_id})
        return
    finally:
        progress.close()
        control.run_id = None
        control.idle.set()
        if on_done is not None:
            with _logged("heartbeat after the pass"):
                on_done()
    log.info("scheduled pass finished", extra={"run_id": summary.run_id, "status": summary.status, **summary.counts()})


class _logged:
    """Log and swallow an exception: bookkeeping must never stop the scheduler."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if exc is not None and isinstance(exc, Exception):
            log.warning("%s failed: %s", self.what, exc)
            return True
        return False


def heartbeat(scheduler: Any, settings: Settings, session_factory: sessionmaker[Session], holder: str | None) -> None:
    """Record that this scheduler is alive and when its next pass is due."""
    if holder is None:
        return
    job = scheduler.get_job("reconcile")
    next_at = getattr(job, "next_run_time", None) if job is not None else None
    with _logged("scheduler heartbeat"):
        record_heartbeat(session_factory, holder, next_pass_at=next_at, cron=settings.reconcile_cron)


def send_pending_alerts(settings: Settings, session_factory: sessionmaker[Session]) -> int:
    alerter = Alerter(settings, session_factory)
    with session_factory() as session:
        alerts = pending_alerts(session)
    return sum(1 for alert in alerts if alerter.send(alert))


def run_scheduler(settings: Settings, session_factory: sessionmaker[Session], gateway: StripeGateway) -> int:
    """Block, running the jobs, until SIGTERM, SIGINT or SIGHUP. Returns the exit status:
    0, or 1 when a pass in progress had to be aborted."""
    control = PassControl()
    holder = scheduler_holder()
    scheduler = build_scheduler(settings, session_factory, gateway, control=control, holder=holder)

    def stop(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if control.stop_reason is None:
            log.info("scheduler stopping (%s)", name)
            control.stop_reason = f"the scheduler was stopped ({name})"
            scheduler.shutdown(wait=False)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    # "Running job"/"executed successfully" twice a minute for the heartbeat is noise; the
    # jobs log what they did themselves, and failures still show (WARNING and above).
    logging.getLogger("apscheduler.executors.default").setLevel(max(logging.WARNING, logging.getLogger().level))
    for job in scheduler.get_jobs():
        log.info("job %s scheduled: %s", job.id, job.trigger)
    log.info("scheduler started", extra={"cron": settings.reconcile_cron, "holder": holder})
    scheduler.start()  # BlockingScheduler: blocks here until shutdown
    return _wind_down(control, session_factory, holder)


def _wind_down(control: PassControl, session_factory: sessionmaker[Session], holder: str) -> int:
    """After a stop: let a running pass record itself aborted, or record it from here."""
    if not control.idle.wait(PASS_STOP_SECONDS):
        run_id = control.run_id
        log.error("the pass did not stop within %.0f s; recording it aborted and exiting", PASS_STOP_SECONDS)
        if run_id is not None:
            with _logged("recording the pass aborted"):
                _record_aborted(session_factory, run_id, control.stop_reason or "the scheduler was stopped")
        with _logged("removing the heartbeat"):
            remove_heartbeat(session_factory, holder)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)  # the pass thread is stuck in a call; do not wait for it
    with _logged("removing the heartbeat"):
        remove_heartbeat(session_factory, holder)
    return 1 if control.aborted else 0


def _record_aborted(session_factory: sessionmaker[Session], run_id: int, reason: str) -> None:
    def write(session: Session) -> None:
        run = session.get(ReconciliationRun, run_id, with_for_update=True)
        if run is not None and run.status == "running":
            run.status = "aborted"
            run.finished_at = datetime.now(timezone.utc)
            run.errors = [*(run.errors or []), f"aborted: {reason}"][:100]

    run_in_transaction(session_factory, write)
