"""Login throttling for the finance review page: per username and per client address.

No Flask here; the review blueprint calls :meth:`LoginGuard.begin` before checking a
password and :meth:`LoginGuard.failed` / :meth:`LoginGuard.succeeded` after.

Why counters in the service's own database rather than Flask-Limiter: the service runs
several gunicorn processes on PostgreSQL or SQLite and has no Redis or memcached, and
Flask-Limiter's shared storages are exactly those (its memory storage is per process, so
N workers would allow N times the limit). Flask-Limiter also counts requests in windows,
while this needs consecutive failures, a lock that doubles and a reset on success.

Rules:

* Every attempt is counted as a failure *before* the password is checked (in the same
  transaction that checks the lock, rows locked), so parallel guesses cannot slip past the
  limit; a success undoes it. A username key locks after ``max_failures`` failures in a
  row, an address key (IPv4 address or IPv6 /64) after ``address_max_failures``.
* A lock lasts ``lock_seconds``, doubled for each failure past the limit, at most
  :data:`MAX_LOCK`. While a key is locked no password is checked at all: the answer is
  "locked" with the seconds left (the page answers 429 with ``Retry-After``).
* A failure is forgotten :data:`FORGET_AFTER` after the last one (or after the lock ends).
* Unknown usernames are counted and locked exactly like known ones (the key is a hash of
  the name as typed), so a lock tells nothing about which names exist.
* Every failure, lock refusal and login is written to the audit log (actor
  ``review-login``, the typed name and the client address in details). When failures of
  every name and address add up to ``alert_threshold`` within :data:`ALERT_WINDOW`, one
  alert goes out for that window (keyed ``login-failures:<window start>`` in
  ``alerts_sent``, so several workers send it once), from a background thread.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from domain.alerts import Alert
from models import AuditEntry, LoginThrottle, run_in_transaction, utcnow
from models.db import insert_ignore

log = logging.getLogger(__name__)

ACTOR = "review-login"
MAX_LOCK = timedelta(hours=1)
FORGET_AFTER = timedelta(minutes=15)
ALERT_WINDOW = 300  # seconds
FAILED, LOCKED, LOGGED_IN = "login_failed", "login_locked", "login"


@dataclass(frozen=True)
class Attempt:
    username: str
    address: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Locked:
    retry_after: int  # seconds


class LoginGuard:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        max_failures: int,
        address_max_failures: int,
        lock_seconds: int,
        alert_threshold: int,
        send_alert: Callable[[Alert], bool] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._session_factory = session_factory
        self._limits = {"user": max_failures, "addr": address_max_failures}
        self._lock = timedelta(seconds=lock_seconds)
        self._alert_threshold = alert_threshold
        self._send_alert = send_alert
        self._clock = clock
        self.last_alert: threading.Thread | None = None  # tests join it
        self._alerted_window: int | None = None

    def begin(self, username: object, address: str | None) -> Attempt | Locked:
        """Count this attempt, or refuse it because a key is locked (nothing is counted)."""
        name = (username if isinstance(username, str) else "").strip()[:255]
        addr = address_key(address)
        keys = ("user:" + hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()[:64], "addr:" + addr)
        now = self._clock()

        def work(db: Session) -> Attempt | Locked:
            rows = []
            for key in keys:  # always in this order: two attempts never deadlock
                insert_ignore(db, LoginThrottle, {"key": key, "failures": 0, "updated_at": now})
                row = db.get(LoginThrottle, key, with_for_update=True, populate_existing=True)
                assert row is not None
                last = max(_aware(row.updated_at), _aware(row.locked_until) if row.locked_until else _aware(row.updated_at))
                if row.failures and now - last > FORGET_AFTER:
                    row.failures, row.locked_until = 0, None
                rows.append(row)
            waits = [(_aware(r.locked_until) - now).total_seconds() for r in rows if r.locked_until and _aware(r.locked_until) > now]
            if waits:
                retry = max(1, math.ceil(max(waits)))
                _audit(db, LOCKED, name, addr, now, retry_after=retry)
                return Locked(retry)
            for row in rows:
                row.failures += 1
                row.updated_at = now
                limit = self._limits[row.key.split(":", 1)[0]]
                if row.failures >= limit:
                    row.locked_until = now + min(MAX_LOCK, self._lock * 2 ** min(row.failures - limit, 20))
            return Attempt(name, addr, keys)

        outcome = run_in_transaction(self._session_factory, work)
        if isinstance(outcome, Locked):
            log.warning("review login refused: locked for %ss (user %r, address %s)", outcome.retry_after, name[:64], addr)
            self._maybe_alert(now)
        return outcome

    def failed(self, attempt: Attempt) -> None:
        """The password was wrong (or the user unknown): the counts stand; audited."""
        now = self._clock()

        def work(db: Session) -> None:
            _audit(db, FAILED, attempt.username, attempt.address, now)
            db.execute(delete(LoginThrottle).where(LoginThrottle.updated_at < now - FORGET_AFTER - MAX_LOCK))

        run_in_transaction(self._session_factory, work)
        log.warning("review login failed (user %r, address %s)", attempt.username[:64], attempt.address)
        self._maybe_alert(now)

    def succeeded(self, attempt: Attempt) -> None:
        """Right password: the username starts afresh; the address gets its attempt back."""
        now = self._clock()
        user_key, addr_key = attempt.keys

        def work(db: Session) -> None:
            db.execute(delete(LoginThrottle).where(LoginThrottle.key == user_key))
            row = db.get(LoginThrottle, addr_key, with_for_update=True, populate_existing=True)
            if row is not None:
                row.failures = max(0, row.failures - 1)
                if row.failures < self._limits["addr"]:
                    row.locked_until = None
            _audit(db, LOGGED_IN, attempt.username, attempt.address, now)

        run_in_transaction(self._session_factory, work)

    def _maybe_alert(self, now: datetime) -> None:
        if self._send_alert is None:
            return
        window = int(now.timestamp() // ALERT_WINDOW) * ALERT_WINDOW
        if self._alerted_window == window:
            return
        since = datetime.fromtimestamp(window, timezone.utc)
        with self._session_factory() as db:
            rows = db.execute(
                select(AuditEntry.action, func.count())
                .where(AuditEntry.actor == ACTOR, AuditEntry.action.in_([FAILED, LOCKED]), AuditEntry.at >= since)
                .group_by(AuditEntry.action)
            ).all()
        counts = {action: count for action, count in rows}
        if sum(counts.values()) < self._alert_threshold:
            return
        alert = Alert(
            key=f"login-failures:{window}",
            subject=f"{sum(counts.values())} failed review logins in {ALERT_WINDOW // 60} min",
            body=(
                f"The finance review page refused {counts.get(FAILED, 0)} wrong passwords and "
                f"{counts.get(LOCKED, 0)} attempts on locked names or addresses since "
                f"{since.isoformat()}. Someone may be guessing passwords: see the audit log "
                f"(actor {ACTOR}) for the names and addresses."
            ),
        )
        self._alerted_window = window
        send = self._send_alert
        self.last_alert = threading.Thread(target=_deliver, args=(send, alert), name="login-alert", daemon=True)
        self.last_alert.start()


def address_key(address: str | None) -> str:
    """The throttled unit of a client address: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address((address or "").strip())
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _audit(db: Session, action: str, username: str, address: str, now: datetime, **extra: object) -> None:
    db.add(AuditEntry(actor=ACTOR, action=action, at=now, case_id=None, details={"username": username[:64], "address": address, **extra}))


def _deliver(send: Callable[[Alert], bool], alert: Alert) -> None:
    try:
        send(alert)
    except Exception:  # an alert failing must never touch the request path
        log.exception("login failure alert not sent")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
