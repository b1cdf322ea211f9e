"""``GET /healthz``: 200 when the database answers, 503 otherwise. Once a scheduler has
recorded itself (``reconciler serve`` runs one), also whether it is running and when the
next reconciliation pass is due (``scheduler``, ``next_pass_at``)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from app.factory import services

bp = Blueprint("health", __name__)
log = logging.getLogger(__name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    from jobs.schedule_state import schedule_view

    try:
        with services().read_session_factory() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to reach the database is "unhealthy"
        log.warning("health check failed: %s", type(exc).__name__)
        return jsonify({"status": "unavailable", "database": "unreachable"}), 503
    body: dict[str, object] = {"status": "ok", "database": "ok"}
    try:
        with services().read_session_factory() as session:
            schedule = schedule_view(session)
        if schedule.known:
            body.update(schedule.as_json())
    except Exception as exc:  # the web answers whatever the scheduler bookkeeping says
        log.warning("scheduler state unreadable: %s", type(exc).__name__)
    return jsonify(body), 200


@bp.get("/metrics")
def prometheus_metrics():  # type: ignore[no-untyped-def]
    """Prometheus exposition: every worker's counters plus series read from the ledger.
    Needs a bearer token with scope ``metrics`` (or the full legacy ``API_TOKEN``); 404
    ``metrics_disabled`` when none is configured (refunded amounts are business data)."""
    from app import metrics
    from app.api_auth import metrics_guard

    refused = metrics_guard()
    if refused is not None:
        return refused

    return Response(metrics.render(services().read_session_factory), mimetype=metrics.CONTENT_TYPE_LATEST)
