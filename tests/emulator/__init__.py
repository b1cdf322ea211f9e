"""The ``localstripe`` Stripe emulator as a real process on 127.0.0.1, for tests.

    with LocalStripe() as ls:
        client = stripe.StripeClient("sk_test_x", base_addresses={"api": ls.base_url}, ...)
        ls.register_webhook("wh", "http://127.0.0.1:PORT/hook", "whsec_x")
        ...
        ls.flush()

The server is ``tests/emulator/localstripe_server.py`` (loopback only, no pickle file).
All HTTP here bypasses proxy settings from the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.emulator.process import EmulatorProcess, opener
from tests.emulator.stateful_mock_server import StatefulMock

__all__ = ["LocalStripe", "LocalStripeError", "StatefulMock"]

SERVER_SCRIPT = Path(__file__).resolve().with_name("localstripe_server.py")


class LocalStripeError(RuntimeError):
    pass


class LocalStripe(EmulatorProcess):
    """Context manager running localstripe on ``127.0.0.1``.

    ``port=None`` lets the server bind port 0 and report the port it got (no race
    between picking a free port and binding it).
    """

    NAME = "localstripe"
    READY_PREFIX = "LOCALSTRIPE_READY"
    PROBE_PATH = "/v1/balance"
    Error = LocalStripeError

    def _launch(self, log: Any, workdir: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT), "--port", str(self._requested_port or 0), "--parent-pid", str(os.getpid())],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    # -- /_config endpoints ------------------------------------------------------

    def _config(self, method: str, path: str, body: dict | None = None) -> None:
        if not self.base_url or self._process is None:
            raise LocalStripeError("LocalStripe is not running")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with opener.open(request, timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as e:
            raise LocalStripeError(f"{method} {path} -> {e.code}: {e.read().decode(errors='replace')}") from e

    def flush(self) -> None:
        """Empty the emulator's object store (``DELETE /_config/data``).

        Registered webhooks are *not* removed by this (localstripe keeps them apart)."""
        self._config("DELETE", "/_config/data")

    def register_webhook(self, webhook_id: str, url: str, secret: str, events: list[str] | None = None) -> None:
        """``POST /_config/webhooks/<id>``: every event (or only ``events``) is POSTed to
        ``url``, signed with ``secret``, about 1 s after it happens. Re-registering an id
        replaces it. ``url`` must be a loopback http URL."""
        body: dict = {"url": url, "secret": secret}
        if events is not None:
            body["events"] = list(events)
        self._config("POST", f"/_config/webhooks/{webhook_id}", body)
