"""Engines, sessions and the unit-of-work helper, for PostgreSQL (psycopg 3) and SQLite.

SQLite is the embedded default: WAL so readers never block the writer, a busy timeout so
a writer waits instead of failing, and every transaction opened with ``BEGIN IMMEDIATE`` so
two writers serialise at BEGIN instead of deadlocking when both try to upgrade a read lock.

PostgreSQL gets a ``lock_timeout``: a transaction that waits on a row lock (another copy
of the same event, the same charge) longer than that fails with a retryable error instead
of hanging a web worker.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, TypeVar, Union

from sqlalchemy import ColumnElement, Connection, Engine, Insert, Table, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import QueryableAttribute, Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.pool import ConnectionPoolEntry

from models.base import Base, table_of

if TYPE_CHECKING:  # the dialects are imported when a statement needs them
    import sqlite3

    import psycopg

    from sqlalchemy.dialects import postgresql, sqlite

log = logging.getLogger(__name__)
T = TypeVar("T")
# The dialect's ``insert`` (see dialect_insert): both have ``on_conflict_do_nothing``.
DialectInsert = Callable[[Table], Union["postgresql.Insert", "sqlite.Insert"]]

SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_LOCK_TIMEOUT_MS = 5_000
# SQLSTATEs that mean "this transaction lost a race; run it again": serialization failure,
# deadlock detected, lock not available (lock_timeout).
_RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03"}
_READ_ONLY = "reconciler_read_only"


def make_engine(url: str, *, pool_size: int = 5, echo: bool = False) -> Engine:
    """Build an engine for ``url`` with the settings this service relies on."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # No directory is created here: a mistyped path must fail (models/availability.py
        # says so in one line), not leave folders behind. The default location's folder is
        # made by the command line (DEFAULT_SQLITE_PATH).
        engine = create_engine(url, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _configure_sqlite(engine)
        return engine
    engine = create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping (a round trip on every checkout): a connection the server closed
        # fails its first statement, SQLAlchemy then invalidates the pool, and
        # run_in_transaction runs the unit of work again on a fresh connection
        # (is_retryable: connection_invalidated). Reads answer 503 once.
        pool_pre_ping=False,
        connect_args={"options": _PG_OPTIONS},
    )
    _configure_postgresql(engine)
    return engine


_PG_OPTIONS = f"-c lock_timeout={PG_LOCK_TIMEOUT_MS}"


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        _prepare_psycopg(dbapi_connection)


