"""The service's processes: ``serve`` (the supervisor, and the web server it starts as a
child), ``applier`` and ``scheduler``."""

from __future__ import annotations

import logging
import multiprocessing
import sys
from typing import TYPE_CHECKING, Any

import click

from cli.context import CliContext, pass_cli
from config import Settings

if TYPE_CHECKING:
    from flask import Flask

    from jobs.supervisor import Child


def default_workers(settings: Settings, server: str = "uvicorn") -> int:
    """Worker processes. uvicorn: one per two cores (at least 1, at most 8): a worker
    answers every webhook it holds on one event loop, so one worker groups more of them
    into each commit, and the cores left serve PostgreSQL and the applier (peerbench on 2
    cores, same hour: 1 worker acknowledged 1.60 x the peer and applied 1.46 x; 2 workers
    1.60 x and 1.27 x, with 50% more PostgreSQL CPU per event). granian on SQLite 2, whose
    single writer gains nothing from more; on PostgreSQL one per core (capped at 8): HTTP
    is parsed in Rust, so a worker's Python is busy only with the app (peerbench on 2
    cores, one run each: 2 x 2 threads acknowledged 1,296 events/s and applied 1,205; 3 x
    2: 969 and 875; 2 x 4: 1,222 and 828; 1 x 8: 929 and 833). gunicorn: cores + 1 (its
    measurement: 3 processes x 2 threads ingested faster than 5 sync workers, 3 x 4 or 2
    x 4)."""
    cores = multiprocessing.cpu_count()
    if server == "uvicorn":
        return max(1, min(8, cores // 2))
    if settings.is_sqlite:
        return 2
    return min(8, cores if server == "granian" else cores + 1)


def default_threads(settings: Settings, server: str = "uvicorn") -> int:
    """Threads per worker. uvicorn: 8 for the Flask pages and API (webhooks are answered on
    the event loop and take no thread). granian on PostgreSQL: 8, so that concurrent
    webhooks in one worker share one insert and one commit (domain/ledger/inbox.py,
    GroupInsert): a request waits for the statement in flight, and the next one carries
    every row that queued meanwhile (peerbench on 2 cores, 16 senders, accept only: 2 x 2
    threads 2,155 events/s; 2 x 4 grouped 2,467; 2 x 8 grouped 2,853). Otherwise 2, so
    gunicorn runs gthread workers, which keep connections alive (sync workers close every
    one)."""
    if server == "uvicorn" or (server == "granian" and not settings.is_sqlite):
        return 8
    return 2


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", type=click.IntRange(1, 64), envvar="WEB_WORKERS", help="Default: one per two cores with uvicorn; 2 on SQLite, else one per core with granian; cores + 1 with gunicorn (at most 8).")
@click.option("--threads", type=click.IntRange(1, 64), envvar="WEB_THREADS", help="Threads per worker (uvicorn: for the Flask pages and API; gunicorn: gthread workers when above 1). Default: 8 with uvicorn, and with granian on PostgreSQL; else 2.")
@click.option("--migrate/--no-migrate", default=None, help="Apply migrations first (default: on SQLite only).")
@click.option("--server", "server_name", type=click.Choice(["uvicorn", "granian", "gunicorn"]), default="uvicorn", show_default=True, envvar="WEB_SERVER",
              help="The web server: uvicorn serves the ASGI app, granian and gunicorn the WSGI app (README: Benchmarks, Ingest).")
@click.option("--scheduler/--no-scheduler", "with_scheduler", default=True,
              help="Also run the scheduler (nightly pass, alert sweep, housekeeping) as a supervised child process (default: on).")
@click.option("--supervised", "web_only", is_flag=True, hidden=True,
              help="Run the web server alone in this process: how serve's supervisor starts its web child.")
@pass_cli
def serve(
    context: CliContext, host: str, port: int, workers: int | None, threads: int | None, migrate: bool | None, server_name: str,
    with_scheduler: bool, web_only: bool,
) -> None:
    """Run the service: the web app (uvicorn, or granian or gunicorn), the event applier(s)
    (APPLIER_PROCESSES) and, unless --no-scheduler, the scheduler, each a supervised child
    process (an applier or scheduler that dies is restarted; SIGTERM or Ctrl-C stops them
    all)."""
    settings = context.settings
    _ensure_schema(context, migrate=settings.is_sqlite if migrate is None else migrate)
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
    """The web server (uvicorn, granian or gunicorn) in this process, until it is stopped."""
    metrics_dir = _prepare_metrics_dir()
    if server_name == "uvicorn":
        _serve_uvicorn(
            host, port, workers or default_workers(settings, "uvicorn"), threads or default_threads(settings, "uvicorn"),
            access_log=settings.access_log,
        )
        return
    if server_name == "granian":
        _serve_granian(
            host, port, workers or default_workers(settings, "granian"), threads or default_threads(settings, "granian"),
            access_log=settings.access_log,
        )
        return
    from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]  # gunicorn ships no types

    class Server(BaseApplication):  # type: ignore[misc]  # a subclass of an untyped class
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

        def load(self) -> Flask:
            from app import create_app

            return create_app(settings)

    Server().run()


def _serve_uvicorn(host: str, port: int, workers: int, threads: int, *, access_log: bool) -> None:
    """uvicorn (uvloop, httptools): the ASGI app of app/asgi.py, webhooks answered on each
    worker's event loop, the Flask app in ``threads`` threads per worker. uvicorn's process
    manager runs even for one worker, so a worker that dies is replaced, as granian's and
    gunicorn's are."""
    import os

    from uvicorn import Config
    from uvicorn.supervisors import Multiprocess

    import copy

    from uvicorn.config import LOGGING_CONFIG

    # Read by app.asgi.create in each worker process (uvicorn spawns them).
    os.environ["WEB_THREADS"] = str(threads)
    log_config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    # The worker pid on every access line, as with the other servers: which process answered.
    log_config["formatters"]["access"]["fmt"] = 'pid=<%(process)d> %(client_addr)s "%(request_line)s" %(status_code)s'
    logging.getLogger("cli").info("server config: server=uvicorn workers=%d threads=%d", workers, threads)
    config = Config(
        "app.asgi:create",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        # The app has no startup or shutdown work; each worker connects on first use.
        lifespan="off",
        # The app decides whom to trust for X-Forwarded-* (TRUSTED_PROXIES, app/web_security.py).
        proxy_headers=False,
        server_header=False,
        access_log=access_log,
        log_config=log_config,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=20,
    )
    Multiprocess(config, sockets=[config.bind_socket()]).run()


def _serve_granian(host: str, port: int, workers: int, threads: int, *, access_log: bool) -> None:
    """Granian: HTTP parsed in Rust, the app called from ``threads`` blocking threads in
    each of ``workers`` processes."""
    import copy
    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LOGGING_CONFIG

    log_config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    # The worker pid on every access line, as gunicorn's was: which process answered.
    log_config["formatters"]["access"]["fmt"] = "pid=<%(process)d> %(message)s"
    # The command line's logger is the package's ("cli"), whichever of its modules logs.
    logging.getLogger("cli").info("server config: server=granian workers=%d threads=%d", workers, threads)
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

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]  # untyped in prometheus-client


