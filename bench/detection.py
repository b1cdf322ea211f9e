"""Detection benchmark: full and incremental passes over a million orders on PostgreSQL,
next to the raw ``GROUP BY order_id HAVING count(*) > 1`` measured in the same run.

The data set is built server-side (``INSERT ... SELECT ... FROM generate_series``), not
through the ORM:

* ``--orders`` orders (default 1,000,000) with known totals, each paid by one charge;
* ``--extra`` more charges (default 50,000) on as many orders, spread evenly: 8 in 10
  exact duplicates (same amount, 30 s later: automatic cases), 1 in 10 a different amount
  (a review case), 1 in 10 a duplicate refunded in full (a refund row: no case);
* ``ANALYZE``.

Then, each timed with ``time.perf_counter`` (peak process RSS by ``getrusage``), through
``domain.cases.detection.detect`` itself:

1. the raw SQL candidate query, fetched in full (run twice: cold, then warm);
2. a full pass (``touched_since=None``, ``dry_run=False``: cases are really written);
3. a second full pass (cases exist, nothing changed);
4. an incremental pass after touching ``--touch`` orders (default 1,000): half get a new
   duplicate charge, half get a refund of the duplicate an open case proposes to refund
   (orders with an active case are re-examined only when touched, so this pass costs the
   touched orders even with the full pass's cases still open);
5. the same again once every case is decided (dismissed by SQL, as finance or the
   automatic refunds would leave them): the steady-state cost of a day's touches;
6. one more full pass under ``tracemalloc`` for the peak Python heap (``--no-heap`` skips
   it). It is separate because tracing slows the ORM-heavy passes about threefold, so the
   timed passes above run without it.

The database is created on the server at ``--database-url`` and dropped afterwards
(``--keep`` keeps it and prints its URL).

Known trap, and why ``--plan-cache-mode`` exists: detection looks cases up one order at a
time (``sync_case``: the active case ``FOR UPDATE``; ``_would_open``: the latest case).
psycopg prepares a statement after 5 executions, and PostgreSQL then settles on a generic
plan made while ``duplicate_cases`` was empty: a sequential scan. Nothing re-plans it until
the table is analyzed, so on a server without autovacuum (or before autovacuum gets to it)
the first full pass reads the whole growing table twice per order: quadratic (seen here:
193,205 sequential scans reading 3.65e9 rows by the time 37,800 of 45,000 cases were open,
the pass still unfinished after 6 minutes). ``--plan-cache-mode force_custom_plan`` sets
that mode on the throwaway database only, which makes those lookups index scans.

    .venv/bin/python bench/detection.py --orders 20000 --extra 1000
    .venv/bin/python bench/detection.py            # 1,000,000 orders / 1,050,000 charges
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.engine import Engine, make_url  # noqa: E402

from domain.cases.detection import DetectionSummary, detect  # noqa: E402
from models import ACTIVE_CASE_STATUSES, DuplicateCase, make_engine, make_session_factory  # noqa: E402
from tests.databases import throwaway_database  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
WINDOW_SECONDS = 24 * 3600
T0 = 1_700_000_000  # Stripe ``created`` of the first order's charge

RAW_SQL = (
    "SELECT order_id FROM charges WHERE order_id IS NOT NULL AND status = 'succeeded' AND captured "
    "GROUP BY order_id HAVING count(*) > 1"
)

T = TypeVar("T")


# -- database --------------------------------------------------------------------------------


def bench_database(server_url: str, keep: bool):  # type: ignore[no-untyped-def]
    """A fresh migrated database; dropped afterwards unless ``keep``."""
    return throwaway_database(server_url, prefix="reconciler_bench_detect", keep=keep)


# -- data set --------------------------------------------------------------------------------

# Orders: ord_0000001 .. ord_N; totals 10.00 .. 59.00 USD; last touched two days ago.
ORDERS_SQL = """
INSERT INTO orders (id, amount, currency, amount_source, customer, status, payment_intent_id,
                    version, created_at, updated_at)
SELECT 'ord_' || lpad(i::text, 7, '0'), 1000 + (i % 50) * 100, 'usd', 'api',
       'cus_' || i, 'paid', 'pi_' || i, 1, :old, :old
FROM generate_series(1, :n) AS i
"""

# One paid charge per order, from the order's PaymentIntent.
CHARGES_SQL = """
INSERT INTO charges (id, order_id, payment_intent_id, customer, account, livemode, amount,
                     amount_captured, currency, status, captured, reported_refunded, created,
                     card_brand, card_last4, last_event_created, first_seen_at, updated_at)
SELECT 'ch_' || i, 'ord_' || lpad(i::text, 7, '0'), 'pi_' || i, 'cus_' || i, NULL, false,
       1000 + (i % 50) * 100, 1000 + (i % 50) * 100, 'usd', 'succeeded', true, 0, :t0 + i,
       'visa', lpad((i % 10000)::text, 4, '0'), :t0 + i, :old, :old
