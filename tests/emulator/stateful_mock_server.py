"""The ``stripe-stateful-mock`` Stripe emulator (npm, MIT; version pinned in
``tests/emulator/stateful_mock/package.json``) as a real Node process on 127.0.0.1, for tests.

    with StatefulMock() as mock:
        client = stripe.StripeClient("sk_test_x", base_addresses={"api": mock.base_url},
                                     http_client=stripe.RequestsClient(), max_network_retries=0)

Needs ``node`` on PATH and ``tests/emulator/stateful_mock/node_modules`` (``scripts/setup-dev.sh``
installs it with ``npm ci``). The process is ``tests/emulator/stateful_mock/launch.js``, which
builds the package's express app and listens on 127.0.0.1 only (the package's own CLI listens
on every interface). It exits with its parent: its stdin is a pipe we hold, and it also
watches its parent pid.

It keeps everything in memory, in one store for every ``sk_test_...`` key (there is no flush
endpoint): a fresh process is an empty store, and tests sharing one process see each other's
charges in list calls. Any key that starts with ``sk_test_`` is accepted.

Quirks, as tested by test_stateful_mock_smoke.py (stripe-stateful-mock 0.0.16, stripe-python 16):

* Charges: ``charges.create(source="tok_visa", amount, currency, metadata)`` succeeds with
  ``status="succeeded"``, ``paid``, ``captured``. ``metadata`` is kept (values come back as
  strings); ``created`` is the real unix time (whole seconds). No PaymentIntents
  (``charge.payment_intent`` is null; ``/v1/payment_intents`` is a 404 ``InvalidRequestError``
  "No matching path: /v1/payment_intents"); no events, no webhooks (from its source).
* Refunds: ``refunds.create(charge, amount, reason="duplicate", metadata)`` returns a refund
  with ``status="succeeded"``, ``charge``, ``reason``, ``metadata``, ``created``; without
  ``amount`` it refunds what is left. The charge then shows ``amount_refunded``, ``refunded``
  (true once fully refunded) and its refunds (newest first) in the embedded ``refunds`` list.
* Idempotency-Key, same key and same parameters: the first response is replayed (same refund
  id, header ``Idempotent-Replayed: true``) and no second refund is made. Same key, different
  parameters: HTTP 400 ``stripe.IdempotencyError`` (error type ``idempotency_error``,
  ``code=None``), "Keys for idempotent requests can only be used with the same parameters they
  were first used with. Try using a key other than '<key>' if you meant to execute a different
  request."; nothing is refunded. From its source: keys are per account+method+path, and every
  response but 401/429 is stored, errors and 500s included. (stripe-python sends a random key
  on every POST that is not given one.)
* Over-refund: HTTP 400 ``stripe.InvalidRequestError``, ``code=None`` (Stripe:
  ``amount_too_large``), ``param="amount"``, "Refund amount ($25) is greater than unrefunded
  amount on charge ($20)" (amounts in major units, amount/100). Any refund of a fully refunded
  charge: HTTP 400 ``InvalidRequestError``, ``code="charge_already_refunded"``,
  "Charge ch_... has already been refunded.".
* Lists: newest first by ``created``, but objects created in the same second come oldest
  first (a stable sort on whole seconds). Without ``limit`` *every* object comes back, with
  ``has_more=False`` (Stripe: 10 and ``has_more=True``). ``limit`` gives ``has_more=True`` when
  cut, and ``starting_after`` works. Every list answers ``url="/v1/refunds"``, so
  ``charges.list(...).auto_paging_iter()`` asks ``/v1/refunds?starting_after=ch_...`` for its
  second page and fails: 404 ``InvalidRequestError`` "No such refund: ch_...",
  ``param="starting_after"``; paging refunds works. The ``created`` filter is ignored
  (``created={"gt": <tomorrow>}`` returns every charge). ``refunds.list(charge=...)`` filters
  by charge.
* Failure tokens on ``charges.create``: ``tok_429`` -> HTTP 429 ``stripe.RateLimitError``
  (type ``rate_limit_error``, code ``rate_limit``, "Too many requests in a period of time.");
  ``tok_500`` -> HTTP 500 ``stripe.APIError`` "An unknown error occurred"; neither stores a
  charge (from its source). A chain ``"tok_500|tok_visa"`` uses its next token each time the
  same string is sent (state per string, for the life of the process): a 500, then a charge,
  then a bare 500 that is not in Stripe's error shape ("... can only be used 2 times").
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.emulator.process import EmulatorProcess

__all__ = ["StatefulMock", "StatefulMockError"]

PACKAGE_DIR = Path(__file__).resolve().with_name("stateful_mock")
LAUNCHER = PACKAGE_DIR / "launch.js"


class StatefulMockError(RuntimeError):
    pass


class StatefulMock(EmulatorProcess):
    """Context manager running stripe-stateful-mock on ``127.0.0.1``.

    ``port=None`` lets the launcher listen on port 0 and report the port it got (no race
    between picking a free port and binding it). ``log_level`` is the emulator's
    (``trace``, ``debug``, ``info``, ``warn``, ``error``, ``silent``; default ``warn``).
    """

    NAME = "stripe-stateful-mock"
    READY_PREFIX = "STATEFUL_MOCK_READY"
    Error = StatefulMockError

    def __init__(self, port: int | None = None, log_level: str | None = None, node: str | None = None) -> None:
        super().__init__(port)
        self._log_level = log_level
        self._node = node

    def _launch(self, log: Any, workdir: str) -> subprocess.Popen[bytes]:
        node = self._node or shutil.which("node")
        if not node:
            raise StatefulMockError("stripe-stateful-mock needs Node.js: no `node` on PATH")
        if not (PACKAGE_DIR / "node_modules" / "stripe-stateful-mock").is_dir():
            raise StatefulMockError(
                f"stripe-stateful-mock is not installed in {PACKAGE_DIR}: run `bash scripts/setup-dev.sh`"
                f" (or `npm ci` in that directory)"
            )
        env = {k: v for k, v in os.environ.items() if k != "STATEFUL_MOCK_LOG_LEVEL"}
        if self._log_level:
            env["STATEFUL_MOCK_LOG_LEVEL"] = self._log_level
        return subprocess.Popen(
            [node, str(LAUNCHER), "--port", str(self._requested_port or 0), "--parent-pid", str(os.getpid())],
            cwd=str(PACKAGE_DIR),
            # A pipe we never write to: the launcher exits when it closes (our death).
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
