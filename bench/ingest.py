"""Webhook ingest benchmark: events/s, latency percentiles, peak memory.

Builds a realistic stream (orders paid through PaymentIntents, some double charges,
refunds, a dispute, ~10% redeliveries), signs every event for real, and posts it:

* ``--mode inprocess`` (default): through the Flask test client in this process, one
  thread: the cost of verify + parse + store + apply, without HTTP.
* ``--mode http``: to ``reconciler serve`` (gunicorn, real worker processes) from
  ``--threads`` client threads over loopback.

The database is a throwaway: a temporary SQLite file, or with ``--database-url
postgresql://...`` a fresh database created on that server and dropped afterwards.

    .venv/bin/python bench/ingest.py --events 3000
    .venv/bin/python bench/ingest.py --events 3000 --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/ingest.py --mode http --threads 8 --workers 4 --events 3000 --database-url postgresql://...
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from app import create_app  # noqa: E402
from config import Settings  # noqa: E402
from models import Charge, StripeEvent, make_engine, make_session_factory  # noqa: E402
from tests import stripe_payloads as p  # noqa: E402
from tests.databases import throwaway_database  # noqa: E402
from tests.servers import reconciler_serve  # noqa: E402

SECRET = "whsec_bench_0123456789abcdef"
TOKEN = "bench-api-token-0123456789"


def event_stream(count: int, seed: int = 1) -> list[bytes]:
    """About ``count`` encoded events, with redeliveries shuffled in."""
    rng = random.Random(seed)
    events: list[dict] = []
    t0 = int(time.time()) - 86400
    n = 0
    while len(events) < count * 0.9:
        n += 1
        order_id = f"ord_bench_{n}"
        amount = rng.choice([999, 2500, 4999, 12000])
        pi_id = p.new_id("pi")
        charge = p.charge(amount=amount, payment_intent=pi_id, created=t0 + n, metadata={"order_id": order_id})
        intent = p.payment_intent(id=pi_id, amount=amount, latest_charge=charge["id"], metadata={"order_id": order_id, "order_total": str(amount)}, created=t0 + n)
        events.append(p.event("charge.succeeded", charge, created=t0 + n))
        events.append(p.event("payment_intent.succeeded", intent, created=t0 + n))
        if n % 10 == 0:  # a double charge
            twin = p.charge(amount=amount, payment_intent=pi_id, created=t0 + n + 1, metadata={"order_id": order_id})
            events.append(p.event("charge.succeeded", twin, created=t0 + n + 1))
        if n % 7 == 0:  # a refund
            refund = p.refund(charge=charge["id"], amount=amount, created=t0 + n + 5)
            events.append(p.event("refund.created", refund, created=t0 + n + 5))
            events.append(p.event("charge.refunded", dict(charge, amount_refunded=amount, refunded=True), created=t0 + n + 5))
        if n % 50 == 0:
            events.append(p.event("charge.dispute.created", p.dispute(charge=charge["id"], amount=amount, created=t0 + n + 9), created=t0 + n + 9))
    bodies = [p.encode(e) for e in events]
    bodies += rng.sample(bodies, count - len(bodies))  # redeliveries
    rng.shuffle(bodies)
    return bodies


def percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--mode", choices=["inprocess", "http"], default="inprocess")
    parser.add_argument("--threads", type=int, default=8, help="client threads (http mode)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (http mode)")
    parser.add_argument("--database-url", default=None, help="PostgreSQL server URL; default: SQLite temp file")
    args = parser.parse_args()

    bodies = event_stream(args.events)
    signed = [(body, p.sign(body, SECRET)) for body in bodies]
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    with throwaway_database(args.database_url, prefix="reconciler_bench") as url:
        backend = make_url(url).get_backend_name()
        started = time.perf_counter()
        if args.mode == "inprocess":
            settings = Settings(database_url=url, stripe_webhook_secrets=(SECRET,), api_token=TOKEN)
            client = create_app(settings).test_client()
            started = time.perf_counter()
            for body, signature in signed:
                t = time.perf_counter()
                response = client.post("/webhooks/stripe", data=body, headers={"Stripe-Signature": signature})
                latencies.append(time.perf_counter() - t)
                status = response.get_json().get("status", response.get_json().get("error"))
                outcomes[status] = outcomes.get(status, 0) + 1
            elapsed = time.perf_counter() - started
            label = f"in-process, 1 thread, {backend}"
        else:
            env = {"DATABASE_URL": url, "STRIPE_WEBHOOK_SECRET": SECRET, "API_TOKEN": TOKEN, "LOG_LEVEL": "WARNING"}
            with tempfile.TemporaryDirectory() as tmp, reconciler_serve(["--workers", str(args.workers), "--no-migrate"], env, Path(tmp) / "serve.log") as base:
                session = threading.local()

                def post(item: tuple[bytes, str]) -> None:
                    if not hasattr(session, "http"):
                        session.http = requests.Session()
                    t = time.perf_counter()
                    response = session.http.post(f"{base}/webhooks/stripe", data=item[0], headers={"Stripe-Signature": item[1]}, timeout=60)
                    took = time.perf_counter() - t
                    body = response.json()
                    with lock:
                        latencies.append(took)
                        key = body.get("status", body.get("error"))
                        outcomes[key] = outcomes.get(key, 0) + 1

                started = time.perf_counter()
                with ThreadPoolExecutor(args.threads) as pool:
                    list(pool.map(post, signed))
                elapsed = time.perf_counter() - started
            label = f"HTTP, {args.threads} client threads, {args.workers} gunicorn workers, {backend}"

        engine = make_engine(url)
        with make_session_factory(engine)() as db:
            stored = db.scalar(select(func.count()).select_from(StripeEvent))
            charges = db.scalar(select(func.count()).select_from(Charge))
        engine.dispose()

    latencies.sort()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"webhook ingest: {label}")
    print(f"  events posted     {len(bodies)}  ({outcomes})")
    print(f"  events stored     {stored}, charges {charges}")
    print(f"  wall time         {elapsed:.2f} s")
    print(f"  throughput        {len(bodies) / elapsed:.0f} events/s")
    print(
        "  latency ms        p50 {:.1f}  p95 {:.1f}  p99 {:.1f}  max {:.1f}  mean {:.1f}".format(
            percentile(latencies, 50) * 1000,
            percentile(latencies, 95) * 1000,
            percentile(latencies, 99) * 1000,
            latencies[-1] * 1000,
            statistics.fmean(latencies) * 1000,
        )
    )
    print(f"  peak RSS (bench process) {peak_rss_mib:.0f} MiB")
    return 0 if set(outcomes) <= {"processed", "duplicate", "ignored"} else 1


if __name__ == "__main__":
    sys.exit(main())
