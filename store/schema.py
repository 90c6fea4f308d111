"""The tables of program-timer, built in one place.

Every time is a UTC instant: ``timestamptz`` on PostgreSQL; on SQLite, where there is no time
zone type, a naive UTC ``DATETIME`` whose text form sorts in time order. :class:`UTCDateTime`
hides that difference: Python always sees aware UTC datetimes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

NAME = 255


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on both dialects."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value if value.tzinfo is UTC else value.astimezone(UTC)


class JSONDoc(TypeDecorator[Any]):
    """A JSON document: ``JSONB`` on PostgreSQL, ``JSON`` (text) on SQLite. The PostgreSQL
    type is looked up only when a PostgreSQL dialect asks for it, so that a daemon or a CLI
    command on SQLite does not import SQLAlchemy's PostgreSQL dialect (a tenth of a second at
    every start)."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())


metadata = MetaData()

timers = Table(
    "timers",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("persona_id", String(NAME), nullable=False),
    Column("timer_name", String(NAME), nullable=False),
    Column("connector_idn", String(NAME), nullable=False),
    # What the commands gave (fire_at is stored in UTC; the time zone it was read in is kept).
    Column("fire_at", UTCDateTime(), nullable=True),
    Column("timezone", String(64), nullable=True),
    Column("interval_s", Float(), nullable=True),
    # A calendar schedule instead of an interval (SPEC 7.5): an RFC 5545 RRULE or five cron
    # fields, read in `timezone` (migration 0002).
    Column("rrule", String(1024), nullable=True),
    Column("cron", String(255), nullable=True),
    Column("repeatable", Boolean(), nullable=False, default=False),
    Column("enabled", Boolean(), nullable=False, default=True),
    # The schedule: a repeating timer fires at anchor_at + k * interval_s.
    Column("anchor_at", UTCDateTime(), nullable=True),
    # The next fire regardless of `enabled` (kept while disabled) ...
    Column("planned_at", UTCDateTime(), nullable=True),
    # ... and the next fire that will really happen: NULL unless enabled and scheduled.
    # The due-timer index is on this column alone, so finding due timers never scans.
    Column("due_at", UTCDateTime(), nullable=True),
    Column("state", String(16), nullable=False),
    Column("fire_count", Integer(), nullable=False, default=0),
    Column("last_fired_at", UTCDateTime(), nullable=True),
    Column("arguments", JSONDoc, nullable=False),
    Column("command_act_id", String(36), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    UniqueConstraint("persona_id", "timer_name", name="uq_timers_persona_name"),
    # Timers that will fire only (migration 0009): a completed, disabled or unscheduled one
    # (due_at NULL) has no entry, so a one-shot's fire removes its entry and adds none. The
    # due-timer queries (`due_at <= ?`, `due_at IS NOT NULL`) imply the condition.
    Index(
        "ix_timers_due_at",
        "due_at",
        sqlite_where=text("due_at IS NOT NULL"),
        postgresql_where=text("due_at IS NOT NULL"),
    ),
    # Fired one-shot timers only, for their purge a retention after the fire (migration 0007):
    # a new, scheduled or repeating timer has no entry, so neither a set_timer nor a repeating
    # fire writes to it. The purge names the state as a literal, as this condition does.
    Index(
        "ix_timers_fired",
        "last_fired_at",
        sqlite_where=text("state = 'fired'"),
        postgresql_where=text("state = 'fired'"),
    ),
)

# How many timers are in each state, kept in the transactions that change a timer's state (so
# that `status` and the metrics read a few rows, not the timers table; migration 0004). A state's
# count is the sum over its shards: each writing thread of a daemon adds to its own shard, so
# concurrent transactions (another daemon's fire pass, this daemon's commands) rarely wait on
# one another for the same row.
timer_counts = Table(
    "timer_counts",
    metadata,
    Column("state", String(16), primary_key=True),
    Column("shard", Integer(), primary_key=True),
    Column("n", BigInteger(), nullable=False),
)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("external_event_id", String(36), nullable=False, unique=True),
    Column("persona_id", String(NAME), nullable=False),
    Column("timer_name", String(NAME), nullable=False),
    Column("connector_idn", String(NAME), nullable=False),
    Column("command_act_id", String(36), nullable=False),
    Column("scheduled_at", UTCDateTime(), nullable=False),
    Column("fired_at", UTCDateTime(), nullable=False),
    Column("fire_count", Integer(), nullable=False),
    Column("missed_count", Integer(), nullable=False),
    # The event's `arguments`, all strings, exactly as delivered.
    Column("arguments", JSONDoc, nullable=False),
    # How many subscriptions the event was routed to when it fired (0 = unrouted).
    Column("routed", Integer(), nullable=False),
    Column("fired_by", String(64), nullable=False),
    Index("ix_events_fired_at", "fired_at"),
    # Unrouted events only, for their count in `status` (migration 0008): a routed event, the
    # usual one, has no entry. The count names 0 as a literal, as this condition does.
    Index(
        "ix_events_unrouted",
        "fired_at",
        sqlite_where=text("routed = 0"),
        postgresql_where=text("routed = 0"),
    ),
)

subscriptions = Table(
    "subscriptions",
    metadata,
    Column("subscription_id", String(NAME), primary_key=True),
    Column("flow_instance_id", String(NAME), nullable=False),
    Column("filter_connector_idn", String(NAME), nullable=True),
    Column("filter_persona_id", String(NAME), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    # The daemon whose connection holds the subscription now (NULL: nobody is attached).
    Column("attached_to", String(64), nullable=True),
    Column("attached_at", UTCDateTime(), nullable=True),
    Column("last_ack_at", UTCDateTime(), nullable=True),  # (0002)
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column(
        "subscription_id",
        String(NAME),
        ForeignKey("subscriptions.subscription_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("event_id", BigInteger(), ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
    Column("attempt", Integer(), nullable=False, default=0),
    # When the delivery may be (re)sent: now for a new one, sent + ack timeout once sent.
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime(), nullable=True),
    Column("acked_at", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    # Dead letter (SPEC 7.4): no longer sent, kept and counted until redelivered (0002).
    Column("dead_at", UTCDateTime(), nullable=True),
    # A subscription's pending deliveries (acked_at and dead_at NULL) in id order, and apart
    # from them its dead ones (0003).
    Index("ix_deliveries_pending", "subscription_id", "acked_at", "dead_at", "id"),
    # Rows acked by a daemon of before 2026-12-03 (acks delete them now), for the purge (0006).
    Index(
        "ix_deliveries_acked",
        "acked_at",
        sqlite_where=text("acked_at IS NOT NULL"),
        postgresql_where=text("acked_at IS NOT NULL"),
    ),
    Index("ix_deliveries_event", "event_id"),
    # SQLite: an id is never used again, even once its row is deleted (migration 0005); on
    # PostgreSQL the sequence does that.
    sqlite_autoincrement=True,
)

command_acts = Table(
    "command_acts",
    metadata,
    Column("command_act_id", String(36), primary_key=True),
    Column("reply", JSONDoc, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_command_acts_created_at", "created_at"),
)

daemons = Table(
    "daemons",
    metadata,
    Column("daemon_id", String(64), primary_key=True),
    Column("hostname", String(NAME), nullable=False),
    Column("pid", Integer(), nullable=False),
    Column("version", String(32), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("heartbeat_at", UTCDateTime(), nullable=False),
)
