"""Is the database there, reachable and migrated? One-line answers for people.

The command line asks this before it does anything (``reconciler reconcile``, ``review``,
``report``, ``runs``, ``serve``...): a wrong URL, a server that is down, a database or a
SQLite directory that does not exist, or a schema that was never migrated each end the
command with one sentence saying what to do, never a traceback.

Nothing here creates a directory or a database: a SQLite URL whose directory does not
exist is an error (a typo must not leave folders behind), and a SQLite file that does not
exist is only created by a migration (``reconciler db upgrade``, or ``serve`` on SQLite).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from models.db import make_engine

UPGRADE_HINT = "run `reconciler db upgrade`"


class DatabaseUnavailable(Exception):
    """The database cannot be used; the message is one line for a person."""


def masked(url: str) -> str:
    """The URL without its password, as it may be shown."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None: not SQLite, or in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def check_sqlite_location(url: str, *, must_exist: bool) -> None:
    """Refuse a SQLite file whose directory does not exist (never created here) and,
    with ``must_exist``, a file that does not exist yet (connecting would create an
    empty, unmigrated one)."""
    path = sqlite_path(url)
    if path is None:
        return
    if not path.parent.is_dir():
        raise DatabaseUnavailable(f"cannot open the SQLite database {path}: the directory {path.parent} does not exist")
    if must_exist and not path.exists():
        raise DatabaseUnavailable(f"there is no database at {path}: {UPGRADE_HINT} to create it")


def describe_error(exc: BaseException, url: str) -> str:
    """One line for a database error that stops a command."""
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    message = str(orig).strip()
    lowered = message.lower()
    where = masked(url)
    missing = re.search(r'database "([^"]+)" does not exist', message)
    if missing:
        return f'the database "{missing.group(1)}" does not exist on the server ({where}): create it, then {UPGRADE_HINT}'
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"the database schema is missing or out of date ({where}): {UPGRADE_HINT}"
    if "unable to open database file" in lowered:
        return f"cannot open the SQLite database ({where}): check the path and its permissions"
    if "file is not a database" in lowered:
        return f"{where} is not a SQLite database"
    first = message.splitlines()[0] if message else type(orig).__name__
    first = re.sub(r"^connection failed:\s*", "", first)
    first = re.sub(r'^connection to server at "[^"]*"(?: \([^)]*\))?, port \d+ failed:\s*', "", first)
    first = re.sub(r"^FATAL:\s*", "", first).strip()
    return f"cannot connect to the database ({where}): {first}"


def open_database(url: str, *, schema: str = "head") -> Engine:
    """An engine on ``url`` after checking the database can be used, or
    :class:`DatabaseUnavailable` with one line saying why.

    ``schema``: ``"head"`` (the schema must be at the latest migration: every command
    that reads or writes the service's tables), ``"any"`` (connect only: ``db current``),
    ``"create"`` (the SQLite file may not exist yet: a migration will create it)."""
    from models.migrate import current_revision, head_revision, known_revision

    check_sqlite_location(url, must_exist=schema != "create")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        if schema == "head":
            # Alembic says "Context impl ..." at INFO each time it looks: not worth a line.
            quiet = logging.getLogger("alembic.runtime.migration")
            level = quiet.level
            quiet.setLevel(max(level, logging.WARNING))
            try:
                current = current_revision(engine)
            finally:
                quiet.setLevel(level)
            head = head_revision()
            if current is None:
                raise DatabaseUnavailable(f"the database has no schema yet ({masked(url)}): {UPGRADE_HINT}")
            if current != head:
                if not known_revision(current):
                    raise DatabaseUnavailable(
                        f"the database schema is at revision {current}, which this version does not know "
                        f"(its latest is {head}): run a newer version of the service"
                    )
                raise DatabaseUnavailable(f"the database schema is at revision {current}, not {head}: {UPGRADE_HINT}")
    except DatabaseUnavailable:
        engine.dispose()
        raise
    except (SQLAlchemyError, OSError) as exc:
        engine.dispose()
        raise DatabaseUnavailable(describe_error(exc, url)) from None
    return engine
