"""The service as an ASGI application, for uvicorn (``reconciler serve``'s default server).

``POST /webhooks/stripe`` is answered on the event loop (:class:`app.webhook_lane.AsyncWebhookLane`):
the webhooks a worker process is handling at one moment share one insert and one commit,
and no thread is woken for any of them. Every other request goes to the Flask app, run in
a pool of threads by a2wsgi (its views block on the database and on Stripe).

Why not a WSGI server for everything: on 2 cores, accepting a webhook through granian's
threads cost 0.29 ms of server CPU, on this loop 0.22 ms with two workers and 0.15 with
one (README, Benchmarks > Ingest); most of the difference was threads waking one another
(a lock hand-off between two threads on different cores cost 20 us of CPU on that
machine, on one core 2.5 us).
"""

from __future__ import annotations

import os

from flask import Flask

from app import create_app
from app.webhook_lane import ASGIApp, AsyncWebhookLane

DEFAULT_THREADS = 8


def create() -> ASGIApp:
    """Factory for ``uvicorn --factory app.asgi:create``: settings are read in each worker
    process. ``WEB_THREADS`` sizes the Flask thread pool (default 8)."""
    return asgi_app(create_app(), threads=int(os.environ.get("WEB_THREADS") or DEFAULT_THREADS))


def asgi_app(flask_app: Flask, *, threads: int = DEFAULT_THREADS) -> ASGIApp:
    """``flask_app`` behind the asynchronous webhook lane."""
    from a2wsgi import WSGIMiddleware

    services = flask_app.extensions["reconciler"]
    return AsyncWebhookLane(
        WSGIMiddleware(flask_app, workers=threads),
        services.inbox,
        services.signature_watch,
        services.settings.webhook_max_bytes,
    )
