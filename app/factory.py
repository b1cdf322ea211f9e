"""The Flask application factory, one of the two composition roots (the CLI is the other)."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from flask import Flask
from sqlalchemy.orm import Session, sessionmaker

from app.errors import register_error_handlers
from app.extensions import Services, services
from domain.stripe.gateway import StripeGateway
from domain.alerts import Alerter
from domain.cases.refunds import RefundService
from app.services.signature_watch import SignatureFailureWatch
from app.web_security import init_web_security
from jobs.applier import make_applier
from config import Settings
from domain.ledger.applier import Applier
from domain.ledger.inbox import Inbox
from models import make_engine, make_session_factory
from models.db import engine_of, make_read_session_factory

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    session_factory: sessionmaker[Session] | None = None,
    stripe: Any = None,
) -> Flask:
    """Build the app around ``settings`` (default: the environment), a session factory
    (default: one on ``settings.database_url``) and a ``stripe.StripeClient`` (default:
    the real one, built from the settings)."""
    settings = settings or Settings.from_env()
    if session_factory is None:
        session_factory = make_session_factory(make_engine(settings.database_url))
    # A given client is used instead of the one the settings describe; the settings still
    # decide the call policy (tries per call, the rate limit shared by every caller).
    gateway = StripeGateway.from_settings(settings, client=stripe)

    engine = engine_of(session_factory)
    alerter = Alerter(settings, session_factory)

    app = Flask(__name__)
    # Without a configured key each process invents one: fine until there are logins, and
    # Settings refuses REVIEW_USERS without a SECRET_KEY of at least 32 bytes.
    secret_key = settings.secret_key or secrets.token_hex(32)
    app.config.update(
        SECRET_KEY=secret_key,
        # Werkzeug refuses bigger bodies with a 413 before reading them.
        MAX_CONTENT_LENGTH=settings.webhook_max_bytes,
        JSON_SORT_KEYS=False,
    )
    app.extensions["reconciler"] = Services(
        settings=settings,
        session_factory=session_factory,
        read_session_factory=make_read_session_factory(engine),
        gateway=gateway,
        inbox=Inbox(settings, engine),
        # Not run by the web app: `reconciler serve` runs appliers in processes of their
        # own (jobs/applier.py); this one is for draining on demand (tests, operators).
        applier=make_applier(settings, session_factory, alerter=alerter),
        # Finance approvals take the same phased refund path as the job, through the app's
        # gateway: inside a web request a 429 is not waited out (no long backoff holding a
        # worker); an attempt Stripe did not answer stays recorded and the next pass
        # resumes its key.
        refunds=RefundService(session_factory, gateway),
        signature_watch=SignatureFailureWatch(
            alerter.send,
            threshold=settings.signature_alert_threshold,
            window_seconds=settings.signature_alert_window_seconds,
        ),
    )
    if not settings.stripe_webhook_secrets:
        log.warning("STRIPE_WEBHOOK_SECRET is not set: webhooks will be refused with 503")

    # API security: bounded URL converters (before any route is added), scoped API
    # tokens, the sealer of client secrets at rest (app/api_auth.py).
    from app.api_auth import install as install_api_security

    install_api_security(app, settings)
    # Server-side sessions, Flask-Login, login throttling, security headers, proxy trust.
    init_web_security(app, settings, session_factory, secret_key)

    from app.blueprints import api, health, review
    from app.blueprints import payments as payments_blueprint

    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(payments_blueprint.bp)  # POST /orders/<id>/pay
    app.register_blueprint(review.bp)  # /review: the finance review page (HTML, login)
    register_error_handlers(app)
    _record_request_metrics(app)
    # POST /webhooks/stripe is answered in front of Flask (app/webhook_lane.py).
    from app.webhook_lane import WebhookLane

    services_ = app.extensions["reconciler"]
    app.wsgi_app = WebhookLane(  # type: ignore[method-assign]
        app.wsgi_app, services_.inbox, services_.signature_watch, settings.webhook_max_bytes
    )
    return app


def _record_request_metrics(app: Flask) -> None:
    import time

    from flask import g, request

    from app import metrics

    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _observe(response):  # type: ignore[no-untyped-def]
        started = g.pop("request_started", None)
        endpoint = request.endpoint or "unmatched"
        if started is not None:
            metrics.REQUEST_SECONDS.labels(endpoint=endpoint, status=f"{response.status_code // 100}xx").observe(
                time.perf_counter() - started
            )
        if endpoint == "payments.pay":
            metrics.PAY_REQUESTS.labels(outcome=_pay_outcome(response)).inc()
        return response


def _pay_outcome(response) -> str:  # type: ignore[no-untyped-def]
    if response.headers.get("Idempotent-Replayed") == "true":
        return "replayed"
    if response.status_code == 201:
        return "created"
    if response.status_code == 200:
        return "existing"
    body = response.get_json(silent=True) if response.is_json else None
    code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) and code.isidentifier() and len(code) < 40 else f"http_{response.status_code}"
