"""Start `reconciler serve` as a real process on a free 127.0.0.1 port, for tests."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import requests

from app.demo import serve_process

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reconciler_serve(args: list[str], env: dict[str, str], log_path: Path, *, cwd: Path = ROOT):  # type: ignore[no-untyped-def]
    """Run ``reconciler serve ARGS`` until the block ends; yields its base URL once
    ``/healthz`` answers 200 (the demo's launcher: one way to start the service). The
    access log is on: tests read from it which worker answered."""
    return serve_process(args, {"WEB_ACCESS_LOG": "1", **env}, log_path, cwd=cwd)


def wait_for_workers(base: str, log_path: Path, count: int, *, timeout: float = 30.0) -> set[str]:
    """Keep the server busy with concurrent /healthz requests until ``count`` different
    worker pids have answered (gunicorn workers load the app one by one; a test that
    needs several processes must not start while only the first one is up)."""
    from concurrent.futures import ThreadPoolExecutor

    deadline = time.monotonic() + timeout
    pattern = re.compile(r'pid=<(\d+)> .*"GET /healthz')
    with ThreadPoolExecutor(max_workers=count * 2) as pool:
        while True:
            list(pool.map(lambda _: requests.get(f"{base}/healthz", timeout=5), range(count * 4)))
            pids = set(pattern.findall(log_path.read_text()))
            if len(pids) >= count:
                return pids
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(pids)} of {count} workers answered in {timeout} s")
            time.sleep(0.2)


def wait_until_applied(base: str, event_id: str, *, token: str | None = None, timeout: float = 30.0) -> dict:
    """Poll ``GET /api/events/<id>`` until the service's applier has applied the event."""
    from tests.conftest import API_TOKEN

    deadline = time.monotonic() + timeout
    while True:
        response = requests.get(
            f"{base}/api/events/{event_id}", headers={"Authorization": f"Bearer {token or API_TOKEN}"}, timeout=5
        )
        if response.status_code == 200 and response.json().get("status") == "applied":
            return response.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"event {event_id} not applied in {timeout} s: {response.status_code} {response.text[:300]}")
        time.sleep(0.05)
