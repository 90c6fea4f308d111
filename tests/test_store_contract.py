"""The command and fire paths against real SQLite and PostgreSQL with an injected clock:
batched commands behave as if run one by one, a fire is one transaction (event, deliveries and
timer together), and wall-clock jumps neither lose nor repeat fires."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import Connection, Engine, func, select

from program_timer.core.clock import FakeClock
from program_timer.core.model import Timer
from program_timer.scheduler.commands import CommandSettings, apply_batch
from program_timer.scheduler.firing import Direct, fire_batch
from program_timer.scheduler.protocol import CommandRequest
from program_timer.store import queries
from program_timer.store.db import (
    KeptConnections,
    health,
    make_engine,
    pipelined_transaction,
    read_modify_write,
    read_statements,
    transaction,
    upgrade,
)
from program_timer.store.errors import Conflict, StoreUnavailable
from program_timer.store.queries import driver
from program_timer.store.schema import deliveries, events, subscriptions, timers

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def req(command: str = "set_timer", act: str | None = None, **args: Any) -> CommandRequest:
    return CommandRequest(
        op="command",
        commandIdn=command,
        integrationIdn="program_timer",
        connectorIdn="conn",
        arguments=args,
        commandActId=uuid.UUID(act) if act else None,
    )


def run(
    engine: Engine,
    clock: FakeClock,
    *requests: CommandRequest,
    settings: CommandSettings | None = None,
) -> list[Any]:
    """One command group as the store worker runs it: at REPEATABLE READ on PostgreSQL, in a
    pipeline from its BEGIN to its COMMIT."""
    with pipelined_transaction(read_modify_write(engine)) as conn:
        outcomes = apply_batch(conn, list(requests), settings or CommandSettings(), clock.now())
        queries.commit_in_pipeline(conn)
    return outcomes


def fire(
    engine: Engine,
    clock: FakeClock,
    grace: float | None = None,
    direct: Direct | None = None,
    reserve: tuple[int, int] = (0, 0),
) -> Any:
    """One fire batch as the daemon runs it: in a pipeline on PostgreSQL, from its BEGIN to
    its COMMIT."""
    with pipelined_transaction(engine) as conn:
        result = fire_batch(conn, clock.now(), 1000, "test", grace, direct, reserve=reserve)
        queries.commit_in_pipeline(conn)
    return result


def event_rows(engine: Engine, name: str | None = None) -> list[Any]:
    with engine.connect() as conn:
        stmt = select(events).order_by(events.c.id)
        if name:
            stmt = stmt.where(events.c.timer_name == name)
        return list(conn.execute(stmt))


def test_batch_behaves_as_if_commands_ran_one_by_one(engine: Engine) -> None:
    clock = FakeClock(T0)
    out = run(
        engine,
        clock,
        req(personaId="p", timerName="a", interval="60"),
        req(personaId="p", timerName="a", enabled="false"),
        req("get_timer", personaId="p", timerName="a"),
        req("delete_timer", personaId="p", timerName="a"),
        req("get_timer", personaId="p", timerName="a"),
        req(personaId="p", timerName="a", interval="30", x="1"),
        req("list_timers", personaId="p"),
        req(personaId="p", timerName="b", interval="5"),
        req("delete_timers", personaId="p"),
        req(personaId="p", timerName="c", interval="5"),
    )
    assert out[1].result["timer"]["state"] == "disabled"
    assert out[2].result["timer"]["enabled"] is False
    assert out[3].result["removed"] is True
    assert out[4].error is not None and out[4].error.code == "not_found"
    assert out[5].result["timer"]["arguments"] == {"x": "1"}
    assert [t["timerName"] for t in out[6].result["timers"]] == ["a"]
    assert out[8].result["removed"] == 2
    with engine.connect() as conn:
        names = [t.timer_name for t in queries.list_timers(conn, "p", None, 10)]
    assert names == ["c"]


def test_quota_counts_within_a_batch(engine: Engine) -> None:
    clock = FakeClock(T0)
    settings = CommandSettings(max_timers_per_persona=2)
    out = run(
        engine,
        clock,
        *(req(personaId="q", timerName=f"t{i}", interval="9") for i in range(3)),
        settings=settings,
    )
    assert [o.error.code if o.error else "ok" for o in out] == ["ok", "ok", "quota_exceeded"]


def test_command_act_id_replayed_within_and_across_batches(engine: Engine) -> None:
    clock = FakeClock(T0)
    act = str(uuid.uuid4())
    first, again = run(
        engine,
        clock,
        req(act=act, personaId="p", timerName="t", interval="9"),
        req(act=act, personaId="p", timerName="t", interval="99"),
    )
    assert again.result == first.result
    (later,) = run(engine, clock, req(act=act, personaId="p", timerName="t", interval="77"))
    assert later.result == first.result
    with engine.connect() as conn:
        assert queries.get_timer(conn, "p", "t").interval == 9  # type: ignore[union-attr]


def test_a_fire_is_one_transaction_with_event_and_deliveries(engine: Engine) -> None:
    clock = FakeClock(T0)
    with transaction(engine) as conn:
        queries.upsert_subscription(
            conn,
            {
                "subscription_id": "s1",
                "flow_instance_id": "f",
                "filter_connector_idn": "conn",
                "filter_persona_id": None,
                "created_at": T0,
                "attached_to": None,
                "attached_at": None,
            },
        )
    run(engine, clock, req(personaId="p", timerName="t", interval="10", k="v"))
    clock.advance(10)
    with pytest.raises(RuntimeError), transaction(engine) as conn:
        result = fire_batch(conn, clock.now(), 10, "test", None)
        assert result.fired == 1
        raise RuntimeError("crash before commit")
    assert event_rows(engine) == []  # nothing half-done
    with engine.connect() as conn:
        assert queries.get_timer(conn, "p", "t").state == "scheduled"  # type: ignore[union-attr]
    result = fire(engine, clock)
    assert result.fired == 1 and result.deliveries == 1
    (ev,) = event_rows(engine)
    assert ev.arguments["k"] == "v" and ev.routed == 1
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(deliveries)).scalar() == 1
        t = queries.get_timer(conn, "p", "t")
        assert t is not None and t.state == "fired" and t.fire_count == 1
    assert fire(engine, clock).claimed == 0  # never twice


def test_repeating_catch_up_after_downtime(engine: Engine) -> None:
    clock = FakeClock(T0)
    run(engine, clock, req("set_repeatable_timer", personaId="p", timerName="r", interval="10"))
    clock.advance(10)
    assert fire(engine, clock).fired == 1
    clock.advance(65)  # down: occurrences at +20 .. +70 were missed
    assert fire(engine, clock).fired == 1
    last = event_rows(engine, "r")[-1]
    assert last.missed_count == 5 and last.scheduled_at == T0 + timedelta(seconds=20)
    with engine.connect() as conn:
        t = queries.get_timer(conn, "p", "r")
    assert t is not None and t.due_at == T0 + timedelta(seconds=80)


def test_misfire_grace_drops_late_fires_and_counts_them(engine: Engine) -> None:
    clock = FakeClock(T0)
    run(
        engine,
        clock,
        req(personaId="p", timerName="once", interval="10"),
        req("set_repeatable_timer", personaId="p", timerName="rep", interval="10"),
    )
    clock.advance(100)
    result = fire(engine, clock, grace=15)
    # the one-shot is 90 s late: dropped; the repeating one fires once for what is within 15 s
    assert result.dropped >= 1
    assert event_rows(engine, "once") == []
    (rep,) = event_rows(engine, "rep")
    assert (clock.now() - rep.scheduled_at).total_seconds() <= 15


def test_wall_clock_jump_backwards_does_not_repeat_fires(engine: Engine) -> None:
    clock = FakeClock(T0)
    run(
        engine,
        clock,
        req("set_repeatable_timer", personaId="p", timerName="r", interval="10"),
        req(personaId="p", timerName="o", interval="5"),
    )
    clock.advance(10)
    assert fire(engine, clock).fired == 2
    clock.advance(-3600)  # the clock jumps back an hour
    for _ in range(5):
        assert fire(engine, clock).fired == 0
        clock.advance(60)
    clock.set(T0 + timedelta(seconds=20))  # and forward again to the next grid time
    assert fire(engine, clock).fired == 1
    rows = event_rows(engine)
    assert [(r.timer_name, r.fire_count) for r in rows] == [("r", 1), ("o", 1), ("r", 2)] or [
        (r.timer_name, r.fire_count) for r in rows
    ] == [("o", 1), ("r", 1), ("r", 2)]


def test_wall_clock_jump_forwards_fires_once_with_missed_count(engine: Engine) -> None:
    clock = FakeClock(T0)
    run(
        engine,
        clock,
        req("set_repeatable_timer", personaId="p", timerName="r", interval="60"),
        req(personaId="p", timerName="o", fireAt="2026-03-01T13:00:00Z"),
    )
    clock.advance(86400)  # a day ahead
    result = fire(engine, clock)
    assert result.fired == 2
    by_name = {r.timer_name: r for r in event_rows(engine)}
    assert by_name["r"].missed_count == 86400 // 60 - 1
    assert by_name["o"].missed_count == 0
    assert fire(engine, clock).fired == 0


def test_disable_reenable_through_the_store(engine: Engine) -> None:
    clock = FakeClock(T0)
    run(
        engine,
        clock,
        req("set_repeatable_timer", personaId="p", timerName="r", interval="10"),
        req(personaId="p", timerName="o", interval="10"),
    )
    clock.advance(5)
    run(
        engine,
        clock,
        req(personaId="p", timerName="r", enabled="false"),
        req(personaId="p", timerName="o", enabled="false"),
    )
    clock.advance(100)
    assert fire(engine, clock).fired == 0
    out = run(
        engine,
        clock,
        req(personaId="p", timerName="r", enabled="true"),
        req(personaId="p", timerName="o", enabled="true"),
    )
    assert out[0].result["timer"]["nextFireAt"] == "2026-03-01T12:01:50Z"
    result = fire(engine, clock)
    assert result.fired == 1  # the one-shot whose time passed while disabled fires at once
    assert [r.timer_name for r in event_rows(engine)] == ["o"]


def test_purges(engine: Engine) -> None:
    clock = FakeClock(T0)
    run(
        engine,
        clock,
        req(personaId="p", timerName="o", interval="1"),
        req(personaId="p", timerName="keep", interval="100000"),
    )
    clock.advance(1)
    fire(engine, clock)
    clock.advance(8 * 86400)
    with transaction(engine) as conn:
        assert queries.purge_fired_timers(conn, clock.now() - timedelta(days=7)) == 1
        _acked, expired = queries.purge_deliveries_and_events(
            conn, clock.now() - timedelta(hours=1), clock.now() - timedelta(days=7)
        )
        assert expired == 1
        assert queries.purge_command_acts(conn, clock.now()) == 0
    with engine.connect() as conn:
        assert [r.timer_name for r in conn.execute(select(timers.c.timer_name))] == ["keep"]


def test_a_fired_one_shot_is_kept_a_retention_after_its_fire(engine: Engine) -> None:
    """The retention of a fired one-shot counts from its fire, not from its last command: one
    set ten days ahead is still there a minute after it fired, and gone seven days later."""
    clock = FakeClock(T0)
    run(engine, clock, req(personaId="p", timerName="later", fireAt="2026-03-11T12:00:00Z"))
    clock.advance(10 * 86400 + 1)
    assert fire(engine, clock).fired == 1
    clock.advance(60)
    with transaction(engine) as conn:
        assert queries.purge_fired_timers(conn, clock.now() - timedelta(days=7)) == 0
    clock.advance(7 * 86400)
    with transaction(engine) as conn:
        assert queries.purge_fired_timers(conn, clock.now() - timedelta(days=7)) == 1
        assert queries.timer_counts(conn).get("fired", 0) == 0


def _plan(conn: Connection, sql: str, params: Any = ()) -> str:
    """The plan of ``sql`` (in the driver's own parameter style) as one string: PostgreSQL's
    JSON, or SQLite's steps joined by `` | ``."""
    if conn.dialect.name == "postgresql":
        return json.dumps(conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, params).scalar())
    rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)
    return " | ".join(str(row[-1]) for row in rows)


