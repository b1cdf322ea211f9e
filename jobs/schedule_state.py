"""When the next pass is due: what the scheduler processes record and what ``/healthz`` and
``reconciler runs`` read (table ``scheduler_heartbeats``).

Each scheduler writes its row (``host:pid``) when it starts, every minute and after each
pass, and deletes it when it stops. A row not refreshed for :data:`STALE_AFTER` belongs to
a scheduler that died without a word; it is shown as such and never counted as the
next pass. No APScheduler import here: the web process reads this module too.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from models.base import iso_utc

from models import SchedulerHeartbeat, run_in_transaction
from models.db import insert_ignore

HEARTBEAT_SECONDS = 60
STALE_AFTER = timedelta(seconds=3 * HEARTBEAT_SECONDS)


def scheduler_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def record_heartbeat(
    session_factory: sessionmaker[Session], holder: str, *, next_pass_at: datetime | None, cron: str
) -> None:
    """Upsert this scheduler's row: alive now, next pass at ``next_pass_at``."""
    now = datetime.now(timezone.utc)

    def write(session: Session) -> None:
        values = {"holder": holder, "next_pass_at": next_pass_at, "cron": cron, "started_at": now, "seen_at": now}
        if not insert_ignore(session, SchedulerHeartbeat, values):
            row = session.get(SchedulerHeartbeat, holder, with_for_update=True)
            if row is not None:
                row.next_pass_at = next_pass_at
                row.cron = cron
                row.seen_at = now

    run_in_transaction(session_factory, write)


def remove_heartbeat(session_factory: sessionmaker[Session], holder: str) -> None:
    run_in_transaction(
        session_factory, lambda session: session.execute(delete(SchedulerHeartbeat).where(SchedulerHeartbeat.holder == holder))
    )


@dataclass(frozen=True)
class ScheduleView:
    """What is known of the schedulers: the next pass due among the live ones (None when
    no scheduler is alive), how many are alive, and the last time a stale one was seen."""

    next_pass_at: datetime | None
    live: list[str]
    stale: list[str]
    last_seen: datetime | None

    @property
    def known(self) -> bool:
        return bool(self.live or self.stale)

    def as_json(self) -> dict[str, object]:
        """``scheduler`` (``running`` or ``not running``), ``next_pass_at`` (None when no
        scheduler runs) and ``scheduler_last_seen`` (the newest heartbeat), ISO 8601 UTC."""
        return {
            "scheduler": "running" if self.live else "not running",
            "next_pass_at": self.next_pass_at.isoformat() if self.live and self.next_pass_at else None,
            "scheduler_last_seen": self.last_seen.isoformat() if self.last_seen else None,
        }

    def describe(self) -> str:
        """One line for a person."""
        if self.live:
            when = iso_utc(self.next_pass_at.replace(microsecond=0)) if self.next_pass_at else "not scheduled"
            return f"next pass: {when} (scheduler running on {', '.join(self.live)})"
        if self.stale:
            return (
                f"next pass: unknown, no scheduler has been seen since {iso_utc(self.last_seen.replace(microsecond=0))} "
                "(run `reconciler serve` or `reconciler scheduler`)"
            )
        return "next pass: no scheduler is running (run `reconciler serve` or `reconciler scheduler`)"


def schedule_view(session: Session, *, now: datetime | None = None) -> ScheduleView:
    now = now or datetime.now(timezone.utc)
    live: list[str] = []
    stale: list[str] = []
    next_pass: datetime | None = None
    last_seen: datetime | None = None
    for row in session.scalars(select(SchedulerHeartbeat).order_by(SchedulerHeartbeat.holder)):
        seen = _aware(row.seen_at)
        assert seen is not None
        last_seen = max(last_seen, seen) if last_seen else seen
        if now - seen > STALE_AFTER:
            stale.append(row.holder)
            continue
        live.append(row.holder)
        due = _aware(row.next_pass_at)
        if due is not None and (next_pass is None or due < next_pass):
            next_pass = due
    return ScheduleView(next_pass_at=next_pass, live=live, stale=stale, last_seen=last_seen)
