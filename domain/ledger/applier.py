"""The applier: turns stored events (the inbox) into ledger rows, in batches.

Guarantees:

* **Once.** An event is marked ``applied`` in the same transaction as its effects, so a
  crash or ``kill -9`` at any point leaves it either applied with its effects or still
  waiting without them; it is never applied twice. A batch is claimed with ``FOR UPDATE
  SKIP LOCKED``, so several appliers (threads, processes, hosts) are safe together.
* **One batch at a time.** On PostgreSQL a batch first takes a transaction-scoped advisory
  lock (``pg_try_advisory_xact_lock``); an applier that does not get it waits for the next
  round. Batches applied side by side deadlocked on each other (the events of one order
  or PaymentIntent spread over consecutive batches, each batch taking order and
  PaymentIntent locks for many events): measured with two appliers and 20,000 events, 89
  deadlocks and a third of one applier's rate. Several appliers are therefore a hot
  standby for each other, not a speed-up. On SQLite the write lock does the same.
* **One bad event never blocks its batch.** Each event runs in a savepoint; one that
  raises is rolled back alone and recorded ``failed`` (attempt count, last error, the next
  try after an exponential backoff) while the batch commits the others. A lost race
  (deadlock, lock timeout) is not a failure: the event is simply claimed again.
* **Oldest first.** Batches are claimed in Stripe ``created`` order, and applied in that
  order within a batch. Across batches (several appliers) the ledger's own rules make the
  result independent of the order (``as_of`` guards, late linking).
* **Alerted once.** An event whose apply has failed ``alert_after`` times raises one alert
  (keyed ``poison-event:<id>``, so the reconcile pass never repeats it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Mapping

from sqlalchemy import ColumnElement, TextClause, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from domain.ledger import charge_batch
from domain.ledger.envelope import EnvelopeError, EventEnvelope, parse_envelope
from domain.ledger.handlers import HANDLERS, PLAIN_CHARGE_HANDLER, PLAIN_CHARGE_TYPES, CheckoutLinking, Handler
from domain.ledger.inbox import PENDING_SQL
from models.ledger import EventStatus
from domain.stripe.shapes import ShapeError, charge_snapshot
from models import ApplierHeartbeat, EventFailure, StripeEvent, run_in_transaction, table_of, utcnow
from models.db import insert_ignore, is_retryable, one_of

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
BACKOFF_BASE_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 3600.0
HEARTBEAT_SECONDS = 2.0
# Alert(key, subject, body) -> whether it went out now; see domain/alerts.py.
AlertSender = Callable[[str, str, str], bool]


def _transaction_lost(exc: BaseException) -> bool:
    """The batch's connection or transaction is unusable (the server went away): no event
    can be applied in it any more, so the batch is abandoned and run again."""
    from sqlalchemy.exc import DBAPIError, PendingRollbackError

    return isinstance(exc, PendingRollbackError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def backoff(attempts: int) -> timedelta:
    """How long a failed event waits before its next try: 2 s, 4 s, 8 s ... at most 1 h."""
    return timedelta(seconds=min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, attempts - 1)))


@dataclass(slots=True)
class BatchOutcome:
    """What one batch did."""

    claimed: int = 0
    applied: int = 0
    failed: int = 0
    retried: int = 0  # lost a race; left for the next batch
    busy: bool = False  # another applier was applying a batch
    alerts: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DrainOutcome:
    """What a drain did, and what it left behind."""

    applied: int
    failed: int
    pending: int  # still to apply (in backoff, or the time ran out)
    timed_out: bool


@dataclass(frozen=True, slots=True)
class _Claimed:
    event_id: str
    type: str
    attempts: int
    payload: str


class Applier:
    """Applies the inbox; see the module docstring for the guarantees."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        linking: CheckoutLinking = CheckoutLinking(),
        batch_size: int = 200,
        alert_after: int = 5,
        alert: AlertSender | None = None,
        handlers: Mapping[str, Handler] = HANDLERS,
        set_based: bool = True,
        name: str | None = None,
        linger_seconds: float = 0.0,
    ) -> None:
        self._session_factory = session_factory
        self._linger_seconds = linger_seconds
        self._linking = linking
        self._batch_size = batch_size
        self._alert_after = alert_after
        self._alert = alert
        self._handlers = handlers
        self._set_based = set_based
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10_000}"
        self.applied_total = 0
        self.failed_total = 0

    @property
    def batch_size(self) -> int:
        return self._batch_size

    # -- one batch -------------------------------------------------------------------------

    def apply_batch(self) -> BatchOutcome:
        """Claim up to ``batch_size`` ready events and apply them in one transaction."""
        outcome = run_in_transaction(self._session_factory, self._apply_batch)
        self.applied_total += outcome.applied
        self.failed_total += outcome.failed
        if self._alert is not None:
            for key, subject, body in outcome.alerts:
                try:
                    self._alert(key, subject, body)
                except Exception:  # noqa: BLE001 - an alert channel never stops the applier
                    log.exception("alert for a failing event not sent", extra={"alert_key": key})
        return outcome

    def _apply_batch(self, session: Session) -> BatchOutcome:
        now = utcnow()
        if not self._take_turn(session):
            return BatchOutcome(busy=True)
        claimed = self._claim(session, now)
        outcome = BatchOutcome(claimed=len(claimed))
        if not claimed:
            return outcome
        events: list[EventEnvelope] = []
        failures: dict[str, BaseException] = {}
        for row in claimed:
            try:
                events.append(parse_envelope(row.payload))
            except EnvelopeError as exc:
                failures[row.event_id] = exc
        applied = self._apply_set_based(session, events) if self._set_based else set()
        for event in events:
            if event.id in applied:
                continue
            handler = self._handlers.get(event.type)
            try:
                with session.begin_nested():
                    if handler is not None:
                        handler(session, event, self._linking)
            except Exception as exc:  # noqa: BLE001 - recorded on the event, never fatal to the batch
                if _transaction_lost(exc):
                    raise  # the connection or the transaction is gone: the whole batch runs again
                if is_retryable(exc):
                    outcome.retried += 1
                    continue
                failures[event.id] = exc
                log.error("event failed to apply", extra={"event_id": event.id, "event_type": event.type, "error": str(exc)[:200]})
                continue
            applied.add(event.id)
        self._mark_applied(session, [r for r in claimed if r.event_id in applied], now)
        for row in claimed:
            if row.event_id in failures:
                outcome.alerts.extend(self._record_failure(session, row, failures[row.event_id], now))
        outcome.applied = len(applied)
        outcome.failed = len(failures)
        return outcome

    @staticmethod
    def _take_turn(session: Session) -> bool:
        """The batch lock (PostgreSQL); released with the transaction."""
        if session.get_bind().dialect.name != "postgresql":
            return True
        if not session.scalar(text("SELECT pg_try_advisory_xact_lock(hashtext('reconciler'), hashtext('applier-batch'))")):
            return False
        # Every statement of a batch looks rows up by key among the batch's ids. Planner
        # statistics trail a table that grows fast (a fresh install's first burst, before
        # autovacuum's next ANALYZE): the estimate stays at the last analysed size and
        # the planner picks sequential scans, whose cost then grows with the table
        # (measured: the batch's order lock went from 0.3 ms to 53 ms at 20,000 orders).
        # Index paths exist for every one of them; this transaction takes them.
        session.execute(text("SET LOCAL enable_seqscan = off"))
        return True

    def _claim(self, session: Session, now: datetime) -> list[_Claimed]:
        statement = (
            select(StripeEvent.event_id, StripeEvent.type, StripeEvent.attempts, StripeEvent.payload)
            .where(*_ready(now))
            .order_by(StripeEvent.created, StripeEvent.event_id)
            .limit(self._batch_size)
            .with_for_update(skip_locked=True)
        )
        return [_Claimed(*row) for row in session.execute(statement)]

    def _apply_set_based(self, session: Session, events: list[EventEnvelope]) -> set[str]:
        """The events whose charge is new to the ledger, applied together (see
        domain/ledger/charge_batch.py); the rest, and all of them if that raises, are left
        to the per-event savepoints."""
        candidates: dict[str, charge_batch.NewCharge] = {}
        repeated: set[str] = set()
        for event in events:
            if event.type not in PLAIN_CHARGE_TYPES or self._handlers.get(event.type) is not PLAIN_CHARGE_HANDLER:
                continue
            try:
                snapshot = charge_snapshot(event.object)
            except ShapeError:
                continue  # the per-event path records the failure
            if not charge_batch.eligible(snapshot):
                continue
            if snapshot.id in candidates:
                repeated.add(snapshot.id)
            candidates[snapshot.id] = (event, snapshot)
        items = [item for charge_id, item in candidates.items() if charge_id not in repeated]
        if len(items) < 2:
            return set()
        try:
            with session.begin_nested():
                return charge_batch.apply_new_charges(session, items)
        except Exception as exc:  # noqa: BLE001 - the per-event path isolates the culprit
            log.info("set-based charge apply fell back to one event at a time: %s", type(exc).__name__)
            return set()

    @staticmethod
    def _mark_applied(session: Session, rows: list[_Claimed], now: datetime) -> None:
        if not rows:
            return
        session.execute(
            update(StripeEvent)
            .where(one_of(session, StripeEvent.event_id, [r.event_id for r in rows]))
            .values(status=EventStatus.APPLIED.value, applied_at=now, next_attempt_at=None)
            .execution_options(synchronize_session=False)
        )
        retried = [r.event_id for r in rows if r.attempts > 0]
        if retried:
            session.execute(
                update(EventFailure)
                .where(one_of(session, EventFailure.event_id, retried), EventFailure.resolved_at.is_(None))
                .values(resolved_at=now)
                .execution_options(synchronize_session=False)
            )

    def _record_failure(self, session: Session, row: _Claimed, exc: BaseException, now: datetime) -> list[tuple[str, str, str]]:
        attempts = row.attempts + 1
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        session.execute(
            update(StripeEvent)
            .where(StripeEvent.event_id == row.event_id)
            .values(status=EventStatus.FAILED.value, attempts=attempts, next_attempt_at=now + backoff(attempts))
            .execution_options(synchronize_session=False)
        )
        event_type = row.type
        values = {"type": event_type, "attempts": attempts, "last_error": error, "last_failed_at": now, "resolved_at": None}
        if not insert_ignore(session, EventFailure, {"event_id": row.event_id, "first_failed_at": now, **values}):
            session.execute(
                update(EventFailure).where(EventFailure.event_id == row.event_id).values(**values)
                .execution_options(synchronize_session=False)
            )
        if attempts != self._alert_after:
            return []
        return [(
            f"poison-event:{row.event_id}",
            f"Webhook event {row.event_id} ({event_type}) keeps failing",
            f"{attempts} attempt(s); last error: {error}. It is retried with backoff; "
            f"GET /api/events/{row.event_id} shows where it stands.",
        )]

    # -- loops -----------------------------------------------------------------------------

    def drain(self, *, timeout: float | None = None, clock: Callable[[], float] = time.monotonic) -> DrainOutcome:
        """Apply batches until no event is ready (events in backoff wait for their time)
        or ``timeout`` seconds have passed. Safe beside other appliers."""
        deadline = None if timeout is None else clock() + timeout
        applied = failed = 0
        timed_out = False
        while True:
            outcome = self.apply_batch()
            applied += outcome.applied
            failed += outcome.failed
            if outcome.claimed == 0 and not outcome.busy and not self._others_hold_work():
                break
            if outcome.claimed == 0:
                time.sleep(0.02)  # another applier is applying; let it commit
            if deadline is not None and clock() >= deadline:
                timed_out = True
                break
        return DrainOutcome(applied, failed, pending_count(self._session_factory), timed_out)

    def _others_hold_work(self) -> bool:
        """Events ready to apply that this applier could not claim (another one holds
        them in its batch)."""
        def count(session: Session) -> int:
            return session.scalar(
                select(func.count()).select_from(StripeEvent).where(*_ready(utcnow()))
            ) or 0
        with self._session_factory() as session:
            return count(session) > 0

    def run(
        self,
        stop: threading.Event,
        *,
        pause: threading.Event | None = None,
        idle_seconds: float = 0.05,
        max_idle_seconds: float = 0.5,
    ) -> None:
        """Apply until ``stop`` is set: batches back to back while there is work, polling
        (50 ms, growing to 500 ms when idle) otherwise, and a heartbeat every 2 s; no
        batch while ``pause`` is set (another applier of this process has taken over). An
        error (the database down) is logged and retried with backoff; it never ends the
        loop."""
        idle = idle_seconds
        next_beat = 0.0
        failures_in_a_row = 0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_beat:
                    self.beat()
                    next_beat = time.monotonic() + HEARTBEAT_SECONDS
                if pause is not None and pause.is_set():
                    stop.wait(idle_seconds)
                    continue
                outcome = self.apply_batch()
                failures_in_a_row = 0
            except Exception:  # noqa: BLE001 - the loop outlives any one failure
                failures_in_a_row += 1
                log.exception("applier batch failed; retrying")
                stop.wait(min(30.0, 0.5 * 2 ** min(failures_in_a_row, 6)))
                continue
            if outcome.claimed:
                idle = idle_seconds
                if self._should_linger(outcome.claimed):
                    stop.wait(self._linger_seconds)
                continue
            if outcome.busy:
                stop.wait(idle_seconds)  # another applier's turn; take the next one
                continue
            stop.wait(idle)
            idle = min(max_idle_seconds, idle * 1.5)
        try:
            self.beat(stopping=True)
        except Exception:  # noqa: BLE001
            pass

    def _should_linger(self, claimed: int) -> bool:
        """Whether to let the next batch fill up before claiming it: only in a burst (the
        batch just applied held at least a tenth of ``batch_size`` yet was not full). A
        few large batches cost the database and this process less per event than many
        small ones, and leave the cores to the accept path, which Stripe waits on; a
        lone event (claimed below that) is applied at once."""
        return self._linger_seconds > 0 and max(2, self._batch_size // 10) <= claimed < self._batch_size

    def beat(self, *, stopping: bool = False) -> None:
        """Record this applier as alive (or remove it when stopping)."""
        def work(session: Session) -> None:
            now = utcnow()
            if stopping:
                heartbeats = table_of(ApplierHeartbeat)
                session.execute(heartbeats.delete().where(heartbeats.c.name == self.name))
                return
            if not insert_ignore(
                session,
                ApplierHeartbeat,
                {"name": self.name, "started_at": now, "beat_at": now, "applied": self.applied_total, "failed": self.failed_total},
            ):
                session.execute(
                    update(ApplierHeartbeat)
                    .where(ApplierHeartbeat.name == self.name)
                    .values(beat_at=now, applied=self.applied_total, failed=self.failed_total)
                    .execution_options(synchronize_session=False)
                )
        run_in_transaction(self._session_factory, work)


# -- what the inbox holds (health, metrics, the pass) ------------------------------------------


@dataclass(frozen=True, slots=True)
class InboxState:
    """The backlog: events still to apply, how old the oldest is, and the appliers seen."""

    pending: int
    failed: int
    oldest_pending_seconds: float | None
    last_heartbeat_seconds: float | None
    appliers: int


def _ready(now: datetime) -> tuple[TextClause, ColumnElement[bool]]:
    """Events to apply now: received or failed (the literal predicate is the partial
    index's own, so PostgreSQL uses it), and not waiting out a backoff."""
    return text(PENDING_SQL), (StripeEvent.next_attempt_at.is_(None)) | (StripeEvent.next_attempt_at <= now)


def oldest_ready_seconds(session_factory: sessionmaker[Session]) -> float | None:
    """How long the next event to apply (the oldest ready one, in the claim's order) has
    waited since it was received; None when none is ready. The first entry of the inbox's
    index, whatever the backlog."""
    now = utcnow()
    with session_factory() as session:
        received = session.scalar(
            select(StripeEvent.received_at)
            .where(*_ready(now))
            .order_by(StripeEvent.created, StripeEvent.event_id)
            .limit(1)
        )
    return _age(now, received)


def pending_count(session_factory: sessionmaker[Session]) -> int:
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(StripeEvent).where(text(PENDING_SQL))) or 0


