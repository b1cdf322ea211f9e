"""The ledger's write rules: idempotent, order-independent upserts of Stripe objects.

Every function here runs inside the caller's transaction and is safe to call any number
of times with the same snapshot, from any path (webhook, backfill, our own API calls), in
any order, concurrently with the others:

* Each object is inserted by Stripe's id if new (``INSERT ... ON CONFLICT DO NOTHING``)
  and then locked (``SELECT ... FOR UPDATE``) before it is changed.
* ``as_of`` is the Stripe ``created`` of the event carrying the snapshot (or the time an
  object was read from the API). A snapshot older than the one applied last never
  overwrites it. Stripe timestamps have one-second resolution, so ties are normal: on a
  tie, state only moves forward (a ``succeeded`` charge never goes back to ``pending``, a
  ``failed`` refund never comes back).
* Links only ever go from unknown to known; a conflicting link is logged, never applied.

Lock order, to keep deadlocks rare (they are retried when they happen): PaymentIntent key,
then PaymentIntent/refund/dispute rows, then charges, then orders.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from domain.cases import lifecycle
from domain.cases.lifecycle import CaseAction
from domain.ledger.positions import INACTIVE_REFUND_STATUSES, charge_positions, order_status
from domain.stripe.shapes import (
    ChargeSnapshot,
    CheckoutSessionSnapshot,
    DisputeSnapshot,
    PaymentIntentSnapshot,
    RefundSnapshot,
)
from models import Charge, CheckoutSession, Dispute, DuplicateCase, Order, PaymentIntent, Refund, RefundAttempt
from models.db import insert_ignore, lock_key

log = logging.getLogger(__name__)

# Our refunds carry this metadata key (the attempt's idempotency key), so a refund reported
# by a webhook or backfill before our own call returns is matched to its attempt.
ATTEMPT_METADATA_KEY = "reconciler_attempt"

_CHARGE_RANK = {"pending": 0, "succeeded": 1, "failed": 1}
_REFUND_RANK = {"pending": 0, "requires_action": 1, "succeeded": 2, "failed": 3, "canceled": 3}
_DISPUTE_RANK = {
    "warning_needs_response": 0,
    "needs_response": 0,
    "warning_under_review": 1,
    "under_review": 1,
    "warning_closed": 2,
    "won": 2,
    "lost": 2,
    "prevented": 2,
}
_CHECKOUT_STATUS_RANK = {"open": 0, "complete": 1, "expired": 1}
_CHECKOUT_PAYMENT_RANK = {"unpaid": 0, "paid": 1, "no_payment_required": 1}
_PAYMENT_INTENT_RANK = {
    "requires_payment_method": 0,
    "requires_confirmation": 0,
    "requires_action": 0,
    "processing": 1,
    "requires_capture": 2,
    "canceled": 3,
    "succeeded": 3,
}


# -- upserts -------------------------------------------------------------------------------


def apply_charge(
    session: Session,
    snapshot: ChargeSnapshot,
    *,
    as_of: int,
    account: str | None,
    order_hint: str | None = None,
) -> Charge:
    """Upsert a charge, link it to its order, and apply the refunds it embeds.

    ``order_hint`` is the order of the PaymentIntent that carried this charge, if any.
    """
    if snapshot.payment_intent_id:
        lock_key(session, "payment_intent", snapshot.payment_intent_id)
    inserted = insert_ignore(session, Charge, charge_row(snapshot, as_of=as_of, account=account))
    charge = _locked(session, Charge, snapshot.id)
    if not inserted:
        _merge_charge(charge, snapshot, as_of)
    charge.payment_intent_id = charge.payment_intent_id or snapshot.payment_intent_id
    charge.customer = charge.customer or snapshot.customer_id
    charge.account = charge.account or account
    charge.card_brand = charge.card_brand or snapshot.card_brand
    charge.card_last4 = charge.card_last4 or snapshot.card_last4
    charge.card_fingerprint = charge.card_fingerprint or snapshot.card_fingerprint
    charge.description = charge.description or snapshot.description

    order_id = snapshot.order_id or order_hint or _order_of_payment_intent(session, charge.payment_intent_id)
    if order_id:
        _link_charge(session, charge, order_id)
    for refund in snapshot.refunds or ():
        apply_refund(session, refund, as_of=as_of, account=account, refresh=False)
    if charge.order_id:
        refresh_order(session, charge.order_id)
    return charge


def charge_row(snapshot: ChargeSnapshot, *, as_of: int, account: str | None) -> dict[str, Any]:
    """The columns of a charge first seen in ``snapshot`` (both insert paths use it)."""
    return {
        "id": snapshot.id,
        "payment_intent_id": snapshot.payment_intent_id,
        "customer": snapshot.customer_id,
        "account": account,
        "livemode": snapshot.livemode,
        "amount": snapshot.amount,
        "amount_captured": snapshot.amount_captured,
        "currency": snapshot.currency,
        "status": snapshot.status,
        "captured": snapshot.captured,
        "reported_refunded": snapshot.amount_refunded,
        "released": released_by_snapshot(snapshot),
        "created": snapshot.created,
        "card_brand": snapshot.card_brand,
        "card_last4": snapshot.card_last4,
        "card_fingerprint": snapshot.card_fingerprint,
        "description": snapshot.description,
        "last_event_created": as_of,
    }


def released_by_snapshot(snapshot: ChargeSnapshot) -> bool:
    """Before API version 2025-03-31 a released (canceled or expired) authorisation shows
    its whole amount as refunded; from then on nothing on the charge says so (the
    PaymentIntent's cancellation or ``charge.expired`` does, see :func:`release_charges`)."""
    return snapshot.status == "succeeded" and not snapshot.captured and snapshot.amount_refunded >= snapshot.amount > 0


def release_charges(session: Session, *, charge_id: str | None = None, payment_intent_id: str | None = None) -> list[str]:
    """Mark uncaptured authorisations released (the charge, or every uncaptured charge of
    the PaymentIntent). Returns the charges newly released. Release never goes back."""
    where: list[ColumnElement[bool]] = [Charge.captured.is_(False), Charge.released.is_(False)]
    if charge_id is not None:
        where.append(Charge.id == charge_id)
    elif payment_intent_id is not None:
        where.append(Charge.payment_intent_id == payment_intent_id)
    else:
        return []
    return list(session.execute(update(Charge).where(*where).values(released=True).returning(Charge.id)).scalars())


def _merge_charge(charge: Charge, snapshot: ChargeSnapshot, as_of: int) -> None:
    # Whatever the snapshot's age: a release, once seen, is final.
    charge.released = charge.released or released_by_snapshot(snapshot)
    if as_of < charge.last_event_created:
        log.info("older charge snapshot skipped", extra={"charge_id": charge.id, "as_of": as_of})
        return
    tie = as_of == charge.last_event_created
    # A charge's status moves once, from pending to succeeded or failed, and never back.
    if charge.status == "pending" and _CHARGE_RANK[snapshot.status] > 0:
        charge.status = snapshot.status
    if tie:
        charge.captured = charge.captured or snapshot.captured
        charge.amount_captured = max(charge.amount_captured, snapshot.amount_captured)
        charge.reported_refunded = max(charge.reported_refunded, snapshot.amount_refunded)
    else:
        charge.captured = charge.captured or snapshot.captured
        charge.amount_captured = snapshot.amount_captured if snapshot.captured else charge.amount_captured
        charge.reported_refunded = snapshot.amount_refunded
    charge.last_event_created = as_of


def _link_charge(session: Session, charge: Charge, order_id: str) -> None:
    if charge.order_id == order_id:
        return
    if charge.order_id is not None:
        log.warning(
            "charge names a different order than it is linked to; keeping the first link",
            extra={"charge_id": charge.id, "order_id": charge.order_id, "other_order_id": order_id},
        )
        return
    ensure_order(session, order_id)
    # Lock the order before the link: the FK takes a key-share lock on it, and upgrading
    # that to FOR UPDATE in refresh_order deadlocks two charges of the same order.
    _locked(session, Order, order_id)
    charge.order_id = order_id


def apply_refund(
    session: Session,
    snapshot: RefundSnapshot,
    *,
    as_of: int,
    account: str | None,
    refresh: bool = True,
) -> Refund:
    """Upsert a refund by its id. Its charge need not be known yet."""
    inserted = insert_ignore(
        session,
        Refund,
        {
            "id": snapshot.id,
            "charge_id": snapshot.charge_id,
            "payment_intent_id": snapshot.payment_intent_id,
            "account": account,
            "amount": snapshot.amount,
            "currency": snapshot.currency,
            "status": snapshot.status,
            "reason": snapshot.reason,
            "failure_reason": snapshot.failure_reason,
            "created": snapshot.created,
            "last_event_created": as_of,
        },
    )
    refund = _locked(session, Refund, snapshot.id)
    if not inserted and as_of >= refund.last_event_created:
        tie = as_of == refund.last_event_created
        # failed and canceled are final; otherwise the newer snapshot wins, and on a tie
        # the status further along wins.
        if refund.status not in INACTIVE_REFUND_STATUSES and (
            not tie or _REFUND_RANK[snapshot.status] > _REFUND_RANK[refund.status]
        ):
            refund.status = snapshot.status
            refund.failure_reason = snapshot.failure_reason or refund.failure_reason
        refund.reason = snapshot.reason or refund.reason
        refund.last_event_created = as_of
    refund.charge_id = refund.charge_id or snapshot.charge_id
    refund.payment_intent_id = refund.payment_intent_id or snapshot.payment_intent_id
    settle_refund_attempt(session, refund, snapshot.metadata.get(ATTEMPT_METADATA_KEY))
    if refresh:
        _refresh_order_of_charge(session, refund.charge_id)
    return refund


def settle_refund_attempt(session: Session, refund: Refund, attempt_key: str | None) -> None:
    """Tie a refund to the attempt of ours that asked for it, from whichever path reports
    it first (our own call, its webhook, backfill): by refund id, else by the attempt key
    we put in the refund's metadata. The money is counted from the refund row alone, so a
    refund reported twice is still counted once.

    A refund of ours that fails or is canceled (at once, or days later) fails its attempt
    and puts its case in ``failed`` for finance; the alert goes out with the next pass.
    """
    attempt = session.scalar(
        select(RefundAttempt).where(RefundAttempt.refund_id == refund.id).with_for_update()
    )
    if attempt is None and attempt_key:
        attempt = session.scalar(
            select(RefundAttempt)
            .where(RefundAttempt.idempotency_key == attempt_key, RefundAttempt.refund_id.is_(None))
            .with_for_update()
        )
    if attempt is None:
        return
    attempt.refund_id = refund.id
    refund.origin = attempt.origin
    if refund.status in INACTIVE_REFUND_STATUSES:
        if attempt.status != "failed":
            attempt.status = "failed"
            attempt.error = f"refund {refund.id} {refund.status}" + (
                f" ({refund.failure_reason})" if refund.failure_reason else ""
            )
            if attempt.case_id is not None:
                _case_refund_failed(session, attempt, refund)
    elif attempt.status == "recorded":
        attempt.status = "succeeded"


def _case_refund_failed(session: Session, attempt: RefundAttempt, refund: Refund) -> None:
    """A refund of ours failed or was canceled: the money is back on the charge, so the
    case goes back to a person (``failed``). If the order has meanwhile gained another
    active case, that case takes the news (merged) and the old one keeps its status, so
    the one-active-case-per-order rule holds and the event still applies."""
    case = session.execute(
        select(DuplicateCase).where(DuplicateCase.id == attempt.case_id).with_for_update()
    ).scalar_one()
    details = {"refund_id": refund.id, "charge_id": refund.charge_id, "amount": refund.amount, "currency": refund.currency, "attempt": attempt.idempotency_key}
    reason = attempt.error
    if case.status in ("refunding", "failed"):
        lifecycle.change(session, case, CaseAction.REFUND_FAILED, actor="stripe", reason=reason, details=details)
        return
    active = session.execute(
        select(DuplicateCase)
        .where(
            DuplicateCase.order_id == case.order_id,
            DuplicateCase.id != case.id,
            DuplicateCase.status.in_(("open", "refunding", "failed")),
        )
        .with_for_update()
    ).scalar_one_or_none()
    if case.status == "refunded" and active is None:
        lifecycle.change(session, case, CaseAction.REFUND_FAILED, actor="stripe", reason=reason, details=details)
        return
    # Open or dismissed (a person has it), or another case is active: record it on both.
    lifecycle.change(session, case, CaseAction.MERGE, actor="stripe", reason=reason, details={**details, "into_case": active.id if active else None})
    if active is not None:
        lifecycle.change(
            session, active, CaseAction.MERGE, actor="stripe",
            reason=f"a refund of case {case.id} failed: {reason}", details={**details, "from_case": case.id},
        )


def apply_dispute(
    session: Session, snapshot: DisputeSnapshot, *, as_of: int, account: str | None
) -> Dispute:
    """Upsert a dispute by its id. Its charge need not be known yet."""
    inserted = insert_ignore(
        session,
        Dispute,
        {
            "id": snapshot.id,
            "charge_id": snapshot.charge_id,
            "account": account,
            "amount": snapshot.amount,
            "currency": snapshot.currency,
            "status": snapshot.status,
            "reason": snapshot.reason,
            "created": snapshot.created,
            "last_event_created": as_of,
        },
    )
    dispute = _locked(session, Dispute, snapshot.id)
    if not inserted and as_of >= dispute.last_event_created:
        tie = as_of == dispute.last_event_created
        final = _DISPUTE_RANK[dispute.status] == 2
        if not final and (not tie or _DISPUTE_RANK[snapshot.status] > _DISPUTE_RANK[dispute.status]):
            dispute.status = snapshot.status
        dispute.amount = snapshot.amount
        dispute.last_event_created = as_of
    dispute.charge_id = dispute.charge_id or snapshot.charge_id
    _refresh_order_of_charge(session, dispute.charge_id)
    return dispute


def apply_payment_intent(
    session: Session, snapshot: PaymentIntentSnapshot, *, as_of: int, account: str | None
) -> PaymentIntent:
    """Upsert a PaymentIntent, apply the charges it carries, and link every charge of it
    that arrived before we knew its order (late linking). A succeeded PaymentIntent marks
    its order paid; the pay endpoint's attempt for it follows its status."""
    lock_key(session, "payment_intent", snapshot.id)
    inserted = insert_ignore(session, PaymentIntent, _payment_intent_row(snapshot, as_of=as_of, account=account))
    intent = _locked(session, PaymentIntent, snapshot.id)
    if not inserted:
        _merge_payment_intent(intent, snapshot, as_of)
    intent.customer = intent.customer or snapshot.customer_id
    intent.order_total = intent.order_total or snapshot.order_total
    _link_payment_intent_to_order(session, intent, snapshot.order_id)
    for charge in snapshot.charges:
        apply_charge(session, charge, as_of=as_of, account=account, order_hint=intent.order_id)
    if intent.order_id:
        _update_order_from_payment_intent(session, intent, intent.order_id)
    if intent.status == "canceled":
        # Canceling a PaymentIntent releases its uncaptured authorisation (from API version
        # 2025-03-31 without a Refund object or amount_refunded on the charge).
        release_charges(session, payment_intent_id=intent.id)
    _settle_payment_attempt(session, intent)
    return intent


def _payment_intent_row(snapshot: PaymentIntentSnapshot, *, as_of: int, account: str | None) -> dict[str, Any]:
    """The columns of a PaymentIntent first seen in ``snapshot``."""
    return {
        "id": snapshot.id,
        "account": account,
        "livemode": snapshot.livemode,
        "amount": snapshot.amount,
        "currency": snapshot.currency,
        "status": snapshot.status,
        "customer": snapshot.customer_id,
        "latest_charge_id": snapshot.latest_charge_id,
        "order_total": snapshot.order_total,
        "created": snapshot.created,
        "last_event_created": as_of,
    }


def _merge_payment_intent(intent: PaymentIntent, snapshot: PaymentIntentSnapshot, as_of: int) -> None:
    if as_of < intent.last_event_created:
        return
    tie = as_of == intent.last_event_created
    # canceled and succeeded are final; otherwise the newer snapshot wins, and on a tie
    # the status further along wins.
    final = _PAYMENT_INTENT_RANK[intent.status] == 3
    if not final and (
        not tie or _PAYMENT_INTENT_RANK[snapshot.status] > _PAYMENT_INTENT_RANK[intent.status]
    ):
        intent.status = snapshot.status
        intent.amount = snapshot.amount
    intent.latest_charge_id = snapshot.latest_charge_id or intent.latest_charge_id
    intent.last_event_created = as_of


def _link_payment_intent_to_order(session: Session, intent: PaymentIntent, order_id: str | None) -> None:
    """Link the PaymentIntent to the order its metadata names (``order_id``), else to the
    order its Checkout Session names; a link once made is kept."""
    if order_id and intent.order_id is None:
        ensure_order(session, order_id)  # before the link: autoflush + FK
        intent.order_id = order_id
    elif order_id and intent.order_id != order_id:
        log.warning(
            "PaymentIntent metadata names another order; keeping the first link",
            extra={"payment_intent_id": intent.id, "order_id": intent.order_id},
        )
    if intent.order_id is None:
        # Checkout: the order is named by the session, which may have come first.
        intent.order_id = _order_of_checkout_session(session, intent.id)


def _update_order_from_payment_intent(session: Session, intent: PaymentIntent, order_id: str) -> None:
    """Link the PaymentIntent's charges still without an order to ``order_id``, give the
    order the PaymentIntent's total (``metadata.order_total``) and id while it has none,
    and recompute its status: paid at the latest when the PaymentIntent succeeded."""
    _locked(session, Order, order_id)  # before the FK locks of the link below
    linked = _link_charges_late(session, intent.id, order_id)
    if linked:
        log.info(
            "charges linked late through their PaymentIntent",
            extra={"payment_intent_id": intent.id, "order_id": order_id, "charge_ids": linked},
        )
    order = _locked(session, Order, order_id)
    if order.amount is None and intent.order_total is not None:
        order.amount = intent.order_total
        order.currency = intent.currency
        order.amount_source = "metadata"
    if order.payment_intent_id is None:
        order.payment_intent_id = intent.id
    order = refresh_order(session, order_id)
    if intent.status == "succeeded" and order.status == "pending":
        # Current API versions name the charge only by id: until the charge's own
        # event arrives, the PaymentIntent's success is what says the order is paid.
        order.status = "paid"


def _link_charges_late(session: Session, payment_intent_id: str, order_id: str) -> Sequence[str]:
    """Late linking: link to ``order_id`` every charge of the PaymentIntent that arrived
    before we knew its order (a charge already linked keeps its link); returns the charges
    linked now. The caller locks the order first: the link's FK checks take a key-share
    lock on it, and taking the order's row lock only after them deadlocks two writers of
    the same order."""
    return session.execute(
        update(Charge)
        .where(Charge.payment_intent_id == payment_intent_id, Charge.order_id.is_(None))
        .values(order_id=order_id)
        .returning(Charge.id)
    ).scalars().all()


def apply_checkout_session(
    session: Session,
    snapshot: CheckoutSessionSnapshot,
    *,
    as_of: int,
    account: str | None,
    payment_failed: bool = False,
) -> CheckoutSession:
    """Upsert a Checkout Session and link its PaymentIntent, and every charge of it, to the
    order the session names, whichever of them Stripe reported first: a charge arriving
    later finds the order through the session (:func:`_order_of_payment_intent`), a
    session arriving later links the charges already held (late linking). The session's
    ``amount_total`` is the order's total while no other source gave one."""
    if snapshot.payment_intent_id:
        lock_key(session, "payment_intent", snapshot.payment_intent_id)
    inserted = insert_ignore(session, CheckoutSession, _checkout_session_row(snapshot, as_of=as_of, account=account))
    checkout = _locked(session, CheckoutSession, snapshot.id)
    if not inserted:
        _merge_checkout_session(checkout, snapshot, as_of)
    checkout.payment_intent_id = checkout.payment_intent_id or snapshot.payment_intent_id
    checkout.customer = checkout.customer or snapshot.customer_id
    checkout.client_reference_id = checkout.client_reference_id or snapshot.client_reference_id
    checkout.payment_link = checkout.payment_link or snapshot.payment_link_id
    checkout.expires_at = checkout.expires_at or snapshot.expires_at
    checkout.account = checkout.account or account
    # checkout.session.async_payment_failed: the session stays complete and unpaid; only
    # the event says the payment failed. Never goes back.
    checkout.payment_failed = checkout.payment_failed or payment_failed
    _link_checkout_session_to_order(session, checkout, snapshot.order_id)
    if checkout.order_id is None:
        return checkout
    _update_order_from_checkout_session(session, checkout, checkout.order_id)
    _settle_checkout_attempt(session, checkout)  # after the order's lock, as the checkout endpoint takes them
    return checkout


def _checkout_session_row(snapshot: CheckoutSessionSnapshot, *, as_of: int, account: str | None) -> dict[str, Any]:
    """The columns of a Checkout Session first seen in ``snapshot``."""
    return {
        "id": snapshot.id,
        "payment_intent_id": snapshot.payment_intent_id,
        "account": account,
        "livemode": snapshot.livemode,
        "mode": snapshot.mode,
        "status": snapshot.status,
        "payment_status": snapshot.payment_status,
        "payment_failed": False,
        "amount_total": snapshot.amount_total,
        "currency": snapshot.currency,
        "client_reference_id": snapshot.client_reference_id,
        "payment_link": snapshot.payment_link_id,
        "customer": snapshot.customer_id,
        "created": snapshot.created,
        "expires_at": snapshot.expires_at,
        "last_event_created": as_of,
    }


def _merge_checkout_session(checkout: CheckoutSession, snapshot: CheckoutSessionSnapshot, as_of: int) -> None:
    if as_of < checkout.last_event_created:
        log.info("older checkout session snapshot skipped", extra={"checkout_session_id": checkout.id, "as_of": as_of})
        return
    tie = as_of == checkout.last_event_created
    # complete and expired are final; a paid session stays paid. Otherwise the newer
    # snapshot wins, and on a tie only what moves forward.
    if _CHECKOUT_STATUS_RANK[checkout.status] == 0 and (
        not tie or _CHECKOUT_STATUS_RANK[snapshot.status] > 0
    ):
        checkout.status = snapshot.status
    if _CHECKOUT_PAYMENT_RANK[checkout.payment_status] == 0 and (
        not tie or _CHECKOUT_PAYMENT_RANK[snapshot.payment_status] > 0
    ):
        checkout.payment_status = snapshot.payment_status
    if checkout.amount_total is None or not tie:
        checkout.amount_total = snapshot.amount_total if snapshot.amount_total is not None else checkout.amount_total
        checkout.currency = snapshot.currency or checkout.currency
    checkout.last_event_created = as_of


def _link_checkout_session_to_order(session: Session, checkout: CheckoutSession, order_id: str | None) -> None:
    """Link the session to the order it names (``order_id``); a link once made is kept."""
    if order_id and checkout.order_id is None:
        ensure_order(session, order_id)  # before the link: autoflush + FK
        checkout.order_id = order_id
    elif order_id and checkout.order_id != order_id:
        log.warning(
            "checkout session names another order; keeping the first link",
            extra={"checkout_session_id": checkout.id, "order_id": checkout.order_id},
        )


def _update_order_from_checkout_session(session: Session, checkout: CheckoutSession, order_id: str) -> None:
    """Link the session's PaymentIntent and its charges still without an order to
    ``order_id``, give the order the session's ``amount_total`` (payment mode only) and
    PaymentIntent while it has none, and recompute its status."""
    intent_id = checkout.payment_intent_id
    if intent_id is not None:
        _link_payment_intent_of_checkout_session(session, checkout, intent_id, order_id)
    order = _locked(session, Order, order_id)  # before the FK locks of the link below
    if intent_id is not None:
        linked = _link_charges_late(session, intent_id, order_id)
        if linked:
            log.info(
                "charges linked late through their checkout session",
                extra={"checkout_session_id": checkout.id, "order_id": order_id, "charge_ids": linked},
            )
    if order.amount is None and checkout.amount_total is not None and checkout.currency is not None and checkout.mode == "payment":
        order.amount = checkout.amount_total
        order.currency = checkout.currency
        order.amount_source = "checkout"
    if order.payment_intent_id is None and intent_id is not None:
        order.payment_intent_id = intent_id
    refresh_order(session, order_id)


def _link_payment_intent_of_checkout_session(
    session: Session, checkout: CheckoutSession, intent_id: str, order_id: str
) -> None:
    """A PaymentIntent already held without an order takes the session's order; one
    linked to another order keeps its link. Not known yet: it finds the order through the
    session when it arrives (:func:`_link_payment_intent_to_order`)."""
    intent = session.execute(
        select(PaymentIntent).where(PaymentIntent.id == intent_id).with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if intent is not None and intent.order_id is None:
        intent.order_id = order_id
    elif intent is not None and intent.order_id != order_id:
        log.warning(
            "checkout session's PaymentIntent belongs to another order; keeping its link",
            extra={"checkout_session_id": checkout.id, "payment_intent_id": intent_id, "order_id": intent.order_id},
        )


def _settle_checkout_attempt(session: Session, checkout: CheckoutSession) -> None:
    """The checkout endpoint's attempt for this session follows it: ``expired`` (or a
    complete session whose async payment failed) frees the order for attempt ``n + 1``;
    ``complete`` ends it. An attempt already ended never comes back."""
    from models.payments import CHECKOUT_COMPLETE, CHECKOUT_EXPIRED, CHECKOUT_OPEN, CREATING, FAILED, UNKNOWN, CheckoutAttempt

    attempt = session.execute(
        select(CheckoutAttempt).where(CheckoutAttempt.session_id == checkout.id).with_for_update()
    ).scalar_one_or_none()
    if attempt is None or attempt.status not in (CREATING, UNKNOWN, CHECKOUT_OPEN, CHECKOUT_COMPLETE):
        return
    attempt.payment_status = checkout.payment_status
    if checkout.status == "expired":
        attempt.status = CHECKOUT_EXPIRED
    elif checkout.status == "complete" and checkout.payment_failed:
        attempt.status = FAILED
        attempt.error = f"the asynchronous payment of {checkout.id} failed"
    elif checkout.status == "complete":
        attempt.status = CHECKOUT_COMPLETE


def _settle_payment_attempt(session: Session, intent: PaymentIntent) -> None:
    """The pay endpoint's attempt for this PaymentIntent follows it: ``succeeded`` ends
    the order's payment, ``canceled`` frees the order for a new attempt (``n + 1``), any
    other status keeps it payable. An attempt already ended never comes back."""
    from models.payments import CANCELED, FAILED, SUCCEEDED, PaymentAttempt, attempt_status_for

    attempt = session.execute(
        select(PaymentAttempt).where(PaymentAttempt.payment_intent_id == intent.id).with_for_update()
    ).scalar_one_or_none()
    if attempt is not None and attempt.status not in (SUCCEEDED, CANCELED, FAILED):
        attempt.status = attempt_status_for(intent.status)


# -- orders --------------------------------------------------------------------------------


def ensure_order(session: Session, order_id: str) -> None:
    """Make sure an order row exists (total unknown until the merchant or metadata says)."""
    insert_ignore(session, Order, {"id": order_id, "status": "pending", "version": 1})


def refresh_order(session: Session, order_id: str) -> Order:
    """Recompute the order's status from its charges, under the order's row lock."""
    order = _locked(session, Order, order_id)
    charges = list(
        session.scalars(select(Charge).where(Charge.order_id == order_id).order_by(Charge.created, Charge.id))
    )
    status = order_status(charge_positions(session, charges))
    if order.status != status:
        order.status = status
    return order


def _refresh_order_of_charge(session: Session, charge_id: str | None) -> None:
    if charge_id is None:
        return
    order_id = session.scalar(select(Charge.order_id).where(Charge.id == charge_id))
    if order_id:
        refresh_order(session, order_id)


def _order_of_payment_intent(session: Session, payment_intent_id: str | None) -> str | None:
    if payment_intent_id is None:
        return None
    return session.scalar(
        select(PaymentIntent.order_id).where(PaymentIntent.id == payment_intent_id)
    ) or _order_of_checkout_session(session, payment_intent_id)


def _order_of_checkout_session(session: Session, payment_intent_id: str) -> str | None:
    """The order the Checkout Session of this PaymentIntent names (the first, should two)."""
    return session.scalar(
        select(CheckoutSession.order_id)
        .where(CheckoutSession.payment_intent_id == payment_intent_id, CheckoutSession.order_id.is_not(None))
        .order_by(CheckoutSession.created, CheckoutSession.id)
        .limit(1)
    )


# The models _locked takes: each has a string primary key ``id``.
_Keyed = TypeVar("_Keyed", Charge, CheckoutSession, Dispute, Order, PaymentIntent, Refund)


def _locked(session: Session, model: type[_Keyed], key: str) -> _Keyed:
    # populate_existing: the identity map may hold this row from before the lock was
    # taken; what we change must be what the lock protects.
    return session.execute(
        select(model)
        .where(model.id == key)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()
