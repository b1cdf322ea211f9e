"""``reconciler serve`` runs the web server and the scheduler as supervised children: the
scheduler is restarted when it dies, SIGTERM stops everything and leaves no process behind,
and the reusable supervisor (jobs/supervisor.py) does the same for any list of commands.
Real processes, read from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest
import requests

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and parent_of(int(p)) == pid and alive(int(p)))


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def env_for(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "DATABASE_URL", "LOG_", "SECRET_KEY", "REVIEW_"))}
    return {**env, "PYTHONPATH": str(ROOT), "DATABASE_URL": database_url, "LOG_FORMAT": "text", "LOG_LEVEL": "INFO"}


# -- the supervisor on its own ---------------------------------------------------------------

SUPERVISOR_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from jobs.supervisor import Child, Supervisor
    logging.basicConfig(level=logging.INFO)
    python, record = sys.executable, sys.argv[1]
    steady = [python, "-c", "import time; time.sleep(300)"]
    flaky = [python, "-c", f"import os; open({record!r}, 'a').write(str(os.getpid()) + '\\\\n'); raise SystemExit(3)"]
    essential = sys.argv[2] == "essential"
    children = [Child("steady", steady), Child("flaky", flaky, restart=not essential)]
    sys.exit(Supervisor(children, backoff_initial=0.2, backoff_max=0.4, stop_timeout=5).run())
    """
)


def start_supervisor(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], Path]:
    record = tmp_path / "flaky.pids"
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR_SCRIPT, str(record), mode],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return process, record


def test_supervisor_restarts_a_dying_child_with_backoff_and_stops_all_on_sigterm(tmp_path: Path) -> None:
    supervisor, record = start_supervisor(tmp_path, "restart")
    wait_for(lambda: record.exists() and len(record.read_text().split()) >= 3, 20, "three starts of the flaky child")
    (steady,) = [pid for pid in children(supervisor.pid) if "time.sleep(300)" in cmdline(pid)]

    supervisor.send_signal(signal.SIGTERM)
    output, _ = supervisor.communicate(timeout=20)
    assert supervisor.returncode == 0, output
    assert not alive(steady)
    assert "flaky exited with status 3" in output and "restarting in" in output


