"""Webhook ingest benchmark: events/s and latency under the production server, next to
what PostgreSQL itself sustains for the same transaction (pgbench), in the same run.

What it does (``--mode http``, the default):

1. Creates a throwaway database (a fresh PostgreSQL database on ``--database-url``, and
   with ``--sqlite`` also a temporary SQLite file for a second figure), migrated.
2. Builds ``--events`` distinct ``charge.succeeded`` events with the full shapes Stripe
   sends (tests/stripe_payloads.py: a real charge object, its PaymentIntent, a distinct
   order id in the metadata), pretty-printed as Stripe sends them, and signs every one
   with the Stripe SDK's signer. All of that happens before the clock starts.
3. Starts ``reconciler serve`` (the production server: uvicorn by default) on 127.0.0.1 and posts
   the events from ``--concurrency`` keep-alive connections (a small asyncio HTTP/1.1
   client, so the load generator, which shares the machine, costs little CPU). A warm-up
   of ``--warmup`` other events goes first and is not counted.
4. Checks the ledger afterwards: one stored event and one charge per event posted.
5. Runs pgbench (``-c C -j 2 -T --pgbench-seconds``) on the same database with a script
   doing the same two statements in one transaction: insert the event row (same columns,
   the same payload size) and upsert the charge. Prints tps and the ratio.

``--mode inprocess`` posts through the Flask test client in this process, one thread: the
cost of verify + parse + store + apply without HTTP, handy under a profiler
(``pyinstrument bench/ingest.py --mode inprocess --events 2000``).

    .venv/bin/python bench/ingest.py
    .venv/bin/python bench/ingest.py --events 20000 --concurrency 16 --sqlite
    .venv/bin/python bench/ingest.py --database-url postgresql://postgres@127.0.0.1:5432/postgres --workers 3 --threads 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from models import Charge, StripeEvent, make_engine, make_session_factory  # noqa: E402
from tests import stripe_payloads as p  # noqa: E402
from tests.databases import throwaway_database  # noqa: E402
from tests.servers import reconciler_serve  # noqa: E402

SECRET = "whsec_bench_0123456789abcdef"
TOKEN = "bench-api-token-0123456789"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


# -- events ------------------------------------------------------------------------------


def charge_events(count: int, *, tag: str) -> list[bytes]:
    """``count`` distinct ``charge.succeeded`` bodies: each its own order, PaymentIntent
    and charge, real shapes, pretty-printed as Stripe sends them."""
    t0 = int(time.time()) - 3600
    bodies = []
    for n in range(count):
        amount = (999, 2500, 4999, 12000)[n % 4]
        charge = p.charge(
            amount=amount,
            payment_intent=p.new_id("pi"),
            created=t0 + n // 50,
            metadata={"order_id": f"ord_{tag}_{n}"},
        )
        bodies.append(p.encode(p.event("charge.succeeded", charge, created=t0 + n // 50)))
    return bodies


def requests_for(bodies: list[bytes], port: int) -> list[bytes]:
    """Complete HTTP/1.1 requests, signed (the SDK's signer) before the clock starts."""
    out = []
    for body in bodies:
        head = (
            f"POST /webhooks/stripe HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            f"User-Agent: Stripe/1.0 (+https://stripe.com/docs/webhooks)\r\n"
            f"Content-Type: application/json; charset=utf-8\r\n"
            f"Stripe-Signature: {p.sign(body, SECRET)}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: keep-alive\r\n\r\n"
        )
        out.append(head.encode("ascii") + body)
    return out


# -- a cheap keep-alive HTTP client ------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self.errors = 0
        self.reconnects = 0
        self.first_error: str | None = None


_STATUS = re.compile(rb'"status":\s*"([a-z_]+)"')


async def _sender(port: int, queue: list[bytes], tally: Tally) -> None:
    reader = writer = None
    perf = time.perf_counter
    while queue:
        request = queue.pop()
        for attempt in (1, 2):
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                started = perf()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))
                body = await reader.readexactly(length)
                took = perf() - started
                if re.search(rb"(?i)\r\nconnection:\s*close", head):
                    writer.close()
                    reader = writer = None
                    tally.reconnects += 1
                break
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                # A keep-alive connection the server closed between requests: reconnect once.
                if writer is not None:
                    writer.close()
                reader = writer = None
                if attempt == 2:
                    tally.errors += 1
                    tally.first_error = tally.first_error or repr(exc)
                    took = None
                    break
        else:  # pragma: no cover
            continue
        if took is None:
            continue
        code = head[9:12].decode()
        match = _STATUS.search(body)
        key = match.group(1).decode() if (code == "200" and match) else f"http_{code}"
        tally.statuses[key] = tally.statuses.get(key, 0) + 1
        if code != "200":
            tally.errors += 1
            tally.first_error = tally.first_error or body[:300].decode(errors="replace")
        tally.latencies.append(took)
    if writer is not None:
        writer.close()


