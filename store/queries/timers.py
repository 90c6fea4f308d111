"""SQL of the timers table: what commands read and write, and what the fire pass claims."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection, Delete, Row, delete, func, literal_column, select

from program_timer.core.model import FIRED, Timer
from program_timer.store.queries import driver
from program_timer.store.queries.batches import chunks
from program_timer.store.queries.command_acts import acts_from_rows, acts_statements
from program_timer.store.queries.deliveries import Ids, reserve_ids
from program_timer.store.queries.subscriptions import (
    SUBSCRIPTION_FILTERS,
    SubscriptionFilter,
    subscription_filters,
)
from program_timer.store.schema import timer_counts as counts_table
from program_timer.store.schema import timers

# The Timer's fields are the table's columns (the schema is their one source), but one name.
_FIELD_OF: Final = {"interval_s": "interval"}
_PAIRS: Final = tuple((c.name, _FIELD_OF.get(c.name, c.name)) for c in timers.c)
TIMER_COLUMNS: Final = tuple(column for column, _ in _PAIRS if column != "id")
# Rows are read in the schema's column order: the Timer is built from them by position (the
# hot path of every command and fire batch), its fields taken in its own order.
_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Timer))
_POSITIONS: Final = tuple([name for _, name in _PAIRS].index(f) for f in _FIELDS)
_VALUES: Final = operator.attrgetter(*(name for column, name in _PAIRS if column != "id"))


def timer_from_row(row: Row[Any]) -> Timer:
    """A timer from a row whose columns are the table's, in the schema's order."""
    return _timer_from_values(row)


def _timer_from_values(row: Sequence[Any]) -> Timer:
    timer = Timer(*[row[i] for i in _POSITIONS])
    timer.arguments = dict(timer.arguments or {})
    return timer


def load_working_set(
    conn: Connection,
    keys: Sequence[tuple[str, str]],
    personas: Sequence[str],
    act_ids: Sequence[str],
) -> tuple[dict[tuple[str, str], Timer], dict[str, int], dict[str, dict[str, Any]]]:
    """What a command group reads before it applies its commands: the timers with these keys
    (one index probe per key), how many timers each of ``personas`` has, and the first replies
    of these ``commandActId``s. Plain SQL through the driver, all in one round trip on
    PostgreSQL (a pipeline: the transaction's ``BEGIN`` goes with them).

    The keys are joined as a relation ``k``: SQLite scans the whole table for a row-value
    ``IN``, and ``persona_id IN … AND timer_name IN …`` probes every combination. On SQLite
    ``k`` is a ``VALUES`` list; on PostgreSQL one JSON parameter, since psycopg parses again
    every time (in Python) a statement of more than 50 parameters.
    """
    statements = _timers_by_key(conn, list(dict.fromkeys(keys)))
    timer_queries = len(statements)
    unique = list(dict.fromkeys(personas))
    if unique:
        counting = driver.in_list(conn, _COUNT_SQL)
        statements.append(driver.Statement(counting, (driver.list_param(conn, unique),)))
    statements += acts_statements(conn, act_ids)
    with driver.pipeline(conn):
        results = driver.fetch_many(conn, statements)
    found: dict[tuple[str, str], Timer] = {}
    for rows in results[:timer_queries]:
        for row in rows:
            t = _timer_from_values(row)
            found[(t.persona_id, t.timer_name)] = t
    counts = dict.fromkeys(unique, 0)
    if unique:
        counts.update(dict(results[timer_queries]))
    acts = acts_from_rows(results[timer_queries + bool(unique) :])
    return found, counts, acts


def _timers_by_key(conn: Connection, keys: list[tuple[str, str]]) -> list[driver.Statement]:
    if not keys:
        return []
    if conn.dialect.name == "postgresql":
        json_keys = (driver.json_dumps(keys),)
        return [driver.select_statement(conn, timers, _KEYS_MATCH, json_keys, keys=_JSON_KEYS)]
    statements = []
    for chunk in chunks(keys):
        # Pad to a power of two (repeating the last key) so that only a few statement shapes
        # exist, each prepared once by the driver.
        chunk += [chunk[-1]] * ((1 << (len(chunk) - 1).bit_length()) - len(chunk))
        params = [value for key in chunk for value in key]
        keys_clause = _keys_clause(len(chunk))
        statements.append(
            driver.select_statement(conn, timers, _KEYS_MATCH, params, keys=keys_clause)
        )
    return statements


_KEYS_MATCH: Final = "timers.persona_id = k.p AND timers.timer_name = k.n"
_JSON_KEYS: Final = "WITH k(p, n) AS (SELECT r->>0, r->>1 FROM json_array_elements(?::json) AS r)"


@functools.cache
def _keys_clause(size: int) -> str:
    return f"WITH k(p, n) AS (VALUES {', '.join(['(?, ?)'] * size)})"


_COUNT_SQL: Final = (
    "SELECT persona_id, count(*) FROM timers WHERE persona_id IN ?* GROUP BY persona_id"
)


def get_timer(conn: Connection, persona_id: str, timer_name: str) -> Timer | None:
    row = conn.execute(
        select(timers).where(timers.c.persona_id == persona_id, timers.c.timer_name == timer_name)
    ).first()
    return timer_from_row(row) if row else None


def insert_timers(conn: Connection, new: Sequence[Timer]) -> None:
    driver.insert_rows(conn, timers, TIMER_COLUMNS, [_VALUES(t) for t in new])


def update_timers(conn: Connection, changed: Sequence[Timer]) -> None:
    driver.update_rows(conn, timers, TIMER_COLUMNS, [(*_VALUES(t), t.id) for t in changed])


def delete_timer_ids(conn: Connection, ids: Sequence[int]) -> None:
    if ids:
        sql = driver.in_list(conn, "DELETE FROM timers WHERE id IN ?*")
        driver.execute(conn, sql, (driver.id_list_param(conn, ids),))


def delete_persona_timers(conn: Connection, persona_id: str) -> int:
    """Delete a persona's timers; their states come back so that the counts stay exact."""
    states = conn.execute(
        delete(timers).where(timers.c.persona_id == persona_id).returning(timers.c.state)
    ).scalars()
    changes: dict[str, int] = {}
    for state in states:
        changes[state] = changes.get(state, 0) - 1
    add_timer_counts(conn, changes)
    return -sum(changes.values())


def list_timers(conn: Connection, persona_id: str, after: str | None, limit: int) -> list[Timer]:
    """A persona's timers by name, after ``after``, at most ``limit`` (plain SQL through the
    driver: SQLAlchemy's result processing of the seven datetime columns was most of a page's
    time, about 30 µs a timer; in a command group's pipeline it also stays in it)."""
    where, params = (
        (_LIST, (persona_id, limit)) if after is None else (_LIST_AFTER, (persona_id, after, limit))
    )
    (rows,) = driver.fetch_many(conn, [driver.select_statement(conn, timers, where, params)])
    return [_timer_from_values(r) for r in rows]


_LIST: Final = "persona_id = ? ORDER BY timer_name LIMIT ?"
_LIST_AFTER: Final = "persona_id = ? AND timer_name > ? ORDER BY timer_name LIMIT ?"


def next_due_at(conn: Connection) -> datetime | None:
    """When the earliest timer is due (plain SQL)."""
    rows = driver.fetch(conn, NEXT_DUE)
    return driver.read_datetime(conn, rows[0][0]) if rows else None


def next_due_later(conn: Connection) -> Callable[[], datetime | None]:
    """:func:`next_due_at`, read after the fire batch's pipeline has ended: the query travels
    with the batch's last round trip (:func:`~.driver.fetch_later`)."""
    rows = driver.fetch_later(conn, NEXT_DUE)
    return lambda: _first_due(conn, rows())


def _first_due(conn: Connection, rows: Sequence[Sequence[Any]]) -> datetime | None:
    return driver.read_datetime(conn, rows[0][0]) if rows else None


NEXT_DUE: Final = "SELECT due_at FROM timers WHERE due_at IS NOT NULL ORDER BY due_at LIMIT 1"


def claim_statement(conn: Connection, now: datetime, limit: int) -> driver.Statement:
    """:func:`claim_due`'s query of the due timers, through the partial ``ix_timers_due_at``
    (``due_at <= ?`` is never true of NULL: both databases know it implies the index's
    ``due_at IS NOT NULL``, whatever the parameter)."""
    lock = "" if conn.dialect.name == "sqlite" else " FOR UPDATE SKIP LOCKED"
    return driver.select_statement(
        conn,
        timers,
        f"due_at <= ? ORDER BY due_at LIMIT ?{lock}",
        (driver.param(conn, now), limit),
    )


def claim_due(
    conn: Connection, now: datetime, limit: int, reserve: tuple[int, int] = (0, 0)
) -> tuple[list[Timer], list[SubscriptionFilter], Ids]:
    """Lock and return up to ``limit`` due timers, oldest first, every subscription's filter
    (what the batch routes its events by), and on PostgreSQL ids for about ``reserve`` events
    and deliveries (:func:`~.deliveries.reserve_ids`): the queries in one round trip in a
    pipeline.

    On PostgreSQL the rows are locked ``FOR UPDATE SKIP LOCKED``: timers another daemon is firing
    are skipped, and the lock lasts until this transaction ends (commit, rollback, or the
    connection dying), so a dead daemon's claim is released by the server itself.
    """
    claim = claim_statement(conn, now, limit)
    if conn.dialect.name != "sqlite" and reserve != (0, 0):
        due, subs, ((event_ids, delivery_ids),) = driver.fetch_many(
            conn, [claim, SUBSCRIPTION_FILTERS, reserve_ids(*reserve)]
        )
        ids = Ids(event_ids, delivery_ids)
    else:
        due, subs = driver.fetch_many(conn, [claim, SUBSCRIPTION_FILTERS])
        ids = Ids()
    return [_timer_from_values(r) for r in due], subscription_filters(subs), ids


_FIRED_COLUMNS: Final = ("planned_at", "due_at", "state", "fire_count", "last_fired_at")


def update_fired(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Rows: ``_id``, ``planned_at``, ``due_at``, ``state``, ``fire_count``, ``last_fired_at``."""
    driver.update_rows(
        conn, timers, _FIRED_COLUMNS, [(*(r[c] for c in _FIRED_COLUMNS), r["_id"]) for r in rows]
    )


def complete_one_shots(conn: Connection, ids: Sequence[int], fired_at: datetime) -> None:
    """Mark fired one-shot timers completed, in one statement. Many ids go as one parameter:
    with one mark an id, psycopg parsed a 1,000-mark statement again for every batch of a
    burst (it caches statements of at most 50 parameters), and SQLite prepared one per length.
    A few (a steady rate) keep one mark each: a plain list of ids is cheaper to plan."""
    if not ids:
        return
    if len(ids) <= driver.PIPELINE_ROWS:  # a steady rate: marks are cheaper to plan than a list
        driver.execute(conn, _complete_sql(len(ids)), (FIRED, fired_at, *ids))
        return
    driver.execute(
        conn,
        driver.in_list(conn, _COMPLETE + "?*"),
        (FIRED, fired_at, driver.id_list_param(conn, ids)),
    )


_COMPLETE: Final = (
    "UPDATE timers SET planned_at = NULL, due_at = NULL, state = ?, "
    "fire_count = fire_count + 1, last_fired_at = ? WHERE id IN "
)


@functools.cache
def _complete_sql(n: int) -> str:
    return _COMPLETE + "(" + ", ".join(["?"] * n) + ")"


def purge_fired_timers(conn: Connection, before: datetime) -> int:
    """Delete the one-shot timers that fired before ``before``: the retention counts from the
    fire (a fire does not touch ``updated_at``, which is the last command's time)."""
    removed: int = conn.execute(purge_fired_statement(before)).rowcount
    add_timer_counts(conn, {FIRED: -removed})
    return removed


def purge_fired_statement(before: datetime) -> Delete:
    """:func:`purge_fired_timers`' statement. The state is a literal, not a parameter, so that
    both databases plan it on the partial index ``ix_timers_fired`` (fired timers only)."""
    return delete(timers).where(
        timers.c.state == literal_column(f"'{FIRED}'"),
        timers.c.last_fired_at < before,
    )


# Counts by state, kept (table timer_counts, migration 0004) -------------------------------

SHARDS: Final = 16
_thread = threading.local()
_shards = itertools.count(random.randrange(SHARDS))


def _shard(conn: Connection, lane: int) -> int:
    """This thread's shard of the counts: on PostgreSQL each writing thread adds to its own
    rows (a daemon's threads never share one; two daemons' rarely), so transactions running at
    once do not queue on a count. A thread with two transactions open at once (the fire loop:
    a batch is computed while the one before commits, and waits for it) writes them on two
    lanes, never on one shard: the one before never waits for a row the one after holds.
    SQLite has one writer at a time: one row per state."""
    if conn.dialect.name == "sqlite":
        return 0
    shard: int | None = getattr(_thread, "shard", None)
    if shard is None:
        shard = _thread.shard = next(_shards) % SHARDS
    return (shard + lane * (SHARDS // 2)) % SHARDS


def count_change(changes: dict[str, int], old: str | None, new: str | None) -> None:
    """Note in ``changes`` that a timer went from state ``old`` to ``new`` (None: no row)."""
    if old != new:
        if old is not None:
            changes[old] = changes.get(old, 0) - 1
        if new is not None:
            changes[new] = changes.get(new, 0) + 1


def add_timer_counts(conn: Connection, changes: Mapping[str, int], lane: int = 0) -> None:
    """Add ``changes`` (state -> delta) to the kept counts, in the caller's transaction: one
    statement, states in one order (two transactions never take the rows in opposite order);
    ``lane``: see :func:`_shard`."""
    rows = sorted((state, n) for state, n in changes.items() if n)
    if not rows:
        return
    shard = _shard(conn, lane)
    params = [v for state, n in rows for v in (state, shard, n)]
    driver.execute(conn, _upsert_counts(len(rows)), params)


@functools.cache
def _upsert_counts(n: int) -> str:
    values = ", ".join(["(?, ?, ?)"] * n)
    return (
        f"INSERT INTO {counts_table.name} (state, shard, n) VALUES {values} "
        "ON CONFLICT (state, shard) DO UPDATE SET n = timer_counts.n + excluded.n"
    )


def timer_counts(conn: Connection) -> dict[str, int]:
    """Timers by state: the kept counts (a few rows), never a count of the timers table."""
    stmt = select(counts_table.c.state, func.sum(counts_table.c.n)).group_by(counts_table.c.state)
    return {state: int(n) for state, n in conn.execute(stmt) if n}


def recount_timers(conn: Connection) -> dict[str, int]:
    """Timers by state counted from the timers table (tests compare it with the kept counts)."""
    stmt = select(timers.c.state, func.count()).group_by(timers.c.state)
    return {state: n for state, n in conn.execute(stmt)}
