"""What the commands share: :class:`CliContext`, made once per invocation by the
``reconciler`` group and handed to each command by :data:`pass_cli`.

Nothing is read or opened before a command asks for it: ``--help`` and the commands that
need neither settings nor a database (``demo``, ``users hash-password``, ``api-tokens
create``) work whatever the environment holds. The settings are read once, on first use;
the database (engine, session factory) is opened and checked on first use and disposed of
when the command line's context closes; the Stripe gateway and the refund service are
built once, here and nowhere else in the command line.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Literal

import click

from config import DEFAULT_SQLITE_PATH, Settings, SettingsError

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from domain.cases.refunds import RefundService
    from domain.stripe.gateway import StripeGateway

# What a command needs of the schema (models.availability.open_database): "head" (at the
# latest migration: every command that reads or writes the service's tables), "any"
# (connect only: ``db current``), "create" (the SQLite file may not exist yet).
Schema = Literal["head", "any", "create"]


class ConfigurationError(click.ClickException):
    """A setting is missing or malformed: one line, no usage text, exit status 2."""

    exit_code = 2


class DatabaseError(click.ClickException):
    """The database cannot be used: one line, exit status 1."""

    exit_code = 1


def load_settings() -> Settings:
    """The settings from the environment, logging configured from them; a malformed
    setting is a :class:`ConfigurationError` naming the variable."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise ConfigurationError(f"configuration error: {exc}") from None
    from app.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    return settings


def default_database_url() -> str:
    return f"sqlite:///{DEFAULT_SQLITE_PATH.resolve()}"


def open_engine(settings: Settings, *, schema: Schema = "head") -> Engine:
    """An engine on the configured database once it is known to be usable (see
    :func:`models.availability.open_database`), else a one-line :class:`DatabaseError`.
    The default SQLite location's folder (``instance/``) is the one directory made here."""
    from models.availability import DatabaseUnavailable, open_database

    if settings.database_url == default_database_url():
        DEFAULT_SQLITE_PATH.resolve().parent.mkdir(parents=True, exist_ok=True)
    try:
        return open_database(settings.database_url, schema=schema)
    except DatabaseUnavailable as exc:
        raise DatabaseError(str(exc)) from None


def upgrade_database(settings: Settings, revision: str) -> None:
    """Migrate to ``revision``; a database that cannot be reached (or, for SQLite, whose
    directory is missing) or a failing migration is one line and exit status 1."""
    from sqlalchemy.exc import SQLAlchemyError

    from models.availability import describe_error
    from models.migrate import upgrade

    open_engine(settings, schema="create").dispose()  # reachable, and the directory exists
    try:
        upgrade(settings.database_url, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(describe_error(exc, settings.database_url)) from None


class CliContext:
    """The settings, the database and the services of one ``reconciler`` invocation,
    each made on first use. :meth:`close` disposes of what was opened (the group calls it
    when its context closes)."""

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._engine: Engine | None = None
        self._schema: Schema | None = None
        self._session_factory: sessionmaker[Session] | None = None
        self._gateway: StripeGateway | None = None
        self._refund_service: RefundService | None = None
        self._resources = contextlib.ExitStack()

    # -- settings ------------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """Read from the environment on first use (:func:`load_settings`)."""
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    def configured_url(self) -> str:
        """The database URL for an error message, even when the settings are malformed."""
        if self._settings is not None:
            return self._settings.database_url
        try:
            return Settings.from_env().database_url
        except SettingsError:
            return "the configured database"

    # -- the database --------------------------------------------------------------------

    def open_database(self, *, schema: Schema = "head") -> Engine:
        """The engine, opened on first use once the database passes the ``schema`` check
        (:func:`open_engine`), and disposed of when the context closes."""
        if self._engine is None:
            engine = open_engine(self.settings, schema=schema)
            self._resources.callback(engine.dispose)
            self._engine, self._schema = engine, schema
        elif schema != self._schema:
            raise RuntimeError(f"the database was opened with schema={self._schema!r}, not {schema!r}")
        return self._engine

    def check_database(self, *, schema: Schema = "head") -> None:
        """Fail now (one line, exit status 1) unless the database can be used, holding no
        connection afterwards: for the long-running commands, whose processes open their
        own engines."""
        open_engine(self.settings, schema=schema).dispose()

    def upgrade_database(self, revision: str) -> None:
        upgrade_database(self.settings, revision)

    @property
    def engine(self) -> Engine:
        return self.open_database()

    @property
    def session_factory(self) -> sessionmaker[Session]:
        if self._session_factory is None:
            from models import make_session_factory

            self._session_factory = make_session_factory(self.engine)
        return self._session_factory

    # -- services ------------------------------------------------------------------------

    @property
    def gateway(self) -> StripeGateway:
        if self._gateway is None:
            from domain.stripe.gateway import StripeGateway

            self._gateway = StripeGateway.from_settings(self.settings)
        return self._gateway

    @property
    def refund_service(self) -> RefundService:
        if self._refund_service is None:
            from domain.cases.refunds import RefundService

            # A command may wait: the gateway's patient policy, as for a pass's refunds.
            self._refund_service = RefundService(self.session_factory, self.gateway.patient())
        return self._refund_service

    def __enter__(self) -> CliContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Dispose of the engine (if one was opened); the context can be used again."""
        try:
            self._resources.close()
        finally:
            self._engine = self._schema = self._session_factory = self._refund_service = None


pass_cli = click.make_pass_decorator(CliContext)
"""Hands a command the invocation's :class:`CliContext` as its first argument."""
