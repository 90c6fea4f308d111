"""``ix_timers_due_at``: an index of the timers that will fire only.

Due timers are found by ``due_at <= ?`` (the claim) and the next one by ``due_at IS NOT NULL``
(the fire loop's sleep). The index held every timer, those with ``due_at`` NULL too (both
databases index NULLs): a one-shot's fire replaced its entry by a NULL one, and every
completed, disabled or unscheduled timer kept an entry nothing reads. As a partial index
``WHERE due_at IS NOT NULL`` it holds the scheduled timers only; both queries imply the
condition (a comparison is never true of NULL), so both databases still use it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_DUE = sa.text("due_at IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_timers_due_at", table_name="timers")
    op.create_index(
        "ix_timers_due_at", "timers", ["due_at"], sqlite_where=_DUE, postgresql_where=_DUE
    )


def downgrade() -> None:
    op.drop_index("ix_timers_due_at", table_name="timers")
    op.create_index("ix_timers_due_at", "timers", ["due_at"])
