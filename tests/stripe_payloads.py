"""Stripe objects and webhook events in the shape Stripe really sends them, for tests.

Every builder returns a plain, JSON-serialisable ``dict`` with every top-level field the
real object carries (``null`` where Stripe sends ``null``), so tests exercise the payloads
the service will meet in production rather than hand-trimmed ones. The shapes follow
Stripe's API reference ("The Charge object", "The PaymentIntent object", "The Refund
object", "The Dispute object", "The Event object") and the openapi fixtures, restricted to
the fields that exist in API version ``2024-10-28.acacia`` (fields added in later releases,
e.g. ``presentment_details`` or ``outcome.advice_code``, are left out).

Two API versions are modelled, because a webhook endpoint receives objects rendered in
*its own* API version and long-lived endpoints are often years behind:

``LEGACY_API_VERSION`` (``2020-08-27``)
    * A Charge embeds its refunds: ``refunds`` is a list object
      ``{"object": "list", "data": [refund, ...], "has_more": false, "total_count": n,
      "url": "/v1/charges/<id>/refunds"}`` (newest first).
    * A PaymentIntent embeds its charges: ``charges`` is a list object whose ``url`` is
      ``/v1/charges?payment_intent=<id>``; there is no ``latest_charge``.
    * PaymentIntents default to ``capture_method: "automatic"``, card-only
      ``payment_method_types`` and ``automatic_payment_methods: null``.

``CURRENT_API_VERSION`` (``2024-10-28.acacia``)
    * 2022-11-15 removed both embedded lists: a Charge has no ``refunds`` key (only
      ``amount_refunded``/``refunded``) and a PaymentIntent has ``latest_charge`` (a charge
      id, or ``null``) and no ``charges`` key. (Changelog 2022-11-15: "The Charges object no
      longer auto-expands refunds by default"; "Removes the charges attribute from the
      PaymentIntent object".)
    * 2023-08-16 enabled ``automatic_payment_methods`` by default, and 2024-04-10 made
      ``automatic_async`` the default ``capture_method``; the PaymentIntent defaults follow.
    * 2024-10-28.acacia added ``enhanced_eligibility_types``,
      ``evidence.enhanced_evidence`` and ``evidence_details.enhanced_eligibility`` to
      Disputes (Visa Compelling Evidence 3.0), and from this version on card refunds raise
      ``refund.created``/``refund.updated``/``refund.failed`` events; before it a card
      refund was reported only through ``charge.refunded`` / ``charge.refund.updated``.

``PRE_2019_API_VERSION`` (``2018-11-08``; any version before ``2019-02-11``)
    * The legacy shape above, plus the PaymentIntent vocabulary that 2019-02-11 renamed:
      statuses ``requires_source`` (now ``requires_payment_method``) and
      ``requires_source_action`` (now ``requires_action``), ``allowed_source_types``
      (now ``payment_method_types``) and ``next_source_action`` with
      ``authorize_with_url`` (now ``next_action`` with ``redirect_to_url``).
      ``payment_intent()`` takes either status name and renders the version's own.
      Charges, refunds and disputes are rendered in their 2020-08-27 shape.

Refund and Dispute objects have the same top-level shape in both versions (the Dispute is
built in its 2024-10-28.acacia form). Note that a Refund has no ``livemode`` field.

Other facts worth knowing when reading these payloads:

* A charge made through a PaymentIntent has ``source: null`` and a ``pm_`` id in
  ``payment_method``; a charge made directly with the Charges API (``payment_intent``
  ``None``) carries the card object in ``source`` and its ``card_`` id in
  ``payment_method``. Card details are in ``payment_method_details.card`` either way.
* ``amount_refunded`` counts pending refunds as well as succeeded ones.
* ``event()`` only labels the envelope with ``api_version``; build the object with the same
  ``api_version`` so the two agree, as they always do in a real delivery.

Ids are ``<prefix>_`` + 24 random alphanumerics and unique within the test run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
import string
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import stripe

__all__ = [
    "CURRENT_API_VERSION",
    "LEGACY_API_VERSION",
    "PRE_2019_API_VERSION",
    "charge",
    "checkout_session",
    "dispute",
    "encode",
    "event",
    "new_id",
    "payment_intent",
    "refund",
    "sign",
]

JSON = dict[str, Any]

LEGACY_API_VERSION: Final[str] = "2020-08-27"
PRE_2019_API_VERSION: Final[str] = "2018-11-08"
# The oldest API version rendered at all.
_OLDEST_API_VERSION: Final[str] = "2018-02-28"
CURRENT_API_VERSION: Final[str] = "2024-10-28.acacia"

# First API versions (their date part) with each versioned change modelled here.
_PAYMENT_METHOD_NAMES: Final = "2019-02-11"
_EMBEDDED_LISTS_REMOVED: Final = "2022-11-15"
# Checkout: the PaymentIntent is created only when the customer pays, shipping_details
# replaces shipping, shipping_options replaces shipping_rates, customer_creation appears.
_CHECKOUT_DEFERRED_PAYMENT_INTENT: Final = "2022-08-01"
_AUTOMATIC_PAYMENT_METHODS_DEFAULT: Final = "2023-08-16"
_AUTOMATIC_ASYNC_CAPTURE_DEFAULT: Final = "2024-04-10"

_API_VERSION_RE: Final = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:\.[a-z]+)?$")
_ALPHANUMERIC: Final = string.ascii_letters + string.digits
_ID_LENGTH: Final = 24
_DAY: Final = 86_400

_CHARGE_STATUSES: Final = frozenset({"succeeded", "pending", "failed"})
_REFUND_STATUSES: Final = frozenset({"pending", "requires_action", "succeeded", "failed", "canceled"})
_DISPUTE_STATUSES: Final = frozenset(
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
_PAYMENT_INTENT_STATUSES: Final = frozenset(
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
# Renamed by 2019-02-11: old name -> current name.
_PRE_2019_PAYMENT_INTENT_STATUSES: Final = {
    "requires_source": "requires_payment_method",
    "requires_source_action": "requires_action",
}

# Card brands as they appear in payment_method_details (lowercase) and on Card objects.
_CARD_BRAND_NAMES: Final = {
    "amex": "American Express",
    "diners": "Diners Club",
    "discover": "Discover",
    "eftpos_au": "Eftpos Australia",
    "jcb": "JCB",
    "mastercard": "MasterCard",
    "unionpay": "UnionPay",
    "visa": "Visa",
}

_FAILURE_MESSAGES: Final = {
    "card_declined": "Your card was declined.",
    "expired_card": "Your card has expired.",
    "incorrect_cvc": "Your card's security code is incorrect.",
    "incorrect_number": "Your card number is incorrect.",
    "insufficient_funds": "Your card has insufficient funds.",
    "processing_error": "An error occurred while processing your card. Try again in a little bit.",
}

# Visa reason codes for the common dispute reasons (payment_method_details.card).
_VISA_REASON_CODES: Final = {
    "credit_not_processed": "13.6",
    "duplicate": "12.6.1",
    "fraudulent": "10.4",
    "product_not_received": "13.1",
    "product_unacceptable": "13.3",
    "subscription_canceled": "13.2",
}

_DISPUTE_EVIDENCE_FIELDS: Final = (
    "access_activity_log",
    "billing_address",
    "cancellation_policy",
    "cancellation_policy_disclosure",
    "cancellation_rebuttal",
    "customer_communication",
    "customer_email_address",
    "customer_name",
    "customer_purchase_ip",
    "customer_signature",
    "duplicate_charge_documentation",
    "duplicate_charge_explanation",
    "duplicate_charge_id",
    "product_description",
    "receipt",
    "refund_policy",
    "refund_policy_disclosure",
    "refund_refusal_explanation",
    "service_date",
    "service_documentation",
    "shipping_address",
    "shipping_carrier",
    "shipping_date",
    "shipping_documentation",
    "shipping_tracking_number",
    "uncategorized_file",
    "uncategorized_text",
)

_DISPUTE_FEE: Final = 1500

_issued_ids: set[str] = set()


# -- ids, time, versions -------------------------------------------------------------------


def _random(length: int, alphabet: str = _ALPHANUMERIC) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def new_id(prefix: str) -> str:
    """A fresh Stripe-style id: ``new_id("ch")`` -> ``"ch_"`` + 24 random alphanumerics.

    The prefix may be given with or without its trailing underscore. Ids are unique within
    the process.
    """
    prefix = prefix.rstrip("_")
    if not prefix:
        raise ValueError("new_id needs a prefix such as 'ch' or 'evt'")
    while True:
        candidate = f"{prefix}_{_random(_ID_LENGTH)}"
        if candidate not in _issued_ids:
            _issued_ids.add(candidate)
            return candidate


def _now() -> int:
    return int(time.time())


def _version_date(api_version: str) -> str:
    match = _API_VERSION_RE.match(api_version) if isinstance(api_version, str) else None
    if match is None:
        raise ValueError(f"api_version {api_version!r} is not a Stripe API version")
    date = match.group(1)
    if date < _OLDEST_API_VERSION:
        raise ValueError(
            f"api_version {api_version!r} predates {_OLDEST_API_VERSION}, the oldest shape modelled here"
        )
    return date


def _embeds_lists(api_version: str) -> bool:
    """Whether charges embed ``refunds`` and PaymentIntents embed ``charges``."""
    return _version_date(api_version) < _EMBEDDED_LISTS_REMOVED


def _list_object(data: list[JSON], url: str) -> JSON:
    return {"object": "list", "data": data, "has_more": False, "total_count": len(data), "url": url}


def _check(value: str, allowed: frozenset[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {sorted(allowed)}")


# -- cards ---------------------------------------------------------------------------------


def _fingerprint(brand: str, last4: str) -> str:
    """Stable per card, like Stripe's: the same brand and last4 give the same fingerprint."""
    digest = hashlib.sha256(f"{brand}:{last4}".encode()).digest()
    return "".join(_ALPHANUMERIC[b % len(_ALPHANUMERIC)] for b in digest[:16])


