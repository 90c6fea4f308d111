"""A private, throw-away PostgreSQL server that a test starts and stops itself.

The outage tests must stop the database under a running daemon, which they cannot do to the
shared server the rest of the suite uses. This starts one from ``initdb`` in a temporary folder,
on a free TCP port of 127.0.0.1, with trust authentication and its Unix socket in that folder.
PostgreSQL refuses to run as root: when the tests run as root, ``initdb`` and ``pg_ctl`` run as
the ``postgres`` OS user (through ``runuser``), in a folder that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg


def find_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: ``$PG_BIN``, the newest Debian-style
    ``/usr/lib/postgresql/<major>/bin``, or the ``PATH``."""
    explicit = os.environ.get("PG_BIN")
    candidates = [explicit] if explicit else []
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """``initdb`` once, then :meth:`start` / :meth:`stop` as often as the test needs; the same
    data folder and port each time. :meth:`destroy` stops it and removes the folder."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="ptpg", dir="/tmp"))
        self.data = self.folder / "data"
        self.logfile = self.folder / "postgres.log"
        self._run_as: str | None = "postgres" if os.geteuid() == 0 else None
        if self._run_as:
            pw = pwd.getpwnam(self._run_as)
            os.chown(self.folder, pw.pw_uid, pw.pw_gid)
        os.chmod(self.folder, 0o755)

    # running the server's tools --------------------------------------------------------------

    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / tool), *args]
        if self._run_as:
            cmd = ["runuser", "-u", self._run_as, "--", *cmd]
        return cmd

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> None:
        proc = subprocess.run(
            self._cmd(tool, *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            cwd=self.folder,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout.decode(errors='replace')}\n{self.server_log()}"
            )

    def server_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-5000:]
        except (FileNotFoundError, PermissionError):
            return ""

    # lifecycle ----------------------------------------------------------------------------

    def init(self) -> PrivatePostgres:
        self._run(
            "initdb",
            "-D", str(self.data),
            "-A", "trust",
            "-U", "postgres",
            "-E", "UTF8",
            "--no-instructions",
        )  # fmt: skip
        return self

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.folder}",
                # A throw-away server: durability against OS crashes is not what is tested, but
                # synchronous_commit stays on, since `stop -m immediate` loses the commits whose
                # WAL is still in shared memory (the outage would lose acknowledged writes).
                "-c fsync=off",
                "-c full_page_writes=off",
                "-c max_connections=50",
            ]
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        proc = subprocess.run(
            self._cmd("pg_ctl", "-D", str(self.data), "status"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return proc.returncode == 0

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            if self.data.exists() and self.running():
                self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    # databases ----------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def wait_accepting(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@contextlib.contextmanager
def private_postgres(bin_dir: Path) -> Iterator[PrivatePostgres]:
    server = PrivatePostgres(bin_dir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()
