"""``GET /healthz``: 200 when the database answers (503 otherwise), with the inbox's
backlog and the appliers' heartbeat: ``applier`` is ``ok`` when one beat within the last
20 s, ``stale`` when events wait and none did (the service still accepts events; they are
applied once an applier runs again), ``idle`` when none runs and nothing waits. And the
scheduler: ``scheduler`` is ``running`` when one recorded itself within the last three
minutes (``reconciler serve`` runs one), with ``next_pass_at``, when the next
reconciliation pass is due; else ``not running``, with ``scheduler_last_seen``."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from app.extensions import services
from domain.ledger.applier import inbox_state

bp = Blueprint("health", __name__)
log = logging.getLogger(__name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    from jobs.schedule_state import schedule_view

    try:
        with services().read_session_factory() as session:
            session.execute(text("SELECT 1"))
            state = inbox_state(session)
    except Exception as exc:  # any failure to reach the database is "unhealthy"
        log.warning("health check failed: %s", type(exc).__name__)
        return jsonify({"status": "unavailable", "database": "unreachable"}), 503
    applier = "ok" if state.appliers else ("stale" if state.pending else "idle")
    body: dict[str, object] = {
        "status": "ok" if applier != "stale" else "degraded",
        "database": "ok",
        "applier": applier,
        "appliers_live": state.appliers,
        "applier_heartbeat_age_seconds": _rounded(state.last_heartbeat_seconds),
        "inbox": {
            "pending": state.pending,
            "failed": state.failed,
            "oldest_pending_seconds": _rounded(state.oldest_pending_seconds),
        },
    }
    try:
        with services().read_session_factory() as session:
            body.update(schedule_view(session).as_json())
    except Exception as exc:  # the web answers whatever the scheduler bookkeeping says
        log.warning("scheduler state unreadable: %s", type(exc).__name__)
    return jsonify(body), 200


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


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
