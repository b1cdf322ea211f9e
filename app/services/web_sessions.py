"""Server-side sessions of the finance review page, stored in the service's database.

No Flask here: :mod:`app.web_security` adapts this store to Flask's session interface.

Guarantees:

* The browser holds only a random id (``secrets.token_urlsafe(32)``: 256 bits); the row
  is keyed by HMAC-SHA256(``SECRET_KEY``, id), so the table alone yields no usable cookie,
  and changing ``SECRET_KEY`` ends every session.
* A session ends ``idle`` after its last request and ``absolute`` after it was created
  (a login always creates a new one), whatever happens; an ended session's row is deleted
  when it is next presented, and expired rows are swept when sessions are created.
* :meth:`SessionStore.delete_user` ends every session of a user at once.
* The last-seen time is written at most once per :data:`TOUCH_EVERY` per session, so
  reading pages does not turn every request into a database write.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import WebSession, run_in_transaction, utcnow
from models.db import engine_of, make_read_session_factory

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{43}$")
TOUCH_EVERY = timedelta(seconds=60)


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class StoredSession:
    data: dict[str, Any]
    username: str | None
    created_at: datetime


class SessionStore:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        secret_key: str,
        *,
        idle: timedelta,
        absolute: timedelta,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._session_factory = session_factory
        # Looking a session up takes no write lock (SQLite: BEGIN DEFERRED); only ending or
        # touching one writes, in a short transaction of its own.
        self._read_factory = make_read_session_factory(engine_of(session_factory))
        self._key = secret_key.encode()
        self.idle = idle
        self.absolute = absolute
        self._clock = clock

    def key_of(self, session_id: str) -> str:
        return hmac.new(self._key, session_id.encode(), hashlib.sha256).hexdigest()

    def load(self, session_id: str | None) -> StoredSession | None:
        """The live session behind ``session_id``; None when unknown, malformed or ended
        (an ended one is deleted now)."""
        if not session_id or not SESSION_ID.match(session_id):
            return None
        key = self.key_of(session_id)
        now = self._clock()
        with self._read_factory() as db:
            row = db.get(WebSession, key)
            if row is None:
                return None
            ended = self._ended(row, now)
            stale = now - _aware(row.last_seen_at) >= TOUCH_EVERY
            stored = StoredSession(dict(row.data or {}), row.username, _aware(row.created_at))
        if ended:
            self.delete(session_id)
            return None
        if stale:
            run_in_transaction(
                self._session_factory,
                lambda db: db.execute(update(WebSession).where(WebSession.id_hash == key).values(last_seen_at=now)),
            )
        return stored

    def create(self, data: dict[str, Any], username: str | None) -> str:
        """A new session holding ``data``; returns its id (for the cookie)."""
        session_id = new_session_id()
        now = self._clock()

        def work(db: Session) -> None:
            self._sweep(db, now)
            db.add(WebSession(id_hash=self.key_of(session_id), username=username, data=data, created_at=now, last_seen_at=now))

        run_in_transaction(self._session_factory, work)
        return session_id

    def save(self, session_id: str, data: dict[str, Any], username: str | None) -> bool:
        """Replace the data of a live session; False when it no longer exists."""
        key = self.key_of(session_id)
        now = self._clock()

        def work(db: Session) -> bool:
            result = db.execute(
                update(WebSession)
                .where(WebSession.id_hash == key)
                .values(data=data, username=username, last_seen_at=now)
            )
            return bool(result.rowcount)

        return run_in_transaction(self._session_factory, work)

    def delete(self, session_id: str) -> None:
        key = self.key_of(session_id)
        run_in_transaction(self._session_factory, lambda db: db.execute(delete(WebSession).where(WebSession.id_hash == key)))

    def delete_user(self, username: str) -> int:
        """End every session of ``username``; returns how many there were."""

        def work(db: Session) -> int:
            return db.execute(delete(WebSession).where(WebSession.username == username)).rowcount or 0

        return run_in_transaction(self._session_factory, work)

    def count_user(self, username: str) -> int:
        with self._session_factory() as db:
            return len(list(db.scalars(select(WebSession.id_hash).where(WebSession.username == username))))

    def _ended(self, row: WebSession, now: datetime) -> bool:
        return now - _aware(row.last_seen_at) > self.idle or now - _aware(row.created_at) > self.absolute

    def _sweep(self, db: Session, now: datetime) -> None:
        db.execute(
            delete(WebSession).where(
                or_(WebSession.last_seen_at < now - self.idle, WebSession.created_at < now - self.absolute)
            )
        )


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored here is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
