"""SQL of events and deliveries: the fire pass records them, the delivery pump reads and marks
them, acks and the purge end them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final, NamedTuple

from sqlalchemy import (
    Connection,
    delete,
    exists,
    select,
    update,
)

from program_timer.store.queries import driver
from program_timer.store.queries.batches import chunks
from program_timer.store.schema import deliveries, events, subscriptions


class Ids(NamedTuple):
    """Ids taken ahead (:func:`reserve_ids`)."""

    events: Sequence[int] = ()
    deliveries: Sequence[int] = ()


NONE_RESERVED: Final = Ids()


def reserve_ids(events_n: int, deliveries_n: int) -> driver.Statement:
    """PostgreSQL: the query that takes ids for about this many events and deliveries from the
    sequences (its one row: :class:`Ids`), sent in the fire batch's first round trip right after
    its claim, so that the batch's writes wait for no answer of their own. Taken after the
    claim, like :func:`allocate_ids`: a later fire of the same timer is claimed only once this
    one has committed, so its ids are larger (fire order). Ids left unused are skipped: a
    sequence has gaps anyway."""
    return driver.Statement(_NEXT_IDS, (events_n, deliveries_n))


def allocate_ids(
    conn: Connection, events_n: int, deliveries_n: int, reserved: Ids = NONE_RESERVED
) -> tuple[list[int], list[int]]:
    """Ids for ``events_n`` new events and ``deliveries_n`` new deliveries, in one query, so
    that they are inserted without ``RETURNING`` (and a delivery's row names its event's id).
    PostgreSQL: from the tables' sequences, the ``reserved`` ones first (the query runs only
    for what they lack). SQLite: the transaction holds the database's write lock (``BEGIN
    IMMEDIATE``), so the ids after the current maxima are ours; a delivery's after the largest
    the table ever held (``sqlite_sequence``: migration 0005), so that an id is never given
    again once its delivery is deleted (a late ack naming it would ack another)."""
    if conn.dialect.name == "postgresql":
        event_ids = list(reserved.events[:events_n])
        delivery_ids = list(reserved.deliveries[:deliveries_n])
        more = (events_n - len(event_ids), deliveries_n - len(delivery_ids))
        if more != (0, 0):
            ((more_events, more_deliveries),) = driver.fetch(conn, _NEXT_IDS, more)
            event_ids += more_events
            delivery_ids += more_deliveries
        return event_ids, delivery_ids
    ((top_event, top_delivery),) = driver.fetch(conn, _MAX_IDS)
    return (
        list(range(top_event + 1, top_event + 1 + events_n)),
        list(range(top_delivery + 1, top_delivery + 1 + deliveries_n)),
    )


_NEXT = "ARRAY(SELECT nextval(pg_get_serial_sequence('{}', 'id')) FROM generate_series(1, ?))"
_NEXT_IDS: Final = f"SELECT {_NEXT.format(events.name)}, {_NEXT.format(deliveries.name)}"
_MAX_IDS: Final = (
    f"SELECT (SELECT coalesce(max(id), 0) FROM {events.name}), "
    f"max((SELECT coalesce(max(id), 0) FROM {deliveries.name}), "
    f"coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{deliveries.name}'), 0))"
)


def insert_events(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Rows carry their ``id`` (see :func:`allocate_ids`)."""
    driver.insert_dicts(conn, events, rows)


