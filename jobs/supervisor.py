"""A small supervisor for the service's child processes: start them, restart the ones that
die (with a backoff), and stop them all together. ``reconciler serve`` runs the web server
and the scheduler under it; another long-running process of the service is one more
:class:`Child` in the list (see :func:`cli.service_children`).

Guarantees:

* **Started together, stopped together.** SIGTERM, SIGINT or SIGHUP to the supervisor
  sends SIGTERM to every child, waits up to ``stop_timeout`` seconds for them to exit,
  then SIGKILLs what is left and reaps it: when :meth:`Supervisor.run` returns, no child
  is left running. On Linux the children's own descendants (a web server's workers, the
  helper processes ``multiprocessing`` starts, which exit a moment after their parent)
  are waited for within the same timeout and SIGKILLed if still there, so nothing the
  service started outlives it.
* **No orphans even if the supervisor is killed** (SIGKILL, a crash): on Linux each child
  asks the kernel for SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``). The kernel
  sends it when the *thread* that started the child ends, so children are only ever
  started from the supervisor's main loop, never from a short-lived thread.
* **Restarts with a backoff.** A child with ``restart=True`` that exits (whatever its
  exit status) is started again after ``backoff_initial`` seconds, doubling up to
  ``backoff_max`` while it keeps dying; a child that ran for ``healthy_after`` seconds
  starts again from the initial delay. A child with ``restart=False`` is essential: its
  exit stops the others, and the supervisor exits with the child's status (the web server
  failing to bind its port stops ``serve`` instead of retrying forever).

Plain processes and signals, no threads: the main loop polls the children a few times
a second and is woken early by the signals it handles.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class Child:
    """One child command: ``name`` for the logs, ``argv`` to run, whether to restart it
    when it exits, and extra environment variables (added to the supervisor's)."""

    name: str
    argv: Sequence[str]
    restart: bool = True
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Running:
    child: Child
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0  # exits in a row, each within healthy_after of its start
    restart_at: float | None = None
    starts: int = 0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to send SIGTERM to this process when its parent dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except Exception:
        pass


class Supervisor:
    """Runs ``children`` until a stop signal or an essential child's exit; see the module
    docstring for what it guarantees."""

    def __init__(
        self,
        children: Sequence[Child],
        *,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        healthy_after: float = 60.0,
        stop_timeout: float = 30.0,
        poll_interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        names = [c.name for c in children]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self._children = [_Running(c) for c in children]
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.healthy_after = healthy_after
        self.stop_timeout = stop_timeout
        self.poll_interval = poll_interval
        self._clock = clock
        self._stop_signal: int | None = None
        self.exit_status = 0

    # -- what tests and callers may look at ------------------------------------------------

    def pids(self) -> dict[str, int]:
        """The live children's pids by name."""
        return {r.child.name: r.process.pid for r in self._children if r.process is not None and r.process.poll() is None}

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop at the next turn of the loop (what the signal handlers call)."""
        if self._stop_signal is None:
            self._stop_signal = signum

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Start every child and supervise them until told to stop. Returns the exit status
        for the supervisor's process: 0 after a stop signal, an essential child's status
        (or 1 if it was 0) when it exited by itself."""
        previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

        def on_signal(signum: int, frame: Any) -> None:
            log.info("supervisor: %s received, stopping the children", signal.Signals(signum).name)
            self.request_stop(signum)

        for signum in STOP_SIGNALS:
            signal.signal(signum, on_signal)
        try:
            for running in self._children:
                self._start(running)
            while self._stop_signal is None:
                self._turn()
                if self._stop_signal is None:
                    time.sleep(self.poll_interval)
        finally:
            # Stop even when the loop itself failed: no child outlives this call.
            self._stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self.exit_status

    def _turn(self) -> None:
        now = self._clock()
        for running in self._children:
            process = running.process
            if process is not None:
                status = process.poll()
                if status is None:
                    continue
                lived = now - running.started_at
                running.process = None
                if not running.child.restart:
                    log.error(
                        "supervisor: %s exited with status %s after %.1f s; stopping the others",
                        running.child.name, status, lived,
                    )
                    self.exit_status = status if status > 0 else 1
                    self.request_stop(signal.SIGTERM)
                    return
                running.failures = 1 if lived >= self.healthy_after else running.failures + 1
                delay = min(self.backoff_max, self.backoff_initial * 2 ** (running.failures - 1))
                running.restart_at = now + delay
                log.warning(
                    "supervisor: %s exited with status %s after %.1f s; restarting in %.1f s",
                    running.child.name, status, lived, delay,
                )
            elif running.restart_at is not None and now >= running.restart_at:
                self._start(running)

    def _start(self, running: _Running) -> None:
        child = running.child
        running.process = subprocess.Popen(
            list(child.argv),
            env={**os.environ, **child.env},
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        running.started_at = self._clock()
        running.restart_at = None
        running.starts += 1
        log.info(
            "supervisor: %s started (pid %d)%s", child.name, running.process.pid,
            f", restart {running.starts - 1}" if running.starts > 1 else "",
        )

    def _stop_all(self) -> None:
        live = [r for r in self._children if r.process is not None and r.process.poll() is None]
        # Taken before the children exit: once they do, their descendants are re-parented
        # and can no longer be found from here.
        offspring = {pid: _started(pid) for r in live if r.process is not None for pid in descendants(r.process.pid)}
        for running in live:
            assert running.process is not None
            try:
                running.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = self._clock() + self.stop_timeout
        for running in live:
            assert running.process is not None
            try:
                running.process.wait(timeout=max(0.0, deadline - self._clock()))
            except subprocess.TimeoutExpired:
                log.warning("supervisor: %s did not stop within %.0f s; killing it", running.child.name, self.stop_timeout)
                running.process.kill()
                running.process.wait()
        _outlast(offspring, deadline, self._clock)
        for running in self._children:
            if running.process is not None:
                running.process.poll()  # reap anything that exited on its own
                log.info("supervisor: %s stopped (status %s)", running.child.name, running.process.returncode)
            running.process = None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot): with the pid, names one process even
    if the pid is reused later."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _alive(pid: int, started: str | None) -> bool:
    """That very process, running or sleeping: not gone, not a zombie waiting to be
    reaped, and not a newer process that was given the same pid."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] != "Z" and len(fields) > 19 and fields[19] == started


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux; empty where there is no ``/proc``)."""
    if not os.path.isdir("/proc"):
        return []
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _proc_stat(int(name))
            if fields is not None and fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _outlast(processes: dict[int, str | None], deadline: float, clock: Callable[[], float]) -> None:
    """Wait until none of ``processes`` (pid: start time) is alive, polling until
    ``deadline`` (at least one second from now); SIGKILL those still alive then."""
    deadline = max(deadline, clock() + 1.0)
    while any(_alive(pid, started) for pid, started in processes.items()) and clock() < deadline:
        time.sleep(0.05)
    for pid, started in processes.items():
        if _alive(pid, started):
            log.warning("supervisor: process %d outlived its parent; killing it", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
