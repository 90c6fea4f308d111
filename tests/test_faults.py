"""Faults production brings (SPEC 7.2): a frozen database, a full disk, a deleted database
file, stops after an outage, absurd settings and bad paths, a vanished socket, crowds of
clients, and a connection that subscribes much and reads nothing.

Every test drives a real daemon subprocess through its socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import func, select

from program_timer.events.client import ClientError, TimerClient
from program_timer.store.db import make_engine
from program_timer.store.schema import deliveries, events
from tests.daemon_proc import DaemonProcess, short_tmpdir, wait_for
from tests.pg_private import PrivatePostgres, find_bin_dir

CONNECTOR = "fault_timer"
TIMEOUT = 1.0  # PROGRAM_TIMER_DATABASE_TIMEOUT of these daemons
SLACK = 1.5  # what a reply may take beyond the timeout on a loaded 2-core machine


def _log_lines(daemon: DaemonProcess) -> list[dict[str, Any]]:
    out = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"event": line, "action": None, "level": "raw"})
    return out


def _actions(daemon: DaemonProcess) -> Counter[str]:
    return Counter(str(r.get("action")) for r in _log_lines(daemon))


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    started = time.monotonic()
    try:
        value: Any = fn(*args, **kwargs)
    except ClientError as exc:
        value = exc
    return time.monotonic() - started, value


def _set(c: TimerClient, command: str, name: str, **args: Any) -> dict[str, Any]:
    return c.command(command, CONNECTOR, personaId="p", timerName=name, **args)


def _no_tracebacks(daemon: DaemonProcess) -> None:
    """No traceback, every line JSON, and every line with an ``action`` (libraries' too)."""
    text = daemon.log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-5000:]
    lines = _log_lines(daemon)
    raw = [r for r in lines if r.get("level") == "raw"]
    assert not raw, raw[:5]
    assert all(r.get("action") for r in lines), [r for r in lines if not r.get("action")][:5]


