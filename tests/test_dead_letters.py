"""Retries, dead letters and replay (SPEC 7.4): resends back off, a delivery sent
``PROGRAM_TIMER_MAX_ATTEMPTS`` times without an ack becomes dead, ``redeliver`` revives it with a
fresh budget, the retention turns pending deliveries dead (store level, injected clock), and
``subscribe`` with ``since`` replays stored events. Real daemons on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update

from program_timer.core.clock import FakeClock
from program_timer.events.client import ClientError, TimerClient
from program_timer.scheduler.commands import CommandSettings, apply_batch
from program_timer.scheduler.firing import fire_batch
from program_timer.scheduler.protocol import CommandRequest
from program_timer.store import queries
from program_timer.store.db import transaction
from program_timer.store.schema import deliveries, events
from tests.daemon_proc import DaemonProcess, wait_for

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
RETENTION = timedelta(days=7)


def _pushes(c: TimerClient, n: int, timeout: float = 15.0) -> list[tuple[float, dict[str, Any]]]:
    """The next ``n`` pushed events with the monotonic time each arrived."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        msg = c.next_event(max(0.1, deadline - time.monotonic()))
        out.append((time.monotonic(), msg))
    return out


def _no_push(c: TimerClient, wait: float) -> None:
    with pytest.raises(TimeoutError):
        c.next_event(wait)


def _fire(c: TimerClient, *names: str, connector: str = "my_timer", persona: str = "p") -> None:
    for name in names:
        c.command("set_timer", connector, personaId=persona, timerName=name, interval="0.1")


# ---------------------------------------------------------------------------------------------
# real daemons


def test_resends_back_off_doubling_up_to_the_cap(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d: DaemonProcess = daemon_factory(
        PROGRAM_TIMER_ACK_TIMEOUT=0.3, PROGRAM_TIMER_RETRY_MAX_DELAY=1.0
    )
    d.start()
    with d.client() as sub, d.client() as c:
        sub.subscribe("never-acks")
        _fire(c, "t")
        got = _pushes(sub, 6, timeout=20)
    assert [m["attempt"] for _, m in got] == [1, 2, 3, 4, 5, 6]
    assert len({m["deliveryId"] for _, m in got}) == 1
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(got)]
    # the ack timeout, then doubling: 0.3, 0.6, then capped at 1.0
    for gap, expected in zip(gaps, [0.3, 0.6, 1.0, 1.0, 1.0], strict=True):
        assert expected - 0.05 <= gap <= expected + 0.4, (gaps, expected)


