"""Engines, transactions, migrations, driver-error translation and the database's health.

SQLite's particulars (WAL, ``BEGIN IMMEDIATE``, the writer queue, the single-daemon lock, the
file's identity) are in :mod:`program_timer.store.sqlite`; PostgreSQL's (psycopg 3, every wait
bounded, a pooled connection checked before use) in :mod:`program_timer.store.postgres`.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy.exc as sa_exc
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL, make_url

from program_timer.core.logs import get_logger
from program_timer.store import postgres, sqlite
from program_timer.store.errors import Conflict, StoreError, StoreUnavailable
from program_timer.store.queries import driver

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


def make_engine(
    url: str, *, pool_size: int = 4, name: str = "program-timer", timeout: float = 30.0
) -> Engine:
    """An engine whose every wait on the database is bounded by ``timeout`` seconds (connect,
    a pooled connection, a lock, a statement; see :func:`program_timer.store.postgres.engine`).

    ``name`` becomes PostgreSQL's ``application_name``: the daemon's id, so the sessions
    holding its fire claims (row locks) are visible as its own in ``pg_stat_activity``."""
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = sqlite.engine(parsed, pool_size=pool_size, timeout=timeout, read_only=READ_ONLY)
        _WRITE_LOCKS[engine] = sqlite.FairLock()
        return engine
    if backend == "postgresql":
        return postgres.engine(parsed, pool_size=pool_size, name=name, timeout=timeout)
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
_RETRYABLE_SQLSTATES = frozenset(
    {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available in time
)
_TIMED_OUT_SQLSTATES = frozenset({"57014"})  # statement_timeout: the database is too slow


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn driver errors into the store's own (the rest of the code sees no driver error)."""
    try:
        yield
    except sa_exc.IntegrityError as exc:
        raise Conflict(str(exc.orig)) from exc
    except sa_exc.DBAPIError as exc:
        text_ = str(exc.orig) if exc.orig is not None else str(exc)
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if sqlstate in _RETRYABLE_SQLSTATES:
            raise Conflict(_first_line(text_)) from exc
        if sqlstate in _TIMED_OUT_SQLSTATES:
            raise StoreUnavailable(_first_line(text_)) from exc
        if exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        ):
            if "serializ" in text_ or "deadlock" in text_:
                raise Conflict(text_) from exc
            raise StoreUnavailable(_first_line(text_)) from exc
        raise StoreError(_first_line(text_)) from exc  # a bug of ours: the caller logs it
    except sa_exc.TimeoutError as exc:
        raise StoreUnavailable("no database connection could be had in time") from exc


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "database error"


_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, sqlite.FairLock] = weakref.WeakKeyDictionary()
READ_ONLY = "program_timer_read_only"


@contextlib.contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One database transaction; driver errors come out translated, and whether the database
    took the write is reported to its :class:`Health`."""
    lock = _WRITE_LOCKS.get(engine)
    with (
        _reported(engine, write=True),
        translate_errors(),
        lock or contextlib.nullcontext(),
        engine.begin() as conn,
    ):
        yield conn


@contextlib.contextmanager
def pipelined_transaction(engine: Engine, *, durable: bool = True) -> Iterator[Connection]:
    """A transaction whose statements all run in :func:`~.queries.driver.pipeline` (the fire
    batch's). On PostgreSQL its BEGIN is sent in the pipeline, with the first query, instead
    of in a round trip of its own (psycopg syncs after the BEGIN it sends itself), and the
    block is expected to end with :func:`~.queries.driver.commit_in_pipeline`, so that the
    COMMIT goes with the pipeline's last sync: a transaction of two queries is then two round
    trips. For that, psycopg's connection is put in autocommit mode for the block (SQLAlchemy's
    ``AUTOCOMMIT`` isolation level, which it resets when the connection goes back to the pool)
    and the transaction is ours: BEGIN and COMMIT sent in the pipeline, or ROLLBACK by
    SQLAlchemy on an error (psycopg sends it whenever a transaction is open, autocommit or
    not). A block that does not commit is committed at its end, a round trip later. The
    engine's isolation level (:func:`read_modify_write`) goes into the BEGIN. A statement run
    through SQLAlchemy in the block ends the pipeline first (the engine's listener,
    :func:`~.queries.driver.suspend_pipeline`). Elsewhere: :func:`transaction`.

    ``durable=False``: the transaction may commit without waiting for the disk. PostgreSQL:
    ``SET LOCAL synchronous_commit = off``, sent in the pipeline after the BEGIN. The commit
    is still atomic and in WAL order (a later synchronous commit, of a fire or a command,
    flushes it too); a database crash may lose the last few hundred milliseconds of such
    commits, and corrupts nothing. Only for writes whose loss is harmless (the store
    worker's acks and send marks: a delivery is then sent again, at least once, with the
    attempt it had). SQLite: nothing; its commits stay ``synchronous=FULL`` (``PRAGMA
    synchronous`` is per connection and would have to be put back before the pooled
    connection serves a fire)."""
    if engine.dialect.name != "postgresql":
        with transaction(engine) as conn:
            yield conn
        return
    with (
        _reported(engine, write=True),
        translate_errors(),
        _connection(engine) as conn,
        _pipelined(engine, conn, durable=durable),
    ):
        yield conn


def _connection(engine: Engine) -> Connection:
    """A pooled connection for :func:`_pipelined` or :func:`read_statements`: in autocommit
    mode on PostgreSQL (reset when it goes back to the pool)."""
    conn = engine.connect()
    if engine.dialect.name == "postgresql":
        conn.execution_options(isolation_level="AUTOCOMMIT")
    return conn


@contextlib.contextmanager
def _pipelined(engine: Engine, conn: Connection, *, durable: bool) -> Iterator[Connection]:
    """The transaction of :func:`pipelined_transaction` on ``conn`` (from :func:`_connection`).
    SQLite: the writer's lock and a plain transaction (``BEGIN IMMEDIATE``)."""
    if engine.dialect.name != "postgresql":
        with _WRITE_LOCKS.get(engine) or contextlib.nullcontext(), conn.begin():
            yield conn
        return
    level = engine.get_execution_options().get("isolation_level")
    begin = "BEGIN" if level is None else f"BEGIN ISOLATION LEVEL {level}"
    with conn.begin(), driver.pipeline(conn, begin=begin):
        if not durable:
            driver.execute(conn, "SET LOCAL synchronous_commit = off", ())
        yield conn


