"""Every SQL statement of program-timer. Functions take an open connection (one transaction)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import (
    Connection,
    Row,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.sql.elements import TextClause

from scheduler.rules import Timer
from store.schema import command_acts, daemons, deliveries, events, subscriptions, timers

# --- timers ---------------------------------------------------------------------------------

_TIMER_COLUMNS = (
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


def timer_from_row(row: Row[Any]) -> Timer:
    m = row._mapping
    return Timer(
        persona_id=m["persona_id"],
        timer_name=m["timer_name"],
        connector_idn=m["connector_idn"],
        fire_at=m["fire_at"],
        timezone=m["timezone"],
        interval=m["interval_s"],
        repeatable=bool(m["repeatable"]),
        enabled=bool(m["enabled"]),
        anchor_at=m["anchor_at"],
        planned_at=m["planned_at"],
        due_at=m["due_at"],
        state=m["state"],
        fire_count=m["fire_count"],
        last_fired_at=m["last_fired_at"],
        arguments=dict(m["arguments"] or {}),
        command_act_id=m["command_act_id"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        id=m["id"],
    )


def _timer_values(t: Timer) -> dict[str, Any]:
    return {
        "persona_id": t.persona_id,
        "timer_name": t.timer_name,
        "connector_idn": t.connector_idn,
        "fire_at": t.fire_at,
        "timezone": t.timezone,
        "interval_s": t.interval,
        "repeatable": t.repeatable,
        "enabled": t.enabled,
        "anchor_at": t.anchor_at,
        "planned_at": t.planned_at,
        "due_at": t.due_at,
        "state": t.state,
        "fire_count": t.fire_count,
        "last_fired_at": t.last_fired_at,
        "arguments": t.arguments,
        "command_act_id": t.command_act_id,
        "created_at": t.created_at,
        "updated_at": t.updated_at,
    }


def load_timers(conn: Connection, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Timer]:
    """The timers with these keys: one index probe per key.

    The keys are joined as a ``VALUES`` list: SQLite scans the whole table for a row-value
    ``IN``, and ``persona_id IN … AND timer_name IN …`` probes every combination.
    """
    ordered = list(dict.fromkeys(keys))
    found: dict[tuple[str, str], Timer] = {}
    for start in range(0, len(ordered), 512):
        chunk = ordered[start : start + 512]
        # Pad to a power of two (repeating the last key) so that only a few statement shapes
        # exist: each shape is compiled and cached by SQLAlchemy and by the driver.
        chunk += [chunk[-1]] * ((1 << (len(chunk) - 1).bit_length()) - len(chunk))
        params: dict[str, str] = {}
        for i, (persona, name) in enumerate(chunk):
            params[f"p{i}"] = persona
            params[f"n{i}"] = name
        for row in conn.execute(_load_statement(len(chunk)), params):
            t = timer_from_row(row)
            found[(t.persona_id, t.timer_name)] = t
    return found


@functools.cache
def _load_statement(size: int) -> TextClause:
    rows = ", ".join(f"(:p{i}, :n{i})" for i in range(size))
    return text(
        f"WITH k(p, n) AS (VALUES {rows}) SELECT timers.* FROM k JOIN timers "
        "ON timers.persona_id = k.p AND timers.timer_name = k.n"
    ).columns(*timers.c)  # type: ignore[return-value]


def get_timer(conn: Connection, persona_id: str, timer_name: str) -> Timer | None:
    row = conn.execute(
        select(timers).where(timers.c.persona_id == persona_id, timers.c.timer_name == timer_name)
    ).first()
    return timer_from_row(row) if row else None


def count_timers(conn: Connection, personas: Iterable[str]) -> dict[str, int]:
    personas = list(set(personas))
    counts = dict.fromkeys(personas, 0)
    for start in range(0, len(personas), 500):
        stmt = (
            select(timers.c.persona_id, func.count())
            .where(timers.c.persona_id.in_(personas[start : start + 500]))
            .group_by(timers.c.persona_id)
        )
        for persona, n in conn.execute(stmt):
            counts[persona] = n
    return counts


def insert_timers(conn: Connection, new: Sequence[Timer]) -> None:
    if new:
        conn.execute(insert(timers), [_timer_values(t) for t in new])


_UPDATE_TIMER = (
    update(timers)
    .where(timers.c.id == bindparam("_id"))
    .values({c: bindparam(c) for c in _TIMER_COLUMNS})
)


def update_timers(conn: Connection, changed: Sequence[Timer]) -> None:
    if changed:
        conn.execute(_UPDATE_TIMER, [{"_id": t.id, **_timer_values(t)} for t in changed])


def delete_timer_ids(conn: Connection, ids: Sequence[int]) -> None:
    if ids:
        conn.execute(delete(timers).where(timers.c.id.in_(list(ids))))


def delete_persona_timers(conn: Connection, persona_id: str) -> int:
    return conn.execute(delete(timers).where(timers.c.persona_id == persona_id)).rowcount


def list_timers(conn: Connection, persona_id: str, after: str | None, limit: int) -> list[Timer]:
    stmt = select(timers).where(timers.c.persona_id == persona_id)
    if after is not None:
        stmt = stmt.where(timers.c.timer_name > after)
    stmt = stmt.order_by(timers.c.timer_name).limit(limit)
    return [timer_from_row(r) for r in conn.execute(stmt)]


def next_due_at(conn: Connection) -> datetime | None:
    result: datetime | None = conn.execute(
        select(timers.c.due_at)
        .where(timers.c.due_at.is_not(None))
        .order_by(timers.c.due_at)
        .limit(1)
    ).scalar()
    return result


def claim_due(conn: Connection, now: datetime, limit: int) -> list[Timer]:
    """Lock and return up to ``limit`` due timers, oldest first.

    On PostgreSQL the rows are locked ``FOR UPDATE SKIP LOCKED``: timers another daemon is firing
    are skipped, and the lock lasts until this transaction ends (commit, rollback, or the
    connection dying), so a dead daemon's claim is released by the server itself.
    """
    stmt = (
        select(timers)
        .where(timers.c.due_at <= now)
        .order_by(timers.c.due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [timer_from_row(r) for r in conn.execute(stmt)]


_UPDATE_FIRED = (
    update(timers)
    .where(timers.c.id == bindparam("_id"))
    .values(
        planned_at=bindparam("planned_at"),
        due_at=bindparam("due_at"),
        state=bindparam("state"),
        fire_count=bindparam("fire_count"),
        last_fired_at=bindparam("last_fired_at"),
    )
)


def update_fired(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Rows: ``_id``, ``planned_at``, ``due_at``, ``state``, ``fire_count``, ``last_fired_at``."""
    if rows:
        conn.execute(_UPDATE_FIRED, list(rows))


