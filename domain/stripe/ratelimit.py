"""A client-side rate limit for calls to Stripe (``STRIPE_RATE_LIMIT`` per second).

Stripe allows about 25 requests/s in test mode and 100/s live (25/s per endpoint); a pass
that refunds a backlog must stay under that on its own rather than learn it from 429s.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class RateLimiter:
    """A token bucket: ``rate`` calls per second on average, bursts of at most ``burst``."""

    def __init__(
        self,
        rate: float,
        *,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._rate = rate
        self._capacity = float(burst if burst is not None else max(1, int(rate)))
        self._tokens = self._capacity
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Block until one call is allowed."""
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                wait = (1 - self._tokens) / self._rate
            self._sleep(wait)
