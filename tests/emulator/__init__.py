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
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.emulator.stateful_mock_server import StatefulMock

__all__ = ["LocalStripe", "LocalStripeError", "StatefulMock"]

SERVER_SCRIPT = Path(__file__).resolve().with_name("localstripe_server.py")
READY_PREFIX = "LOCALSTRIPE_READY"
START_TIMEOUT = 20.0

# No ProxyHandler: never route 127.0.0.1 through an HTTP(S)_PROXY from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LocalStripeError(RuntimeError):
    pass


class LocalStripe:
    """Context manager running localstripe on ``127.0.0.1``.

    ``port=None`` lets the server bind port 0 and report the port it got (no race
    between picking a free port and binding it).
    """

    def __init__(self, port: int | None = None) -> None:
        self._requested_port = port
        self.port: int | None = port
        self.base_url: str = f"http://127.0.0.1:{port}" if port else ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None
        self._log_path: Path | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> "LocalStripe":
        if self._process is not None:
            raise LocalStripeError("LocalStripe already started")
        self._log_dir = tempfile.TemporaryDirectory(prefix="localstripe-")
        self._log_path = Path(self._log_dir.name) / "localstripe.log"
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, str(SERVER_SCRIPT), "--port", str(self._requested_port or 0), "--parent-pid", str(os.getpid())],
                cwd=self._log_dir.name,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise LocalStripeError(
                    f"localstripe exited with code {self._process.returncode}:\n{self.log()}"
                )
            if not self.base_url:
                for line in self.log().splitlines():
                    if line.startswith(READY_PREFIX):
                        self.base_url = line.split()[1]
                        self.port = int(self.base_url.rsplit(":", 1)[1])
                        break
            if self.base_url and self._answers():
                return
            if time.monotonic() > deadline:
                raise LocalStripeError(f"localstripe did not answer within {START_TIMEOUT:.0f} s:\n{self.log()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            # Unauthenticated, so any answer (401) proves the app is serving.
            with _opener.open(self.base_url + "/v1/balance", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._log_dir is not None:
            self._last_log = self.log()
            self._log_dir.cleanup()
            self._log_dir = None
            self._log_path = None
        if self._requested_port is None:
            self.base_url = ""
            self.port = None

    def log(self) -> str:
        """The server's stdout+stderr so far (access log, webhook delivery lines)."""
        if self._log_path is not None and self._log_path.exists():
            return self._log_path.read_text(errors="replace")
        return getattr(self, "_last_log", "")

    def __enter__(self) -> "LocalStripe":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- /_config endpoints ------------------------------------------------------

    def _config(self, method: str, path: str, body: dict | None = None) -> None:
        if not self.base_url or self._process is None:
            raise LocalStripeError("LocalStripe is not running")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with _opener.open(request, timeout=10) as response:
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
