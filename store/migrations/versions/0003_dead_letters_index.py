"""Dead letters leave the pending range: ``ix_deliveries_pending`` gains ``dead_at``.

The delivery pump reads a subscription's sendable deliveries in id order through
``ix_deliveries_pending`` (``subscription_id``, ``acked_at``, ``id``). Dead deliveries
(``dead_at`` set, migration 0002) are unacked too: they would sit in that range, and every refill
would walk past all of them (and their rows) before finding one to send; counting a
subscription's dead ones would read every delivery. With ``dead_at`` before ``id`` the pending
ones (``dead_at IS NULL``) and the dead ones are two separate ranges of the same index: the
refill, the pending and dead counts of ``status`` and ``/metrics``, and the listings of the
``deliveries`` op each read only their own.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_deliveries_pending", table_name="deliveries")
    op.create_index(
        "ix_deliveries_pending", "deliveries", ["subscription_id", "acked_at", "dead_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_pending", table_name="deliveries")
    op.create_index("ix_deliveries_pending", "deliveries", ["subscription_id", "acked_at", "id"])
