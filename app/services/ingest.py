"""Webhook ingest: verify, store once, apply, in one transaction.

Guarantees:

* Nothing is stored or applied unless the body is at most ``WEBHOOK_MAX_BYTES``, carries a
  valid ``Stripe-Signature`` for one of the configured secrets within the tolerance, and
  is a well-formed Stripe event.
* The event row and the event's effects commit together or not at all: a stored event
  always has its effects, and an event whose handler failed is not stored, so Stripe's
  redelivery applies it from a clean state.
* An event id is applied at most once, across threads, processes and hosts: the insert
  on the primary key is the lock (see :func:`models.db.insert_ignore`). Every copy after
  the first is answered ``duplicate``.
* A failure is recorded in ``event_failures`` in a transaction of its own, so a poison
  event is visible with its error and attempt count while Stripe keeps retrying.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.gateway import WebhookSignatureError, verify_webhook
from app.services import ledger
from app.services.stripe_shapes import (
    MAX_TIMESTAMP,
    ChargeSnapshot,
    ShapeError,
    charge_snapshot,
    checkout_session_snapshot,
    dispute_snapshot,
    payment_intent_snapshot,
    refund_snapshot,
)
from config import Settings
from models import EventFailure, StripeEvent, run_in_transaction, utcnow
from models.db import insert_ignore

log = logging.getLogger(__name__)

_EVENT_ID = re.compile(r"^evt_[A-Za-z0-9_]{1,250}\Z")
_EVENT_TYPE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+){1,5}\Z")
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True, slots=True)
class EventEnvelope:
    """The parts of a Stripe event the handlers need, validated."""

    id: str
    type: str
    created: int
    livemode: bool
    account: str | None
    api_version: str | None
    object: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What to answer Stripe: an HTTP status and a JSON body."""

    http_status: int
    body: dict[str, Any] = field(default_factory=dict)
    event_type: str | None = None  # for metrics and logs; not part of the answer


