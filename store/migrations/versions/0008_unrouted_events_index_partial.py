"""``ix_events_unrouted``: an index of the unrouted events only, for their count.

``status`` counts the events routed to no subscription (``routed = 0``). The index on
``(routed, fired_at)`` held every event, so every fire added an entry to it and every purge
removed one, for a count of the few events nobody was subscribed to. The partial index on
``fired_at WHERE routed = 0`` holds only those: a routed event, the usual one, writes nothing
to it, and the count reads only them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_UNROUTED = sa.text("routed = 0")


def upgrade() -> None:
    op.drop_index("ix_events_unrouted", table_name="events")
    op.create_index(
        "ix_events_unrouted",
        "events",
        ["fired_at"],
        sqlite_where=_UNROUTED,
        postgresql_where=_UNROUTED,
    )


def downgrade() -> None:
    op.drop_index("ix_events_unrouted", table_name="events")
    op.create_index("ix_events_unrouted", "events", ["routed", "fired_at"])