def _generic_plan(conn: Connection, sql: str, params: Sequence[Any]) -> str:
    """PostgreSQL's plan of ``sql`` (``?`` marks) prepared and forced generic: the plan a
    prepared statement settles on after five runs, made without the parameters' values."""
    numbered = sql
    for n in range(1, len(params) + 1):
        numbered = numbered.replace("?", f"${n}", 1)
    conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
    conn.exec_driver_sql(f"PREPARE q AS {numbered}")
    try:
        values = ", ".join(
            f"'{p.isoformat()}'" if isinstance(p, datetime) else str(p) for p in params
        )
        run = "EXPLAIN (FORMAT JSON) EXECUTE q" + (f"({values})" if params else "")
        return json.dumps(conn.exec_driver_sql(run).scalar())
    finally:
        conn.exec_driver_sql("DEALLOCATE q")
        conn.exec_driver_sql("RESET plan_cache_mode")


def _assert_reads_index(conn: Connection, plan: str, index: str) -> None:
    """``plan`` (:func:`_plan`) reads ``index``; on PostgreSQL, no table is read whole."""
    if conn.dialect.name == "postgresql":
        assert '"Node Type": "Seq Scan"' not in plan, plan
        assert f'"Index Name": "{index}"' in plan, plan
    else:
        assert index in plan, plan