class KeptConnections:
    """Connections that a loop of transactions keeps between them, instead of taking one from
    the pool for each: the fire loop, for the length of a fire pass; the store worker, while
    work comes. A pool checkout and return, with the isolation level set and reset, was a
    tenth of the instructions of a one-fire batch on either database (callgrind, README
    "Speed"), and a steady rate runs one batch per fire, and one ack transaction per read.

    :meth:`pipelined_transaction` is :func:`pipelined_transaction` on a kept connection, and
    :meth:`read_statements` is :func:`read_statements`. At most as many are kept as
    transactions ran at once: the fire loop's two, when a batch commits while the next one is
    claimed. A connection goes back to the pool as soon as a transaction on it fails, and at
    :meth:`release`. Before a kept PostgreSQL connection is used again its socket is looked
    at, as the pool does at a checkout (:func:`~program_timer.store.postgres.quiet`): one whose
    server ended the session goes back to the pool, whose checkout pings and replaces it, and
    the transaction runs on a connection the pool hands out; the caller never sees it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._kept: list[Connection] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def pipelined_transaction(
        self, *, durable: bool = True, engine: Engine | None = None
    ) -> Iterator[Connection]:
        """``engine``: one made from the kept connections' own with other execution options
        (:func:`read_modify_write`), whose isolation level the BEGIN names."""
        with (
            self._lent(write=True) as conn,
            _pipelined(engine or self._engine, conn, durable=durable),
        ):
            yield conn

    @contextlib.contextmanager
    def read_statements(self) -> Iterator[Connection]:
        """:func:`read_statements` on a kept connection (PostgreSQL: in autocommit mode, each
        statement its own transaction). Elsewhere that function itself."""
        if self._engine.dialect.name != "postgresql":
            with read_statements(self._engine) as conn:
                yield conn
            return
        with self._lent(write=False) as conn:
            yield conn
            if conn.in_transaction():  # SQLAlchemy's own begin: nothing on the server
                conn.rollback()

    def release(self) -> None:
        """Every kept connection back to the pool: the fire loop's at the end of a pass, the
        store worker's when no work came for a while and at its stop."""
        with self._lock:
            kept, self._kept = self._kept, []
        for conn in kept:
            conn.close()

    @contextlib.contextmanager
    def _lent(self, *, write: bool) -> Iterator[Connection]:
        """A kept connection (or a new one) for the block, kept again if the block succeeds."""
        with _reported(self._engine, write=write), translate_errors():
            conn = self._take()
            try:
                yield conn
            except BaseException:
                conn.close()  # back to the pool: rolled back, or dropped if invalidated
                raise
            with self._lock:
                self._kept.append(conn)

    def _take(self) -> Connection:
        with self._lock:
            conn = self._kept.pop() if self._kept else None
        if conn is not None and (
            conn.invalidated
            or (
                self._engine.dialect.name == "postgresql"
                and not postgres.quiet(conn.connection.dbapi_connection)
            )
        ):
            conn.close()
            conn = None
        return conn if conn is not None else _connection(self._engine)


