"""The calendar burst (SPEC 7.5): ``n`` calendar timers all due at one instant, fired per second,
against the interval burst of the same run (goal: at least half its rate).

Bursts on fresh databases: ``n`` RRULE timers (``FREQ=SECONDLY;INTERVAL=3600`` in Europe/Paris,
each re-anchored and advanced to its next occurrence an hour later), ``n`` cron timers
(``* * * * *``, the same zone) and, for reference, ``n`` repeating interval timers (3600 s): the
`burst` scenario fires one-shots, which complete in one statement, while every repeating timer,
calendar or not, is advanced with its own row update. Timers are bulk-loaded as
``set_repeatable_timer`` leaves them, all due at ``t0`` (a whole second); the daemon is woken by
one real command due at ``t0`` too: for the RRULE burst a ``set_repeatable_timer`` with the same
rule and ``fireAt=t0``, for the others (cron occurrences fall on whole minutes) a one-shot
``fireAt=t0``.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import (
    CONNECTOR,
    TIMER_ARGUMENTS,
    TIMER_COLUMNS,
    BenchError,
    Daemon,
    Database,
    LineConn,
    from_epoch,
    iso_z,
    summarize_ms,
    utcnow,
    wait_for_events,
)

RRULE = "FREQ=SECONDLY;INTERVAL=3600"
CRON = "* * * * *"
ZONE = "Europe/Paris"
COLUMNS = (*TIMER_COLUMNS, "rrule", "cron")


def _rows(db: Database, n: int, t0: float, kind: str) -> Iterator[tuple[Any, ...]]:
    """Rows exactly as ``set_repeatable_timer`` leaves a calendar timer set an hour before
    ``t0`` (its start) and next due at ``t0``."""
    ts = db.ts()
    due = from_epoch(t0)
    anchor, created = ts(due - timedelta(hours=1)), ts(utcnow())
    for i in range(n):
        yield (
            f"cal-{i // 1000:05d}",
            f"t{i:07d}",
            CONNECTOR,
            None,  # fire_at
            ZONE,
            3600.0 if kind == "interval" else None,
            True,
            True,
            anchor,
            ts(due),
            ts(due),
            "scheduled",
            0,
            None,
            TIMER_ARGUMENTS,
            str(uuid.uuid4()),
            created,
            created,
            RRULE if kind == "rrule" else None,
            CRON if kind == "cron" else None,
        )


def _insert(db: Database, rows: Iterator[tuple[Any, ...]]) -> None:
    """Bulk-load in one transaction: :meth:`Database.insert_timers` with the rule columns."""
    db.insert_timers(rows, COLUMNS)


def _wake(path: str, t0: float, kind: str) -> None:
    """The one timer set through the socket, due at ``t0``: it tells the daemon when to wake."""
    args: dict[str, str] = {
        "personaId": "cal-waker",
        "timerName": "t",
        "fireAt": iso_z(from_epoch(t0)),
        "flow": "bench",
    }
    command = "set_timer"
    if kind == "rrule":
        command = "set_repeatable_timer"
        args.update(rrule=RRULE, timezone=ZONE)
    message = {
        "op": "command",
        "commandIdn": command,
        "integrationIdn": "program_timer",
        "connectorIdn": CONNECTOR,
        "arguments": args,
    }
    with LineConn(path) as conn:
        reply = conn.request(message)
    if not reply.get("ok") or reply["result"]["timer"]["nextFireAt"] != args["fireAt"]:
        raise BenchError(f"set_timer refused or not due at t0: {reply}")


def _one_burst(db: Database, workdir: Path, n: int, kind: str, label: str) -> dict[str, Any]:
    timeout = max(60.0, n / 100)
    url = db.fresh(f"{label}-{kind}")
    with Daemon(url, workdir, f"{label}-{kind}") as daemon:
        daemon.start()
        t0 = float(math.ceil(time.time() + 0.5 + n * 60e-6))  # a whole second, after the load
        _insert(db, _rows(db, n - 1, t0, kind))
        _wake(daemon.socket, t0, kind)
        margin = round(t0 - time.time(), 3)
        done = wait_for_events(db, n, timeout)
    if done is None:
        raise BenchError(f"{label} {kind}: not all {n} timers fired within {timeout:.0f} s")
    times = db.event_times()
    if len(times) != n:
        raise BenchError(f"{label} {kind}: {len(times)} events for {n} timers")
    scheduled = db.count("timers WHERE state = 'scheduled' AND due_at IS NOT NULL")
    if scheduled != n - (kind != "rrule"):
        raise BenchError(f"{label} {kind}: {scheduled} timers rescheduled, expected {n - 1}")
    return {
        "rule": {"rrule": RRULE, "cron": CRON}.get(kind, "interval 3600"),
        "setup_margin_s": margin,
        "durable_s": round(done - t0, 4),
        "durable_per_s": round(n / (done - t0), 1),
        "lateness": summarize_ms(f - s for s, f in times),
    }


def run_calendar_burst(db: Database, workdir: Path, n: int, *, label: str) -> dict[str, Any]:
    """The RRULE, cron and repeating-interval bursts of ``n`` timers each;
    ``durable_per_s`` is the lower of the two calendar rates (events durable)."""
    out: dict[str, Any] = {"n": n}
    for kind in ("rrule", "cron", "interval"):
        out[kind] = _one_burst(db, workdir, n, kind, label)
    out["durable_per_s"] = min(out["rrule"]["durable_per_s"], out["cron"]["durable_per_s"])
    return out
