"""Initial schema: timers, events, subscriptions, deliveries, command acts, daemons.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from program_timer.store.schema import JSONDoc, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "timers",
        sa.Column("id", ID, primary_key=True),
        sa.Column("persona_id", sa.String(255), nullable=False),
        sa.Column("timer_name", sa.String(255), nullable=False),
        sa.Column("connector_idn", sa.String(255), nullable=False),
        sa.Column("fire_at", UTCDateTime(), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=True),
        sa.Column("interval_s", sa.Float(), nullable=True),
        sa.Column("repeatable", sa.Boolean(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("anchor_at", UTCDateTime(), nullable=True),
        sa.Column("planned_at", UTCDateTime(), nullable=True),
        sa.Column("due_at", UTCDateTime(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("fire_count", sa.Integer(), nullable=False),
        sa.Column("last_fired_at", UTCDateTime(), nullable=True),
        sa.Column("arguments", JSONDoc, nullable=False),
        sa.Column("command_act_id", sa.String(36), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("persona_id", "timer_name", name="uq_timers_persona_name"),
    )
    op.create_index("ix_timers_due_at", "timers", ["due_at"])
    op.create_index("ix_timers_state_last_fired", "timers", ["state", "last_fired_at"])

    op.create_table(
        "events",
        sa.Column("id", ID, primary_key=True),
        sa.Column("external_event_id", sa.String(36), nullable=False, unique=True),
        sa.Column("persona_id", sa.String(255), nullable=False),
        sa.Column("timer_name", sa.String(255), nullable=False),
        sa.Column("connector_idn", sa.String(255), nullable=False),
        sa.Column("command_act_id", sa.String(36), nullable=False),
        sa.Column("scheduled_at", UTCDateTime(), nullable=False),
        sa.Column("fired_at", UTCDateTime(), nullable=False),
        sa.Column("fire_count", sa.Integer(), nullable=False),
        sa.Column("missed_count", sa.Integer(), nullable=False),
        sa.Column("arguments", JSONDoc, nullable=False),
        sa.Column("routed", sa.Integer(), nullable=False),
        sa.Column("fired_by", sa.String(64), nullable=False),
    )
    op.create_index("ix_events_fired_at", "events", ["fired_at"])
    op.create_index("ix_events_unrouted", "events", ["routed", "fired_at"])

    op.create_table(
        "subscriptions",
        sa.Column("subscription_id", sa.String(255), primary_key=True),
        sa.Column("flow_instance_id", sa.String(255), nullable=False),
        sa.Column("filter_connector_idn", sa.String(255), nullable=True),
        sa.Column("filter_persona_id", sa.String(255), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("attached_to", sa.String(64), nullable=True),
        sa.Column("attached_at", UTCDateTime(), nullable=True),
    )

    op.create_table(
        "deliveries",
        sa.Column("id", ID, primary_key=True),
        sa.Column(
            "subscription_id",
            sa.String(255),
            sa.ForeignKey("subscriptions.subscription_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "event_id",
            sa.BigInteger(),
            sa.ForeignKey("events.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
        sa.Column("acked_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_deliveries_pending", "deliveries", ["subscription_id", "acked_at", "id"])
    op.create_index("ix_deliveries_acked", "deliveries", ["acked_at"])
    op.create_index("ix_deliveries_event", "deliveries", ["event_id"])

    op.create_table(
        "command_acts",
        sa.Column("command_act_id", sa.String(36), primary_key=True),
        sa.Column("reply", JSONDoc, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_command_acts_created_at", "command_acts", ["created_at"])

    op.create_table(
        "daemons",
        sa.Column("daemon_id", sa.String(64), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    for table in ("daemons", "command_acts", "deliveries", "subscriptions", "events", "timers"):
        op.drop_table(table)
