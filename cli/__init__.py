"""The ``reconciler`` command: serve, db, orders. A composition root like ``create_app``.

Settings are read once here; a malformed setting ends the command with a one-line message
naming the variable and exit status 2, before anything starts. Every command that uses the
database checks it first (:mod:`models.availability`): a wrong URL, a server that is down,
a missing database or an unmigrated schema is one line on stderr and exit status 1, never
a traceback; so is a database that goes away while the command runs.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import click

from config import DEFAULT_SQLITE_PATH, Settings, SettingsError
from models import CASE_STATUSES
from models.base import iso_utc

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from domain.stripe.gateway import StripeGateway
    from jobs.supervisor import Child

log = logging.getLogger("reconciler")


class ConfigurationError(click.ClickException):
    """A setting is missing or malformed: one line, no usage text, exit status 2."""

    exit_code = 2


class DatabaseError(click.ClickException):
    """The database cannot be used: one line, exit status 1."""

    exit_code = 1


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise ConfigurationError(f"configuration error: {exc}") from None
    from app.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    return settings


def _engine(settings: Settings, *, schema: str = "head"):  # type: ignore[no-untyped-def]
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


def default_database_url() -> str:
    return f"sqlite:///{DEFAULT_SQLITE_PATH.resolve()}"


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

            raise DatabaseError(describe_error(exc, _configured_url())) from None


def _is_availability_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import OperationalError

    message = str(getattr(exc, "orig", exc)).lower()
    return isinstance(exc, OperationalError) or "no such table" in message or ("relation" in message and "does not exist" in message)


def _configured_url() -> str:
    try:
        return Settings.from_env().database_url
    except SettingsError:
        return "the configured database"


@click.group(cls=ReconcilerGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


def default_threads(settings: Settings, server: str = "granian") -> int:
    """Threads per worker. granian on PostgreSQL: 8, so that concurrent webhooks in one
    worker share one insert and one commit (domain/ledger/inbox.py, GroupInsert): a
    request waits for the statement in flight, and the next one carries every row that
    queued meanwhile (peerbench on 2 cores, 16 senders, accept only: 2 x 2 threads
    2,155 events/s; 2 x 4 grouped 2,467; 2 x 8 grouped 2,853). Otherwise 2, so gunicorn
    runs gthread workers, which keep connections alive (sync workers close every one)."""
    if server == "granian" and not settings.is_sqlite:
        return 8
    return 2


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", type=click.IntRange(1, 64), envvar="WEB_WORKERS", help="Default: 2 on SQLite; on PostgreSQL one per core with granian, cores + 1 with gunicorn (at most 8).")
@click.option("--threads", type=click.IntRange(1, 64), envvar="WEB_THREADS", help="Threads per worker (gunicorn: gthread workers when above 1). Default: 8 with granian on PostgreSQL, else 2.")
@click.option("--migrate/--no-migrate", default=None, help="Apply migrations first (default: on SQLite only).")
@click.option("--server", "server_name", type=click.Choice(["gunicorn", "granian"]), default="granian", show_default=True, envvar="WEB_SERVER",
              help="The WSGI server (README: Benchmarks, Ingest).")
@click.option("--scheduler/--no-scheduler", "with_scheduler", default=True,
              help="Also run the scheduler (nightly pass, alert sweep, housekeeping) as a supervised child process (default: on).")
@click.option("--supervised", "web_only", is_flag=True, hidden=True,
              help="Run the web server alone in this process: how serve's supervisor starts its web child.")
def serve(
    host: str, port: int, workers: int | None, threads: int | None, migrate: bool | None, server_name: str,
    with_scheduler: bool, web_only: bool,
) -> None:
    """Run the service: the web app (granian, or gunicorn), the event applier(s)
    (APPLIER_PROCESSES) and, unless --no-scheduler, the scheduler, each a supervised child
    process (an applier or scheduler that dies is restarted; SIGTERM or Ctrl-C stops them
    all)."""
    settings = _settings()
    _ensure_schema(settings, migrate=settings.is_sqlite if migrate is None else migrate)
    if web_only:
        _run_web(settings, server_name, host=host, port=port, workers=workers, threads=threads)
        return
    for warning in settings.warnings():
        click.echo(f"warning: {warning}", err=True)
    from jobs.supervisor import Supervisor

    web_args = ["--server", server_name, "--host", host, "--port", str(port)]
    if workers:
        web_args += ["--workers", str(workers)]
    if threads:
        web_args += ["--threads", str(threads)]
    sys.exit(Supervisor(service_children(settings, web_args, scheduler=with_scheduler)).run())


def service_children(settings: Settings, web_args: list[str], *, scheduler: bool = True) -> list[Child]:
    """What ``reconciler serve`` runs, in order: the web server (essential: if it exits,
    everything stops), the event appliers (``APPLIER_PROCESSES``; one on SQLite, none when
    0, for hosts that only accept events) and the scheduler; those are restarted when they
    die. Each is this same command line in a process of its own. Another long-running
    process of the service joins by adding one :class:`jobs.supervisor.Child` here."""
    from jobs.supervisor import Child

    command = [sys.executable, "-m", "cli"]
    appliers = 0 if settings.applier_processes == 0 else (1 if settings.is_sqlite else settings.applier_processes)
    children = [Child("web", [*command, "serve", "--supervised", "--no-migrate", *web_args], restart=False)]
    children += [
        Child("applier" if appliers == 1 else f"applier-{n}", [*command, "applier"]) for n in range(1, appliers + 1)
    ]
    if scheduler:
        children.append(Child("scheduler", [*command, "scheduler"]))
    return children


def _run_web(settings: Settings, server_name: str, *, host: str, port: int, workers: int | None, threads: int | None) -> None:
    """The web server (granian or gunicorn) in this process, until it is stopped."""
    metrics_dir = _prepare_metrics_dir()
    if server_name == "granian":
        _serve_granian(
            host, port, workers or default_workers(settings, "granian"), threads or default_threads(settings, "granian"),
            access_log=settings.access_log,
        )
        return
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            worker_threads = threads or default_threads(settings, "gunicorn")
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
                "accesslog": "-" if settings.access_log else None,
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

    Server().run()


def _serve_granian(host: str, port: int, workers: int, threads: int, *, access_log: bool) -> None:
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
        log_access=access_log,
        log_access_format='%(addr)s "%(method)s %(path)s %(protocol)s" %(status)d %(dt_ms).1fms',
        log_dictconfig=log_config,
        respawn_failed_workers=True,
    ).serve()


@main.command()
@click.option("--threads", type=click.IntRange(1, 16), default=1, show_default=True, help="Appliers in this process (PostgreSQL; SQLite runs one).")
def applier(threads: int) -> None:
    """Apply the event inbox to the ledger until stopped (SIGTERM/SIGINT). Several may run
    on several hosts against one PostgreSQL."""
    from jobs.applier import run_applier

    settings = _settings()
    _engine(settings).dispose()  # usable, migrated: else one line, exit status 1
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
    """Migrate (when asked) or check that the schema is at the latest migration; either way
    a database that cannot be used is one line and exit status 1."""
    if migrate:
        _upgrade(settings, "head")
    _engine(settings).dispose()


def _upgrade(settings: Settings, revision: str) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from models.availability import describe_error
    from models.migrate import upgrade

    _engine(settings, schema="create").dispose()  # reachable, and the directory exists
    try:
        upgrade(settings.database_url, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(describe_error(exc, settings.database_url)) from None


# -- db --------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations."""
    settings = _settings()
    _upgrade(settings, revision)
    click.echo(f"database at {revision}")