def test_the_purge_of_fired_timers_reads_their_partial_index(engine: Engine) -> None:
    """Only fired one-shots are in ``ix_timers_fired`` (migration 0007), and the purge finds
    them through it, never by reading every timer: the state in its condition is a literal, so
    that neither database needs to know a parameter's value to use the partial index."""
    from program_timer.store.queries.timers import purge_fired_statement

    with transaction(engine) as conn:
        queries.insert_timers(conn, [_odd_timer(i) for i in range(10_000)])
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        compiled = purge_fired_statement(T0).compile(dialect=conn.dialect)
        postgres = engine.dialect.name == "postgresql"
        params = dict(compiled.params) if postgres else (T0.isoformat(),)
        _assert_reads_index(conn, _plan(conn, str(compiled), params), "ix_timers_fired")


def test_the_count_of_unrouted_events_reads_their_partial_index(engine: Engine) -> None:
    """Only unrouted events are in ``ix_events_unrouted`` (migration 0008): ``status`` counts
    them through it, never by reading every event, and counts them right."""
    from program_timer.store.queries.operators import unrouted_count

    rows = [
        {
            "id": i + 1,
            "external_event_id": str(uuid.UUID(int=i)),
            "persona_id": "p",
            "timer_name": f"t{i}",
            "connector_idn": "c",
            "command_act_id": str(uuid.UUID(int=i)),
            "scheduled_at": T0,
            "fired_at": T0 + timedelta(microseconds=i),
            "fire_count": 1,
            "missed_count": 0,
            "arguments": {},
            "routed": 0 if i % 1000 == 0 else 1,
            "fired_by": "test",
        }
        for i in range(10_000)
    ]
    with transaction(engine) as conn:
        queries.insert_events(conn, rows)
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        assert conn.execute(unrouted_count()).scalar() == 10
        assert queries.delivery_figures(conn)["unrouted_events"] == 10
        sql = str(unrouted_count().compile(dialect=conn.dialect))
        _assert_reads_index(conn, _plan(conn, sql), "ix_events_unrouted")


def test_due_timers_are_found_through_their_partial_index(engine: Engine) -> None:
    """``ix_timers_due_at`` holds the timers that will fire only (migration 0009): the claim
    (``due_at <= ?``) and the next due time (``due_at IS NOT NULL``) still read it, never the
    whole table; on PostgreSQL under a generic plan too (the one a prepared statement settles
    on after five runs), whose parameter values are unknown."""
    from program_timer.store.queries.timers import NEXT_DUE, claim_statement

    stored = [dataclasses.replace(_odd_timer(i), persona_id=f"p{i // 100}") for i in range(10_000)]
    with transaction(engine) as conn:
        queries.insert_timers(conn, stored)
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        claim = claim_statement(conn, T0, 1000)
        for sql, params in ((claim.sql, claim.params), (NEXT_DUE, ())):
            if engine.dialect.name == "postgresql":
                plan = _generic_plan(conn, sql, params)
            else:
                plan = _plan(conn, sql, params)
            _assert_reads_index(conn, plan, "ix_timers_due_at")
        due = driver.fetch_many(conn, [claim])[0]
    expected = sum(1 for t in stored if t.due_at is not None and t.due_at <= T0)
    assert len(due) == min(1000, expected)


def _counts(engine: Engine) -> tuple[dict[str, int], dict[str, int]]:
    with engine.connect() as conn:
        return queries.timer_counts(conn), queries.recount_timers(conn)


def test_kept_counts_follow_every_state_change(engine: Engine) -> None:
    """status reads the kept counts (timer_counts): after every kind of write they equal a
    count of the timers table."""
    clock = FakeClock(T0)

    def check(expected: dict[str, int]) -> None:
        kept, counted = _counts(engine)
        assert kept == counted == expected

    run(
        engine,
        clock,
        req(personaId="p", timerName="once", interval="1"),
        req("set_repeatable_timer", personaId="p", timerName="rep", interval="1"),
        req(personaId="p", timerName="off", interval="5", enabled="false"),
        req(personaId="p", timerName="none"),  # neither fireAt nor interval: unscheduled
        req(personaId="q", timerName="gone", interval="100"),
    )
    check({"scheduled": 3, "disabled": 1, "unscheduled": 1})
    # several changes to one timer in one batch count once, from its stored state
    run(
        engine,
        clock,
        req(personaId="q", timerName="gone", enabled="false"),
        req(personaId="q", timerName="gone", enabled="true"),
        req(personaId="q", timerName="gone", enabled="false"),
        req(personaId="p", timerName="none", interval="100"),
        req(personaId="p", timerName="fresh", interval="100"),
        req("delete_timer", personaId="p", timerName="fresh"),
    )
    check({"scheduled": 3, "disabled": 2})
    clock.advance(1.5)
    assert fire(engine, clock).fired == 2  # the one-shot completes, the repeating one moves on
    check({"scheduled": 2, "disabled": 2, "fired": 1})
    run(
        engine,
        clock,
        req(personaId="p", timerName="once", interval="1"),  # a fired timer set again
        req("delete_timer", personaId="p", timerName="off"),
        req("list_timers", personaId="p"),  # a flush in the middle of the batch
        req(personaId="p", timerName="off", interval="3"),
        req("delete_timers", personaId="q"),
    )
    check({"scheduled": 4})
    clock.advance(3600)
    fire(engine, clock)
    check({"scheduled": 1, "fired": 3})
    clock.advance(8 * 86400)
    with transaction(engine) as conn:
        assert queries.purge_fired_timers(conn, clock.now() - timedelta(days=7)) == 3
    check({"scheduled": 1})
    with transaction(engine) as conn:
        queries.delete_persona_timers(conn, "p")
    check({})


