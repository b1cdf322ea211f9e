"""Prometheus metrics, safe under several gunicorn worker processes.

Two kinds of series:

* **Counted in the web process** (events received by type and outcome, ingest latency,
  pay requests by outcome, request latency). Under ``reconciler serve`` every worker
  writes them to ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, set
  up by the CLI before the workers fork), and a scrape of any worker adds all of them up.
* **Read from the database at scrape time** (duplicate cases by status, refunds we issued
  and their amounts by currency, the last reconciliation pass). Those change in the job
  process, not in web workers, and the database is the one place that has them right
  whichever process made them.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from domain.ledger.applier import inbox_state
from models import CASE_STATUSES, CaseKind, DuplicateCase, ReconciliationRun, RefundAttempt

__all__ = [
    "CONTENT_TYPE_LATEST",
    "EVENTS",
    "INGEST_SECONDS",
    "PAY_REQUESTS",
    "REQUEST_SECONDS",
    "render",
]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

EVENTS = Counter(
    "reconciler_webhook_events",
    "Webhook deliveries by event type and outcome (received, duplicate, ignored, rejected, failed).",
    ["type", "outcome"],
)
INGEST_SECONDS = Histogram(
    "reconciler_webhook_ingest_seconds",
    "Time to verify and store one webhook delivery (applying it is the applier's).",
    buckets=_LATENCY_BUCKETS,
)
PAY_REQUESTS = Counter(
    "reconciler_pay_requests",
    "POST /orders/<id>/pay answers by outcome (created, existing, already_paid, in_progress, error, replayed, ...).",
    ["outcome"],
)
REQUEST_SECONDS = Histogram(
    "reconciler_http_request_seconds",
    "HTTP request latency by endpoint and status class.",
    ["endpoint", "status"],
    buckets=_LATENCY_BUCKETS,
)


class LedgerCollector(Collector):
    """Series read from the database when scraped."""

    def __init__(self, session_factory: Callable[[], Session]) -> None:
        self._session_factory = session_factory

    def collect(self) -> Iterator[Any]:
        cases = GaugeMetricFamily("reconciler_duplicate_cases", "Duplicate cases by status.", labels=["status"])
        unlinked = GaugeMetricFamily(
            "reconciler_unlinked_cases",
            "Possible duplicates with no order (review only), by status; not in reconciler_duplicate_cases.",
            labels=["status"],
        )
        refunds = GaugeMetricFamily(
            "reconciler_refunds", "Refunds this service asked for, by attempt status and currency.", labels=["status", "currency"]
        )
        amounts = GaugeMetricFamily(
            "reconciler_refunded_minor_units",
            "Money refunded by this service (succeeded attempts), minor units by currency.",
            labels=["currency"],
        )
        last_finished = GaugeMetricFamily(
            "reconciler_last_pass_finished_timestamp_seconds", "When the last reconciliation pass finished (unix time)."
        )
        last_duration = GaugeMetricFamily("reconciler_last_pass_duration_seconds", "How long the last pass took.")
        last_ok = GaugeMetricFamily("reconciler_last_pass_success", "1 if the last pass succeeded, else 0.")
        inbox_depth = GaugeMetricFamily(
            "reconciler_inbox_events", "Stored events not applied yet, by status (received, failed).", labels=["status"]
        )
        apply_lag = GaugeMetricFamily(
            "reconciler_inbox_oldest_pending_seconds", "Age of the oldest stored event not applied yet (0 when none): the apply lag."
        )
        appliers = GaugeMetricFamily("reconciler_appliers_live", "Appliers whose heartbeat is recent.")
        heartbeat = GaugeMetricFamily(
            "reconciler_applier_heartbeat_age_seconds", "Seconds since the freshest applier heartbeat."
        )
        with self._session_factory() as session:
            state = inbox_state(session)
            inbox_depth.add_metric(["received"], state.pending - state.failed)
            inbox_depth.add_metric(["failed"], state.failed)
            apply_lag.add_metric([], state.oldest_pending_seconds or 0.0)
            appliers.add_metric([], state.appliers)
            if state.last_heartbeat_seconds is not None:
                heartbeat.add_metric([], state.last_heartbeat_seconds)
            is_unlinked = DuplicateCase.kind == CaseKind.UNLINKED.value
            by_status = dict(
                session.execute(
                    select(DuplicateCase.status, func.count()).where(~is_unlinked).group_by(DuplicateCase.status)
                ).all()
            )
            unlinked_by_status = dict(
                session.execute(
                    select(DuplicateCase.status, func.count()).where(is_unlinked).group_by(DuplicateCase.status)
                ).all()
            )
            for status in CASE_STATUSES:
                cases.add_metric([status], by_status.get(status, 0))
                unlinked.add_metric([status], unlinked_by_status.get(status, 0))
            for status, currency, count, total in session.execute(
                select(RefundAttempt.status, RefundAttempt.currency, func.count(), func.sum(RefundAttempt.amount)).group_by(
                    RefundAttempt.status, RefundAttempt.currency
                )
            ):
                refunds.add_metric([status, currency], count)
                if status == "succeeded":
                    amounts.add_metric([currency], int(total or 0))
            last = session.scalars(
                select(ReconciliationRun)
                .where(ReconciliationRun.finished_at.is_not(None))
                .order_by(ReconciliationRun.id.desc())
                .limit(1)
            ).first()
            if last is not None and last.finished_at is not None:
                last_finished.add_metric([], last.finished_at.timestamp())
                last_duration.add_metric([], (last.finished_at - last.started_at).total_seconds())
                last_ok.add_metric([], 1 if last.status == "succeeded" else 0)
        yield from (cases, unlinked, refunds, amounts, last_finished, last_duration, last_ok)
        yield from (inbox_depth, apply_lag, appliers, heartbeat)


def render(session_factory: Callable[[], Session]) -> bytes:
    """The exposition text for one scrape: every worker's counters plus the ledger's."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY  # type: ignore[assignment]
        _ensure_registered(registry, session_factory)
        return generate_latest(registry)
    registry.register(LedgerCollector(session_factory))
    return generate_latest(registry)


_LEDGER_COLLECTORS: dict[int, LedgerCollector] = {}


def _ensure_registered(registry: Any, session_factory: Callable[[], Session]) -> None:
    # Single process (tests, `flask run`): the default registry holds the counters; the
    # ledger collector is swapped per app so each test's database is the one scraped.
    for key, collector in list(_LEDGER_COLLECTORS.items()):
        registry.unregister(collector)
        del _LEDGER_COLLECTORS[key]
    collector = LedgerCollector(session_factory)
    registry.register(collector)
    _LEDGER_COLLECTORS[id(session_factory)] = collector


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._start
