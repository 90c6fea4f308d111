"""Engines, transactions, migrations and driver-error translation.

SQLite: WAL, ``synchronous=FULL``, every transaction ``BEGIN IMMEDIATE`` (so two writers queue on
the busy timeout instead of failing on a lock upgrade), and an exclusive lock file beside the
database so that a second daemon on the same file is refused. PostgreSQL: psycopg 3, short
connect timeout and TCP keepalives, so an outage is noticed quickly instead of hanging.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy.exc as sa_exc
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from scheduler.logs import get_logger
from store.errors import AlreadyRunning, Conflict, StoreUnavailable

MIGRATIONS = str(Path(__file__).parent / "migrations")

log = get_logger()


def normalize_url(url: str) -> URL:
    """Accept ``postgresql://`` and ``postgres://`` and use psycopg 3 for them."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def dialect_of(url: str) -> str:
    return normalize_url(url).get_backend_name()


def sqlite_path(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).resolve()


def make_engine(url: str, *, pool_size: int = 4, name: str = "program-timer") -> Engine:
    """``name`` becomes PostgreSQL's ``application_name``: the daemon's id, so the sessions
    holding its fire claims (row locks) are visible as its own in ``pg_stat_activity``."""
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=None if sqlite_path(parsed) else NullPool,
            pool_size=pool_size,
            max_overflow=4,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")  # a reader: WAL readers never wait for a writer
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        _WRITE_LOCKS[engine] = FairLock()
        return engine
    if backend == "postgresql":
        return create_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=4,
            pool_pre_ping=True,
            pool_timeout=5,
            connect_args={
                "connect_timeout": 3,
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "application_name": name[:63],
                "options": "-c idle_in_transaction_session_timeout=60000",
            },
        )
    raise ValueError(f"unsupported database {parsed.drivername!r}: use sqlite or postgresql")


def read_modify_write(engine: Engine) -> Engine:
    """The engine for transactions that read rows and write them back (the commands).

    On PostgreSQL they run at REPEATABLE READ: a row that a fire pass (or another daemon)
    changed after the transaction read it cannot be overwritten with the stale copy; the write
    fails with a serialization error instead (a :class:`Conflict`, which the caller retries on
    fresh data). At READ COMMITTED the stale copy would win: the fire count goes back, and an
    occurrence that just fired becomes due again and fires twice. SQLite needs nothing: every
    transaction is ``BEGIN IMMEDIATE``, so writers never overlap.
    """
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="REPEATABLE READ")
    return engine


# SQLSTATEs of a transaction that lost a race and may simply be retried.
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn driver errors into the store's own (the rest of the code sees no driver error)."""
    try:
        yield
    except sa_exc.IntegrityError as exc:
        raise Conflict(str(exc.orig)) from exc
    except sa_exc.DBAPIError as exc:
        text_ = str(exc.orig) if exc.orig is not None else str(exc)
        if getattr(exc.orig, "sqlstate", None) in _RETRYABLE_SQLSTATES:
            raise Conflict(_first_line(text_)) from exc
        if exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        ):
            if "serializ" in text_ or "deadlock" in text_:
                raise Conflict(text_) from exc
            raise StoreUnavailable(_first_line(text_)) from exc
        raise
    except sa_exc.TimeoutError as exc:
        raise StoreUnavailable("no database connection could be had in time") from exc


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "database error"


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


_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, FairLock] = weakref.WeakKeyDictionary()
READ_ONLY = "program_timer_read_only"


@contextlib.contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One database transaction; driver errors come out translated."""
    lock = _WRITE_LOCKS.get(engine)
    with translate_errors(), lock or contextlib.nullcontext(), engine.begin() as conn:
        yield conn


@contextlib.contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that only reads: on SQLite it neither takes the write lock nor queues
    behind writers (WAL: it reads the last committed state)."""
    with translate_errors(), engine.connect() as conn:
        conn = conn.execution_options(**{READ_ONLY: True})
        with conn.begin():
            yield conn


def upgrade(engine: Engine) -> None:
    """Create or upgrade the schema to the newest migration (several daemons may race here)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", MIGRATIONS)
    with translate_errors(), engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(7020170911)"))
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            alembic_command.upgrade(cfg, "head")
            conn.commit()
        finally:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(7020170911)"))
                conn.commit()


def schema_version(engine: Engine) -> str | None:
    with translate_errors(), engine.connect() as conn:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except sa_exc.DBAPIError:
            return None


class SQLiteLock:
    """An exclusive lock on ``<database>.lock``, held for the daemon's life."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
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


class Health:
    """Whether the database answered the last time anyone of the daemon asked.

    Every part that reaches the database (the store worker, the job store) reports here, so an
    outage is logged once, when it starts (``database_down``), and once when it ends
    (``database_back``), however many requests and polls fail in between.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.available = True

    def report(self, ok: bool, reason: str = "") -> None:
        with self._lock:
            if ok == self.available:
                return
            self.available = ok
        if ok:
            log.info("database reachable again", action="database_back")
        else:
            log.error("database unreachable", action="database_down", reason=reason)


_HEALTH: weakref.WeakKeyDictionary[Engine, Health] = weakref.WeakKeyDictionary()
_HEALTH_LOCK = threading.Lock()


def health(engine: Engine) -> Health:
    """The one :class:`Health` of this engine's database."""
    with _HEALTH_LOCK:
        found = _HEALTH.get(engine)
        if found is None:
            found = _HEALTH[engine] = Health()
        return found
