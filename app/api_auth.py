"""The API's door: bearer tokens with scopes, the actor they put in the audit log, and
what :func:`install` sets up on the app (converters, tokens, the client-secret sealer).

Which scope opens which endpoint is :data:`ENDPOINT_SCOPES`; an endpoint not listed is
open to the full (legacy ``API_TOKEN``) token only, so a new route is closed until it is
given a scope. ``read`` never opens anything but GET and HEAD.

Answers: 401 ``unauthorized`` (no token, or not one of ours), 403 ``insufficient_scope``
(a valid token whose scope does not cover the endpoint), 401 ``api_token_not_configured``
when the server has no token at all.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, current_app, g, request

from app import converters
from app.errors import error_response
from app.services.api_tokens import ApiClient, TokenDirectory
from domain.payments.sealing import Sealer
from config import Settings

log = logging.getLogger(__name__)

ENDPOINT_SCOPES: dict[str, frozenset[str]] = {
    "payments.pay": frozenset({"pay"}),
    "payments.checkout": frozenset({"pay"}),
    "api.create_or_update_order": frozenset({"pay"}),
    "api.get_order": frozenset({"pay", "read"}),
    "api.get_event": frozenset({"read"}),
    "api.list_events": frozenset({"read"}),
    "api.list_duplicates": frozenset({"finance", "read"}),
    "api.get_duplicate": frozenset({"finance", "read"}),
    "api.refund_duplicate": frozenset({"finance"}),
    "api.dismiss_duplicate": frozenset({"finance"}),
    "api.approve_duplicates": frozenset({"finance"}),
    "api.list_runs": frozenset({"finance", "read"}),
    "health.prometheus_metrics": frozenset({"metrics"}),
}
#: Served without a token: the API description holds no data.
PUBLIC_ENDPOINTS = frozenset({"api.openapi"})
_SAFE_METHODS = frozenset({"GET", "HEAD"})
_MAX_PERSON = 100


def install(app: Flask, settings: Settings) -> None:
    """Called by the factory before the blueprints are registered."""
    converters.register(app.url_map)
    converters.guard_query_dates(app)
    app.extensions["api_tokens"] = TokenDirectory(settings.api_tokens, settings.api_token)
    app.extensions["secret_sealer"] = Sealer(app.config["SECRET_KEY"])
    if settings.api_token:
        log.warning(
            "API_TOKEN is deprecated: it opens every endpoint (pay, refunds, dismissals, metrics) and "
            "will stop working in the next release; give each client its own scoped token in API_TOKENS "
            "(`reconciler api-tokens create NAME SCOPE`)"
        )


def sealer() -> Sealer:
    return current_app.extensions["secret_sealer"]


def require_token():  # type: ignore[no-untyped-def]
    """``before_request`` of the API blueprints: a bearer token whose scope covers the
    endpoint. Sets ``g.api_client``."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    directory: TokenDirectory = current_app.extensions["api_tokens"]
    if not directory.configured:
        return error_response(
            401, "api_token_not_configured", "Neither API_TOKENS nor API_TOKEN is set on this server; the API is closed."
        )
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    client = directory.authenticate(presented.strip()) if scheme.lower() == "bearer" else None
    if client is None:
        response, status = error_response(401, "unauthorized", "A valid bearer token is required.")
        response.headers["WWW-Authenticate"] = 'Bearer realm="api"'
        return response, status
    allowed = ENDPOINT_SCOPES.get(request.endpoint or "", frozenset())
    if client.scope == "read" and request.method not in _SAFE_METHODS:
        allowed = frozenset()
    if not client.may(allowed):
        response, status = error_response(
            403,
            "insufficient_scope",
            f"The token {client.name!r} (scope {client.scope}) may not do this; "
            f"it needs a token with scope {' or '.join(sorted(allowed)) or 'full'}.",
            required_scopes=sorted(allowed),
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="api", error="insufficient_scope"'
        return response, status
    g.api_client = client
    return None


def metrics_guard():  # type: ignore[no-untyped-def]
    """``/metrics``: 404 ``metrics_disabled`` when no token could scrape it, else as
    :func:`require_token` (a ``metrics`` token, or the full legacy one)."""
    directory: TokenDirectory = current_app.extensions["api_tokens"]
    if not directory.can_grant("metrics"):
        return error_response(
            404, "metrics_disabled", "/metrics is disabled: configure a token with scope metrics in API_TOKENS."
        )
    return require_token()


def actor() -> str:
    """The audit log's actor: ``api:<token name>``, plus the person named in ``X-Actor``
    in brackets (``api:finance-tool (dana)``); the header can add a name, never replace
    the token's. The legacy token keeps its old form (``api``, ``api:<X-Actor>``)."""
    client: ApiClient | None = g.get("api_client")
    person = _person(request.headers.get("X-Actor", ""))
    if client is None or client.legacy:
        return f"api:{person}" if person else "api"
    return f"api:{client.name} ({person})" if person else f"api:{client.name}"


def _person(raw: str) -> str | None:
    person = " ".join(raw.split())
    if not person or len(person) > _MAX_PERSON or not person.isprintable() or any(c in person for c in "()"):
        return None
    return person