def post_all(port: int, requests: list[bytes], concurrency: int) -> tuple[Tally, float]:
    tally = Tally()
    queue = list(reversed(requests))

    async def run() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(_sender(port, queue, tally) for _ in range(concurrency)))
        return time.perf_counter() - started

    elapsed = asyncio.run(run())
    return tally, elapsed


# -- pgbench -------------------------------------------------------------------------------


PGBENCH_SCRIPT = """\\set evtn random(1, 9000000000000000000)
BEGIN;
INSERT INTO stripe_events (event_id, type, api_version, livemode, account, created, received_at, status, object_id, payload)
VALUES ('evt_pgbench_' || :evtn, 'charge.succeeded', '2024-06-20', false, NULL, 1700000000, now(), 'processed', 'ch_pgbench_' || :evtn, :payload)
ON CONFLICT DO NOTHING RETURNING event_id;
INSERT INTO charges (id, payment_intent_id, customer, account, livemode, amount, amount_captured, currency, status, captured, reported_refunded, created, card_brand, card_last4, last_event_created, first_seen_at, updated_at)
VALUES ('ch_pgbench_' || :evtn, 'pi_pgbench_' || :evtn, NULL, NULL, false, 2500, 2500, 'usd', 'succeeded', true, 0, 1700000000, 'visa', '4242', 1700000000, now(), now())
ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, captured = EXCLUDED.captured, amount_captured = EXCLUDED.amount_captured, reported_refunded = EXCLUDED.reported_refunded, last_event_created = EXCLUDED.last_event_created, updated_at = now()
WHERE charges.last_event_created <= EXCLUDED.last_event_created;
END;
"""
"""The ingest transaction's two statements in one transaction: the event row (RETURNING,
as the service needs it) and the charge upsert. The payload is a real event body, passed
with ``-D`` so it travels as a parameter on every transaction, as the service sends it."""


def run_pgbench(url: str, payload: str, clients: int, seconds: int, protocol: str) -> float | None:
    if shutil.which("pgbench") is None:
        print("  pgbench not found: no raw figure")
        return None
    parsed = make_url(url)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(PGBENCH_SCRIPT)
    env = {**os.environ}
    if parsed.password:
        env["PGPASSWORD"] = parsed.password
    command = [
        "pgbench", "-n", "-f", script.name, "-c", str(clients), "-j", str(min(2, clients)), "-T", str(seconds),
        "-M", protocol, "-D", f"payload={payload}", "-h", parsed.host or "127.0.0.1", "-p", str(parsed.port or 5432),
        "-U", parsed.username or "postgres", parsed.database,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds + 60)
    finally:
        os.unlink(script.name)
    match = re.search(r"tps = ([\d.]+) \((?:without initial connection time|excluding connections establishing)\)", result.stdout)
    if result.returncode != 0 or not match:
        print(f"  pgbench failed ({result.returncode}): {result.stdout[-500:]} {result.stderr[-1000:]}")
        return None
    return float(match.group(1))


