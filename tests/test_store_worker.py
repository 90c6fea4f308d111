"""The store worker's grouped calls (acks, refills, subscriptions, status), on SQLite and
PostgreSQL: calls queued together share one transaction, a failing call fails alone, a command
ends the group, and only a group of non-durable calls commits without waiting for the disk."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select

from program_timer.core.clock import SystemClock
from program_timer.scheduler.commands import CommandSettings
from program_timer.scheduler.protocol import (
    CommandRequest,
    decode_line,
)
from program_timer.scheduler.worker import CONFLICT_RETRIES, StoreWorker
from program_timer.store import queries
from program_timer.store.errors import Conflict
from program_timer.store.queries import driver
from program_timer.store.schema import subscriptions

NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def worker(engine: Engine) -> Iterator[StoreWorker]:
    w = StoreWorker(engine, CommandSettings(), SystemClock())
    w.start()
    yield w
    w.stop()


def _blocked(worker: StoreWorker) -> threading.Event:
    """Occupy the worker until the returned event is set, so that what is queued meanwhile is
    taken together."""
    started, release = threading.Event(), threading.Event()

    def block(conn: Connection) -> None:
        started.set()
        assert release.wait(10)

    worker.call(block)
    assert started.wait(10)
    return release


def _subscription(sid: str, runs: list[str] | None = None) -> Callable[[Connection], Connection]:
    def create(conn: Connection) -> Connection:
        if runs is not None:
            runs.append(sid)
        values = {
            "subscription_id": sid,
            "flow_instance_id": sid,
            "filter_connector_idn": None,
            "filter_persona_id": None,
            "created_at": NOW,
            "attached_to": None,
            "attached_at": None,
        }
        assert queries.upsert_subscription(conn, values)  # a second run would not create it
        return conn

    return create


def _subscription_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(subscriptions.c.subscription_id)).scalars())


def _result(fut: Future[Any]) -> Any:
    return fut.result(timeout=10)


def test_calls_queued_together_share_one_transaction(worker: StoreWorker, engine: Engine) -> None:
    def subscription_in(sid: str) -> Callable[[Connection], Any]:
        def create(conn: Connection) -> Any:
            _subscription(sid)(conn)
            return conn.get_transaction()

        return create

    release = _blocked(worker)
    futures = [worker.call(subscription_in(f"s{i}"), durable=i % 2 == 0) for i in range(3)]
    release.set()
    transactions = [_result(f) for f in futures]
    assert transactions[0] is not None
    assert transactions[0] is transactions[1] is transactions[2]  # one transaction
    assert _subscription_ids(engine) == ["s0", "s1", "s2"]
    alone = _result(worker.call(lambda c: c.get_transaction()))
    assert alone is not None and alone is not transactions[0]


def test_a_failing_call_does_not_fail_the_others_of_its_group(
    worker: StoreWorker, engine: Engine
) -> None:
    def bad(conn: Connection) -> None:
        raise ValueError("a bug in one call")

    runs: list[str] = []
    release = _blocked(worker)
    first = worker.call(_subscription("before", runs), durable=False)
    failing = worker.call(bad, durable=False)
    last = worker.call(_subscription("after", runs), durable=False)
    release.set()
    _result(first)
    _result(last)
    with pytest.raises(ValueError, match="a bug in one call"):
        _result(failing)
    # Run as a group first (rolled back when the bad call raised), then each on its own: the
    # rows are there once each (the insert of a second run would conflict with the first).
    assert runs == ["before", "before", "after"]
    assert _subscription_ids(engine) == ["after", "before"]
    assert worker.available


def test_a_command_ends_the_group_and_keeps_its_place(worker: StoreWorker, engine: Engine) -> None:
    line = json.dumps(
        {
            "op": "command",
            "id": 1,
            "commandIdn": "set_timer",
            "integrationIdn": "program_timer",
            "connectorIdn": "c",
            "arguments": {"personaId": "p", "timerName": "t", "interval": "60"},
        }
    ).encode()
    _, request = decode_line(line)
    assert isinstance(request, CommandRequest)

    def timer_seen(conn: Connection) -> tuple[Any, bool]:
        return conn.get_transaction(), queries.get_timer(conn, "p", "t") is not None

    release = _blocked(worker)
    before = worker.call(timer_seen)
    command = worker.commands([request])
    after = worker.call(timer_seen)
    release.set()
    transaction_before, seen_before = _result(before)
    assert [outcome.error for outcome in _result(command)] == [None]
    transaction_after, seen_after = _result(after)
    assert (seen_before, seen_after) == (False, True)
    assert transaction_before is not transaction_after


def test_only_a_group_of_non_durable_calls_commits_without_waiting(
    worker: StoreWorker, engine: Engine
) -> None:
    if engine.dialect.name != "postgresql":
        # SQLite: every call commits durably (synchronous=FULL); nothing to relax.
        assert _result(worker.call(lambda c: 1, durable=False)) == 1
        return

    def setting(conn: Connection) -> str:
        return str(conn.exec_driver_sql("SHOW synchronous_commit").scalar())

    assert _result(worker.call(setting, durable=False)) == "off"
    assert _result(worker.call(setting)) == "on"
    release = _blocked(worker)
    mixed = [worker.call(setting, durable=False), worker.call(setting)]
    release.set()
    assert [_result(f) for f in mixed] == ["on", "on"]
    # SET LOCAL: the worker's connection is back to synchronous commits afterwards.
    assert _result(worker.call(setting)) == "on"


def test_a_call_whose_statement_fails_late_fails_alone(worker: StoreWorker, engine: Engine) -> None:
    # On PostgreSQL a group runs in one pipeline: a statement sent through the driver is not
    # answered before a later read or the COMMIT, so its error comes out during the next call
    # (here the SQLAlchemy statement of "after") or at the group's end. The group is then run
    # call by call, and only the call that sent the statement fails.
    def bad(conn: Connection) -> None:
        driver.execute(conn, "INSERT INTO subscriptions (subscription_id) VALUES (NULL)", ())

    runs: list[str] = []
    release = _blocked(worker)
    failing = worker.call(bad, durable=False)
    last = worker.call(_subscription("after", runs), durable=False)
    release.set()
    _result(last)
    with pytest.raises(Conflict, match=r"(?i)not.null"):  # a constraint: retried, then alone
        _result(failing)
    if engine.dialect.name == "postgresql":
        # Its error came out in "after": the group failed with it at each try, then ran alone.
        assert runs == ["after"] * (CONFLICT_RETRIES + 1)
    else:
        assert runs == ["after"]  # SQLite: the statement failed in "bad", before "after" ran
    assert _subscription_ids(engine) == ["after"]
    alone = worker.call(bad, durable=False)  # on its own: its error comes out of the COMMIT
    with pytest.raises(Conflict, match=r"(?i)not.null"):
        _result(alone)
    assert _result(worker.call(lambda c: 1)) == 1  # and the worker's connection is usable


def test_a_refill_reads_which_subscriptions_moved_with_their_due_deliveries(
    worker: StoreWorker, engine: Engine
) -> None:
    # The refill's two reads (which wanted subscriptions another daemon took, the due
    # deliveries of each) are one round trip on PostgreSQL: the first is read after the second.
    with engine.begin() as conn:
        for sid, daemon in (("here", "d1"), ("away", "d2")):
            _subscription(sid)(conn)
            conn.execute(
                subscriptions.update()
                .where(subscriptions.c.subscription_id == sid)
                .values(attached_to=daemon)
            )

    def refill_reads(conn: Connection) -> tuple[set[str], dict[str, list[Any]]]:
        moved = queries.attached_elsewhere_later(conn, ["here", "away", "gone"], "d1")
        due = queries.due_deliveries_of(conn, {"here": 5, "away": 5}, NOW)
        return moved(), due

    assert _result(worker.call(refill_reads, durable=False)) == (
        {"away", "gone"},
        {"here": [], "away": []},
    )


def _request(command: str, **arguments: Any) -> CommandRequest:
    line = json.dumps(
        {
            "op": "command",
            "id": 1,
            "commandIdn": command,
            "integrationIdn": "program_timer",
            "connectorIdn": "c",
            "arguments": arguments,
        }
    ).encode()
    _, request = decode_line(line)
    assert isinstance(request, CommandRequest)
    return request


def test_groups_that_only_read_and_groups_that_write_take_turns_on_the_kept_connection(
    worker: StoreWorker, engine: Engine
) -> None:
    """The worker keeps its connection from one group to the next while work comes: a group
    that only reads (on PostgreSQL, in autocommit mode without a transaction) leaves it ready
    for a group that writes, and the other way round; once the worker stops, the connection is
    back in the pool."""
    groups = [
        [_request("list_timers", personaId="p")],
        [_request("set_timer", personaId="p", timerName="t", interval="60")],
        [_request("get_timer", personaId="p", timerName="t")],
        [_request("set_timer", personaId="p", timerName="u", interval="60")],
        [_request("delete_timer", personaId="p", timerName="t")],
        [_request("list_timers", personaId="p")],
    ]
    outcomes = [_result(worker.commands(group))[0] for group in groups]
    assert [outcome.error for outcome in outcomes] == [None] * len(groups)
    timers = _result(worker.call(lambda c: queries.list_timers(c, "p", None, 10)))
    assert [t.timer_name for t in timers] == ["u"]
    worker.stop()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