def insert_deliveries(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    driver.insert_dicts(conn, deliveries, rows)


def insert_fired_deliveries(
    conn: Connection,
    rows: Sequence[tuple[int, int, str, int]],
    *,
    now: datetime,
    resend_at: datetime,
) -> None:
    """A fire batch's deliveries, ``(delivery id, event id, subscription, sent)`` each, in
    one statement whatever their number. Sent ones (``sent`` 1: the batch pushes them itself
    once committed) are written as sent once: ``attempt`` 1, ``sent_at`` now, due again at
    ``resend_at``; the others (0) wait for the pump: ``attempt`` 0, due now.

    The rows go as one parameter, a JSON array (``json_each`` on SQLite,
    ``json_array_elements`` on PostgreSQL): the constant columns are bound once, not once a
    row, and no row is converted in Python. On SQLite that is a third less time per row than
    ``executemany`` (the driver binds and steps each row); on PostgreSQL JSON text is made in C,
    where psycopg dumps arrays element by element in Python."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        driver.execute(conn, _FIRED_SQLITE, (resend_at, now, now, now, driver.json_dumps(rows)))
        return
    if len(rows) <= driver.PIPELINE_ROWS:
        # A few rows (a steady rate: one fire a batch): a plain INSERT, planned once and
        # prepared by psycopg, is cheaper than expanding the JSON (measured on one row).
        driver.insert_rows(
            conn,
            deliveries,
            _FIRED_ROW,
            [(d, e, s, a, resend_at if a else now, now if a else None, now) for d, e, s, a in rows],
        )
        return
    driver.execute(conn, _FIRED_POSTGRES, (resend_at, now, now, now, driver.json_dumps(rows)))


_FIRED_ROW: Final = (
    "id",
    "event_id",
    "subscription_id",
    "attempt",
    "next_attempt_at",
    "sent_at",
    "created_at",
)
_FIRED_COLUMNS: Final = f"INSERT INTO {deliveries.name} ({', '.join(_FIRED_ROW)}) "
_FIRED_SQLITE: Final = _FIRED_COLUMNS + (
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "json_extract(value, '$[2]'), json_extract(value, '$[3]'), "
    "CASE WHEN json_extract(value, '$[3]') THEN ? ELSE ? END, "
    "CASE WHEN json_extract(value, '$[3]') THEN ? END, ? FROM json_each(?)"
)
_FIRED_POSTGRES: Final = _FIRED_COLUMNS + (
    "SELECT (r->>0)::bigint, (r->>1)::bigint, r->>2, (r->>3)::int, "
    "CASE WHEN r->>3 = '1' THEN ?::timestamptz ELSE ?::timestamptz END, "
    "CASE WHEN r->>3 = '1' THEN ?::timestamptz END, ? FROM json_array_elements(?::json) AS r"
)


# Pending: neither acked nor dead. Both are columns of ix_deliveries_pending, before ``id``: a
# subscription's pending deliveries are one range of it, in id order, and its dead ones another.
PENDING_ORDER = (
    deliveries.c.subscription_id,
    deliveries.c.acked_at,
    deliveries.c.dead_at,
    deliveries.c.id,
)
_MAX_DOUBLINGS: Final = 60  # 2**60 times any ack timeout is past any cap: no float overflow


def resend_delay(attempt: int, ack_timeout: float, retry_max_delay: float) -> float:
    """How long a delivery sent for the ``attempt``-th time (1: the first send) waits for its
    ack before it is sent again: the ack timeout, doubling with every send, at most
    ``retry_max_delay`` (never less than the ack timeout: the first resend always waits that)."""
    doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
    return min(ack_timeout * 2.0**doublings, max(retry_max_delay, ack_timeout))


class DueDelivery(NamedTuple):
    """A pending delivery that may be sent now, with what its event message carries."""

    id: int
    attempt: int
    external_event_id: str
    persona_id: str
    connector_idn: str
    command_act_id: str
    arguments: dict[str, str]


_DUE_COLUMNS: Final = (
    deliveries.c.id,
    deliveries.c.attempt,
    events.c.external_event_id,
    events.c.persona_id,
    events.c.connector_idn,
    events.c.command_act_id,
    events.c.arguments,
)
_DUE_SQL: Final = (
    f"SELECT {', '.join(f'{c.table.name}.{c.name}' for c in _DUE_COLUMNS)} "
    "FROM deliveries JOIN events ON events.id = deliveries.event_id "
    "WHERE deliveries.subscription_id = ? AND deliveries.acked_at IS NULL "
    "AND deliveries.dead_at IS NULL AND deliveries.next_attempt_at <= ? "
    f"ORDER BY {', '.join(f'deliveries.{c.name}' for c in PENDING_ORDER)} LIMIT ?"
)


def due_deliveries(
    conn: Connection, subscription_id: str, now: datetime, limit: int
) -> list[DueDelivery]:
    """Pending deliveries of a subscription that may be sent now, in fire order (plain SQL
    through the driver: the refill runs it for every lagging subscription).

    Ordered like ``ix_deliveries_pending`` (``subscription_id``, ``acked_at`` and ``dead_at``
    are fixed by the filter, so this is the order of ``id``): PostgreSQL then reads that index
    in order and stops at ``limit`` (0.1 ms at 20,000 pending). Ordered by ``id`` alone it sorts
    every pending delivery, or walks the primary key through the acked ones (3 to 20 ms).
    Statistics taken while almost nothing was pending still mislead it into the sort. Dead
    deliveries are outside the range: however many there are, they cost a refill nothing.
    """
    return due_deliveries_of(conn, {subscription_id: limit}, now)[subscription_id]


def due_deliveries_of(
    conn: Connection, limits: Mapping[str, int], now: datetime
) -> dict[str, list[DueDelivery]]:
    """:func:`due_deliveries` of several subscriptions (id → limit), in one round trip on
    PostgreSQL in a pipeline (the refill's)."""
    at = driver.param(conn, now)
    readers = driver.column_readers(conn, _DUE_COLUMNS)
    statements = [driver.Statement(_DUE_SQL, (sid, at, n), readers) for sid, n in limits.items()]
    found = driver.fetch_many(conn, statements)
    return {
        sid: [DueDelivery._make(row) for row in rows]
        for sid, rows in zip(limits, found, strict=True)
    }


def mark_sent(
    conn: Connection,
    sent: Sequence[tuple[int, int]],
    sent_at: datetime,
    *,
    ack_timeout: float,
    retry_max_delay: float,
) -> None:
    """Record that these deliveries are being sent: ``sent`` holds (delivery id, its attempt
    before this send). Each gets one more ``attempt`` (persisted before the push, so that it
    counts up across reconnects, restarts and crashes) and is not sendable again before its
    resend wait has passed (:func:`resend_delay`: the ack timeout after the first send, twice
    that after the second, ... up to ``retry_max_delay``). One statement per attempt number
    in the batch (usually one: first sends)."""
    by_attempt: dict[int, list[int]] = {}
    for delivery_id, attempt in sent:
        by_attempt.setdefault(attempt + 1, []).append(delivery_id)
    sql = driver.in_list(conn, _MARK_SENT)
    for attempt, ids in by_attempt.items():
        resend_at = sent_at + timedelta(seconds=resend_delay(attempt, ack_timeout, retry_max_delay))
        driver.execute(conn, sql, (sent_at, resend_at, driver.id_list_param(conn, ids)))


_MARK_SENT: Final = (
    "UPDATE deliveries SET attempt = attempt + 1, sent_at = ?, next_attempt_at = ? WHERE id IN ?*"
)


def mark_dead(conn: Connection, delivery_ids: Sequence[int], now: datetime) -> int:
    """These pending deliveries become dead letters (their attempts are spent): never sent
    again, kept and counted until redelivered or purged. How many did."""
    dead = 0
    for chunk in chunks(delivery_ids):
        dead += conn.execute(
            update(deliveries)
            .where(
                deliveries.c.id.in_(chunk),
                deliveries.c.acked_at.is_(None),
                deliveries.c.dead_at.is_(None),
            )
            .values(dead_at=now)
        ).rowcount
    return dead


def ack_deliveries(
    conn: Connection, delivery_ids: Sequence[int], subscription_ids: Sequence[str], now: datetime
) -> list[int]:
    """Ack the given deliveries of these subscriptions; returns the ids really acked now. The
    subscriptions that had one acked get ``last_ack_at = now`` (to the second).

    An acked delivery is deleted. Nothing reads it afterwards (the ``deliveries`` op, the
    counts, the pump and the purge look at pending and dead ones), and a ``DELETE`` costs the
    database a fraction of an ``UPDATE`` that sets ``acked_at``, a column of two indexes (so the
    new row version goes into every index of the table): on PostgreSQL 1 WAL record a row
    against 6, and an eighth of the time (``EXPLAIN ANALYZE`` of 333 acks: 0.8 against
    6.8 ms). Its id is never given to another delivery (:func:`allocate_ids`), so a late or
    repeated ack naming it acks nothing. Rows with ``acked_at`` set were acked by a daemon of
    before 2026-12-03; the purge ends them after an hour.

    The rows are found by primary key only, in a materialized CTE, and checked (subscription,
    not acked yet) there: any filter on ``acked_at`` or ``subscription_id`` in the statement
    itself lets PostgreSQL, with statistics from a time when little was pending (the usual
    case at the start of a burst), scan every pending delivery through ``ix_deliveries_acked``
    or ``ix_deliveries_pending`` for each ack: milliseconds per ack at 20,000 pending, and
    200 ms with the check repeated outside the CTE. Without that recheck, a concurrent ack of
    the same row (another daemon, READ COMMITTED) is applied twice: harmless. A dead delivery
    that is acked (it was in flight when it died) counts as acked.
    """
    if not subscription_ids:
        return []
    acked: list[int] = []
    acking: set[str] = set()
    subs = driver.list_param(conn, subscription_ids)
    # PostgreSQL: the transaction's BEGIN goes out with the first statement (a round trip fewer).
    with driver.pipeline(conn):
        ids = driver.id_list_param(conn, delivery_ids)
        for delivery_id, subscription_id in driver.fetch(
            conn, driver.in_list(conn, _ACK), (ids, subs)
        ):
            acked.append(delivery_id)
            acking.add(subscription_id)
        if acking:
            # At most one write a second per subscription, not one per ack group.
            driver.execute(
                conn,
                driver.in_list(conn, _LAST_ACK),
                (now, driver.list_param(conn, sorted(acking)), now - timedelta(seconds=1)),
            )
    return acked


# Plain SQL through the driver: one statement for any number of ids (an ack names one read's
# worth, up to hundreds; the ids are one parameter, so no chunks), where Core built, compiled
# and bound an expanding IN each time.
_ACK: Final = (
    "WITH named AS MATERIALIZED "
    "(SELECT id, subscription_id, acked_at FROM deliveries WHERE id IN ?*) "
    "DELETE FROM deliveries WHERE id IN "
    "(SELECT id FROM named WHERE subscription_id IN ?* AND acked_at IS NULL) "
    "RETURNING id, subscription_id"
)
_LAST_ACK: Final = (
    "UPDATE subscriptions SET last_ack_at = ? WHERE subscription_id IN ?* "
    "AND (last_ack_at IS NULL OR last_ack_at < ?)"
)


def release_unacked(conn: Connection, subscription_ids: Sequence[str], now: datetime) -> None:
    """Make a subscription's in-flight deliveries sendable at once (it reconnected). Those
    never sent, or whose resend wait passed, are sendable already: left alone; dead ones too."""
    if subscription_ids:
        conn.execute(
            update(deliveries)
            .where(
                deliveries.c.subscription_id.in_(list(subscription_ids)),
                deliveries.c.acked_at.is_(None),
                deliveries.c.dead_at.is_(None),
                deliveries.c.next_attempt_at > now,
            )
            .values(next_attempt_at=now)
        )


def subscription_ids(conn: Connection) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            select(subscriptions.c.subscription_id).order_by(subscriptions.c.subscription_id)
        )
    ]