@contextlib.contextmanager
def _daemon(url: str, **env: Any) -> Iterator[DaemonProcess]:
    folder = short_tmpdir()
    daemon = DaemonProcess(url, folder, **env)
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A frozen PostgreSQL (SIGSTOP of the postmaster and every backend)


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) not found: set PG_BIN or install them"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: the fault tests must run)")
        pytest.skip(reason)
    server = PrivatePostgres(bin_dir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()


def _server_processes(pg: PrivatePostgres) -> list[psutil.Process]:
    pid = int((pg.data / "postmaster.pid").read_text().split()[0])
    main = psutil.Process(pid)
    return [main, *main.children(recursive=True)]


@contextlib.contextmanager
def _frozen(pg: PrivatePostgres) -> Iterator[None]:
    procs = _server_processes(pg)
    for p in procs:
        p.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(150)
def test_frozen_postgres_bounds_every_reply_and_loses_no_fire(private_pg: PrivatePostgres) -> None:
    url = private_pg.create_database(f"pt_frozen_{uuid.uuid4().hex[:8]}")
    with _daemon(
        url,
        PROGRAM_TIMER_DATABASE_TIMEOUT=TIMEOUT,
        PROGRAM_TIMER_LOG_LEVEL="info",
        PROGRAM_TIMER_ACK_TIMEOUT=3,
    ) as daemon:
        daemon.start()
        got: set[str] = set()
        stop_sub = threading.Event()

        def subscriber() -> None:  # an acking flow engine, through the whole freeze
            while not stop_sub.is_set():
                try:
                    with daemon.client(timeout=30) as sub:
                        sub.subscribe("frozen-flow")
                        while not stop_sub.is_set():
                            try:
                                m = sub.next_event(0.5)
                            except TimeoutError:
                                continue
                            got.add(m["event"]["externalEventId"])
                            with contextlib.suppress(ClientError):
                                sub.ack([m["deliveryId"]])
                except (ClientError, OSError, ConnectionError):
                    time.sleep(0.2)

        thread = threading.Thread(target=subscriber, daemon=True)
        thread.start()
        due = [f"due-{i}" for i in range(30)]
        with daemon.client() as c:
            _set(c, "set_timer", "before", interval="0.1")
            for i, name in enumerate(due):  # due 1.5 to 4.4 s from now: during the freeze
                _set(c, "set_timer", name, interval=f"{1.5 + i * 0.1:.1f}")
            _set(c, "set_repeatable_timer", "rep", interval="1")
        time.sleep(0.5)

        replies: list[tuple[str, float, Any]] = []
        with _frozen(private_pg):
            frozen_at = time.monotonic()
            with daemon.client(timeout=TIMEOUT + 30) as c:
                while time.monotonic() - frozen_at < 25:
                    replies.append(("ping", *_timed(c.request, "ping")))
                    replies.append(("set", *_timed(_set, c, "set_timer", "late", interval="60")))
                    replies.append(("get", *_timed(_set, c, "get_timer", "rep")))
                    replies.append(("status", *_timed(c.status)))
                    replies.append(("ack", *_timed(c.ack, [1])))
            down = _actions(daemon)
        thawed_at = time.monotonic()

        for kind, seconds, value in replies:
            assert seconds < TIMEOUT + SLACK, (kind, seconds, value)
            if kind == "ping":
                assert value == {"pong": True}
            elif kind == "status":
                assert value["databaseReachable"] is False, value
            elif kind == "ack":
                assert value == 0 or (
                    isinstance(value, ClientError) and value.code == "unavailable"
                )
            else:
                assert isinstance(value, ClientError) and value.code == "unavailable", value
                assert "may or may not have been applied" in value.message
        assert down["database_down"] == 1, down

        engine = make_engine(url)
        try:

            def fired() -> dict[str, int] | None:
                with engine.connect() as conn:
                    rows = conn.execute(
                        select(events.c.timer_name, func.count()).group_by(events.c.timer_name)
                    ).all()
                counts = {name: n for name, n in rows}
                return counts if all(n in counts for n in due) else None

            counts = wait_for(fired, timeout=30, interval=0.2)
            with daemon.client() as c:
                assert c.status()["databaseReachable"] is True
            wait_for(lambda: _actions(daemon)["database_back"] == 1, timeout=10)
            for name in ["before", *due]:
                assert counts[name] == 1, (name, counts.get(name))
            with engine.connect() as conn:
                wanted = set(conn.execute(select(events.c.external_event_id)).scalars())
            wait_for(lambda: wanted <= got, timeout=30, interval=0.2)
        finally:
            stop_sub.set()
            thread.join(10)
            engine.dispose()
        print(
            f"{len(replies)} replies in the 25 s freeze, slowest "
            f"{max(s for _, s, _ in replies):.2f} s; all due fired "
            f"{time.monotonic() - thawed_at:.1f} s after the thaw"
        )
        assert daemon.stop() == 0
        assert _actions(daemon)["database_down"] == 1
        _no_tracebacks(daemon)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_sigterm_after_an_outage_exits_cleanly_every_time(private_pg: PrivatePostgres) -> None:
    """The store worker used to crash on a cancelled future after an outage, and SIGTERM then
    hung until SIGKILL; now every stop ends in exit 0, quickly, with no traceback."""
    url = private_pg.create_database(f"pt_stop_{uuid.uuid4().hex[:8]}")
    with _daemon(url, PROGRAM_TIMER_DATABASE_TIMEOUT=TIMEOUT, PROGRAM_TIMER_LOG_LEVEL="info") as d:
        for round_ in range(3):
            d.start()
            with d.client() as c:
                for i in range(20):
                    _set(c, "set_timer", f"t{round_}-{i}", interval="0.5")
                c.subscribe(f"flow-{round_}")
                private_pg.stop("immediate")
                for _ in range(3):
                    _timed(_set, c, "set_timer", "x", interval="1")
                    _timed(c.status)
                started = time.monotonic()
                assert d.stop() == 0, d.log()
                assert time.monotonic() - started < 12
            private_pg.start()
        _no_tracebacks(d)


# ---------------------------------------------------------------------------------------------
# SQLite on a full disk, and a database file deleted under the daemon


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    folder = short_tmpdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        reason = f"cannot mount a small tmpfs (root needed): {done.stderr.strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: the full-disk test must run)")
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sqlite_full_disk_costs_no_core_and_recovers(small_tmpfs: Path) -> None:
    url = f"sqlite:///{small_tmpfs / 'timers.db'}"
    with _daemon(url, PROGRAM_TIMER_DATABASE_TIMEOUT=TIMEOUT, PROGRAM_TIMER_LOG_LEVEL="info") as d:
        d.start()
        with d.client() as c:
            for i in range(50):
                _set(c, "set_timer", f"t{i}", interval=f"{1 + i * 0.02:.2f}")
            _set(c, "set_repeatable_timer", "rep", interval="1")
        # fill the disk to the brim
        filler = small_tmpfs / "filler"
        with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
        time.sleep(2)  # the timers fall due: their fire passes fail
        assert d.proc is not None
        proc = psutil.Process(d.proc.pid)
        lines_before = len(_log_lines(d))
        cpu_before = proc.cpu_times()
        with d.client(timeout=TIMEOUT + 10) as c:
            seconds, value = _timed(_set, c, "set_timer", "refused", interval="1")
            assert seconds < TIMEOUT + SLACK
            assert isinstance(value, ClientError) and value.code == "unavailable", value
            status = c.status()
            assert status["databaseReachable"] is False, status
            assert status["failing"].get("firePass", 0) >= 1, status  # retrying, with backoff
        time.sleep(5)
        cpu_after = proc.cpu_times()
        busy = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
        new_lines = _log_lines(d)[lines_before:]
        assert busy / 5.0 < 0.05, f"{busy / 5.0:.1%} of a core while the disk is full"
        assert len(new_lines) <= 5, new_lines
        assert _actions(d)["database_down"] == 1
        assert _actions(d)["database_back"] == 0

        filler.unlink()  # space comes back
        wait_for(lambda: _actions(d)["database_back"] == 1, timeout=20)
        with d.client() as c:
            # the fire pass retries within its backoff's cap (5 s)
            try:
                wait_for(
                    lambda: _set(c, "get_timer", "t49")["timer"]["state"] == "fired", timeout=15
                )
            except TimeoutError:
                pytest.fail(d.log())
            assert c.status()["databaseReachable"] is True
        assert d.stop() == 0
    with sqlite3.connect(small_tmpfs / "timers.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        per_timer = dict(
            db.execute("SELECT timer_name, count(*) FROM events GROUP BY timer_name").fetchall()
        )
    for i in range(50):
        assert per_timer[f"t{i}"] == 1, (i, per_timer.get(f"t{i}"))
    reps = [n for n, in sqlite3.connect(small_tmpfs / "timers.db").execute(
        "SELECT fire_count FROM events WHERE timer_name = 'rep' ORDER BY id"
    )]  # fmt: skip
    assert reps == list(range(1, len(reps) + 1))


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_deleted_database_file_is_a_fault_never_an_empty_database(tmp_path: Path) -> None:
    db = tmp_path / "timers.db"
    with _daemon(f"sqlite:///{db}", PROGRAM_TIMER_DATABASE_TIMEOUT=TIMEOUT) as d:
        d.start()
        with d.client() as c:
            _set(c, "set_timer", "kept", interval="3600")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        with d.client() as c:
            for i in range(5):
                seconds, value = _timed(_set, c, "set_timer", f"after-{i}", interval="60")
                assert seconds < TIMEOUT + SLACK
                assert isinstance(value, ClientError) and value.code == "unavailable", value
                assert str(db) in value.message
            assert c.status()["databaseReachable"] is False
        time.sleep(1)
        assert not db.exists(), "a running daemon created a fresh database"
        lost = [r for r in _log_lines(d) if r.get("action") == "database_file_lost"]
        assert len(lost) == 1 and lost[0]["file"] == str(db) and lost[0]["level"] == "error"
        assert d.stop() == 0
        _no_tracebacks(d)


