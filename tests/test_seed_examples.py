"""Every timer example of shared/seed/SendCommand.md, sent through the real socket to a daemon
started as a subprocess, on SQLite and PostgreSQL; replies and stored state checked, and real
fires of a short one-shot and of a repeating timer observed in the store."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from program_timer.store.db import make_engine
from program_timer.store.schema import events, timers
from tests.daemon_proc import DaemonProcess, wait_for


def _send(d: DaemonProcess, command: str, connector: str, **args: str) -> dict:
    with d.client() as c:
        return c.command(command, connector, **args)


def _get(d: DaemonProcess, persona: str, name: str) -> dict:
    with d.client() as c:
        return c.command("get_timer", "my_timer", personaId=persona, timerName=name)["timer"]


def test_seed_fire_at_once_in_the_past(daemon: DaemonProcess) -> None:
    # {{SendCommand(commandIdn="set_timer", integrationIdn="program_timer",
    #   connectorIdn="fire_timer", fireAt="2024-02-20T22:17", personaId=…, timerName="MyTimer",
    #   repeatable="false")}}
    result = _send(
        daemon,
        "set_timer",
        "fire_timer",
        fireAt="2024-02-20T22:17",
        personaId="user-1",
        timerName="MyTimer",
        repeatable="false",
    )
    timer = result["timer"]
    assert timer["fireAt"] == "2024-02-20T22:17:00Z"
    assert timer["connectorIdn"] == "fire_timer"
    assert timer["repeatable"] is False and timer["enabled"] is True
    assert any("past" in w for w in result["warnings"])
    # A one-shot timer whose fireAt has passed fires at once, and is kept, marked fired.
    fired = wait_for(lambda: _get(daemon, "user-1", "MyTimer")["state"] == "fired")
    assert fired
    after = _get(daemon, "user-1", "MyTimer")
    assert after["fireCount"] == 1 and after["nextFireAt"] is None
    assert after["lastFiredAt"] is not None


def test_seed_fire_at_in_the_future(daemon: DaemonProcess) -> None:
    when = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M")
    result = _send(
        daemon,
        "set_timer",
        "fire_timer",
        fireAt=when,
        personaId="user-1",
        timerName="MyTimer",
        repeatable="false",
    )
    assert result["warnings"] == []
    assert result["timer"]["state"] == "scheduled"
    assert result["timer"]["nextFireAt"] == when + ":00Z"


def test_seed_interval_once_after_120_seconds(daemon: DaemonProcess) -> None:
    before = datetime.now(UTC)
    result = _send(
        daemon,
        "set_timer",
        "my_timer",
        personaId="user-1",
        timerName="followup_timer_2",
        interval="120",
    )
    timer = result["timer"]
    assert timer["interval"] == "120" and timer["repeatable"] is False
    next_fire = datetime.fromisoformat(timer["nextFireAt"])
    assert before + timedelta(seconds=119) < next_fire < before + timedelta(seconds=125)
    assert timer["state"] == "scheduled" and timer["fireCount"] == 0


def test_seed_repeatable_from_fire_at_every_240_seconds(daemon: DaemonProcess) -> None:
    result = _send(
        daemon,
        "set_repeatable_timer",
        "my_timer",
        personaId="user-1",
        timerName="followup_timer_3",
        interval="240",
        fireAt="2024-02-20T22:17",
    )
    timer = result["timer"]
    assert timer["repeatable"] is True and timer["interval"] == "240"
    anchor = datetime(2024, 2, 20, 22, 17, tzinfo=UTC)
    next_fire = datetime.fromisoformat(timer["nextFireAt"])
    now = datetime.now(UTC)
    # the first fireAt + k*240 s that is not in the past; past occurrences are not fired
    assert now - timedelta(seconds=2) <= next_fire < now + timedelta(seconds=241)
    assert (next_fire - anchor).total_seconds() % 240 == 0
    assert timer["fireCount"] == 0


def test_seed_create_disabled_then_enable(daemon: DaemonProcess) -> None:
    created = _send(
        daemon,
        "set_timer",
        "my_timer",
        personaId="user-1",
        timerName="followup_timer_3",
        enabled="false",
    )["timer"]
    assert created["enabled"] is False
    # no schedule yet: kept but never fires
    assert created["state"] == "unscheduled" and created["nextFireAt"] is None
    enabled = _send(
        daemon,
        "set_timer",
        "my_timer",
        personaId="user-1",
        timerName="followup_timer_3",
        enabled="true",
    )["timer"]
    assert enabled["enabled"] is True and enabled["state"] == "unscheduled"


def test_seed_disable_keeps_schedule_and_enable_resumes(daemon: DaemonProcess) -> None:
    _send(
        daemon,
        "set_repeatable_timer",
        "my_timer",
        personaId="user-1",
        timerName="followup_timer_3",
        interval="240",
        fireAt="2024-02-20T22:17",
    )
    paused = _send(
        daemon,
        "set_timer",
        "my_timer",
        personaId="user-1",
        timerName="followup_timer_3",
        enabled="false",
    )["timer"]
    assert paused["state"] == "disabled" and paused["nextFireAt"] is None
    assert paused["interval"] == "240" and paused["fireAt"] == "2024-02-20T22:17:00Z"
    resumed = _send(
        daemon,
        "set_timer",
        "my_timer",
        personaId="user-1",
        timerName="followup_timer_3",
        enabled="true",
    )["timer"]
    assert resumed["state"] == "scheduled" and resumed["repeatable"] is True
    anchor = datetime(2024, 2, 20, 22, 17, tzinfo=UTC)
    assert (datetime.fromisoformat(resumed["nextFireAt"]) - anchor).total_seconds() % 240 == 0


def test_real_fires_observed_in_the_store(daemon: DaemonProcess) -> None:
    _send(
        daemon,
        "set_timer",
        "my_timer",
        personaId="user-1",
        timerName="short",
        interval="0.3",
        note="hello",
    )
    _send(
        daemon,
        "set_repeatable_timer",
        "my_timer",
        personaId="user-1",
        timerName="rep",
        interval="1",
    )
    engine = make_engine(daemon.database_url)
    try:

        def count(name: str) -> int:
            with engine.connect() as conn:
                return (
                    conn.execute(select(func.count()).where(events.c.timer_name == name)).scalar()
                    or 0
                )

        wait_for(lambda: count("short") == 1, timeout=15)
        wait_for(lambda: count("rep") >= 3, timeout=20)
        with engine.connect() as conn:
            row = conn.execute(select(timers).where(timers.c.timer_name == "short")).one()
            assert row.state == "fired" and row.fire_count == 1 and row.due_at is None
            ev = conn.execute(select(events).where(events.c.timer_name == "short")).one()
            assert ev.arguments["note"] == "hello"
            assert ev.arguments["fireCount"] == "1"
            rep = conn.execute(
                select(events).where(events.c.timer_name == "rep").order_by(events.c.id)
            ).all()
            counts = [int(e.arguments["fireCount"]) for e in rep]
            assert counts == sorted(counts) and counts[0] == 1
            assert len({e.external_event_id for e in rep}) == len(rep)
            # each fire stands for 1 + missedCount occurrences of the 1 s grid
            for a, b in itertools.pairwise(rep):
                gap = (b.scheduled_at - a.scheduled_at).total_seconds()
                assert abs(gap - (1 + a.missed_count)) < 1e-3, (gap, a.missed_count)
    finally:
        engine.dispose()