@pytest.mark.parametrize("commands_coming", [False, True])
def test_fire_batches_shrink_while_commands_come(engine: Engine, commands_coming: bool) -> None:
    """A command waits for the fire transaction in progress: while clients send commands, the
    fire loop fires in transactions of an eighth of the batch size (all fires still happen),
    one at a time (on PostgreSQL full batches otherwise commit in the committer thread while
    the next one is claimed)."""
    from program_timer.scheduler.firing import SHARED_FRACTION, FireLoop
    from program_timer.scheduler.metrics import Metrics

    clock = FakeClock(T0)
    run(engine, clock, *[req(personaId="p", timerName=f"t{i}", interval="1") for i in range(101)])
    clock.advance(2)
    metrics = Metrics()
    recorded_by: set[str] = set()
    loop = FireLoop(
        engine,
        clock,
        metrics,
        daemon_id="test",
        batch_size=40,
        misfire_grace=None,
        fired=lambda: recorded_by.add(threading.current_thread().name),
        commands_waiting=lambda: commands_coming,
    )
    loop.fire_pass()
    assert metrics.fires == 101
    per_batch = 40 // SHARED_FRACTION if commands_coming else 40
    assert metrics.batches == -(-101 // per_batch)  # full batches, then the rest
    overlapped = any(name.startswith("fire-commit") for name in recorded_by)
    assert overlapped == (engine.dialect.name == "postgresql" and not commands_coming)


def _event_row(event_id: int, now: datetime) -> dict[str, Any]:
    return {
        "id": event_id,
        "external_event_id": str(uuid.uuid4()),
        "persona_id": "p",
        "timer_name": "t",
        "connector_idn": "conn",
        "command_act_id": "act",
        "scheduled_at": now,
        "fired_at": now,
        "fire_count": 1,
        "missed_count": 0,
        "arguments": {},
        "routed": 0,
        "fired_by": "test",
    }


def test_a_duplicate_in_the_fire_paths_bulk_insert_is_a_conflict(engine: Engine) -> None:
    """The events and deliveries of a fire go in by ``executemany`` (SQLite) or one JSON
    parameter (PostgreSQL, on psycopg's own connection): a failure there reaches the store's error
    policy as any other statement's does, a duplicate as a Conflict (retried), not as an
    unexplained driver exception (logged as a bug)."""
    with transaction(engine) as conn:
        queries.insert_events(conn, [_event_row(7, T0)])
    with pytest.raises(Conflict), transaction(engine) as conn:
        queries.insert_events(conn, [_event_row(7, T0)])
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(events)).scalar() == 1


@pytest.mark.postgres
def test_a_server_lost_during_a_bulk_insert_is_unavailable_and_the_next_transaction_works(
    pg_url: str, pg_engine: Engine
) -> None:
    """The server side of the connection dies inside a fire's transaction, at its insert:
    the caller sees ``StoreUnavailable`` (the outage policy), and the dead connection does not
    come back from the pool."""
    import psycopg

    with pytest.raises(StoreUnavailable), transaction(pg_engine) as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        queries.insert_events(conn, [_event_row(8, T0)])
    with transaction(pg_engine) as conn:  # the dead connection left the pool
        queries.insert_events(conn, [_event_row(9, T0)])
    with pg_engine.connect() as conn:
        assert conn.execute(select(events.c.id)).scalars().all() == [9]


@pytest.mark.postgres
def test_pooled_connections_whose_sessions_ended_are_replaced_before_use(pg_url: str) -> None:
    """The server ends every idle session of the pool (as a restart or a failover does): the
    next transactions run on new connections and never see the dead ones, although a healthy
    pooled connection is used without a ping (``store/postgres.py``)."""
    import psycopg

    from program_timer.store import postgres
    from program_timer.store.db import make_engine, upgrade

    engine = make_engine(pg_url, pool_size=3)
    try:
        upgrade(engine)
        pids = set()
        with transaction(engine) as a, transaction(engine) as b, transaction(engine) as c:
            for conn in (a, b, c):
                pids.add(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())
                assert postgres.quiet(conn.connection.dbapi_connection)
        with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as admin:
            for pid in pids:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            for _ in range(100):  # until the server has ended them all
                left = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),)
                ).fetchone()
                if left == (0,):
                    break
                time.sleep(0.02)
        with transaction(engine) as a, transaction(engine) as b, transaction(engine) as c:
            for i, conn in enumerate((a, b, c)):
                assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() not in pids
                queries.insert_events(conn, [_event_row(10 + i, T0)])
        with engine.connect() as conn:
            assert conn.execute(select(events.c.id)).scalars().all() == [10, 11, 12]
    finally:
        engine.dispose()


def test_kept_connections_go_back_to_the_pool_when_a_transaction_fails_and_at_release(
    engine: Engine,
) -> None:
    """The fire loop keeps its connections between the transactions of a pass
    (:class:`KeptConnections`): one stays out of the pool between transactions, one whose
    transaction failed does not, and none after the pass (a leak would hold the pool's slots
    and the database's sessions)."""
    kept = KeptConnections(engine)
    with kept.pipelined_transaction() as conn:
        queries.insert_events(conn, [_event_row(40, T0)])
        queries.commit_in_pipeline(conn)
    assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    with pytest.raises(Conflict), kept.pipelined_transaction() as conn:
        queries.insert_events(conn, [_event_row(40, T0)])  # a duplicate id
        queries.commit_in_pipeline(conn)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    if engine.dialect.name == "postgresql":  # a batch commits while the next one runs
        with kept.pipelined_transaction() as a, kept.pipelined_transaction() as b:
            queries.insert_events(a, [_event_row(41, T0)])
            queries.insert_events(b, [_event_row(42, T0)])
        assert engine.pool.checkedout() == 2  # type: ignore[attr-defined]
    else:  # one writer at a time
        with kept.pipelined_transaction() as conn:
            queries.insert_events(conn, [_event_row(41, T0), _event_row(42, T0)])
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    kept.release()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with engine.connect() as conn:
        assert sorted(conn.execute(select(events.c.id)).scalars()) == [40, 41, 42]