def _expiry() -> tuple[int, int]:
    return 12, time.gmtime().tm_year + 3


def _card_details(*, brand: str, last4: str, amount: int, failed: bool, captured: bool, created: int) -> JSON:
    """``payment_method_details`` of a card charge."""
    exp_month, exp_year = _expiry()
    card: JSON = {
        "amount_authorized": None if failed else amount,
        "brand": brand,
    }
    if not failed and not captured:
        card["capture_before"] = created + 7 * _DAY  # present on uncaptured authorisations
    card.update(
        {
            "checks": {
                "address_line1_check": None,
                "address_postal_code_check": None,
                "cvc_check": "pass",
            },
            "country": "US",
            "exp_month": exp_month,
            "exp_year": exp_year,
            "extended_authorization": {"status": "disabled"},
            "fingerprint": _fingerprint(brand, last4),
            "funding": "credit",
            "incremental_authorization": {"status": "unavailable"},
            "installments": None,
            "last4": last4,
            "mandate": None,
            "multicapture": {"status": "unavailable"},
            "network": brand,
            "network_token": {"used": False},
            "overcapture": {"maximum_amount_capturable": amount, "status": "unavailable"},
            "three_d_secure": None,
            "wallet": None,
        }
    )
    return {"card": card, "type": "card"}


