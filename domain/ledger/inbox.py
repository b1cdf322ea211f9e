"""The accept path: verify a webhook, store the raw event once, answer.

Guarantees:

* Nothing is stored unless the body is at most ``WEBHOOK_MAX_BYTES``, carries a valid
  ``Stripe-Signature`` for one of the configured secrets within the tolerance, and is a
  well-formed Stripe event envelope.
* An event id is stored at most once, across threads, processes and hosts: one
  ``INSERT ... ON CONFLICT DO NOTHING`` on the primary key. Every later copy is answered
  ``duplicate``.
* The answer follows the commit: :meth:`Inbox.store` returns only once the row is durable
  (on PostgreSQL the insert runs in autocommit, so the statement's return *is* its commit,
  with ``synchronous_commit`` as the server has it; concurrent requests of one process
  share one statement: :class:`GroupInsert` with threads, :class:`AsyncGroupInsert` on an
  event loop, where on SQLite they share one transaction). When it cannot store, it raises
  :class:`~domain.errors.Unavailable` and nothing is half-stored: Stripe redelivers.
* Nothing else happens here: the applier (:mod:`domain.ledger.applier`) turns stored
  events into ledger rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Collection, Iterator

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import PoolProxiedConnection

from domain.stripe.gateway import WebhookSignatureError, verify_webhook
from config import Settings
from domain.errors import Rejected, Unavailable
from domain.ledger.envelope import EventEnvelope, parse_envelope
from domain.ledger.handlers import HANDLERS, CheckoutLinking
from models import StripeEvent, table_of, utcnow
from models.ledger import EventStatus
from models.db import connect_async, dialect_insert, insert_unnested

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)


_ROW_KEYS = (
    "event_id", "type", "api_version", "livemode", "account", "created", "received_at", "status", "object_id",
    "payload", "attempts",
)


def _is_disconnect(engine: Engine, exc: BaseException) -> bool:
    """Whether the driver says the connection is gone (then it leaves the pool)."""
    dbapi = engine.dialect.dbapi
    if dbapi is None or not isinstance(exc, dbapi.Error):
        return False
    return bool(engine.dialect.is_disconnect(exc, None, None))


@contextlib.contextmanager
def _pooled(engine: Engine) -> Iterator[PoolProxiedConnection]:
    """A pooled connection for work on the driver itself: invalidated when the driver says
    it is gone (so the pool does not hand it out again), returned to the pool afterwards."""
    connection = engine.raw_connection()
    try:
        yield connection
    except BaseException as exc:
        if _is_disconnect(engine, exc):
            connection.invalidate(exc)
        raise
    finally:
        if connection.dbapi_connection is not None:
            connection.close()


PENDING_SQL = "status IN ('received', 'failed')"  # the predicate of ix_stripe_events_inbox


@dataclass(frozen=True, slots=True)
class Accepted:
    """What the accept path did with one delivery."""

    status: str  # received | duplicate | ignored
    event_id: str
    event_type: str
    reason: str | None = None  # why ignored


@dataclass(eq=False, slots=True)
class _Slot:
    """One request's row in a group insert, and what became of it."""

    row: dict[str, Any]
    done: bool = False
    inserted: bool = False
    error: BaseException | None = None
    # Held from creation; released once to wake the request (its statement committed, or
    # it is to lead the next one). A bare lock is CPython's cheapest wake-up.
    _signal: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._signal.acquire()

    def wait(self) -> None:
        self._signal.acquire()

    def wake(self) -> None:
        self._signal.release()


class StoreFailed(Exception):
    """The statement that carried this request's row failed (its error is ``__cause__``)."""


