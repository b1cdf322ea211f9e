"""``reconciler demo``: the whole flow in a minute, on a throwaway SQLite database.

1. A Stripe on 127.0.0.1: the stripe-stateful-mock emulator when the dev setup installed
   it (Node.js), else the fake Stripe of the tests (tests/stripe_fake, served over HTTP).
   Both live in the repository's tests/, not in the installed package: an installed wheel
   has neither, and the demo says so (:class:`DemoError`).
2. The service under its production server (``reconciler serve``) on a free local port.
3. Orders through the API; payments at "Stripe": a double click, two tabs, a triple click
   in yen, a legitimate single payment, a legitimate split payment, and an ambiguous
   overpayment.
4. Signed webhooks for those charges, as Stripe sends them, with one delivered twice and
   one never delivered (backfill must find it).
5. One reconciliation pass in auto mode, in this process.
6. A summary read back from the database; with ``--serve``, the review page's URL and
   demo credentials, and everything keeps running until Ctrl-C or SIGTERM.

Stopping: SIGINT (Ctrl-C) or SIGTERM, at any point, stops the service and the Stripe
emulator, deletes the temporary folder (and the database, unless ``--database`` named
one) and says so. A stop while ``--serve`` keeps things running is the normal end (exit
status 0); a stop before the demo finished exits 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import requests
from sqlalchemy import func, select

from models.money import format_money

ROOT = Path(__file__).resolve().parents[2]
EMULATOR_DIR = ROOT / "tests" / "emulator" / "stateful_mock"

WEBHOOK_SECRET = "whsec_demo_" + "0" * 24
API_KEY = "sk_test_demo_reconciler"

# (order id, total, currency, charge amounts, what a person should expect)
SCENARIOS: list[tuple[str, int, str, list[int], str]] = [
    ("demo-double-click", 4999, "usd", [4999, 4999], "double click: the second charge is refunded (its webhook never arrived)"),
    ("demo-two-tabs", 12000, "eur", [12000, 12000], "two tabs: the later charge is refunded (one webhook delivered twice)"),
    ("demo-triple-yen", 5000, "jpy", [5000, 5000, 5000], "triple click in yen: two charges refunded"),
    ("demo-single", 2500, "usd", [2500], "a normal payment: nothing to do"),
    ("demo-split", 10000, "usd", [6000, 4000], "deposit and balance: exactly the total, nothing to do"),
    ("demo-overpaid", 5000, "usd", [5000, 1500],
     f"{format_money(5000, 'usd')} + {format_money(1500, 'usd')} on a {format_money(5000, 'usd')} order: "
     "not a clear duplicate, flagged for finance"),
]
MISSED = ("demo-double-click", 1)  # (order, charge index) whose webhook is never delivered
REDELIVERED = ("demo-two-tabs", 0)  # delivered twice


@dataclass
class DemoSummary:
    stripe: str
    database: str
    events_sent: int = 0
    events_processed: int = 0
    events_duplicate: int = 0
    charges_in_ledger: int = 0
    charges_backfilled: int = 0
    cases: dict[str, str] = field(default_factory=dict)  # order -> case status
    refunds: list[dict[str, Any]] = field(default_factory=list)
    refunded_by_currency: dict[str, int] = field(default_factory=dict)
    review_url: str = ""
    username: str = "demo"
    password: str = ""


class DemoStopped(BaseException):
    """SIGINT or SIGTERM: unwind, stopping every process and deleting the temporary files.
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` stops it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.finished = False  # stopped while --serve kept things running: the normal end


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """The first SIGINT or SIGTERM raises :class:`DemoStopped` where the demo is; further
    ones are ignored, so that the clean-up they set off finishes."""
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            return
        fired.append(signum)
        raise DemoStopped(signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def run_demo(
    *,
    out: Callable[[str], None] = print,
    serve_after: bool = False,
    database_path: Path | None = None,
    stripe_choice: str = "auto",
) -> DemoSummary:
    """Run the demo; see the module docstring. Raises :class:`DemoStopped` (after cleaning
    up, and saying so) when a signal stopped it before it finished."""
    if database_path is not None and not database_path.parent.is_dir():
        raise DemoError(f"cannot keep the demo database at {database_path}: the directory {database_path.parent} does not exist")
    cleaned: list[str] = []
    with _stop_on_signals():
        try:
            summary = _run_demo(out, serve_after, database_path, stripe_choice, cleaned)
        except DemoStopped as stopped:
            _say_stopped(out, stopped, cleaned, database_path)
            if not stopped.finished:
                raise
            return stopped.summary  # type: ignore[attr-defined]
    return summary


@contextlib.contextmanager
def _noted(cleaned: list[str], note: str) -> Iterator[list[str]]:
    """Append the (possibly updated) note once the block ends."""
    holder = [note]
    try:
        yield holder
    finally:
        cleaned.append(holder[0])


class DemoError(Exception):
    """The demo cannot start as asked (one line for the command line)."""


def _say_stopped(out: Callable[[str], None], stopped: DemoStopped, cleaned: list[str], database_path: Path | None) -> None:
    done = ", ".join(cleaned) if cleaned else "nothing had started yet"
    kept = f"; the database is kept at {database_path}" if database_path and database_path.exists() else ""
    when = "" if stopped.finished else " before the demo finished"
    out(f"\nStopped by {signal.Signals(stopped.signum).name}{when}: {done}{kept}.")


def _run_demo(
    out: Callable[[str], None],
    serve_after: bool,
    database_path: Path | None,
    stripe_choice: str,
    cleaned: list[str],
) -> DemoSummary:
    from config import Settings
    from models.migrate import upgrade

    with contextlib.ExitStack() as stack:
        # Each note is registered before its resource, so (last in, first out) it is
        # written once that resource is cleaned up.
        temporary = tempfile.TemporaryDirectory(prefix="reconciler-demo-")
        workdir = Path(temporary.name)
        stack.callback(cleaned.append, f"the temporary folder {workdir} is deleted")
        stack.enter_context(temporary)
        db_path = database_path or workdir / "demo.db"
        if db_path.exists():
            db_path.unlink()
        database_url = f"sqlite:///{db_path}"
        upgrade(database_url)

        stripe_stopped = stack.enter_context(_noted(cleaned, "Stripe is stopped"))
        stripe_name, stripe_base = stack.enter_context(_stripe(stripe_choice, workdir))
        stripe_stopped[0] = f"the {stripe_name} is stopped"
        out(f"Stripe: {stripe_name} at {stripe_base}")
        password = secrets.token_urlsafe(9)
        token = secrets.token_urlsafe(24)
        env = {
            "DATABASE_URL": database_url,
            "STRIPE_API_KEY": API_KEY,
            "STRIPE_API_BASE": stripe_base,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "STRIPE_MAX_NETWORK_RETRIES": "0",
            "API_TOKEN": token,
            "SECRET_KEY": secrets.token_hex(32),
            "REVIEW_USERS": f"demo:approver:{_hash(password)}",
            # The demo serves plain http on 127.0.0.1 only: let the session cookie work there.
            "DEV_ALLOW_HTTP_LOOPBACK": "true",
            "REFUND_MODE": "auto",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "json",
        }
        stack.callback(cleaned.append, "the service is stopped")
        base = stack.enter_context(serve_process(["--workers", "2", "--no-migrate"], env, workdir / "serve.log"))
        out(f"Service: {base} (log: {workdir / 'serve.log'})")
        # The review login is only shown (and kept in the summary) when the service stays up.
        summary = DemoSummary(
            stripe=stripe_name, database=str(db_path),
            password=password if serve_after else "", review_url=f"{base}/review" if serve_after else "",
        )

        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {token}"
        stripe_http = requests.Session()
        stripe_http.auth = (API_KEY, "")
        out("\nOrders and payments:")
        for order_id, total, currency, amounts, story in SCENARIOS:
            api.post(f"{base}/api/orders", json={"id": order_id, "amount": total, "currency": currency}, timeout=10).raise_for_status()
            for index, amount in enumerate(amounts):
                charge = _create_charge(stripe_http, stripe_base, order_id, amount, currency)
                deliveries = 0 if (order_id, index) == MISSED else 2 if (order_id, index) == REDELIVERED else 1
                event = _event(charge)
                for _ in range(deliveries):
                    status = _deliver(base, event)
                    summary.events_sent += 1
                    summary.events_processed += status == "received"
                    summary.events_duplicate += status == "duplicate"
            out(f"  {order_id:18} {_money(total, currency):>12}  charged {' + '.join(_money(a, currency) for a in amounts)}")
            out(f"  {'':18} {'':>12}  {story}")

        out("\nReconciliation pass (auto mode)...")
        settings = Settings.from_env(env)
        run = _reconcile(settings)
        summary.charges_backfilled = run.backfill.get("charges", 0)
        _read_back(settings, summary)
        _print_summary(summary, run, out)
        if not serve_after:
            kept = f"kept at {db_path}" if database_path else "deleted now"
            out(f"(The service and Stripe stop now and the database is {kept}; `reconciler demo --serve` keeps them running.)")
        if serve_after:
            out(f"\nThe service keeps running: open {summary.review_url} and log in as demo / {password}")
            gone = "keeps the database" if database_path else "deletes the demo database"
            out(f"Ctrl-C (or SIGTERM) stops it and {gone}.")
            try:
                while True:
                    time.sleep(3600)
            except DemoStopped as stopped:
                stopped.finished = True
                stopped.summary = summary  # type: ignore[attr-defined]
                raise
        return summary


def _reconcile(settings):  # type: ignore[no-untyped-def]
    from domain.stripe.gateway import StripeGateway
    from jobs.reconcile import run_reconciliation
    from models import make_engine, make_session_factory

    engine = make_engine(settings.database_url)
    try:
        return run_reconciliation(make_session_factory(engine), StripeGateway.from_settings(settings), settings, mode="auto")
    finally:
        engine.dispose()


def _read_back(settings, summary: DemoSummary) -> None:  # type: ignore[no-untyped-def]
    """The summary's figures, from the database (not from what the demo thinks it did)."""
    from models import Charge, DuplicateCase, RefundAttempt, StripeEvent, make_engine, make_session_factory

    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            summary.charges_in_ledger = session.scalar(select(func.count()).select_from(Charge)) or 0
            summary.cases = {c.order_id: c.status for c in session.scalars(select(DuplicateCase).order_by(DuplicateCase.id))}
            for attempt in session.scalars(select(RefundAttempt).where(RefundAttempt.status == "succeeded").order_by(RefundAttempt.id)):
                summary.refunds.append({"order_id": attempt.order_id, "charge_id": attempt.charge_id, "amount": attempt.amount, "currency": attempt.currency, "refund_id": attempt.refund_id})
                summary.refunded_by_currency[attempt.currency] = summary.refunded_by_currency.get(attempt.currency, 0) + attempt.amount
            stored = session.scalar(select(func.count()).select_from(StripeEvent)) or 0
            assert stored == summary.events_processed, "every processed delivery is one stored event"
    finally:
        engine.dispose()


def _print_summary(summary: DemoSummary, run, out: Callable[[str], None]) -> None:  # type: ignore[no-untyped-def]
    out("\nWhat happened:")
    out(f"  webhooks: {summary.events_sent} deliveries, {summary.events_processed} events stored and applied, {summary.events_duplicate} duplicate delivery acknowledged and ignored")
    out(f"  backfill: {summary.charges_backfilled} charges read from Stripe; the ledger now holds {summary.charges_in_ledger} (one only Stripe knew about)")
    refunded = ", ".join(_money(v, c) for c, v in sorted(summary.refunded_by_currency.items())) or "nothing"
    out(f"  refunded automatically: {len(summary.refunds)} duplicate charge(s), {refunded}")
    for refund in summary.refunds:
        out(f"    {refund['order_id']:18} {refund['charge_id']}  {_money(refund['amount'], refund['currency'])}  ({refund['refund_id']})")
    flagged = [o for o, s in summary.cases.items() if s == "open"]
    out(f"  flagged for finance: {', '.join(flagged) or 'none'}")
    out(f"  run {run.run_id}: {run.status}" + (f" ({'; '.join(run.errors)})" if run.errors else ""))
    out(f"\nDatabase: {summary.database}")


@contextlib.contextmanager
def _stripe(choice: str, workdir: Path) -> Iterator[tuple[str, str]]:
    node = shutil.which("node")
    emulator_ready = node is not None and (EMULATOR_DIR / "node_modules" / "stripe-stateful-mock").is_dir()
    if choice == "emulator" and not emulator_ready:
        raise DemoError("stripe-stateful-mock is not installed: run scripts/setup-dev.sh in a checkout of the repository (needs Node.js)")
    if choice in ("auto", "emulator") and emulator_ready:
        log = open(workdir / "stripe.log", "wb")
        process = subprocess.Popen(
            [node, str(EMULATOR_DIR / "launch.js"), "--port", "0", "--parent-pid", str(os.getpid())],  # type: ignore[list-item]
            cwd=str(EMULATOR_DIR), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
        )
        try:
            line = process.stdout.readline().decode().strip()  # type: ignore[union-attr]
            if not line.startswith("STATEFUL_MOCK_READY "):
                raise RuntimeError(f"the Stripe emulator did not start: {line!r}")
            yield "stripe-stateful-mock emulator", line.split(" ", 1)[1]
        finally:
            process.terminate()
            process.wait(timeout=10)
            log.close()
        return
    model, server = _simulated_stripe(emulator_missing=choice == "auto")
    # As the emulators answer: no Events API (backfill reads the charges) and no Checkout.
    with server(model(events_api=False, checkout_api=False)) as simulated:
        yield "built-in simulated Stripe", simulated.base_url


def _simulated_stripe(*, emulator_missing: bool) -> tuple[Any, Any]:
    """The fake Stripe of the tests (its model and its HTTP server), imported from the
    repository checkout this package runs from; it is not shipped in the wheel."""
    failure = ""
    if (ROOT / "tests" / "stripe_fake" / "__init__.py").is_file():
        if str(ROOT) not in sys.path:
            sys.path.append(str(ROOT))
        try:
            from tests.stripe_fake import StripeModel, StripeServer
        except ImportError as exc:
            failure = f" (importing it from {ROOT / 'tests'} failed: {exc})"
        else:
            return StripeModel, StripeServer
    missing = "the stripe-stateful-mock emulator is not installed and " if emulator_missing else ""
    raise DemoError(
        f"no Stripe to run the demo against: {missing}the simulated Stripe is not part of the installed "
        "package. Run the demo from a checkout of the repository (scripts/demo), where the simulated Stripe "
        f"lives in tests/stripe_fake and scripts/setup-dev.sh installs the emulator{failure}."
    )


@contextlib.contextmanager
def serve_process(
    args: list[str], env: dict[str, str], log_path: Path, *, cwd: Path = ROOT, scheduler: bool = False
) -> Iterator[str]:
    """Run ``reconciler serve ARGS`` on a free 127.0.0.1 port until the block ends; yields
    its base URL once ``/healthz`` answers 200 (the tests start the service the same way).
    Without ``scheduler`` the service runs without its scheduler (``--no-scheduler``): the
    demo and the tests run their passes themselves. Fails with the server's log if it does
    not start in 60 s."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             *([] if scheduler else ["--no-scheduler"]), *args],
            cwd=str(cwd), env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=log, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def _create_charge(http: requests.Session, stripe_base: str, order_id: str, amount: int, currency: str) -> dict[str, Any]:
    """What the merchant's checkout does: charge the card (the emulator's test token)."""
    response = http.post(
        f"{stripe_base}/v1/charges",
        data={"amount": amount, "currency": currency, "source": "tok_visa", "metadata[order_id]": order_id},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()


def _event(charge: dict[str, Any]) -> bytes:
    """A ``charge.succeeded`` event around Stripe's own charge object, as Stripe sends it."""
    event = {
        "id": f"evt_demo{secrets.token_hex(10)}",
        "object": "event",
        # The emulators render charges with their refunds embedded: the older shape.
        "api_version": "2020-08-27",
        "created": int(charge["created"]),
        "data": {"object": charge},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": f"req_demo{secrets.token_hex(6)}", "idempotency_key": None},
        "type": "charge.succeeded",
    }
    return json.dumps(event, indent=2).encode()


def _deliver(base: str, body: bytes) -> str:
    """Post ``body`` signed as Stripe signs webhooks (``t=...,v1=HMAC-SHA256``)."""
    timestamp = int(time.time())
    signature = hmac.new(WEBHOOK_SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    response = requests.post(
        f"{base}/webhooks/stripe",
        data=body,
        headers={"Stripe-Signature": f"t={timestamp},v1={signature}", "Content-Type": "application/json"},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()["status"]


def _hash(password: str) -> str:
    from werkzeug.security import generate_password_hash

    return generate_password_hash(password)


def _money(amount: int, currency: str) -> str:
    return format_money(amount, currency)
