"""Scale: the daemon on a database of millions of stored timers (issue 12, goal 5).

    python -m bench.scale --n 1000000,10000000 --db sqlite,postgres --out bench/results

For each size and database: the timers are bulk-loaded (personas of 100, one at the quota of
1,000; none due during the measure, as in ``bench.run``'s scale scenario), the database is
settled (checkpoint / vacuum, analyze), then the daemon is started and measured: start to the
first ``ping``, resident memory, one persona's ``list_timers``, ``status``, one client
pipelining 20,000 ``set_timer`` (new timers), and a burst of 20,000 timers falling due at one
instant (fired, events durable). The database's size per stored timer is reported too. The
goal: at 10,000,000 the rates within 20 % of their figures at 1,000,000.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import (
    CONNECTOR,
    DEFAULT_PG_ADMIN,
    BenchError,
    Daemon,
    Database,
    burst_specs,
    encode,
    from_epoch,
    iso_z,
    log,
    set_timer_message,
    stop_all_daemons,
    summarize_ms,
    utcnow,
    wait_for_events,
)
from bench.ours import _lead, _load_due, _pipelined, _timed, load_scale
from program_timer.events.client import TimerClient

COMMANDS = 20_000
BURST = 20_000


def database_bytes(db: Database) -> int:
    """The database's size on disk: SQLite's file (and WAL), PostgreSQL's database."""
    if db.kind == "sqlite":
        assert db.path is not None
        files = [f"{db.path}{suffix}" for suffix in ("", "-wal")]
        return sum(os.path.getsize(f) for f in files if os.path.exists(f))
    conn = db.raw()
    try:
        return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])
    finally:
        conn.close()


def measure(db: Database, workdir: Path, n: int) -> dict[str, Any]:
    label = f"scale-{n}"
    db.fresh(label)
    personas, _big, loaded = load_scale(db, n, label)
    size = database_bytes(db)
    log(f"{db.kind} {n}: loaded in {loaded:.0f} s, {size / 2**20:.0f} MiB, {size / n:.0f} B/timer")
    result: dict[str, Any] = {
        "n": n,
        "load_s": round(loaded, 1),
        "database_mb": round(size / 2**20, 1),
        "bytes_per_timer": round(size / n, 1),
    }
    rng = random.Random(42)
    with Daemon(db.url, workdir, label) as daemon:
        result["start_s"] = round(daemon.start(), 3)
        result["rss_after_start_mb"] = round(daemon.rss() / 2**20, 1)
        with TimerClient(daemon.socket) as client:

            def list_one() -> None:
                got = client.command("list_timers", CONNECTOR, personaId=rng.choice(personas))
                if not got["timers"]:
                    raise BenchError("list_timers found nothing")

            _timed(list_one, 5)  # warm-up
            result["list_timers_100"] = summarize_ms(_timed(list_one, 200))
            result["status"] = summarize_ms(_timed(client.status, 50))
            status = client.status()
        stored = sum(status["timers"].values())
        if stored != n:
            raise BenchError(f"status counts {stored} timers, {n} stored")
        far = iso_z(utcnow() + timedelta(days=2))
        lines = [
            encode(set_timer_message(i, f"new-{i // 1000:05d}", f"t{i:07d}", fire_at=far))
            for i in range(COMMANDS)
        ]
        result["commands"] = _pipelined(daemon.socket, lines)
        t0 = time.time() + _lead(BURST)
        margin = _load_due(db, daemon, list(burst_specs(BURST, from_epoch(t0))), t0)
        done = wait_for_events(db, BURST, 120)
        if done is None:
            raise BenchError(f"{label}: the burst did not fire in 120 s")
        result["burst"] = {
            "n": BURST,
            "setup_margin_s": margin,
            "durable_per_s": round(BURST / (done - t0), 1),
        }
        result["rss_end_mb"] = round(daemon.rss() / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--n", default="1000000,10000000", help="stored timers, comma-separated")
    parser.add_argument("--db", default="sqlite,postgres")
    parser.add_argument("--pg", default=DEFAULT_PG_ADMIN, help="PostgreSQL admin URL")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.n.split(",")]
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "results": {}}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for kind in args.db.split(","):
            db = Database(kind, Path(tmp), args.pg)
            db.setup()
            try:
                for n in sizes:
                    r = measure(db, Path(tmp), n)
                    out["results"].setdefault(kind, {})[str(n)] = r
                    log(f"{kind} {n}: {json.dumps(r)}")
            finally:
                stop_all_daemons()
                db.cleanup()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(table(out))
    print(f"json: {path}")
    return 0


def table(out: dict[str, Any]) -> str:
    rows = [
        "db        timers      B/timer  start s  RSS MB  list p99 ms  status p50/p99 ms  "
        "set_timer/s  burst fired/s"
    ]
    for kind, by_n in out["results"].items():
        for n, r in by_n.items():
            rows.append(
                f"{kind:<9} {int(n):>11,} {r['bytes_per_timer']:>8.0f} {r['start_s']:>8.2f} "
                f"{r['rss_end_mb']:>7.1f} {r['list_timers_100']['p99_ms']:>12.2f} "
                f"{r['status']['p50_ms']:>8.2f}/{r['status']['p99_ms']:<8.2f} "
                f"{r['commands']['per_s']:>12,.0f} {r['burst']['durable_per_s']:>14,.0f}"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