class GroupInsert:
    """The inserts of one process's concurrent requests in one statement and one commit
    (PostgreSQL): group commit with a leader.

    A request queues its row. If no statement is in flight it leads: it takes every row
    queued at that moment (at most ``max_rows``) and inserts them with one ``INSERT ...
    SELECT unnest(...) ON CONFLICT DO NOTHING RETURNING event_id`` in autocommit. Otherwise it
    sleeps until the leader wakes it, either because its row was carried (then it returns)
    or to lead the next statement, with every row that queued meanwhile. So:

    * a request returns only after the commit of the statement that carried its row (the
      answer follows the commit; ``synchronous_commit`` is the server's);
    * the statement is atomic: when it fails, every request it carried gets
      :class:`StoreFailed` and none of its rows is stored;
    * while one statement is in flight the next batch forms behind it, so the busier the
      worker, the fewer statements and commits per event; an idle worker sends each row
      alone, as soon as it comes;
    * each request is woken once, directly, by the leader (not by handing a lock from one
      waiter to the next, which put a context switch and a GIL hand-off per request in
      series before the next statement could start);
    * two copies of one event in one statement: the first is inserted, the other is a
      duplicate (``DO NOTHING`` skips it).
    """

    def __init__(self, engine: Engine, keys: tuple[str, ...], *, max_rows: int = 64) -> None:
        self._engine = engine
        self._keys = keys
        self._max_rows = max_rows
        self._statement = _GroupStatement(engine, keys)
        self._pending: list[_Slot] = []
        self._guard = threading.Lock()  # _pending, _leading
        self._leading = False  # a request is leading (taking or running a statement)
        self._flush = threading.Lock()  # held by the leader while it takes and runs its batch

    def insert(self, row: dict[str, Any]) -> bool:
        """Store ``row`` once by event id; True when this row was the one inserted."""
        slot = _Slot(row)
        with self._guard:
            self._pending.append(slot)
            lead, self._leading = not self._leading, True
        if not lead:
            slot.wait()
        if not slot.done:  # leading: now, or woken to lead the next statement
            self._lead(slot)
        if slot.error is not None:
            raise StoreFailed(type(slot.error).__name__) from slot.error
        return slot.inserted

    def _lead(self, own: _Slot) -> None:
        """Run one statement with the queued rows (``own`` is the first of them), wake every
        request it carried, and wake the first row queued since to lead the next one."""
        batch: list[_Slot] = []
        try:
            with self._flush:
                with self._guard:
                    batch = self._pending[: self._max_rows]
                    del self._pending[: self._max_rows]
                assert own in batch  # a leader's row is the oldest queued
                self._run(batch)
        finally:
            with self._guard:
                successor = self._pending[0] if self._pending else None
                self._leading = successor is not None
            for slot in batch:
                if not slot.done:  # _run never returns without an outcome; a BaseException did
                    slot.error, slot.done = RuntimeError("the group insert was interrupted"), True
                if slot is not own:
                    slot.wake()
            if successor is not None:
                successor.wake()

    def _run(self, batch: list[_Slot]) -> None:
        rows = [slot.row for slot in batch]
        params = _unnest_params(self._keys, rows)
        try:
            with _pooled(self._engine) as connection:
                driver = connection.driver_connection
                assert driver is not None  # None only once the connection is invalidated or closed
                driver.autocommit = True
                try:
                    inserted = {row[0] for row in driver.execute(self._statement.sql, params).fetchall()}
                finally:
                    driver.autocommit = False
        except Exception as exc:  # noqa: BLE001 - handed to every request the statement carried
            for slot in batch:
                slot.error, slot.done = exc, True
            return
        for slot, was_inserted in zip(batch, _outcomes(rows, inserted)):
            slot.inserted, slot.done = was_inserted, True


class _GroupStatement:
    """The statement of a group insert: one INSERT for any number of rows
    (:func:`models.db.insert_unnested`), compiled once for the engine's dialect; the 3 kB
    payloads go in a binary array with nothing to escape."""

    def __init__(self, engine: Engine, keys: tuple[str, ...]) -> None:
        self._engine, self._keys = engine, keys
        self._sql: str | None = None

    @property
    def sql(self) -> str:
        if self._sql is None:
            statement = insert_unnested(table_of(StripeEvent), self._keys)
            self._sql = str(statement.compile(dialect=self._engine.dialect))
        return self._sql


