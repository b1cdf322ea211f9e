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
"""

from __future__ import annotations

import logging
import re
import signal
from datetime import timezone
from typing import Any

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.orm import Session, sessionmaker

from app.gateway import StripeGateway
from app.services.idempotency import purge_expired_idempotency_keys
from config import Settings
from jobs.alerts import Alerter, pending_alerts
from jobs.reconcile import RunInProgress, run_reconciliation

log = logging.getLogger(__name__)

MISFIRE_GRACE_SECONDS = 3 * 3600  # a pass missed by up to 3 h (a restart, a deploy) still runs


def build_scheduler(
    settings: Settings,
    session_factory: sessionmaker[Session],
    gateway: StripeGateway,
    *,
    scheduler: Any = None,
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
        replace_existing=True,
        **defaults,
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


def nightly_pass(settings: Settings, session_factory: sessionmaker[Session], gateway: StripeGateway) -> None:
    try:
        summary = run_reconciliation(session_factory, gateway, settings, trigger="schedule")
    except RunInProgress as exc:
        log.warning("scheduled pass not started: %s", exc)
        return
    log.info("scheduled pass finished", extra={"run_id": summary.run_id, "status": summary.status, **summary.counts()})


def send_pending_alerts(settings: Settings, session_factory: sessionmaker[Session]) -> int:
    alerter = Alerter(settings, session_factory)
    with session_factory() as session:
        alerts = pending_alerts(session)
    return sum(1 for alert in alerts if alerter.send(alert))


def run_scheduler(settings: Settings, session_factory: sessionmaker[Session], gateway: StripeGateway) -> None:
    """Block, running the jobs, until SIGTERM or SIGINT."""
    scheduler = build_scheduler(settings, session_factory, gateway)

    def stop(signum: int, frame: Any) -> None:
        log.info("scheduler stopping (signal %d)", signum)
        scheduler.shutdown(wait=False)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for job in scheduler.get_jobs():
        log.info("job %s scheduled: %s", job.id, job.trigger)
    log.info("scheduler started", extra={"cron": settings.reconcile_cron})
    scheduler.start()
