"""SQL of what operators see and do with deliveries: the figures of `status` and the metrics,
each read as ranges of ``ix_deliveries_pending`` (never a count over the whole table), the
listings of the admin ops, redelivery of dead letters, and the replay of stored events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    Connection,
    Row,
    Select,
    and_,
    func,
    literal_column,
    or_,
    select,
    update,
)

from program_timer.store.queries.batches import chunks
from program_timer.store.queries.deliveries import (
    PENDING_ORDER,
    insert_deliveries,
    subscription_ids,
)
from program_timer.store.schema import deliveries, events

# --- figures: per subscription, each a range of ix_deliveries_pending -----------------------


def delivery_counts(conn: Connection, subscription_id: str) -> tuple[int, int, datetime | None]:
    """(pending, dead, when the oldest pending one was created) of one subscription.

    Two reads of its unacked range of ``ix_deliveries_pending``: the counts (``dead_at`` is in
    the index, so PostgreSQL can answer from the index alone), then the first pending row."""
    unacked = (
        deliveries.c.subscription_id == subscription_id,
        deliveries.c.acked_at.is_(None),
    )
    total, dead = conn.execute(
        select(func.count(), func.count(deliveries.c.dead_at)).where(*unacked)
    ).one()
    oldest = conn.execute(
        select(deliveries.c.created_at)
        .where(*unacked, deliveries.c.dead_at.is_(None))
        .order_by(*PENDING_ORDER)
        .limit(1)
    ).scalar()
    return total - dead, dead, oldest


def inflight_count(conn: Connection, subscription_id: str, now: datetime) -> int:
    """Pending deliveries of a subscription that were sent and whose resend wait has not
    passed: awaiting an ack. (Reads the pending rows: an admin figure, not a gauge.)"""
    return (
        conn.execute(
            select(func.count()).where(
                deliveries.c.subscription_id == subscription_id,
                deliveries.c.acked_at.is_(None),
                deliveries.c.dead_at.is_(None),
                deliveries.c.attempt > 0,
                deliveries.c.next_attempt_at > now,
            )
        ).scalar()
        or 0
    )


def pending_figures(conn: Connection) -> dict[str, Any]:
    """Pending and dead deliveries of all subscriptions, and the oldest pending one's creation
    time: one range read per subscription, never a scan of the table (``/metrics``)."""
    pending = dead = 0
    oldest: datetime | None = None
    subs = subscription_ids(conn)
    for sid in subs:
        p, d, o = delivery_counts(conn, sid)
        pending += p
        dead += d
        if o is not None and (oldest is None or o < oldest):
            oldest = o
    return {
        "pending": pending,
        "dead": dead,
        "oldest_pending_at": oldest,
        "subscriptions": len(subs),
    }


def delivery_figures(conn: Connection) -> dict[str, Any]:
    """What ``status`` shows of deliveries and events."""
    figures = pending_figures(conn)
    figures["unrouted_events"] = conn.execute(unrouted_count()).scalar() or 0
    figures["events"] = conn.execute(select(func.count()).select_from(events)).scalar() or 0
    return figures


def unrouted_count() -> Select[int]:
    """How many events were routed to no subscription. ``routed = 0`` is a literal, not a
    parameter, so that both databases count them in the partial ``ix_events_unrouted``, which
    holds those events only (migration 0008)."""
    return select(func.count()).select_from(events).where(events.c.routed == literal_column("0"))


# --- the admin ops ----------------------------------------------------------------------------


def list_deliveries(
    conn: Connection, subscription_id: str, *, dead: bool, after: int | None, limit: int
) -> list[Row[Any]]:
    """A page of a subscription's pending (or dead) deliveries with their events, by id."""
    stmt = (
        select(
            deliveries.c.id,
            deliveries.c.attempt,
            deliveries.c.next_attempt_at,
            deliveries.c.dead_at,
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
            deliveries.c.dead_at.is_not(None) if dead else deliveries.c.dead_at.is_(None),
        )
        .order_by(*PENDING_ORDER if not dead else (deliveries.c.id,))
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(deliveries.c.id > after)
    return list(conn.execute(stmt))


def redeliver(
    conn: Connection, subscription_id: str, delivery_ids: Sequence[int] | None, now: datetime
) -> int:
    """Dead deliveries of a subscription (the given ones, else all) become pending again,
    sendable at once, with a fresh attempt budget (``attempt`` 0). How many did."""
    where = (
        deliveries.c.subscription_id == subscription_id,
        deliveries.c.acked_at.is_(None),
        deliveries.c.dead_at.is_not(None),
    )
    revive = update(deliveries).values(dead_at=None, attempt=0, sent_at=None, next_attempt_at=now)
    if delivery_ids is None:
        return conn.execute(revive.where(*where)).rowcount
    done = 0
    for chunk in chunks(sorted(set(delivery_ids))):
        done += conn.execute(revive.where(*where, deliveries.c.id.in_(chunk))).rowcount
    return done


REPLAY_CHUNK: Final = 2000


def replay_events(
    conn: Connection,
    subscription_id: str,
    *,
    connector_idn: str | None,
    persona_id: str | None,
    since: datetime,
    now: datetime,
    chunk: int = REPLAY_CHUNK,
) -> int:
    """Give a new subscription a delivery of every stored event matching its filter fired at
    or after ``since``, in fire order; how many. The events are read and the deliveries
    written ``chunk`` at a time (keyset on ``ix_events_fired_at``), so memory stays bounded."""
    match = [events.c.fired_at >= since]
    if connector_idn is not None:
        match.append(events.c.connector_idn == connector_idn)
    if persona_id is not None:
        match.append(events.c.persona_id == persona_id)
    total = 0
    last: tuple[datetime, int] | None = None
    while True:
        stmt = select(events.c.id, events.c.fired_at).where(*match)
        if last is not None:
            stmt = stmt.where(
                or_(
                    events.c.fired_at > last[0],
                    and_(events.c.fired_at == last[0], events.c.id > last[1]),
                )
            )
        rows = list(conn.execute(stmt.order_by(events.c.fired_at, events.c.id).limit(chunk)))
        if not rows:
            return total
        insert_deliveries(
            conn,
            [
                {
                    "subscription_id": subscription_id,
                    "event_id": r.id,
                    "attempt": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for r in rows
            ],
        )
        total += len(rows)
        if len(rows) < chunk:
            return total
        last = (rows[-1].fired_at, rows[-1].id)