# ---------------------------------------------------------------------------------------------
# Settings and paths that cannot work: one line naming the setting or file, exit non-zero


def _serve(env: dict[str, str], cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PROGRAM_TIMER_")}
    full.update({"PROGRAM_TIMER_SOCKET": str(cwd / "pt.sock"), **env})
    return subprocess.run(
        [sys.executable, "-m", "program_timer", "serve"],
        env=full,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("ACK_TIMEOUT", "inf", "ack_timeout"),
        ("ACK_TIMEOUT", "1e12", "ack_timeout"),
        ("POLL_INTERVAL", "1e12", "poll_interval"),
        ("RETENTION", "nan", "retention"),
        ("DATABASE_TIMEOUT", "0", "database_timeout"),
        ("MAX_CONNECTIONS", "99999999999", "max_connections"),
        ("DATABASE_URL", "postgresql://u@127.0.0.1:notaport/db", "database_url"),
        ("SOCKET", "/tmp/" + "s" * 120 + ".sock", "socket"),
    ],
)
def test_absurd_settings_stop_the_start_naming_the_setting(
    tmp_path: Path, setting: str, value: str, named: str
) -> None:
    done = _serve({f"PROGRAM_TIMER_{setting}": value}, tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert named in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def _newer_schema(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        db.execute("INSERT INTO alembic_version VALUES ('9999_from_the_future')")


@pytest.mark.parametrize("case", ["not_sqlite", "newer_schema", "no_folder", "read_only_folder"])
def test_bad_database_paths_stop_the_start_with_one_line(tmp_path: Path, case: str) -> None:
    db = tmp_path / "state" / "timers.db"
    db.parent.mkdir()
    if case == "not_sqlite":
        db.write_text("this is not a database\n" * 100)
    elif case == "newer_schema":
        _newer_schema(db)
    elif case == "no_folder":
        db = tmp_path / "nonexistent" / "dir" / "timers.db"
    mounted = False
    if case == "read_only_folder":
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(db.parent)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs (root needed)")
        mounted = True
    try:
        done = _serve({"PROGRAM_TIMER_DATABASE_URL": f"sqlite:///{db}"}, tmp_path)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(db.parent)], check=False)
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("program-timer")]
    assert len(lines) == 1, done.stderr
    assert str(db.parent if case in ("no_folder", "read_only_folder") else db) in lines[0], lines
    if case == "no_folder":
        assert not (tmp_path / "nonexistent").exists()


