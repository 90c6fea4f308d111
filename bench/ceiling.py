"""The ceiling: a bare batched-SQL loop doing only the minimum writes of a fire, on the daemon's
own tables, with the raw driver (no SQLAlchemy, no scheduler, no routing):

    repeat: BEGIN; select a batch of due timers (locked, SKIP LOCKED on PostgreSQL);
            update them (fired); insert one event row each; COMMIT

Same durability as the daemon (SQLite: WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``;
PostgreSQL: defaults). No real daemon can beat it on the same machine and database.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg

from bench.common import (
    BenchError,
    Database,
    burst_specs,
    from_epoch,
    sleep_until,
    sqlite_ts,
    timer_rows,
    utcnow,
)

_SELECT = (
    "SELECT id, persona_id, timer_name, connector_idn, command_act_id, due_at, fire_count, "
    "arguments FROM timers WHERE due_at <= {p} ORDER BY due_at LIMIT {limit}"
)
# One set-based statement per batch: every timer of a burst is a one-shot that is now fired.
_UPDATE = (
    "UPDATE timers SET planned_at = NULL, due_at = NULL, state = 'fired', "
    "fire_count = fire_count + 1, last_fired_at = {p} WHERE id {ids}"
)
_EVENT_COLUMNS = (
    "external_event_id, persona_id, timer_name, connector_idn, command_act_id, scheduled_at, "
    "fired_at, fire_count, missed_count, arguments, routed, fired_by"
)


def _event_arguments(extra: Any, persona: str, name: str, due: str, now: str) -> dict[str, str]:
    args = dict(json.loads(extra) if isinstance(extra, str) else extra)
    args.update(
        personaId=persona,
        timerName=name,
        scheduledAt=due,
        firedAt=now,
        fireCount="1",
        missedCount="0",
        repeatable="false",
    )
    return args


def _fire_sqlite(path: str, batch: int) -> int:
    """``executemany`` for the event rows (SQLite has no faster bulk path)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    select = _SELECT.format(p="?", limit=batch)
    insert = f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, 0, ?)"
    fired = 0
    try:
        while True:
            now = datetime.now(UTC)
            now_s = sqlite_ts(now)
            now_iso = now.isoformat().replace("+00:00", "Z")
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(select, (now_s,)).fetchall()
            if rows:
                marks = ", ".join("?" * len(rows))
                conn.execute(
                    _UPDATE.format(p="?", ids=f"IN ({marks})"), (now_s, *(r[0] for r in rows))
                )
                conn.executemany(
                    insert,
                    [
                        (
                            str(uuid.uuid4()),
                            r[1],
                            r[2],
                            r[3],
                            r[4],
                            r[5],
                            now_s,
                            r[6] + 1,
                            json.dumps(
                                _event_arguments(
                                    r[7], r[1], r[2], r[5].replace(" ", "T") + "Z", now_iso
                                )
                            ),
                            "ceiling",
                        )
                        for r in rows
                    ],
                )
            conn.execute("COMMIT")
            fired += len(rows)
            if len(rows) < batch:
                return fired
    finally:
        conn.close()


def _fire_postgres(url: str, batch: int) -> int:
    """``COPY`` for the event rows (the fastest bulk path of PostgreSQL)."""
    select = _SELECT.format(p="%s", limit=batch) + " FOR UPDATE SKIP LOCKED"
    update = _UPDATE.format(p="%s", ids="= ANY(%s)")
    fired = 0
    with psycopg.connect(url) as conn:
        while True:
            now = datetime.now(UTC)
            now_iso = now.isoformat().replace("+00:00", "Z")
            with conn.cursor() as cur:
                rows = cur.execute(select, (now,)).fetchall()
                if rows:
                    cur.execute(update, (now, [r[0] for r in rows]))
                    with cur.copy(f"COPY events ({_EVENT_COLUMNS}) FROM STDIN") as copy:
                        for r in rows:
                            scheduled = r[5].isoformat().replace("+00:00", "Z")
                            copy.write_row(
                                (
                                    str(uuid.uuid4()),
                                    r[1],
                                    r[2],
                                    r[3],
                                    r[4],
                                    r[5],
                                    now,
                                    r[6] + 1,
                                    0,
                                    json.dumps(
                                        _event_arguments(r[7], r[1], r[2], scheduled, now_iso)
                                    ),
                                    0,
                                    "ceiling",
                                )
                            )
            conn.commit()
            fired += len(rows)
            if len(rows) < batch:
                return fired


def run_ceiling_burst(db: Database, n: int, *, label: str, batch: int = 1000) -> dict[str, Any]:
    """``n`` timers due at one instant, fired by the bare loop in batches of ``batch``."""
    db.fresh(label)
    t0 = time.time() + 0.5 + n * 50e-6
    db.insert_timers(timer_rows(db, burst_specs(n, from_epoch(t0)), utcnow()))
    margin = t0 - time.time()
    sleep_until(t0)
    if db.kind == "sqlite":
        assert db.path is not None
        fired = _fire_sqlite(str(db.path), batch)
    else:
        fired = _fire_postgres(db.url, batch)
    done = time.time()
    if fired != n or db.count("events") != n:
        raise BenchError(f"{label}: fired {fired} of {n}")
    return {
        "n": n,
        "batch": batch,
        "setup_margin_s": round(margin, 3),
        "durable_s": round(done - t0, 4),
        "durable_per_s": round(n / (done - t0), 1),
    }
