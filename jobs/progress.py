"""How a reconciliation pass shows its progress: bars on a terminal, JSON lines elsewhere.

Both take the pass's callback ``progress(phase, count, total)`` (``jobs.reconcile.PassProgress``):
``count`` more units of ``phase`` are done, out of ``total`` when it is known. Phases come
one after the other: each backfill listing ("backfill charges": objects read from Stripe),
"detection" (candidate orders, chunk by chunk), "resumed refunds" and "refunds" (cases).

* On a terminal (:class:`TerminalProgress`): one line per phase drawn by **rich**, with the
  count, the total and a bar when known, the rate per second and the time taken. Log lines
  written meanwhile appear above the bars.
* Otherwise (:class:`LogProgress`): log records of the ``reconciler.progress`` logger at
  INFO, which the service's JSON log format turns into one JSON object a line
  (``{"msg": "progress", "phase": ..., "done": ..., "total": ..., "rate_per_s": ...}``): at
  most one every ``interval`` seconds per phase, plus one when a phase ends.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("reconciler.progress")


@dataclass
class _Phase:
    name: str
    started: float
    done: int = 0
    total: int | None = None
    last_report: float = field(default=0.0)

    def rate(self, now: float) -> float:
        elapsed = now - self.started
        return self.done / elapsed if elapsed > 0 else 0.0


class LogProgress:
    """Progress as log records (JSON lines under the default non-terminal log format)."""

    def __init__(self, *, interval: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._phase: _Phase | None = None

    def __call__(self, phase: str, count: int, total: int | None = None) -> None:
        now = self._clock()
        current = self._phase
        if current is None or current.name != phase:
            self._finish(now)
            current = self._phase = _Phase(phase, started=now, last_report=now)
        current.done += count
        if total is not None:
            current.total = total
        if now - current.last_report >= self.interval:
            self._report(current, now, finished=False)

    def close(self) -> None:
        self._finish(self._clock())

    def _finish(self, now: float) -> None:
        if self._phase is not None:
            self._report(self._phase, now, finished=True)
            self._phase = None

    def _report(self, phase: _Phase, now: float, *, finished: bool) -> None:
        phase.last_report = now
        log.info(
            "progress",
            extra={
                "phase": phase.name,
                "done": phase.done,
                "total": phase.total,
                "rate_per_s": round(phase.rate(now), 1),
                "elapsed_s": round(now - phase.started, 1),
                "finished": finished,
            },
        )


class TerminalProgress:
    """Progress bars on the terminal (stderr), one line per phase."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description:<22}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, Any] = {}
        self._current: str | None = None
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []

    def __enter__(self) -> "TerminalProgress":
        self._progress.start()
        # Log lines written meanwhile go through rich's stderr proxy, above the bars.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
                self._handlers.append((handler, handler.setStream(sys.stderr)))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._finish_current()
        self._progress.stop()
        for handler, stream in self._handlers:
            handler.setStream(stream)

    def __call__(self, phase: str, count: int, total: int | None = None) -> None:
        if phase != self._current:
            self._finish_current()
            self._current = phase
            self._tasks[phase] = self._progress.add_task(phase, total=total, rate="")
        task = self._tasks[phase]
        self._progress.update(task, advance=count, total=total if total is not None else None)
        speed = self._progress.tasks[self._index(task)].speed
        self._progress.update(task, rate=f"{speed:,.0f}/s" if speed else "")

    def _index(self, task: Any) -> int:
        return next(i for i, t in enumerate(self._progress.tasks) if t.id == task)

    def _finish_current(self) -> None:
        if self._current is None:
            return
        task = self._tasks[self._current]
        state = self._progress.tasks[self._index(task)]
        elapsed = state.elapsed or 0.0
        rate = f"{state.completed / elapsed:,.0f}/s" if elapsed > 0 and state.completed else ""
        # An open-ended phase (a listing) ends at what it did; a counted one keeps its total,
        # so a pass stopped half way shows "1/3", not "1/1".
        total = state.completed if state.total is None else state.total
        self._progress.update(task, total=total, completed=state.completed, rate=rate)
        self._progress.stop_task(task)
        self._current = None