@pytest.mark.parametrize("lacking", ["version", "json"])
def test_a_sqlite_library_without_what_the_statements_use_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lacking: str
) -> None:
    """RETURNING and MATERIALIZED need SQLite 3.35, the id lists ``json_each``: an older or
    smaller library is refused when the engine is made, saying what it lacks (the CLI turns
    that into one line and exit status 4), never at the first statement that needs it."""
    from program_timer.store import sqlite as store_sqlite
    from program_timer.store.errors import StoreError

    if lacking == "version":
        monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
        monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
        expected = "SQLite 3.31.1 is too old: program-timer needs 3.35.0 or newer"
    else:
        real_connect = sqlite3.connect

        class WithoutJson:
            def __init__(self) -> None:
                self.db = real_connect(":memory:")

            def execute(self, sql: str) -> sqlite3.Cursor:
                if "json_each" in sql:
                    raise sqlite3.OperationalError("no such table: json_each")
                return self.db.execute(sql)

            def close(self) -> None:
                self.db.close()

        monkeypatch.setattr(store_sqlite.sqlite3, "connect", lambda _name: WithoutJson())
        expected = "has no JSON functions"
    with pytest.raises(StoreError, match=expected):
        make_engine(f"sqlite:///{tmp_path / 'timers.db'}")
    assert not (tmp_path / "timers.db").exists()