FROM generate_series(1, :n) AS i
"""

# Extra charge k (0-based) sits on order j = 1 + k * step. Kind by k % 10:
# 0-7 exact duplicate (same amount, 30 s later, its own PaymentIntent), 8 a different amount,
# 9 an exact duplicate refunded in full.
EXTRA_SQL = """
INSERT INTO charges (id, order_id, payment_intent_id, customer, account, livemode, amount,
                     amount_captured, currency, status, captured, reported_refunded, created,
                     card_brand, card_last4, last_event_created, first_seen_at, updated_at)
SELECT 'ch_x_' || k, 'ord_' || lpad(j::text, 7, '0'), 'pi_x_' || k, 'cus_' || j, NULL, false,
       amt, amt, 'usd', 'succeeded', true, CASE WHEN k % 10 = 9 THEN amt ELSE 0 END,
       :t0 + j + 30, 'visa', lpad((j % 10000)::text, 4, '0'),
       :t0 + j + CASE WHEN k % 10 = 9 THEN 60 ELSE 30 END, :old, :old
FROM (
    SELECT k, j, 1000 + (j % 50) * 100 + CASE WHEN k % 10 = 8 THEN 500 ELSE 0 END AS amt
    FROM (SELECT k, 1 + k * :step AS j FROM generate_series(0, :extra - 1) AS k) AS s
) AS e
"""

EXTRA_REFUNDS_SQL = """
INSERT INTO refunds (id, charge_id, payment_intent_id, account, amount, currency, status, reason,
                     failure_reason, origin, created, last_event_created, first_seen_at, updated_at)
SELECT 're_x_' || k, 'ch_x_' || k, 'pi_x_' || k, NULL, 1000 + (j % 50) * 100, 'usd', 'succeeded',
       'duplicate', NULL, 'external', :t0 + j + 60, :t0 + j + 60, :old, :old
