"""One reconciliation pass at a time, across processes and hosts.

PostgreSQL: a session-level advisory lock, held on a connection of its own for the whole
pass; the server releases it if the process dies. SQLite (one host by nature): a lease row
with an expiry, renewed by a heartbeat thread. Its holder names the host and the process
(``host:pid:suffix``), so a pass that finds the lease held by a process of this host that
no longer exists (killed, crashed) takes it over at once; otherwise a dead holder blocks
the next pass only until its lease runs out, and the refusal says when that is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator

from sqlalchemy import Engine, delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from models import RunLease, run_in_transaction
from models.base import iso_utc
from models.db import engine_of, insert_ignore

log = logging.getLogger(__name__)

LEASE_TTL = timedelta(minutes=5)


class RunInProgress(Exception):
    """Another pass holds the lock; this one must not run."""


def holder_name() -> str:
    """Host, process and a unique suffix: every acquisition is its own holder."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_dead(holder: str) -> bool:
    """True only when ``holder`` (``host:pid:suffix``) names a process of this host that
    no longer exists. A holder of another host, or one we cannot read, is taken as alive
    (its lease expiry decides). A reused pid makes a dead holder look alive, never the
    other way round, so the answer errs on the side of waiting."""
    parts = holder.split(":")
    if len(parts) < 3 or not parts[-2].isdigit():
        return False
    host, pid = ":".join(parts[:-2]), int(parts[-2])
    if host != socket.gethostname() or pid <= 0:
        return False
    if pid == os.getpid():
        return False  # this process: another thread of it holds the lease
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, another user's
    return False


@contextlib.contextmanager
def exclusive_pass(
    session_factory: sessionmaker[Session],
    *,
    name: str = "reconcile",
    ttl: timedelta = LEASE_TTL,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> Iterator[str]:
    """Hold the pass lock for the ``with`` block, or raise :class:`RunInProgress`."""
    engine: Engine = engine_of(session_factory)
    holder = holder_name()
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            got = connection.execute(
                text("SELECT pg_try_advisory_lock(hashtext('reconciler'), hashtext(:name))"), {"name": name}
            ).scalar()
            connection.commit()
            if not got:
                raise RunInProgress(f"another {name} pass is running (PostgreSQL advisory lock is held)")
            try:
                yield holder
            finally:
                connection.execute(
                    text("SELECT pg_advisory_unlock(hashtext('reconciler'), hashtext(:name))"), {"name": name}
                )
                connection.commit()
        return

    def take(session: Session) -> tuple[str, datetime] | None:
        current = now()
        insert_ignore(session, RunLease, {"name": name, "holder": holder, "expires_at": current + ttl})
        lease = session.execute(
            select(RunLease).where(RunLease.name == name).with_for_update().execution_options(populate_existing=True)
        ).scalar_one()
        expires = lease.expires_at if lease.expires_at.tzinfo else lease.expires_at.replace(tzinfo=timezone.utc)
        if lease.holder != holder and expires > current:
            if not holder_is_dead(lease.holder):
                return lease.holder, expires
            log.warning("lease holder %s is gone; taking the %s lease over", lease.holder, name)
        lease.holder = holder
        lease.expires_at = current + ttl
        return None

    other = run_in_transaction(session_factory, take)
    if other is not None:
        other_holder, expires = other
        raise RunInProgress(
            f"another {name} pass is running (lease held by {other_holder}, renewed while it runs; "
            f"if that process stopped, the lease expires at {iso_utc(expires.replace(microsecond=0))})"
        )
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl.total_seconds() / 3):

            def renew(session: Session) -> None:
                lease = session.get(RunLease, name, with_for_update=True)
                if lease is not None and lease.holder == holder:
                    lease.expires_at = now() + ttl

            try:
                run_in_transaction(session_factory, renew)
            except Exception:
                log.exception("lease heartbeat failed")

    beat = threading.Thread(target=heartbeat, name="lease-heartbeat", daemon=True)
    beat.start()
    try:
        yield holder
    finally:
        stop.set()
        beat.join()
        run_in_transaction(
            session_factory,
            lambda session: session.execute(delete(RunLease).where(RunLease.name == name, RunLease.holder == holder)),
        )
