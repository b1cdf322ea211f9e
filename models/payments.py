"""Pay endpoint state: PaymentIntent creation attempts and client Idempotency-Key replays.

(Filled in by the prevention work.)
"""

from __future__ import annotations
