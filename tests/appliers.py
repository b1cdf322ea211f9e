"""Draining the inbox from several appliers at once, for the concurrency tests."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from domain.ledger.applier import Applier


def drain_with_appliers(session_factory, count: int, *, batch_size: int) -> list[Applier]:  # type: ignore[no-untyped-def]
    """``count`` appliers draining the inbox side by side from threads released at once."""
    appliers = [Applier(session_factory, batch_size=batch_size, name=f"test:{i}") for i in range(count)]
    barrier = threading.Barrier(count)

    def run(applier: Applier) -> None:
        barrier.wait()
        applier.drain(timeout=60)

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(run, appliers))
    return appliers
