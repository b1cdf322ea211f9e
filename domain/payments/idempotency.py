"""Client ``Idempotency-Key`` replay for the pay endpoint (and any endpoint like it).

Guarantees, per ``(scope, key)``:

* The first request that uses a key claims it (``in_flight``), in a transaction of its
  own, before any work is done; the unique ``(scope, key)`` makes the claim atomic across
  threads, processes and hosts.
* Its final answer is stored with the SHA-256 fingerprint of the request (method, path,
  canonical JSON body). The same key with the same request then gets the same status and
  the same body back, without doing the work again; with another request, 422
  ``idempotency_key_reused``; while the first request is still running, 409
  ``idempotency_key_in_flight``.
* Transient answers (5xx, "try again" 409/429) are not stored: the key is released so a
  retry does the work. A holder that crashed without releasing its key is taken over
  after :data:`IN_FLIGHT_TAKEOVER_SECONDS` (the work behind it must itself be safe to
  repeat, as the pay service is).
* Keys expire ``IDEMPOTENCY_KEY_TTL_HOURS`` after their first use (then the same key is a
  new request, as at Stripe). Expired rows are purged by
  :func:`purge_expired_idempotency_keys` (scheduled) and opportunistically, a few at a
  time, whenever a new key is claimed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from domain.errors import DomainError, Kind
from models import run_in_transaction, utcnow
from models.db import insert_ignore
from models.payments import DONE, IN_FLIGHT, IdempotencyRecord

log = logging.getLogger(__name__)

#: Stripe's own limit; printable ASCII only (a header value has no business holding more).
KEY_PATTERN = re.compile(r"^[\x20-\x7e]{1,255}\Z")
#: Longer than any request can run (gunicorn kills a worker after 30 s).
IN_FLIGHT_TAKEOVER_SECONDS = 120
#: Expired rows removed per opportunistic purge: bounded, so a request never pays for a
#: large backlog (the scheduled purge takes care of that).
OPPORTUNISTIC_PURGE_BATCH = 50


class IdempotencyKeyError(DomainError):
    """The key cannot be honoured (malformed, reused with other parameters, in use)."""


def validate_key(raw: str | None) -> str | None:
    """The header's key, ``None`` when absent; :class:`IdempotencyKeyError` (400) when it
    is not 1-255 printable ASCII characters. Surrounding spaces are not trimmed: a key is
    compared byte for byte."""
    if raw is None:
        return None
    if not KEY_PATTERN.match(raw) or not raw.strip():
        raise IdempotencyKeyError(
            "invalid_idempotency_key", "Idempotency-Key must be 1-255 printable ASCII characters."
        )
    return raw


def fingerprint(method: str, path: str, body: Any) -> str:
    """SHA-256 of the request: method, path and the JSON body in canonical form (sorted
    keys, no spaces), so the same request spelled differently is still the same request.
    An empty body counts as ``{}``."""
    canonical = json.dumps({} if body is None else body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{method.upper()}\n{path}\n{canonical}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Replay:
    """A stored answer to send again."""

    status: int
    body: str


@dataclass(frozen=True, slots=True)
class Claim:
    """This request holds the key; :func:`finish` or :func:`release` it."""

    record_id: int


def claim(
    session_factory: Callable[[], Session],
    *,
    scope: str,
    key: str,
    request_fingerprint: str,
    ttl_hours: int,
    now: datetime | None = None,
) -> Claim | Replay:
    """Claim ``key`` for this request, or return the stored answer to replay.

    Raises :class:`IdempotencyKeyError` 422 ``idempotency_key_reused`` (another request
    used this key) or 409 ``idempotency_key_in_flight`` (its first request is running).
    """
    now = now or utcnow()

    def work(session: Session) -> Claim | Replay:
        inserted = _insert_in_flight(session, scope, key, request_fingerprint, now, ttl_hours)
        record = _locked_record(session, scope, key)
        if inserted:
            _purge(session, now, limit=OPPORTUNISTIC_PURGE_BATCH)
            return Claim(record.id)
        if _aware(record.expires_at) <= now:
            # Expired but not purged yet: the key starts afresh, as a new request.
            _restart(record, request_fingerprint, now, ttl_hours)
            return Claim(record.id)
        if record.fingerprint != request_fingerprint:
            raise IdempotencyKeyError(
                "idempotency_key_reused",
                "This Idempotency-Key was used with a different request (method, path or body).", kind=Kind.REFUSED,
            )
        if record.status == DONE:
            assert record.response_status is not None and record.response_body is not None
            return Replay(record.response_status, record.response_body)
        if _aware(record.locked_at) <= now - timedelta(seconds=IN_FLIGHT_TAKEOVER_SECONDS):
            log.warning("taking over an abandoned Idempotency-Key", extra={"scope": scope})
            record.locked_at = now
            return Claim(record.id)
        raise IdempotencyKeyError(
            "idempotency_key_in_flight",
            "A request with this Idempotency-Key is still being processed; retry shortly.", kind=Kind.CONFLICT,
        )

    return run_in_transaction(session_factory, work)


def _insert_in_flight(
    session: Session, scope: str, key: str, request_fingerprint: str, now: datetime, ttl_hours: int
) -> bool:
    """The claim of a key not used yet: its row, ``in_flight`` from ``now``. False when the
    ``(scope, key)`` row exists already (the unique key makes this atomic)."""
    return insert_ignore(
        session,
        IdempotencyRecord,
        {
            "scope": scope,
            "key": key,
            "fingerprint": request_fingerprint,
            "status": IN_FLIGHT,
            "created_at": now,
            "locked_at": now,
            "expires_at": now + timedelta(hours=ttl_hours),
        },
    )


def _locked_record(session: Session, scope: str, key: str) -> IdempotencyRecord:
    # populate_existing: what is decided must be the row as the lock holds it, not a copy
    # the session read before.
    return session.execute(
        select(IdempotencyRecord)
        .where(IdempotencyRecord.scope == scope, IdempotencyRecord.key == key)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()


def finish(session_factory: Callable[[], Session], held: Claim, status: int, body: str) -> None:
    """Store the final answer for the held key (replayed from now on)."""

    def work(session: Session) -> None:
        record = session.get(IdempotencyRecord, held.record_id, with_for_update=True)
        if record is None:  # purged meanwhile (a request that outlived the TTL): nothing to keep
            return
        record.status = DONE
        record.response_status = status
        record.response_body = body

    run_in_transaction(session_factory, work)


def release(session_factory: Callable[[], Session], held: Claim) -> None:
    """Forget the held key without an answer (transient failure): a retry does the work."""

    def work(session: Session) -> None:
        session.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.id == held.record_id, IdempotencyRecord.status == IN_FLIGHT
            )
        )

    run_in_transaction(session_factory, work)


def purge_expired_idempotency_keys(session_factory: Callable[[], Session], now: datetime | None = None) -> int:
    """Delete every key that expired at or before ``now``; returns how many."""
    now = now or utcnow()
    return run_in_transaction(session_factory, lambda session: _purge(session, now, limit=None))


def _purge(session: Session, now: datetime, *, limit: int | None) -> int:
    # Not a key someone still holds: an in-flight key past its TTL is left to its holder
    # until the holder must be gone. SKIP LOCKED: two purges never wait on each other.
    abandoned = now - timedelta(seconds=IN_FLIGHT_TAKEOVER_SECONDS)
    expired = (
        select(IdempotencyRecord.id)
        .where(
            IdempotencyRecord.expires_at <= now,
            (IdempotencyRecord.status == DONE) | (IdempotencyRecord.locked_at <= abandoned),
        )
        .order_by(IdempotencyRecord.id)
        .with_for_update(skip_locked=True)
    )
    if limit is not None:
        expired = expired.limit(limit)
    ids = list(session.scalars(expired))
    if not ids:
        return 0
    session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.id.in_(ids)))
    return len(ids)


def _restart(record: IdempotencyRecord, request_fingerprint: str, now: datetime, ttl_hours: int) -> None:
    record.fingerprint = request_fingerprint
    record.status = IN_FLIGHT
    record.response_status = None
    record.response_body = None
    record.created_at = now
    record.locked_at = now
    record.expires_at = now + timedelta(hours=ttl_hours)


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for timezone-aware columns; they were written in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=utcnow().tzinfo)