FROM (SELECT k, 1 + k * :step AS j FROM generate_series(0, :extra - 1) AS k) AS s
WHERE k % 10 = 9
"""


def step_for(orders: int, extra: int) -> int:
    return max(1, orders // extra)


def load(engine: Engine, orders: int, extra: int) -> dict[str, int]:
    if extra > orders:
        raise SystemExit("--extra must not exceed --orders")
    step = step_for(orders, extra)
    params = {"n": orders, "extra": extra, "step": step, "t0": T0}
    with engine.begin() as db:
        db.execute(text("SET LOCAL synchronous_commit = off"))
        old = db.scalar(text("SELECT now() - interval '2 days'"))
        params["old"] = old
        db.execute(text(ORDERS_SQL), params)
        db.execute(text(CHARGES_SQL), params)
        db.execute(text(EXTRA_SQL), params)
        db.execute(text(EXTRA_REFUNDS_SQL), params)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
        db.execute(text("ANALYZE"))
        counts = {
            table: db.scalar(text(f"SELECT count(*) FROM {table}"))
            for table in ("orders", "charges", "refunds")
        }
    return counts


def touch(engine: Engine, orders: int, extra: int, count: int, round_: int) -> tuple[object, dict[str, int]]:
    """Touch ``count`` orders as a day's traffic would; returns (touched_since, what was done).

    Half get a new exact duplicate (orders that had one charge: new automatic cases), half
    get a full refund of an automatic case's duplicate (open cases resolve). ``round_``
    (1, 2, ...) picks other orders each time."""
    step = step_for(orders, extra)
    new_dups = count // 2
    refunds = count - new_dups
    with engine.begin() as db:
        since = db.scalar(text("SELECT now()"))
    time.sleep(0.01)
    with engine.begin() as db:
        # Orders j = 1 + round_ + m * step carry no extra charge when step > round_.
        db.execute(
            text(
                """
                INSERT INTO charges (id, order_id, payment_intent_id, customer, account, livemode,
                    amount, amount_captured, currency, status, captured, reported_refunded, created,
                    card_brand, card_last4, last_event_created, first_seen_at, updated_at)
                SELECT 'ch_t' || :r || '_' || m, 'ord_' || lpad(j::text, 7, '0'), 'pi_t' || :r || '_' || m, 'cus_' || j,
                       NULL, false, 1000 + (j % 50) * 100, 1000 + (j % 50) * 100, 'usd', 'succeeded',
                       true, 0, :t0 + j + 45, 'visa', '4242', :t0 + j + 45, now(), now()
                FROM (SELECT m, 1 + :r + m * :step AS j FROM generate_series(0, :n - 1) AS m) AS s
                WHERE j <= :orders
                """
            ),
            {"n": new_dups, "step": step, "t0": T0, "orders": orders, "r": round_},
        )
        # Exact duplicates k % 10 in 0..7 have automatic cases; each round refunds the next ones.
        db.execute(
            text(
                """
                WITH picked AS (
                    SELECT k, 1 + k * :step AS j FROM generate_series(0, :extra - 1) AS k
                    WHERE k % 10 < 8 ORDER BY k LIMIT :n OFFSET (:r - 1) * :n
                ), refunds AS (
                    INSERT INTO refunds (id, charge_id, payment_intent_id, account, amount, currency,
                        status, reason, failure_reason, origin, created, last_event_created,
                        first_seen_at, updated_at)
                    SELECT 're_t' || :r || '_' || k, 'ch_x_' || k, 'pi_x_' || k, NULL, 1000 + (j % 50) * 100,
                           'usd', 'succeeded', 'duplicate', NULL, 'external', :t0 + j + 90,
                           :t0 + j + 90, now(), now()
                    FROM picked
                    RETURNING charge_id, amount
                )
                UPDATE charges SET reported_refunded = refunds.amount,
                       last_event_created = charges.created + 60, updated_at = now()
                FROM refunds WHERE charges.id = refunds.charge_id
                """
            ),
            {"n": refunds, "step": step, "t0": T0, "extra": extra, "r": round_},
        )
    return since, {"new duplicate charges": new_dups, "duplicates refunded": refunds}


# -- measuring -------------------------------------------------------------------------------


@dataclass
class Measured:
    seconds: float
    heap_peak_mib: float
    rss_peak_mib: float


def measure(fn: Callable[[], T], trace: bool) -> tuple[T, Measured]:
    if trace:
        tracemalloc.reset_peak()
    started = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - started
    heap = tracemalloc.get_traced_memory()[1] / 2**20 if trace else float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result, Measured(elapsed, heap, rss)


def raw_sql(engine: Engine) -> int:
    with engine.connect() as db:
        return len(db.execute(text(RAW_SQL)).fetchall())


def run_detect(session_factory, touched_since) -> DetectionSummary:  # type: ignore[no-untyped-def]
    return detect(
        session_factory,
        window_seconds=WINDOW_SECONDS,
        auto_refund_unknown_total=False,
        touched_since=touched_since,
        dry_run=False,
        run_id=None,
    )


def active_cases(session_factory) -> int:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        return session.scalar(
            select(func.count()).select_from(DuplicateCase).where(DuplicateCase.status.in_(ACTIVE_CASE_STATUSES))
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=1_000_000)
    parser.add_argument("--extra", type=int, default=50_000, help="extra charges, one each on as many orders")
    parser.add_argument("--touch", type=int, default=1_000, help="orders touched before the incremental pass")
    parser.add_argument("--database-url", default=DEFAULT_SERVER, help="PostgreSQL server URL (a throwaway database is created there)")
    parser.add_argument("--keep", action="store_true", help="keep the database and print its URL")
    parser.add_argument(
        "--plan-cache-mode",
        choices=["server", "force_custom_plan"],
        default="server",
        help="server: the server's setting (auto). force_custom_plan: ALTER DATABASE ... SET "
        "plan_cache_mode on the throwaway database, so the prepared per-order case lookups are "
        "planned per execution (see below)",
    )
    parser.add_argument("--no-heap", action="store_true", help="skip the extra full pass under tracemalloc (peak Python heap)")
    args = parser.parse_args()
    if not args.database_url.startswith(("postgres://", "postgresql://", "postgresql+psycopg://")):
        parser.error("--database-url must be a PostgreSQL server URL")
    trace = False  # timed passes run without tracemalloc: it slows the ORM work ~2.5-3x

    rows: list[tuple[str, str]] = []

    def row(figure: str, value: str) -> None:
        rows.append((figure, value))
        print(f"  .. {figure}: {value}", flush=True)

    with bench_database(args.database_url, args.keep) as url:
        if args.plan_cache_mode != "server":
            admin = create_engine(url, isolation_level="AUTOCOMMIT")
            with admin.connect() as db:
                db.execute(text(f'ALTER DATABASE "{make_url(url).database}" SET plan_cache_mode = {args.plan_cache_mode}'))
            admin.dispose()
        engine = make_engine(url)
        session_factory = make_session_factory(engine)
        with engine.connect() as db:
            autovacuum = db.scalar(text("SHOW autovacuum"))
            plan_cache_mode = db.scalar(text("SHOW plan_cache_mode"))
        row("server settings", f"autovacuum {autovacuum}, plan_cache_mode {plan_cache_mode}")

        counts, load_m = measure(lambda: load(engine, args.orders, args.extra), trace=False)
        row("data set", f"{counts['orders']:,} orders, {counts['charges']:,} charges, {counts['refunds']:,} refunds")
        row("load (server-side INSERT ... SELECT + ANALYZE)", f"{load_m.seconds:.1f} s")

        cold_n, cold = measure(lambda: raw_sql(engine), trace)
        warm_n, warm = measure(lambda: raw_sql(engine), trace)
        row("raw SQL GROUP BY ... HAVING count(*) > 1, cold", f"{cold.seconds:.2f} s ({cold_n:,} orders)")
        row("raw SQL GROUP BY ... HAVING count(*) > 1, warm", f"{warm.seconds:.2f} s ({warm_n:,} orders)")
        raw_best = min(cold.seconds, warm.seconds)

        full, full_m = measure(lambda: run_detect(session_factory, None), trace)
        row("full pass", f"{full_m.seconds:.2f} s")
        row("  orders examined", f"{full.orders_examined:,}")
        row("  cases opened", f"{len(full.cases_opened):,} ({len(full.automatic_open_cases):,} automatic)")
        row("  peak process RSS so far (ru_maxrss)", f"{full_m.rss_peak_mib:.0f} MiB")
        row("  full pass / raw SQL (warm)", f"{full_m.seconds / raw_best:.1f}x")

        again, again_m = measure(lambda: run_detect(session_factory, None), trace)
        row("second full pass (nothing changed)", f"{again_m.seconds:.2f} s")
        row("  orders examined", f"{again.orders_examined:,}")
        row("  cases opened / updated / resolved", f"{len(again.cases_opened):,} / {again.cases_updated:,} / {again.cases_resolved:,}")
        row("  second pass / raw SQL (warm)", f"{again_m.seconds / raw_best:.1f}x")

        open_before = active_cases(session_factory)
        since, touched = touch(engine, args.orders, args.extra, args.touch, 1)
        inc, inc_m = measure(lambda: run_detect(session_factory, since), trace)
        row("incremental pass", f"{inc_m.seconds:.2f} s")
        row("  orders touched", f"{args.touch:,} ({', '.join(f'{v:,} {k}' for k, v in touched.items())})")
        row("  active cases before", f"{open_before:,}")
        row("  orders examined", f"{inc.orders_examined:,}")
        row("  cases opened / updated / resolved", f"{len(inc.cases_opened):,} / {inc.cases_updated:,} / {inc.cases_resolved:,}")
        row("  incremental / full pass", f"{inc_m.seconds / full_m.seconds:.2f}")
        row("  incremental / raw SQL (warm)", f"{inc_m.seconds / raw_best:.1f}x")

        # Steady state: every case decided (as finance or the auto refunds would), so the
        # incremental pass sees only what was touched.
        with engine.begin() as db:
            dismissed = db.execute(
                text(
                    "UPDATE duplicate_cases SET status = 'dismissed', decision = 'finance', "
                    "decided_by = 'bench', decided_at = now(), updated_at = now() "
                    "WHERE status IN ('open', 'refunding', 'failed')"
                )
            ).rowcount
        since, touched = touch(engine, args.orders, args.extra, args.touch, 2)
        quiet, quiet_m = measure(lambda: run_detect(session_factory, since), trace)
        row("incremental pass, no active case", f"{quiet_m.seconds:.2f} s")
        row("  active cases dismissed by SQL beforehand", f"{dismissed:,}")
        row("  orders touched", f"{args.touch:,} ({', '.join(f'{v:,} {k}' for k, v in touched.items())})")
        row("  orders examined", f"{quiet.orders_examined:,}")
        row("  cases opened / updated / resolved", f"{len(quiet.cases_opened):,} / {quiet.cases_updated:,} / {quiet.cases_resolved:,}")
        row("  this pass / full pass", f"{quiet_m.seconds / full_m.seconds:.3f}")
        row("  this pass / raw SQL (warm)", f"{quiet_m.seconds / raw_best:.1f}x")
        row("peak process RSS, timed passes (ru_maxrss)", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

        if not args.no_heap:
            tracemalloc.start()
            heap, heap_m = measure(lambda: run_detect(session_factory, None), trace=True)
            tracemalloc.stop()
            row("peak Python heap, full pass under tracemalloc", f"{heap_m.heap_peak_mib:.1f} MiB")
            row("  (that pass: seconds with tracing, orders examined)", f"{heap_m.seconds:.2f} s, {heap.orders_examined:,}")
            row("peak process RSS, whole run (ru_maxrss)", f"{heap_m.rss_peak_mib:.0f} MiB")
        engine.dispose()
        if args.keep:
            print(f"kept database: {make_url(url).render_as_string(hide_password=True)}")

    width = max(len(f) for f, _ in rows)
    print()
    print(f"detection benchmark: PostgreSQL, {args.orders:,} orders + {args.extra:,} extra charges, window {WINDOW_SECONDS // 3600} h")
    print(f"  {'figure'.ljust(width)}  value")
    for figure, value in rows:
        print(f"  {figure.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