def _unnest_params(keys: tuple[str, ...], rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {key: [row[key] for row in rows] for key in keys}


def _outcomes(rows: list[dict[str, Any]], inserted: set[str]) -> list[bool]:
    """Per row, in order: whether it was the one inserted (of two copies of one event in a
    statement, the first is; ``DO NOTHING`` skipped the other)."""
    outcomes = []
    for row in rows:
        outcomes.append(row["event_id"] in inserted)
        inserted.discard(row["event_id"])
    return outcomes


class AsyncGroupInsert:
    """:class:`GroupInsert` for an asyncio event loop (the ASGI lane, app/asgi.py): the
    rows of the requests one loop is handling at a moment are written together by
    ``write_rows`` (one statement and one commit), while the next batch forms behind it.

    The guarantees are GroupInsert's: :meth:`insert` returns only after the commit that
    carried its row; when ``write_rows`` fails, every request it carried gets
    :class:`StoreFailed` and none of its rows is stored; two copies of one event in one
    batch are one insert and one duplicate. One instance serves one event loop at a time.
    """

    def __init__(self, write_rows: Callable[[list[dict[str, Any]]], Awaitable[set[str]]], *, max_rows: int = 64) -> None:
        self._write_rows = write_rows
        self._max_rows = max_rows
        self._pending: list[tuple[dict[str, Any], asyncio.Future[bool]]] = []
        self._draining: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def insert(self, row: dict[str, Any]) -> bool:
        """Store ``row`` once by event id; True when this row was the one inserted."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # the rows and the task of a loop that has ended are nobody's
            self._loop, self._draining, self._pending = loop, None, []
        future: asyncio.Future[bool] = loop.create_future()
        self._pending.append((row, future))
        if self._draining is None:
            self._draining = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Write batches until no row is queued. Nothing awaits between the last check of
        the queue and the end of this task, so a row queued later starts a new one."""
        try:
            while self._pending:
                batch = self._pending[: self._max_rows]
                del self._pending[: self._max_rows]
                await self._run(batch)
        finally:
            self._draining = None

    async def _run(self, batch: list[tuple[dict[str, Any], asyncio.Future[bool]]]) -> None:
        rows = [row for row, _ in batch]
        try:
            try:
                outcomes = _outcomes(rows, await self._write_rows(rows))
            except Exception as exc:  # noqa: BLE001 - handed to every request the batch carried
                for _, future in batch:
                    if not future.done():
                        failure = StoreFailed(type(exc).__name__)
                        failure.__cause__ = exc
                        future.set_exception(failure)
                return
        except BaseException:  # cancelled (the loop is stopping): nobody waits in vain
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreFailed("the group insert was interrupted"))
            raise
        for (_, future), was_inserted in zip(batch, outcomes):
            if not future.done():  # its request may have been cancelled
                future.set_result(was_inserted)


class _LoopConnectionWriter:
    """PostgreSQL rows for :class:`AsyncGroupInsert`: the group statement in autocommit on
    the event loop's own connection (its return is its commit). A connection the driver
    reports broken is dropped, and the next batch opens a new one; so is one opened by a
    loop that has ended."""

    def __init__(self, engine: Engine, keys: tuple[str, ...]) -> None:
        self._engine = engine
        self._keys = keys
        self._statement = _GroupStatement(engine, keys)
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, rows: list[dict[str, Any]]) -> set[str]:
        loop = asyncio.get_running_loop()
        if self._connection is None or loop is not self._loop:
            self._connection, self._loop = await connect_async(self._engine), loop
        try:
            cursor = await self._connection.execute(self._statement.sql, _unnest_params(self._keys, rows))
            return {found[0] for found in await cursor.fetchall()}
        except Exception:
            if self._connection.broken:
                self._connection = None
            raise


