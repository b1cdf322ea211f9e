"""The fake Stripe on a real socket: a threaded stdlib HTTP server on 127.0.0.1, so the
real stripe-python SDK (or anything speaking HTTP) reaches it from many threads or
processes."""

from __future__ import annotations

import json
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import stripe

from tests import stripe_payloads as p
from tests.stripe_fake.model import StripeModel

API_KEY = "sk_test_unit"


class StripeServer:
    """Serves ``model`` on 127.0.0.1 (a free port unless ``port`` is given) until
    stopped: ``with StripeServer(model) as server: server.base_url``."""

    def __init__(self, model: StripeModel, *, port: int = 0) -> None:
        self.model = model
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "StripeServer":
        model = self.model
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self._answer("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._answer("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._answer("DELETE")

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode() if length else ""
                try:
                    status, body, headers = model.handle(
                        method, server.base_url + self.path, dict(parse_qsl(raw, keep_blank_values=True)), self.headers
                    )
                except Exception as exc:  # a bug of the fake: say so rather than drop the connection
                    traceback.print_exc(file=sys.stderr)
                    status, body, headers = 500, {"error": {"type": "api_error", "message": f"the fake Stripe failed: {exc!r}"}}, {}
                payload = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.send_header("Request-Id", p.new_id("req"))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._server.request_queue_size = 128
        self._thread = threading.Thread(target=self._server.serve_forever, name="stripe-fake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "StripeServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "the server is not running"
        return f"http://127.0.0.1:{self._server.server_address[1]}"


class StripeDouble(StripeModel):
    """A fake Stripe with its own server: ``with StripeDouble() as double:
    double.client()`` (``delay``: seconds before each write is carried out)."""

    def __init__(self, *, delay: float = 0.0) -> None:
        super().__init__(delay=delay)
        self._http = StripeServer(self)

    def start(self) -> "StripeDouble":
        self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()

    def __enter__(self) -> "StripeDouble":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return self._http.base_url

    def client(self, *, timeout: float = 10.0, max_network_retries: int = 0) -> stripe.StripeClient:
        return stripe.StripeClient(
            API_KEY,
            base_addresses={"api": self.base_url},
            http_client=stripe.RequestsClient(timeout=timeout),
            max_network_retries=max_network_retries,
        )
