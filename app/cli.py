"""The ``reconciler`` command: serve, db, orders. A composition root like ``create_app``.

Settings are read once here; a malformed setting ends the command with a message naming
the variable and exit status 2, before anything starts.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from pathlib import Path
from typing import Any

import click

from config import Settings, SettingsError

log = logging.getLogger("reconciler")


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise click.UsageError(f"configuration error: {exc}") from None
    from app.logs import configure_logging

    configure_logging(settings.log_level)
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Stripe webhook ledger and duplicate-charge reconciler."""


# -- serve -----------------------------------------------------------------------------


def default_workers(settings: Settings) -> int:
    """Sync workers: 2 x cores + 1 on PostgreSQL (capped at 8); 2 on SQLite, whose single
    writer gains nothing from more and only queues them on the database lock."""
    if settings.is_sqlite:
        return 2
    return min(8, 2 * multiprocessing.cpu_count() + 1)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", type=click.IntRange(1, 64), help="Default: 2 on SQLite, 2 x cores + 1 on PostgreSQL.")
@click.option("--migrate/--no-migrate", default=None, help="Apply migrations first (default: on SQLite only).")
def serve(host: str, port: int, workers: int | None, migrate: bool | None) -> None:
    """Run the web app under gunicorn."""
    settings = _settings()
    _ensure_schema(settings, migrate=settings.is_sqlite if migrate is None else migrate)
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": f"{host}:{port}",
                "workers": workers or default_workers(settings),
                "worker_class": "sync",
                "timeout": 30,
                "graceful_timeout": 20,
                "keepalive": 5,
                "accesslog": "-",
                # Worker pid and latency on every line: which process answered, how fast.
                "access_log_format": 'pid=%(p)s %(h)s "%(r)s" %(s)s %(B)s %(M)sms',
                "errorlog": "-",
                "proc_name": "reconciler-web",
                # Each worker builds its own engine after the fork (no shared connections).
                "preload_app": False,
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):  # type: ignore[no-untyped-def]
            from app import create_app

            return create_app(settings)

    Server().run()


def _ensure_schema(settings: Settings, *, migrate: bool) -> None:
    from models import make_engine
    from models.migrate import current_revision, head_revision, upgrade

    if migrate:
        upgrade(settings.database_url)
        return
    engine = make_engine(settings.database_url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    if current != head_revision():
        raise click.ClickException(
            f"database schema is at {current or 'nothing'}, not {head_revision()}: run `reconciler db upgrade`"
        )


# -- db --------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations."""
    from models.migrate import upgrade

    settings = _settings()
    upgrade(settings.database_url, revision)
    click.echo(f"database at {revision}")


@db.command("current")
def db_current() -> None:
    """Print the schema revision."""
    from models import make_engine
    from models.migrate import current_revision, head_revision

    settings = _settings()
    engine = make_engine(settings.database_url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    click.echo(f"current: {current or 'none'}  head: {head_revision()}")


# -- orders ----------------------------------------------------------------------------


@main.group()
def orders() -> None:
    """Orders: what each order should cost."""


@orders.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def orders_import(csv_file: Path) -> None:
    """Load orders from CSV_FILE (order_id,amount,currency[,customer]; amounts in minor
    units). All rows are applied in one transaction, or none if any row is invalid."""
    from app.services.orders import OrderError, import_orders, parse_order_csv
    from models import make_engine, make_session_factory, run_in_transaction

    settings = _settings()
    try:
        text = csv_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise click.ClickException(f"{csv_file} is not UTF-8 text") from None
    rows, errors = parse_order_csv(text)
    if errors:
        for error in errors[:50]:
            click.echo(f"{csv_file}: {error}", err=True)
        if len(errors) > 50:
            click.echo(f"... and {len(errors) - 50} more", err=True)
        raise click.ClickException(f"{len(errors)} invalid row(s); nothing imported")
    engine = make_engine(settings.database_url)
    try:
        report = run_in_transaction(make_session_factory(engine), lambda s: import_orders(s, rows))
    except OrderError as exc:
        raise click.ClickException(f"{exc.message}; nothing imported") from None
    finally:
        engine.dispose()
    click.echo(f"imported {len(rows)} order(s): {report.created} created, {report.updated} updated, {report.unchanged} unchanged")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
