"""Who may use the service: ``users`` (the review page's) and ``api-tokens``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import click

from cli.context import CliContext, pass_cli

if TYPE_CHECKING:
    from sqlalchemy import CursorResult
    from sqlalchemy.orm import Session


@click.group()
def users() -> None:
    """Review page users."""


@users.command("hash-password")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
def users_hash_password(password: str) -> None:
    """Print a password hash for REVIEW_USERS (name:role:hash)."""
    from werkzeug.security import generate_password_hash

    if len(password) < 12:
        raise click.ClickException("use at least 12 characters")
    click.echo(generate_password_hash(password))


@users.command("logout")
@click.argument("username")
@pass_cli
def users_logout(context: CliContext, username: str) -> None:
    """End every review session of USERNAME (a lost laptop, a leaked password)."""
    from sqlalchemy import delete

    from models import WebSession, run_in_transaction

    def end_sessions(session: Session) -> int:
        result = cast("CursorResult[Any]", session.execute(delete(WebSession).where(WebSession.username == username)))
        return result.rowcount or 0

    ended = run_in_transaction(context.session_factory, end_sessions)
    click.echo(f"{ended} session(s) of {username} ended")


@click.group("api-tokens")
def api_tokens() -> None:
    """Scoped API tokens (API_TOKENS)."""


@api_tokens.command("create")
@click.argument("name")
@click.argument("scope", type=click.Choice(["pay", "finance", "read", "metrics"]))
def api_tokens_create(name: str, scope: str) -> None:
    """Make a new random token: prints the token (give it to the client, once) and the
    API_TOKENS entry (name:scope:sha256:...) to configure; only the hash is stored."""
    from app.services.api_tokens import hash_token, new_token
    from config.security import parse_api_tokens

    token = new_token()
    entry = f"{name}:{scope}:{hash_token(token)}"
    try:
        parse_api_tokens(entry)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"token:            {token}")
    click.echo(f"API_TOKENS entry: {entry}")
