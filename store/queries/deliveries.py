"""SQL of events and deliveries: the fire pass records them, the delivery pump reads and marks
them, acks and the purge end them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection, Row, delete, func, select, text, update

from program_timer.store.queries import driver
from program_timer.store.queries.batches import chunks
from program_timer.store.schema import deliveries, events, subscriptions


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
    columns = tuple(rows[0])
    if conn.dialect.name != "postgresql":
        driver.insert_rows(conn, events, columns, [tuple(r[c] for c in columns) for r in rows])
        return
    json_at = columns.index("arguments")
    raw: Any = conn.connection.dbapi_connection  # psycopg's own connection: it has COPY
    with raw.cursor() as cur, cur.copy(f"COPY events ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            values = [row[c] for c in columns]
            values[json_at] = Jsonb(values[json_at])
            copy.write_row(values)


def insert_deliveries(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        columns = tuple(rows[0])
        driver.insert_rows(conn, deliveries, columns, [tuple(r[c] for c in columns) for r in rows])


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


def mark_sent(
    conn: Connection, delivery_ids: Sequence[int], sent_at: datetime, next_attempt_at: datetime
) -> None:
    """Record that these deliveries are being sent: one more ``attempt`` (persisted before the
    push, so that it counts up across reconnects, restarts and crashes), and not sendable
    again before ``next_attempt_at`` (the ack timeout). One statement for the whole batch."""
    for chunk in chunks(delivery_ids):
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(chunk))
            .values(
                attempt=deliveries.c.attempt + 1,
                sent_at=sent_at,
                next_attempt_at=next_attempt_at,
            )
        )


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
    for chunk in chunks(delivery_ids):
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