def test_max_attempts_make_dead_letters_and_redeliver_revives_them(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d: DaemonProcess = daemon_factory(PROGRAM_TIMER_ACK_TIMEOUT=0.3, PROGRAM_TIMER_MAX_ATTEMPTS=3)
    d.start()
    with d.client() as sub, d.client() as c:
        sub.subscribe("flaky", connector_idn="my_timer")
        _fire(c, "a", "b")
        got = _pushes(sub, 6)
        attempts: dict[int, list[int]] = {}
        for _, m in got:
            attempts.setdefault(m["deliveryId"], []).append(m["attempt"])
        assert sorted(attempts.values()) == [[1, 2, 3], [1, 2, 3]]
        # the third send waits 4 x 0.3 s unacked, then both are dead: never sent again
        _no_push(sub, 2.0)
        wait_for(lambda: c.status()["deliveries"]["dead"] == 2, timeout=5)
        st = c.status()["deliveries"]
        assert st["pending"] == 0 and st["oldestPendingAgeSeconds"] is None

        (row,) = c.request("subscriptions")["subscriptions"]
        assert row == {
            "subscriptionId": "flaky",
            "flowInstanceId": "flaky",
            "filter": {"connectorIdn": "my_timer"},
            "attached": True,
            "pending": 0,
            "inflight": 0,
            "dead": 2,
            "oldestPendingAt": None,
            "lastAckAt": None,
        }
        dead = c.request("deliveries", subscriptionId="flaky", state="dead")
        assert "nextAfter" not in dead
        assert [x["deliveryId"] for x in dead["deliveries"]] == sorted(attempts)
        for x in dead["deliveries"]:
            assert x["state"] == "dead" and x["attempt"] == 3 and x["nextAttemptAt"] is None
            assert x["event"]["idn"] == "timer" and x["event"]["connectorIdn"] == "my_timer"
        names = {x["event"]["arguments"]["timerName"] for x in dead["deliveries"]}
        assert names == {"a", "b"}
        assert c.request("deliveries", subscriptionId="flaky", state="pending") == {
            "deliveries": []
        }

        # one of them, by id: pending again with a fresh budget (attempts 1, 2, 3 again)
        first, second = sorted(attempts)
        assert c.request("redeliver", subscriptionId="flaky", deliveryIds=[first]) == {
            "redelivered": 1
        }
        again = _pushes(sub, 3, timeout=10)
        assert [(m["deliveryId"], m["attempt"]) for _, m in again] == [
            (first, 1),
            (first, 2),
            (first, 3),
        ]
        _no_push(sub, 2.0)
        wait_for(lambda: c.status()["deliveries"]["dead"] == 2, timeout=5)

        # all of them, then acked: gone from pending and dead, lastAckAt set
        assert c.request("redeliver", subscriptionId="flaky") == {"redelivered": 2}
        revived = _pushes(sub, 2, timeout=10)
        assert sorted(m["deliveryId"] for _, m in revived) == [first, second]
        assert all(m["attempt"] == 1 for _, m in revived)
        assert sub.ack([first, second]) == 2
        st = c.status()["deliveries"]
        assert st["pending"] == 0 and st["dead"] == 0
        (row,) = c.request("subscriptions")["subscriptions"]
        assert row["dead"] == 0 and row["pending"] == 0 and row["lastAckAt"].endswith("Z")
        assert c.request("redeliver", subscriptionId="flaky") == {"redelivered": 0}


def test_admin_ops_page_and_refuse_unknown_subscriptions(daemon: DaemonProcess) -> None:
    with daemon.client() as sub:
        sub.subscribe("away", persona_id="p")
    with daemon.client() as c:
        _fire(c, *(f"t{i}" for i in range(5)))
        wait_for(lambda: c.status()["deliveries"]["pending"] == 5)
        (row,) = c.request("subscriptions")["subscriptions"]
        assert row["attached"] is False and row["pending"] == 5 and row["inflight"] == 0
        assert row["filter"] == {"personaId": "p"}
        assert row["oldestPendingAt"].endswith("Z")
        page = c.request("deliveries", subscriptionId="away", state="pending", limit=2)
        ids = [x["deliveryId"] for x in page["deliveries"]]
        assert len(ids) == 2 and page["nextAfter"] == ids[-1]
        assert all(
            x["attempt"] == 0 and x["nextAttemptAt"].endswith("Z") for x in page["deliveries"]
        )
        rest = c.request(
            "deliveries", subscriptionId="away", state="pending", after=page["nextAfter"]
        )
        more = [x["deliveryId"] for x in rest["deliveries"]]
        assert len(more) == 3 and min(more) > max(ids) and "nextAfter" not in rest
        names = [
            x["event"]["arguments"]["timerName"] for x in page["deliveries"] + rest["deliveries"]
        ]
        assert names == [f"t{i}" for i in range(5)]  # fire order
        for op, fields in (
            ("deliveries", {"state": "dead"}),
            ("redeliver", {}),
        ):
            with pytest.raises(ClientError) as err:
                c.request(op, subscriptionId="nobody", **fields)
            assert err.value.code == "not_found" and err.value.field == "subscriptionId"
        with pytest.raises(ClientError) as err:
            c.request("deliveries", subscriptionId="away", state="acked")
        assert err.value.code == "invalid_request" and err.value.field == "state"
        with pytest.raises(ClientError) as err:
            c.request("deliveries", subscriptionId="away", state="dead", limit=1001)
        assert err.value.code == "invalid_request" and err.value.field == "limit"


def test_subscribe_since_replays_stored_events(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        _fire(c, "before")
        wait_for(lambda: c.status()["events"]["stored"] == 1)
        time.sleep(0.05)
        since = datetime.now(UTC)
        time.sleep(0.05)
        _fire(c, "one", "two")
        _fire(c, "other", connector="elsewhere")
        wait_for(lambda: c.status()["events"]["stored"] == 4)
        stamp = since.isoformat().replace("+00:00", "Z")

        with daemon.client() as late:
            reply = late.request(
                "subscribe",
                subscriptionId="late",
                filter={"connectorIdn": "my_timer"},
                since=stamp,
            )
            assert reply == {"subscriptionId": "late", "created": True}
            got = [m for _, m in _pushes(late, 2)]
            assert [m["event"]["arguments"]["timerName"] for m in got] == ["one", "two"]
            assert all(m["attempt"] == 1 for m in got)
            assert late.ack([m["deliveryId"] for m in got]) == 2
            _no_push(late, 0.5)
            # subscribing again with since: no second replay
            again = late.request("subscribe", subscriptionId="late", since="2000-01-01T00:00:00Z")
            assert again["created"] is False
            _no_push(late, 0.5)

        with daemon.client() as everything:
            everything.request("subscribe", subscriptionId="all", since="2000-01-01 00:00")
            got = [m for _, m in _pushes(everything, 4)]
            assert {m["event"]["arguments"]["timerName"] for m in got} == {
                "before",
                "one",
                "two",
                "other",
            }
            everything.ack([m["deliveryId"] for m in got])

        with daemon.client() as fresh:
            fresh.subscribe("fresh")  # without since: only what fires from now on
            _no_push(fresh, 0.5)

        with pytest.raises(ClientError) as err:
            c.request("subscribe", subscriptionId="bad", since="yesterday")
        assert err.value.code == "invalid_request" and err.value.field == "since"


# ---------------------------------------------------------------------------------------------
# the store, with an injected clock


def _req(**args: Any) -> CommandRequest:
    return CommandRequest(
        op="command",
        commandIdn="set_timer",
        integrationIdn="program_timer",
        connectorIdn="conn",
        arguments=args,
    )


def _subscribe(engine: Engine, sid: str, now: datetime, persona: str | None = None) -> None:
    with transaction(engine) as conn:
        queries.upsert_subscription(
            conn,
            {
                "subscription_id": sid,
                "flow_instance_id": sid,
                "filter_connector_idn": None,
                "filter_persona_id": persona,
                "created_at": now,
                "attached_to": None,
                "attached_at": None,
            },
        )


def _fire_timers(engine: Engine, clock: FakeClock, *names: str, persona: str = "p") -> None:
    with transaction(engine) as conn:
        apply_batch(
            conn,
            [_req(personaId=persona, timerName=n, interval="1") for n in names],
            CommandSettings(),
            clock.now(),
        )
    clock.advance(1)
    with transaction(engine) as conn:
        assert fire_batch(conn, clock.now(), 1000, "test", None).fired == len(names)


def _purge(engine: Engine, clock: FakeClock, since: datetime | None = None) -> tuple[int, ...]:
    now = clock.now()
    with transaction(engine) as conn:
        dead = queries.expire_pending(conn, now - RETENTION, now, expired_after=since)
        purged, expired = queries.purge_deliveries_and_events(
            conn, now - timedelta(hours=1), now - RETENTION, expired_after=since
        )
    return dead, purged, expired


def _figures(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        figures = queries.pending_figures(conn)
        figures["events"] = conn.execute(select(func.count()).select_from(events)).scalar()
        figures["rows"] = conn.execute(select(func.count()).select_from(deliveries)).scalar()
        return figures


def test_retention_turns_pending_into_dead_then_purges_them(engine: Engine) -> None:
    clock = FakeClock(T0)
    _subscribe(engine, "away", clock.now())
    _subscribe(engine, "acker", clock.now())
    _fire_timers(engine, clock, "old")
    with transaction(engine) as conn:  # "acker" acks its copy
        (mine,) = queries.due_deliveries(conn, "acker", clock.now(), 10)
        assert queries.ack_deliveries(conn, [mine.id], ["acker"], clock.now()) == [mine.id]
    assert _figures(engine)["rows"] == 1  # an acked delivery is gone with its ack
    clock.advance(3 * 86400)
    _fire_timers(engine, clock, "young")
    assert _figures(engine)["pending"] == 3

    clock.advance(4 * 86400 + 60)  # "old" is past the retention, "young" is not
    assert _purge(engine, clock) == (1, 0, 0)  # the event stays: its dead copy holds it
    figures = _figures(engine)
    assert (figures["pending"], figures["dead"], figures["events"]) == (2, 1, 2)
    assert figures["oldest_pending_at"] is not None
    with engine.connect() as conn:
        (dead,) = queries.list_deliveries(conn, "away", dead=True, after=None, limit=10)
        assert dead.dead_at == clock.now() and dead.arguments["timerName"] == "old"
        # a dead delivery is never due again
        assert [
            r.arguments["timerName"]
            for r in queries.due_deliveries(conn, "away", clock.now() + timedelta(days=30), 10)
        ] == ["young"]
    assert _purge(engine, clock) == (0, 0, 0)  # nothing new

    clock.advance(RETENTION.total_seconds() + 60)  # one more retention: the dead one goes too
    dead, purged, expired = _purge(engine, clock)
    assert dead == 2  # the "young" ones reached the retention meanwhile
    assert purged == 1 and expired == 1  # the old dead delivery, then its event
    figures = _figures(engine)
    assert (figures["pending"], figures["dead"], figures["events"]) == (0, 2, 1)


def test_deliveries_acked_by_an_older_daemon_are_purged_after_an_hour(engine: Engine) -> None:
    """Before 2026-12-03 an ack set ``acked_at`` and kept the row; acks now delete it. Rows
    left acked by an older daemon are purged an hour after their ack, and free their event
    at its retention like any other."""
    clock = FakeClock(T0)
    _subscribe(engine, "acker", clock.now())
    _fire_timers(engine, clock, "old")
    with transaction(engine) as conn:  # what an ack of an older daemon wrote
        conn.execute(update(deliveries).values(acked_at=clock.now(), attempt=1))
    clock.advance(1800)
    assert _purge(engine, clock) == (0, 0, 0)
    assert _figures(engine)["rows"] == 1
    clock.advance(1801)
    assert _purge(engine, clock) == (0, 1, 0)  # an hour after its ack
    clock.advance(RETENTION.total_seconds())
    assert _purge(engine, clock) == (0, 0, 1)  # and its event at the retention
    assert (_figures(engine)["rows"], _figures(engine)["events"]) == (0, 0)


def test_purge_window_and_unrouted_events(engine: Engine) -> None:
    clock = FakeClock(T0)
    _fire_timers(engine, clock, "unrouted")
    clock.advance(8 * 86400)
    window_start = clock.now() - RETENTION  # as if an earlier purge had done what precedes it
    assert _purge(engine, clock, since=window_start) == (0, 0, 0)  # outside the window
    assert _purge(engine, clock) == (0, 0, 1)  # a full purge finds it


def test_redeliver_and_send_marks_in_the_store(engine: Engine) -> None:
    clock = FakeClock(T0)
    _subscribe(engine, "s", clock.now())
    _fire_timers(engine, clock, "a", "b")
    now = clock.now()
    with transaction(engine) as conn:
        rows = queries.due_deliveries(conn, "s", now, 10)
        queries.mark_sent(conn, [(r.id, 2) for r in rows], now, ack_timeout=30, retry_max_delay=100)
    with engine.connect() as conn:
        page = queries.list_deliveries(conn, "s", dead=False, after=None, limit=10)
    # attempt 3 waits 30 * 2**2 = 120 s, capped at 100
    assert [r.next_attempt_at - now for r in page] == [timedelta(seconds=100)] * 2
    assert queries.resend_delay(1, 30, 100) == 30
    assert queries.resend_delay(2, 30, 100) == 60
    assert queries.resend_delay(3, 30, 100) == 100
    assert queries.resend_delay(10_000, 30, 100) == 100
    assert queries.resend_delay(3, 30, 10) == 30  # never below the ack timeout
    with transaction(engine) as conn:
        assert queries.mark_dead(conn, [page[0].id, page[1].id], now) == 2
        assert queries.mark_dead(conn, [page[0].id], now) == 0
        assert queries.redeliver(conn, "s", [page[1].id], now) == 1
        assert queries.redeliver(conn, "s", None, now) == 1
        assert queries.redeliver(conn, "s", None, now) == 0
        due = queries.due_deliveries(conn, "s", now, 10)
    assert [r.attempt for r in due] == [0, 0]  # a fresh budget


def test_replay_reads_and_writes_in_chunks_in_fire_order(engine: Engine) -> None:
    clock = FakeClock(T0)
    for i in range(5):
        _fire_timers(engine, clock, f"t{i}", persona="p" if i % 2 == 0 else "q")
    _subscribe(engine, "late", clock.now(), persona="p")
    with transaction(engine) as conn:
        n = queries.replay_events(
            conn,
            "late",
            connector_idn="conn",
            persona_id="p",
            since=T0 + timedelta(seconds=2),
            now=clock.now(),
            chunk=1,
        )
        assert n == 2  # t2 and t4 (t0 fired before since; t1, t3 are q's)
        rows = queries.due_deliveries(conn, "late", clock.now(), 10)
    assert [r.arguments["timerName"] for r in rows] == ["t2", "t4"]