# -- CPU accounting ------------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds used so far: the whole machine (busy time from /proc/stat), and by
    process group: the server (``cli serve`` and its workers), PostgreSQL backends,
    this client. Linux only; empty elsewhere. Per-event CPU is a steadier figure than
    throughput on a shared machine."""
    out: dict[str, float] = {}
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        out["machine"] = (sum(fields[:8]) - fields[3] - fields[4]) / _TICK  # minus idle, iowait
    except OSError:
        return out
    me = os.getpid()
    processes: dict[int, tuple[int, float, bytes, str]] = {}  # pid -> ppid, CPU s, cmdline, comm
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        processes[int(pid)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK, cmdline, comm)  # ppid; utime + stime

    def is_server(pid: int) -> bool:
        # `cli serve` and everything under it (uvicorn's spawned workers carry no name of ours)
        while pid in processes:
            ppid, _, cmdline, comm = processes[pid]
            if (b"cli\x00serve" in cmdline or b"reconciler-web" in cmdline or comm.startswith("reconciler")
                    or cmdline.endswith(b"\x00applier\x00")):
                return True
            pid = ppid
        return False

    for pid, (_, used, cmdline, comm) in processes.items():
        if pid == me:
            group = "client"
        elif comm == "postgres" or cmdline.startswith(b"postgres"):
            group = "postgres"
        elif is_server(pid):
            group = "server"
        else:
            continue
        out[group] = out.get(group, 0.0) + used
    return out


# -- runs ------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def check_ledger(url: str) -> tuple[int, int]:
    engine = make_engine(url)
    with make_session_factory(engine)() as db:
        stored = db.scalar(select(func.count()).select_from(StripeEvent)) or 0
        charges = db.scalar(select(func.count()).select_from(Charge)) or 0
    engine.dispose()
    return stored, charges


def wait_for_charges(url: str, expected: int, *, timeout: float) -> float | None:
    """Poll the ledger every 20 ms until it holds ``expected`` charges: the moment the
    applier caught up (perf_counter), or None after ``timeout`` s."""
    engine = make_engine(url)
    deadline = time.perf_counter() + timeout
    try:
        with engine.connect() as connection:
            while True:
                count = connection.execute(select(func.count()).select_from(Charge)).scalar() or 0
                connection.rollback()
                now = time.perf_counter()
                if count >= expected:
                    return now
                if now > deadline:
                    return None
                time.sleep(0.02)
    finally:
        engine.dispose()


def apply_lags(url: str) -> list[float]:
    """Seconds from stored to applied for every applied event, sorted."""
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as db:
            rows = db.execute(select(StripeEvent.received_at, StripeEvent.applied_at).where(StripeEvent.applied_at.is_not(None))).all()
    finally:
        engine.dispose()
    return sorted((applied - received).total_seconds() for received, applied in rows)


def http_run(url: str, args: argparse.Namespace, tag: str) -> dict:
    backend = make_url(url).get_backend_name()
    bodies = charge_events(args.events + args.warmup, tag=tag)
    env = {
        "DATABASE_URL": url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "API_TOKEN": TOKEN,
        "LOG_LEVEL": args.log_level,
        "LOG_FORMAT": "json",
    }
    serve_args = ["--no-migrate"]
    if args.workers:
        serve_args += ["--workers", str(args.workers)]
    if args.threads:
        serve_args += ["--threads", str(args.threads)]
    serve_args += args.serve_arg
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "serve.log"
        with reconciler_serve(serve_args, env, log_path) as base:
            port = int(base.rsplit(":", 1)[1])
            signed = requests_for(bodies, port)
            warm, timed = signed[: args.warmup], signed[args.warmup :]
            if warm:
                post_all(port, warm, args.concurrency)
                wait_for_charges(url, len(warm), timeout=args.apply_timeout)
            if args.pause:
                input(f"server on {base}; press Enter to start the timed run ")
            cpu_before = cpu_snapshot()
            started = time.perf_counter()
            tally, elapsed = post_all(port, timed, args.concurrency)
            answered = time.perf_counter()
            complete = wait_for_charges(url, len(signed), timeout=args.apply_timeout)
            applied_elapsed = (complete - started) if complete else None
            cpu_after = cpu_snapshot()
        banner = next((line for line in log_path.read_text().splitlines() if "server config" in line or "Using worker" in line), "")
        config = _server_config(log_path.read_text())
    stored, charges = check_ledger(url)
    lags = apply_lags(url)
    result = {
        "applied_elapsed": applied_elapsed,
        "apply_tail": (complete - answered) if complete else None,
        "lags": lags,
        "backend": backend,
        "config": config,
        "banner": banner,
        "events": len(timed),
        "elapsed": elapsed,
        "tally": tally,
        "stored": stored,
        "charges": charges,
        "expected": len(signed),
        "cpu": {k: cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after},
    }
    if backend == "postgresql" and not args.no_pgbench:
        payload = bodies[0].decode()
        result["pgbench"] = run_pgbench(url, payload, args.concurrency, args.pgbench_seconds, args.pgbench_protocol)
    return result


def _server_config(log: str) -> str:
    server = re.search(r"server config: server=(uvicorn|granian) workers=(\d+) threads=(\d+)", log)
    if server:
        return f"{server.group(1)}, {server.group(2)} workers x {server.group(3)} threads"
    match = re.search(r"server config: workers=(\d+) worker_class=(\S+) threads=(\d+) keepalive=(\d+)", log)
    if match:
        return f"{match.group(1)} workers x {match.group(3)} threads, {match.group(2).rsplit('.', 1)[-1]}, keepalive {match.group(4)} s"
    workers = len(set(re.findall(r"Booting worker with pid: (\d+)", log)))
    klass = re.search(r"Using worker: (\S+)", log)
    return f"{workers} workers, {klass.group(1) if klass else '?'}"


def report(result: dict, args: argparse.Namespace) -> bool:
    tally: Tally = result["tally"]
    lat = sorted(tally.latencies) or [float("nan")]
    rate = result["events"] / result["elapsed"]
    print(f"webhook ingest over HTTP, {result['backend']}: reconciler serve ({result['config']}), "
          f"{args.concurrency} keep-alive senders, {result['events']} signed charge.succeeded events (+{args.warmup} warm-up)")
    print(f"  acknowledged      {rate:,.0f} events/s   ({result['elapsed']:.2f} s: 2xx answers / the client's wall time)")
    applied = result.get("applied_elapsed")
    if applied:
        print(f"  applied           {result['events'] / applied:,.0f} events/s   ({applied:.2f} s from the first post until the ledger "
              f"held every charge; {result['apply_tail']:.2f} s after the last answer)")
    else:
        print(f"  applied           NOT COMPLETE within {args.apply_timeout} s")
    lags = result.get("lags") or []
    if lags:
        print("  apply lag ms      p50 {:.0f}  p99 {:.0f}  max {:.0f}   (stored -> applied, per event)".format(
            percentile(lags, 50) * 1000, percentile(lags, 99) * 1000, lags[-1] * 1000))
    print("  latency ms        p50 {:.1f}  p95 {:.1f}  p99 {:.1f}  max {:.1f}  mean {:.1f}".format(
        percentile(lat, 50) * 1000, percentile(lat, 95) * 1000, percentile(lat, 99) * 1000,
        lat[-1] * 1000, statistics.fmean(lat) * 1000))
    print(f"  errors            {tally.errors}   answers {tally.statuses}   reconnects {tally.reconnects}"
          + (f"   first error: {tally.first_error}" if tally.first_error else ""))
    cpu = result.get("cpu") or {}
    if cpu.get("machine"):
        per_event = {k: v / result["events"] * 1000 for k, v in cpu.items()}
        print("  cpu ms/event      machine {:.2f} (server {:.2f}, postgres {:.2f}, client {:.2f}); machine busy {:.0%} of {} cores".format(
            per_event["machine"], per_event.get("server", 0), per_event.get("postgres", 0), per_event.get("client", 0),
            cpu["machine"] / result["elapsed"] / (os.cpu_count() or 1), os.cpu_count()))
    ok_ledger = result["stored"] == result["expected"] and result["charges"] == result["expected"]
    print(f"  ledger            {result['stored']} events stored, {result['charges']} charges "
          f"(expected {result['expected']} each: {'ok' if ok_ledger else 'MISMATCH'})")
    tps = result.get("pgbench")
    if tps:
        print(f"  pgbench           {tps:,.0f} tps (same 2 statements, 1 transaction, -c {args.concurrency} -j 2 "
              f"-T {args.pgbench_seconds} -M {args.pgbench_protocol}, same database, same run)")
        print(f"  ratio             acknowledged {rate / tps:.2f} of pgbench" + (
            f", applied {result['events'] / applied / tps:.2f}" if applied else ""))
    return tally.errors == 0 and ok_ledger and bool(applied)


def inprocess_run(url: str, args: argparse.Namespace) -> None:
    from app import create_app
    from config import Settings

    bodies = charge_events(args.events, tag="inproc")
    signed = [(body, p.sign(body, SECRET)) for body in bodies]
    client = create_app(Settings(database_url=url, stripe_webhook_secrets=(SECRET,), api_token=TOKEN)).test_client()
    latencies = []
    started = time.perf_counter()
    for body, signature in signed:
        t = time.perf_counter()
        response = client.post("/webhooks/stripe", data=body, headers={"Stripe-Signature": signature})
        latencies.append(time.perf_counter() - t)
        assert response.status_code == 200, response.get_data(as_text=True)
    elapsed = time.perf_counter() - started
    latencies.sort()
    print(f"in-process, 1 thread, {make_url(url).get_backend_name()}: {len(bodies) / elapsed:,.0f} events/s, "
          f"p50 {percentile(latencies, 50) * 1000:.2f} ms, p99 {percentile(latencies, 99) * 1000:.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000, help="timed events per database (default 20000)")
    parser.add_argument("--warmup", type=int, default=1000, help="untimed events first (default 1000)")
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="keep-alive senders (default 16)")
    parser.add_argument("--database-url", default=DEFAULT_PG, help=f"PostgreSQL server (default {DEFAULT_PG}); a fresh database is created on it")
    parser.add_argument("--sqlite", action="store_true", help="also measure SQLite (a temporary file)")
    parser.add_argument("--sqlite-only", action="store_true", help="measure SQLite only")
    parser.add_argument("--workers", type=int, default=None, help="reconciler serve --workers (default: its own)")
    parser.add_argument("--threads", type=int, default=None, help="reconciler serve --threads (default: its own)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra argument for reconciler serve (repeatable)")
    parser.add_argument("--log-level", default="INFO", help="server LOG_LEVEL (default INFO, as deployed)")
    parser.add_argument("--apply-timeout", type=float, default=300, help="seconds to wait for the applier to catch up (default 300)")
    parser.add_argument("--pgbench-seconds", type=int, default=10)
    parser.add_argument("--pgbench-protocol", choices=["extended", "prepared"], default="prepared")
    parser.add_argument("--no-pgbench", action="store_true")
    parser.add_argument("--mode", choices=["http", "inprocess"], default="http")
    parser.add_argument("--pause", action="store_true", help="wait for Enter before the timed run (to attach a profiler)")
    args = parser.parse_args()

    busy = "\n".join(
        line for line in subprocess.run(["ps", "-eo", "pid=,pcpu=,args="], capture_output=True, text=True).stdout.splitlines()
        if float(line.split()[1]) > 20 and int(line.split()[0]) != os.getpid()
    )
    if busy:
        print(f"note: other busy processes before the run:\n{busy}\n")

    targets = ([] if args.sqlite_only else [args.database_url]) + ([None] if (args.sqlite or args.sqlite_only) else [])
    ok = True
    for server_url in targets:
        with throwaway_database(server_url, prefix="reconciler_bench") as url:
            if args.mode == "inprocess":
                inprocess_run(url, args)
                continue
            ok = report(http_run(url, args, tag=os.urandom(4).hex()), args) and ok
            print()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
