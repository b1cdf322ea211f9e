"""What the emulator harnesses share: a Stripe emulator as a child process on 127.0.0.1.

A subclass names its command, its READY line prefix and a path that answers once it
serves. Start-up waits for the READY line (even with a fixed port, so another server on
that port never passes for the emulator) and then for an answer; stop terminates, then
kills; the process output stays readable through :meth:`log` after it stopped.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

START_TIMEOUT = 20.0

# No ProxyHandler: never route 127.0.0.1 through an HTTP(S)_PROXY from the environment.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EmulatorError(RuntimeError):
    pass


class EmulatorProcess:
    NAME = "emulator"
    READY_PREFIX = ""
    PROBE_PATH = "/v1/charges"  # unauthenticated: any answer (401) proves it serves
    Error: type[RuntimeError] = EmulatorError

    def __init__(self, port: int | None = None) -> None:
        self._requested_port = port
        self.port: int | None = port
        self.base_url: str = f"http://127.0.0.1:{port}" if port else ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None
        self._log_path: Path | None = None

    # -- for subclasses ----------------------------------------------------------

    def _launch(self, log: Any, workdir: str) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Any:
        if self._process is not None:
            raise self.Error(f"{type(self).__name__} already started")
        self._log_dir = tempfile.TemporaryDirectory(prefix=f"{self.NAME}-")
        self._log_path = Path(self._log_dir.name) / f"{self.NAME}.log"
        try:
            with open(self._log_path, "wb") as log:
                self._process = self._launch(log, self._log_dir.name)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        ready_url = ""
        while True:
            if self._process.poll() is not None:
                raise self.Error(f"{self.NAME} exited with code {self._process.returncode}:\n{self.log()}")
            if not ready_url:
                for line in self.log().splitlines():
                    if line.startswith(self.READY_PREFIX):
                        ready_url = line.split()[1]
                        break
            if ready_url:
                self.base_url = ready_url
                self.port = int(ready_url.rsplit(":", 1)[1])
                if self._answers():
                    return
            if time.monotonic() > deadline:
                raise self.Error(f"{self.NAME} did not answer within {START_TIMEOUT:.0f} s:\n{self.log()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with opener.open(self.base_url + self.PROBE_PATH, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
            if process.stdin is not None:
                process.stdin.close()
        if self._log_dir is not None:
            self._last_log = self.log()
            self._log_dir.cleanup()
            self._log_dir = None
            self._log_path = None
        if self._requested_port is None:
            self.base_url = ""
            self.port = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def log(self) -> str:
        """The process's stdout+stderr so far."""
        if self._log_path is not None and self._log_path.exists():
            return self._log_path.read_text(errors="replace")
        return getattr(self, "_last_log", "")

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
