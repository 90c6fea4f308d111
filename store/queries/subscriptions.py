"""SQL of subscriptions and of the daemons sharing the database (heartbeats, attachment)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final, NamedTuple

from sqlalchemy import Connection, Row, delete, insert, select, update

from program_timer.store.queries import driver
from program_timer.store.queries.operators import delivery_counts, inflight_count
from program_timer.store.schema import daemons, deliveries, subscriptions


class SubscriptionFilter(NamedTuple):
    subscription_id: str
    filter_connector_idn: str | None
    filter_persona_id: str | None


SUBSCRIPTION_FILTERS: Final = driver.Statement(
    "SELECT subscription_id, filter_connector_idn, filter_persona_id FROM subscriptions"
)


def subscription_filters(rows: Sequence[Sequence[Any]]) -> list[SubscriptionFilter]:
    """The rows of :data:`SUBSCRIPTION_FILTERS`."""
    return [SubscriptionFilter(*row) for row in rows]


def subscription_figures(conn: Connection, now: datetime) -> list[dict[str, Any]]:
    """Every subscription (by id) with its deliveries' figures: ``pending`` (neither acked
    nor dead, in flight included), ``inflight`` (sent, awaiting an ack), ``dead``, and when
    the oldest pending one was created. A few range reads of ``ix_deliveries_pending`` each
    (``inflight`` reads the pending rows: this is an admin listing, not a gauge)."""
    out = []
    for row in conn.execute(select(subscriptions).order_by(subscriptions.c.subscription_id)):
        pending, dead, oldest = delivery_counts(conn, row.subscription_id)
        out.append(
            {
                "row": row,
                "pending": pending,
                "inflight": inflight_count(conn, row.subscription_id, now) if pending else 0,
                "dead": dead,
                "oldest_pending_at": oldest,
            }
        )
    return out


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


def attached_elsewhere_later(
    conn: Connection, subscription_ids: Sequence[str], daemon_id: str
) -> Callable[[], set[str]]:
    """Those of the given subscriptions that are no longer attached to this daemon, read later
    (:func:`~.driver.fetch_later`: in a pipeline, answered in the round trip of the next query
    read, the refill's due deliveries): call the function returned for them."""
    if not subscription_ids:
        return set
    rows = driver.fetch_later(
        conn,
        driver.in_list(conn, _ATTACHED_HERE),
        (driver.list_param(conn, subscription_ids), daemon_id),
    )
    return lambda: set(subscription_ids) - {row[0] for row in rows()}


_ATTACHED_HERE: Final = (
    "SELECT subscription_id FROM subscriptions WHERE subscription_id IN ?* AND attached_to = ?"
)


def delete_subscription(conn: Connection, subscription_id: str) -> bool:
    conn.execute(delete(deliveries).where(deliveries.c.subscription_id == subscription_id))
    return bool(
        conn.execute(
            delete(subscriptions).where(subscriptions.c.subscription_id == subscription_id)
        ).rowcount
    )


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
