"""The ``reconciler`` command: serve, db, orders. A composition root like ``create_app``.

Settings are read once here; a malformed setting ends the command with a one-line message
naming the variable and exit status 2, before anything starts. Every command that uses the
database checks it first (:mod:`models.availability`): a wrong URL, a server that is down,
a missing database or an unmigrated schema is one line on stderr and exit status 1, never
a traceback; so is a database that goes away while the command runs.

The group below puts a :class:`cli.context.CliContext` on the click context: the settings,
the database and the services, each made on first use and shared by the command that runs
(:data:`cli.context.pass_cli` hands it over); the engine is disposed of when the command
line ends. The commands live by family: ``serve``, ``applier`` and ``scheduler`` in
:mod:`cli.serve`; ``db`` in :mod:`cli.db`; ``orders`` in :mod:`cli.orders`;
``reconcile`` and ``runs`` in :mod:`cli.reconcile`; ``review`` and ``report`` in
:mod:`cli.review`; ``users`` and ``api-tokens`` in :mod:`cli.access`; ``demo`` in
:mod:`cli.demo`.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from cli import access, db, demo, orders, reconcile, review, serve
from cli.context import CliContext, ConfigurationError, DatabaseError, default_database_url, pass_cli
from cli.reconcile import SUMMARY_LIST_LIMIT, _print_summary, plan_data, plan_lines
from cli.serve import default_threads, default_workers, service_children

__all__ = [
    "SUMMARY_LIST_LIMIT",
    "CliContext",
    "ConfigurationError",
    "DatabaseError",
    "ReconcilerGroup",
    "_print_summary",
    "default_database_url",
    "default_threads",
    "default_workers",
    "main",
    "pass_cli",
    "plan_data",
    "plan_lines",
    "service_children",
]


class ReconcilerGroup(click.Group):
    """The command group. A database error that escapes a command (the server went away
    half way) becomes one line and exit status 1 instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import DBAPIError, OperationalError

        try:
            return super().invoke(ctx)
        except (OperationalError, DBAPIError) as exc:
            if not _is_availability_error(exc):
                raise
            from models.availability import describe_error

            raise DatabaseError(describe_error(exc, _configured_url(ctx))) from None


def _is_availability_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import OperationalError

    message = str(getattr(exc, "orig", exc)).lower()
    return isinstance(exc, OperationalError) or "no such table" in message or ("relation" in message and "does not exist" in message)


def _configured_url(ctx: click.Context) -> str:
    return (ctx.find_object(CliContext) or CliContext()).configured_url()


@click.group(cls=ReconcilerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Stripe webhook ledger and duplicate-charge reconciler."""
    # Nothing is read or opened yet: the command asks for what it needs, and whatever it
    # opened is disposed of when this context closes.
    ctx.with_resource(ctx.ensure_object(CliContext))


for command in (
    serve.serve, serve.applier, serve.scheduler, db.db, orders.orders, reconcile.reconcile, reconcile.runs,
    review.review, review.report, access.users, access.api_tokens, demo.demo,
):
    main.add_command(command)
del command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
