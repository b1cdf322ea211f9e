"""``POST /webhooks/stripe``: hands the raw body to the ingest service."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from app import metrics
from app.errors import error_response
from app.factory import services
from app.services.ingest import IngestRejected

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
            result = services().ingestor.ingest(payload, request.headers.get("Stripe-Signature"))
        except IngestRejected as exc:
            metrics.EVENTS.labels(type="unknown", outcome="rejected").inc()
            services().signature_watch.record(exc.code)
            return error_response(exc.http_status, exc.code, exc.message)
    metrics.INGEST_SECONDS.observe(timer.seconds)
    outcome = result.body.get("status") or ("failed" if result.http_status >= 500 else "rejected")
    metrics.EVENTS.labels(type=result.event_type or "unknown", outcome=outcome).inc()
    return jsonify(result.body), result.http_status