def complete_one_shots(conn: Connection, ids: Sequence[int], fired_at: datetime) -> None:
    """Mark fired one-shot timers completed: one statement for the whole batch."""
    if ids:
        conn.execute(
            update(timers)
            .where(timers.c.id.in_(list(ids)))
            .values(
                planned_at=None,
                due_at=None,
                state="fired",
                fire_count=timers.c.fire_count + 1,
                last_fired_at=fired_at,
            )
        )


def purge_fired_timers(conn: Connection, before: datetime) -> int:
    stmt = delete(timers).where(
        timers.c.state == "fired",
        timers.c.updated_at < before,
    )
    return conn.execute(stmt).rowcount


def timer_counts(conn: Connection) -> dict[str, int]:
    return {
        state: n
        for state, n in conn.execute(select(timers.c.state, func.count()).group_by(timers.c.state))
    }


# --- events and deliveries ------------------------------------------------------------------


def allocate_event_ids(conn: Connection, n: int) -> list[int]:
    """Ids for ``n`` new events, so that they are inserted without ``RETURNING``.

    PostgreSQL: from the table's sequence, in one round trip. SQLite: the transaction holds the
    database's write lock (``BEGIN IMMEDIATE``), so the ids after the current maximum are ours.
    """
    if n <= 0:
        return []
    if conn.dialect.name == "postgresql":
        rows = conn.execute(
            text(
                "SELECT nextval(pg_get_serial_sequence('events', 'id')) FROM generate_series(1, :n)"
            ),
            {"n": n},
        )
        return [r[0] for r in rows]
    top = conn.execute(select(func.coalesce(func.max(events.c.id), 0))).scalar() or 0
    return list(range(top + 1, top + 1 + n))


