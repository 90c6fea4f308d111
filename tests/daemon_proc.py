"""A real ``program-timer serve`` subprocess for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal as signals
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from program_timer.events.client import TimerClient


def short_tmpdir() -> Path:
    """AF_UNIX paths are limited to 108 bytes: keep socket folders short."""
    return Path(tempfile.mkdtemp(prefix="pt", dir="/tmp"))


class DaemonProcess:
    def __init__(self, database_url: str, folder: Path, **env: Any) -> None:
        self.database_url = database_url
        self.folder = folder
        self.socket = str(folder / "pt.sock")
        self.log_path = folder / "daemon.log"
        self.env = {k: str(v) for k, v in env.items()}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PROGRAM_TIMER_DATABASE_URL": self.database_url,
                "PROGRAM_TIMER_SOCKET": self.socket,
                "PROGRAM_TIMER_LOG_FORMAT": "json",
                "PROGRAM_TIMER_LOG_LEVEL": "debug",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env)
        return env

    def start(self, wait: bool = True, extra_args: list[str] | None = None) -> DaemonProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # The interpreter running the tests, so that the code under test is this checkout's.
        cmd = [sys.executable, "-m", "program_timer"]
        self.proc = subprocess.Popen(
            [*cmd, "serve", *(extra_args or [])],
            env=self.environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with TimerClient(self.socket, timeout=2) as c:
                    c.request("ping")
                    return
            except (OSError, ConnectionError):
                time.sleep(0.05)
        raise TimeoutError(f"daemon not ready in {timeout}s:\n{self.log()}")

    def client(self, timeout: float = 30.0) -> TimerClient:
        return TimerClient(self.socket, timeout=timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signals.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None
        return code

    def kill(self) -> None:
        self.stop(signals.SIGKILL)


def command(client: TimerClient, command_idn: str, connector: str = "my_timer", **args: Any) -> Any:
    return client.command(command_idn, connector, **args)


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


@contextlib.contextmanager
def running(url: str, **env: Any) -> Any:
    folder = short_tmpdir()
    daemon = DaemonProcess(url, folder, **env).start()
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)
