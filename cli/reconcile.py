"""``reconcile`` (one pass now, its printed summary and a dry run's plan) and ``runs``
(the recent passes)."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any, overload

import click

from cli.context import CliContext, pass_cli
from models.base import iso_utc

if TYPE_CHECKING:
    from datetime import datetime

    from jobs.reconcile import RunSummary


@overload
def parse_day(value: str) -> datetime: ...
@overload
def parse_day(value: None) -> None: ...
@overload
def parse_day(value: str | None) -> datetime | None: ...
def parse_day(value: str | None) -> datetime | None:
    """A UTC day (or minute, or second) given on the command line; ``None`` stays ``None``."""
    from datetime import datetime, timezone

    if value is None:
        return None
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"):
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS], UTC)")


@click.command()
@click.option("--mode", type=click.Choice(["review", "auto", "dry-run"]), help="Default: REFUND_MODE.")
@click.option("--since", help="Backfill from this UTC date instead of the last watermark.")
@click.option("--full", is_flag=True, help="Examine every order, not only those touched since the last pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@pass_cli
def reconcile(context: CliContext, mode: str | None, since: str | None, full: bool, as_json: bool) -> None:
    """Run one reconciliation pass now (backfill, detect, refund in auto mode, alert).

    Progress goes to stderr: bars on a terminal, JSON log lines otherwise. SIGINT, SIGTERM
    or SIGHUP stop the pass where it is: it is recorded as aborted and the command exits
    128 + the signal's number."""
    import json

    from jobs.progress import LogProgress, TerminalProgress
    from jobs.reconcile import PassAborted, RunInProgress, abort_on_signals, run_reconciliation

    settings = context.settings
    since_at = parse_day(since)
    started: list[int] = []
    reporter: TerminalProgress | LogProgress = TerminalProgress() if sys.stderr.isatty() else LogProgress()
    try:
        session_factory, gateway = context.session_factory, context.gateway  # the database is usable, else one line
        with abort_on_signals(), (reporter if isinstance(reporter, TerminalProgress) else contextlib.nullcontext()):
            summary = run_reconciliation(
                session_factory, gateway, settings, mode=mode, since=since_at, full=full, progress=reporter,
                on_start=started.append,
            )
    except RunInProgress as exc:
        click.echo(f"not started: {exc}", err=True)
        sys.exit(3)
    except PassAborted as exc:
        what = f"run {started[0]} aborted" if started else "aborted before the pass started"
        click.echo(f"{what}: {exc.reason}" + ("; recorded as aborted" if started else ""), err=True)
        sys.exit(128 + (exc.signum or 2))
    finally:
        if isinstance(reporter, LogProgress):
            reporter.close()
    if as_json:
        data = {"run_id": summary.run_id, "status": summary.status, "mode": summary.mode, "counts": summary.counts(), "errors": summary.errors, "warnings": summary.warnings}
        if summary.mode == "dry-run":
            data["plan"] = plan_data(summary.detection.get("plan", []))
        click.echo(json.dumps(data, indent=2))
    else:
        _print_summary(summary)
    if summary.status != "succeeded":
        sys.exit(1)


# How many cases (and dry-run orders) the printed summary lists; the rest are on the
# review page, in `reconciler review list`, the CSV report, or `--json`.
SUMMARY_LIST_LIMIT = 20


def _print_summary(summary: RunSummary) -> None:
    from models.money import format_amounts

    counts = summary.counts()
    amounts = format_amounts(counts["refunded_amounts"])
    click.echo(f"run {summary.run_id} ({summary.mode}): {summary.status}")
    click.echo(
        f"  backfill: {counts['charges_backfilled']} charges, {counts['refunds_backfilled']} refunds, "
        f"{counts['events_replayed']} undelivered events applied; watermark {summary.watermark}"
    )
    click.echo(f"  examined {counts['orders_examined']} orders; {counts['cases_opened']} case(s) opened, {counts['cases_resolved']} resolved outside")
    opened = list(summary.detection.get("cases_opened", [])) + list(summary.detection.get("unlinked_opened", []))
    if opened:
        shown = ", ".join(str(case_id) for case_id in opened[:SUMMARY_LIST_LIMIT])
        click.echo(f"  new cases: {shown}")
        if len(opened) > SUMMARY_LIST_LIMIT:
            day = f"{datetime_now_utc():%Y-%m-%d}"
            click.echo(
                f"  ... and {len(opened) - SUMMARY_LIST_LIMIT} more: see the review page (/review), "
                f"`reconciler review list` or the CSV report (`reconciler report --since {day}`)"
            )
    if summary.mode == "dry-run":
        click.echo(f"  would open {counts['would_open']} case(s), {counts['would_refund_automatically']} of them refunded automatically in auto mode")
    click.echo(f"  refunds: {counts['refunds_issued']} issued ({amounts}), {counts['refunds_failed']} failed, {counts['refunds_deferred']} left for the next pass, {counts['refunds_skipped']} skipped")
    click.echo(f"  alerts sent: {counts['alerts_sent']}")
    for warning in summary.warnings:
        click.echo(f"  warning: {warning}")
    for error in summary.errors:
        click.echo(f"  ! {error}")
    if summary.mode == "dry-run":
        for line in plan_lines(summary.detection.get("plan", []), limit=SUMMARY_LIST_LIMIT):
            click.echo(f"  {line}")


