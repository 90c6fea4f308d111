"""SQLite's particulars: the engine's settings, the writer queue, the single-daemon lock, and
the database file's identity.

WAL, ``synchronous=FULL``, every writing transaction ``BEGIN IMMEDIATE`` (so two writers queue
instead of failing on a lock upgrade), readers plain ``BEGIN`` (WAL readers never wait for the
writer). An exclusive lock file beside the database refuses a second daemon on the same file.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from program_timer.core.logs import get_logger
from program_timer.store.errors import AlreadyRunning, StoreError, StoreUnavailable
from program_timer.store.queries import driver

log = get_logger()


def path_of(url: URL) -> Path | None:
    """The database file of a SQLite URL (None for another database or an in-memory one)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).resolve()


MIN_VERSION: Final = (3, 35, 0)


def check_library() -> None:
    """Refuse, with what is missing, a SQLite library (the one Python's ``sqlite3`` was built
    with) that lacks what the statements use: ``RETURNING`` and ``MATERIALIZED`` (3.35) and the
    JSON functions (``json_each``: built in from 3.38, compiled in by most distributions
    before)."""
    found = sqlite3.sqlite_version_info
    wanted = ".".join(map(str, MIN_VERSION))
    if found < MIN_VERSION:
        raise StoreError(
            f"SQLite {sqlite3.sqlite_version} is too old: program-timer needs {wanted} or newer "
            "(the library Python's sqlite3 module uses), or PostgreSQL"
        )
    probe = sqlite3.connect(":memory:")
    try:
        probe.execute("SELECT value FROM json_each('[1]')").fetchall()
    except sqlite3.OperationalError as exc:
        raise StoreError(
            f"SQLite {sqlite3.sqlite_version} has no JSON functions ({exc}): program-timer "
            "needs a library built with them (the default from 3.38), or PostgreSQL"
        ) from None
    finally:
        probe.close()


def engine(url: URL, *, pool_size: int, timeout: float, read_only: str) -> Engine:
    """``timeout``: how long a connection waits for SQLite's lock (its busy timeout)."""
    check_library()
    eng = create_engine(
        url,
        json_serializer=driver.json_dumps,
        json_deserializer=driver.json_loads,
        connect_args={"check_same_thread": False, "timeout": timeout},
        poolclass=None if path_of(url) else NullPool,
        pool_size=pool_size,
        max_overflow=4,
    )

    @event.listens_for(eng, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        cur.close()

    @event.listens_for(eng, "begin")
    def _begin(conn: Connection) -> None:
        # A reader's BEGIN: WAL readers never wait for a writer. On the driver: through
        # SQLAlchemy's exec_driver_sql it was a quarter of a transaction's own Python.
        driver.begin(
            conn, "BEGIN" if conn.get_execution_options().get(read_only) else "BEGIN IMMEDIATE"
        )

    return eng


class DatabaseFile:
    """The database file as the daemon opened it (device and inode), checked before every
    connection and every transaction: a file deleted or replaced under the running daemon is a
    fault (:class:`StoreUnavailable`, logged once), never a fresh empty database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)
        self._lock = threading.Lock()
        self._logged = False

    def watch(self, eng: Engine) -> None:
        event.listen(eng, "do_connect", self._before_connect)
        event.listen(eng, "begin", self._before_transaction)

    def check(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            problem = "was deleted"
        else:
            if (st.st_dev, st.st_ino) == self._identity:
                return
            problem = "was replaced by another file"
        with self._lock:
            first, self._logged = not self._logged, True
        if first:
            log.error(
                "the database file is gone: restart the daemon once it is restored",
                action="database_file_lost",
                file=str(self.path),
                problem=problem,
            )
        raise StoreUnavailable(
            f"the database file {self.path} {problem} while the daemon was running; "
            "restore it and restart the daemon"
        )

    def _before_connect(self, *_args: Any) -> None:
        try:
            self.check()
        except StoreUnavailable as exc:
            # Raised as the driver's own error, so that the pool gives up this connection.
            raise sqlite3.OperationalError(str(exc)) from None

    def _before_transaction(self, _conn: Connection) -> None:
        self.check()


class FairLock:
    """A lock granted in the order it was asked for.

    SQLite has one writer at a time, and a writer that finds the database locked sleeps in
    SQLite's busy handler (up to 100 ms a try) while the thread that holds it may commit and
    begin again at once: under a burst of fires, commands starved. Within the daemon, writers
    queue here instead, first come first served, and SQLite's lock is never contended.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class SQLiteLock:
    """An exclusive lock on ``<database>.lock``, held for the daemon's life."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self, *, create_folder: bool = False) -> None:
        """``create_folder``: the default location's folder may be made; a folder the user
        named must exist (a typo must not become a new empty database)."""
        folder = self.path.parent
        if create_folder:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise StoreError(f"the database folder {folder} does not exist")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(
                f"cannot open {self.path} (beside the database): {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another program-timer daemon (pid {holder}) is using the SQLite database "
                f"{self.path.with_suffix('')}; SQLite is single-daemon: stop it first, or use "
                "PostgreSQL to run several daemons"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
