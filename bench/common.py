"""What every part of the benchmark shares: databases, bulk loads, the daemon subprocess, a
pipelining socket client, polling, and statistics.

Times measured across processes (``fired_at`` written by the daemon, the moment the harness sees
the last event committed) are wall-clock UTC epoch seconds: both sides read the same clock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from program_timer.store.db import make_engine, normalize_url, upgrade
from program_timer.store.schema import events as events_table

DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"

# Column order of every bulk-loaded timer row.
TIMER_COLUMNS = (
    "persona_id",
    "timer_name",
    "connector_idn",
    "fire_at",
    "timezone",
    "interval_s",
    "repeatable",
    "enabled",
    "anchor_at",
    "planned_at",
    "due_at",
    "state",
    "fire_count",
    "last_fired_at",
    "arguments",
    "command_act_id",
    "created_at",
    "updated_at",
)
CONNECTOR = "bench"
# One extra argument per timer, carried into its events (a realistic, small payload).
TIMER_ARGUMENTS = json.dumps({"flow": "bench"}, separators=(",", ":"))


class BenchError(RuntimeError):
    """A scenario could not be run (daemon failed to start, timed out, ...)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def from_epoch(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def sqlite_ts(dt: datetime) -> str:
    """The text form SQLAlchemy's SQLite ``DATETIME`` stores (naive UTC); it sorts in time order."""
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def iso_z(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- statistics ------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence (``p`` in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-p * len(sorted_values) // 100))))
    return float(sorted_values[rank - 1])


def summarize_ms(values_s: Iterable[float]) -> dict[str, Any]:
    """p50 / p90 / p99 / max / mean of durations given in seconds, reported in milliseconds."""
    values = sorted(values_s)
    if not values:
        return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "n": len(values),
        "p50_ms": ms(percentile(values, 50)),
        "p90_ms": ms(percentile(values, 90)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(values[-1]),
        "mean_ms": ms(sum(values) / len(values)),
    }


# --- databases ---------------------------------------------------------------------------------


# What the checkpointer waits on while a checkpoint runs (its pacing sleep, its writes and
# syncs); idle, it waits on ``CheckpointerMain``.
CHECKPOINT_WAITS: Final = frozenset(
    {"CheckpointWriteDelay", "DataFileWrite", "DataFileSync", "DataFileFlush", "WALWrite"}
)


class Database:
    """One database of one kind for the whole run; :meth:`fresh` empties it for each scenario.

    SQLite: a new file per scenario in the run's temporary folder. PostgreSQL: one database
    ``bench_<random>`` created at :meth:`setup`, whose ``public`` schema is dropped and recreated
    for each scenario, and which :meth:`cleanup` drops.
    """

    def __init__(self, kind: str, workdir: Path, pg_admin_url: str = DEFAULT_PG_ADMIN) -> None:
        if kind not in ("sqlite", "postgres"):
            raise ValueError(f"unknown database kind {kind!r}: use sqlite or postgres")
        self.kind = kind
        self.workdir = workdir
        self.pg_admin_url = _libpq_url(pg_admin_url)
        self.pg_name: str | None = None
        self.url = ""
        self.path: Path | None = None
        self._created = False

    # lifecycle

    def setup(self) -> None:
        if self.kind == "postgres":
            self.pg_name = f"bench_{uuid.uuid4().hex[:12]}"
            with psycopg.connect(self.pg_admin_url, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'CREATE DATABASE "{self.pg_name}"')
            self._created = True
            self.url = (
                make_url(self.pg_admin_url)
                .set(database=self.pg_name)
                .render_as_string(hide_password=False)
            )

    def cleanup(self) -> None:
        if self.kind == "postgres" and self._created and self.pg_name:
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(self.pg_admin_url, autocommit=True, connect_timeout=5) as conn,
            ):
                conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')
                self._created = False
        self._remove_sqlite_files()

    def fresh(self, label: str) -> str:
        """An empty database with the daemon's schema (migrated to head); returns its URL."""
        if self.kind == "sqlite":
            self._remove_sqlite_files()
            self.path = self.workdir / f"{label}.db"
            self.url = f"sqlite:///{self.path}"
        else:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
                conn.execute("CREATE SCHEMA public")
        engine = make_engine(self.url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        return self.url

    def _remove_sqlite_files(self) -> None:
        if self.path is None:
            return
        for suffix in ("", "-wal", "-shm", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")

    def checkpoints(self) -> tuple[int, bool | None] | None:
        """PostgreSQL: how many checkpoints the server has begun so far, and whether one is
        running now (its checkpointer writing, syncing or pacing its writes; None where this
        role cannot see the checkpointer); None on SQLite, or when the server cannot be asked
        (the figure is then left out, the scenario is not failed for it). A checkpoint spreads
        its writes over most of its interval, and the first change to each page after it begins
        writes the whole page to the WAL: the commits of a scenario during which one begins wait
        longer (README, "Speed"). From PostgreSQL 17 the count is ``pg_stat_checkpointer``'s,
        whose timed checkpoints include those an idle server skips."""
        if self.kind != "postgres":
            return None
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                begun = conn.execute(
                    "SELECT num_timed + num_requested FROM pg_stat_checkpointer"
                    if conn.info.server_version >= 170000
                    else "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
                ).fetchone()
                waiting = conn.execute(
                    "SELECT wait_event FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
                ).fetchone()
        except psycopg.Error:
            return None
        assert begun is not None
        running = None if waiting is None else waiting[0] in CHECKPOINT_WAITS
        return int(begun[0]), running

    # access

    def raw(self) -> Any:
        """A DB-API connection in autocommit mode (every statement its own transaction)."""
        if self.kind == "sqlite":
            assert self.path is not None
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA busy_timeout=30000")
            return conn
        return psycopg.connect(self.url, autocommit=True)

    def engine(self) -> sa.Engine:
        """A plain SQLAlchemy engine to read results back (types converted by our schema)."""
        return sa.create_engine(normalize_url(self.url), poolclass=sa.pool.NullPool)

    def ts(self) -> Callable[[datetime], Any]:
        """How a bulk-loaded row carries a time on this database."""
        return sqlite_ts if self.kind == "sqlite" else (lambda d: d)

    def insert_timers(
        self, rows: Iterable[tuple[Any, ...]], columns: Sequence[str] = TIMER_COLUMNS
    ) -> None:
        """Bulk-load timer rows (in :data:`TIMER_COLUMNS` order) in one transaction:
        ``executemany`` on SQLite, ``COPY`` on PostgreSQL."""
        cols = ", ".join(columns)
        counts: dict[str, int] = {}  # the daemon keeps counts by state (timer_counts): add ours
        state_at = list(columns).index("state")

        def counted() -> Iterator[tuple[Any, ...]]:
            for row in rows:
                counts[row[state_at]] = counts.get(row[state_at], 0) + 1
                yield row

        add_counts = (
            "INSERT INTO timer_counts (state, shard, n) VALUES ({m}, 0, {m}) "
            "ON CONFLICT (state, shard) DO UPDATE SET n = timer_counts.n + excluded.n"
        )
        if self.kind == "sqlite":
            conn = self.raw()
            try:
                conn.execute("BEGIN IMMEDIATE")
                marks = ", ".join("?" * len(columns))
                conn.executemany(f"INSERT INTO timers ({cols}) VALUES ({marks})", counted())
                conn.executemany(add_counts.format(m="?"), list(counts.items()))
                conn.execute("COMMIT")
            finally:
                conn.close()
            return
        with psycopg.connect(self.url) as conn:
            with conn.cursor() as cur, cur.copy(f"COPY timers ({cols}) FROM STDIN") as copy:
                for row in counted():
                    copy.write_row(row)
            with conn.cursor() as cur:
                cur.executemany(add_counts.format(m="%s"), list(counts.items()))
            conn.commit()
            # A real table has statistics (autovacuum); a freshly loaded one would not yet.
            conn.execute("ANALYZE timers")
            conn.commit()

    def settle(self) -> None:
        """After a large load: checkpoint the WAL (SQLite) or vacuum and analyze (PostgreSQL),
        as a database that has been running a while would be."""
        if self.kind == "sqlite":
            conn = self.raw()
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.execute("ANALYZE")
            finally:
                conn.close()
        else:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")

    def max_event_id(self, conn: Any) -> int:
        row = conn.execute("SELECT max(id) FROM events").fetchone()
        return int(row[0] or 0)

    def event_times(self) -> list[tuple[float, float]]:
        """``(scheduled_at, fired_at)`` of every event, epoch seconds, in id order."""
        engine = self.engine()
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.select(events_table.c.scheduled_at, events_table.c.fired_at).order_by(
                        events_table.c.id
                    )
                ).all()
        finally:
            engine.dispose()
        return [(s.timestamp(), f.timestamp()) for s, f in rows]

    def count(self, table: str) -> int:
        conn = self.raw()
        try:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        finally:
            conn.close()


def one_database_args(
    description: str, n: int, size: bool = False, default_size: int = 1
) -> argparse.Namespace:
    """The command line of a measure on one database: ``--db``, ``--n`` (default ``n``),
    ``--pg-url`` and, with ``size``, ``--size`` (default ``default_size``)."""
    return one_database_parser(description, n, size, default_size).parse_args()


def one_database_parser(
    description: str, n: int, size: bool = False, default_size: int = 1
) -> argparse.ArgumentParser:
    """:func:`one_database_args`' parser, for a measure with options of its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--db", default="sqlite", choices=["sqlite", "postgres"])
    parser.add_argument("--n", type=int, default=n)
    if size:
        parser.add_argument("--size", type=int, default=default_size)
    parser.add_argument("--pg-url", default=DEFAULT_PG_ADMIN)
    return parser


@contextlib.contextmanager
def scratch_database(kind: str, pg_url: str, label: str) -> Iterator[tuple[str, Path]]:
    """A migrated database of ``kind`` in a temporary folder (PostgreSQL: a database of its own
    on ``pg_url``), dropped afterwards; yields its URL and the folder."""
    with tempfile.TemporaryDirectory(prefix=f"pt-{label}-") as folder:
        db = Database(kind, Path(folder), pg_url)
        try:
            db.setup()
            yield db.fresh(label), Path(folder)
        finally:
            db.cleanup()


def _libpq_url(url: str) -> str:
    """``postgresql+psycopg://…`` and ``postgres://…`` as a plain libpq URI."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


# --- timer rows --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimerSpec:
    persona_id: str
    timer_name: str
    due_at: datetime
    interval: float | None = None  # repeating, interval-only, when set


def timer_rows(
    db: Database, specs: Iterable[TimerSpec], now: datetime
) -> Iterator[tuple[Any, ...]]:
    """Rows exactly as a ``set_timer`` command would leave them (scheduled, enabled)."""
    ts = db.ts()
    created = ts(now)
    for s in specs:
        due = ts(s.due_at)
        if s.interval is None:  # one-shot with fireAt
            fire_at, anchor, repeatable = due, None, False
        else:  # interval-only repeating timer: anchored at its command
            fire_at, anchor, repeatable = None, ts(s.due_at - timedelta(seconds=s.interval)), True
        yield (
            s.persona_id,
            s.timer_name,
            CONNECTOR,
            fire_at,
            None,
            s.interval,
            repeatable,
            True,
            anchor,
            due,
            due,
            "scheduled",
            0,
            None,
            TIMER_ARGUMENTS,
            str(uuid.uuid4()),
            created,
            created,
        )


def burst_specs(
    n: int, due: datetime, prefix: str = "burst", per_persona: int = 1000
) -> Iterator[TimerSpec]:
    for i in range(n):
        yield TimerSpec(f"{prefix}-{i // per_persona:05d}", f"t{i:07d}", due)


def steady_specs(
    rate: float, seconds: float, start: datetime, prefix: str = "steady", per_persona: int = 1000
) -> Iterator[TimerSpec]:
    n = int(rate * seconds)
    for i in range(n):
        due = start + timedelta(seconds=i / rate)
        yield TimerSpec(f"{prefix}-{i // per_persona:05d}", f"t{i:07d}", due)


# --- the daemon subprocess ---------------------------------------------------------------------


def daemon_command() -> list[str]:
    """``program-timer serve`` from the interpreter running the benchmark (no shell shims)."""
    script = Path(sys.executable).with_name("program-timer")
    if script.exists():
        return [str(script), "serve"]
    found = shutil.which("program-timer")
    if found:
        return [found, "serve"]
    return [sys.executable, "-c", "from program_timer.scheduler.cli import main; main()", "serve"]


class Daemon:
    """``program-timer serve`` as a subprocess, configured only by its environment."""

    def __init__(
        self,
        url: str,
        workdir: Path,
        label: str,
        env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        """``wrapper``: a command the daemon runs under (``valgrind …``), its output in the
        daemon's log."""
        self.url = url
        self.wrapper = list(wrapper)
        self.workdir = workdir
        self.label = label
        self.socket = str(workdir / f"{label}.sock")
        self.log_path = workdir / f"{label}.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._profiler: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start it; returns the seconds from process start to the socket answering ``ping``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRAM_TIMER_")}
        env.update(
            PROGRAM_TIMER_DATABASE_URL=self.url,
            PROGRAM_TIMER_SOCKET=self.socket,
            **self.extra_env,
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        logfile = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            started = time.monotonic()
            self.proc = subprocess.Popen(
                [*self.wrapper, *daemon_command()],
                env=env,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
            )
        finally:
            logfile.close()
        _RUNNING.add(self)
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"the daemon exited with {self.proc.returncode} at start:\n{self.log_tail()}"
                )
            if os.path.exists(self.socket) and ping(self.socket):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(
                    f"the daemon did not answer ping in {timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.002)

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_profile()
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"daemon {self.label} ignored SIGTERM for {timeout} s: killing it")
                proc.kill()
                proc.wait(10)
        _RUNNING.discard(self)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown at all (its database sessions end when the kernel closes them)."""
        self.stop_profile()
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        _RUNNING.discard(self)
        self.proc = None

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # profiling (py-spy, optional) -----------------------------------------------------------

    def start_profile(self, out: Path, rate: int = 250) -> None:
        spy = shutil.which("py-spy")
        if spy is None:
            log("py-spy is not installed (pip install py-spy): no profile taken")
            return
        self._profiler = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(out),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)  # let it attach

    def stop_profile(self) -> None:
        spy, self._profiler = self._profiler, None
        if spy is None:
            return
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_RUNNING: set[Daemon] = set()


def stop_all_daemons() -> None:
    """Stop every daemon this process started and has not stopped yet (exit path)."""
    for daemon in list(_RUNNING):
        with contextlib.suppress(Exception):
            daemon.stop(timeout=15)


# --- the socket --------------------------------------------------------------------------------


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class LineConn:
    """A raw connection to the daemon: send lines, read whatever complete lines have arrived."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_messages(self) -> list[dict[str, Any]]:
        """Block for at least one complete line; return all complete lines received so far."""
        while b"\n" not in self._buf:
            chunk = self.sock.recv(1 << 18)
            if not chunk:
                raise BenchError("the daemon closed the connection")
            self._buf += chunk
        head, _, self._buf = self._buf.rpartition(b"\n")
        return [json.loads(line) for line in head.split(b"\n") if line]

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its reply (pushed events in between are dropped)."""
        rid = message.setdefault("id", uuid.uuid4().hex)
        self.send(message)
        while True:
            for m in self.read_messages():
                if m.get("id") == rid and m.get("op") != "event":
                    return m

    def __enter__(self) -> LineConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ping(path: str) -> bool:
    try:
        with LineConn(path, timeout=5) as conn:
            return bool(conn.request({"op": "ping"}).get("ok"))
    except (OSError, BenchError, ValueError):
        return False


def set_timer_message(
    rid: Any, persona: str, name: str, *, fire_at: str | None = None, interval: str | None = None
) -> dict[str, Any]:
    args: dict[str, str] = {"personaId": persona, "timerName": name, "flow": "bench"}
    if fire_at is not None:
        args["fireAt"] = fire_at
    if interval is not None:
        args["interval"] = interval
    return {
        "op": "command",
        "id": rid,
        "commandIdn": "set_timer",
        "integrationIdn": "program_timer",
        "connectorIdn": CONNECTOR,
        "arguments": args,
    }


def load_due(db: Database, path: str, specs: list[TimerSpec]) -> None:
    """Store ``specs`` and let the daemon know, through public interfaces only.

    Every timer but the earliest is bulk-loaded into ``timers`` (rows exactly as ``set_timer``
    leaves them); then the earliest is set with a real ``set_timer`` command on ``path``. The
    daemon must wake when that timer is due (other daemons on the database are told by the one
    that took the command), and then it fires whatever the table holds that is due too: the
    harness does not rely on a command making the daemon look at its whole table again.
    """
    if not specs:
        return
    first = min(range(len(specs)), key=lambda i: specs[i].due_at)
    db.insert_timers(timer_rows(db, (s for i, s in enumerate(specs) if i != first), utcnow()))
    set_timer_spec(path, specs[first])


def set_timer_spec(path: str, spec: TimerSpec) -> None:
    """One ``set_timer`` command for ``spec`` (a one-shot at ``due_at``, or interval-only)."""
    if spec.interval is None:
        message = set_timer_message(
            None, spec.persona_id, spec.timer_name, fire_at=iso_z(spec.due_at)
        )
    else:
        message = set_timer_message(
            None, spec.persona_id, spec.timer_name, interval=f"{spec.interval:g}"
        )
    with LineConn(path) as conn:
        reply = conn.request(message)
    if not reply.get("ok"):
        raise BenchError(f"set_timer refused: {reply}")


def wait_for_events(
    db: Database, expected: int, timeout: float, poll: float = 0.01
) -> float | None:
    """Poll ``max(events.id)`` (cheap: the primary key) until ``expected`` events are committed;
    returns the wall-clock time that was first seen, or None on timeout.

    A single daemon fires batch after batch, so event ids are committed in order and the
    largest visible id counts the committed events of a fresh table; once it says so, one
    ``count(*)`` confirms it (ids may have gaps, e.g. after a rolled-back batch), and if it does
    not, polling goes on with ``count(*)``.
    """
    conn = db.raw()
    try:
        deadline = time.monotonic() + timeout
        by_id = True
        while True:
            if by_id:
                seen = db.max_event_id(conn)
            else:
                seen = int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
            if seen >= expected:
                at = time.time()
                if not by_id:
                    return at
                by_id = False
                if int(conn.execute("SELECT count(*) FROM events").fetchone()[0]) >= expected:
                    return at
                continue
            if time.monotonic() > deadline:
                return None
            time.sleep(poll)
    finally:
        conn.close()


def sleep_until(epoch: float) -> None:
    delay = epoch - time.time()
    if delay > 0:
        time.sleep(delay)


class Stopwatch:
    """A thread-safe list of samples (seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samples: list[tuple[float, float]] = []  # (start epoch, duration)

    def add(self, start: float, duration: float) -> None:
        with self._lock:
            self.samples.append((start, duration))