def _card_source(*, card_id: str, brand: str, last4: str, customer: str | None) -> JSON:
    """The Card object a Charges-API charge carries in ``source``."""
    exp_month, exp_year = _expiry()
    return {
        "id": card_id,
        "object": "card",
        "address_city": None,
        "address_country": None,
        "address_line1": None,
        "address_line1_check": None,
        "address_line2": None,
        "address_state": None,
        "address_zip": None,
        "address_zip_check": None,
        "brand": _CARD_BRAND_NAMES.get(brand, brand.title()),
        "country": "US",
        "customer": customer,
        "cvc_check": "pass",
        "dynamic_last4": None,
        "exp_month": exp_month,
        "exp_year": exp_year,
        "fingerprint": _fingerprint(brand, last4),
        "funding": "credit",
        "last4": last4,
        "metadata": {},
        "name": None,
        "tokenization_method": None,
    }


def _outcome(status: str, failure_code: str | None) -> JSON:
    if status == "failed":
        return {
            "network_status": "declined_by_network",
            "reason": "generic_decline" if failure_code in (None, "card_declined") else failure_code,
            "risk_level": "normal",
            "risk_score": 41,
            "seller_message": "The bank did not return any further details with this decline.",
            "type": "issuer_declined",
        }
    return {
        "network_status": "approved_by_network",
        "reason": None,
        "risk_level": "normal",
        "risk_score": 32,
        "seller_message": "Payment complete.",
        "type": "authorized",
    }


# -- objects -------------------------------------------------------------------------------


