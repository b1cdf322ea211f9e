"""Many webhook signature failures in a short time raise an alert.

A burst of bad signatures usually means a rotated secret not yet configured here, a
clock that drifted past the tolerance, or someone probing the endpoint. Each web process
counts its own failures in a sliding window; when the count reaches the threshold it sends
one alert, keyed by the window, from a background thread (a request never waits on Slack
or SMTP). The key is claimed in ``alerts_sent``, so several workers crossing the threshold
in the same window send it once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from domain.alerts import Alert

log = logging.getLogger(__name__)

SIGNATURE_CODES = frozenset(
    {"missing_signature", "malformed_signature", "signature_mismatch", "timestamp_outside_tolerance"}
)


class SignatureFailureWatch:
    def __init__(
        self,
        send: Callable[[Alert], bool],
        *,
        threshold: int,
        window_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._send = send
        self._threshold = threshold
        self._window = window_seconds
        self._clock = clock
        self._failures: collections.deque[tuple[float, str]] = collections.deque()
        self._alerted_window: int | None = None
        self._lock = threading.Lock()
        self.last_alert: threading.Thread | None = None  # tests join it

    def record(self, code: str) -> None:
        """Count one rejected delivery (only signature codes count)."""
        if code not in SIGNATURE_CODES:
            return
        now = self._clock()
        window = int(now // self._window)
        with self._lock:
            self._failures.append((now, code))
            while self._failures and self._failures[0][0] <= now - self._window:
                self._failures.popleft()
            if len(self._failures) < self._threshold or self._alerted_window == window:
                return
            self._alerted_window = window
            codes = collections.Counter(c for _, c in self._failures)
        alert = Alert(
            key=f"signature-failures:{window * self._window}",
            subject=f"{sum(codes.values())} webhook signature failures in {self._window // 60 or 1} min",
            body=(
                "POST /webhooks/stripe refused deliveries for their signature: "
                + ", ".join(f"{code} x{count}" for code, count in sorted(codes.items()))
                + ". Check STRIPE_WEBHOOK_SECRET (a rotated secret?), the server clock, and "
                "the endpoint's signing secret in the Stripe dashboard."
            ),
        )
        self.last_alert = threading.Thread(target=self._deliver, args=(alert,), name="signature-alert", daemon=True)
        self.last_alert.start()

    def _deliver(self, alert: Alert) -> None:
        try:
            self._send(alert)
        except Exception:  # an alert failing must never touch the request path
            log.exception("signature failure alert not sent")
