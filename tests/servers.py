"""Start `reconciler serve` as a real process on a free 127.0.0.1 port, for tests."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def reconciler_serve(args: list[str], env: dict[str, str], log_path: Path, *, cwd: Path = ROOT) -> Iterator[str]:
    """Run ``reconciler serve ARGS`` until the block ends; yields its base URL once
    ``/healthz`` answers 200. Fails with the server's log if it does not start in 60 s."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port), *args],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


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
