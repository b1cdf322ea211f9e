"""``demo``: the whole flow on a throwaway database."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.option("--serve/--no-serve", "serve_after", default=False, help="Keep the service running afterwards and show the review login (Ctrl-C or SIGTERM stops it).")
@click.option("--stripe", "stripe_choice", type=click.Choice(["auto", "emulator", "simulated"]), default="auto", show_default=True,
              help="auto: the stripe-stateful-mock emulator when installed, else the simulated Stripe of the tests "
                   "(tests/stripe_fake). Both come with a checkout of the repository, not with the installed package.")
@click.option("--database", type=click.Path(dir_okay=False, path_type=Path), help="Keep the demo database at this path.")
@click.option("--json", "as_json", is_flag=True, help="Also print the summary as JSON (last line).")
def demo(serve_after: bool, stripe_choice: str, database: Path | None, as_json: bool) -> None:
    """Show the whole flow on a throwaway SQLite database: orders, double-clicked and
    legitimate payments, signed webhooks (one redelivered, one missed), a reconciliation
    pass in auto mode, and what it refunded and flagged."""
    import dataclasses
    import json

    from app.demo import DemoError, DemoStopped, run_demo
    from app.logs import configure_logging

    configure_logging("WARNING", "text")
    try:
        summary = run_demo(out=click.echo, serve_after=serve_after, database_path=database.resolve() if database else None, stripe_choice=stripe_choice)
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
    except DemoStopped as stopped:
        sys.exit(128 + stopped.signum)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(summary)))