def inbox_state(session: Session, *, live_within_seconds: float = 10 * HEARTBEAT_SECONDS) -> InboxState:
    """Read the backlog and the appliers' heartbeats (a few index reads)."""
    now = utcnow()
    pending, failed, oldest = session.execute(
        select(
            func.count(),
            func.count().filter(StripeEvent.status == EventStatus.FAILED.value),
            func.min(StripeEvent.received_at),
        ).select_from(StripeEvent).where(text(PENDING_SQL))
    ).one()
    last_beat = session.scalar(select(func.max(ApplierHeartbeat.beat_at)))
    live = session.scalar(
        select(func.count()).select_from(ApplierHeartbeat).where(
            ApplierHeartbeat.beat_at >= now - timedelta(seconds=live_within_seconds)
        )
    ) or 0
    return InboxState(
        pending=pending or 0,
        failed=failed or 0,
        oldest_pending_seconds=_age(now, oldest),
        last_heartbeat_seconds=_age(now, last_beat),
        appliers=live,
    )


def _age(now: datetime, then: datetime | None) -> float | None:
    if then is None:
        return None
    if then.tzinfo is None:  # SQLite hands back naive UTC
        then = then.replace(tzinfo=now.tzinfo)
    return max(0.0, (now - then).total_seconds())