@db.command("current")
def db_current() -> None:
    """Print the schema revision."""
    from models.migrate import current_revision, head_revision

    settings = _settings()
    with _database(settings, schema="any") as db:
        current = current_revision(db.engine)
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
    from domain.orders import OrderError, import_orders, parse_order_csv
    from models import make_session_factory, run_in_transaction

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
    with _database(settings) as db:
        try:
            report = run_in_transaction(db.session_factory, lambda s: import_orders(s, rows))
        except OrderError as exc:
            raise click.ClickException(f"{exc.message}; nothing imported") from None
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


class _Database(NamedTuple):
    """What a command works with: the engine, its session factory, the Stripe gateway."""

    engine: Engine
    session_factory: sessionmaker[Session]
    gateway: StripeGateway


@contextlib.contextmanager
def _database(settings: Settings, *, schema: str = "head") -> Iterator[_Database]:
    """The configured database once it is usable (:func:`_engine`), for one command; the
    engine is disposed of when the block ends, whatever happens in it."""
    from domain.stripe.gateway import StripeGateway
    from models import make_session_factory

    engine = _engine(settings, schema=schema)
    try:
        yield _Database(engine, make_session_factory(engine), StripeGateway.from_settings(settings))
    finally:
        engine.dispose()


@main.command()
@click.option("--mode", type=click.Choice(["review", "auto", "dry-run"]), help="Default: REFUND_MODE.")
@click.option("--since", help="Backfill from this UTC date instead of the last watermark.")
@click.option("--full", is_flag=True, help="Examine every order, not only those touched since the last pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
def reconcile(mode: str | None, since: str | None, full: bool, as_json: bool) -> None:
    """Run one reconciliation pass now (backfill, detect, refund in auto mode, alert).

    Progress goes to stderr: bars on a terminal, JSON log lines otherwise. SIGINT, SIGTERM
    or SIGHUP stop the pass where it is: it is recorded as aborted and the command exits
    128 + the signal's number."""
    import json

    from jobs.progress import LogProgress, TerminalProgress
    from jobs.reconcile import PassAborted, RunInProgress, abort_on_signals, run_reconciliation

    settings = _settings()
    since_at = _parse_day(since)
    started: list[int] = []
    reporter: Any = TerminalProgress() if sys.stderr.isatty() else LogProgress()
    try:
        with _database(settings) as db, abort_on_signals(), (
            reporter if isinstance(reporter, TerminalProgress) else contextlib.nullcontext()
        ):
            summary = run_reconciliation(
                db.session_factory, db.gateway, settings, mode=mode, since=since_at, full=full, progress=reporter,
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


def datetime_now_utc():  # type: ignore[no-untyped-def]
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


# The dry run's plan (domain.cases.detection._planned), per order: what a pass would do.

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


@main.command()
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
def runs(limit: int) -> None:
    """List recent reconciliation passes (status running, succeeded, partial, failed or
    aborted), after when the next one is due."""
    from sqlalchemy import select

    from models import ReconciliationRun, make_session_factory

    from jobs.schedule_state import schedule_view

    settings = _settings()
    with _database(settings) as db, db.session_factory() as session:
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


# -- review ----------------------------------------------------------------------------


@main.group()
def review() -> None:
    """Duplicate cases: list, show, approve, dismiss."""


@review.command("list")
@click.option("--status", type=click.Choice(list(CASE_STATUSES)))
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 200))
def review_list(status: str | None, limit: int) -> None:
    """Cases, open and failed first."""
    from domain.cases.review import CaseFilter, list_cases

    settings = _settings()
    with _database(settings) as db, db.session_factory() as session:
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
def review_show(case_id: int) -> None:
    """One case in full: charges, proposal, refunds, audit."""
    from domain.cases.review import case_view

    settings = _settings()
    with _database(settings) as db, db.session_factory() as session:
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
def review_approve(case_id: int, actor: str, note: str | None) -> None:
    """Refund what the case proposes, through the phased refund path."""
    from domain.cases.refunds import RefundService
    from domain.cases.review import CaseActionError, approve

    settings = _settings()
    with _database(settings) as db:
        try:
            result = approve(RefundService.from_settings(settings, db.session_factory, db.gateway), case_id, actor=actor, note=note)
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
def review_dismiss(case_id: int, actor: str, note: str) -> None:
    """Close a case without refunding."""
    from domain.cases.review import CaseActionError, dismiss

    settings = _settings()
    with _database(settings) as db:
        try:
            dismiss(db.session_factory, case_id, actor=actor, note=note)
        except CaseActionError as exc:
            raise click.ClickException(f"{exc.code}: {exc.message}") from None
    click.echo(f"case {case_id}: dismissed")


