"""``review`` (duplicate cases: list, show, approve, dismiss) and ``report`` (the cases
as CSV or JSON)."""

from __future__ import annotations

import sys

import click

from cli.context import CliContext, pass_cli
from cli.reconcile import parse_day
from models import CASE_STATUSES


@click.group()
def review() -> None:
    """Duplicate cases: list, show, approve, dismiss."""


@review.command("list")
@click.option("--status", type=click.Choice(list(CASE_STATUSES)))
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 200))
@pass_cli
def review_list(context: CliContext, status: str | None, limit: int) -> None:
    """Cases, open and failed first."""
    from domain.cases.views import CaseFilter, list_cases

    with context.session_factory() as session:
        page = list_cases(session, CaseFilter(status=status, per_page=limit))
    if not page["cases"]:
        click.echo("no cases")
        return
    click.echo(f"{'case':>5}  {'status':9}  {'opened (UTC)':25}  {'order':24}  {'total':>14}  {'excess':>14}  {'proposed':>14}  why")
    for case in page["cases"]:
        excess = ", ".join(case["excess_display"].values()) or "-"
        proposed = ", ".join(case["proposed_refunds_display"].values()) or "-"
        click.echo(
            f"{case['id']:>5}  {case['status']:9}  {case['opened_at']:25}  {case['order_id'][:24]:24}  "
            f"{case['order_amount_display'] or 'unknown':>14}  {excess:>14}  {proposed:>14}  {case['reason_text']}"
        )
    click.echo(f"{page['total']} case(s); totals: " + "; ".join(f"{c.upper()} excess {t['excess_display']}, refunded {t['refunded_display']}" for c, t in page["totals"].items()))
    unlinked = page.get("unlinked") or {}
    if unlinked.get("count"):
        click.echo(
            f"of which {unlinked['count']} possible duplicate(s) with no order (review only, not in the totals; "
            f"{unlinked['active']} open, holding {', '.join(unlinked['held_display'].values()) or '-'})"
        )


@review.command("show")
@click.argument("case_id", type=int)
@pass_cli
def review_show(context: CliContext, case_id: int) -> None:
    """One case in full: charges, proposal, refunds, audit."""
    from domain.cases.views import case_view

    with context.session_factory() as session:
        view = case_view(session, case_id)
    if view is None:
        raise click.ClickException(f"no case {case_id}")
    click.echo(f"case {view['id']}: {view['status']}   order {view['order_id']}  total {view['order_amount_display'] or 'unknown'}")
    click.echo(f"  opened {view['opened_at']}" + (f"   decided {view['decided_at']} by {view['decided_by']} ({view['decision']})" if view["decided_at"] else ""))
    click.echo(f"  excess: {', '.join(view['excess_display'].values()) or '-'}   proposed refund: {', '.join(view['proposed_refunds_display'].values()) or '-'}")
    for reason in view["reasons"] or [{"text": view["reason_text"]}]:
        click.echo(f"  why: {reason['text']}")
    if view["escalation_text"]:
        click.echo(f"  sent back to a person: {view['escalation_text']}")
    for charge in view["charges"]:
        mark = "keeper" if charge["keeper"] else charge["role"]
        card = charge["card_display"] or "-"
        proposal = f"  propose refund {charge['proposed_refund_display']}" if charge["proposed_refund"] else ""
        click.echo(
            f"  {charge['id']}  {mark:9}  {charge['amount_display']:>12}  {charge['created_at']}  {card:14}  "
            f"refunded {charge['refunded_display']}  held {charge['held_display']}{'  dispute ' + charge['dispute_status'] if charge['dispute_status'] else ''}{proposal}"
        )
    for attempt in view["attempts"]:
        click.echo(f"  attempt {attempt['idempotency_key']} ({attempt['created_at']}): {attempt['status']} {attempt['refund_id'] or ''} {attempt['error'] or ''}".rstrip())
    for entry in view["audit"]:
        click.echo(f"  {entry['at']}  {entry['actor']}: {entry['action']}{'  — ' + entry['note'] if entry['note'] else ''}")


@review.command("approve")
@click.argument("case_id", type=int)
@click.option("--by", "actor", required=True, help="Who approves (recorded in the audit log).")
@click.option("--note")
@pass_cli
def review_approve(context: CliContext, case_id: int, actor: str, note: str | None) -> None:
    """Refund what the case proposes, through the phased refund path."""
    from domain.cases.review import CaseActionError, approve

    try:
        result = approve(context.refund_service, case_id, actor=actor, note=note)
    except CaseActionError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    from models.money import format_money

    for outcome in result.outcomes:
        click.echo(f"{outcome.charge_id}: {outcome.result} {format_money(outcome.amount, outcome.currency)} {outcome.refund_id or ''} {outcome.message or ''}".rstrip())
    click.echo(f"case {case_id}: {result.status}")
    if result.status not in ("refunded",):
        sys.exit(1)


@review.command("dismiss")
@click.argument("case_id", type=int)
@click.option("--by", "actor", required=True, help="Who dismisses (recorded in the audit log).")
@click.option("--note", required=True, help="Why (required).")
@pass_cli
def review_dismiss(context: CliContext, case_id: int, actor: str, note: str) -> None:
    """Close a case without refunding."""
    from domain.cases.review import CaseActionError, dismiss

    try:
        dismiss(context.session_factory, case_id, actor=actor, note=note)
    except CaseActionError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    click.echo(f"case {case_id}: dismissed")


@click.command()
@click.option("--since", required=True, help="Cases opened on or after this UTC date (YYYY-MM-DD).")
@click.option("--until", help="... and before this UTC date (exclusive).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@pass_cli
def report(context: CliContext, since: str, until: str | None, fmt: str) -> None:
    """Cases, their charges and refunds, amounts (major units, with the currency) and who
    decided, as CSV (opens cleanly in a spreadsheet) or JSON."""
    import json

    from domain.cases.report import report_csv, report_rows

    context.settings  # read first: a malformed setting is the error, whatever the dates say
    since_at, until_at = parse_day(since), parse_day(until)
    with context.session_factory() as session:
        rows = report_rows(session, since=since_at, until=until_at)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(report_csv(rows), nl=False)