@contextlib.contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that only reads: on SQLite it neither takes the write lock nor queues
    behind writers (WAL: it reads the last committed state)."""
    with _reported(engine, write=False), translate_errors(), engine.connect() as conn:
        conn = conn.execution_options(**{READ_ONLY: True})
        with conn.begin():
            yield conn


@contextlib.contextmanager
def read_statements(engine: Engine) -> Iterator[Connection]:
    """Reads that need no snapshot shared between their statements (a group of read-only
    commands, each one query: ``get_timer``, ``list_timers``). On PostgreSQL no transaction is
    opened: the connection is in autocommit mode (put back when it returns to the pool) and
    each statement is its own transaction, one round trip, where BEGIN, the query and COMMIT
    were three. Elsewhere: :func:`read_transaction`."""
    if engine.dialect.name != "postgresql":
        with read_transaction(engine) as conn:
            yield conn
        return
    with _reported(engine, write=False), translate_errors(), _connection(engine) as conn:
        yield conn


@contextlib.contextmanager
def _reported(engine: Engine, *, write: bool) -> Iterator[None]:
    record = health(engine)
    try:
        yield
    except StoreUnavailable as exc:
        record.report(False, str(exc), write=write)
        raise
    record.report(True, write=write)


def head_revision() -> str:
    """The newest migration's revision: each file in ``migrations/versions`` is named after its
    revision (``0004_timer_counts.py`` is ``"0004"``), in order (tests check both against
    Alembic's own view)."""
    names = (Path(MIGRATIONS) / "versions").glob("[0-9][0-9][0-9][0-9]_*.py")
    return max(name.name[:4] for name in names)


def at_head(engine: Engine) -> bool:
    """Whether the schema is the newest migration already: the usual start, which then costs
    one query instead of loading Alembic and every migration script (about a third of a
    daemon's start)."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    except sa_exc.DBAPIError:  # no schema yet; or no database: upgrade() says which
        return False
    return [r[0] for r in rows] == [head_revision()]


def upgrade(engine: Engine) -> None:
    """Create or upgrade the schema to the newest migration (several daemons may race here)."""
    if at_head(engine):
        return
    from alembic import command as alembic_command
    from alembic.config import Config as AlembicConfig
    from alembic.util.exc import CommandError as AlembicError

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", MIGRATIONS)
    with translate_errors(), engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # A migration, or waiting for another daemon's, may take longer than a request.
            conn.execute(text("SET statement_timeout = 0"))
            conn.execute(text("SET lock_timeout = 0"))
            conn.execute(text("SELECT pg_advisory_lock(7020170911)"))
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            alembic_command.upgrade(cfg, "head")
            conn.commit()
        except AlembicError as exc:  # e.g. a revision this code does not know: a newer schema
            raise StoreError(
                f"the database schema cannot be upgraded by this version of program-timer "
                f"({exc}); was the database used by a newer version?"
            ) from None
        finally:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(7020170911)"))
                conn.commit()


class Health:
    """Whether the database answered the last time anyone of the daemon asked.

    Every transaction reports here (:func:`transaction`, :func:`read_transaction`), so an outage
    is logged once, when it starts (``database_down``), and once when it ends
    (``database_back``), however many requests and polls fail in between. Reads and writes are
    kept apart: on a full disk reads still succeed, and a read must not end an outage that a
    write is still in; a write that succeeds ends any.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reads_ok = True
        self._writes_ok = True
        self.available = True

    def report(self, ok: bool, reason: str = "", *, write: bool = True) -> None:
        with self._lock:
            if ok:
                self._reads_ok = True
                if write:
                    self._writes_ok = True
            elif write:
                self._writes_ok = False
            else:
                self._reads_ok = False
            now_ok = self._reads_ok and self._writes_ok
            if now_ok == self.available:
                return
            self.available = now_ok
        if ok:
            log.info("database reachable again", action="database_back")
        else:
            log.error("database unreachable", action="database_down", reason=reason)


_HEALTH: weakref.WeakKeyDictionary[Any, Health] = weakref.WeakKeyDictionary()
_HEALTH_LOCK = threading.Lock()


def health(engine: Engine) -> Health:
    """The one :class:`Health` of this engine's database (shared by the engines made from it
    with other execution options: they share its pool)."""
    with _HEALTH_LOCK:
        found = _HEALTH.get(engine.pool)
        if found is None:
            found = _HEALTH[engine.pool] = Health()
        return found