def charge(
    *,
    id: str | None = None,
    amount: int = 4999,
    currency: str = "usd",
    status: str = "succeeded",
    captured: bool = True,
    amount_refunded: int = 0,
    refunds: Sequence[Mapping[str, Any]] | None = None,
    payment_intent: str | None = None,
    customer: str | None = None,
    metadata: Mapping[str, str] | None = None,
    created: int | None = None,
    livemode: bool = False,
    disputed: bool = False,
    brand: str = "visa",
    last4: str = "4242",
    failure_code: str | None = None,
    failure_message: str | None = None,
    api_version: str = CURRENT_API_VERSION,
) -> JSON:
    """A Charge (``"object": "charge"``) as rendered in ``api_version``.

    ``status`` is ``succeeded``, ``pending`` or ``failed``. A failed charge is never
    captured, has no balance transaction and gets ``failure_code`` ``card_declined`` (with
    Stripe's message) unless one is given. ``captured=False`` with ``succeeded`` is an
    uncaptured authorisation: ``amount_captured`` 0, no balance transaction, and
    ``payment_method_details.card.capture_before`` set.

    ``refunds`` are Refund dicts (see :func:`refund`). They are embedded only in the
    legacy shape; in any version, when given and ``amount_refunded`` is left at 0,
    ``amount_refunded`` becomes the sum of the pending and succeeded ones. In the legacy
    shape a charge with ``amount_refunded`` but no ``refunds`` embeds one succeeded refund
    of that amount, as Stripe would. ``refunded`` is ``amount_refunded == amount``.
    """
    embeds = _embeds_lists(api_version)
    _check(status, _CHARGE_STATUSES, "charge status")
    charge_id = id or new_id("ch")
    created = _now() if created is None else created
    failed = status == "failed"
    is_captured = captured and not failed

    refund_list = [copy.deepcopy(dict(r)) for r in refunds] if refunds is not None else None
    if refund_list and amount_refunded == 0:
        amount_refunded = sum(r["amount"] for r in refund_list if r.get("status") in ("pending", "succeeded"))
    if embeds and refund_list is None:
        refund_list = []
        if amount_refunded > 0:
            refund_list.append(
                refund(
                    charge=charge_id,
                    amount=amount_refunded,
                    currency=currency,
                    payment_intent=payment_intent,
                    created=created,
                    api_version=api_version,
                )
            )

    if failed:
        failure_code = failure_code or "card_declined"
        failure_message = failure_message or _FAILURE_MESSAGES.get(failure_code, _FAILURE_MESSAGES["card_declined"])

    if payment_intent is None:  # a Charges-API charge: the card is the source
        card_id = new_id("card")
        payment_method = card_id
        source: JSON | None = _card_source(card_id=card_id, brand=brand, last4=last4, customer=customer)
    else:
        payment_method = new_id("pm")
        source = None

    obj: JSON = {
        "id": charge_id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount if is_captured else 0,
        "amount_refunded": amount_refunded,
        "application": None,
        "application_fee": None,
        "application_fee_amount": None,
        "balance_transaction": new_id("txn") if is_captured else None,
        "billing_details": {
            "address": {
                "city": None,
                "country": None,
                "line1": None,
                "line2": None,
                "postal_code": None,
                "state": None,
            },
            "email": None,
            "name": None,
            "phone": None,
        },
        "calculated_statement_descriptor": "EXAMPLE LEDGER",
        "captured": is_captured,
        "created": created,
        "currency": currency,
        "customer": customer,
        "description": None,
        "disputed": disputed,
        "failure_balance_transaction": None,
        "failure_code": failure_code,
        "failure_message": failure_message,
        "fraud_details": {},
        "invoice": None,
        "livemode": livemode,
        "metadata": dict(metadata or {}),
        "on_behalf_of": None,
        "outcome": _outcome(status, failure_code),
        "paid": status == "succeeded",
        "payment_intent": payment_intent,
        "payment_method": payment_method,
        "payment_method_details": _card_details(
            brand=brand, last4=last4, amount=amount, failed=failed, captured=is_captured, created=created
        ),
        "receipt_email": None,
        "receipt_number": None,
        "receipt_url": None
        if failed
        else "https://pay.stripe.com/receipts/payment/" + _random(96, _ALPHANUMERIC + "-_"),
        "refunded": amount_refunded == amount,
    }
    if embeds:
        ordered = sorted(refund_list or [], key=lambda r: r.get("created", 0), reverse=True)
        obj["refunds"] = _list_object(ordered, f"/v1/charges/{charge_id}/refunds")
    obj.update(
        {
            "review": None,
            "shipping": None,
            "source": source,
            "source_transfer": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": status,
            "transfer_data": None,
            "transfer_group": None,
        }
    )
    return obj


def refund(
    *,
    id: str | None = None,
    charge: str,
    amount: int,
    currency: str = "usd",
    status: str = "succeeded",
    reason: str | None = None,
    payment_intent: str | None = None,
    metadata: Mapping[str, str] | None = None,
    created: int | None = None,
    failure_reason: str | None = None,
    api_version: str = CURRENT_API_VERSION,
) -> JSON:
    """A card Refund (``"object": "refund"``); same top-level shape in both versions.

    ``status`` is ``pending``, ``requires_action``, ``succeeded``, ``failed`` or
    ``canceled``. ``failure_reason`` and ``failure_balance_transaction`` are present only on
    a failed refund (or when ``failure_reason`` is given), as in Stripe; ``failure_reason``
    defaults to ``"unknown"`` on a failed one.
    ``reason`` is ``duplicate``, ``fraudulent``, ``requested_by_customer`` or ``None``.
    A Refund has no ``livemode`` field.
    """
    _version_date(api_version)
    _check(status, _REFUND_STATUSES, "refund status")
    failed = status == "failed" or failure_reason is not None
    reference_status = {"succeeded": "available", "failed": "unavailable", "canceled": "unavailable"}
    obj: JSON = {
        "id": id or new_id("re"),
        "object": "refund",
        "amount": amount,
        "balance_transaction": None if status in ("requires_action", "canceled") else new_id("txn"),
        "charge": charge,
        "created": _now() if created is None else created,
        "currency": currency,
        "destination_details": {
            "card": {
                "reference": _random(12, string.digits) if status == "succeeded" else None,
                "reference_status": reference_status.get(status, "pending"),
                "reference_type": "acquirer_reference_number",
                "type": "refund",
            },
            "type": "card",
        },
    }
    if failed:
        obj["failure_balance_transaction"] = new_id("txn")
        obj["failure_reason"] = failure_reason or "unknown"
    obj.update(
        {
            "metadata": dict(metadata or {}),
            "payment_intent": payment_intent,
            "reason": reason,
            "receipt_number": None,
            "source_transfer_reversal": None,
            "status": status,
            "transfer_reversal": None,
        }
    )
    return obj