def insert_events(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Rows carry their ``id`` (see :func:`allocate_event_ids`). On PostgreSQL they are
    written with ``COPY`` in the caller's transaction: one stream instead of a statement per
    row."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(insert(events), list(rows))
        return
    columns = list(rows[0])
    json_at = columns.index("arguments")
    raw = conn.connection.dbapi_connection
    assert raw is not None
    with raw.cursor() as cur, cur.copy(  # type: ignore[attr-defined]
        f"COPY events ({', '.join(columns)}) FROM STDIN"
    ) as copy:
        for row in rows:
            values = [row[c] for c in columns]
            values[json_at] = Jsonb(values[json_at])
            copy.write_row(values)


def insert_deliveries(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        conn.execute(insert(deliveries), list(rows))


def all_subscriptions(conn: Connection) -> list[Row[Any]]:
    return list(conn.execute(select(subscriptions)))


def get_subscription(conn: Connection, subscription_id: str) -> Row[Any] | None:
    return conn.execute(
        select(subscriptions).where(subscriptions.c.subscription_id == subscription_id)
    ).first()


def upsert_subscription(conn: Connection, values: dict[str, Any]) -> bool:
    """Create the subscription or update its flow instance and filter; True if created."""
    existing = get_subscription(conn, values["subscription_id"])
    if existing is None:
        conn.execute(insert(subscriptions).values(**values))
        return True
    conn.execute(
        update(subscriptions)
        .where(subscriptions.c.subscription_id == values["subscription_id"])
        .values(
            flow_instance_id=values["flow_instance_id"],
            filter_connector_idn=values["filter_connector_idn"],
            filter_persona_id=values["filter_persona_id"],
            attached_to=values["attached_to"],
            attached_at=values["attached_at"],
        )
    )
    return False


def detach_subscriptions(conn: Connection, subscription_ids: Sequence[str], daemon_id: str) -> None:
    if subscription_ids:
        conn.execute(
            update(subscriptions)
            .where(
                subscriptions.c.subscription_id.in_(list(subscription_ids)),
                subscriptions.c.attached_to == daemon_id,
            )
            .values(attached_to=None, attached_at=None)
        )


def detach_daemon(conn: Connection, daemon_id: str) -> None:
    conn.execute(
        update(subscriptions)
        .where(subscriptions.c.attached_to == daemon_id)
        .values(attached_to=None, attached_at=None)
    )


def attached_elsewhere(
    conn: Connection, subscription_ids: Sequence[str], daemon_id: str
) -> set[str]:
    """Those of the given subscriptions that are no longer attached to this daemon."""
    if not subscription_ids:
        return set()
    here = {
        r[0]
        for r in conn.execute(
            select(subscriptions.c.subscription_id).where(
                subscriptions.c.subscription_id.in_(list(subscription_ids)),
                subscriptions.c.attached_to == daemon_id,
            )
        )
    }
    return set(subscription_ids) - here


def delete_subscription(conn: Connection, subscription_id: str) -> bool:
    conn.execute(delete(deliveries).where(deliveries.c.subscription_id == subscription_id))
    return bool(
        conn.execute(
            delete(subscriptions).where(subscriptions.c.subscription_id == subscription_id)
        ).rowcount
    )


def due_deliveries(
    conn: Connection, subscription_id: str, now: datetime, limit: int
) -> list[Row[Any]]:
    """Pending deliveries of a subscription that may be sent now, in fire order.

    Ordered like ``ix_deliveries_pending`` (``subscription_id`` and ``acked_at`` are fixed by
    the filter, so this is the order of ``id``): PostgreSQL then reads that index in order and
    stops at ``limit`` (0.1 ms at 20,000 pending). Ordered by ``id`` alone it sorts every
    pending delivery, or walks the primary key through the acked ones (3 to 20 ms). Statistics
    taken while almost nothing was pending still mislead it into the sort.
    """
    stmt = (
        select(
            deliveries.c.id,
            deliveries.c.attempt,
            events.c.external_event_id,
            events.c.persona_id,
            events.c.connector_idn,
            events.c.command_act_id,
            events.c.arguments,
        )
        .join(events, events.c.id == deliveries.c.event_id)
        .where(
            deliveries.c.subscription_id == subscription_id,
            deliveries.c.acked_at.is_(None),
            deliveries.c.next_attempt_at <= now,
        )
        .order_by(deliveries.c.subscription_id, deliveries.c.acked_at, deliveries.c.id)
        .limit(limit)
    )
    return list(conn.execute(stmt))


def next_resend_at(conn: Connection, subscription_ids: Sequence[str]) -> datetime | None:
    if not subscription_ids:
        return None
    result: datetime | None = conn.execute(
        select(func.min(deliveries.c.next_attempt_at)).where(
            deliveries.c.subscription_id.in_(list(subscription_ids)),
            deliveries.c.acked_at.is_(None),
        )
    ).scalar()
    return result


def mark_sent(
    conn: Connection, delivery_ids: Sequence[int], sent_at: datetime, next_attempt_at: datetime
) -> None:
    """Record that these deliveries are being sent: one more ``attempt`` (persisted before the
    push, so that it counts up across reconnects, restarts and crashes), and not sendable
    again before ``next_attempt_at`` (the ack timeout). One statement for the whole batch."""
    for chunk in _id_chunks(delivery_ids):
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(chunk))
            .values(
                attempt=deliveries.c.attempt + 1,
                sent_at=sent_at,
                next_attempt_at=next_attempt_at,
            )
        )


