"""SQL of command acts: the first reply of each ``commandActId``, kept for safe retries."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete

from program_timer.store.queries import driver
from program_timer.store.schema import command_acts


def acts_statements(conn: Connection, ids: Sequence[str]) -> list[driver.Statement]:
    """The queries for the first replies of these ids (for :func:`driver.fetch_many`; their
    rows through :func:`acts_from_rows`)."""
    if not ids:
        return []
    where = driver.in_list(conn, "command_act_id IN ?*")
    return [driver.select_statement(conn, command_acts, where, (driver.list_param(conn, ids),))]


def acts_from_rows(results: Sequence[Sequence[Sequence[Any]]]) -> dict[str, dict[str, Any]]:
    return {row[0]: row[1] for rows in results for row in rows}


def save_command_acts(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Rows: ``command_act_id``, ``reply``, ``created_at``."""
    driver.insert_dicts(conn, command_acts, rows)


def purge_command_acts(conn: Connection, before: datetime) -> int:
    return conn.execute(delete(command_acts).where(command_acts.c.created_at < before)).rowcount
