"""``POST /webhooks/stripe``: verify, store once in the inbox, answer. Nothing else.

Answers: 200 ``{"status": "received" | "duplicate" | "ignored", "event_id": ...}`` once the
event is durably stored (or was already); 4xx with a JSON error code for a body that must
not be stored; 503 when it could not be stored (Stripe redelivers). The ledger effects
follow from the applier (``GET /api/events/<id>`` shows received | applied | failed).

This endpoint is a WSGI layer in front of Flask rather than a blueprint: it is the path
every webhook takes at a merchant's peak, and Flask's per-request machinery (request
context, session interface, Flask-Login, Talisman's headers, before/after hooks) cost more
CPU than the whole accept (measured in-process: 0.77 ms a request through Flask against
0.2 ms for the accept itself). It needs none of it: no cookie, no session, no HTML. Every
other path goes to Flask untouched.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterable

from app import metrics
from app.errors import status_of
from app.services.signature_watch import SignatureFailureWatch
from domain.errors import DomainError, Rejected
from domain.ledger.inbox import Inbox

log = logging.getLogger(__name__)

PATH = "/webhooks/stripe"
WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]

_REASONS = {200: "200 OK", 400: "400 BAD REQUEST", 405: "405 METHOD NOT ALLOWED", 413: "413 REQUEST ENTITY TOO LARGE",
            500: "500 INTERNAL SERVER ERROR", 503: "503 SERVICE UNAVAILABLE"}


class WebhookLane:
    """WSGI middleware: answers ``PATH`` itself and hands every other request to ``app``."""

    def __init__(self, app: WSGIApp, inbox: Inbox, signature_watch: SignatureFailureWatch, max_bytes: int) -> None:
        self._app = app
        self._inbox = inbox
        self._signature_watch = signature_watch
        self._max_bytes = max_bytes

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return self._app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "POST":
            return _answer(start_response, 405, {"error": "method_not_allowed", "message": "Use POST."}, [("Allow", "POST")])
        with metrics.Timer() as timer:
            status, body, event_type = self._accept(environ)
        if status == 200:
            metrics.INGEST_SECONDS.observe(timer.seconds)
        else:  # the access log is off by default: every refusal is logged here
            log.warning("webhook answered %d %s", status, body.get("error"), extra={"status": status, "error": body.get("error")})
        metrics.EVENTS.labels(type=event_type, outcome=body.get("status") or ("failed" if status >= 500 else "rejected")).inc()
        return _answer(start_response, status, body)

    def _accept(self, environ: dict) -> tuple[int, dict[str, Any], str]:
        payload = _read_body(environ, self._max_bytes)
        if payload is None:
            return 413, {"error": "payload_too_large", "message": "The body is larger than WEBHOOK_MAX_BYTES."}, "unknown"
        try:
            accepted = self._inbox.accept(payload, environ.get("HTTP_STRIPE_SIGNATURE"))
        except DomainError as exc:
            if isinstance(exc, Rejected):
                self._signature_watch.record(exc.code)
            return status_of(exc), {"error": exc.code, "message": exc.message}, "unknown"
        except Exception:  # noqa: BLE001 - a bug answers 500 (Stripe retries), never a traceback
            log.exception("webhook accept failed")
            return 500, {"error": "internal_error", "message": "Something went wrong on our side."}, "unknown"
        body: dict[str, Any] = {"status": accepted.status, "event_id": accepted.event_id}
        if accepted.reason:
            body["reason"] = accepted.reason
        return 200, body, accepted.event_type


def _read_body(environ: dict, max_bytes: int) -> bytes | None:
    """The raw body (the signature covers these bytes), or None when it is over the limit:
    refused by Content-Length before reading, or, for a chunked body, on reading one byte
    past the limit."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            size = int(length)
        except ValueError:
            size = -1
        if size > max_bytes:
            return None
        if size >= 0:
            return stream.read(size) if size else b""
    data = stream.read(max_bytes + 1)
    return None if len(data) > max_bytes else data


def _answer(start_response: Callable[..., Any], status: int, body: dict[str, Any], extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        _REASONS.get(status, f"{status} ERROR"),
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            *(extra or []),
        ],
    )
    return [data]