def _id_chunks(ids: Sequence[int], size: int = 5000) -> Iterable[list[int]]:
    """``ids`` in lists short enough for one ``IN`` (SQLite binds at most 32,766 values)."""
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def ack_deliveries(
    conn: Connection, delivery_ids: Sequence[int], subscription_ids: Sequence[str], now: datetime
) -> list[int]:
    """Ack the given deliveries of these subscriptions; returns the ids really acked now.

    The rows are found by primary key only, in a materialized CTE, and checked (subscription,
    not acked yet) there: any filter on ``acked_at`` or ``subscription_id`` in the ``UPDATE``
    itself lets PostgreSQL, with statistics from a time when little was pending (the usual
    case at the start of a burst), scan every pending delivery through ``ix_deliveries_acked``
    or ``ix_deliveries_pending`` for each ack: milliseconds per ack at 20,000 pending, and
    200 ms with the check repeated outside the CTE. Without that recheck, a concurrent ack of
    the same row (another daemon, READ COMMITTED) is applied twice: harmless.
    """
    if not subscription_ids:
        return []
    acked: list[int] = []
    for chunk in _id_chunks(delivery_ids):
        named = (
            select(deliveries.c.id, deliveries.c.subscription_id, deliveries.c.acked_at)
            .where(deliveries.c.id.in_(chunk))
            .cte("named")
            .prefix_with("MATERIALIZED")
        )
        theirs = select(named.c.id).where(
            named.c.subscription_id.in_(list(subscription_ids)), named.c.acked_at.is_(None)
        )
        result = conn.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(theirs))
            .values(acked_at=now)
            .returning(deliveries.c.id)
        )
        acked.extend(r[0] for r in result)
    return acked


