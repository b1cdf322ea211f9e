"""``db``: the database schema (migrations)."""

from __future__ import annotations

import click

from cli.context import CliContext, pass_cli


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@pass_cli
def db_upgrade(context: CliContext, revision: str) -> None:
    """Apply migrations."""
    context.upgrade_database(revision)
    click.echo(f"database at {revision}")


@db.command("current")
@pass_cli
def db_current(context: CliContext) -> None:
    """Print the schema revision."""
    from models.migrate import current_revision, head_revision

    current = current_revision(context.open_database(schema="any"))
    click.echo(f"current: {current or 'none'}  head: {head_revision()}")
