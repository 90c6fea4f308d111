"""Database outages (SPEC 6): PostgreSQL goes away under a running daemon and comes back.

The tests run their own PostgreSQL server (:mod:`tests.pg_private`), since they must stop it:
``initdb`` once for the module, a database per test, ``pg_ctl stop -m immediate`` for the outage
and ``pg_ctl start`` on the same data folder and port for the recovery. They skip when no
PostgreSQL server binaries are installed, and fail instead under ``CI=true``.

Meanwhile the daemon must stay up, answer ``ping``, answer every command with ``unavailable``
quickly (no hang, nothing applied), log the outage once (not once per request), and once the
database is back fire exactly once everything that fell due, and take commands again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from program_timer.events.client import ClientError, TimerClient
from program_timer.store.db import make_engine
from program_timer.store.schema import deliveries, events, timers
from tests.daemon_proc import DaemonProcess, short_tmpdir, wait_for
from tests.pg_private import PrivatePostgres, find_bin_dir

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(120)]

CONNECTOR = "outage_timer"
REPLY_BOUND = 5.0  # every reply during the outage comes within this many seconds


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) not found: set PG_BIN or install them"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: the outage tests must run)")
        pytest.skip(reason)
    server = PrivatePostgres(bin_dir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def outage_env(private_pg: PrivatePostgres) -> Iterator[tuple[PrivatePostgres, DaemonProcess]]:
    """A fresh database on the private server and a daemon on it; both cleaned up after, and the
    server left running for the next test whatever happened."""
    url = private_pg.create_database(f"pt_outage_{uuid.uuid4().hex[:8]}")
    folder = short_tmpdir()
    daemon = DaemonProcess(url, folder, PROGRAM_TIMER_LOG_LEVEL="info", PROGRAM_TIMER_ACK_TIMEOUT=5)
    try:
        daemon.start()
        yield private_pg, daemon
    finally:
        daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)
        if not private_pg.running():
            private_pg.start()


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


def _events_by_timer(engine: Engine) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = defaultdict(list)
    with engine.connect() as conn:
        for r in conn.execute(select(events).order_by(events.c.id)):
            out[r.timer_name].append(r)
    return out


LOAD = 1500


def _count_load(engine: Engine) -> int:
    with engine.connect() as conn:
        stmt = select(func.count()).where(events.c.timer_name.like("load-%"))
        return int(conn.execute(stmt).scalar() or 0)


def test_postgres_outage_daemon_keeps_running_and_fires_what_fell_due(
    outage_env: tuple[PrivatePostgres, DaemonProcess],
) -> None:
    pg, daemon = outage_env
    engine = make_engine(daemon.database_url)
    sub = daemon.client(timeout=10)
    try:
        sub.subscribe("outage-flow")
        during = [f"during-{i}" for i in range(20)]
        with daemon.client() as c:
            _set(c, "set_timer", "before", interval="0.2")
            # due 2.5 to 4.4 s from now: while the database is down
            for i, name in enumerate(during):
                _set(c, "set_timer", name, interval=f"{2.5 + i * 0.1:.1f}")
            _set(c, "set_repeatable_timer", "rep", interval="1")
            set_at = time.monotonic()
            # load: a burst of fires under way when the database goes (fire passes interrupted,
            # perhaps at their commit)
            for start in range(0, LOAD, 500):
                for i in range(start, start + 500):
                    c.send(
                        {
                            "op": "command", "id": f"load-{i}", "commandIdn": "set_timer",
                            "integrationIdn": "program_timer", "connectorIdn": CONNECTOR,
                            "arguments": {"personaId": f"q{i % 3}", "timerName": f"load-{i}",
                                          "interval": f"{0.3 + (i % 100) / 100:.2f}"},
                        }
                    )  # fmt: skip
                for i in range(start, start + 500):
                    assert c.wait_reply(f"load-{i}")["ok"]
        wait_for(lambda: _events_by_timer(engine).get("before"), timeout=10)
        wait_for(lambda: _count_load(engine) >= LOAD // 4, timeout=10, interval=0.01)
        load_before = _count_load(engine)
        engine.dispose()  # the test's own connections must not outlive the server either

        # --- the outage ------------------------------------------------------------------
        pg.stop("immediate")
        down_at = time.monotonic()
        replies: list[tuple[str, float, Any]] = []
        with daemon.client(timeout=REPLY_BOUND + 5) as c:
            for i in range(5):
                replies.append(("ping", *_timed(c.request, "ping")))
                replies.append(("set", *_timed(_set, c, "set_timer", f"refused-{i}", interval="1")))
                replies.append(("get", *_timed(_set, c, "get_timer", "rep")))
                replies.append(("status", *_timed(c.status)))
                time.sleep(0.2)
        # new connections work too, and a pipelined burst gets its answers as fast
        with daemon.client(timeout=REPLY_BOUND + 5) as c:
            started = time.monotonic()
            for i in range(50):
                c.send(
                    {
                        "op": "command", "id": i, "commandIdn": "set_timer",
                        "integrationIdn": "program_timer", "connectorIdn": CONNECTOR,
                        "arguments": {"personaId": "p", "timerName": f"burst-{i}",
                                      "interval": "1"},
                    }
                )  # fmt: skip
            burst = [c.wait_reply(i) for i in range(50)]
            burst_seconds = time.monotonic() - started
        # let everything in `during` fall due while the database is still down
        time.sleep(max(0.0, 5.0 - (time.monotonic() - set_at)))
        with daemon.client(timeout=REPLY_BOUND + 5) as c:
            replies.append(("ping", *_timed(c.request, "ping")))
            replies.append(("set", *_timed(_set, c, "set_timer", "refused-late", interval="1")))
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
        outage_seconds = time.monotonic() - down_at
        actions_down = _actions(daemon)

        for kind, seconds, value in replies:
            assert seconds < REPLY_BOUND, (kind, seconds, value)
            if kind == "ping":
                assert value == {"pong": True}
            elif kind in ("set", "get"):
                assert isinstance(value, ClientError) and value.code == "unavailable", value
            else:  # status: answers, saying the database is unreachable, or is unavailable
                if isinstance(value, ClientError):
                    assert value.code == "unavailable", value
                else:
                    assert value["databaseReachable"] is False, value
        assert burst_seconds < REPLY_BOUND, burst_seconds
        assert all(not r["ok"] and r["error"]["code"] == "unavailable" for r in burst), burst
        assert actions_down["database_down"] == 1, actions_down
        assert actions_down["database_back"] == 0, actions_down

        # --- the database comes back -----------------------------------------------------
        back_wall = datetime.now(UTC)
        pg.start()
        back_at = time.monotonic()

        def all_fired() -> dict[str, list[Any]] | None:
            try:
                fired = _events_by_timer(engine)
            except Exception:
                return None
            return fired if all(name in fired for name in during) else None

        fired = wait_for(all_fired, timeout=20, interval=0.1)
        recovery_seconds = time.monotonic() - back_at
        with daemon.client() as c:
            reply = _set(c, "set_timer", "after", interval="0.2")
            assert reply["timer"]["state"] == "scheduled"
            for name in ["refused-late", *[f"refused-{i}" for i in range(5)], "burst-0"]:
                with pytest.raises(ClientError) as err:
                    _set(c, "get_timer", name)
                assert err.value.code == "not_found"  # a refused command changed nothing
            status = c.status()
            assert status["databaseReachable"] is True
        wait_for(lambda: _events_by_timer(engine).get("after"), timeout=10)
        time.sleep(1.2)  # the repeating timer fires again on its grid

        # the subscriber gets everything, once the database is back
        with engine.connect() as conn:
            wanted = set(conn.execute(select(events.c.external_event_id)).scalars())
        got: set[str] = set()
        deadline = time.monotonic() + 20
        while not wanted <= got and time.monotonic() < deadline:
            msgs = [sub.next_event(5)]
            with contextlib.suppress(TimeoutError):
                while len(msgs) < 100:
                    msgs.append(sub.next_event(0.02))
            got.update(m["event"]["externalEventId"] for m in msgs)
            sub.ack([m["deliveryId"] for m in msgs])
        assert wanted <= got
        assert daemon.stop() == 0, daemon.log()
        fired = _events_by_timer(engine)
        with engine.connect() as conn:
            rows = {r.timer_name: r for r in conn.execute(select(timers))}
            # "rep" goes on firing every second after `wanted` was read: a fire between then and
            # the stop is sent and not yet acked, and rightly stays pending. What the subscriber
            # received was acked, every delivery of it.
            pending = select(events.c.external_event_id, events.c.timer_name, deliveries.c.id)
            pending = pending.join_from(deliveries, events, deliveries.c.event_id == events.c.id)
            unacked = conn.execute(pending.where(deliveries.c.acked_at.is_(None))).all()
    finally:
        sub.close()
        engine.dispose()

    load = [f"load-{i}" for i in range(LOAD)]
    for name in ["before", "after", *during, *load]:
        assert len(fired[name]) == 1, (name, fired[name])
        assert (rows[name].state, rows[name].fire_count) == ("fired", 1), name
    # what fell due in the outage fired once it was over
    for name in during:
        (ev,) = fired[name]
        assert ev.scheduled_at < back_wall <= ev.fired_at, (name, ev.scheduled_at, ev.fired_at)
    late = max((fired[n][0].fired_at - back_wall).total_seconds() for n in during)
    rep = fired["rep"]
    assert [e.fire_count for e in rep] == list(range(1, len(rep) + 1))
    assert rows["rep"].fire_count == len(rep)
    # one catch-up fire stands for the occurrences missed while the database was down
    assert max(e.missed_count for e in rep) >= 2, [(e.fire_count, e.missed_count) for e in rep]
    assert not [d for d in unacked if d.external_event_id in wanted], unacked
    assert all(d.timer_name == "rep" for d in unacked), unacked

    actions = _actions(daemon)
    assert actions["database_down"] == 1, actions
    assert actions["database_back"] == 1, actions
    lines = _log_lines(daemon)
    # not once per scheduler poll either (APScheduler's "Error getting due jobs" warning)
    assert not [r for r in lines if r.get("logger") == "apscheduler.scheduler"], lines
    noisy = Counter(
        (r.get("level"), r.get("action") or r.get("event"))
        for r in lines
        if r.get("level") in ("warning", "error", "raw")
    )
    status_during = {type(v).__name__ for k, _, v in replies if k == "status"}
    print(
        f"load fired just before the outage: {load_before}/{LOAD}; "
        f"status during the outage: {status_during}; "
        f"outage {outage_seconds:.1f}s; replies max {max(s for _, s, _ in replies):.3f}s; "
        f"50 pipelined refusals in {burst_seconds:.3f}s; all due fired {recovery_seconds:.2f}s "
        f"after pg_ctl start returned (last fire {late:.2f}s after it began); "
        f"warnings/errors logged: {dict(noisy)}"
    )


def _outage_window(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """The log lines from the outage's start (``database_down``) to its end (``database_back``)."""
    lines = _log_lines(daemon)
    start = next(i for i, r in enumerate(lines) if r.get("action") == "database_down")
    end = next(i for i, r in enumerate(lines) if r.get("action") == "database_back")
    return lines[start : end + 1]