def _dispute_balance_transaction(
    *, dispute_id: str, charge_id: str, amount: int, currency: str, created: int, reinstated: bool
) -> JSON:
    fee = 0 if reinstated else _DISPUTE_FEE
    signed = amount if reinstated else -amount
    return {
        "id": new_id("txn"),
        "object": "balance_transaction",
        "amount": signed,
        "available_on": created + 2 * _DAY,
        "created": created,
        "currency": currency,
        "description": f"Chargeback {'reversal' if reinstated else 'withdrawal'} for {charge_id}",
        "exchange_rate": None,
        "fee": fee,
        "fee_details": []
        if reinstated
        else [
            {
                "amount": fee,
                "application": None,
                "currency": currency,
                "description": "Dispute fee",
                "type": "stripe_fee",
            }
        ],
        "net": signed - fee,
        "reporting_category": "dispute_reversal" if reinstated else "dispute",
        "source": dispute_id,
        "status": "available",
        "type": "adjustment",
    }


def dispute(
    *,
    id: str | None = None,
    charge: str,
    amount: int,
    currency: str = "usd",
    status: str = "needs_response",
    reason: str = "fraudulent",
    payment_intent: str | None = None,
    created: int | None = None,
    livemode: bool = False,
) -> JSON:
    """A card Dispute (``"object": "dispute"``) in its 2024-10-28.acacia shape.

    ``warning_*`` statuses (and ``prevented``) are inquiries: no funds move, so
    ``balance_transactions`` is empty and the charge is still refundable. The other
    statuses are chargebacks, which embed the withdrawal balance transaction (plus the
    reinstatement once ``won``) as full objects, as Stripe does.
    """
    _check(status, _DISPUTE_STATUSES, "dispute status")
    dispute_id = id or new_id("dp")
    created = _now() if created is None else created
    inquiry = status.startswith("warning_") or status == "prevented"
    submitted = status in ("warning_under_review", "warning_closed", "under_review", "won", "lost")
    due_by = (created // _DAY + 8) * _DAY - 1  # 23:59:59 UTC, a week on

    balance_transactions: list[JSON] = []
    if not inquiry:
        balance_transactions.append(
            _dispute_balance_transaction(
                dispute_id=dispute_id,
                charge_id=charge,
                amount=amount,
                currency=currency,
                created=created,
                reinstated=False,
            )
        )
        if status == "won":
            balance_transactions.append(
                _dispute_balance_transaction(
                    dispute_id=dispute_id,
                    charge_id=charge,
                    amount=amount,
                    currency=currency,
                    created=created,
                    reinstated=True,
                )
            )

    evidence: JSON = {field: None for field in _DISPUTE_EVIDENCE_FIELDS}
    evidence["enhanced_evidence"] = {}
    evidence = dict(sorted(evidence.items()))

    return {
        "id": dispute_id,
        "object": "dispute",
        "amount": amount,
        "balance_transactions": balance_transactions,
        "charge": charge,
        "created": created,
        "currency": currency,
        "enhanced_eligibility_types": [],
        "evidence": evidence,
        "evidence_details": {
            "due_by": due_by,
            "enhanced_eligibility": {},
            "has_evidence": submitted,
            "past_due": False,
            "submission_count": 1 if submitted else 0,
        },
        "is_charge_refundable": inquiry,
        "livemode": livemode,
        "metadata": {},
        "payment_intent": payment_intent,
        "payment_method_details": {
            "card": {
                "brand": "visa",
                "case_type": "inquiry" if inquiry else "chargeback",
                "network_reason_code": _VISA_REASON_CODES.get(reason),
            },
            "type": "card",
        },
        "reason": reason,
        "status": status,
    }


def payment_intent(
    *,
    id: str | None = None,
    amount: int = 4999,
    currency: str = "usd",
    status: str = "succeeded",
    latest_charge: str | Mapping[str, Any] | None = None,
    charges: Sequence[Mapping[str, Any]] | None = None,
    customer: str | None = None,
    metadata: Mapping[str, str] | None = None,
    created: int | None = None,
    livemode: bool = False,
    api_version: str = CURRENT_API_VERSION,
) -> JSON:
    """A PaymentIntent (``"object": "payment_intent"``) as rendered in ``api_version``.

    ``charges`` are the intent's Charge dicts, oldest first; ``latest_charge`` is a charge
    id or Charge dict and defaults to the last of ``charges``.

    * Current shape: ``latest_charge`` is that charge's id (or ``null``); nothing embedded.
    * Legacy shape: ``charges`` is a list object (newest first). When only ``latest_charge``
      is given, it is embedded: a dict as is, an id as a charge built to match this intent.
      Embedded charges are copies whose ``payment_intent`` is filled in when ``None``.

    ``amount_received`` is ``amount`` once ``succeeded`` (else 0); ``amount_capturable`` is
    ``amount`` in ``requires_capture``.
    """
    embeds = _embeds_lists(api_version)
    date = _version_date(api_version)
    old_names = date < _PAYMENT_METHOD_NAMES
    if old_names:
        status = _PRE_2019_PAYMENT_INTENT_STATUSES.get(status, status)
    _check(status, _PAYMENT_INTENT_STATUSES, "payment intent status")
    intent_id = id or new_id("pi")
    created = _now() if created is None else created

    charge_list = [copy.deepcopy(dict(c)) for c in charges] if charges is not None else []
    if latest_charge is None and charge_list:
        latest_charge = charge_list[-1]
    if isinstance(latest_charge, Mapping):
        latest_id: str | None = latest_charge["id"]
    else:
        latest_id = latest_charge

    payment_method: str | None = None
    for c in charge_list + ([dict(latest_charge)] if isinstance(latest_charge, Mapping) else []):
        if c.get("id") == latest_id and isinstance(c.get("payment_method"), str):
            payment_method = c["payment_method"]
    if payment_method is None and status not in ("requires_payment_method", "canceled"):
        payment_method = new_id("pm")

    automatic = date >= _AUTOMATIC_PAYMENT_METHODS_DEFAULT
    payment_method_options: JSON = {
        "card": {
            "installments": None,
            "mandate_options": None,
            "network": None,
            "request_three_d_secure": "automatic",
        }
    }
    if automatic:
        payment_method_options["link"] = {"persistent_token": None}

    next_action: JSON | None = None
    if status == "requires_action":
        next_action = {
            "type": "use_stripe_sdk",
            "use_stripe_sdk": {
                "source": new_id("src"),
                "stripe_js": "https://hooks.stripe.com/redirect/authenticate/" + new_id("src"),
                "type": "three_d_secure_redirect",
            },
        }

    obj: JSON = {
        "id": intent_id,
        "object": "payment_intent",
        "allowed_source_types": ["card"],
        "amount": amount,
        "amount_capturable": amount if status == "requires_capture" else 0,
        "amount_details": {"tip": {}},
        "amount_received": amount if status == "succeeded" else 0,
        "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": {"allow_redirects": "always", "enabled": True} if automatic else None,
        "canceled_at": created if status == "canceled" else None,
        "cancellation_reason": None,
        "capture_method": "automatic_async" if date >= _AUTOMATIC_ASYNC_CAPTURE_DEFAULT else "automatic",
    }
    if embeds:
        embedded = charge_list
        if not embedded and latest_charge is not None:
            if isinstance(latest_charge, Mapping):
                embedded = [copy.deepcopy(dict(latest_charge))]
            else:
                embedded = [
                    _charge_for_intent(
                        latest_charge,
                        intent_id=intent_id,
                        amount=amount,
                        currency=currency,
                        intent_status=status,
                        customer=customer,
                        created=created,
                        livemode=livemode,
                        api_version=api_version,
                    )
                ]
        for c in embedded:
            if c.get("payment_intent") is None:
                c["payment_intent"] = intent_id
        ordered = sorted(embedded, key=lambda c: c.get("created", 0), reverse=True)
        obj["charges"] = _list_object(ordered, f"/v1/charges?payment_intent={intent_id}")
    obj.update(
        {
            "client_secret": f"{intent_id}_secret_{_random(25)}",
            "confirmation_method": "automatic",
            "created": created,
            "currency": currency,
            "customer": customer,
            "description": None,
            "invoice": None,
            "last_payment_error": None,
        }
    )
    if not embeds:
        obj["latest_charge"] = latest_id
    obj.update(
        {
            "livemode": livemode,
            "metadata": dict(metadata or {}),
            "next_action": next_action,
            "on_behalf_of": None,
            "payment_method": payment_method,
            "payment_method_configuration_details": {"id": new_id("pmc"), "parent": None} if automatic else None,
            "payment_method_options": payment_method_options,
            "payment_method_types": ["card", "link"] if automatic else ["card"],
            "processing": None,
            "receipt_email": None,
            "review": None,
            "setup_future_usage": None,
            "shipping": None,
            "source": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": status,
            "transfer_data": None,
            "transfer_group": None,
        }
    )
    if old_names:
        renamed = {v: k for k, v in _PRE_2019_PAYMENT_INTENT_STATUSES.items()}
        obj["status"] = renamed.get(status, status)
        del obj["payment_method_types"]
        action = obj.pop("next_action")
        obj["next_source_action"] = (
            None
            if action is None
            else {
                "type": "authorize_with_url",
                "authorize_with_url": {
                    "return_url": "https://example.com/checkout/complete",
                    "url": action["use_stripe_sdk"]["stripe_js"],
                },
            }
        )
    else:
        del obj["allowed_source_types"]
    return obj


def _charge_for_intent(
    charge_id: str,
    *,
    intent_id: str,
    amount: int,
    currency: str,
    intent_status: str,
    customer: str | None,
    created: int,
    livemode: bool,
    api_version: str,
) -> JSON:
    """The charge behind ``latest_charge`` when only its id is known (legacy embedding)."""
    if intent_status in ("succeeded", "requires_capture"):
        status, captured = "succeeded", intent_status == "succeeded"
    elif intent_status == "processing":
        status, captured = "pending", True
    else:
        status, captured = "failed", False
    return charge(
        id=charge_id,
        amount=amount,
        currency=currency,
        status=status,
        captured=captured,
        payment_intent=intent_id,
        customer=customer,
        created=created,
        livemode=livemode,
        api_version=api_version,
    )


_CHECKOUT_STATUSES: Final = frozenset({"open", "complete", "expired"})
_CHECKOUT_PAYMENT_STATUSES: Final = frozenset({"paid", "unpaid", "no_payment_required"})
_CHECKOUT_SESSION_LIFETIME: Final = _DAY  # expires_at defaults to 24 hours after created


def checkout_session(
    *,
    id: str | None = None,
    amount_total: int | None = 4999,
    currency: str | None = "usd",
    mode: str = "payment",
    status: str = "complete",
    payment_status: str | None = None,
    payment_intent: str | None = None,
    client_reference_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    customer: str | None = None,
    customer_email: str | None = None,
    payment_link: str | None = None,
    created: int | None = None,
    expires_at: int | None = None,
    livemode: bool = False,
    api_version: str = CURRENT_API_VERSION,
) -> JSON:
    """A Checkout Session (``"object": "checkout.session"``) as rendered in ``api_version``.

    ``status`` is ``open``, ``complete`` or ``expired``; ``payment_status`` defaults to
    ``paid`` for a complete session and ``unpaid`` otherwise (``unpaid`` with ``complete``
    is an async payment, e.g. a bank debit, still processing or failed).

    * From 2022-08-01 the PaymentIntent is created when the customer pays:
      ``payment_intent`` is ``null`` on an open or expired session unless given;
      ``shipping_details``/``shipping_options``/``customer_creation`` replace
      ``shipping``/``shipping_rates``.
    * Before it (e.g. ``2020-08-27``), a payment-mode session gets its PaymentIntent at
      creation: ``payment_intent`` is set whatever the status (a ``pi_`` id is made up
      when none is given).
    * From 2023-08-16 ``payment_method_configuration_details`` is set and
      ``payment_method_types`` includes ``link``.

    ``url`` is the hosted page while ``open`` and ``null`` afterwards; ``client_secret``
    is ``null`` for hosted sessions.
    """
    date = _version_date(api_version)
    _check(status, _CHECKOUT_STATUSES, "checkout session status")
    if payment_status is None:
        payment_status = "paid" if status == "complete" else "unpaid"
    _check(payment_status, _CHECKOUT_PAYMENT_STATUSES, "checkout payment status")
    if mode not in ("payment", "setup", "subscription"):
        raise ValueError(f"checkout mode {mode!r} is not payment, setup or subscription")
    session_id = id or f"cs_{'live' if livemode else 'test'}_{_random(58)}"
    created = _now() if created is None else created
    expires_at = created + _CHECKOUT_SESSION_LIFETIME if expires_at is None else expires_at
    deferred = date >= _CHECKOUT_DEFERRED_PAYMENT_INTENT
    if payment_intent is None and mode == "payment" and (not deferred or status == "complete"):
        payment_intent = new_id("pi")
    automatic = date >= _AUTOMATIC_PAYMENT_METHODS_DEFAULT
    complete = status == "complete"
    obj: JSON = {
        "id": session_id,
        "object": "checkout.session",
        "after_expiration": None,
        "allow_promotion_codes": None,
        "amount_subtotal": amount_total,
        "amount_total": amount_total,
        "automatic_tax": {"enabled": False, "liability": None, "status": None},
        "billing_address_collection": None,
        "cancel_url": "https://example.com/cart",
        "client_reference_id": client_reference_id,
        "client_secret": None,
        "consent": None,
        "consent_collection": None,
        "created": created,
        "currency": currency,
        "currency_conversion": None,
        "custom_fields": [],
        "custom_text": {"after_submit": None, "shipping_address": None, "submit": None, "terms_of_service_acceptance": None},
        "customer": customer,
    }
    if deferred:
        obj["customer_creation"] = None if customer else "if_required"
    obj.update(
        {
            "customer_details": (
                {
                    "address": None,
                    "email": customer_email or "jenny.rosen@example.com",
                    "name": None,
                    "phone": None,
                    "tax_exempt": "none",
                    "tax_ids": [],
                }
                if complete
                else None
            ),
            "customer_email": customer_email,
            "expires_at": expires_at,
            "invoice": None,
            "invoice_creation": {"enabled": False, "invoice_data": {"account_tax_ids": None, "custom_fields": None, "description": None, "footer": None, "issuer": None, "metadata": {}, "rendering_options": None}} if mode == "payment" else None,
            "livemode": livemode,
            "locale": None,
            "metadata": dict(metadata or {}),
            "mode": mode,
            "payment_intent": payment_intent if mode == "payment" else None,
            "payment_link": payment_link,
            "payment_method_collection": "if_required" if mode != "payment" else None,
            "payment_method_configuration_details": {"id": new_id("pmc"), "parent": None} if automatic else None,
            "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
            "payment_method_types": ["card", "link"] if automatic else ["card"],
            "payment_status": payment_status,
            "phone_number_collection": {"enabled": False},
            "recovered_from": None,
            "saved_payment_method_options": None,
            "setup_intent": new_id("seti") if mode == "setup" else None,
            "shipping_address_collection": None,
            "shipping_cost": None,
        }
    )
    if deferred:
        obj["shipping_details"] = None
        obj["shipping_options"] = []
    else:
        obj["shipping"] = None
        obj["shipping_rates"] = []
    obj.update(
        {
            "status": status,
            "submit_type": None,
            "subscription": new_id("sub") if mode == "subscription" and complete else None,
            "success_url": "https://example.com/success?session_id={CHECKOUT_SESSION_ID}",
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": "hosted",
            "url": f"https://checkout.stripe.com/c/pay/{session_id}#fidkdWxOYHwnPyd1blpxYHZxWjA0" if status == "open" else None,
        }
    )
    return obj


# -- events and delivery -------------------------------------------------------------------


def event(
    type: str,
    obj: Mapping[str, Any],
    *,
    id: str | None = None,
    created: int | None = None,
    api_version: str = CURRENT_API_VERSION,
    livemode: bool | None = None,
    account: str | None = None,
    previous_attributes: Mapping[str, Any] | None = None,
    pending_webhooks: int = 1,
    request_id: str | None = None,
    idempotency_key: str | None = None,
) -> JSON:
    """An Event (``"object": "event"``) wrapping a deep copy of ``obj``.

    ``account`` appears only when given (Connect events); ``data.previous_attributes`` only
    when given (``*.updated`` events). ``livemode`` defaults to the object's. ``request``
    is ``{"id": request_id, "idempotency_key": idempotency_key}``: ``null`` ids are what
    Stripe sends for events no API request caused (disputes, async state changes); pass
    ``request_id=new_id("req")`` for API-caused ones.
    """
    _version_date(api_version)
    data: JSON = {"object": copy.deepcopy(dict(obj))}
    if previous_attributes is not None:
        data["previous_attributes"] = copy.deepcopy(dict(previous_attributes))
    envelope: JSON = {"id": id or new_id("evt"), "object": "event"}
    if account is not None:
        envelope["account"] = account
    envelope.update(
        {
            "api_version": api_version,
            "created": _now() if created is None else created,
            "data": data,
            "livemode": bool(obj.get("livemode", False)) if livemode is None else livemode,
            "pending_webhooks": pending_webhooks,
            "request": {"id": request_id, "idempotency_key": idempotency_key},
            "type": type,
        }
    )
    return envelope


def encode(event: Mapping[str, Any]) -> bytes:
    """The webhook body for ``event``: pretty-printed JSON, as Stripe sends it."""
    return json.dumps(event, indent=2).encode("utf-8")


def sign(payload: bytes, secret: str, *, timestamp: int | None = None) -> str:
    """A real ``Stripe-Signature`` header (``t=...,v1=...``) for ``payload``, made by the
    Stripe SDK's own signer, so ``stripe.Webhook.construct_event`` accepts it."""
    return stripe.WebhookSignature.generate_signature_header(
        payload.decode("utf-8"), secret, timestamp=timestamp
    )
