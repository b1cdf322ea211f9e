"""``POST /webhooks/stripe``: verify, store once in the inbox, answer. Nothing else.

Answers: 200 ``{"status": "received" | "duplicate" | "ignored", "event_id": ...}`` once the
event is durably stored (or was already); 4xx with a JSON error code for a body that must
not be stored; 503 when it could not be stored (Stripe redelivers). The ledger effects
follow from the applier (``GET /api/events/<id>`` shows received | applied | failed).
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from app import metrics
from app.errors import domain_status, error_response
from app.factory import services
from domain.errors import DomainError, Rejected

bp = Blueprint("webhooks", __name__)


@bp.post("/webhooks/stripe")
def stripe_webhook():  # type: ignore[no-untyped-def]
    # The signature covers the raw bytes: read them before anything parses the body.
    payload = request.get_data(cache=False)
    if request.content_length is None and len(payload) >= services().settings.webhook_max_bytes:
        # A chunked body (no Content-Length) is cut at MAX_CONTENT_LENGTH without an error
        # by Werkzeug's stream: reaching the limit means there was more (or exactly that).
        metrics.EVENTS.labels(type="unknown", outcome="rejected").inc()
        return error_response(413, "payload_too_large", "The body is larger than WEBHOOK_MAX_BYTES.")
    with metrics.Timer() as timer:
        try:
            accepted = services().inbox.accept(payload, request.headers.get("Stripe-Signature"))
        except DomainError as exc:
            rejected = isinstance(exc, Rejected)
            metrics.EVENTS.labels(type="unknown", outcome="rejected" if rejected else "failed").inc()
            if rejected:
                services().signature_watch.record(exc.code)
            return error_response(domain_status(exc), exc.code, exc.message)
    metrics.INGEST_SECONDS.observe(timer.seconds)
    metrics.EVENTS.labels(type=accepted.event_type, outcome=accepted.status).inc()
    body = {"status": accepted.status, "event_id": accepted.event_id}
    if accepted.reason:
        body["reason"] = accepted.reason
    return jsonify(body), 200
