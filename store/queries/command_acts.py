"""SQL of command acts: the first reply of each ``commandActId``, kept for safe retries."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select

from program_timer.store.queries.batches import chunks
from program_timer.store.schema import command_acts


def load_command_acts(conn: Connection, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for chunk in chunks(list(set(ids))):
        stmt = select(command_acts.c.command_act_id, command_acts.c.reply).where(
            command_acts.c.command_act_id.in_(chunk)
        )
        for act_id, reply in conn.execute(stmt):
            found[act_id] = reply
    return found


def save_command_acts(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        conn.execute(insert(command_acts), list(rows))


def purge_command_acts(conn: Connection, before: datetime) -> int:
    return conn.execute(delete(command_acts).where(command_acts.c.created_at < before)).rowcount