@main.command()
@click.option("--since", required=True, help="Cases opened on or after this UTC date (YYYY-MM-DD).")
@click.option("--until", help="... and before this UTC date (exclusive).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
def report(since: str, until: str | None, fmt: str) -> None:
    """Cases, their charges and refunds, amounts (major units, with the currency) and who
    decided, as CSV (opens cleanly in a spreadsheet) or JSON."""
    import json

    from domain.cases.review import report_csv, report_rows

    settings = _settings()
    since_at, until_at = _parse_day(since), _parse_day(until)
    with _database(settings) as db, db.session_factory() as session:
        rows = report_rows(session, since=since_at, until=until_at)  # type: ignore[arg-type]
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
    from models import WebSession, make_session_factory, run_in_transaction
    from sqlalchemy import delete

    settings = _settings()
    with _database(settings) as db:
        ended = run_in_transaction(
            db.session_factory,
            lambda session: session.execute(delete(WebSession).where(WebSession.username == username)).rowcount or 0,
        )
    click.echo(f"{ended} session(s) of {username} ended")


@main.command()
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


@main.command()
def scheduler() -> None:
    """Run the scheduler process on its own: the nightly pass at RECONCILE_CRON (UTC), the
    alert sweep and hourly housekeeping. `reconciler serve` already runs one; the pass lock
    keeps passes apart if several hosts run it."""
    from jobs.scheduler import run_scheduler

    settings = _settings()
    with _database(settings) as db:
        status = run_scheduler(settings, db.session_factory, db.gateway)
    sys.exit(status)




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
