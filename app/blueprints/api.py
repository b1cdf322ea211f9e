"""JSON API under ``/api``, for the merchant's backend and finance tools (bearer token)."""

from __future__ import annotations

import hmac

from flask import Blueprint, jsonify, request

from app.errors import error_response
from app.factory import services
from app.services.orders import (
    OrderError,
    OrderInput,
    event_view,
    order_view,
    unresolved_failures,
    upsert_order,
)
from models import run_in_transaction

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.before_request
def require_token():  # type: ignore[no-untyped-def]
    expected = services().settings.api_token
    if expected is None:
        return error_response(401, "api_token_not_configured", "API_TOKEN is not set on this server; the API is closed.")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        response, status = error_response(401, "unauthorized", "A valid bearer token is required.")
        response.headers["WWW-Authenticate"] = 'Bearer realm="api"'
        return response, status
    return None


@bp.post("/orders")
def create_or_update_order():  # type: ignore[no-untyped-def]
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        body = None
    if not isinstance(body, dict):
        return error_response(400, "invalid_json", "The body must be a JSON object.")
    try:
        order_input = OrderInput.parse(body)

        def work(session):  # type: ignore[no-untyped-def]
            _, created = upsert_order(session, order_input, source="api")
            return created, order_view(session, order_input.id)

        created, view = run_in_transaction(services().session_factory, work)
    except OrderError as exc:
        extra = {"field": exc.field} if exc.field else {}
        return error_response(exc.http_status, exc.code, exc.message, **extra)
    return jsonify(view), 201 if created else 200


@bp.get("/orders/<path:order_id>")
def get_order(order_id: str):  # type: ignore[no-untyped-def]
    with services().read_session_factory() as session:
        view = order_view(session, order_id)
    if view is None:
        return error_response(404, "order_not_found", f"No order {order_id}.")
    return jsonify(view)


@bp.get("/events/<event_id>")
def get_event(event_id: str):  # type: ignore[no-untyped-def]
    with services().read_session_factory() as session:
        view = event_view(session, event_id)
    if view is None:
        return error_response(404, "event_not_found", f"No event {event_id} has been received.")
    return jsonify(view)


@bp.get("/events")
def list_events():  # type: ignore[no-untyped-def]
    if request.args.get("status") != "failed":
        return error_response(400, "unsupported_filter", "Only ?status=failed is supported: events that fail to apply.")
    with services().read_session_factory() as session:
        failures = unresolved_failures(session)
    return jsonify({"data": failures})
