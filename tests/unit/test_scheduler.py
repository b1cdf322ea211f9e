"""The scheduler's jobs: ids, triggers, and the settings that keep one pass at a time."""

from __future__ import annotations

from datetime import datetime, timezone

from apscheduler.schedulers.background import BackgroundScheduler

from app.gateway import StripeGateway
from config import Settings
from jobs.scheduler import MISFIRE_GRACE_SECONDS, build_scheduler


def test_jobs_are_scheduled_with_coalesce_one_instance_and_grace() -> None:
    settings = Settings.from_env({"RECONCILE_CRON": "30 3 * * 1-5"})
    scheduler = build_scheduler(settings, None, StripeGateway(None), scheduler=BackgroundScheduler(timezone=timezone.utc))  # type: ignore[arg-type]
    scheduler.start(paused=True)
    try:
        jobs = {job.id: job for job in scheduler.get_jobs()}
        assert set(jobs) == {"reconcile", "alerts", "housekeeping"}
        for job in jobs.values():
            assert job.coalesce is True and job.max_instances == 1 and job.misfire_grace_time > 0
        nightly = jobs["reconcile"]
        assert nightly.misfire_grace_time == MISFIRE_GRACE_SECONDS
        fire = nightly.trigger.get_next_fire_time(None, datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc))  # a Saturday
        assert fire == datetime(2026, 11, 23, 3, 30, tzinfo=timezone.utc)
    finally:
        scheduler.shutdown(wait=False)