@pytest.mark.postgres
def test_a_kept_connection_whose_session_ended_is_replaced_before_use(
    pg_url: str, pg_engine: Engine
) -> None:
    """The server ends the session of a connection the fire loop keeps between two batches
    (a restart, ``pg_terminate_backend``): the next transaction runs on another connection and
    never sees the dead one, as with a connection from the pool (``store/postgres.py``), and no
    outage is reported."""
    import psycopg

    kept = KeptConnections(pg_engine)
    with kept.pipelined_transaction() as conn:
        pid = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        queries.insert_events(conn, [_event_row(43, T0)])
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(100):  # until the server has ended it
            if admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone() == (0,):
                break
            time.sleep(0.02)
    with kept.pipelined_transaction() as conn:
        assert conn.connection.dbapi_connection.info.backend_pid != pid  # type: ignore[union-attr]
        queries.insert_events(conn, [_event_row(44, T0)])
    kept.release()
    assert health(pg_engine).available
    with pg_engine.connect() as conn:
        assert conn.execute(select(events.c.id)).scalars().all() == [43, 44]


def _subscribe(engine: Engine, sub: str) -> None:
    with transaction(engine) as conn:
        queries.upsert_subscription(
            conn,
            {
                "subscription_id": sub,
                "flow_instance_id": sub,
                "filter_connector_idn": None,
                "filter_persona_id": None,
                "created_at": T0,
                "attached_to": "test",
                "attached_at": T0,
            },
        )


def _due_with_two_subscriptions(engine: Engine, n: int) -> FakeClock:
    """Subscriptions ``a`` and ``b`` (no filter) and ``n`` one-shot timers due; the clock
    returned is past their time."""
    clock = FakeClock(T0)
    _subscribe(engine, "a")
    _subscribe(engine, "b")
    run(
        engine,
        clock,
        *(
            req(personaId="p", timerName=f"t{i:03}", fireAt="2026-03-01T12:00:05Z")
            for i in range(n)
        ),
    )
    clock.advance(10)
    return clock


@pytest.mark.parametrize(
    ("n", "reserve"),
    [(3, (0, 0)), (3, (1, 2)), (3, (30, 30)), (driver.PIPELINE_ROWS * 3, (0, 0))],
)
def test_a_batch_records_events_and_its_sent_and_waiting_deliveries(
    engine: Engine, n: int, reserve: tuple[int, int]
) -> None:
    """Small batches insert row by row on PostgreSQL, larger ones the events and deliveries
    from one JSON parameter each (one pipeline either way): every event is written with one
    delivery per subscription, those the batch sends itself marked sent (and pushed by their
    ids), the rest waiting for the pump, each delivery naming its event, ids in event order.
    Ids taken with the claim (``reserve``) are used first, whether they fall short or over."""
    clock = _due_with_two_subscriptions(engine, n)
    window = n // 2
    result = fire(
        engine, clock, direct=Direct({"a": window}, T0 + timedelta(seconds=40)), reserve=reserve
    )
    assert result.fired == n and result.deliveries == 2 * n
    assert [s.subscription_id for s in result.sends] == ["a"] * window
    assert result.waiting == {"a", "b"}
    with engine.connect() as conn:
        evs = {e.id: e for e in conn.execute(select(events))}
        rows = list(conn.execute(select(deliveries).order_by(deliveries.c.id)))
    assert len(evs) == n and len(rows) == 2 * n
    sent = {(s.delivery_id, orjson.loads(s.event)["externalEventId"]) for s in result.sends}
    assert sent == {(d.id, evs[d.event_id].external_event_id) for d in rows if d.sent_at}
    for d in rows:
        if d.sent_at is not None:
            assert d.subscription_id == "a" and d.attempt == 1
            assert d.sent_at == clock.now() and d.next_attempt_at == T0 + timedelta(seconds=40)
        else:
            assert d.attempt == 0 and d.next_attempt_at == clock.now()
    assert [d.event_id for d in rows if d.subscription_id == "a"] == sorted(evs)


@pytest.mark.parametrize("failure", ["raised", "statement"])
def test_a_fire_transaction_in_a_pipeline_keeps_nothing_when_it_fails(
    engine: Engine, failure: str
) -> None:
    """The fire batch's transaction sends its own BEGIN and COMMIT in the pipeline (its
    connection in autocommit mode on PostgreSQL): a batch that fails after its claim, in the
    daemon's code or in a statement (whose error comes back with the COMMIT), leaves every
    timer as it was and no event, and its connection goes back to the pool out of autocommit
    mode, with no transaction open."""
    clock = _due_with_two_subscriptions(engine, 3)
    expected = RuntimeError if failure == "raised" else Conflict
    with pytest.raises(expected), pipelined_transaction(engine) as conn:
        raw: Any = conn.connection.dbapi_connection
        result = fire_batch(conn, clock.now(), 1000, "test", None, reserve=(3, 6))
        assert result.fired == 3
        if failure == "raised":
            raise RuntimeError("crash before commit")
        queries.insert_events(conn, [_event_row(40, T0), _event_row(40, T0)])
        queries.commit_in_pipeline(conn)
    assert event_rows(engine) == []
    with engine.connect() as conn:
        assert {queries.timer_from_row(r).state for r in conn.execute(select(timers))} == {
            "scheduled"
        }
    if engine.dialect.name == "postgresql":
        assert raw.autocommit is False and raw.info.transaction_status == 0  # IDLE
    assert fire(engine, clock).fired == 3


def test_a_command_group_in_a_pipeline_that_runs_a_sqlalchemy_statement(engine: Engine) -> None:
    """A command group runs in one pipeline on PostgreSQL; ``delete_timers`` is a SQLAlchemy
    statement, which ends the pipeline first, and ``list_timers`` reads in it: what the group
    wrote before them is there for them to read, and what it writes after them is kept too."""
    clock = FakeClock(T0)
    out = run(
        engine,
        clock,
        req(personaId="p", timerName="a", interval="60"),
        req("list_timers", personaId="p"),
        req(personaId="p", timerName="b", interval="60"),
        req("delete_timers", personaId="q"),
        req(personaId="p", timerName="c", interval="60"),
        req("get_timer", personaId="p", timerName="b"),
    )
    assert [t["timerName"] for t in out[1].result["timers"]] == ["a"]
    assert out[5].result["timer"]["timerName"] == "b"
    with engine.connect() as conn:
        assert [t.timer_name for t in queries.list_timers(conn, "p", None, 10)] == ["a", "b", "c"]