GRANDPARENT_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from jobs.supervisor import Child, Supervisor
    logging.basicConfig(level=logging.INFO)
    python = sys.executable
    # A grandchild that ignores SIGTERM and would sleep on after its parent (the child) is
    # stopped: what a server's worker or a multiprocessing helper looks like at worst.
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {stubborn!r}]); time.sleep(300)"
    sys.exit(Supervisor([Child("parent", [python, "-c", parent])], stop_timeout=2).run())
    """
)


def test_a_childs_own_child_does_not_outlive_the_supervisors_stop(tmp_path: Path) -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", GRANDPARENT_SCRIPT],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        grandchildren = wait_for(lambda: [p for p in descendants(supervisor.pid) if "SIG_IGN" in cmdline(p)
                                          and "subprocess" not in cmdline(p)], 20, "the grandchild")
        supervisor.send_signal(signal.SIGTERM)
        output, _ = supervisor.communicate(timeout=30)
        assert supervisor.returncode == 0, output
        assert [pid for pid in grandchildren if alive(pid)] == [], output  # type: ignore[union-attr]
        assert "outlived its parent; killing it" in output
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def test_an_essential_child_that_exits_stops_the_others(tmp_path: Path) -> None:
    supervisor, _ = start_supervisor(tmp_path, "essential")
    output, _ = supervisor.communicate(timeout=20)
    assert supervisor.returncode == 3, output
    assert "flaky exited with status 3" in output and "stopping the others" in output
    assert "steady stopped" in output


def test_children_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    supervisor, record = start_supervisor(tmp_path, "restart")
    wait_for(lambda: record.exists(), 20, "the children to start")
    steady = wait_for(lambda: [p for p in children(supervisor.pid) if "time.sleep(300)" in cmdline(p)], 10, "the steady child")
    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait(timeout=10)
    wait_for(lambda: not alive(steady[0]), 10, "the orphan to stop (parent-death signal)")  # type: ignore[index]


# -- reconciler serve --------------------------------------------------------------------------


def test_serve_runs_the_scheduler_restarts_it_and_leaves_nothing_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = env_for(f"sqlite:///{tmp_path / 'serve.db'}")
    with open(log_path, "w") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def health() -> dict | None:
            try:
                body = requests.get(f"{base}/healthz", timeout=2).json()
            except requests.RequestException:
                return None
            return body if body.get("scheduler") == "running" else None

        body = wait_for(health, 60, "/healthz with a running scheduler")
        assert body["next_pass_at"].endswith("T02:00:00+00:00")  # RECONCILE_CRON's default, UTC  # type: ignore[index]

        kids = {pid: cmdline(pid) for pid in children(serve.pid)}
        (web,) = [pid for pid, line in kids.items() if "serve --supervised" in line]
        (scheduler,) = [pid for pid, line in kids.items() if line.rstrip().endswith(" scheduler")]
        (applier,) = [pid for pid, line in kids.items() if line.rstrip().endswith(" applier")]  # one on SQLite

        runs = subprocess.run([sys.executable, "-m", "cli", "runs"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert runs.returncode == 0, runs.stderr
        assert "next pass: " in runs.stdout and "T02:00:00+00:00 (scheduler running on" in runs.stdout

        # A scheduler that dies is started again (after the supervisor's backoff).
        os.kill(scheduler, signal.SIGKILL)
        restarted = wait_for(
            lambda: [p for p in children(serve.pid) if cmdline(p).rstrip().endswith(" scheduler") and p != scheduler],
            20, "a new scheduler process",
        )
        assert web in children(serve.pid)  # the web server was left alone

        # A web worker that dies is replaced by the web server's process manager.
        workers = [p for p in descendants(web) if "multiprocessing" in cmdline(p) and "resource_tracker" not in cmdline(p)]
        assert workers, {p: cmdline(p) for p in descendants(web)}
        os.kill(workers[0], signal.SIGKILL)
        wait_for(
            lambda: [p for p in descendants(web) if "multiprocessing" in cmdline(p) and "resource_tracker" not in cmdline(p)
                     and p not in workers],
            30, "a new web worker",
        )
        wait_for(health, 30, "/healthz from the new worker")

        everything = descendants(serve.pid)
        assert web in everything and restarted[0] in everything  # type: ignore[index]
        assert applier in everything and len(everything) >= 5  # web master, its two workers, the applier, the scheduler
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        left = [pid for pid in everything if alive(pid)]
        assert left == [], {pid: cmdline(pid) for pid in left}
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    log = log_path.read_text()
    assert "supervisor: scheduler exited with status -9" in log and "restarting in 1.0 s" in log
    assert "warning: SECRET_KEY is not set" in log and log.count("warning: SECRET_KEY is not set") == 1


def test_serve_without_the_scheduler_runs_the_web_server_and_the_applier(tmp_path: Path) -> None:
    port = free_port()
    env = env_for(f"sqlite:///{tmp_path / 'web.db'}")
    with open(tmp_path / "serve.log", "w") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--no-scheduler", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:

        def health() -> dict | None:
            try:
                body = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
            except requests.RequestException:
                return None
            return body if body.get("applier") == "ok" else None

        body = wait_for(health, 60, "/healthz with a live applier")
        assert (body["scheduler"], body["next_pass_at"]) == ("not running", None)  # type: ignore[index]
        lines = sorted(cmdline(pid).split(" cli ", 1)[1].split()[0] for pid in children(serve.pid))
        assert lines == ["applier", "serve"]
        everything = descendants(serve.pid)
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0
        assert [pid for pid in everything if alive(pid)] == []
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
