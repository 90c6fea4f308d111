"""Second round: calendar schedules (timers.rrule, timers.cron), dead letters
(deliveries.dead_at) and the last ack of a subscription (subscriptions.last_ack_at).

Every new column is nullable: existing rows keep their meaning (an interval timer, a live
delivery, a subscription never acked since the upgrade).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from program_timer.store.schema import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("timers") as batch:
        batch.add_column(sa.Column("rrule", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("cron", sa.String(255), nullable=True))
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("dead_at", UTCDateTime(), nullable=True))
    with op.batch_alter_table("subscriptions") as batch:
        batch.add_column(sa.Column("last_ack_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_column("last_ack_at")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("dead_at")
    with op.batch_alter_table("timers") as batch:
        batch.drop_column("cron")
        batch.drop_column("rrule")
