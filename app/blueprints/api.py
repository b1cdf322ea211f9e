"""JSON API under ``/api``, for the merchant's backend and finance tools (bearer token)."""

from __future__ import annotations

from dataclasses import asdict

from flask import Blueprint, jsonify, request

from app.api_auth import actor as _actor
from app.api_auth import require_token
from app.errors import domain_error_response, error_response
from app.openapi import openapi_document
from app.extensions import services
from app.case_query import parse_filter
from domain.cases.review import CaseActionError, approve, approve_many, dismiss, parse_case_ids, parse_refund_plan
from domain.cases.views import case_view, list_cases, run_views
from domain.orders import (
    OrderError,
    OrderInput,
    event_view,
    order_view,
    unresolved_failures,
    upsert_order,
)
from models import run_in_transaction

bp = Blueprint("api", __name__, url_prefix="/api")


# Bearer token whose scope covers the endpoint (app/api_auth.py); 401/403 otherwise.
bp.before_request(require_token)


@bp.get("/openapi.json")
def openapi():  # type: ignore[no-untyped-def]
    """The OpenAPI 3.0 description of the JSON API and the pay endpoint (no token needed)."""
    return jsonify(openapi_document())


@bp.post("/orders")
def create_or_update_order():  # type: ignore[no-untyped-def]
    body = _optional_json()
    if isinstance(body, tuple):
        return body
    if body is None:
        return error_response(400, "invalid_json", "The body must be a JSON object.")
    try:
        order_input = OrderInput.parse(body)

        def work(session):  # type: ignore[no-untyped-def]
            _, created = upsert_order(session, order_input, source="api")
            return created, order_view(session, order_input.id)

        created, view = run_in_transaction(services().session_factory, work)
    except OrderError as exc:
        return domain_error_response(exc)
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


# -- duplicate cases -----------------------------------------------------------------------


def _case_error(exc: CaseActionError):  # type: ignore[no-untyped-def]
    return domain_error_response(exc)


@bp.get("/duplicates")
def list_duplicates():  # type: ignore[no-untyped-def]
    try:
        case_filter = parse_filter(request.args)
    except CaseActionError as exc:
        return _case_error(exc)
    with services().read_session_factory() as session:
        return jsonify(list_cases(session, case_filter))


@bp.get("/duplicates/<id:case_id>")
def get_duplicate(case_id: int):  # type: ignore[no-untyped-def]
    with services().read_session_factory() as session:
        view = case_view(session, case_id)
    if view is None:
        return error_response(404, "case_not_found", f"No case {case_id}.")
    return jsonify(view)


@bp.post("/duplicates/<id:case_id>/refund")
def refund_duplicate(case_id: int):  # type: ignore[no-untyped-def]
    """Approve the case's proposed refund (no body, or ``{}``), or refund chosen charges:
    ``{"refunds": [{"charge_id": "ch_...", "amount": 4999}], "note": "..."}``."""
    body = _optional_json()
    if isinstance(body, tuple):
        return body
    try:
        plan = parse_refund_plan(body)
        note = body.get("note") if isinstance(body, dict) else None
        result = approve(services().refunds, case_id, actor=_actor(), plan=plan, note=note)
    except CaseActionError as exc:
        return _case_error(exc)
    with services().read_session_factory() as session:
        view = case_view(session, case_id)
    return jsonify({"case": view, "outcomes": [asdict(o) for o in result.outcomes]})


@bp.post("/duplicates/approve")
@bp.post("/cases/approve")
def approve_duplicates():  # type: ignore[no-untyped-def]
    """Approve several cases' proposals at once: ``{"ids": [12, 13], "note": "..."}``.

    Only open cases of clear duplicates whose proposal is a full refund go through (as on
    the review page's "approve selected"); each is approved alone, through the same phased
    refund and audit entry as ``POST /api/duplicates/<id>/refund``. The answer is 200 with
    one result per id (``refunded``, ``approved``, ``refused`` with a code and the reason,
    or ``not_started``); a malformed body is a 400/422 and changes nothing."""
    body = _optional_json()
    if isinstance(body, tuple):
        return body
    if body is None:
        return error_response(400, "invalid_json", "The body must be a JSON object: {\"ids\": [case ids]}.")
    try:
        ids = parse_case_ids(body.get("ids"))
        note = body.get("note")
        results = approve_many(services().refunds, services().session_factory, ids, actor=_actor(), note=note)
    except CaseActionError as exc:
        return _case_error(exc)
    counts = {kind: sum(1 for r in results if r.result == kind) for kind in ("refunded", "approved", "refused", "not_started")}
    return jsonify({"results": [r.as_json() for r in results], "counts": counts})


@bp.post("/duplicates/<id:case_id>/dismiss")
def dismiss_duplicate(case_id: int):  # type: ignore[no-untyped-def]
    body = _optional_json()
    if isinstance(body, tuple):
        return body
    try:
        dismiss(services().session_factory, case_id, actor=_actor(), note=(body or {}).get("note"))
    except CaseActionError as exc:
        return _case_error(exc)
    with services().read_session_factory() as session:
        return jsonify(case_view(session, case_id))


@bp.get("/runs")
def list_runs():  # type: ignore[no-untyped-def]
    with services().read_session_factory() as session:
        return jsonify({"data": run_views(session)})


def _optional_json():  # type: ignore[no-untyped-def]
    """The JSON object body, None when there is none, or a 400 response."""
    if not request.get_data(cache=True):
        return None
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        body = None
    if not isinstance(body, dict):
        return error_response(400, "invalid_json", "The body must be a JSON object.")
    return body
