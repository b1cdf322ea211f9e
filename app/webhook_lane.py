"""``POST /webhooks/stripe``: verify, store once in the inbox, answer. Nothing else.

Answers: 200 ``{"status": "received" | "duplicate" | "ignored", "event_id": ...}`` once the
event is durably stored (or was already); 4xx with a JSON error code for a body that must
not be stored; 503 when it could not be stored (Stripe redelivers). The ledger effects
follow from the applier (``GET /api/events/<id>`` shows received | applied | failed).

This endpoint is a layer in front of Flask rather than a blueprint: it is the path every
webhook takes at a merchant's peak, and Flask's per-request machinery (request context,
session interface, Flask-Login, Talisman's headers, before/after hooks) cost more CPU than
the whole accept (measured in-process: 0.77 ms a request through Flask against 0.2 ms for
the accept itself). It needs none of it: no cookie, no session, no HTML. Every other path
goes to Flask untouched.

Two doors, one set of answers: :class:`AsyncWebhookLane` for the ASGI server (uvicorn, the
default: the webhook is answered on the event loop, app/asgi.py) and :class:`WebhookLane`
for a WSGI server (granian, gunicorn) and Flask's test client.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable, Iterable

from app import metrics
from app.errors import status_of
from app.services.signature_watch import SignatureFailureWatch
from domain.errors import DomainError, Rejected
from domain.ledger.inbox import Accepted, Inbox

log = logging.getLogger(__name__)

PATH = "/webhooks/stripe"
WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

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
            return _wsgi_answer(start_response, *_METHOD_NOT_ALLOWED)
        with metrics.Timer() as timer:
            payload = _read_body(environ, self._max_bytes)
            if payload is None:
                status, body, event_type = _TOO_LARGE
            else:
                try:
                    status, body, event_type = _answer_of(self._inbox.accept(payload, environ.get("HTTP_STRIPE_SIGNATURE")))
                except Exception as exc:  # noqa: BLE001 - mapped to an answer, never a traceback
                    status, body, event_type = _answer_of_error(exc, self._signature_watch)
        _record(status, body, event_type, timer.seconds)
        return _wsgi_answer(start_response, status, body)


class AsyncWebhookLane:
    """ASGI middleware: answers ``PATH`` on the event loop and hands every other request
    (and the lifespan) to ``app``. The same answers as :class:`WebhookLane`; the row goes
    through :meth:`Inbox.accept_async`, so concurrent webhooks on one loop share a
    statement and a commit without waking a thread."""

    def __init__(self, app: ASGIApp, inbox: Inbox, signature_watch: SignatureFailureWatch, max_bytes: int) -> None:
        self._app = app
        self._inbox = inbox
        self._signature_watch = signature_watch
        self._max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            await self._app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await _asgi_answer(send, *_METHOD_NOT_ALLOWED)
            return
        with metrics.Timer() as timer:
            try:
                payload = await _receive_body(scope, receive, self._max_bytes)
            except _Disconnected:  # nobody to answer; nothing was stored
                return
            if payload is None:
                status, body, event_type = _TOO_LARGE
            else:
                try:
                    accepted = await self._inbox.accept_async(payload, _header(scope, b"stripe-signature"))
                    status, body, event_type = _answer_of(accepted)
                except Exception as exc:  # noqa: BLE001 - mapped to an answer, never a traceback
                    status, body, event_type = _answer_of_error(exc, self._signature_watch)
        _record(status, body, event_type, timer.seconds)
        await _asgi_answer(send, status, body)


Answer = tuple[int, dict[str, Any], str]  # status, JSON body, event type (for the metrics)

_METHOD_NOT_ALLOWED = (405, {"error": "method_not_allowed", "message": "Use POST."}, [("Allow", "POST")])
_TOO_LARGE: Answer = (413, {"error": "payload_too_large", "message": "The body is larger than WEBHOOK_MAX_BYTES."}, "unknown")


def _answer_of(accepted: Accepted) -> Answer:
    body: dict[str, Any] = {"status": accepted.status, "event_id": accepted.event_id}
    if accepted.reason:
        body["reason"] = accepted.reason
    return 200, body, accepted.event_type


def _answer_of_error(exc: Exception, signature_watch: SignatureFailureWatch) -> Answer:
    if isinstance(exc, DomainError):
        if isinstance(exc, Rejected):
            signature_watch.record(exc.code)
        return status_of(exc), {"error": exc.code, "message": exc.message}, "unknown"
    # a bug answers 500 (Stripe retries), never a traceback
    log.error("webhook accept failed", exc_info=exc)
    return 500, {"error": "internal_error", "message": "Something went wrong on our side."}, "unknown"


def _record(status: int, body: dict[str, Any], event_type: str, seconds: float) -> None:
    if status == 200:
        metrics.INGEST_SECONDS.observe(seconds)
    else:  # the access log is off by default: every refused or failed webhook is logged here
        log.warning("webhook answered %d %s", status, body.get("error"), extra={"status": status, "error": body.get("error")})
    metrics.EVENTS.labels(type=event_type, outcome=body.get("status") or ("failed" if status >= 500 else "rejected")).inc()


def _read_body(environ: dict, max_bytes: int) -> bytes | None:
    """The raw body (the signature covers these bytes), or None when it is over the limit:
    refused by Content-Length before reading, or, for a chunked body, on reading one byte
    past the limit."""
    stream = environ["wsgi.input"]
    size = _declared_size(environ.get("CONTENT_LENGTH"))
    if size is not None:
        if size > max_bytes:
            return None
        return stream.read(size) if size else b""
    data = stream.read(max_bytes + 1)
    return None if len(data) > max_bytes else data


class _Disconnected(Exception):
    """The client went away before its body arrived."""


async def _receive_body(scope: dict, receive: Callable[[], Awaitable[dict]], max_bytes: int) -> bytes | None:
    """:func:`_read_body` for ASGI: the raw body, or None once it is over the limit (by
    Content-Length before reading, or as the chunks arrive)."""
    size = _declared_size(_header(scope, b"content-length"))
    if size is not None and size > max_bytes:
        return None
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > max_bytes:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _declared_size(length: str | None) -> int | None:
    """Content-Length as a size; None when absent or not a number (then the body is read up
    to the limit)."""
    if not length:
        return None
    try:
        size = int(length)
    except ValueError:
        return None
    return size if size >= 0 else None


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _answer_parts(status: int, body: dict[str, Any], extra: list[tuple[str, str]] | None) -> tuple[bytes, list[tuple[str, str]]]:
    data = json.dumps(body).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        *(extra or []),
    ]
    return data, headers


def _wsgi_answer(start_response: Callable[..., Any], status: int, body: dict[str, Any], extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    data, headers = _answer_parts(status, body, extra)
    start_response(_REASONS.get(status, f"{status} ERROR"), headers)
    return [data]


async def _asgi_answer(send: Callable[[dict], Awaitable[None]], status: int, body: dict[str, Any], extra: list[tuple[str, str]] | None = None) -> None:
    data, headers = _answer_parts(status, body, extra)
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers],
    })
    await send({"type": "http.response.body", "body": data})
