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
from models import CASE_STATUSES

log = logging.getLogger("reconciler")


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise click.UsageError(f"configuration error: {exc}") from None
    from app.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Stripe webhook ledger and duplicate-charge reconciler."""


# -- serve -----------------------------------------------------------------------------


def default_workers(settings: Settings, server: str = "granian") -> int:
    """Worker processes, each with :func:`default_threads` threads. 2 on SQLite, whose
    single writer gains nothing from more. On PostgreSQL: granian, one per core (capped at
    8): HTTP is parsed in Rust, so a worker's Python is busy only with the app, and the
    applier process needs a share of the cores too (peerbench on 2 cores, one run each:
    2 x 2 threads acknowledged 1,296 events/s and applied 1,205; 3 x 2: 969 and 875;
    2 x 4: 1,222 and 828; 1 x 8: 929 and 833). gunicorn: cores + 1 (its measurement:
    3 processes x 2 threads ingested faster than 5 sync workers, 3 x 4 or 2 x 4)."""
    if settings.is_sqlite:
        return 2
    cores = multiprocessing.cpu_count()
    return min(8, cores if server == "granian" else cores + 1)


def default_threads(settings: Settings) -> int:
    """Threads per worker: 2, so gunicorn runs gthread workers, which keep connections
    alive (sync workers close every one) and overlap one request's database round trips
    with another's Python. More threads only contend for the GIL."""
    return 2


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", type=click.IntRange(1, 64), envvar="WEB_WORKERS", help="Default: 2 on SQLite, cores + 1 on PostgreSQL.")
@click.option("--threads", type=click.IntRange(1, 64), envvar="WEB_THREADS", help="Threads per worker (gthread workers when above 1). Default: see default_threads.")
@click.option("--migrate/--no-migrate", default=None, help="Apply migrations first (default: on SQLite only).")
@click.option("--server", "server_name", type=click.Choice(["gunicorn", "granian"]), default="granian", show_default=True, envvar="WEB_SERVER",
              help="The WSGI server (README: Benchmarks, Ingest).")
def serve(host: str, port: int, workers: int | None, threads: int | None, migrate: bool | None, server_name: str) -> None:
    """Run the web app (and its applier processes)."""
    settings = _settings()
    _ensure_schema(settings, migrate=settings.is_sqlite if migrate is None else migrate)
    metrics_dir = _prepare_metrics_dir()
    if server_name == "granian":
        appliers = _start_appliers(settings)
        try:
            _serve_granian(host, port, workers or default_workers(settings, "granian"), threads or default_threads(settings))
        finally:
            _stop_children(appliers)
        return
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            worker_threads = threads or default_threads(settings)
            options: dict[str, Any] = {
                "bind": f"{host}:{port}",
                "workers": workers or default_workers(settings, "gunicorn"),
                # gthread workers keep connections alive (sync workers close every one)
                # and overlap one request's database waits with another's Python.
                "worker_class": "gthread" if worker_threads > 1 else "sync",
                "threads": worker_threads,
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
                # prometheus-client multiprocess mode: a dead worker's live gauges go.
                "child_exit": lambda server, worker: _metrics_child_exit(metrics_dir, worker.pid),
                "when_ready": lambda server: server.log.info(
                    "server config: workers=%s worker_class=%s threads=%s keepalive=%s",
                    server.cfg.workers, server.cfg.worker_class_str, server.cfg.threads, server.cfg.keepalive,
                ),
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):  # type: ignore[no-untyped-def]
            from app import create_app

            return create_app(settings)

    appliers = _start_appliers(settings)
    try:
        Server().run()
    finally:
        _stop_children(appliers)


def _serve_granian(host: str, port: int, workers: int, threads: int) -> None:
    """Granian: HTTP parsed in Rust, the app called from ``threads`` blocking threads in
    each of ``workers`` processes."""
    import copy
    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    # The worker pid on every access line, as gunicorn's was: which process answered.
    log_config["formatters"]["access"]["fmt"] = "pid=<%(process)d> %(message)s"
    logging.getLogger(__name__).info("server config: server=granian workers=%d threads=%d", workers, threads)
    Granian(
        "app.wsgi:create",
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.WSGI,
        workers=workers,
        blocking_threads=threads,
        log_access=True,
        log_access_format='%(addr)s "%(method)s %(path)s %(protocol)s" %(status)d %(dt_ms).1fms',
        log_dictconfig=log_config,
        respawn_failed_workers=True,
    ).serve()


