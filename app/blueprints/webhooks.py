"""``POST /webhooks/stripe``: hands the raw body to the ingest service."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from app.errors import error_response
from app.factory import services
from app.services.ingest import IngestRejected

bp = Blueprint("webhooks", __name__)


@bp.post("/webhooks/stripe")
def stripe_webhook():  # type: ignore[no-untyped-def]
    # The signature covers the raw bytes: read them before anything parses the body.
    payload = request.get_data(cache=False)
    try:
        result = services().ingestor.ingest(payload, request.headers.get("Stripe-Signature"))
    except IngestRejected as exc:
        return error_response(exc.http_status, exc.code, exc.message)
    return jsonify(result.body), result.http_status
