"""SQLite: a delivery's id is never given to another delivery (``AUTOINCREMENT``).

A delivery's id was the table's largest id plus one (``queries.allocate_ids``): deleting the
newest deliveries (an ``unsubscribe``, or the purge of acked ones an hour later with nothing
pending) handed their ids to the next deliveries, and a late or repeated ack naming an old id
acked a delivery its subscriber had not seen. With ``AUTOINCREMENT`` SQLite keeps the largest
id the table ever held in ``sqlite_sequence`` (explicit ids included), and ``allocate_ids``
starts after it. SQLite cannot add it to a table: the table is rebuilt, its rows and indexes
copied (a few seconds a million deliveries). PostgreSQL's ids come from a sequence and never
repeat: nothing changes there.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "deliveries", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
    ):
        pass


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