def _start_appliers(settings: Settings) -> list["subprocess.Popen[bytes]"]:
    """``APPLIER_PROCESSES`` children running ``reconciler applier``: they turn what the web
    workers store into ledger rows. They die with this process (PR_SET_PDEATHSIG), even on
    kill -9."""
    import subprocess
    import sys

    def die_with_parent() -> None:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    count = 0 if settings.applier_processes == 0 else (1 if settings.is_sqlite else settings.applier_processes)
    return [
        subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()", "applier"], preexec_fn=die_with_parent)
        for _ in range(count)
    ]


def _stop_children(children: list["subprocess.Popen[bytes]"]) -> None:
    import subprocess

    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()


@main.command()
@click.option("--threads", type=click.IntRange(1, 16), default=1, show_default=True, help="Appliers in this process (PostgreSQL; SQLite runs one).")
def applier(threads: int) -> None:
    """Apply the event inbox to the ledger until stopped (SIGTERM/SIGINT). Several may run
    on several hosts against one PostgreSQL."""
    from jobs.applier import run_applier

    settings = _settings()
    run_applier(settings, threads=threads)


def _prepare_metrics_dir() -> str:
    """A fresh directory for prometheus-client's multiprocess files, named in
    ``PROMETHEUS_MULTIPROC_DIR`` before the workers fork (the library reads it from there).
    Stale files from an earlier run would add old counts, so it starts empty."""
    import os
    import shutil
    import tempfile

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(tempfile.gettempdir(), f"reconciler-metrics-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _metrics_child_exit(path: str, pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)


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


# -- reconciliation --------------------------------------------------------------------


def _parse_day(value: str | None) -> "datetime | None":
    from datetime import datetime, timezone

    if value is None:
        return None
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"):
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS], UTC)")


def _job_dependencies(settings: Settings):  # type: ignore[no-untyped-def]
    from app.gateway import StripeGateway
    from models import make_engine, make_session_factory

    engine = make_engine(settings.database_url)
    return engine, make_session_factory(engine), StripeGateway.from_settings(settings)


