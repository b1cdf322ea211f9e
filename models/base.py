"""Declarative base shared by every model, with a naming convention for constraints.

Named constraints make Alembic migrations reproducible on PostgreSQL and SQLite alike.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import cast

from sqlalchemy import MetaData, Table
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def table_of(model: type[Base]) -> Table:
    """The model's ``Table``, for Core statements (``update(table)``, ``table.delete()``).

    SQLAlchemy types ``__table__`` as a ``FromClause`` (a mapping may target a join or a
    select); every model of this project maps one ``Table``, which is what it returns."""
    return cast(Table, model.__table__)


def utcnow() -> datetime:
    """Timezone-aware UTC now. Used for our own bookkeeping times, never for Stripe ordering."""
    return datetime.now(timezone.utc)


def iso_utc(moment: datetime | None) -> str | None:
    """A stored time as ISO 8601 with its UTC offset (``2026-12-02T06:21:21.518029+00:00``),
    for JSON, CSV and CLI output. SQLite hands ``DateTime(timezone=True)`` columns back
    naive; they were written in UTC, so a naive value is read as UTC. None stays None."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat()


def iso_from_unix(seconds: int | None) -> str | None:
    """A Stripe ``created`` (unix seconds) as :func:`iso_utc` text."""
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).isoformat()