# --- retention --------------------------------------------------------------------------------


def _expired_window(expired_before: datetime, expired_after: datetime | None) -> list[Any]:
    window = [events.c.fired_at < expired_before]
    if expired_after is not None:
        window.append(events.c.fired_at >= expired_after)
    return window


def expire_pending(
    conn: Connection,
    expired_before: datetime,
    now: datetime,
    *,
    expired_after: datetime | None = None,
) -> int:
    """Pending deliveries of events fired before ``expired_before`` (the retention) become
    dead letters: kept and counted, never silently dropped. ``expired_after`` bounds the events
    looked at (those of the previous purge were done then). How many did."""
    old = select(events.c.id).where(*_expired_window(expired_before, expired_after))
    return conn.execute(
        update(deliveries)
        .where(
            deliveries.c.event_id.in_(old),
            deliveries.c.acked_at.is_(None),
            deliveries.c.dead_at.is_(None),
        )
        .values(dead_at=now)
    ).rowcount


def purge_deliveries_and_events(
    conn: Connection,
    acked_before: datetime,
    expired_before: datetime,
    *,
    expired_after: datetime | None = None,
) -> tuple[int, int]:
    """Delete what outlived its keeping; (deliveries, events) deleted.

    - deliveries acked before ``acked_before`` (by a daemon of before 2026-12-03: acks delete
      them now);
    - dead deliveries dead before ``expired_before``: a dead letter is kept one retention
      after it died (one range of ``ix_deliveries_pending`` per subscription);
    - the acked deliveries of events fired before ``expired_before``, and those events once
      no delivery holds them: an event with a dead delivery stays as long as that delivery
      (call :func:`expire_pending` first: pending deliveries of expired events become dead).

    ``expired_after`` bounds the expired events looked at to those not seen by the previous
    purge (the events of purged dead letters are always looked at).
    """
    purged = conn.execute(delete(deliveries).where(deliveries.c.acked_at < acked_before)).rowcount
    freed: set[int] = set()
    for sid in subscription_ids(conn):
        gone = conn.execute(
            delete(deliveries)
            .where(
                deliveries.c.subscription_id == sid,
                deliveries.c.acked_at.is_(None),
                deliveries.c.dead_at < expired_before,
            )
            .returning(deliveries.c.event_id)
        )
        ids = [r[0] for r in gone]
        purged += len(ids)
        freed.update(ids)
    window = _expired_window(expired_before, expired_after)
    old = select(events.c.id).where(*window)
    purged += conn.execute(
        delete(deliveries).where(deliveries.c.event_id.in_(old), deliveries.c.acked_at.is_not(None))
    ).rowcount
    unheld = ~exists().where(deliveries.c.event_id == events.c.id)
    expired = conn.execute(delete(events).where(*window, unheld)).rowcount
    for chunk in chunks(sorted(freed)):
        expired += conn.execute(
            delete(events).where(events.c.id.in_(chunk), events.c.fired_at < expired_before, unheld)
        ).rowcount
    return purged, expired