@main.command()
@click.option("--mode", type=click.Choice(["review", "auto", "dry-run"]), help="Default: REFUND_MODE.")
@click.option("--since", help="Backfill from this UTC date instead of the last watermark.")
@click.option("--full", is_flag=True, help="Examine every order, not only those touched since the last pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
def reconcile(mode: str | None, since: str | None, full: bool, as_json: bool) -> None:
    """Run one reconciliation pass now (backfill, detect, refund in auto mode, alert)."""
    import json

    from jobs.reconcile import RunInProgress, run_reconciliation

    settings = _settings()
    since_at = _parse_day(since)
    engine, session_factory, gateway = _job_dependencies(settings)
    progress = _progress_printer() if sys.stderr.isatty() and not as_json else None
    try:
        summary = run_reconciliation(
            session_factory, gateway, settings, mode=mode, since=since_at, full=full, progress=progress
        )
    except RunInProgress as exc:
        click.echo(f"not started: {exc}", err=True)
        sys.exit(3)
    finally:
        engine.dispose()
    if progress is not None:
        click.echo("", err=True)
    if as_json:
        data = {"run_id": summary.run_id, "status": summary.status, "mode": summary.mode, "counts": summary.counts(), "errors": summary.errors, "warnings": summary.warnings}
        if summary.mode == "dry-run":
            data["plan"] = plan_data(summary.detection.get("plan", []))
        click.echo(json.dumps(data, indent=2))
    else:
        _print_summary(summary)
    if summary.status != "succeeded":
        sys.exit(1)


def _progress_printer():  # type: ignore[no-untyped-def]
    seen: dict[str, int] = {}

    def progress(kind: str, count: int) -> None:
        seen[kind] = seen.get(kind, 0) + count
        line = "  ".join(f"{k}: {v}" for k, v in seen.items())
        click.echo(f"\rbackfill  {line}", nl=False, err=True)

    return progress


def _print_summary(summary) -> None:  # type: ignore[no-untyped-def]
    from models.money import format_amounts

    counts = summary.counts()
    amounts = format_amounts(counts["refunded_amounts"])
    click.echo(f"run {summary.run_id} ({summary.mode}): {summary.status}")
    click.echo(
        f"  backfill: {counts['charges_backfilled']} charges, {counts['refunds_backfilled']} refunds, "
        f"{counts['events_replayed']} undelivered events applied; watermark {summary.watermark}"
    )
    click.echo(f"  examined {counts['orders_examined']} orders; {counts['cases_opened']} case(s) opened, {counts['cases_resolved']} resolved outside")
    if summary.mode == "dry-run":
        click.echo(f"  would open {counts['would_open']} case(s), {counts['would_refund_automatically']} of them refunded automatically in auto mode")
    click.echo(f"  refunds: {counts['refunds_issued']} issued ({amounts}), {counts['refunds_failed']} failed, {counts['refunds_deferred']} left for the next pass, {counts['refunds_skipped']} skipped")
    click.echo(f"  alerts sent: {counts['alerts_sent']}")
    for warning in summary.warnings:
        click.echo(f"  warning: {warning}")
    for error in summary.errors:
        click.echo(f"  ! {error}")
    if summary.mode == "dry-run":
        for line in plan_lines(summary.detection.get("plan", [])):
            click.echo(f"  {line}")


# The dry run's plan (jobs.detection._planned), per order: what a pass would do.

_STEP_WORDS = {"open": "new case", "refresh": "case {case_id}", "reopen": "reopens case {case_id}"}


def _money(amount: int | None, currency: str | None) -> dict[str, Any]:
    from models.money import format_money

    known = amount is not None and currency is not None
    return {"amount": amount, "currency": currency, "display": format_money(amount, currency) if known else "total unknown"}  # type: ignore[arg-type]


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


def plan_lines(plan: list[dict[str, Any]]) -> list[str]:
    """What a dry run would do, per order (by order id), as lines of text: the order and
    its total, the keeper, then each refund and release, or for a person's decision "to
    finance:" and the reasons in words (amounts in major units), with any suggested refunds."""
    from app.services.reasons import ReasonContext, reason_sentences

    if not plan:
        return ["nothing would be done: no refund, release or case for finance"]
    lines = [f"would act on {len(plan)} order(s):"]
    for entry in plan_data(plan):
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
    return lines


@main.command()
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
def runs(limit: int) -> None:
    """List recent reconciliation passes."""
    from sqlalchemy import select

    from models import ReconciliationRun, make_engine, make_session_factory

    settings = _settings()
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            rows = list(session.scalars(select(ReconciliationRun).order_by(ReconciliationRun.id.desc()).limit(limit)))
    finally:
        engine.dispose()
    if not rows:
        click.echo("no passes yet")
        return
    click.echo(f"{'id':>5}  {'started (UTC)':19}  {'secs':>6}  {'mode':8} {'status':9} {'opened':>6} {'refunds':>7} {'failed':>6}  watermark")
    for run in rows:
        seconds = f"{(run.finished_at - run.started_at).total_seconds():.1f}" if run.finished_at else "-"
        counts = run.counts or {}
        click.echo(
            f"{run.id:>5}  {run.started_at:%Y-%m-%d %H:%M:%S}  {seconds:>6}  {run.mode:8} {run.status:9} "
            f"{counts.get('cases_opened', 0):>6} {counts.get('refunds_issued', 0):>7} {counts.get('refunds_failed', 0):>6}  {run.watermark or '-'}"
        )
        for error in (run.errors or [])[:3]:
            click.echo(f"       ! {error}")


# -- review ----------------------------------------------------------------------------


@main.group()
def review() -> None:
    """Duplicate cases: list, show, approve, dismiss."""


def _review_services(settings: Settings):  # type: ignore[no-untyped-def]
    from app.services.ratelimit import RateLimiter
    from app.services.refunds import RefundService

    engine, session_factory, gateway = _job_dependencies(settings)
    return engine, session_factory, RefundService(session_factory, gateway, limiter=RateLimiter(settings.stripe_rate_limit))


@review.command("list")
@click.option("--status", type=click.Choice(list(CASE_STATUSES)))
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 200))
def review_list(status: str | None, limit: int) -> None:
    """Cases, open and failed first."""
    from app.services.cases import CaseFilter, list_cases

    settings = _settings()
    engine, session_factory, _ = _job_dependencies(settings)
    try:
        with session_factory() as session:
            page = list_cases(session, CaseFilter(status=status, per_page=limit))
    finally:
        engine.dispose()
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
def review_show(case_id: int) -> None:
    """One case in full: charges, proposal, refunds, audit."""
    from app.services.cases import case_view

    settings = _settings()
    engine, session_factory, _ = _job_dependencies(settings)
    try:
        with session_factory() as session:
            view = case_view(session, case_id)
    finally:
        engine.dispose()
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
def review_approve(case_id: int, actor: str, note: str | None) -> None:
    """Refund what the case proposes, through the phased refund path."""
    from app.services.cases import CaseActionError, approve

    settings = _settings()
    engine, _, refunds = _review_services(settings)
    try:
        result = approve(refunds, case_id, actor=actor, note=note)
    except CaseActionError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    finally:
        engine.dispose()
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
def review_dismiss(case_id: int, actor: str, note: str) -> None:
    """Close a case without refunding."""
    from app.services.cases import CaseActionError, dismiss

    settings = _settings()
    engine, session_factory, _ = _job_dependencies(settings)
    try:
        dismiss(session_factory, case_id, actor=actor, note=note)
    except CaseActionError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    finally:
        engine.dispose()
    click.echo(f"case {case_id}: dismissed")


