"""``ix_timers_fired``: an index of the fired one-shot timers only, for their purge.

The purge deletes the one-shot timers fired a retention ago (``state = 'fired'`` and
``last_fired_at`` before the cut). ``ix_timers_state_last_fired`` on ``(state, last_fired_at)``
held every timer, so every ``set_timer`` of a new timer added an entry, every repeating fire
moved its entry (``last_fired_at`` changed) and every one-shot fire moved it too (both columns
changed). The partial index on ``last_fired_at WHERE state = 'fired'`` holds only what the
purge looks for: one entry added when a one-shot fires, none for anything else.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_FIRED = sa.text("state = 'fired'")


def upgrade() -> None:
    op.drop_index("ix_timers_state_last_fired", table_name="timers")
    op.create_index(
        "ix_timers_fired",
        "timers",
        ["last_fired_at"],
        sqlite_where=_FIRED,
        postgresql_where=_FIRED,
    )


def downgrade() -> None:
    op.drop_index("ix_timers_fired", table_name="timers")
    op.create_index("ix_timers_state_last_fired", "timers", ["state", "last_fired_at"])