def release_unacked(conn: Connection, subscription_ids: Sequence[str], now: datetime) -> None:
    """Make a subscription's in-flight deliveries sendable at once (it reconnected). Those
    never sent, or whose ack timeout passed, are sendable already: left alone."""
    if subscription_ids:
        conn.execute(
            update(deliveries)
            .where(
                deliveries.c.subscription_id.in_(list(subscription_ids)),
                deliveries.c.acked_at.is_(None),
                deliveries.c.next_attempt_at > now,
            )
            .values(next_attempt_at=now)
        )


def delivery_figures(conn: Connection) -> dict[str, Any]:
    pending, oldest = conn.execute(
        select(func.count(), func.min(deliveries.c.created_at)).where(
            deliveries.c.acked_at.is_(None)
        )
    ).one()
    unrouted = conn.execute(select(func.count()).where(events.c.routed == 0)).scalar() or 0
    total_events = conn.execute(select(func.count()).select_from(events)).scalar() or 0
    subs = conn.execute(select(func.count()).select_from(subscriptions)).scalar() or 0
    return {
        "pending": pending,
        "oldest_pending_at": oldest,
        "unrouted_events": unrouted,
        "events": total_events,
        "subscriptions": subs,
    }


def purge_deliveries_and_events(
    conn: Connection, acked_before: datetime, expired_before: datetime
) -> tuple[int, int]:
    acked = conn.execute(delete(deliveries).where(deliveries.c.acked_at < acked_before)).rowcount
    old_events = select(events.c.id).where(events.c.fired_at < expired_before)
    conn.execute(delete(deliveries).where(deliveries.c.event_id.in_(old_events)))
    expired = conn.execute(delete(events).where(events.c.fired_at < expired_before)).rowcount
    return acked, expired


def events_of_timer(conn: Connection, persona_id: str, timer_name: str) -> list[Row[Any]]:
    return list(
        conn.execute(
            select(events)
            .where(and_(events.c.persona_id == persona_id, events.c.timer_name == timer_name))
            .order_by(events.c.id)
        )
    )


# --- command acts (idempotent retries) ------------------------------------------------------


def load_command_acts(conn: Connection, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    ids = list(set(ids))
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        stmt = select(command_acts.c.command_act_id, command_acts.c.reply).where(
            command_acts.c.command_act_id.in_(ids[start : start + 500])
        )
        for act_id, reply in conn.execute(stmt):
            found[act_id] = reply
    return found


def save_command_acts(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        conn.execute(insert(command_acts), list(rows))


def purge_command_acts(conn: Connection, before: datetime) -> int:
    return conn.execute(delete(command_acts).where(command_acts.c.created_at < before)).rowcount


# --- daemons --------------------------------------------------------------------------------


def register_daemon(conn: Connection, values: dict[str, Any]) -> None:
    conn.execute(delete(daemons).where(daemons.c.daemon_id == values["daemon_id"]))
    conn.execute(insert(daemons).values(**values))


def heartbeat(conn: Connection, daemon_id: str, now: datetime) -> None:
    conn.execute(update(daemons).where(daemons.c.daemon_id == daemon_id).values(heartbeat_at=now))


def forget_daemon(conn: Connection, daemon_id: str) -> None:
    conn.execute(delete(daemons).where(daemons.c.daemon_id == daemon_id))


def live_daemons(conn: Connection, since: datetime) -> list[Row[Any]]:
    return list(
        conn.execute(
            select(daemons).where(daemons.c.heartbeat_at >= since).order_by(daemons.c.started_at)
        )
    )


def purge_dead_daemons(conn: Connection, before: datetime) -> list[str]:
    dead = [
        r[0]
        for r in conn.execute(select(daemons.c.daemon_id).where(daemons.c.heartbeat_at < before))
    ]
    if dead:
        conn.execute(
            update(subscriptions)
            .where(subscriptions.c.attached_to.in_(dead))
            .values(attached_to=None, attached_at=None)
        )
        conn.execute(delete(daemons).where(daemons.c.daemon_id.in_(dead)))
    return dead