@main.command()
@click.option("--since", required=True, help="Cases opened on or after this UTC date (YYYY-MM-DD).")
@click.option("--until", help="... and before this UTC date (exclusive).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
def report(since: str, until: str | None, fmt: str) -> None:
    """Cases, their charges and refunds, amounts (major units, with the currency) and who
    decided, as CSV (opens cleanly in a spreadsheet) or JSON."""
    import json

    from app.services.cases import report_csv, report_rows

    settings = _settings()
    since_at, until_at = _parse_day(since), _parse_day(until)
    engine, session_factory, _ = _job_dependencies(settings)
    try:
        with session_factory() as session:
            rows = report_rows(session, since=since_at, until=until_at)  # type: ignore[arg-type]
    finally:
        engine.dispose()
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(report_csv(rows), nl=False)


@main.group()
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
def users_logout(username: str) -> None:
    """End every review session of USERNAME (a lost laptop, a leaked password)."""
    from models import WebSession, make_engine, make_session_factory, run_in_transaction
    from sqlalchemy import delete

    settings = _settings()
    engine = make_engine(settings.database_url)
    try:
        ended = run_in_transaction(
            make_session_factory(engine),
            lambda db: db.execute(delete(WebSession).where(WebSession.username == username)).rowcount or 0,
        )
    finally:
        engine.dispose()
    click.echo(f"{ended} session(s) of {username} ended")


@main.command()
@click.option("--serve/--no-serve", "serve_after", default=False, help="Keep the service running afterwards (Ctrl-C stops it).")
@click.option("--stripe", "stripe_choice", type=click.Choice(["auto", "emulator", "simulated"]), default="auto", show_default=True,
              help="auto: the stripe-stateful-mock emulator when installed, else the built-in simulation.")
@click.option("--database", type=click.Path(dir_okay=False, path_type=Path), help="Keep the demo database at this path.")
@click.option("--json", "as_json", is_flag=True, help="Also print the summary as JSON (last line).")
def demo(serve_after: bool, stripe_choice: str, database: Path | None, as_json: bool) -> None:
    """Show the whole flow on a throwaway SQLite database: orders, double-clicked and
    legitimate payments, signed webhooks (one redelivered, one missed), a reconciliation
    pass in auto mode, and what it refunded and flagged."""
    import dataclasses
    import json

    from app.demo import run_demo

    from app.logs import configure_logging

    configure_logging("WARNING", "text")
    summary = run_demo(out=click.echo, serve_after=serve_after, database_path=database.resolve() if database else None, stripe_choice=stripe_choice)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(summary)))


@main.command()
def scheduler() -> None:
    """Run the scheduler process: the nightly pass at RECONCILE_CRON (UTC), and hourly
    housekeeping. Run exactly one per deployment; the pass lock guards against more."""
    from jobs.scheduler import run_scheduler

    settings = _settings()
    engine, session_factory, gateway = _job_dependencies(settings)
    try:
        run_scheduler(settings, session_factory, gateway)
    finally:
        engine.dispose()




@main.group("api-tokens")
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
