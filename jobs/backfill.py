"""Backfill: what the webhooks missed, read from the Stripe API and applied through the
same idempotent upserts as webhooks.

* Charges, refunds, disputes and Checkout Sessions created since ``since`` (Stripe ``created``), every page
  to the end. An object read from the API counts as of the second taken just *before* the
  request that read it (for a listing: before the request of its page), so it never loses
  to an older event, and an event created in the same second as the read or later (it may
  carry newer state) still wins over it.
* A charge that names no order is linked through its PaymentIntent, read once from the
  API (on the charge's connected account, if any) when we do not know it yet.
* Where the Events API answers, events Stripe failed to deliver (``delivery_success=false``)
  are stored and applied exactly like a webhook delivery (dedup by event id).

Watermarks: one per listing (:data:`LISTINGS`), each a Stripe ``created``, never a host
clock. A listing moves its own watermark only when it completes, to the newest of

* its previous watermark,
* the newest ``created`` it listed,
* the newest ``created`` known to exist before it started (any watermark of the previous
  pass, anything an earlier listing of this pass listed): Stripe had created that object
  before the listing began, so the listing covered its own kind up to there as well. This
  is what keeps a quiet listing (no disputes for months, no undelivered events) from
  holding every other listing's start back.

A listing that raised keeps its previous watermark, so a slow or failing listing never
moves past objects it did not list; :class:`BackfillStopped` carries the watermarks of
the listings that did complete. The next pass starts every listing from the oldest
watermark minus an overlap (:func:`backfill_start`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from domain.stripe.gateway import GatewayError, Listing, StripeGateway, StripeNotFound
from domain import ledger
from domain.ledger.applier import Applier
from domain.ledger.envelope import EnvelopeError
from domain.ledger.inbox import Inbox
from domain.stripe.shapes import (
    ShapeError,
    charge_snapshot,
    dispute_snapshot,
    payment_intent_snapshot,
    refund_snapshot,
)
from models import Charge, PaymentIntent, Refund, run_in_transaction

log = logging.getLogger(__name__)

PAGE = 100
Progress = Callable[[str, int], None]

# The listings that carry a watermark, in the order a pass reads them.
LISTINGS = ("charges", "refunds", "disputes", "checkout_sessions", "events")


@dataclass
class BackfillSummary:
    charges: int = 0
    refunds: int = 0
    disputes: int = 0
    checkout_sessions: int = 0
    payment_intents: int = 0
    events: int = 0
    events_applied: int = 0
    skipped_objects: int = 0
    refunds_rechecked: int = 0
    # The oldest of ``watermarks`` (what a single-watermark reader should start from).
    watermark: int | None = None
    # Listing -> newest Stripe ``created`` it has covered (see the module docstring).
    watermarks: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class BackfillStopped(GatewayError):
    """Stripe could not be read part way through. ``summary`` holds what was applied and
    the watermarks: advanced for the listings that completed, as they were for the rest."""

    def __init__(self, cause: GatewayError, summary: BackfillSummary) -> None:
        super().__init__(str(cause), code=cause.code, http_status=cause.http_status)
        self.retryable = cause.retryable
        self.summary = summary


def oldest_watermark(watermarks: Mapping[str, int]) -> int | None:
    return min(watermarks.values(), default=None)


def backfill_start(watermarks: Mapping[str, int], overlap: int) -> int | None:
    """Where the next pass starts every listing: the oldest watermark minus ``overlap``;
    ``None`` while some listing has none (it never completed)."""
    if any(listing not in watermarks for listing in LISTINGS):
        return None
    return min(watermarks[listing] for listing in LISTINGS) - overlap


def backfill(
    session_factory: sessionmaker[Session],
    gateway: StripeGateway,
    inbox: Inbox,
    *,
    since: int,
    applier: Applier | None = None,
    clock: Callable[[], float] = time.time,
    progress: Progress | None = None,
    watermarks: Mapping[str, int] | None = None,
) -> BackfillSummary:
    """Apply everything Stripe created since ``since``, moving ``watermarks`` (the previous
    pass's, by listing) for each listing that completes. Raises :class:`BackfillStopped`
    when Stripe cannot be read (the caller records its watermarks and goes on to
    detection). The gateway paces and retries every request, each page of a listing
    included; ``clock`` stamps what is read."""
    summary = BackfillSummary(watermarks={k: v for k, v in (watermarks or {}).items() if k in LISTINGS})
    summary.watermark = oldest_watermark(summary.watermarks)
    # The newest Stripe ``created`` known to exist before the next listing starts.
    known: int | None = max(summary.watermarks.values(), default=None)
    newest: dict[str, int] = {}

    def seen(listing: str, created: Any) -> None:
        if isinstance(created, int) and not isinstance(created, bool) and created > newest.get(listing, created - 1):
            newest[listing] = created

    def completed(listing: str) -> None:
        nonlocal known
        candidates = [v for v in (summary.watermarks.get(listing), newest.get(listing), known) if v is not None]
        if candidates:
            summary.watermarks[listing] = max(candidates)
        summary.watermark = oldest_watermark(summary.watermarks)
        if listing in newest and (known is None or newest[listing] > known):
            known = newest[listing]

    def apply_listing(
        kind: str,
        listing: Listing,
        apply_one: Callable[..., Any],
        read: Callable[[Any], Any] | None = None,
    ) -> None:
        """Apply a listing page by page, one transaction a page, counting as it goes (a
        listing that stops half way still reports what it applied); an object whose shape
        we cannot read is logged and skipped, never a reason to stop the backfill. Each
        page counts as of the second taken just before the request that read it."""
        for as_of, page in listing.pages(clock):
            readable: list[Any] = []
            for obj in page:
                try:
                    readable.append((read or _SNAPSHOTS[kind])(obj))
                except ShapeError as exc:
                    log.warning("%s from the API skipped: %s", kind, exc, extra={"object_id": obj.get("id")})
                    summary.skipped_objects += 1

            def apply_page(session: Session, readable: list[Any] = readable, as_of: int = as_of) -> None:
                for snapshot in readable:
                    apply_one(session, snapshot, as_of=as_of, account=None)

            run_in_transaction(session_factory, apply_page)
            setattr(summary, f"{kind}s", getattr(summary, f"{kind}s") + len(readable))
            for obj in page:
                seen(f"{kind}s", obj.get("created"))
            if progress:
                progress(f"{kind}s", len(page))

    def replay_events() -> None:
        for _, page in gateway.list_undelivered_events(created_gte=since, page_size=PAGE).pages(clock):
            for event in page:
                try:
                    accepted = inbox.store(json.dumps(event).encode("utf-8"))
                except EnvelopeError as exc:
                    log.warning("event from the API skipped: %s", exc.message, extra={"object_id": event.get("id")})
                    summary.skipped_objects += 1
                    continue
                summary.events += 1
                if accepted.status == "received":
                    summary.events_applied += 1
                seen("events", event.get("created"))
            if applier is not None:
                applier.drain()  # what the page stored, applied before the listings go on
            if progress:
                progress("events", len(page))

    try:
        apply_listing("charge", gateway.list_charges(created_gte=since, page_size=PAGE), ledger.apply_charge)
        completed("charges")
        summary.payment_intents = _link_through_payment_intents(session_factory, gateway, clock)
        summary.refunds_rechecked = _recheck_unsettled_refunds(session_factory, gateway, clock)
        apply_listing("refund", gateway.list_refunds(created_gte=since, page_size=PAGE), ledger.apply_refund)
        completed("refunds")
        try:
            apply_listing("dispute", gateway.list_disputes(created_gte=since, page_size=PAGE), ledger.apply_dispute)
        except StripeNotFound:
            summary.notes.append("the disputes API is not available here; disputes come from webhooks only")
        completed("disputes")  # an API that is not there has nothing left to list
        try:
            # Read with the same linking settings as the webhooks.
            apply_listing(
                "checkout_session",
                gateway.list_checkout_sessions(created_gte=since, page_size=PAGE),
                ledger.apply_checkout_session,
                inbox.checkout_linking.snapshot,
            )
        except StripeNotFound:
            summary.notes.append("the Checkout Sessions API is not available here; sessions come from webhooks only")
        completed("checkout_sessions")
        try:
            replay_events()
        except StripeNotFound:
            summary.notes.append("the Events API is not available here; undelivered events not replayed")
        completed("events")
    except GatewayError as exc:
        raise BackfillStopped(exc, summary) from exc
    return summary


_SNAPSHOTS = {"charge": charge_snapshot, "refund": refund_snapshot, "dispute": dispute_snapshot}


def _recheck_unsettled_refunds(
    session_factory: sessionmaker[Session], gateway: StripeGateway, clock: Callable[[], float]
) -> int:
    """Read again every refund the ledger holds as ``pending`` or ``requires_action``.

    Listings select by creation time, so a refund created before the watermark that later
    fails or is canceled would be known only from its webhook; while it is unsettled the
    order is not known to have reached its total, so every pass asks Stripe. A refund
    that cannot be read is logged and left for the next pass."""
    with session_factory() as session:
        unsettled = session.execute(
            select(Refund.id, Refund.account).where(Refund.status.in_(("pending", "requires_action"))).order_by(Refund.id)
        ).all()
    rechecked = 0
    for refund_id, account in unsettled:
        as_of = int(clock())  # before the read: an event of the same second still applies
        try:
            snapshot = refund_snapshot(gateway.retrieve_refund(refund_id, account=account))
        except StripeNotFound:
            continue
        except (GatewayError, ShapeError) as exc:
            log.warning("refund not re-read: %s", exc, extra={"refund_id": refund_id})
            continue
        run_in_transaction(
            session_factory,
            lambda session, snapshot=snapshot, as_of=as_of, account=account: ledger.apply_refund(
                session, snapshot, as_of=as_of, account=account
            ),
        )
        rechecked += 1
    return rechecked


def _link_through_payment_intents(
    session_factory: sessionmaker[Session], gateway: StripeGateway, clock: Callable[[], float]
) -> int:
    """Read the PaymentIntents of charges that name no order and whose PaymentIntent we do
    not know: their metadata may name the order (late linking does the rest). A charge on a
    connected account has its PaymentIntent there: it is read with that account."""
    with session_factory() as session:
        unknown = list(
            session.execute(
                select(Charge.payment_intent_id, func.max(Charge.account))
                .where(
                    Charge.order_id.is_(None),
                    Charge.payment_intent_id.is_not(None),
                    Charge.payment_intent_id.not_in(select(PaymentIntent.id)),
                )
                .group_by(Charge.payment_intent_id)
                .order_by(Charge.payment_intent_id)
            )
        )
    applied = 0
    for payment_intent_id, account in unknown:
        as_of = int(clock())  # before the read: an event of the same second may be newer
        try:
            obj = gateway.retrieve_payment_intent(payment_intent_id, account=account)
        except StripeNotFound:
            continue
        except GatewayError as exc:
            log.warning("PaymentIntent not read: %s", exc, extra={"payment_intent_id": payment_intent_id})
            continue
        try:
            snapshot = payment_intent_snapshot(obj)
        except ShapeError as exc:
            log.warning("PaymentIntent skipped: %s", exc, extra={"payment_intent_id": payment_intent_id})
            continue
        run_in_transaction(
            session_factory,
            lambda session: ledger.apply_payment_intent(session, snapshot, as_of=as_of, account=account),
        )
        applied += 1
    return applied