def _insert_in_one_transaction(engine: Engine, sql: str, positions: list[str] | None, rows: list[dict[str, Any]]) -> set[str]:
    """SQLite: each row's ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` in one ``BEGIN
    IMMEDIATE`` transaction, committed before this returns; the ids inserted. Any error
    rolls the whole transaction back."""
    inserted: set[str] = set()
    with _pooled(engine) as connection:
        cursor = connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            for row in rows:
                params = row if positions is None else tuple(row[key] for key in positions)
                if cursor.execute(sql, params).fetchone() is not None:
                    inserted.add(row["event_id"])
            cursor.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                cursor.execute("ROLLBACK")
            raise
        finally:
            cursor.close()
    return inserted


class Inbox:
    """Stores verified events once; see the module docstring for the guarantees."""

    def __init__(self, settings: Settings, engine: Engine, *, handled_types: Collection[str] = frozenset(HANDLERS)) -> None:
        self._settings = settings
        self._handled = frozenset(handled_types)
        self.checkout_linking = CheckoutLinking.from_settings(settings)
        table = table_of(StripeEvent)
        self._engine = engine
        self._autocommit = engine.dialect.name == "postgresql"
        insert = dialect_insert(engine.dialect.name)
        # The statement is built from the model's table and compiled once for this
        # database; each request then runs it on the driver connection. SQLAlchemy's
        # per-execution machinery cost more CPU than the insert itself (measured: 0.44 ms
        # against 0.08 ms per event), on the path every webhook takes.
        statement = insert(table).on_conflict_do_nothing().returning(table.c.event_id)
        compiled = statement.compile(dialect=engine.dialect, column_keys=list(_ROW_KEYS))
        self._sql = str(compiled)
        self._positions = compiled.positiontup  # None for named parameters (psycopg)
        # PostgreSQL: concurrent requests share one statement and one commit.
        self._group = GroupInsert(engine, _ROW_KEYS) if self._autocommit else None
        self._async_group = AsyncGroupInsert(
            _LoopConnectionWriter(engine, _ROW_KEYS) if self._autocommit
            # SQLite: the requests of one loop share a transaction, written in a thread.
            else lambda rows: asyncio.to_thread(_insert_in_one_transaction, engine, self._sql, self._positions, rows)
        )
        # The column types' own conversions for this database (SQLite stores datetimes as
        # SQLAlchemy's text format), so rows read back the same as any other path's.
        self._processors = {
            key: processor
            for key in _ROW_KEYS
            if (processor := table.c[key].type.dialect_impl(engine.dialect).bind_processor(engine.dialect)) is not None
        }

    @property
    def settings(self) -> Settings:
        return self._settings

    def accept(self, payload: bytes, signature_header: str | None) -> Accepted:
        """Verify and store one delivery. Raises :class:`Rejected` for input that must not
        be stored and :class:`Unavailable` when it cannot be stored now."""
        event, text_payload = self._verified(payload, signature_header)
        return self._store(event, text_payload)

    async def accept_async(self, payload: bytes, signature_header: str | None) -> Accepted:
        """:meth:`accept` for a caller on an asyncio event loop: the same checks, answers and
        errors. The row goes through the loop's :class:`AsyncGroupInsert`: on PostgreSQL
        on the loop's own connection, on SQLite in one transaction per batch, written in a
        worker thread."""
        event, text_payload = self._verified(payload, signature_header)
        row = self._row(event, text_payload)
        if isinstance(row, Accepted):
            return row
        for attempt in (1, 2):
            try:
                return self._answer(event, await self._async_group.insert(row))
            except Exception as exc:  # noqa: BLE001 - classified, never swallowed
                self._retry_or_raise(exc, attempt, row)
        raise AssertionError("unreachable")

    def store(self, payload: bytes) -> Accepted:
        """Store an event whose origin is already established (one read from Stripe's
        Events API with our key): the same envelope checks, dedup and answers."""
        return self._store(parse_envelope(payload), payload.decode("utf-8"))

    def _verified(self, payload: bytes, signature_header: str | None) -> tuple[EventEnvelope, str]:
        settings = self._settings
        if not settings.stripe_webhook_secrets:
            raise Unavailable("webhook_secret_not_configured", "STRIPE_WEBHOOK_SECRET is not set on this server.")
        if len(payload) > settings.webhook_max_bytes:
            raise Rejected("payload_too_large", f"Bodies over {settings.webhook_max_bytes} bytes are refused.")
        try:
            text_payload = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("invalid_encoding", "The body is not UTF-8.") from None
        try:
            verify_webhook(payload, signature_header, settings.stripe_webhook_secrets, tolerance=settings.stripe_webhook_tolerance)
        except WebhookSignatureError as exc:
            raise Rejected(exc.code, exc.message) from None
        return parse_envelope(payload), text_payload

    def _store(self, event: EventEnvelope, text_payload: str) -> Accepted:
        row = self._row(event, text_payload)
        if isinstance(row, Accepted):
            return row
        return self._answer(event, self._insert_once(row))

    def _row(self, event: EventEnvelope, text_payload: str) -> dict[str, Any] | Accepted:
        """The inbox row for ``event``, converted for this database; or the answer when
        the event is not to be stored."""
        if event.livemode != self._settings.stripe_livemode:
            # A live Connect endpoint also receives test events; a 4xx would make Stripe
            # retry them for days. Acknowledge and leave no trace.
            return Accepted("ignored", event.id, event.type, reason="livemode_mismatch")
        row = {
            "event_id": event.id,
            "type": event.type,
            "api_version": event.api_version,
            "livemode": event.livemode,
            "account": event.account,
            "created": event.created,
            "received_at": utcnow(),
            "status": (EventStatus.RECEIVED if event.type in self._handled else EventStatus.IGNORED).value,
            "object_id": event.object_id,
            "payload": text_payload,
            "attempts": 0,
        }
        for key, processor in self._processors.items():
            row[key] = processor(row[key])
        return row

    def _answer(self, event: EventEnvelope, inserted: bool) -> Accepted:
        if not inserted:
            return Accepted("duplicate", event.id, event.type)
        if event.type in self._handled:
            return Accepted("received", event.id, event.type)
        return Accepted("ignored", event.id, event.type, "type_not_applied")

    def _insert_once(self, row: dict[str, Any]) -> bool:
        # The insert is idempotent, so a connection the server dropped (restart, idle
        # timeout: the pool does not ping) or a lost race is simply sent again once.
        for attempt in (1, 2):
            try:
                if self._group is not None:
                    return self._group.insert(row)
                return self._insert_row(row)
            except Exception as exc:  # noqa: BLE001 - classified, never swallowed
                self._retry_or_raise(exc, attempt, row)
        raise AssertionError("unreachable")

    def _retry_or_raise(self, exc: Exception, attempt: int, row: dict[str, Any]) -> None:
        """After a failed insert: return to send it once more, raise :class:`Unavailable`
        when the database failed twice, re-raise anything that is not a database error."""
        dbapi = self._engine.dialect.dbapi
        assert dbapi is not None  # set on every engine made with a driver
        if not isinstance(exc, (dbapi.Error, DBAPIError, StoreFailed)):
            raise exc
        if attempt == 1:
            return
        log.error("event not stored: %s", exc.__class__.__name__, extra={"event_id": row["event_id"]})
        raise Unavailable("event_not_stored", "The event could not be stored; Stripe will redeliver it.") from exc

    def _insert_row(self, row: dict[str, Any]) -> bool:
        """SQLite: one INSERT ... ON CONFLICT DO NOTHING RETURNING in a BEGIN IMMEDIATE
        transaction of its own, committed before it returns."""
        return row["event_id"] in _insert_in_one_transaction(self._engine, self._sql, self._positions, [row])
