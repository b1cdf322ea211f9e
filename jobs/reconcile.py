"""One reconciliation pass: backfill, resume unfinished refunds, detect, refund the
automatic cases (auto mode), alert, and record the run.

A plain function taking its dependencies; ``reconciler reconcile`` and the scheduler call
it. Only one pass runs at a time (:mod:`jobs.lease`); a second one raises
:class:`RunInProgress` before touching anything.

Modes: ``review`` opens cases and refunds nothing; ``auto`` also refunds the automatic
cases; ``dry-run`` may backfill the ledger and records its run, but opens no case, calls no
Stripe write API and sends no alert: it reports what it would do.

A run explains how it ended: ``succeeded``, ``partial`` (finished with errors),
``failed`` (an error stopped it) or ``aborted`` (stopped from outside: a signal, a stop
request, or its process died). A pass that is stopped records ``aborted`` itself on the way
out (:class:`PassAborted`, raised by the caller's signal handler or by ``should_stop`` at
the next checkpoint). A process that dies without a word (SIGKILL, power loss) leaves its
run ``running``: the next pass, once it holds the pass lock, knows no pass can still be
running and marks such runs ``aborted``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from domain.stripe.gateway import GatewayError, StripeGateway
from domain.cases.refunds import RefundRefused, RefundService, pending_refund_cases
from config import Settings
from domain.ledger.applier import Applier
from domain.ledger.inbox import Inbox
from jobs.applier import make_applier
from jobs.alerts import Alert, Alerter, pending_alerts
from jobs.backfill import LISTINGS, BackfillStopped, BackfillSummary, backfill, backfill_start, oldest_watermark
from domain.cases.detection import DetectionSummary, detect, detect_unlinked
from jobs.lease import RunInProgress, exclusive_pass, holder_name
from models import CaseStatus, DuplicateCase, ReconciliationRun, run_in_transaction
from models.db import engine_of

log = logging.getLogger(__name__)

# Backfill starts this far before the last watermark: Stripe's lists are eventually
# consistent for a moment, and one second of resolution makes ties at the edge normal.
OVERLAP_SECONDS = 3600
# An incremental pass looks at what changed since the previous pass started. An applier
# stamps a row when its batch writes it and commits a moment later, so a batch in flight
# when the previous pass started could commit rows stamped before that start, after that
# pass's detection read. The previous pass's drain rules that out: it returns only once
# no event is pending, i.e. every batch that claimed one has committed, and any later
# batch stamps after the pass started. When that drain ran out of time, the next pass
# looks this much further back instead.
TOUCHED_MARGIN = timedelta(minutes=5)

__all__ = ["PassAborted", "PassProgress", "RunInProgress", "RunSummary", "run_reconciliation"]

# ``progress(phase, count, total)``: ``count`` more units of ``phase`` are done; ``total``
# (when known) is how many the phase has in all. Phases: "backfill charges", "backfill
# refunds", ... (objects read from Stripe), "detection" (orders), "refunds" (cases). A
# callback may raise :class:`PassAborted` to stop the pass at that point.
PassProgress = Callable[[str, int, "int | None"], None]
# Inside the pass: progress plus the stop check; phase None is the stop check alone.
Checkpoint = Callable[["str | None", int, "int | None"], None]


class PassAborted(BaseException):
    """Stops a pass from outside (a signal, a stop request); the run is recorded
    ``aborted`` with ``reason``. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` inside the pass swallows it."""

    def __init__(self, reason: str, *, signum: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.signum = signum


@dataclass
class RunSummary:
    run_id: int
    mode: str
    status: str
    full: bool
    backfill_from: int | None
    watermark: int | None
    watermarks: dict[str, int] = field(default_factory=dict)  # by listing; watermark is the oldest
    backfill: dict[str, Any] = field(default_factory=dict)
    detection: dict[str, Any] = field(default_factory=dict)
    refunds: list[dict[str, Any]] = field(default_factory=list)
    alerts_sent: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # noted, but the pass did its job
    # Events the pass applied from the inbox, and what it left unapplied (in backoff, or
    # the wait ran out): {"applied": n, "failed": n, "pending": n}.
    inbox: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, Any]:
        refunded = [r for r in self.refunds if r["result"] in ("refunded", "adopted")]
        amounts: dict[str, int] = {}
        for r in refunded:
            amounts[r["currency"]] = amounts.get(r["currency"], 0) + r["amount"]
        return {
            "charges_backfilled": self.backfill.get("charges", 0),
            "refunds_backfilled": self.backfill.get("refunds", 0),
            "events_replayed": self.backfill.get("events_applied", 0),
            "inbox_events_applied": self.inbox.get("applied", 0),
            "inbox_events_pending": self.inbox.get("pending", 0),
            "inbox_drained": not self.inbox.get("timed_out", 0),
            "orders_examined": self.detection.get("orders_examined", 0),
            "cases_opened": len(self.detection.get("cases_opened", [])),
            "cases_resolved": self.detection.get("cases_resolved", 0),
            # "possible duplicate, no order" (review only), apart from the cases above
            "unlinked_cases_opened": len(self.detection.get("unlinked_opened", [])),
            "unlinked_cases_resolved": self.detection.get("unlinked_resolved", 0),
            "would_open_unlinked": len(self.detection.get("would_open_unlinked", [])),
            "would_open": len(self.detection.get("would_open", {})),
            "would_refund_automatically": sum(1 for v in self.detection.get("would_open", {}).values() if v),
            "refunds_issued": len(refunded),
            "refunded_amounts": amounts,
            "refunds_failed": sum(1 for r in self.refunds if r["result"] == "failed"),
            "refunds_deferred": sum(1 for r in self.refunds if r["result"] == "deferred"),
            "refunds_skipped": sum(1 for r in self.refunds if r["result"] == "skipped"),
            "alerts_sent": self.alerts_sent,
        }


def run_reconciliation(
    session_factory: sessionmaker[Session],
    gateway: StripeGateway,
    settings: Settings,
    *,
    mode: str | None = None,
    since: datetime | None = None,
    full: bool = False,
    trigger: str = "manual",
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    alerter: Alerter | None = None,
    refund_service: RefundService | None = None,
    progress: PassProgress | None = None,
    should_stop: Callable[[], str | None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunSummary:
    """Run one pass now. Raises :class:`RunInProgress` if another pass holds the lock.

    ``should_stop()`` is asked at every checkpoint (each page, chunk and refund); a reason
    it returns stops the pass there, recorded ``aborted``, and :class:`PassAborted` is
    raised. ``on_start(run_id)`` is called once the run is recorded (a signal handler
    uses it to know which run it stops)."""
    mode = mode or settings.refund_mode
    if mode not in ("review", "auto", "dry-run"):
        raise ValueError(f"mode must be review, auto or dry-run, not {mode!r}")
    alerter = alerter or Alerter(settings, session_factory)
    # The refunds of a pass may wait: the gateway's patient policy (429s waited out with
    # ``sleep``), paced by the same limiter as the backfill's reads.
    refunds = refund_service or RefundService(session_factory, gateway.patient(sleep=sleep), clock=clock)
    inbox = Inbox(settings, engine_of(session_factory))
    applier = make_applier(settings, session_factory, alerter=alerter)

    with exclusive_pass(session_factory):
        previous = _previous_run(session_factory)
        run_id, orphans = _start_run(session_factory, mode, full, trigger)
        summary = RunSummary(run_id=run_id, mode=mode, status="running", full=full, backfill_from=None, watermark=None)
        if orphans:
            message = (
                f"run(s) {', '.join(map(str, orphans))} had stopped without finishing (their process is gone): "
                "recorded as aborted"
            )
            log.warning(message, extra={"run_id": run_id})
            summary.warnings.append(message)
        if on_start:
            on_start(run_id)
        checkpoint = _checkpoint(should_stop, progress)
        parts = _PassParts(settings, session_factory, gateway, inbox, applier, refunds, alerter, clock, checkpoint)
        try:
            checkpoint(None, 0, None)
            _pass(summary, previous, parts, since)
            summary.status = "partial" if summary.errors else "succeeded"
        except Exception as exc:
            log.exception("reconciliation pass failed", extra={"run_id": run_id})
            summary.errors.append(f"{type(exc).__name__}: {exc}")
            summary.status = "failed"
            raise
        except BaseException as exc:  # PassAborted, KeyboardInterrupt, SystemExit
            reason = exc.reason if isinstance(exc, PassAborted) else type(exc).__name__
            log.warning("reconciliation pass aborted: %s", reason, extra={"run_id": run_id})
            summary.errors.append(f"aborted: {reason}")
            summary.status = "aborted"
            raise
        finally:
            _finish_run(session_factory, summary)
    return summary


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def abort_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """While the block runs, the first of ``signals`` raises :class:`PassAborted` where the
    main thread is, so a pass in the block records itself ``aborted`` and releases the pass
    lock on its way out; later signals are ignored so that this bookkeeping finishes. The
    previous handlers come back afterwards. Main thread only (Python's rule for signals)."""
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if fired:
            log.warning("%s received while stopping; still recording the run", name)
            return
        fired.append(signum)
        raise PassAborted(f"interrupted by {name}", signum=signum)

    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _checkpoint(should_stop: Callable[[], str | None] | None, progress: PassProgress | None) -> Checkpoint:
    """One callback for the pass's progress and its stop checks: reports, then stops the
    pass (:class:`PassAborted`) if ``should_stop`` gives a reason."""

    def checkpoint(phase: str | None, count: int, total: int | None = None) -> None:
        # phase None: between phases, the stop check alone
        if progress is not None and phase is not None:
            progress(phase, count, total)
        reason = should_stop() if should_stop is not None else None
        if reason:
            raise PassAborted(reason)

    return checkpoint


@dataclass(frozen=True)
class _PassParts:
    """What one pass works with, built once by :func:`run_reconciliation`."""

    settings: Settings
    session_factory: sessionmaker[Session]
    gateway: StripeGateway
    inbox: Inbox
    applier: Applier
    refunds: RefundService
    alerter: Alerter
    clock: Callable[[], float]
    checkpoint: Checkpoint


def _pass(summary: RunSummary, previous: ReconciliationRun | None, parts: _PassParts, since: datetime | None) -> None:
    """The phases in order: the inbox, backfill, unfinished refunds, the inbox again,
    detection, automatic refunds, alerts."""
    dry_run = summary.mode == "dry-run"
    # -- the inbox: what webhooks stored must be in the ledger before it is judged ---------
    _drain_inbox(summary, parts.applier, parts.settings.inbox_drain_seconds, "before backfill")
    parts.checkpoint(None, 0, None)
    _backfill_phase(summary, previous, parts, since)
    if not dry_run and parts.gateway.configured:
        _resume_refunds(summary, parts)
    _drain_inbox(summary, parts.applier, parts.settings.inbox_drain_seconds, "before detection")
    parts.checkpoint(None, 0, None)
    found = _detection_phase(summary, previous, parts)
    if summary.mode == "auto":
        _automatic_refunds(summary, parts, found)
    parts.checkpoint(None, 0, None)
    if not dry_run:
        _send_alerts(summary, parts.session_factory, parts.alerter)


def _backfill_phase(summary: RunSummary, previous: ReconciliationRun | None, parts: _PassParts, since: datetime | None) -> None:
    """Read from Stripe what webhooks may have missed. Every listing starts from the
    oldest watermark minus the overlap; while only some listings have one (the others
    never completed), from where the previous pass started."""
    settings, gateway = parts.settings, parts.gateway
    watermarks = _previous_watermarks(previous)
    start = backfill_start(watermarks, OVERLAP_SECONDS)
    if since is not None:
        backfill_from = int(since.timestamp())
    elif start is not None:
        backfill_from = start
    elif watermarks and previous is not None and previous.backfill_from is not None:
        backfill_from = min([previous.backfill_from, *(w - OVERLAP_SECONDS for w in watermarks.values())])
    else:
        backfill_from = int(parts.clock()) - settings.backfill_days * 86400
    summary.backfill_from = backfill_from
    summary.watermarks = dict(watermarks)
    summary.watermark = oldest_watermark(watermarks)
    if not gateway.configured:
        message = "backfill skipped: STRIPE_API_KEY is not set; detection ran on what webhooks delivered"
        log.warning(message)
        summary.warnings.append(message)
        return
    try:
        result: BackfillSummary = backfill(
            parts.session_factory, gateway, parts.inbox, since=backfill_from, applier=parts.applier,
            clock=parts.clock, progress=lambda kind, count: parts.checkpoint(f"backfill {kind}", count, None),
            watermarks=watermarks,
        )
    except BackfillStopped as exc:
        result = exc.summary
        summary.errors.append(f"backfill stopped: {exc}; the listings it did not complete keep their watermarks")
    except GatewayError as exc:
        result = BackfillSummary(watermarks=dict(watermarks), watermark=summary.watermark)
        summary.errors.append(f"backfill stopped: {exc}; the watermarks stay where they were")
    summary.backfill = asdict(result)
    summary.watermarks = dict(result.watermarks)
    summary.watermark = result.watermark


def _resume_refunds(summary: RunSummary, parts: _PassParts) -> None:
    """Refunds a crash or an outage left unfinished, carried on under their own keys."""
    with parts.session_factory() as session:
        unfinished = pending_refund_cases(session)
    for case_id in unfinished:
        parts.checkpoint("resumed refunds", 0, len(unfinished))
        _collect(summary, parts.refunds.execute_case(case_id).outcomes)
        parts.checkpoint("resumed refunds", 1, len(unfinished))


def _detection_phase(summary: RunSummary, previous: ReconciliationRun | None, parts: _PassParts) -> DetectionSummary:
    """Orders holding more than they should, and charges that name no order."""
    settings, dry_run = parts.settings, summary.mode == "dry-run"
    touched_since = None if summary.full or previous is None else previous.started_at
    if touched_since is not None and previous is not None and not (previous.counts or {}).get("inbox_drained", True):
        touched_since -= TOUCHED_MARGIN
    found: DetectionSummary = detect(
        parts.session_factory,
        window_seconds=settings.duplicate_window_hours * 3600,
        auto_refund_unknown_total=settings.auto_refund_unknown_total,
        touched_since=touched_since,
        dry_run=dry_run,
        run_id=summary.run_id,
        progress=lambda count, total: parts.checkpoint("detection", count, total),
    )
    # Charges that name no order: a review-only signal, counted apart (never refunded).
    unlinked = detect_unlinked(
        parts.session_factory,
        window_seconds=settings.unlinked_window_minutes * 60,
        touched_since=touched_since,
        dry_run=dry_run,
        run_id=summary.run_id,
    )
    found.merge(unlinked)
    summary.detection = asdict(found)
    if found.orders_failed:
        summary.errors.append(
            f"detection could not assess {len(found.orders_failed)} order(s), see the log: "
            + ", ".join(found.orders_failed[:20])
        )
    return found


def _automatic_refunds(summary: RunSummary, parts: _PassParts, found: DetectionSummary) -> None:
    """Auto mode: refund the cases the rule marked automatic, each through the phased path."""
    if not parts.gateway.configured:
        summary.errors.append("auto mode: no STRIPE_API_KEY, so no refund was issued")
        return
    automatic = found.automatic_open_cases
    for case_id in automatic:
        parts.checkpoint("refunds", 0, len(automatic))
        try:
            parts.refunds.approve(case_id, origin="auto", actor="reconciler")
        except RefundRefused as exc:
            summary.errors.append(f"case {case_id}: {exc.message}")
            parts.checkpoint("refunds", 1, len(automatic))
            continue
        _collect(summary, parts.refunds.execute_case(case_id).outcomes)
        parts.checkpoint("refunds", 1, len(automatic))


def _collect(summary: RunSummary, outcomes: Any) -> None:
    for outcome in outcomes:
        summary.refunds.append(asdict(outcome))
        if outcome.result == "deferred":
            summary.errors.append(f"refund {outcome.attempt_key} left for the next run: {outcome.message}")


def _send_alerts(summary: RunSummary, session_factory: sessionmaker[Session], alerter: Alerter) -> None:
    with session_factory() as session:
        alerts = pending_alerts(session)
        opened = summary.detection.get("cases_opened", [])
        cases = list(session.scalars(select(DuplicateCase).where(DuplicateCase.id.in_(opened)))) if opened else []
        unlinked_ids = summary.detection.get("unlinked_opened", [])
        unlinked = (
            list(session.scalars(select(DuplicateCase).where(DuplicateCase.id.in_(unlinked_ids)).order_by(DuplicateCase.id)))
            if unlinked_ids
            else []
        )
        unlinked_charges = {case.id: [cc.charge_id for cc in case.charges] for case in unlinked}
    counts = summary.counts()
    if cases or summary.refunds or summary.errors or unlinked:
        lines = [
            f"Reconciliation run {summary.run_id} ({summary.mode}): {counts['cases_opened']} case(s) opened, "
            f"{counts['refunds_issued']} refund(s) issued {_amounts(counts['refunded_amounts'])}, "
            f"{counts['refunds_failed']} failed, {counts['refunds_deferred']} left for the next run."
        ]
        for case in cases:
            excess = _amounts(case.excess)
            verdict = "refunded automatically" if case.status in (CaseStatus.REFUNDING, CaseStatus.REFUNDED) else "needs review"
            lines.append(f"- case {case.id}, order {case.order_id}: holds {excess} too much; {verdict}")
        if unlinked:
            # Apart, after the real cases, and summed up: they must not drown them.
            lines.append(
                f"Possible duplicates with no order (review only, never refunded automatically): "
                f"{len(unlinked)} case(s) opened, {_amounts(_sum_excess(unlinked))} in repeated charges."
            )
            lines += [f"- case {case.id}: {', '.join(unlinked_charges[case.id])}" for case in unlinked[:10]]
            if len(unlinked) > 10:
                lines.append(f"- ... and {len(unlinked) - 10} more on the review page")
        lines += [f"- error: {e}" for e in summary.errors]
        subject = (
            f"Reconciliation run {summary.run_id}: duplicates found or errors"
            if cases or summary.refunds or summary.errors
            else f"Reconciliation run {summary.run_id}: possible duplicates with no order (review only)"
        )
        alerts.insert(0, Alert(f"run:{summary.run_id}", subject, "\n".join(lines)))
    for alert in alerts:
        try:
            if alerter.send(alert):
                summary.alerts_sent += 1
        except Exception as exc:  # the alert store itself failing must not fail the pass
            log.exception("alert not sent")
            summary.errors.append(f"alert {alert.key} not sent: {exc}")


def _sum_excess(cases: list[DuplicateCase]) -> dict[str, int]:
    total: dict[str, int] = {}
    for case in cases:
        for currency, amount in (case.excess or {}).items():
            total[currency] = total.get(currency, 0) + amount
    return total


def _amounts(amounts: dict[str, int]) -> str:
    from models.money import format_amount

    return ", ".join(format_amount(v, c) for c, v in sorted(amounts.items())) or "0"


def _previous_run(session_factory: sessionmaker[Session]) -> ReconciliationRun | None:
    """The last pass that finished (with or without errors): where this one starts."""
    with session_factory() as session:
        return session.scalars(
            select(ReconciliationRun)
            .where(ReconciliationRun.status.in_(("succeeded", "partial")), ReconciliationRun.mode != "dry-run")
            .order_by(ReconciliationRun.id.desc())
            .limit(1)
        ).first()


def _previous_watermarks(previous: ReconciliationRun | None) -> dict[str, int]:
    """The previous pass's watermarks by listing. A run recorded before per-listing
    watermarks has only ``watermark``: it stands for every listing."""
    if previous is None:
        return {}
    if previous.watermarks is not None:
        return {k: v for k, v in previous.watermarks.items() if k in LISTINGS and isinstance(v, int)}
    if previous.watermark is not None:
        return dict.fromkeys(LISTINGS, previous.watermark)
    return {}


def _start_run(session_factory: sessionmaker[Session], mode: str, full: bool, trigger: str) -> tuple[int, list[int]]:
    """Record this run, and mark ``aborted`` every run still ``running``: called under the
    pass lock, so no other pass can be running, and such a run's process died before it
    could say how it ended. Returns this run's id and the ids marked."""

    def start(session: Session) -> tuple[int, list[int]]:
        orphans = list(
            session.scalars(
                select(ReconciliationRun).where(ReconciliationRun.status == "running").with_for_update()
            )
        )
        now = datetime.now(timezone.utc)
        for orphan in orphans:
            orphan.status = "aborted"
            orphan.finished_at = now
            orphan.errors = [*(orphan.errors or []), "aborted: its process stopped without finishing the pass (found by the next pass)"][:100]
        run = ReconciliationRun(mode=mode, full=full, trigger=trigger, status="running", host=holder_name(), counts={}, errors=[])
        session.add(run)
        session.flush()
        return run.id, [o.id for o in orphans]

    return run_in_transaction(session_factory, start)


def _finish_run(session_factory: sessionmaker[Session], summary: RunSummary) -> None:
    def finish(session: Session) -> None:
        run = session.get(ReconciliationRun, summary.run_id, with_for_update=True)
        assert run is not None
        run.status = summary.status
        run.finished_at = datetime.now(timezone.utc)
        run.backfill_from = summary.backfill_from
        # A dry run reads but does not move the watermark of the real passes.
        run.watermark = summary.watermark
        run.watermarks = dict(summary.watermarks) or None
        run.counts = summary.counts()
        run.errors = (summary.errors + [f"warning: {w}" for w in summary.warnings])[:100]

    run_in_transaction(session_factory, finish)


def _drain_inbox(summary: RunSummary, applier: Applier, seconds: int, when: str) -> None:
    """Apply what the inbox holds (beside any running applier), for at most ``seconds``;
    what is left unapplied is reported as a warning."""
    outcome = applier.drain(timeout=seconds)
    summary.inbox["applied"] = summary.inbox.get("applied", 0) + outcome.applied
    summary.inbox["failed"] = summary.inbox.get("failed", 0) + outcome.failed
    summary.inbox["pending"] = outcome.pending
    summary.inbox["timed_out"] = int(outcome.timed_out)
    if outcome.pending and when == "before detection":
        message = (
            f"{outcome.pending} event(s) not applied yet ({'the wait ran out' if outcome.timed_out else 'failing, in backoff'}); "
            "detection ran without them, the next pass looks again"
        )
        log.warning(message)
        summary.warnings.append(message)