def datetime_now_utc() -> datetime:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


# The dry run's plan (domain.cases.detection._planned), per order: what a pass would do.

_STEP_WORDS = {"open": "new case", "refresh": "case {case_id}", "reopen": "reopens case {case_id}"}


def _money(amount: int | None, currency: str | None) -> dict[str, Any]:
    from models.money import format_money

    display = format_money(amount, currency) if amount is not None and currency is not None else "total unknown"
    return {"amount": amount, "currency": currency, "display": display}


def plan_data(plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The plan as JSON-ready data, by order id: amounts as minor units, currency and a
    display string; ``releases`` (uncaptured authorisations) empty when absent."""

    def moves(entries: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        return [{"charge_id": e["charge_id"], **_money(e["amount"], e["currency"])} for e in entries or []]

    return [
        {
            "order_id": entry["order_id"],
            "order_total": _money(entry.get("order_total"), entry.get("order_currency")),
            "case_id": entry.get("case_id"),
            "step": entry.get("step"),
            "action": entry.get("action"),
            "keeper_charge_id": entry.get("keeper_charge_id"),
            "excess": [_money(amount, currency) for currency, amount in sorted((entry.get("excess") or {}).items())],
            "refunds": moves(entry.get("refunds")),
            "releases": moves(entry.get("releases")),
            "reasons": list(entry.get("reasons") or []),
        }
        for entry in sorted(plan, key=lambda e: e["order_id"])
    ]


def plan_lines(plan: list[dict[str, Any]], *, limit: int | None = None) -> list[str]:
    """What a dry run would do, per order (by order id), as lines of text: the order and
    its total, the keeper, then each refund and release, or for a person's decision "to
    finance:" and the reasons in words (amounts in major units), with any suggested refunds.
    ``limit``: the first orders only, then a line saying how many more ``--json`` lists."""
    from domain.cases.reasons import ReasonContext, reason_sentences

    if not plan:
        return ["nothing would be done: no refund, release or case for finance"]
    lines = [f"would act on {len(plan)} order(s):"]
    entries = plan_data(plan)
    if limit is not None and len(entries) > limit:
        hidden = len(entries) - limit
        entries = entries[:limit]
    else:
        hidden = 0
    for entry in entries:
        step = _STEP_WORDS.get(entry["step"], entry["step"] or "").format(case_id=entry["case_id"])
        keeper = entry["keeper_charge_id"] or "unknown"
        lines.append(f"order {entry['order_id']} ({entry['order_total']['display']}): {step}, keep {keeper}")
        automatic = entry["action"] == "refund"
        if not automatic:
            context = ReasonContext(currency=entry["order_total"]["currency"], active=True)
            reasons = reason_sentences(entry["reasons"], context)
            lines.append("  to finance: " + (" ".join(reasons) or "a person decides."))
        prefix = "" if automatic else "suggested: "
        for refund in entry["refunds"]:
            lines.append(f"  {prefix}refund {refund['charge_id']} {refund['display']}")
        for release in entry["releases"]:
            lines.append(f"  {prefix}release authorisation {release['charge_id']} {release['display']}")
    if hidden:
        lines.append(f"... and {hidden} more order(s): `reconciler reconcile --mode dry-run --json` lists them all")
    return lines


@click.command()
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@pass_cli
def runs(context: CliContext, limit: int) -> None:
    """List recent reconciliation passes (status running, succeeded, partial, failed or
    aborted), after when the next one is due."""
    from sqlalchemy import select

    from jobs.schedule_state import schedule_view
    from models import ReconciliationRun

    with context.session_factory() as session:
        rows = list(session.scalars(select(ReconciliationRun).order_by(ReconciliationRun.id.desc()).limit(limit)))
        schedule = schedule_view(session)
    click.echo(schedule.describe())
    if not rows:
        click.echo("no passes yet")
        return
    click.echo(f"{'id':>5}  {'started':25}  {'secs':>6}  {'mode':8} {'status':9} {'opened':>6} {'refunds':>7} {'failed':>6}  watermark")
    for run in rows:
        seconds = f"{(run.finished_at - run.started_at).total_seconds():.1f}" if run.finished_at else "-"
        counts = run.counts or {}
        click.echo(
            f"{run.id:>5}  {iso_utc(run.started_at.replace(microsecond=0)):25}  {seconds:>6}  {run.mode:8} {run.status:9} "
            f"{counts.get('cases_opened', 0):>6} {counts.get('refunds_issued', 0):>7} {counts.get('refunds_failed', 0):>6}  {run.watermark or '-'}"
        )
        for error in (run.errors or [])[:3]:
            click.echo(f"       ! {error}")