class IngestRejected(Exception):
    """The request is not an event we may store; answered with a 4xx (or 503)."""

    def __init__(self, http_status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message


Handler = Callable[[Session, EventEnvelope], None]


def _charge_event(session: Session, event: EventEnvelope) -> None:
    ledger.apply_charge(session, charge_snapshot(event.object), as_of=event.created, account=event.account)


def _charge_expired_event(session: Session, event: EventEnvelope) -> None:
    """An uncaptured authorisation expired: Stripe released the funds."""
    charge = ledger.apply_charge(session, charge_snapshot(event.object), as_of=event.created, account=event.account)
    ledger.release_charges(session, charge_id=charge.id)


def _refund_event(session: Session, event: EventEnvelope) -> None:
    ledger.apply_refund(session, refund_snapshot(event.object), as_of=event.created, account=event.account)


def _dispute_event(session: Session, event: EventEnvelope) -> None:
    ledger.apply_dispute(session, dispute_snapshot(event.object), as_of=event.created, account=event.account)


def _payment_intent_event(session: Session, event: EventEnvelope) -> None:
    ledger.apply_payment_intent(
        session, payment_intent_snapshot(event.object), as_of=event.created, account=event.account
    )


@dataclass(frozen=True, slots=True)
class CheckoutLinking:
    """How a Checkout Session names its order (settings CHECKOUT_ORDER_METADATA_KEY and
    PAYMENT_LINK_ORDERS)."""

    metadata_key: str = "order_id"
    payment_link_orders: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> "CheckoutLinking":
        return cls(settings.checkout_order_metadata_key, dict(settings.payment_link_orders))

    def snapshot(self, obj: Mapping[str, Any]):  # type: ignore[no-untyped-def]
        return checkout_session_snapshot(obj, metadata_key=self.metadata_key, payment_link_orders=self.payment_link_orders)


def _checkout_session_event(session: Session, event: EventEnvelope, linking: CheckoutLinking = CheckoutLinking()) -> None:
    ledger.apply_checkout_session(
        session,
        linking.snapshot(event.object),
        as_of=event.created,
        account=event.account,
        payment_failed=event.type == "checkout.session.async_payment_failed",
    )


HANDLERS: dict[str, Handler] = {
    "charge.succeeded": _charge_event,
    "charge.failed": _charge_event,
    "charge.captured": _charge_event,
    "charge.expired": _charge_expired_event,
    "charge.updated": _charge_event,
    "charge.refunded": _charge_event,
    # Before API version 2024-10-28 card refunds were reported through this event.
    "charge.refund.updated": _refund_event,
    "charge.dispute.created": _dispute_event,
    "charge.dispute.updated": _dispute_event,
    "charge.dispute.closed": _dispute_event,
    "payment_intent.succeeded": _payment_intent_event,
    "payment_intent.payment_failed": _payment_intent_event,
    "payment_intent.canceled": _payment_intent_event,
    "refund.created": _refund_event,
    "refund.updated": _refund_event,
    "refund.failed": _refund_event,
    # Checkout: the session names the order of its PaymentIntent and charges.
    "checkout.session.completed": _checkout_session_event,
    "checkout.session.async_payment_succeeded": _checkout_session_event,
    "checkout.session.async_payment_failed": _checkout_session_event,
    "checkout.session.expired": _checkout_session_event,
}


class WebhookIngestor:
    """Turns one webhook request into one :class:`IngestResult`."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        handlers: Mapping[str, Handler] | None = None,
        *,
        lean: bool = True,
    ) -> None:
        self._settings = settings
        self._session_factory = session_factory
        self.checkout_linking = CheckoutLinking.from_settings(settings)
        self._handlers = HANDLERS if handlers is None else handlers
        bind = getattr(session_factory, "kw", {}).get("bind")
        # The lean path for new charges speaks PostgreSQL through psycopg's pipeline mode.
        self.lean = lean and bind is not None and bind.dialect.name == "postgresql" and bind.dialect.driver == "psycopg"

    def ingest(self, payload: bytes, signature_header: str | None) -> IngestResult:
        """Verify, store and apply one delivery. Raises :class:`IngestRejected` for input
        that must not be stored; every other outcome is an :class:`IngestResult`."""
        settings = self._settings
        if not settings.stripe_webhook_secrets:
            raise IngestRejected(
                503, "webhook_secret_not_configured", "STRIPE_WEBHOOK_SECRET is not set on this server."
            )
        if len(payload) > settings.webhook_max_bytes:
            raise IngestRejected(413, "payload_too_large", f"Bodies over {settings.webhook_max_bytes} bytes are refused.")
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise IngestRejected(400, "invalid_encoding", "The body is not UTF-8.") from None
        try:
            verify_webhook(
                payload,
                signature_header,
                settings.stripe_webhook_secrets,
                tolerance=settings.stripe_webhook_tolerance,
            )
        except WebhookSignatureError as exc:
            raise IngestRejected(400, exc.code, exc.message) from None
        return self.ingest_trusted(payload)

    def ingest_trusted(self, payload: bytes) -> IngestResult:
        """Store and apply an event whose origin is already established: a verified
        webhook, or an event read from Stripe's Events API with our key (backfill of
        undelivered events). Same dedup, same transaction, same failure record."""
        event = parse_envelope(payload)

        if event.livemode != self._settings.stripe_livemode:
            # A live Connect endpoint also receives test events; a 4xx would make Stripe
            # retry them for days. Acknowledge and leave no trace in the ledger.
            log.info("event of the other mode ignored", extra={"event_id": event.id, "event_type": event.type})
            return IngestResult(200, {"status": "ignored", "reason": "livemode_mismatch", "event_id": event.id}, event.type)

        handler = self._handlers.get(event.type)
        if handler is _checkout_session_event:
            # The checkout handler reads the merchant's linking settings.
            handler = functools.partial(_checkout_session_event, linking=self.checkout_linking)
        text_payload = payload.decode("utf-8")
        lean = self._lean_charge(event, handler)
        if lean is not None:
            work = self._lean_apply(event, text_payload, lean)
        else:
            work = None

        def apply(session: Session) -> str:
            inserted = insert_ignore(
                session,
                StripeEvent,
                {**_event_row(event, text_payload, utcnow()), "status": "processed" if handler else "ignored"},
            )
            if not inserted:
                return "duplicate"
            if handler is not None:
                handler(session, event)
            session.execute(
                update(EventFailure)
                .where(EventFailure.event_id == event.id, EventFailure.resolved_at.is_(None))
                .values(resolved_at=utcnow())
            )
            return "processed" if handler else "ignored"

        try:
            outcome = run_in_transaction(self._session_factory, work or apply)
        except _Duplicate:
            outcome = "duplicate"
        except ShapeError as exc:
            self._record_failure(event, exc)
            raise IngestRejected(422, "invalid_event_object", str(exc)) from None
        except Exception as exc:
            log.exception("event application failed", extra={"event_id": event.id, "event_type": event.type})
            attempts = self._record_failure(event, exc)
            return IngestResult(
                500,
                {
                    "error": "processing_failed",
                    "message": "The event could not be applied; Stripe will redeliver it.",
                    "event_id": event.id,
                    "attempts": attempts,
                },
                event.type,
            )
        log.info(
            "event %s", outcome, extra={"event_id": event.id, "event_type": event.type, "object_id": _object_id(event.object)}
        )
        return IngestResult(200, {"status": outcome, "event_id": event.id}, event.type)

    def _lean_charge(self, event: EventEnvelope, handler: Handler | None) -> ChargeSnapshot | None:
        """The charge snapshot when this event may take the lean path, else None."""
        if not self.lean or handler is not _charge_event:
            return None
        try:
            snapshot = charge_snapshot(event.object)
        except ShapeError:
            return None  # the general path raises it where it always has
        return snapshot if ledger.lean_charge_applicable(snapshot) else None

    def _lean_apply(self, event: EventEnvelope, text_payload: str, snapshot: ChargeSnapshot) -> Callable[[Session], str]:
        """The unit of work of a charge event on PostgreSQL: the event insert (resolving
        its failure record when it inserted), the PaymentIntent lock and the charge insert
        go out in one pipeline; a new charge is then linked and its order refreshed in one
        more (ledger.finish_new_charge), and the order's status update, when there is one,
        goes out with the COMMIT. A duplicate rolls everything back; a charge we
        already hold goes through ledger.apply_charge in the same transaction."""

        def work(session: Session) -> str:
            connection = session.connection().connection.driver_connection
            now = utcnow()
            with connection.pipeline():
                stored = connection.execute(_EVENT_INSERT_SQL, _event_row(event, text_payload, now))
                cursor = None
                for sql, params in ledger.new_charge_statements(snapshot, as_of=event.created, account=event.account, now=now):
                    cursor = connection.execute(sql, params)
            if stored.fetchone() is None:
                raise _Duplicate()  # undoes the charge insert that went out with it
            assert cursor is not None
            inserted, order_id = cursor.fetchone()
            if inserted:
                status_update = ledger.finish_new_charge(connection, snapshot.id, order_id, now)
                if status_update is not None:
                    # The last statement travels with the COMMIT: one round trip for both
                    # (connection.commit() in a pipeline would sync twice). The unit of
                    # work ends committed; run_in_transaction's own commit then finds no
                    # transaction open and sends nothing. A failed COMMIT raises here,
                    # before anything is answered, as it would there.
                    with connection.pipeline():
                        connection.execute(*status_update)
                        connection.execute("COMMIT", prepare=False)
            else:
                ledger.apply_charge(session, snapshot, as_of=event.created, account=event.account)
            return "processed"

        return work

    def _record_failure(self, event: EventEnvelope, exc: BaseException) -> int | None:
        """Count the failed attempt outside the rolled-back transaction; never raises."""
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]

        def record(session: Session) -> int:
            now = utcnow()
            if insert_ignore(
                session,
                EventFailure,
                {
                    "event_id": event.id,
                    "type": event.type,
                    "attempts": 1,
                    "last_error": error,
                    "first_failed_at": now,
                    "last_failed_at": now,
                },
            ):
                return 1
            failure = session.get(EventFailure, event.id, with_for_update=True, populate_existing=True)
            assert failure is not None
            failure.attempts += 1
            failure.last_error = error
            failure.last_failed_at = now
            failure.resolved_at = None
            return failure.attempts

        try:
            attempts = run_in_transaction(self._session_factory, record)
        except Exception:
            log.exception("could not record the event failure", extra={"event_id": event.id})
            return None
        log.error(
            "event failed",
            extra={"event_id": event.id, "event_type": event.type, "attempts": attempts, "error": error},
        )
        return attempts


class _Duplicate(Exception):
    """The lean path met an event id already stored: roll back, answer duplicate."""


# The event row, and the resolution of its failure record when (and only when) the row is
# new: what the general path does at the end of its transaction, in one statement.
_EVENT_INSERT_SQL = """
WITH e AS (
    INSERT INTO stripe_events (event_id, type, api_version, livemode, account, created, received_at, status, object_id, payload)
    VALUES (%(event_id)s, %(type)s, %(api_version)s, %(livemode)s, %(account)s, %(created)s, %(received_at)s,
            'processed', %(object_id)s, %(payload)s)
    ON CONFLICT DO NOTHING
    RETURNING event_id
), f AS (
    UPDATE event_failures SET resolved_at = %(received_at)s
    WHERE event_id IN (SELECT event_id FROM e) AND resolved_at IS NULL
)
SELECT event_id FROM e
"""


def _event_row(event: EventEnvelope, text_payload: str, received_at: Any) -> dict[str, Any]:
    """The columns of a stored event but its status (both insert paths use it)."""
    return {
        "event_id": event.id,
        "type": event.type,
        "api_version": event.api_version,
        "livemode": event.livemode,
        "account": event.account,
        "created": event.created,
        "received_at": received_at,
        "object_id": _object_id(event.object),
        "payload": text_payload,
    }


def _object_id(stripe_object: Mapping[str, Any]) -> str | None:
    object_id = stripe_object.get("id")
    return object_id if isinstance(object_id, str) and len(object_id) <= 255 else None


def parse_envelope(payload: bytes) -> EventEnvelope:
    """Parse and validate a Stripe event envelope; :class:`IngestRejected` (400) otherwise."""
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        raise IngestRejected(400, "invalid_json", "The body is not valid JSON.") from None
    if not isinstance(document, dict):
        raise IngestRejected(400, "not_an_event", "The body is not a JSON object.")
    if b"\\u0000" in payload:
        # PostgreSQL text cannot hold NUL; no Stripe field we store carries one.
        raise IngestRejected(400, "invalid_event", "The event contains a NUL character.")
    if document.get("object") != "event":
        raise IngestRejected(400, "not_an_event", 'The body is not a Stripe event (object != "event").')
    event_id = document.get("id")
    if not isinstance(event_id, str) or not _EVENT_ID.match(event_id):
        raise IngestRejected(400, "invalid_event", "The event has no valid id.")
    event_type = document.get("type")
    if not isinstance(event_type, str) or len(event_type) > 100 or not _EVENT_TYPE.match(event_type):
        raise IngestRejected(400, "invalid_event", "The event has no valid type.")
    data = document.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise IngestRejected(400, "invalid_event", "The event has no data.object.")
    created = document.get("created")
    if isinstance(created, bool) or not isinstance(created, int) or not 0 <= created <= MAX_TIMESTAMP:
        raise IngestRejected(400, "invalid_event", "The event has no valid created time.")
    livemode = document.get("livemode")
    if not isinstance(livemode, bool):
        raise IngestRejected(400, "invalid_event", "The event has no livemode flag.")
    account = document.get("account")
    if account is not None and (not isinstance(account, str) or not account.startswith("acct_") or len(account) > 255):
        raise IngestRejected(400, "invalid_event", "The event's account is not a Stripe account id.")
    api_version = document.get("api_version")
    if api_version is not None and (not isinstance(api_version, str) or len(api_version) > 64):
        raise IngestRejected(400, "invalid_event", "The event's api_version is not a string.")
    return EventEnvelope(
        id=event_id,
        type=event_type,
        created=created,
        livemode=livemode,
        account=account,
        api_version=api_version,
        object=data["object"],
    )