def _prepare_psycopg(connection: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    # Python lists (the arrays of one_of's "= ANY(...)" and of the unnest inserts) go in
    # binary: the driver's text format quotes and escapes every element with a regular
    # expression, which was a sixth of the applier's CPU. Every such parameter is cast to
    # its column's array type in the SQL, so the element type the binary format names
    # (text, int8, timestamptz...) never decides anything.
    from psycopg.types.array import ListBinaryDumper

    connection.adapters.register_dumper(list, ListBinaryDumper)


async def connect_async(engine: Engine) -> psycopg.AsyncConnection[Any]:
    """An asyncio connection (autocommit) to ``engine``'s PostgreSQL database, set up as the
    engine's own connections are (``lock_timeout``, lists in binary). For the accept path
    on an event loop (domain/ledger/inbox.py, AsyncGroupInsert)."""
    import psycopg

    dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await psycopg.AsyncConnection.connect(dsn, autocommit=True, options=_PG_OPTIONS)
    _prepare_psycopg(connection)
    return connection


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        # Take transaction control away from the sqlite3 module so BEGIN is ours (below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Readers (see make_read_session_factory) take no write lock: in WAL mode they
        # read a snapshot while the writer works.
        if connection.get_execution_options().get(_READ_ONLY):
            connection.exec_driver_sql("BEGIN DEFERRED")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: a unit of work returns plain values read inside it, and they
    # must stay readable after the commit without another round trip.
    return sessionmaker(bind=engine, expire_on_commit=False)


def make_read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for reads only (API views, health). On SQLite they begin DEFERRED, so they
    never queue behind a writer; elsewhere they are ordinary sessions."""
    return sessionmaker(bind=engine.execution_options(**{_READ_ONLY: True}), expire_on_commit=False)


def is_retryable(exc: BaseException) -> bool:
    """True when ``exc`` means the transaction lost a race and may simply run again."""
    if isinstance(exc, StaleDataError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True  # the server closed the connection; a fresh one is taken
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if sqlstate in _RETRYABLE_SQLSTATES:
            return True
        message = str(exc.orig).lower()
        return "database is locked" in message or "database is busy" in message
    return False


def run_in_transaction(
    session_factory: Callable[[], Session],
    work: Callable[[Session], T],
    *,
    attempts: int = 4,
) -> T:
    """Run ``work`` in one transaction, committed when it returns, rolled back if it raises.

    A transaction that lost a race (deadlock, lock timeout, SQLite busy, a concurrent
    version bump) is run again from the start, up to ``attempts`` times in all, so ``work``
    must do all its reads inside the transaction. Any other error propagates after rollback.
    """
    for attempt in range(1, attempts + 1):
        try:
            with session_factory() as session, session.begin():
                return work(session)
        except Exception as exc:
            if attempt < attempts and is_retryable(exc):
                delay = random.uniform(0.01, 0.05) * attempt
                log.info("transaction lost a race (%s); retry %d in %.3fs", type(exc).__name__, attempt, delay)
                time.sleep(delay)
                continue
            raise
    raise AssertionError("unreachable")


def dialect_insert(dialect_name: str) -> DialectInsert:
    """The ``insert`` construct with ``ON CONFLICT`` for this database (PostgreSQL or SQLite)."""
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


def insert_ignore(session: Session, model: type[Base], values: Mapping[str, Any]) -> bool:
    """``INSERT ... ON CONFLICT DO NOTHING`` on the model's primary key.

    Returns True when this call inserted the row. On PostgreSQL a concurrent transaction
    inserting the same key blocks here until the other one commits (then this returns
    False) or rolls back (then this inserts): the unique key itself is the lock, across
    processes and hosts.
    """
    insert = dialect_insert(session.get_bind().dialect.name)
    # RETURNING, not rowcount: with psycopg 3 SQLAlchemy reports rowcount -1 for this
    # statement, and a wrong answer here would store an event without its effects.
    table = table_of(model)
    statement = (
        insert(table)
        .values(**values)
        .on_conflict_do_nothing()
        .returning(*table.primary_key.columns)
    )
    return session.execute(statement).first() is not None


def insert_unnested(table: Table, columns: Sequence[str], rows: Sequence[Mapping[str, Any]] | None = None) -> Insert:
    """PostgreSQL: ``INSERT INTO table (columns) SELECT unnest(:c1), unnest(:c2) ... ON
    CONFLICT DO NOTHING RETURNING`` the primary key. One array parameter per column, named
    after it, the rows unnested in step: the statement's text is the same for any number
    of rows, so the driver parses and prepares it once (a multi-row VALUES list is a new
    statement for every size and cost the driver more to send than the rows), and the
    arrays go in binary (see make_engine). With ``rows`` the arrays carry their values;
    without, the caller passes one list per column when it executes the statement."""
    from sqlalchemy import bindparam, func, select
    from sqlalchemy.dialects.postgresql import ARRAY, insert

    arrays = [
        bindparam(key, type_=ARRAY(table.c[key].type)) if rows is None
        else bindparam(key, [row[key] for row in rows], type_=ARRAY(table.c[key].type))
        for key in columns
    ]
    return (
        insert(table)
        .from_select(list(columns), select(*[func.unnest(array) for array in arrays]))
        .on_conflict_do_nothing()
        .returning(*table.primary_key.columns)
    )


def lock_key(session: Session, namespace: str, key: str) -> None:
    """Hold a transaction-scoped lock on ``namespace:key`` until commit or rollback.

    For races where there is no row to lock yet (a charge and its PaymentIntent arriving
    at once, each looking for the other). PostgreSQL: an advisory lock. SQLite: nothing to
    do, every write transaction already holds the database lock (``BEGIN IMMEDIATE``).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:namespace), hashtext(:key))"),
            {"namespace": namespace, "key": key},
        )


def one_of(
    session: Session, column: ColumnElement[Any] | QueryableAttribute[Any], values: Iterable[Any]
) -> ColumnElement[bool]:
    """``column IN (values)``; on PostgreSQL written ``column = ANY(:array)``: one parameter
    whatever the number of values, so the statement's text stays the same and the driver
    parses and prepares it once (an IN list of 200 ids is a new 200-placeholder statement
    every time, and parsing those was the applier's biggest client-side cost)."""
    values = list(values)
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy import any_, bindparam
        from sqlalchemy.dialects.postgresql import ARRAY

        return column == any_(bindparam(None, values, type_=ARRAY(column.type)))
    return column.in_(values)


def engine_of(session_factory: sessionmaker[Session]) -> Engine:
    """The engine a session factory is bound to (made by :func:`make_session_factory`)."""
    engine = session_factory.kw.get("bind")
    if not isinstance(engine, Engine):
        raise TypeError("the session factory is not bound to an engine")
    return engine