def test_outage_is_logged_once_when_nobody_asks(
    outage_env: tuple[PrivatePostgres, DaemonProcess],
) -> None:
    """No client at all: the daemon still notices the outage (its scheduler polls the database),
    logs it once, and logs its end once."""
    pg, daemon = outage_env
    with daemon.client() as c:
        _set(c, "set_timer", "later", interval="3600")
    pg.stop("immediate")
    wait_for(lambda: _actions(daemon)["database_down"], timeout=10, interval=0.1)
    time.sleep(3)
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert _actions(daemon)["database_down"] == 1
    pg.start()
    wait_for(lambda: _actions(daemon)["database_back"], timeout=10, interval=0.1)
    with daemon.client() as c:
        assert _set(c, "get_timer", "later")["timer"]["state"] == "scheduled"
        assert c.status()["databaseReachable"] is True
    window = _outage_window(daemon)
    assert [r for r in window if r.get("level") in ("warning", "error")] == window[:1], window
    actions = _actions(daemon)
    assert (actions["database_down"], actions["database_back"]) == (1, 1), actions


def test_status_answers_during_outage_with_database_unreachable(
    outage_env: tuple[PrivatePostgres, DaemonProcess],
) -> None:
    """`status` is what an operator runs when something is wrong: it must answer during an
    outage, with what the daemon knows without the database, and say the database is
    unreachable (``databaseReachable`` would otherwise always be true when shown)."""
    pg, daemon = outage_env
    with daemon.client() as c:
        _set(c, "set_timer", "later", interval="3600")
        before = c.status()
    assert before["databaseReachable"] is True
    pg.stop("immediate")
    with daemon.client(timeout=REPLY_BOUND + 5) as c:
        wait_for(lambda: _actions(daemon)["database_down"], timeout=10, interval=0.1)
        seconds, status = _timed(c.status)
    assert seconds < REPLY_BOUND
    assert not isinstance(status, ClientError), status
    assert status["databaseReachable"] is False
    assert status["version"] == before["version"] and status["database"] == "postgresql"


def test_outage_with_a_subscriber_attached_is_not_logged_per_poll(
    outage_env: tuple[PrivatePostgres, DaemonProcess],
) -> None:
    pg, daemon = outage_env
    with daemon.client() as sub:
        sub.subscribe("quiet-flow")
        pg.stop("immediate")
        wait_for(lambda: _actions(daemon)["database_down"], timeout=10, interval=0.1)
        time.sleep(4)
        pg.start()
        wait_for(lambda: _actions(daemon)["database_back"], timeout=10, interval=0.1)
    window = _outage_window(daemon)
    noisy = [r for r in window[1:] if r.get("level") in ("warning", "error")]
    assert not noisy, noisy
