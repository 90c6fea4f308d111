"""Stopping and restarting: SIGTERM exits 0 quickly, timers survive, and what fell due while
the daemon was down fires once at start (a repeating timer once, with missedCount)."""

from __future__ import annotations

import signal
import socket
import time

import pytest
from sqlalchemy import select

from program_timer.store.db import make_engine
from program_timer.store.schema import events
from tests.daemon_proc import DaemonProcess, wait_for


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_exits_zero_quickly(daemon: DaemonProcess, sig: int) -> None:
    with daemon.client() as c:
        c.command("set_timer", "my_timer", personaId="p", timerName="t", interval="60")
    started = time.monotonic()
    assert daemon.stop(sig) == 0
    assert time.monotonic() - started < 5
    assert '"action": "stopped"' in daemon.log()


def test_downtime_catch_up_after_restart(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        c.command("set_timer", "my_timer", personaId="p", timerName="once", interval="2")
        c.command("set_repeatable_timer", "my_timer", personaId="p", timerName="rep", interval="1")
        c.command("set_timer", "my_timer", personaId="p", timerName="later", interval="3600")
    assert daemon.stop() == 0
    time.sleep(4.5)  # "once" falls due, "rep" misses ~4 occurrences
    daemon.start()
    engine = make_engine(daemon.database_url)
    try:

        def fired() -> list:
            with engine.connect() as conn:
                return conn.execute(select(events).order_by(events.c.id)).all()

        rows = wait_for(lambda: [r for r in fired() if r.timer_name == "once"], timeout=10)
        assert len(rows) == 1
        time.sleep(1.5)
        rep = [r for r in fired() if r.timer_name == "rep"]
        # before the stop it fired about once; the first fire after the start covers the
        # occurrences missed while it was down
        catch_up = [r for r in rep if r.missed_count > 0]
        assert len(catch_up) == 1, [(r.fire_count, r.missed_count) for r in rep]
        assert catch_up[0].missed_count >= 2
        later = [r for r in rep if r.id > catch_up[0].id]
        assert all(r.missed_count == 0 for r in later)
        with daemon.client() as c:
            names = {
                t["timerName"]
                for t in c.command("list_timers", "my_timer", personaId="p")["timers"]
            }
        assert names == {"once", "rep", "later"}
    finally:
        engine.dispose()


def test_second_daemon_on_same_sqlite_file_is_refused(sqlite_url: str, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    first: DaemonProcess = daemon_factory()
    first.database_url = sqlite_url
    first.start()
    second: DaemonProcess = daemon_factory()
    second.database_url = sqlite_url
    second.start(wait=False)
    assert second.proc is not None
    code = second.proc.wait(20)
    assert code != 0
    assert "single-daemon" in second.log()
    with first.client() as c:
        assert c.request("ping") == {"pong": True}


def test_stale_socket_does_not_block_restart_and_live_one_is_not_stolen(
    daemon: DaemonProcess, daemon_factory
) -> None:  # type: ignore[no-untyped-def]
    daemon.kill()
    # SIGKILL leaves the socket file behind
    stale = socket.socket(socket.AF_UNIX)
    try:
        stale.connect(daemon.socket)
        raise AssertionError("nobody should be listening")
    except ConnectionRefusedError:
        pass
    finally:
        stale.close()
    daemon.start()
    with daemon.client() as c:
        assert c.request("ping") == {"pong": True}
    # a second daemon on another database but the same socket path is refused
    thief: DaemonProcess = daemon_factory()
    thief.socket = daemon.socket
    thief.database_url = "sqlite:///" + str(thief.folder / "other.db")
    thief.start(wait=False)
    assert thief.proc is not None
    assert thief.proc.wait(20) != 0
    assert "refusing to take its socket" in thief.log()
    with daemon.client() as c:
        assert c.request("ping") == {"pong": True}
