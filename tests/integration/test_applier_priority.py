"""The applier at idle CPU priority: its threads run under SCHED_IDLE, a paused applier
applies nothing, and the lag guard applies at ordinary priority (with the idle appliers
paused) once the next event has waited too long, then hands back."""

from __future__ import annotations

import os
import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from domain.ledger.applier import Applier, BatchOutcome, oldest_ready_seconds
from domain.ledger.inbox import Inbox
from jobs.applier import LagGuard, enter_idle_cpu
from models import Charge, StripeEvent, utcnow
from tests import stripe_payloads as p


def _store(settings, session_factory, count: int, *, waited_seconds: float = 0.0) -> None:  # type: ignore[no-untyped-def]
    inbox = Inbox(settings, session_factory.kw["bind"])
    for _ in range(count):
        assert inbox.store(p.encode(p.event("charge.succeeded", p.charge(metadata={"order_id": p.new_id("ord")})))).status == "received"
    with session_factory.begin() as session:
        session.execute(update(StripeEvent).values(received_at=utcnow() - timedelta(seconds=waited_seconds)))


def _charges(session_factory) -> int:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(Charge)) or 0


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
def test_enter_idle_cpu_lowers_the_calling_thread_only() -> None:
    seen: list[int] = []

    def worker() -> None:
        assert enter_idle_cpu() is True
        seen.append(os.sched_getscheduler(0))

    before = os.sched_getscheduler(0)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(5)
    assert seen == [os.SCHED_IDLE]
    assert os.sched_getscheduler(0) == before != os.SCHED_IDLE


def test_a_paused_applier_applies_nothing_until_the_pause_ends(settings, session_factory) -> None:  # type: ignore[no-untyped-def]
    _store(settings, session_factory, 3)
    stop, pause = threading.Event(), threading.Event()
    pause.set()
    applier = Applier(session_factory)
    thread = threading.Thread(target=applier.run, args=(stop,), kwargs={"pause": pause, "idle_seconds": 0.01})
    thread.start()
    try:
        stop.wait(0.3)
        assert _charges(session_factory) == 0
        pause.clear()
        for _ in range(200):
            if _charges(session_factory) == 3:
                break
            stop.wait(0.02)
        assert _charges(session_factory) == 3
    finally:
        stop.set()
        thread.join(5)


def test_the_guard_waits_while_the_lag_is_below_its_limit(settings, session_factory) -> None:  # type: ignore[no-untyped-def]
    _store(settings, session_factory, 3, waited_seconds=1)
    pause = threading.Event()
    guard = LagGuard(Applier(session_factory), session_factory, max_lag_seconds=30, pause=pause)
    assert guard.check(threading.Event()) == 0
    assert _charges(session_factory) == 0 and not pause.is_set()


def test_the_guard_applies_with_the_idle_appliers_paused_once_the_lag_passes_its_limit(settings, session_factory) -> None:  # type: ignore[no-untyped-def]
    _store(settings, session_factory, 7, waited_seconds=60)
    age = oldest_ready_seconds(session_factory)
    assert age is not None and age >= 59
    pause = threading.Event()
    paused_during: list[bool] = []
    applier = Applier(session_factory, batch_size=3)
    original = applier.apply_batch

    def watched():  # type: ignore[no-untyped-def]
        paused_during.append(pause.is_set())
        return original()

    applier.apply_batch = watched  # type: ignore[method-assign]
    guard = LagGuard(applier, session_factory, max_lag_seconds=30, pause=pause)
    assert guard.check(threading.Event()) == 7
    # full batches of 3, 3, then 1 (less than a batch left): it stops there
    assert paused_during == [True, True, True]
    assert not pause.is_set()
    assert _charges(session_factory) == 7
    assert oldest_ready_seconds(session_factory) is None


def test_the_guard_hands_back_when_another_applier_has_caught_up(settings, session_factory) -> None:  # type: ignore[no-untyped-def]
    """Another applier (another host) holds the turn and applies the backlog: the guard
    sees the lag gone and stops instead of waiting for a turn it no longer needs."""
    _store(settings, session_factory, 4, waited_seconds=60)
    pause = threading.Event()
    other = Applier(session_factory)

    def busy_while_the_other_applies() -> BatchOutcome:
        assert other.drain().applied == 4
        return BatchOutcome(busy=True)

    guard_applier = Applier(session_factory)
    guard_applier.apply_batch = busy_while_the_other_applies  # type: ignore[method-assign]
    guard = LagGuard(guard_applier, session_factory, max_lag_seconds=30, pause=pause)
    assert guard.check(threading.Event()) == 0
    assert not pause.is_set() and _charges(session_factory) == 4
