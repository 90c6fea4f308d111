"""Several daemons on one PostgreSQL database (SPEC 4, README "Several daemons on one PostgreSQL
database"): a burst fired by 1, 2 or 3 daemons, and the same with one of them SIGKILLed
mid-burst.

Each daemon is a ``program-timer serve`` subprocess with its own socket and
``PROGRAM_TIMER_DAEMON_ID`` (A, B, C), all on the same database. The burst is loaded as in
:func:`bench.ours.run_burst`: straight into ``timers``, but for one timer set with a command
sent to daemon A, which makes A wake at ``t0``; A's ``NOTIFY`` wakes the others, as in
production. Who fired what comes from ``events.fired_by``; "exactly once" is checked on
``events`` (one event per timer, none missing, none doubled).

Every daemon runs on the same machine as PostgreSQL and the harness: on 2 cores the figures show
what coordinating costs, not what scaling out to more machines would give.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BenchError,
    Daemon,
    Database,
    burst_specs,
    from_epoch,
    load_due,
    log,
    summarize_ms,
    wait_for_events,
)
from bench.ours import _lead

DAEMON_IDS = ("A", "B", "C", "D", "E", "F")
DAEMON_COUNTS = (1, 2, 3)  # burst with this many daemons
KILL_COUNTS = (2, 3)  # the same with one SIGKILLed (with one alone, nobody would take over)
KILLED = "B"  # the daemon killed: not A, which received the wake-up command
PREFIX = "multi"
NOTE = (
    "all daemons share one machine's CPUs with PostgreSQL and the harness: the figures show "
    "coordination overhead, not scale-out"
)


def _fires(db: Database) -> dict[str, Any]:
    """Fires per daemon and the exactly-once check, from ``events``."""
    conn = db.raw()
    try:
        by_daemon = {
            str(who): int(count)
            for who, count in conn.execute(
                "SELECT fired_by, count(*) FROM events WHERE persona_id LIKE %s "
                "GROUP BY fired_by ORDER BY fired_by",
                (f"{PREFIX}-%",),
            ).fetchall()
        }
        total, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (persona_id, timer_name)) FROM events "
            "WHERE persona_id LIKE %s",
            (f"{PREFIX}-%",),
        ).fetchone()
    finally:
        conn.close()
    return {"by_daemon": by_daemon, "events": int(total), "distinct_timers": int(distinct)}


def _committed(db: Database, conn: Any) -> int:
    return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


def run_multi_burst(
    db: Database,
    workdir: Path,
    n: int,
    daemons: int,
    *,
    label: str,
    kill: bool = False,
    kill_hint_s: float | None = None,
    settle_s: float = 1.0,
    timeout: float | None = None,
) -> dict[str, Any]:
    """``n`` timers due at one instant ``t0``, ``daemons`` daemons on the same PostgreSQL database.

    With ``kill``, daemon B is SIGKILLed mid-burst: once half the events are committed, or
    ``kill_hint_s`` after ``t0`` (half the time the same burst took without a kill), whichever
    comes first; the survivors must fire the rest, each timer exactly once.
    """
    if db.kind != "postgres":
        raise BenchError("several daemons need PostgreSQL (SQLite is single-daemon)")
    if not 1 <= daemons <= len(DAEMON_IDS):
        raise ValueError(f"daemons: 1 to {len(DAEMON_IDS)}")
    if kill and daemons < 2:
        raise ValueError("killing the only daemon leaves nobody to take over")
    timeout = timeout or max(60.0, n / 100)
    url = db.fresh(label)
    ids = list(DAEMON_IDS[:daemons])
    procs = {
        name: Daemon(url, workdir, f"{label}-{name}", env={"PROGRAM_TIMER_DAEMON_ID": name})
        for name in ids
    }
    kill_info: dict[str, Any] = {}
    try:
        for d in procs.values():
            d.start()
        t0 = time.time() + _lead(n)
        # The earliest timer is set through A: A wakes at t0, the others by A's NOTIFY.
        load_due(db, procs["A"].socket, list(burst_specs(n, from_epoch(t0), prefix=PREFIX)))
        margin = round(t0 - time.time(), 3)
        if margin < 0:
            log(f"warning: the load finished {-margin:.3f} s after t0; the rate counts from t0")
        if kill:
            kill_info = _kill_mid_burst(db, procs[KILLED], n, t0, kill_hint_s)
        done = wait_for_events(db, n, timeout)
        if done is not None:
            time.sleep(settle_s)  # room for a late duplicate to show up before the check
    finally:
        for d in procs.values():
            with contextlib.suppress(Exception):
                d.stop()
    if done is None:
        raise BenchError(f"{label}: not all {n} timers fired within {timeout:.0f} s")
    fires = _fires(db)
    times = db.event_times()
    last_fired = max(f for _, f in times)
    by_daemon = {name: fires["by_daemon"].pop(name, 0) for name in ids}
    if fires["by_daemon"]:  # fired by a daemon we did not start: should never happen
        by_daemon.update(fires["by_daemon"])
    duplicates = fires["events"] - fires["distinct_timers"]
    missing = n - fires["distinct_timers"]
    result: dict[str, Any] = {
        "n": n,
        "daemons": daemons,
        "daemon_ids": ids,
        "woken": "A (the others by NOTIFY)",
        "setup_margin_s": margin,
        "durable_s": round(done - t0, 4),
        "durable_per_s": round(n / (done - t0), 1),
        "last_fired_at_s": round(last_fired - t0, 4),
        "fired_at_per_s": round(n / max(last_fired - t0, 1e-6), 1),
        "lateness": summarize_ms(f - s for s, f in times),
        "fires_by_daemon": by_daemon,
        "events": fires["events"],
        "distinct_timers": fires["distinct_timers"],
        "duplicates": duplicates,
        "missing": missing,
        "exactly_once": duplicates == 0 and missing == 0,
    }
    if kill:
        result.update(kill_info)
        result["killed_fires"] = by_daemon.get(KILLED, 0)
        result["after_kill_s"] = round(done - t0 - kill_info["killed_at_s"], 4)
    return result


def _kill_mid_burst(
    db: Database, victim: Daemon, n: int, t0: float, hint_s: float | None, poll: float = 0.01
) -> dict[str, Any]:
    """SIGKILL ``victim`` once half the events are committed or ``hint_s`` after ``t0``."""
    conn = db.raw()
    try:
        kill_at = t0 + hint_s if hint_s else None
        deadline = time.monotonic() + max(60.0, n / 100)
        while True:
            seen = _committed(db, conn)
            now = time.time()
            if seen >= n // 2 or (kill_at is not None and now >= kill_at):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the burst did not get under way ({seen} of {n} fired)")
            time.sleep(poll)
        victim.kill()
        killed_at = time.time()
        after = _committed(db, conn)
    finally:
        conn.close()
    if seen >= n:
        log(f"warning: {victim.label} was killed after the whole burst had fired")
    phase = "before_first_commit" if seen == 0 else "mid_burst" if seen < n else "after_burst"
    return {
        "killed": KILLED,
        "killed_at_s": round(killed_at - t0, 4),
        "events_before_kill": seen,
        "events_just_after_kill": after,
        "kill_phase": phase,
        "mid_burst": seen < n,  # the burst was not over (before its first commit included)
    }