def test_a_read_only_command_group_leaves_its_connection_to_transactions(engine: Engine) -> None:
    """A group of read-only commands runs without a transaction on PostgreSQL (autocommit:
    each query is its own, one round trip). Its connection goes back to the pool out of
    autocommit mode: a transaction that then fails on it keeps nothing it wrote."""
    clock = FakeClock(T0)
    run(engine, clock, req(personaId="p", timerName="a", interval="60"))
    requests = [req("list_timers", personaId="p"), req("get_timer", personaId="p", timerName="a")]
    with read_statements(read_modify_write(engine)) as conn:
        raw: Any = conn.connection.dbapi_connection
        out = apply_batch(conn, requests, CommandSettings(), clock.now())
    listed, got = out[0].result, out[1].result
    assert listed is not None and got is not None
    assert [t["timerName"] for t in listed["timers"]] == ["a"]
    assert got["timer"]["timerName"] == "a"
    with pytest.raises(RuntimeError), transaction(engine) as conn:
        if engine.dialect.name == "postgresql":
            assert raw.autocommit is False
            assert conn.connection.dbapi_connection is raw  # the pool's one connection
        conn.execute(timers.delete())
        raise RuntimeError("fails after its write")
    with engine.connect() as conn:
        assert [t.timer_name for t in queries.list_timers(conn, "p", None, 10)] == ["a"]


@pytest.mark.postgres
def test_a_command_group_that_read_a_timer_a_fire_then_changed_conflicts(
    pg_engine: Engine,
) -> None:
    """A command group's transaction (BEGIN sent by us in the pipeline) is at REPEATABLE
    READ: writing back a timer that a fire changed after the group read it is a Conflict (the
    worker runs the group again on fresh rows), not the stale copy overwriting the fire."""
    clock = FakeClock(T0)
    run(pg_engine, clock, req(personaId="p", timerName="t", interval="10"))
    clock.advance(10)
    with pytest.raises(Conflict), pipelined_transaction(read_modify_write(pg_engine)) as conn:
        ((level,),) = driver.fetch(conn, "SELECT current_setting('transaction_isolation')")
        assert level == "repeatable read"
        found, _, _ = queries.load_working_set(conn, [("p", "t")], [], [])
        assert fire(pg_engine, clock).fired == 1  # another transaction, committed
        queries.update_timers(conn, [found[("p", "t")]])  # the copy read before the fire
        queries.commit_in_pipeline(conn)
    with pg_engine.connect() as conn:
        assert queries.get_timer(conn, "p", "t").fire_count == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("read_after", ["driver", "sqlalchemy", None])
def test_an_error_inside_a_pipeline_is_a_store_error_and_nothing_is_kept(
    engine: Engine, read_after: str | None
) -> None:
    """In a pipeline a statement's error comes back later than the statement: at the next
    read (the driver's, or SQLAlchemy's, which ends the pipeline first), or at the block's
    end. Either way it reaches the error policy as any other (a duplicate is a Conflict), and
    the whole transaction is rolled back."""
    with transaction(engine) as conn:
        queries.insert_events(conn, [_event_row(20, T0)])
    with pytest.raises(Conflict), transaction(engine) as conn, queries.pipeline(conn):
        queries.insert_events(conn, [_event_row(21, T0)])
        queries.insert_events(conn, [_event_row(20, T0)])  # a duplicate id
        if read_after == "driver":
            queries.next_due_at(conn)
        elif read_after == "sqlalchemy":
            queries.get_timer(conn, "p", "t")
    with engine.connect() as conn:
        assert conn.execute(select(events.c.id)).scalars().all() == [20]


@pytest.mark.postgres
def test_a_server_lost_inside_a_pipeline_is_unavailable_and_the_next_transaction_works(
    pg_url: str, pg_engine: Engine
) -> None:
    import psycopg

    with pytest.raises(StoreUnavailable), transaction(pg_engine) as conn, queries.pipeline(conn):
        pid = conn.connection.dbapi_connection.info.backend_pid  # no round trip
        with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        queries.insert_events(conn, [_event_row(30, T0)])
        queries.next_due_at(conn)
    with transaction(pg_engine) as conn, queries.pipeline(conn):
        queries.insert_events(conn, [_event_row(31, T0)])
    with pg_engine.connect() as conn:
        assert conn.execute(select(events.c.id)).scalars().all() == [31]


@pytest.mark.parametrize("rows", [1, driver.PIPELINE_ROWS + 1])
def test_errors_outside_sqlalchemy_are_counted_like_a_statements(engine: Engine, rows: int) -> None:
    """A duplicate in a fire's inserts (row by row in a pipeline, or from one JSON parameter)
    reaches the engine's error listeners as a statement's error does: ``/metrics`` counts it."""
    from program_timer.store import observe

    kinds: list[str] = []
    observe.count_errors(engine, kinds.append)
    with transaction(engine) as conn:
        queries.insert_events(conn, [_event_row(40, T0)])
    batch = [_event_row(41 + i, T0) for i in range(rows - 1)] + [_event_row(40, T0)]
    with pytest.raises(Conflict), transaction(engine) as conn, queries.pipeline(conn):
        queries.insert_events(conn, batch)
    assert kinds == ["conflict"]


def _odd_timer(i: int) -> Timer:
    """A timer whose values test the bulk insert's conversions: microseconds, far and near
    instants, None, a float interval, text that JSON and SQL escape, non-ASCII text."""
    odd = 'quote " back \\ slash \n tab \t é 日本 😀 %s ? $1'
    return Timer(
        persona_id=f"p{i % 3} {odd}",
        timer_name=f"t{i} {odd}",
        connector_idn="c",
        fire_at=None if i % 2 else T0 + timedelta(microseconds=i * 7 + 1),
        timezone="Europe/Paris" if i % 3 else None,
        interval=[None, 0.001, 1e9, 3600.5][i % 4],
        rrule="FREQ=DAILY;BYHOUR=9" if i % 5 == 1 else None,
        cron="*/5 * * * *" if i % 5 == 2 else None,
        repeatable=bool(i % 2),
        enabled=not i % 3,
        anchor_at=datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=i, microseconds=999_999),
        planned_at=datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        due_at=None,
        state="scheduled",
        fire_count=2**31 - 1 - i,
        last_fired_at=T0 - timedelta(microseconds=i),
        arguments={"k": odd, "empty": "", "n": str(i), odd: "key with escapes"},
        command_act_id=str(uuid.UUID(int=i)),
        created_at=T0,
        updated_at=T0 + timedelta(seconds=1),
    )


