"""``orders``: what each order should cost."""

from __future__ import annotations

from pathlib import Path

import click

from cli.context import CliContext, pass_cli


@click.group()
def orders() -> None:
    """Orders: what each order should cost."""


@orders.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_cli
def orders_import(context: CliContext, csv_file: Path) -> None:
    """Load orders from CSV_FILE (order_id,amount,currency[,customer]; amounts in minor
    units). All rows are applied in one transaction, or none if any row is invalid."""
    from domain.orders import OrderError, import_orders, parse_order_csv
    from models import run_in_transaction

    context.settings  # read first: a malformed setting is the error, whatever the file holds
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
    try:
        report = run_in_transaction(context.session_factory, lambda s: import_orders(s, rows))
    except OrderError as exc:
        raise click.ClickException(f"{exc.message}; nothing imported") from None
    click.echo(f"imported {len(rows)} order(s): {report.created} created, {report.updated} updated, {report.unchanged} unchanged")
