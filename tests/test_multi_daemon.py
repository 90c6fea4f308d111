"""Several daemons sharing one PostgreSQL database (SPEC 4): each fire happens once, a dead
daemon's work is taken over, commands wake the others, and subscribers get every daemon's
events."""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from program_timer.events.client import TimerClient
from program_timer.store.db import make_engine
from program_timer.store.schema import events, timers
from tests.daemon_proc import DaemonProcess, wait_for

pytestmark = pytest.mark.postgres


@pytest.fixture
def db_url(pg_url: str) -> str:
    """Multi-daemon runs on PostgreSQL only (SQLite is single-daemon)."""
    return pg_url


def _pipeline_set(c: TimerClient, specs: list[dict[str, str]], connector: str = "multi") -> None:
    for start in range(0, len(specs), 500):
        chunk = specs[start : start + 500]
        for i, args in enumerate(chunk):
            c.send(
                {
                    "op": "command",
                    "id": start + i,
                    "commandIdn": "set_timer",
                    "integrationIdn": "program_timer",
                    "connectorIdn": connector,
                    "arguments": args,
                }
            )
        for i in range(len(chunk)):
            reply = c.wait_reply(start + i)
            assert reply["ok"], reply


def _burst(n: int, seconds: float, lead: float = 2.0) -> list[dict[str, str]]:
    t0 = datetime.now(UTC) + timedelta(seconds=lead)
    return [
        {
            "personaId": f"p{i % 100}",
            "timerName": f"t{i}",
            "fireAt": (t0 + timedelta(seconds=seconds * i / n)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        for i in range(n)
    ]


def _fired_counts(url: str) -> tuple[int, Counter[tuple[str, str]], Counter[str]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(events.c.persona_id, events.c.timer_name, events.c.fired_by)
            ).all()
            fired_timers = (
                conn.execute(select(func.count()).where(timers.c.state == "fired")).scalar() or 0
            )
    finally:
        engine.dispose()
    per_timer = Counter((r.persona_id, r.timer_name) for r in rows)
    per_daemon = Counter(r.fired_by for r in rows)
    return fired_timers, per_timer, per_daemon


def _start(factory, name: str, **env: object) -> DaemonProcess:  # type: ignore[no-untyped-def]
    d: DaemonProcess = factory(PROGRAM_TIMER_DAEMON_ID=name, **env)
    return d.start()


def test_three_daemons_fire_each_timer_exactly_once(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    ds = [_start(daemon_factory, n) for n in ("A", "B", "C")]
    n = 3000
    with ds[0].client() as c:
        _pipeline_set(c, _burst(n, 2.0))
    wait_for(lambda: _fired_counts(ds[0].database_url)[0] == n, timeout=60, interval=0.5)
    time.sleep(1.0)
    _fired, per_timer, per_daemon = _fired_counts(ds[0].database_url)
    assert len(per_timer) == n and set(per_timer.values()) == {1}
    assert sum(per_daemon.values()) == n
    print("fires per daemon:", dict(per_daemon))
    with ds[1].client() as c:
        status = c.status()
        live = {d["daemonId"] for d in status["daemons"]}
    assert live == {"A", "B", "C"}
    # the kept counts, added to by three daemons' fire passes at once, are exact
    assert status["timers"]["fired"] == n and status["timers"]["scheduled"] == 0
    # each daemon's sessions (which hold its fire claims) carry its identity
    engine = make_engine(ds[0].database_url)
    try:
        with engine.connect() as conn:
            names = {
                r[0]
                for r in conn.execute(
                    text(
                        "SELECT application_name FROM pg_stat_activity"
                        " WHERE datname = current_database()"
                    )
                )
            }
    finally:
        engine.dispose()
    assert {"program-timer A", "program-timer B", "program-timer C"} <= names, names


def test_sigkill_of_one_daemon_mid_burst_the_others_fire_the_rest(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    ds = [_start(daemon_factory, n) for n in ("A", "B", "C")]
    n = 4000
    with ds[0].client() as c:
        _pipeline_set(c, _burst(n, 3.0, lead=1.5))
    time.sleep(1.5 + 1.2)  # mid-burst
    ds[1].kill()
    wait_for(lambda: _fired_counts(ds[0].database_url)[0] == n, timeout=90, interval=0.5)
    time.sleep(1.0)
    _, per_timer, per_daemon = _fired_counts(ds[0].database_url)
    assert len(per_timer) == n and set(per_timer.values()) == {1}, [
        k for k, v in per_timer.items() if v != 1
    ][:5]
    assert per_daemon["A"] + per_daemon["C"] > 0
    print("fires per daemon:", dict(per_daemon))


def test_command_on_a_wakes_b_in_time(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    a = _start(daemon_factory, "A", PROGRAM_TIMER_POLL_INTERVAL=60)
    _start(daemon_factory, "B", PROGRAM_TIMER_POLL_INTERVAL=60)
    with a.client() as c:
        c.command("set_timer", "multi", personaId="p", timerName="far", interval="3600")
        time.sleep(0.5)  # both daemons now sleep until the far timer or the 60 s poll
        c.command("set_timer", "multi", personaId="p", timerName="soon", interval="1.5")
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)  # A cannot fire it: only a woken B can
    try:
        started = time.monotonic()
        engine = make_engine(a.database_url)
        try:

            def fired_by() -> str | None:
                with engine.connect() as conn:
                    return conn.execute(
                        select(events.c.fired_by).where(events.c.timer_name == "soon")
                    ).scalar()

            who = wait_for(fired_by, timeout=20)
        finally:
            engine.dispose()
        assert who == "B"
        assert time.monotonic() - started < 10  # far sooner than B's 60 s poll
    finally:
        a.proc.send_signal(signal.SIGCONT)


def test_subscriber_on_a_receives_events_fired_by_b(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    a = _start(daemon_factory, "A")
    b = _start(daemon_factory, "B")
    assert a.proc is not None
    with a.client() as sub, b.client() as c:
        sub.subscribe("flow-on-a")
        c.command("set_timer", "multi", personaId="p", timerName="by-b", interval="1")
        a.proc.send_signal(signal.SIGSTOP)  # A sleeps through the fire: B fires it
        try:
            engine = make_engine(a.database_url)
            try:

                def fired_by() -> str | None:
                    with engine.connect() as conn:
                        return conn.execute(
                            select(events.c.fired_by).where(events.c.timer_name == "by-b")
                        ).scalar()

                assert wait_for(fired_by, timeout=20) == "B"
            finally:
                engine.dispose()
        finally:
            a.proc.send_signal(signal.SIGCONT)
        msg = sub.next_event(15)
        assert msg["event"]["arguments"]["timerName"] == "by-b"
        assert sub.ack([msg["deliveryId"]]) == 1


def test_subscription_reattaches_through_another_daemon(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    a = _start(daemon_factory, "A")
    b = _start(daemon_factory, "B")
    with a.client() as sub_a, a.client() as c:
        sub_a.subscribe("roaming")
        c.command("set_timer", "multi", personaId="p", timerName="one", interval="0.2")
        first = sub_a.next_event(15)  # in flight, never acked
    a.kill()  # its daemon goes away
    with b.client() as sub_b:
        sub_b.subscribe("roaming")
        again = sub_b.next_event(15)
        assert again["event"]["externalEventId"] == first["event"]["externalEventId"]
        assert sub_b.ack([again["deliveryId"]]) == 1