@pytest.mark.parametrize("in_pipeline", [True, False])
@pytest.mark.parametrize("n", [1, driver.PIPELINE_ROWS + 1, 3 * driver.PIPELINE_ROWS])
def test_timers_written_in_bulk_read_back_exactly(
    engine: Engine, n: int, in_pipeline: bool
) -> None:
    """Timers go in row by row when few, or as one JSON parameter when many (PostgreSQL),
    ``executemany`` on SQLite: read back through SQLAlchemy Core, every value is the one
    written, whatever the path; and a command group reads them back by key."""
    written = [_odd_timer(i) for i in range(n)]
    pipeline = queries.pipeline if in_pipeline else lambda _conn: contextlib.nullcontext()
    with transaction(engine) as conn, pipeline(conn):
        queries.insert_timers(conn, written)
    with engine.connect() as conn:
        rows = conn.execute(select(timers).order_by(timers.c.id)).all()
    read = [queries.timer_from_row(r) for r in rows]
    assert [dataclasses.replace(t, id=None) for t in read] == written
    with transaction(engine) as conn:
        found, _, _ = queries.load_working_set(
            conn, [(t.persona_id, t.timer_name) for t in reversed(written)], [], []
        )
    assert {k: dataclasses.replace(t, id=None) for k, t in found.items()} == {
        (t.persona_id, t.timer_name): t for t in written
    }


def test_sqlite_begin_held_up_by_another_writer_is_an_outage_counted_once(
    sqlite_url: str,
) -> None:
    """SQLite's ``BEGIN IMMEDIATE`` runs on the driver (no SQLAlchemy statement around it): a
    writer lock held elsewhere past the busy timeout is still SQLAlchemy's error, counted by
    the engine's error listener, and :class:`StoreUnavailable` to the caller; the connection
    goes back to the pool, and the next transaction, once the lock is free, commits. Reads
    (``BEGIN``) never wait for a writer."""
    from program_timer.store import observe
    from program_timer.store.db import read_transaction

    engine = make_engine(sqlite_url, timeout=0.2)
    try:
        upgrade(engine)
        kinds: list[str] = []
        observe.count_errors(engine, kinds.append)
        other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailable, match="locked"), transaction(engine) as conn:
                driver.execute(conn, "DELETE FROM timer_counts", ())
            assert kinds == ["unavailable"]
            with read_transaction(engine) as conn:
                assert queries.timer_counts(conn) == {}
        finally:
            other.execute("ROLLBACK")
            other.close()
        with transaction(engine) as conn:
            queries.add_timer_counts(conn, {"scheduled": 2})
        with read_transaction(engine) as conn:
            assert queries.timer_counts(conn) == {"scheduled": 2}
        assert kinds == ["unavailable"]
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def test_a_command_group_reads_its_timers_by_key_through_the_index(engine: Engine) -> None:
    """The keys of a command group are looked up one index probe each, never by reading the
    whole table: PostgreSQL, guessing 100 keys, chose a hash join over the whole table below
    some 25,000 rows (2.6 ms for 256 keys at 10,000 rows, 1.1 ms through the index)."""
    from program_timer.store.queries.timers import _timers_by_key

    stored = [dataclasses.replace(_odd_timer(i), persona_id=f"p{i // 100}") for i in range(10_000)]
    with transaction(engine) as conn:
        queries.insert_timers(conn, stored)
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        keys = [(f"p{i // 100}", stored[i].timer_name) for i in range(0, 10_000, 39)]
        keys += [("nobody", f"n{i}") for i in range(30)]
        (statement,) = _timers_by_key(conn, keys)
        if engine.dialect.name == "postgresql":
            sql = driver._postgres_marks(statement.sql)
            _assert_reads_index(conn, _plan(conn, sql, statement.params), "uq_timers_persona_name")
        else:
            plan = _plan(conn, statement.sql, statement.params)
            assert "SCAN timers" not in plan, plan
            assert "USING INDEX" in plan, plan
        rows = driver.fetch_many(conn, [statement])[0]
    assert len(rows) == 257
    with transaction(engine) as conn:
        found, _, _ = queries.load_working_set(conn, keys, [], [])
    assert sorted(found) == sorted(keys[:-30])


def test_acks_end_only_the_acking_subscriptions_pending_deliveries_once(engine: Engine) -> None:
    """An ack names delivery ids: those of the acking connection's subscriptions that are not
    acked yet are acked now (and returned, once), any other id is left alone; hundreds of ids
    in one ack are all acked; ``last_ack_at`` is written at most once a second. An id beyond
    64 bits (a client may send one) is no error."""
    n = 600  # more ids than the chunks of other statements (512)
    clock = _due_with_two_subscriptions(engine, n)
    assert fire(engine, clock).deliveries == 2 * n
    with engine.connect() as conn:
        ids: dict[str, list[int]] = {s: [] for s in ("a", "b")}
        for d in conn.execute(select(deliveries).order_by(deliveries.c.id)):
            ids[d.subscription_id].append(d.id)
    mine, theirs = ids["a"], ids["b"]

    def ack(delivery_ids: list[int], subs: list[str]) -> list[int]:
        with transaction(engine) as conn:
            return queries.ack_deliveries(conn, delivery_ids, subs, clock.now())

    def last_ack() -> dict[str, datetime | None]:
        with engine.connect() as conn:
            return dict(
                conn.execute(
                    select(subscriptions.c.subscription_id, subscriptions.c.last_ack_at)
                ).all()
            )

    missing = 10**9
    assert ack([2**70, -(2**70), 2**63], ["a"]) == []  # beyond 64 bits: no row, no error
    assert sorted(ack([*mine[:550], theirs[0], missing, 2**64], ["a"])) == mine[:550]
    assert last_ack() == {"a": clock.now(), "b": None}
    first = clock.now()
    clock.advance(0.5)
    assert sorted(ack(mine[540:], ["a"])) == mine[550:]  # the first 10 were acked already
    assert last_ack()["a"] == first  # within a second: not written again
    clock.advance(1)
    assert ack(mine, ["a"]) == []
    assert sorted(ack([mine[0], *theirs], ["a", "b"])) == theirs
    assert last_ack() == {"a": first, "b": clock.now()}
    assert ack(mine, []) == []
    with engine.connect() as conn:
        pending = select(func.count()).where(deliveries.c.acked_at.is_(None))
        assert conn.execute(pending).scalar() == 0


