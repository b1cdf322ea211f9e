"""The scheduler's jobs: ids, triggers, and the settings that keep one pass at a time."""

from __future__ import annotations

from datetime import datetime, timezone

from apscheduler.schedulers.background import BackgroundScheduler

from domain.stripe.gateway import StripeGateway
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


def test_cron_weekdays_count_from_sunday_as_in_cron() -> None:
    from jobs.scheduler import cron_trigger

    saturday_noon = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
    assert cron_trigger("0 2 * * 0").get_next_fire_time(None, saturday_noon).weekday() == 6  # Sunday
    assert cron_trigger("0 2 * * 7").get_next_fire_time(None, saturday_noon).weekday() == 6
    assert cron_trigger("0 2 * * 1").get_next_fire_time(None, saturday_noon).weekday() == 0  # Monday
    assert cron_trigger("0 2 * * *").get_next_fire_time(None, saturday_noon) == datetime(2026, 11, 22, 2, 0, tzinfo=timezone.utc)
