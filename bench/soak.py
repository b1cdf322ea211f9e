"""Soak test: two web hosts, two appliers, one PostgreSQL, faults, and nothing lost.

What it does:

1. Makes a private PostgreSQL 15 cluster in a temporary directory (initdb; 127.0.0.1,
   ``--pg-port``; run as ``nobody`` when this runs as root, as bench tooling elsewhere
   does), creates a database and migrates it with ``reconciler db upgrade``.
2. Starts two ``reconciler serve`` hosts on 127.0.0.2 and 127.0.0.3 (APPLIER_PROCESSES=0)
   and two ``reconciler applier`` processes, each in a process group of its own.
3. Generates ``--events`` signed events from a truth model it keeps: orders with one or two
   charges (``charge.succeeded``, the order id in the metadata, minor units, usd/eur/gbp/
   jpy), a refund for about 20% of the charges (``refund.created`` with the refund, then
   ``charge.refunded`` with the charge's ``amount_refunded``), and some later
   ``charge.updated`` snapshots. Stripe ``created`` times increase per object; the
   delivery order is shuffled within windows, so events arrive out of order (sometimes a
   refund before its charge). 10% of the events are delivered a second time, to the
   other host.
4. Sends them from ``--senders`` threads (keep-alive ``http.client``), each delivery to
   its host; any non-2xx answer or connection error is retried like Stripe does (short
   backoff, the other host on every other try) until a 2xx.
5. Faults while sending: at ~25% SIGKILL one web host (its whole process group) and start
   it again ~2 s later; at ~50% SIGKILL one applier and start it again; at ~70% restart
   PostgreSQL (``pg_ctl restart -m fast``, or ``--pg-restart-mode immediate``). A web
   host that exits while starting (``reconciler serve`` exits when PostgreSQL does not
   answer at its start) is started again, as a supervisor would, and that is printed.
6. Waits until nothing is pending (failing once the backlog has not shrunk for
   ``--apply-timeout`` s, or after ``--apply-max`` s), then checks the
   database against the truth: every event stored once and applied; charges (ids,
   amounts, currencies, orders, status, captured, refunded amount both as reported and as
   the sum of the charge's succeeded refunds), refunds (ids, charges, amounts), orders
   (each one, with its charge count), and ``GET /api/orders/<id>`` totals for a sample.

Prints the figures and one PASS/FAIL line per check; exit status 0 only when all pass.
Everything it started is stopped, and the cluster deleted (unless ``--keep``), at the
end, on errors and on Ctrl-C/SIGTERM.

    .venv/bin/python bench/soak.py
    .venv/bin/python bench/soak.py --events 2000 --senders 8 --seed 7 --keep
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import http.client
import json
import os
import pwd
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import requests  # noqa: E402

from tests import stripe_payloads as p  # noqa: E402

PGBIN = Path(os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin"))
PG_OS_USER = os.environ.get("PG_OS_USER", "nobody")
SECRET = "whsec_soak_0123456789abcdef"
TOKEN = "soak-api-token-0123456789abcdef"
HOST_ADDRESSES = ("127.0.0.2", "127.0.0.3")
DATABASE = "soak"
# (currency, smallest, largest amount in minor units; jpy has none below the yen)
CURRENCIES = (("usd", 50, 250_000), ("eur", 50, 180_000), ("gbp", 30, 90_000), ("jpy", 100, 300_000))
CURRENCY_WEIGHTS = (5, 3, 1, 2)
_ALNUM = string.ascii_letters + string.digits


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the private PostgreSQL cluster --------------------------------------------------------


class Cluster:
    """initdb + pg_ctl in ``workdir``, owned by an unprivileged user when we are root
    (initdb and postgres refuse to run as root)."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.data = workdir / "pgdata"
        self.logfile = workdir / "pg.log"
        self.as_root = os.geteuid() == 0
        self.started = False

    def _as_pg(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", PG_OS_USER, "--", *argv] if self.as_root else argv

    def _run(self, argv: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_pg(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)

    def init(self) -> None:
        if self.as_root:
            entry = pwd.getpwnam(PG_OS_USER)
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
        self.workdir.chmod(0o755)
        result = self._run([str(PGBIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"])
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        # Defaults kept (fsync, synchronous_commit, shared_buffers): only where and how many.
        settings = (
            f"\n# --- soak ---\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{self.workdir}'\nmax_connections = 200\n"
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(settings)

    def start(self) -> None:
        self._pg_ctl("start")
        self.started = True

    def restart(self, mode: str) -> subprocess.Popen:
        """``pg_ctl restart`` in the background (the caller polls it)."""
        argv = self._as_pg([str(PGBIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-m", mode, "-w", "-t", "120", "restart"])
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _pg_ctl(self, action: str, *extra: str) -> None:
        result = self._run([str(PGBIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "120", *extra, action])
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl {action} failed: {result.stdout[-1000:]} {result.stderr[-1000:]}\n{self.log_tail()}")

    def stop(self) -> None:
        if not self.data.joinpath("PG_VERSION").exists():
            return
        if self._run([str(PGBIN / "pg_ctl"), "-D", str(self.data), "status"]).returncode != 0:
            return
        try:
            self._pg_ctl("stop", "-m", "fast")
        except Exception:  # noqa: BLE001 - fall back to the hard stop
            with contextlib.suppress(Exception):
                self._pg_ctl("stop", "-m", "immediate")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


def port_free(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


# -- service processes -----------------------------------------------------------------------


def _die_with_parent() -> None:
    """Children get SIGTERM if this process dies without cleaning up (PR_SET_PDEATHSIG; it
    fires when the *thread* that forked exits, so every child is started from the main
    thread)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Proc:
    """A service process in a process group of its own (so SIGKILL takes its children)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        assert threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as out:
            out.write(f"\n--- start {self.starts + 1} at {time.strftime('%H:%M:%S')} ---\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                self.argv, cwd=str(ROOT), env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, signum: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL the whole group and reap the leader."""
        self.signal_group(signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)

    def stop(self, timeout: float = 15) -> None:
        if self.process is None:
            return
        self.signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self.signal_group(signal.SIGKILL)  # stragglers of the group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Host(Proc):
    def __init__(self, name: str, address: str, port: int, env: dict[str, str], log_path: Path, workers: int) -> None:
        argv = [sys.executable, "-c", "from cli import main; main()", "serve", "--host", address, "--port", str(port),
                "--no-migrate", "--workers", str(workers)]
        super().__init__(name, argv, env, log_path)
        self.address = address
        self.port = port

    @property
    def base(self) -> str:
        return f"http://{self.address}:{self.port}"

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.base}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not healthy in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.2)


# -- the truth model and the events ---------------------------------------------------------


@dataclass
class Event:
    id: str
    type: str
    object_id: str  # the charge or refund it carries
    created: int
    body: bytes
    charge_id: str  # the charge it concerns (for a refund: its charge)


@dataclass
class Truth:
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> expected row
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    orders: dict[str, list[str]] = field(default_factory=dict)  # order id -> charge ids
    events: list[Event] = field(default_factory=list)


class Generator:
    def __init__(self, seed: int, tag: str) -> None:
        self.rng = random.Random(seed)
        self.tag = tag

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{''.join(self.rng.choices(_ALNUM, k=24))}"

    def build(self, count: int) -> Truth:
        rng = self.rng
        truth = Truth()
        clock = int(time.time()) - 3 * 86_400  # Stripe times: the last few days
        order_number = 0
        while len(truth.events) < count:
            left = count - len(truth.events)
            simple = left < 12  # the last orders: one charge, one event each, to land on count exactly
            order_id = f"ord_soak_{self.tag}_{order_number:06d}"
            order_number += 1
            clock += rng.randint(0, 2)
            currency, low, high = rng.choices(CURRENCIES, weights=CURRENCY_WEIGHTS)[0]
            truth.orders[order_id] = []
            for _ in range(1 if simple or rng.random() < 0.7 else 2):
                self._charge(truth, order_id, currency, low, high, clock + rng.randint(0, 20), simple=simple)
        return truth

    def _charge(self, truth: Truth, order_id: str, currency: str, low: int, high: int, created: int, *, simple: bool) -> None:
        rng = self.rng
        charge_id = self.new_id("ch")
        amount = rng.randint(low, high)
        base = p.charge(
            id=charge_id, amount=amount, currency=currency, payment_intent=self.new_id("pi"),
            customer=self.new_id("cus"), metadata={"order_id": order_id}, created=created,
        )
        used = {created}

        def snapshot(refunded: int, description: str | None = None) -> dict:
            obj = copy.deepcopy(base)
            obj["amount_refunded"] = refunded
            obj["refunded"] = refunded == amount
            if description is not None:
                obj["description"] = description
            return obj

        def add(event_type: str, obj: dict, at: int, object_id: str, **extra: Any) -> None:
            event = p.event(event_type, obj, id=self.new_id("evt"), created=at, request_id=self.new_id("req"), **extra)
            truth.events.append(Event(event["id"], event_type, object_id, at, p.encode(event), charge_id))

        add("charge.succeeded", snapshot(0), created, charge_id)
        refund_at = None
        refunded = 0
        if not simple and rng.random() < 0.2:
            refund_at = created + rng.randint(1, 180)
            used.add(refund_at)
            refunded = amount if rng.random() < 0.4 else rng.randint(1, amount - 1)
            refund_id = self.new_id("re")
            refund = p.refund(
                id=refund_id, charge=charge_id, amount=refunded, currency=currency, payment_intent=base["payment_intent"],
                reason="requested_by_customer", created=refund_at,
            )
            add("refund.created", refund, refund_at, refund_id)
            # The charge's own event for the refund: same second, the charge's new state.
            add("charge.refunded", snapshot(refunded), refund_at, charge_id, previous_attributes={"amount_refunded": 0, "refunded": False})
            truth.refunds[refund_id] = {"charge_id": charge_id, "amount": refunded, "currency": currency}
        if not simple and rng.random() < 0.25:
            for n in range(rng.randint(1, 2)):
                at = created + rng.randint(1, 240)
                while at in used:  # Stripe times increase per object: no two snapshots in one second
                    at += 1
                used.add(at)
                state = refunded if refund_at is not None and at > refund_at else 0
                add("charge.updated", snapshot(state, f"order {order_id} update {n + 1}"), at, charge_id,
                    previous_attributes={"description": None})
        truth.charges[charge_id] = {
            "order_id": order_id, "amount": amount, "currency": currency, "status": "succeeded", "captured": True,
            "amount_captured": amount, "refunded": refunded,
        }
        truth.orders[order_id].append(charge_id)


@dataclass
class Plan:
    deliveries: list[tuple[int, int]]  # (event index, host index)
    redeliveries: int
    objects_out_of_order: int  # objects with an event delivered before an older one
    refunds_before_charge: int  # refund.created delivered before its charge's first event


def plan_deliveries(truth: Truth, rng: random.Random, *, window: int, redeliver: float) -> Plan:
    events = truth.events
    order = sorted(range(len(events)), key=lambda i: (events[i].created, rng.random()))
    for start in range(0, len(order), window):  # shuffled within windows: out of order
        chunk = order[start : start + window]
        rng.shuffle(chunk)
        order[start : start + window] = chunk
    keyed: list[tuple[float, int, int]] = []
    position = {}
    for pos, index in enumerate(order):
        host = rng.randrange(2)
        keyed.append((pos, index, host))
        position[index] = pos
    again = rng.sample(range(len(events)), round(len(events) * redeliver))
    for index in again:
        first_host = keyed[position[index]][2]
        keyed.append((position[index] + rng.randint(20, max(21, window * 4)) + 0.5, index, 1 - first_host))
    keyed.sort()
    # Out of order, measured on the first deliveries.
    newest: dict[str, int] = {}
    out_of_order: set[str] = set()
    first_charge_pos: dict[str, int] = {}
    for pos, index in enumerate(order):
        event = events[index]
        if event.created < newest.get(event.object_id, -1):
            out_of_order.add(event.object_id)
        newest[event.object_id] = max(newest.get(event.object_id, -1), event.created)
        if event.type.startswith("charge."):
            first_charge_pos.setdefault(event.charge_id, pos)
    refunds_first = sum(
        1 for pos, index in enumerate(order)
        if events[index].type == "refund.created" and first_charge_pos.get(events[index].charge_id, -1) > pos
    )
    return Plan([(i, h) for _, i, h in keyed], len(again), len(out_of_order), refunds_first)


# -- senders ----------------------------------------------------------------------------------


class Tally:
    def __init__(self, events: int) -> None:
        self.lock = threading.Lock()
        self.answers: list[collections.Counter] = [collections.Counter() for _ in range(events)]
        self.errors: list[tuple[float, str, int]] = []  # (time, kind, host)
        self.dispatched = 0
        self.acknowledged = 0
        self.abandoned: list[int] = []
        self.first_error: dict[str, str] = {}
        self.first_sent: float | None = None
        self.last_ack: float | None = None


class Senders:
    """``count`` threads taking deliveries in order from one shared cursor."""

    def __init__(self, truth: Truth, plan: Plan, hosts: list[Host], count: int, *, give_up_after: float) -> None:
        self.truth = truth
        self.plan = plan
        self.hosts = hosts
        self.tally = Tally(len(truth.events))
        self.stop = threading.Event()
        self.give_up_after = give_up_after
        self._cursor = 0
        self._cursor_lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, name=f"sender-{n}", daemon=True) for n in range(count)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)

    def _next(self) -> tuple[int, int] | None:
        with self._cursor_lock:
            if self._cursor >= len(self.plan.deliveries):
                return None
            item = self.plan.deliveries[self._cursor]
            self._cursor += 1
            self.tally.dispatched = self._cursor
            if self.tally.first_sent is None:
                self.tally.first_sent = time.perf_counter()
            return item

    def _run(self) -> None:
        connections: dict[int, http.client.HTTPConnection] = {}
        rng = random.Random()
        tally = self.tally
        while not self.stop.is_set():
            item = self._next()
            if item is None:
                break
            index, host = item
            body = self.truth.events[index].body
            started = time.monotonic()
            attempt = 0
            while not self.stop.is_set():
                target = host if attempt % 2 == 0 else 1 - host  # like Stripe: try again, the other host too
                outcome = self._post(connections, target, body)
                if isinstance(outcome, dict):
                    with tally.lock:
                        tally.answers[index][outcome.get("status", "?")] += 1
                        tally.acknowledged += 1
                        tally.last_ack = time.perf_counter()
                    break
                tally.errors.append((time.perf_counter(), outcome[0], target))
                tally.first_error.setdefault(outcome[0], outcome[1])
                if time.monotonic() - started > self.give_up_after:
                    with tally.lock:
                        tally.abandoned.append(index)
                    break
                attempt += 1
                time.sleep(min(1.0, 0.05 * 2 ** min(attempt - 1, 5)) * (0.5 + rng.random()))
        for connection in connections.values():
            connection.close()

    def _post(self, connections: dict[int, http.client.HTTPConnection], target: int, body: bytes) -> dict | tuple[str, str]:
        host = self.hosts[target]
        connection = connections.get(target)
        if connection is None:
            connection = connections[target] = http.client.HTTPConnection(host.address, host.port, timeout=30)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": p.sign(body, SECRET),  # signed at send time, as each Stripe attempt is
        }
        try:
            connection.request("POST", "/webhooks/stripe", body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            connections.pop(target, None)
            return ("connection", f"{type(exc).__name__}: {exc}")
        if response.will_close:
            connection.close()
            connections.pop(target, None)
        if 200 <= response.status < 300:
            try:
                return json.loads(data)
            except ValueError:
                return {"status": "?"}
        return (f"http_{response.status}", data[:300].decode(errors="replace"))


# -- watching the inbox ------------------------------------------------------------------------


PENDING_SQL = "SELECT count(*) FROM stripe_events WHERE status IN ('received', 'failed')"


class Watcher(threading.Thread):
    """Polls the backlog every 0.25 s on its own connection (reconnecting across the
    PostgreSQL restart): the largest backlog seen."""

    def __init__(self, url: str) -> None:
        super().__init__(name="watcher", daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.max_pending = 0
        self.last_pending: int | None = None

    def run(self) -> None:
        connection = None
        while not self.stop.wait(0.25):
            try:
                if connection is None:
                    connection = psycopg.connect(self.url, autocommit=True, connect_timeout=3)
                pending = connection.execute(PENDING_SQL).fetchone()[0]
                self.last_pending = pending
                self.max_pending = max(self.max_pending, pending)
            except psycopg.Error:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        connection.close()
                connection = None
        if connection is not None:
            connection.close()


def query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as connection:
        cursor = connection.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def wait_applied(url: str, expected: int, *, stall: float, limit: float) -> tuple[float | None, str]:
    """Until every event is stored and none is pending: (the moment (perf_counter), "") or
    (None, why) once the backlog has not shrunk for ``stall`` s or ``limit`` s have passed."""
    began = last_progress = last_note = time.monotonic()
    best: int | None = None
    pending = None
    while True:
        now = time.monotonic()
        try:
            (stored, pending), = query(url, "SELECT count(*), count(*) FILTER (WHERE status IN ('received', 'failed')) FROM stripe_events")
            if stored >= expected and pending == 0:
                return time.perf_counter(), ""
            if best is None or pending < best:
                best, last_progress = pending, now
        except psycopg.Error:
            pass
        if now - last_note >= 30:
            log(f"  {pending} pending")
            last_note = now
        if now - last_progress > stall:
            return None, f"the backlog did not shrink for {stall:.0f} s ({pending} pending)"
        if now - began > limit:
            return None, f"still {pending} pending after {limit:.0f} s"
        time.sleep(0.1)


# -- faults ------------------------------------------------------------------------------------


@dataclass
class Fault:
    name: str
    at_fraction: float
    started: float | None = None  # perf_counter
    recovered: float | None = None
    at_sent: int = 0
    notes: str = ""
    step: str = "wait"  # wait -> down -> recovering -> done
    restart_at: float = 0.0
    pg_ctl: subprocess.Popen | None = None
    respawns: int = 0
    target: int | None = None  # the host killed


def run_faults(senders: Senders, hosts: list[Host], appliers: list[Proc], cluster: Cluster, args: argparse.Namespace,
               rng: random.Random) -> list[Fault]:
    """The main thread's loop while the senders work: each fault starts when its share of
    the deliveries has been dispatched (or once sending is over), independently of the
    others; returns when every fault has recovered (all processes are started from this
    thread)."""
    total = len(senders.plan.deliveries)
    host = hosts[rng.randrange(2)]
    applier = appliers[rng.randrange(2)]
    kill_host = Fault("kill -9 web host", 0.25, notes=f"{host.name} ({host.address}:{host.port})", target=hosts.index(host))
    kill_applier = Fault("kill -9 applier", 0.50, notes=applier.name)
    restart_pg = Fault(f"PostgreSQL restart ({args.pg_restart_mode})", 0.70)
    faults = [kill_host, kill_applier, restart_pg]
    while any(f.step != "done" for f in faults):
        for fault in faults:
            now = time.perf_counter()
            if fault.step == "wait":
                if senders.tally.dispatched < fault.at_fraction * total and not senders.done():
                    continue
                fault.started, fault.at_sent = now, senders.tally.dispatched
                if fault is kill_host:
                    host.kill()
                    fault.restart_at, fault.step = now + args.host_down_seconds, "down"
                elif fault is kill_applier:
                    applier.kill()
                    fault.restart_at, fault.step = now + args.applier_down_seconds, "down"
                else:
                    fault.pg_ctl, fault.step = cluster.restart(args.pg_restart_mode), "recovering"
            elif fault.step == "down" and now >= fault.restart_at:
                (host if fault is kill_host else applier).start()
                fault.step = "recovering"
            elif fault.step == "recovering":
                if fault is kill_host:
                    recovered = host.healthy()
                    if not recovered and not host.alive():
                        # As a supervisor would: start it again (`reconciler serve` exits when
                        # PostgreSQL does not answer at its start, e.g. during the restart).
                        last = [line for line in host.log_tail(4000).splitlines() if "Error" in line or "FATAL" in line][-1:] or ["?"]
                        fault.respawns += 1
                        fault.notes += f"; exited at start ({host.process.returncode}: {last[0][:160]}), started again"
                        if fault.respawns > 10:
                            raise RuntimeError(f"{host.name} did not come back:\n{host.log_tail()}")
                        time.sleep(0.5)
                        host.start()
                elif fault is kill_applier:
                    recovered = applier.alive()
                else:
                    assert fault.pg_ctl is not None
                    code = fault.pg_ctl.poll()
                    if code is not None and code != 0:
                        raise RuntimeError(f"pg_ctl restart failed ({code}):\n{cluster.log_tail()}")
                    recovered = code == 0
                if recovered:
                    fault.recovered, fault.step = time.perf_counter(), "done"
            if fault.step not in ("wait", "done") and now - (fault.started or now) > 120:
                raise RuntimeError(f"fault '{fault.name}' did not recover in 120 s")
        time.sleep(0.02)
    return faults


# -- checks ------------------------------------------------------------------------------------


class Checks:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        self.results.append((name, ok, detail))

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(ok for _, ok, _ in self.results)


def _sample(items: list, limit: int) -> str:
    return ", ".join(str(i) for i in items[:limit]) + (" ..." if len(items) > limit else "")


def check_database(url: str, truth: Truth, checks: Checks) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    ids = {e.id for e in truth.events}
    rows = query(url, "SELECT event_id, status, attempts FROM stripe_events")
    stored = {r[0]: r for r in rows}
    missing = sorted(ids - stored.keys())
    extra = sorted(stored.keys() - ids)
    checks.add("events stored == generated", len(rows) == len(ids) and not missing and not extra,
               f"{len(rows)} rows, {len(ids)} generated" + (f"; missing {_sample(missing, 5)}" if missing else "")
               + (f"; unexpected {_sample(extra, 5)}" if extra else ""))
    statuses = collections.Counter(r[1] for r in rows)
    checks.add("every event applied", statuses.get("applied", 0) == len(ids) and len(statuses) == 1, dict(statuses).__repr__())
    figures["events_retried_by_applier"] = sum(1 for r in rows if (r[2] or 0) > 0)
    figures["event_failures"] = query(url, "SELECT count(*) FROM event_failures")[0][0]
    figures["deadlocks"] = query(url, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")[0][0]

    charges = {
        r[0]: r[1:]
        for r in query(url, "SELECT id, order_id, amount, currency, status, captured, amount_captured, reported_refunded FROM charges")
    }
    refund_sums = dict(query(url, "SELECT charge_id, sum(amount) FROM refunds WHERE status = 'succeeded' GROUP BY charge_id"))
    wrong: list[str] = []
    for charge_id, want in truth.charges.items():
        row = charges.get(charge_id)
        if row is None:
            wrong.append(f"{charge_id} missing")
            continue
        order_id, amount, currency, status, captured, amount_captured, reported = row
        got = {"order_id": order_id, "amount": amount, "currency": currency, "status": status, "captured": captured,
               "amount_captured": amount_captured, "refunded": reported}
        expected = {k: want[k] for k in got}
        if got != expected:
            wrong.append(f"{charge_id} {{{', '.join(f'{k}: {got[k]!r} != {expected[k]!r}' for k in got if got[k] != expected[k])}}}")
        if int(refund_sums.get(charge_id, 0) or 0) != want["refunded"]:
            wrong.append(f"{charge_id} refunds rows sum {refund_sums.get(charge_id, 0)} != {want['refunded']}")
    unexpected = sorted(charges.keys() - truth.charges.keys())
    checks.add("charges == truth (ids, amounts, currencies, orders, status, captured, refunded)",
               not wrong and not unexpected,
               f"{len(charges)} rows, {len(truth.charges)} expected, {sum(1 for c in truth.charges.values() if c['refunded'])} refunded"
               + (f"; wrong: {_sample(wrong, 5)}" if wrong else "") + (f"; unexpected: {_sample(unexpected, 5)}" if unexpected else ""))

    refunds = {r[0]: r[1:] for r in query(url, "SELECT id, charge_id, amount, currency, status FROM refunds")}
    wrong = []
    for refund_id, want in truth.refunds.items():
        row = refunds.get(refund_id)
        expected = (want["charge_id"], want["amount"], want["currency"], "succeeded")
        if row is None:
            wrong.append(f"{refund_id} missing")
        elif tuple(row) != expected:
            wrong.append(f"{refund_id} {tuple(row)} != {expected}")
    unexpected = sorted(refunds.keys() - truth.refunds.keys())
    checks.add("refunds == truth (ids, charges, amounts)", not wrong and not unexpected,
               f"{len(refunds)} rows, {len(truth.refunds)} expected" + (f"; wrong: {_sample(wrong, 5)}" if wrong else "")
               + (f"; unexpected: {_sample(unexpected, 5)}" if unexpected else ""))

    orders = dict(query(url, "SELECT o.id, count(c.id) FROM orders o LEFT JOIN charges c ON c.order_id = o.id GROUP BY o.id"))
    wrong = [f"{o} missing" for o in truth.orders if o not in orders]
    wrong += [f"{o} {orders[o]} charges != {len(c)}" for o, c in truth.orders.items() if o in orders and orders[o] != len(c)]
    unexpected = sorted(orders.keys() - truth.orders.keys())
    checks.add("orders == truth (each order, its charge count)", not wrong and not unexpected,
               f"{len(orders)} rows, {len(truth.orders)} expected" + (f"; wrong: {_sample(wrong, 5)}" if wrong else "")
               + (f"; unexpected: {_sample(unexpected, 5)}" if unexpected else ""))
    return figures


def check_api(hosts: list[Host], truth: Truth, checks: Checks, rng: random.Random, sample: int) -> None:
    """``GET /api/orders/<id>`` on both hosts for a sample of orders (refunded ones first):
    charges and per-currency charged/refunded totals as the truth has them."""
    refunded_orders = sorted({truth.charges[r["charge_id"]]["order_id"] for r in truth.refunds.values()})
    others = sorted(set(truth.orders) - set(refunded_orders))
    chosen = rng.sample(refunded_orders, min(len(refunded_orders), sample // 2))
    chosen += rng.sample(others, min(len(others), sample - len(chosen)))
    wrong: list[str] = []
    unavailable = 0
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    for n, order_id in enumerate(chosen):
        host = hosts[n % 2]
        for _ in range(10):
            response = session.get(f"{host.base}/api/orders/{order_id}", timeout=10)
            if response.status_code != 503:
                break
            # A read on a pooled connection that the PostgreSQL restart closed answers 503
            # once (models/db.py: no pre-ping); a client asks again.
            unavailable += 1
            time.sleep(0.1)
        if response.status_code != 200:
            wrong.append(f"{order_id}: HTTP {response.status_code}")
            continue
        view = response.json()
        want_charges = sorted(truth.orders[order_id])
        got_charges = sorted(c["id"] for c in view.get("charges", []))
        totals: dict[str, dict[str, int]] = {}
        for charge_id in want_charges:
            c = truth.charges[charge_id]
            bucket = totals.setdefault(c["currency"], {"charged": 0, "refunded": 0})
            bucket["charged"] += c["amount"]
            bucket["refunded"] += c["refunded"]
        got_totals = {cur: {k: t.get(k) for k in ("charged", "refunded")} for cur, t in (view.get("totals") or {}).items()}
        if got_charges != want_charges or got_totals != totals:
            wrong.append(f"{order_id}: charges {got_charges} totals {got_totals} != {want_charges} {totals}")
    checks.add(f"GET /api/orders/<id> == truth ({len(chosen)} orders, both hosts)", not wrong,
               "; ".join(filter(None, [_sample(wrong, 3), f"{unavailable} answers 503 retried" if unavailable else ""])))


# -- the run -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000, help="distinct events (default 20000)")
    parser.add_argument("--senders", type=int, default=8, help="sender threads (default 8)")
    parser.add_argument("--pg-port", type=int, default=55450, help="port of the private PostgreSQL (default 55450)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (cluster, logs) afterwards; it is stopped either way")
    parser.add_argument("--seed", type=int, default=None, help="seed of the truth model and the delivery plan (default: random, printed)")
    parser.add_argument("--web-workers", type=int, default=2, help="reconciler serve --workers on each host (default 2)")
    parser.add_argument("--applier-threads", type=int, default=1, help="reconciler applier --threads (default 1)")
    parser.add_argument("--redeliver", type=float, default=0.10, help="share of events delivered twice (default 0.10)")
    parser.add_argument("--window", type=int, default=400, help="delivery order shuffled within windows of this many events")
    parser.add_argument("--pg-restart-mode", choices=["fast", "immediate"], default="fast")
    parser.add_argument("--host-down-seconds", type=float, default=2.0)
    parser.add_argument("--applier-down-seconds", type=float, default=1.0)
    parser.add_argument("--apply-timeout", type=float, default=120.0,
                        help="after sending, fail once the backlog has not shrunk for this many seconds (default 120)")
    parser.add_argument("--apply-max", type=float, default=1800.0, help="... or once this many seconds have passed (default 1800)")
    parser.add_argument("--api-sample", type=int, default=200, help="orders checked through GET /api/orders/<id> (default 200)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)

    if not (PGBIN / "initdb").exists():
        print(f"PostgreSQL 15 binaries not found in {PGBIN} (set PGBIN=...)", file=sys.stderr)
        return 2
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        print("running as root needs runuser (util-linux) to run PostgreSQL as an unprivileged user", file=sys.stderr)
        return 2
    if not port_free("127.0.0.1", args.pg_port):
        print(f"127.0.0.1:{args.pg_port} is in use; pick another --pg-port", file=sys.stderr)
        return 2

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="reconciler-soak-"))
    cluster = Cluster(workdir, args.pg_port)
    state: dict[str, Any] = {"procs": []}
    try:
        return run(args, seed, workdir, cluster, state)
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'Ctrl-C'}): stopping everything", file=sys.stderr)
        return 130
    finally:
        for key in ("senders", "watcher"):
            if key in state:
                state[key].stop.set()
        for proc in state["procs"]:
            with contextlib.suppress(Exception):
                proc.stop()
        with contextlib.suppress(Exception):
            cluster.stop()
        if args.keep:
            print(f"work dir kept: {workdir} (cluster stopped; start it with pg_ctl -D {cluster.data} start)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, seed: int, workdir: Path, cluster: Cluster, state: dict[str, Any]) -> int:
    rng = random.Random(seed ^ 0x5EED)
    log(f"work dir {workdir}; seed {seed}")
    cluster.init()
    cluster.start()
    query(cluster.url(), f"CREATE DATABASE {DATABASE}")
    url = cluster.url(DATABASE)
    logs = workdir / "logs"
    logs.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "API_TOKEN": TOKEN,
        "STRIPE_LIVEMODE": "false",
        "LOG_LEVEL": "WARNING",
        "APPLIER_PROCESSES": "0",
        # Ingest never calls Stripe; a dead loopback port as a safety net anyway.
        "STRIPE_API_BASE": "http://127.0.0.1:9",
    }
    env.pop("STRIPE_API_KEY", None)
    cli = [sys.executable, "-c", "from cli import main; main()"]
    upgrade = subprocess.run([*cli, "db", "upgrade"], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    if upgrade.returncode != 0:
        raise RuntimeError(f"reconciler db upgrade failed:\n{upgrade.stdout[-2000:]}\n{upgrade.stderr[-2000:]}")
    log(f"PostgreSQL 15 on 127.0.0.1:{args.pg_port}, database {DATABASE} migrated")

    hosts = []
    for n, address in enumerate(HOST_ADDRESSES):
        name = "AB"[n]
        host_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(workdir / f"metrics-{name}")}
        hosts.append(Host(f"host {name}", address, free_port(address), host_env, logs / f"serve-{name}.log", args.web_workers))
    appliers = [
        Proc(f"applier {n + 1}", [*cli, "applier", "--threads", str(args.applier_threads)], env, logs / f"applier-{n + 1}.log")
        for n in range(2)
    ]
    procs: list[Proc] = [*hosts, *appliers]
    state["procs"] = procs
    for proc in procs:
        proc.start()
    for host in hosts:
        host.wait_healthy()
    log(f"serving on {hosts[0].base} and {hosts[1].base}; 2 appliers")

    generated = time.perf_counter()
    truth = Generator(seed, tag=f"{seed:x}").build(args.events)
    plan = plan_deliveries(truth, rng, window=args.window, redeliver=args.redeliver)
    log(f"{len(truth.events)} events for {len(truth.orders)} orders, {len(truth.charges)} charges, {len(truth.refunds)} refunds "
        f"generated in {time.perf_counter() - generated:.1f} s; {len(plan.deliveries)} deliveries")

    watcher = Watcher(url)
    senders = Senders(truth, plan, hosts, args.senders, give_up_after=max(300.0, args.apply_timeout))
    state.update(senders=senders, watcher=watcher)
    watcher.start()
    senders.start()
    faults = run_faults(senders, hosts, appliers, cluster, args, rng)
    while not senders.done():
        time.sleep(0.05)
    tally = senders.tally
    start = tally.first_sent or time.perf_counter()
    acked = tally.last_ack or time.perf_counter()
    log(f"sending done in {acked - start:.1f} s; waiting until nothing is pending "
        f"(as long as the backlog shrinks within {args.apply_timeout:.0f} s, at most {args.apply_max:.0f} s)")
    complete, why = wait_applied(url, len(truth.events), stall=args.apply_timeout, limit=args.apply_max)
    watcher.stop.set()
    watcher.join(timeout=5)

    checks = Checks()
    abandoned = sorted(set(tally.abandoned))
    checks.add("every delivery acknowledged (2xx)", not abandoned and tally.acknowledged == len(plan.deliveries),
               f"{tally.acknowledged} of {len(plan.deliveries)}" + (f"; gave up on {len(abandoned)}" if abandoned else ""))
    kinds = collections.Counter(kind for _, kind, _ in tally.errors)
    unexpected = {k: v for k, v in kinds.items() if k not in ("connection", "http_503")}
    checks.add("no answer but 2xx, 503 or a lost connection", not unexpected,
               (repr(unexpected) + " first: " + repr({k: tally.first_error.get(k) for k in unexpected})) if unexpected else "")
    received_twice = [truth.events[i].id for i, c in enumerate(tally.answers) if c.get("received", 0) > 1]
    unanswered = [truth.events[i].id for i, c in enumerate(tally.answers) if not c]
    odd = {s: n for s, n in sum(tally.answers, collections.Counter()).items() if s not in ("received", "duplicate")}
    checks.add("no event answered 'received' twice (a stored event never lost)", not received_twice and not odd,
               (f"{len(received_twice)}: {_sample(received_twice, 5)}" if received_twice else "") + (f" other answers {dict(odd)}" if odd else ""))
    checks.add("every event answered at least once", not unanswered, _sample(unanswered, 5))
    checks.add(f"fully applied (the backlog never stood still for {args.apply_timeout:.0f} s)", complete is not None,
               why or f"{complete - acked:.1f} s after the last 2xx")
    figures = check_database(url, truth, checks)
    check_api(hosts, truth, checks, rng, args.api_sample)

    # -- figures ------------------------------------------------------------------------------
    answers: collections.Counter = sum(tally.answers, collections.Counter())
    send_seconds = acked - start
    print()
    print(f"soak: 2 web hosts ({args.web_workers} workers each), 2 appliers ({args.applier_threads} thread each), "
          f"PostgreSQL 15 (127.0.0.1:{args.pg_port}), {args.senders} senders, seed {seed}")
    print(f"  events            {len(truth.events)} distinct ({len(truth.orders)} orders, {len(truth.charges)} charges, "
          f"{len(truth.refunds)} refunds; types {dict(collections.Counter(e.type for e in truth.events))})")
    print(f"  deliveries        {len(plan.deliveries)} ({plan.redeliveries} redeliveries to the other host); "
          f"out of order: {plan.objects_out_of_order} objects, {plan.refunds_before_charge} refunds before their charge")
    print(f"  answers           {dict(answers)}")
    print(f"  retries           {len(tally.errors)} ({dict(kinds)})")
    print(f"  acknowledged      {len(truth.events) / send_seconds:,.0f} events/s, {len(plan.deliveries) / send_seconds:,.0f} deliveries/s "
          f"({send_seconds:.1f} s from the first post to the last 2xx)")
    if complete is not None:
        print(f"  fully applied     {complete - start:.1f} s after the first post ({complete - acked:.1f} s after the last 2xx); "
              f"{len(truth.events) / (complete - start):,.0f} events/s")
    else:
        print(f"  fully applied     NO: {why}")
    print(f"  max pending       {watcher.max_pending}")
    print(f"  applier retries   {figures.get('events_retried_by_applier')} events with attempts > 0, "
          f"{figures.get('event_failures')} event_failures rows; PostgreSQL deadlocks detected: {figures.get('deadlocks')}")
    kill_host, _, restart_pg = faults

    def within(fault: Fault, t: float, slack: float) -> bool:
        return fault.started is not None and fault.started <= t <= (fault.recovered or acked) + slack

    def cause(t: float, kind: str, target: int) -> str:
        if kind == "connection" and target == kill_host.target and within(kill_host, t, 1.0):
            return kill_host.name
        if within(restart_pg, t, 5.0):
            return restart_pg.name
        if within(kill_host, t, 5.0):
            return kill_host.name
        return "outside"

    caused: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for t, kind, target in tally.errors:
        caused[cause(t, kind, target)][kind] += 1
    for fault in faults:
        began = (fault.started or start) - start
        ended = (fault.recovered or fault.started or start) - start
        print(f"  fault             {fault.name:<28} at {began:6.1f} s ({fault.at_sent / len(plan.deliveries):.0%} dispatched), "
              f"recovered at {ended:6.1f} s ({ended - began:.1f} s) {fault.notes}; errors it caused: {dict(caused.get(fault.name, {})) or 0}")
    print(f"  errors outside    {dict(caused.get('outside', {})) or 0} (not from a fault: another host, or > 5 s after its recovery)")
    for name, ok, detail in checks.results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}" + (f"  [{detail}]" if detail else ""))
    print(f"  {'PASS' if checks.ok else 'FAIL'}: all checks" if checks.ok else "  FAIL: some checks failed (logs: --keep keeps them)")
    if not checks.ok and args.keep:
        print(f"  logs in {logs}")
    return 0 if checks.ok else 1


if __name__ == "__main__":
    sys.exit(main())