def _fire_loop_sending_to(
    engine: Engine, clock: FakeClock, sub: str, pushed: list[tuple[str, list[Any]]]
) -> tuple[Any, Any]:
    """A fire loop of batches of 10 whose direct sends go to ``sub`` (attached here, a window
    of 1,000); each push is recorded with the name of the thread it came from."""
    from program_timer.events.direct import DirectSends
    from program_timer.scheduler.firing import FireLoop
    from program_timer.scheduler.metrics import Metrics

    direct = DirectSends()

    def deliver(sends: list[Any], used: dict[str, int]) -> None:
        pushed.append((threading.current_thread().name, sends))
        direct.settle(used)

    direct.attach(deliver)
    direct.joined(sub)
    direct.drained(sub, direct.generation(sub))
    direct.refresh({sub: 1000})
    metrics = Metrics()
    loop = FireLoop(
        engine,
        clock,
        metrics,
        daemon_id="test",
        batch_size=10,
        misfire_grace=None,
        fired=lambda: None,
        direct=direct,
    )
    return loop, metrics


def _one_shots_due(engine: Engine, n: int) -> FakeClock:
    """Subscription ``a`` (no filter) and ``n`` one-shot timers due one second apart."""
    clock = FakeClock(T0)
    _subscribe(engine, "a")
    run(
        engine,
        clock,
        *(
            req(
                personaId="p",
                timerName=f"t{i:03}",
                fireAt=f"2026-03-01T12:{i // 60:02}:{i % 60:02}Z",
            )
            for i in range(n)
        ),
    )
    clock.advance(3600)
    return clock


def _check_fired_once_and_pushed_in_order(
    engine: Engine, n: int, pushed: list[tuple[str, list[Any]]]
) -> None:
    with engine.connect() as conn:
        evs = list(conn.execute(select(events).order_by(events.c.id)))
        rows = {d.id: d for d in conn.execute(select(deliveries))}
        fire_counts = [t.fire_count for t in conn.execute(select(timers))]
    assert [e.timer_name for e in evs] == [f"t{i:03}" for i in range(n)]  # once each, in order
    assert fire_counts == [1] * n
    sends = [s for _, batch in pushed for s in batch]
    # Everything pushed was committed, sent once, in delivery id order (= fire order).
    assert [s.delivery_id for s in sends] == sorted(rows)
    names = [orjson.loads(s.event)["arguments"]["timerName"] for s in sends]
    assert names == [f"t{i:03}" for i in range(n)]


def test_batches_of_a_pass_fire_each_timer_once_and_push_in_fire_order(engine: Engine) -> None:
    """On PostgreSQL a full batch commits in the committer thread while the next one is
    claimed and computed (its rows locked, the next claim skips them); the batch after waits
    for it to commit and push first. Either way: each timer fires once, and what a subscriber
    attached here is pushed comes in fire order, only once committed."""
    n = 95
    clock = _one_shots_due(engine, n)
    pushed: list[tuple[str, list[Any]]] = []
    loop, metrics = _fire_loop_sending_to(engine, clock, "a", pushed)
    loop.fire_pass()
    assert metrics.fires == n and metrics.batches == 10
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]  # the pass kept none
    _check_fired_once_and_pushed_in_order(engine, n, pushed)
    committer = {name for name, _ in pushed if name.startswith("fire-commit")}
    assert bool(committer) == (engine.dialect.name == "postgresql")


@pytest.mark.postgres
@pytest.mark.parametrize("first_commit", ["fails", "is slow"])
def test_a_handed_over_batch_commits_before_the_next_one(
    pg_engine: Engine, first_commit: str
) -> None:
    """The first batch's commit fails, or takes 0.3 s (a deferred trigger, once, at commit),
    while the batches after it are computed: none of them commits or pushes before it (a failed
    one rolls back the next, and the pass is retried), so every timer fires once, pushed in
    fire order."""
    first = (
        "RAISE EXCEPTION 'injected at commit'"
        if first_commit == "fails"
        else "PERFORM pg_sleep(0.3)"
    )
    with pg_engine.begin() as conn:
        conn.exec_driver_sql("CREATE SEQUENCE first_commit")
        conn.exec_driver_sql(
            "CREATE FUNCTION first_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF nextval('first_commit') = 1 THEN {first}; END IF; RETURN NULL; END $$"
        )
        conn.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER first_commit AFTER INSERT ON events "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION first_commit()"
        )
    n = 35
    clock = _one_shots_due(pg_engine, n)
    pushed: list[tuple[str, list[Any]]] = []
    loop, metrics = _fire_loop_sending_to(pg_engine, clock, "a", pushed)
    loop.fire_pass()
    assert loop.backoff.failures == 0 and metrics.fires == n
    _check_fired_once_and_pushed_in_order(pg_engine, n, pushed)
    with pg_engine.connect() as conn:
        # A trigger call for each event kept, and one for the failed commit.
        calls = conn.exec_driver_sql("SELECT last_value FROM first_commit").scalar()
    assert calls == (n + 1 if first_commit == "fails" else n)


@pytest.mark.postgres
def test_counts_on_two_lanes_of_one_thread_never_wait_for_each_other(pg_engine: Engine) -> None:
    """The fire loop computes a batch while the one before commits, and waits for it: were both
    to count on one shard, the one before could wait for a count row the one after holds (a
    deadlock the server cannot see). On two lanes they share no row; on one lane they do."""
    with transaction(pg_engine) as first:
        queries.add_timer_counts(first, {"scheduled": 1}, lane=0)
        with transaction(pg_engine) as second:
            second.exec_driver_sql("SET LOCAL lock_timeout = '200ms'")
            queries.add_timer_counts(second, {"scheduled": 1}, lane=1)
        with pytest.raises(Conflict, match="lock timeout"), transaction(pg_engine) as third:
            third.exec_driver_sql("SET LOCAL lock_timeout = '200ms'")
            queries.add_timer_counts(third, {"scheduled": 1}, lane=0)
    with transaction(pg_engine) as conn:
        assert queries.timer_counts(conn) == {"scheduled": 2}
