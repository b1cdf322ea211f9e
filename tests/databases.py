"""Throwaway databases for tests and benchmarks, migrated to the latest schema."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from typing import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from config import Settings
from models.migrate import upgrade


@contextlib.contextmanager
def throwaway_database(server_url: str | None, *, prefix: str = "reconciler_test", keep: bool = False) -> Iterator[str]:
    """Yield the URL of a fresh, migrated database; gone afterwards (PostgreSQL: unless
    ``keep``, for looking at a benchmark's data).

    ``server_url`` None: a SQLite file in a temporary directory. A PostgreSQL URL: a new
    database created on that server (any database in the URL only serves to connect).
    """
    if server_url is None:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/{prefix}.db"
            upgrade(url)
            yield url
        return
    server_url = Settings.from_env({"DATABASE_URL": server_url}).database_url
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        yield url
    finally:
        if not keep:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
