"""``POST /orders/<order_id>/pay``: the order's one payable PaymentIntent, and
``POST /orders/<order_id>/checkout``: its one open Checkout Session (bearer token).

Thin: checks the token, the ``Idempotency-Key`` header and the body, then hands over to
:mod:`domain.payments.service` (the phases) and :mod:`domain.payments.idempotency` (replay).
"""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Blueprint, Response, request

from app.api_auth import require_token, sealer
from app.errors import domain_error_response, error_response, status_of
from app.extensions import services
from domain.payments import idempotency
from domain.payments.checkout import CheckoutRequest, CheckoutService
from domain.payments.service import PayError, PaymentService, PayRequest, reply_to_store, restore_reply
from domain.stripe.shapes import ORDER_ID

bp = Blueprint("payments", __name__)
bp.before_request(require_token)

IDEMPOTENCY_SCOPE = "pay"
_STRIPE_IDS = {
    # fullmatch: "$" would also accept a trailing newline (pm_abc\n reached Stripe).
    "payment_method": re.compile(r"(pm|card|src)_[A-Za-z0-9_]{1,250}"),
    "customer": re.compile(r"cus_[A-Za-z0-9_]{1,250}"),
}
# Answers that say "try again", never replayed for an Idempotency-Key.
_TRANSIENT_CODES = {"payment_in_progress"}


@bp.post("/orders/<path:order_id>/pay")
def pay(order_id: str):  # type: ignore[no-untyped-def]
    try:
        key = idempotency.validate_key(request.headers.get("Idempotency-Key"))
    except idempotency.IdempotencyKeyError as exc:
        return domain_error_response(exc)
    body, error = _parse_body()
    if error is not None:
        return error
    assert body is not None
    if not ORDER_ID.fullmatch(order_id):
        # No order can have this id; same answer as an unknown one.
        return error_response(404, "order_not_found", "No such order.")

    svc = services()
    held: idempotency.Claim | None = None
    if key is not None:
        try:
            claimed = idempotency.claim(
                svc.session_factory,
                scope=IDEMPOTENCY_SCOPE,
                key=key,
                request_fingerprint=idempotency.fingerprint(request.method, request.path, body),
                ttl_hours=svc.settings.idempotency_key_ttl_hours,
            )
        except idempotency.IdempotencyKeyError as exc:
            return domain_error_response(exc)
        if isinstance(claimed, idempotency.Replay):
            try:
                replayed = json.dumps(restore_reply(json.loads(claimed.body), sealer(), svc.gateway))
            except PayError as exc:
                response, status = error_response(status_of(exc), exc.code, exc.message)
                response.headers["Retry-After"] = str(exc.details.get("retry_after", 1))
                return response, status
            response = Response(replayed, status=claimed.status, mimetype="application/json")
            response.headers["Idempotent-Replayed"] = "true"
            return response
        held = claimed

    try:
        status, payload, retry_after = _pay(svc, order_id, body)
    except BaseException:
        if held is not None:
            idempotency.release(svc.session_factory, held)
        raise
    text = json.dumps(payload)
    if held is not None:
        if status >= 500 or payload.get("error") in _TRANSIENT_CODES:
            idempotency.release(svc.session_factory, held)
        else:
            # Kept with the client_secret sealed, never in clear.
            idempotency.finish(svc.session_factory, held, status, json.dumps(reply_to_store(payload, sealer())))
    response = Response(text, status=status, mimetype="application/json")
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _pay(svc: Any, order_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], int | None]:
    service = PaymentService(svc.settings, svc.session_factory, svc.gateway, sealer=sealer())
    try:
        result = service.pay(
            PayRequest(order_id=order_id, customer=body.get("customer"), payment_method=body.get("payment_method"))
        )
    except PayError as exc:
        extra = {k: v for k, v in exc.details.items() if k != "retry_after"}
        return status_of(exc), {"error": exc.code, "message": exc.message, **extra}, exc.details.get("retry_after")
    return (201 if result.created else 200), result.body, None


def _json_object(allowed: Any) -> tuple[dict[str, Any] | None, Any]:
    """The JSON body as a dict of ``allowed`` fields only (empty body: ``{}``), or a 400
    error answer (``invalid_json``, ``unknown_field``)."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}, None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None, error_response(400, "invalid_json", "The body must be a JSON object.")
    if not isinstance(body, dict):
        return None, error_response(400, "invalid_json", "The body must be a JSON object.")
    unknown = set(body) - set(allowed)
    if unknown:
        return None, error_response(400, "unknown_field", f"unknown field(s): {', '.join(sorted(unknown))}")
    return body, None


def _parse_body() -> tuple[dict[str, Any] | None, Any]:
    """The pay endpoint's body: optional Stripe ids of the payment method and customer."""
    body, error = _json_object(_STRIPE_IDS)
    if body is None:
        return None, error
    for name, pattern in _STRIPE_IDS.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not pattern.fullmatch(value):
            return None, error_response(
                400, f"invalid_{name}", f"{name} must be a Stripe {name.replace('_', ' ')} id.", field=name
            )
    return body, None


# -- POST /orders/<order_id>/checkout ------------------------------------------------------

_URL = re.compile(r"https?://[^\s/?#]+[^\s]{0,2000}")
_CHECKOUT_FIELDS = frozenset({"replace", "success_url", "cancel_url"})


@bp.post("/orders/<path:order_id>/checkout")
def checkout(order_id: str):  # type: ignore[no-untyped-def]
    """The order's one open Stripe Checkout Session: 201 created now, 200 the open one."""
    body, error = _parse_checkout_body()
    if error is not None:
        return error
    assert body is not None
    if not ORDER_ID.fullmatch(order_id):
        return error_response(404, "order_not_found", "No such order.")
    svc = services()
    service = CheckoutService(svc.settings, svc.session_factory, svc.gateway)
    try:
        result = service.checkout(
            CheckoutRequest(
                order_id=order_id,
                replace=bool(body.get("replace", False)),
                success_url=body.get("success_url"),
                cancel_url=body.get("cancel_url"),
            )
        )
    except PayError as exc:
        return domain_error_response(exc)
    return Response(json.dumps(result.body), status=201 if result.created else 200, mimetype="application/json")


def _parse_checkout_body() -> tuple[dict[str, Any] | None, Any]:
    body, error = _json_object(_CHECKOUT_FIELDS)
    if body is None:
        return None, error
    if "replace" in body and not isinstance(body["replace"], bool):
        return None, error_response(400, "invalid_replace", "replace must be true or false.", field="replace")
    for name in ("success_url", "cancel_url"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not _URL.fullmatch(value):
            return None, error_response(400, f"invalid_{name}", f"{name} must be an http(s) URL.", field=name)
    return body, None
