"""Stripe's object shapes, across API versions, turned into our own snapshots.

A webhook endpoint receives objects in its own API version, the backfill reads them in the
SDK's pinned version, and the two differ. Everything version-specific lives here:

* ``PaymentIntent.charges`` (a list object, before 2022-11-15) gave way to
  ``latest_charge`` (an id, or an object when expanded).
* Charges embedded ``refunds`` as a list object before 2022-11-15 (a bare list in very old
  versions); newer charges carry only ``amount_refunded``.
* Card details are in ``payment_method_details.card`` (PaymentIntents and newer charges) or
  in ``source`` (legacy charges made from a card token).
* Expandable fields (``payment_intent``, ``charge``, ``customer``) are an id or an object.
* A charge's status was ``paid`` in some very old versions; it is ``succeeded`` now.
* PaymentIntent statuses ``requires_source`` and ``requires_source_action`` (API versions
  before 2019-02-11) were renamed ``requires_payment_method`` and ``requires_action``;
  :func:`payment_intent_status` reads either.

The snapshots are frozen dataclasses of plain values; amounts are ``int`` minor units.
Malformed input raises :class:`ShapeError` naming the field.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from models.money import MoneyError, check_amount, check_minor_units, normalise_currency

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 255
MAX_TIMESTAMP = 10**11  # unix seconds; year 5138. Anything larger is not a Stripe time.
# The merchant's order id, as the orders API accepts it.
ORDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:#/-]{0,254}\Z")  # \Z: no trailing newline


class ShapeError(ValueError):
    """A Stripe object lacks a field we need, or has it in an unusable form."""


@dataclass(frozen=True, slots=True)
class RefundSnapshot:
    id: str
    charge_id: str | None
    payment_intent_id: str | None
    amount: int
    currency: str
    status: str
    reason: str | None
    failure_reason: str | None
    created: int
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class DisputeSnapshot:
    id: str
    charge_id: str | None
    amount: int
    currency: str
    status: str
    reason: str | None
    created: int


@dataclass(frozen=True, slots=True)
class ChargeSnapshot:
    id: str
    amount: int
    amount_captured: int
    amount_refunded: int
    currency: str
    status: str
    captured: bool
    created: int
    livemode: bool
    payment_intent_id: str | None
    customer_id: str | None
    order_id: str | None  # metadata.order_id
    card_brand: str | None
    card_last4: str | None
    # None when the object does not embed its refunds (newer API versions): absence of
    # the list says nothing about which refunds exist.
    refunds: tuple[RefundSnapshot, ...] | None
    # payment_method_details.card.fingerprint (or a legacy card source's) and description
    card_fingerprint: str | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class PaymentIntentSnapshot:
    id: str
    amount: int
    currency: str
    status: str
    created: int
    livemode: bool
    customer_id: str | None
    order_id: str | None  # metadata.order_id
    order_total: int | None  # metadata.order_total, when it is a valid amount
    latest_charge_id: str | None
    # Charges the object itself carries: the legacy ``charges`` list, or an expanded
    # ``latest_charge``. Empty when it carries only ids.
    charges: tuple[ChargeSnapshot, ...]


@dataclass(frozen=True, slots=True)
class CheckoutSessionSnapshot:
    id: str
    mode: str  # payment | setup | subscription
    status: str  # open | complete | expired
    payment_status: str  # paid | unpaid | no_payment_required
    amount_total: int | None
    currency: str | None
    created: int
    expires_at: int | None
    livemode: bool
    payment_intent_id: str | None
    customer_id: str | None
    client_reference_id: str | None
    payment_link_id: str | None
    # The order the session names: client_reference_id, else metadata[<key>], else the
    # Payment Link's order key (see :func:`checkout_session_snapshot`).
    order_id: str | None


CHECKOUT_SESSION_STATUSES = frozenset({"open", "complete", "expired"})
CHECKOUT_PAYMENT_STATUSES = frozenset({"paid", "unpaid", "no_payment_required"})

CHARGE_STATUSES = frozenset({"pending", "succeeded", "failed"})
REFUND_STATUSES = frozenset({"pending", "requires_action", "succeeded", "failed", "canceled"})
DISPUTE_STATUSES = frozenset(
    {
        "warning_needs_response",
        "warning_under_review",
        "warning_closed",
        "needs_response",
        "under_review",
        "won",
        "lost",
        "prevented",
    }
)
PAYMENT_INTENT_STATUSES = frozenset(
    {
        "requires_payment_method",
        "requires_confirmation",
        "requires_action",
        "processing",
        "requires_capture",
        "canceled",
        "succeeded",
    }
)

#: PaymentIntent statuses of API versions before 2019-02-11 and their current names. A
#: webhook endpoint pinned to such a version still receives the old names.
LEGACY_PAYMENT_INTENT_STATUSES = {
    "requires_source": "requires_payment_method",
    "requires_source_action": "requires_action",
}


def payment_intent_status(obj: Mapping[str, Any]) -> str:
    """A PaymentIntent's status in the current vocabulary, whatever API version rendered
    it; :class:`ShapeError` when it is not a PaymentIntent status at all."""
    status = _str(obj, "status")
    status = LEGACY_PAYMENT_INTENT_STATUSES.get(status, status)
    if status not in PAYMENT_INTENT_STATUSES:
        raise ShapeError(f"payment_intent.status {status!r} is not a PaymentIntent status")
    return status


def charge_snapshot(obj: Mapping[str, Any]) -> ChargeSnapshot:
    _expect_object(obj, "charge")
    currency = _currency(obj)
    status = _str(obj, "status")
    if status == "paid":  # very old API versions
        status = "succeeded"
    if status not in CHARGE_STATUSES:
        raise ShapeError(f"charge.status {status!r} is not a charge status")
    amount = _amount(obj, "amount", currency)
    captured = _bool(obj, "captured", default=status == "succeeded")
    amount_captured = obj.get("amount_captured")
    if amount_captured is None:  # absent before 2019-ish versions
        amount_captured = amount if captured and status == "succeeded" else 0
    amount_captured = _amount_value(amount_captured, "amount_captured", currency)
    amount_refunded = _amount_value(obj.get("amount_refunded", 0) or 0, "amount_refunded", currency)
    brand, last4 = _card(obj)
    refunds: tuple[RefundSnapshot, ...] | None = None
    if "refunds" in obj and obj["refunds"] is not None:
        refunds = tuple(refund_snapshot(r, charge_id=obj["id"]) for r in _list_data(obj["refunds"], "refunds"))
    return ChargeSnapshot(
        id=obj["id"],
        amount=amount,
        amount_captured=amount_captured,
        amount_refunded=amount_refunded,
        currency=currency,
        status=status,
        captured=captured,
        created=_int(obj, "created"),
        livemode=_bool(obj, "livemode", default=False),
        payment_intent_id=_ref(obj.get("payment_intent"), "payment_intent"),
        customer_id=_ref(obj.get("customer"), "customer"),
        order_id=_order_id(_metadata(obj)),
        card_brand=brand,
        card_last4=last4,
        refunds=refunds,
        card_fingerprint=_card_fingerprint(obj),
        description=_description(obj),
    )


def refund_snapshot(obj: Mapping[str, Any], *, charge_id: str | None = None) -> RefundSnapshot:
    _expect_object(obj, "refund")
    currency = _currency(obj)
    status = _str(obj, "status")
    if status == "cancelled":
        status = "canceled"
    if status not in REFUND_STATUSES:
        raise ShapeError(f"refund.status {status!r} is not a refund status")
    return RefundSnapshot(
        id=obj["id"],
        charge_id=_ref(obj.get("charge"), "charge") or charge_id,
        payment_intent_id=_ref(obj.get("payment_intent"), "payment_intent"),
        amount=_amount(obj, "amount", currency),
        currency=currency,
        status=status,
        reason=_optional_str(obj, "reason"),
        failure_reason=_optional_str(obj, "failure_reason"),
        created=_int(obj, "created"),
        metadata=_metadata(obj),
    )


def dispute_snapshot(obj: Mapping[str, Any]) -> DisputeSnapshot:
    _expect_object(obj, "dispute")
    currency = _currency(obj)
    status = _str(obj, "status")
    if status not in DISPUTE_STATUSES:
        raise ShapeError(f"dispute.status {status!r} is not a dispute status")
    return DisputeSnapshot(
        id=obj["id"],
        charge_id=_ref(obj.get("charge"), "charge"),
        amount=_amount(obj, "amount", currency),
        currency=currency,
        status=status,
        reason=_optional_str(obj, "reason"),
        created=_int(obj, "created"),
    )


def payment_intent_snapshot(obj: Mapping[str, Any]) -> PaymentIntentSnapshot:
    _expect_object(obj, "payment_intent")
    currency = _currency(obj)
    status = payment_intent_status(obj)
    charges: list[ChargeSnapshot] = []
    if obj.get("charges") is not None:  # API versions before 2022-11-15
        charges = [charge_snapshot(c) for c in _list_data(obj["charges"], "charges")]
    latest = obj.get("latest_charge")
    if isinstance(latest, Mapping):
        charges.append(charge_snapshot(latest))
    latest_charge_id = _ref(latest, "latest_charge")
    if latest_charge_id is None and charges:
        latest_charge_id = max(charges, key=lambda c: (c.created, c.id)).id
    metadata = _metadata(obj)
    return PaymentIntentSnapshot(
        id=obj["id"],
        amount=_amount(obj, "amount", currency),
        currency=currency,
        status=status,
        created=_int(obj, "created"),
        livemode=_bool(obj, "livemode", default=False),
        customer_id=_ref(obj.get("customer"), "customer"),
        order_id=_order_id(metadata),
        order_total=_order_total(metadata.get("order_total"), currency),
        latest_charge_id=latest_charge_id,
        charges=tuple(charges),
    )


def checkout_session_snapshot(
    obj: Mapping[str, Any],
    *,
    metadata_key: str = "order_id",
    payment_link_orders: Mapping[str, str] | None = None,
) -> CheckoutSessionSnapshot:
    """A Checkout Session (``"object": "checkout.session"``), any API version.

    Its order: ``client_reference_id``, else ``metadata[metadata_key]``, else, for a session
    of a Payment Link named in ``payment_link_orders`` (one link per product), the order
    ``<order key>:<customer>`` (the customer id, else a hash of the e-mail address Checkout
    collected). ``payment_intent`` is null on sessions not yet paid from API version
    2022-08-01 on (and on setup/subscription sessions); ``status`` appeared in 2020-08-27
    and is derived from ``payment_status`` when absent.
    """
    _expect_object(obj, "checkout.session")
    mode = _str(obj, "mode")
    payment_status = _str(obj, "payment_status")
    if payment_status not in CHECKOUT_PAYMENT_STATUSES:
        raise ShapeError(f"checkout.session.payment_status {payment_status!r} is not a payment status")
    status = obj.get("status")
    if status is None:  # versions before the field: a session with an event is complete
        status = "complete" if payment_status != "unpaid" else "open"
    if status not in CHECKOUT_SESSION_STATUSES:
        raise ShapeError(f"checkout.session.status {status!r} is not a session status")
    currency = _currency(obj) if obj.get("currency") is not None else None
    amount_total = obj.get("amount_total")
    if amount_total is not None:
        amount_total = _amount_value(amount_total, "checkout.session.amount_total", currency or "")
    expires_at = obj.get("expires_at")
    customer_id = _ref(obj.get("customer"), "customer")
    client_reference_id = _optional_str(obj, "client_reference_id", limit=MAX_ID_LENGTH)
    payment_link_id = _ref(obj.get("payment_link"), "payment_link")
    metadata = _metadata(obj)
    order_id = _usable_order_id(client_reference_id, "client_reference_id") or _usable_order_id(
        metadata.get(metadata_key) or None, f"metadata.{metadata_key}"
    )
    if order_id is None and payment_link_id and payment_link_orders and payment_link_id in payment_link_orders:
        order_id = _payment_link_order(payment_link_orders[payment_link_id], customer_id, obj.get("customer_details"))
    return CheckoutSessionSnapshot(
        id=obj["id"],
        mode=mode,
        status=status,
        payment_status=payment_status,
        amount_total=amount_total,
        currency=currency,
        created=_int(obj, "created"),
        expires_at=_int(obj, "expires_at") if expires_at is not None else None,
        livemode=_bool(obj, "livemode", default=False),
        payment_intent_id=_ref(obj.get("payment_intent"), "payment_intent"),
        customer_id=customer_id,
        client_reference_id=client_reference_id,
        payment_link_id=payment_link_id,
        order_id=order_id,
    )


def _usable_order_id(value: str | None, name: str) -> str | None:
    if value is not None and not ORDER_ID.match(value):
        log.warning("checkout session %s is not a usable order id; session left unlinked", name)
        return None
    return value


def _payment_link_order(key: str, customer_id: str | None, details: Any) -> str | None:
    """One order per Payment Link (product) and customer: ``<key>:<customer>``."""
    who = customer_id
    if who is None and isinstance(details, Mapping) and isinstance(details.get("email"), str) and details["email"].strip():
        who = "email-" + hashlib.sha256(details["email"].strip().lower().encode()).hexdigest()[:24]
    if who is None:
        log.warning("payment link session names no customer; session left unlinked")
        return None
    return _usable_order_id(f"{key}:{who}", "payment link order")


# -- field helpers -----------------------------------------------------------------------


def _expect_object(obj: Any, kind: str) -> None:
    if not isinstance(obj, Mapping):
        raise ShapeError(f"{kind} must be an object")
    if obj.get("object") != kind:
        raise ShapeError(f"expected a {kind} object, got {obj.get('object')!r}")
    object_id = obj.get("id")
    if not isinstance(object_id, str) or not object_id or len(object_id) > 255:
        raise ShapeError(f"{kind}.id must be a non-empty string")


def _str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ShapeError(f"{obj.get('object')}.{key} must be a non-empty string")
    return value


def _optional_str(obj: Mapping[str, Any], key: str, limit: int = 64) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ShapeError(f"{obj.get('object')}.{key} must be a string")
    return value[:limit] or None


def _int(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIMESTAMP:
        raise ShapeError(f"{obj.get('object')}.{key} must be a unix timestamp")
    return value


def _bool(obj: Mapping[str, Any], key: str, *, default: bool) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ShapeError(f"{obj.get('object')}.{key} must be a boolean")
    return value


def _currency(obj: Mapping[str, Any]) -> str:
    try:
        return normalise_currency(obj.get("currency"))
    except MoneyError as exc:
        raise ShapeError(f"{obj.get('object')}.currency: {exc}") from None


def _amount(obj: Mapping[str, Any], key: str, currency: str) -> int:
    return _amount_value(obj.get(key), f"{obj.get('object')}.{key}", currency)


def _amount_value(value: Any, name: str, currency: str) -> int:
    # Stripe amounts are integers; zero is legal (e.g. amount_captured of an authorisation).
    # The three-decimal rule is Stripe's to enforce on input, not ours on its output.
    try:
        return check_minor_units(value)
    except MoneyError as exc:
        raise ShapeError(f"{name} ({currency}): {exc}") from None


def _ref(value: Any, name: str) -> str | None:
    """The id of an expandable field: an id string, an expanded object, or null."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, str) and len(value) <= MAX_ID_LENGTH:
        return value or None
    raise ShapeError(f"{name} must be an id (at most {MAX_ID_LENGTH} characters) or an object with one")


