"""The soak test's short profile: bench/soak.py with 2000 events, two web hosts, two
appliers, a web host and an applier killed with SIGKILL and PostgreSQL restarted while
the events arrive; every check must pass.

bench/soak.py makes its own PostgreSQL 15 cluster (owned by ``nobody`` when the suite runs
as root), so this needs the PostgreSQL 15 binaries; it runs in the PostgreSQL leg only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PGBIN = Path(os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin"))
TIMEOUT = 300

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not (PGBIN / "initdb").exists(), reason=f"needs the PostgreSQL 15 binaries ({PGBIN}/initdb)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_soak_short_profile() -> None:
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--events", "2000", "--pg-port", str(_free_port())]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the soak stops its servers and PostgreSQL and deletes its cluster.
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"bench/soak.py did not finish in {TIMEOUT} s:\n{output[-6000:]}")
    print(output)  # the figures, shown with `pytest -rP` (or -s)
    lines = output.splitlines()
    verdicts = [line.strip() for line in lines if line.strip().startswith(("PASS", "FAIL"))]
    assert process.returncode == 0, output[-6000:]
    assert verdicts and all(v.startswith("PASS") for v in verdicts), output[-6000:]
    for check in ("events stored == generated", "every event applied", "charges == truth", "refunds == truth", "orders == truth"):
        assert any(v.startswith("PASS") and check in v for v in verdicts), f"no PASS line for {check!r}:\n{output[-6000:]}"
    # The faults happened: the killed host's clients saw lost connections and were retried.
    assert any(line.strip().startswith("fault") and "kill -9 web host" in line for line in lines), output[-6000:]