# ---------------------------------------------------------------------------------------------
# The socket


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_deleted_socket_file_is_listened_on_again(sqlite_url: str) -> None:
    with _daemon(sqlite_url) as d:
        d.start()
        with d.client() as old:
            os.unlink(d.socket)
            wait_for(lambda: os.path.exists(d.socket), timeout=10)
            with d.client() as new:
                assert new.request("ping") == {"pong": True}
            assert old.request("ping") == {"pong": True}  # open connections are kept
        assert _actions(d)["socket_recreated"] == 1
        assert d.stop() == 0
        assert not os.path.exists(d.socket)


@pytest.mark.timeout(60)
def test_a_crowd_connecting_at_once_is_not_refused(sqlite_url: str) -> None:
    with _daemon(sqlite_url) as d:
        d.start()
        socks = []
        try:
            for _ in range(300):  # all in the backlog before the daemon accepts any
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect(d.socket)  # EAGAIN here if the backlog were 100
                socks.append(s)
            for s in socks:
                s.setblocking(True)
                s.settimeout(10)
                s.sendall(b'{"op":"ping"}\n')
            for s in socks:
                assert b'"pong":true' in s.recv(1024)
        finally:
            for s in socks:
                s.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_commands_keep_their_latency_beside_a_connection_that_does_not_read(
    db_url: str,
) -> None:
    with _daemon(db_url, PROGRAM_TIMER_LOG_LEVEL="info", PROGRAM_TIMER_MAX_INFLIGHT=100) as d:
        d.start()
        silent = d.client()
        try:
            for i in range(50):
                silent.subscribe(f"silent-{i}")
            with d.client() as c:
                for start in range(0, 2000, 200):  # pipelined, reading the replies as we go
                    for i in range(start, start + 200):
                        c.send(
                            {
                                "op": "command", "id": i, "commandIdn": "set_timer",
                                "integrationIdn": "program_timer", "connectorIdn": CONNECTOR,
                                "arguments": {"personaId": f"p{i % 20}", "timerName": f"t{i}",
                                              "interval": "0.5", "payload": "x" * 400},
                            }
                        )  # fmt: skip
                    for i in range(start, start + 200):
                        assert c.wait_reply(i)["ok"]
                time.sleep(1.5)  # 2,000 events x 50 subscriptions pile up for the silent one
                worst = 0.0
                for i in range(40):
                    seconds, value = _timed(_set, c, "set_timer", f"probe-{i}", interval="3600")
                    assert not isinstance(value, ClientError), value
                    worst = max(worst, seconds)
                    time.sleep(0.02)
            engine = make_engine(db_url)
            try:
                with engine.connect() as conn:
                    sent = conn.execute(
                        select(func.count()).where(deliveries.c.attempt > 0)
                    ).scalar()
            finally:
                engine.dispose()
        finally:
            silent.close()
        assert worst < 0.5, f"a command took {worst:.3f} s"
        assert sent is not None and sent <= 100 * 2, sent  # one window, not one per subscription


@pytest.mark.timeout(60)
def test_sighup_with_a_broken_file_logs_one_outcome(sqlite_url: str, tmp_path: Path) -> None:
    config = tmp_path / "pt.toml"
    config.write_text('log_level = "debug"\n')
    with _daemon(sqlite_url, PROGRAM_TIMER_CONFIG=str(config)) as d:
        d.start()
        config.write_text("log_level = = broken\n")
        d.signal(signal.SIGHUP)
        wait_for(lambda: _actions(d)["reload_failed"] == 1, timeout=10)
        config.write_text('log_level = "info"\n')
        d.signal(signal.SIGHUP)
        wait_for(lambda: _actions(d)["reloaded"] == 1, timeout=10)
        assert _actions(d)["reload_failed"] == 1
        assert d.stop() == 0