def _ensure_schema(context: CliContext, *, migrate: bool) -> None:
    """Migrate (when asked) or check that the schema is at the latest migration; either way
    a database that cannot be used is one line and exit status 1. No connection is held
    afterwards: the web server's workers and the other children open their own."""
    if migrate:
        context.upgrade_database("head")
    context.check_database()


@click.command()
@click.option("--threads", type=click.IntRange(1, 16), default=1, show_default=True, help="Appliers in this process (PostgreSQL; SQLite runs one).")
@pass_cli
def applier(context: CliContext, threads: int) -> None:
    """Apply the event inbox to the ledger until stopped (SIGTERM/SIGINT). Several may run
    on several hosts against one PostgreSQL."""
    from jobs.applier import run_applier

    context.check_database()  # usable, migrated: else one line, exit status 1
    run_applier(context.settings, threads=threads)


@click.command()
@pass_cli
def scheduler(context: CliContext) -> None:
    """Run the scheduler process on its own: the nightly pass at RECONCILE_CRON (UTC), the
    alert sweep and hourly housekeeping. `reconciler serve` already runs one; the pass lock
    keeps passes apart if several hosts run it."""
    from jobs.scheduler import run_scheduler

    sys.exit(run_scheduler(context.settings, context.session_factory, context.gateway))