def _list_data(value: Any, name: str) -> list[Mapping[str, Any]]:
    if isinstance(value, Mapping) and value.get("object") == "list":
        items = value.get("data")
    else:
        items = value
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise ShapeError(f"{name} must be a list of objects")
    return items


def _metadata(obj: Mapping[str, Any]) -> dict[str, str]:
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise ShapeError(f"{obj.get('object')}.metadata must be an object")
    return {str(k): v.strip() for k, v in metadata.items() if isinstance(v, str)}


def _card(obj: Mapping[str, Any]) -> tuple[str | None, str | None]:
    details = obj.get("payment_method_details")
    card = details.get("card") if isinstance(details, Mapping) else None
    if not isinstance(card, Mapping):
        source = obj.get("source")
        card = source if isinstance(source, Mapping) and source.get("object") == "card" else None
    if not isinstance(card, Mapping):
        return None, None
    brand = card.get("brand")
    last4 = card.get("last4")
    brand = brand[:32].lower() if isinstance(brand, str) and brand else None
    last4 = last4 if isinstance(last4, str) and len(last4) == 4 and last4.isdigit() else None
    return brand, last4


def _card_fingerprint(obj: Mapping[str, Any]) -> str | None:
    """The card's fingerprint (the same for every charge of one card number, per Stripe
    account); None for other payment methods or a value we would not use."""
    details = obj.get("payment_method_details")
    card = details.get("card") if isinstance(details, Mapping) else None
    if not isinstance(card, Mapping):
        source = obj.get("source")
        card = source if isinstance(source, Mapping) and source.get("object") == "card" else None
    fingerprint = card.get("fingerprint") if isinstance(card, Mapping) else None
    if isinstance(fingerprint, str) and 0 < len(fingerprint) <= 64 and fingerprint.isascii() and fingerprint.isalnum():
        return fingerprint
    return None


def _description(obj: Mapping[str, Any]) -> str | None:
    description = obj.get("description")
    if isinstance(description, str) and description.strip():
        return description.strip()[:1000]
    return None


def _order_id(metadata: Mapping[str, str]) -> str | None:
    # Stripe allows 500-character metadata values; our order ids are at most 255. A value
    # we cannot use as an order id leaves the charge unlinked (and visible) rather than
    # failing the whole event, which Stripe would then redeliver for days.
    order_id = metadata.get("order_id") or None
    if order_id is not None and not ORDER_ID.match(order_id):
        log.warning("metadata.order_id is not a usable order id; charge left unlinked")
        return None
    return order_id


def _order_total(raw: str | None, currency: str) -> int | None:
    # metadata values are strings set by the merchant's checkout; anything that is not a
    # plain positive integer is ignored rather than guessed at (no "49.99", no "1e3").
    if raw is None or not (raw.isascii() and raw.isdigit()):
        return None
    try:
        return check_amount(int(raw), currency)
    except MoneyError:
        return None
