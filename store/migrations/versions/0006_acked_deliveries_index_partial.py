"""``ix_deliveries_acked`` holds acked deliveries only.

Acks delete the delivery since 2026-12-03 (``queries.ack_deliveries``): the only rows with
``acked_at`` set are those an older daemon acked, which the purge ends an hour later through this
index. As a full index it took an entry for every delivery written (``acked_at`` NULL) and gave it
up again at every ack; as a partial one (``WHERE acked_at IS NOT NULL``) it is empty once those
rows are purged, and ``acked_at < ?`` still finds them through it on both databases.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ACKED = sa.text("acked_at IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_deliveries_acked", table_name="deliveries")
    op.create_index(
        "ix_deliveries_acked",
        "deliveries",
        ["acked_at"],
        sqlite_where=_ACKED,
        postgresql_where=_ACKED,
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_acked", table_name="deliveries")
    op.create_index("ix_deliveries_acked", "deliveries", ["acked_at"])
