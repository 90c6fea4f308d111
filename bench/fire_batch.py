"""The cost of one small fire batch, in process: what a steady rate pays per fire.

    python -m bench.fire_batch                      # SQLite, 3,000 batches
    python -m bench.fire_batch --db postgres --n 2000
    python -m bench.fire_batch --size 1000 --n 20   # full batches: what a burst pays per fire
    python -m bench.fire_batch --db postgres --size 1000 --n 4 --wal   # WAL bytes a fire

At a steady rate every fire is its own batch (``scheduler/firing.py``: a timer due within a few
milliseconds is waited for and fired alone), so the fixed cost of a batch is the floor under
the steady rows' lateness and read latency. This runs the daemon's own :func:`fire_batch` and
``next_due_later`` in a loop as the daemon does (on a connection kept from one transaction to
the next; on PostgreSQL in a pipeline from BEGIN to COMMIT, ids taken with the claim), one due
one-shot timer per transaction, with one attached subscription taking direct sends, and prints
the time per batch, commit included. No socket,
no threads: the figure is the store path alone, steadier than the daemon's rows. With
``--size`` each batch fires that many timers (a burst's batches are 1,000): the time per fire
is then the fire path's own cost under a burst.

With ``--wal`` (PostgreSQL) it prints instead the WAL the server wrote a fire, its timer's
creation included: the WAL records that change the benchmark's database (``pg_walinspect``,
created there) over ``--n`` batches and over one, each on a fresh database, the difference
divided by the fires between. What the server does for a fire is not in this process's time
or instructions; its WAL is, whatever the machine's speed or what else the server runs.
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, text

from bench.common import one_database_parser, scratch_database
from program_timer.core import rules
from program_timer.core.model import Limits, SetCommand
from program_timer.scheduler.firing import Direct, fire_batch
from program_timer.store import queries
from program_timer.store.db import KeptConnections, make_engine, transaction


def measure(url: str, n: int, size: int = 1) -> list[float]:
    engine = make_engine(url)
    now = datetime.now(UTC)
    try:
        with transaction(engine) as conn:
            queries.upsert_subscription(
                conn,
                {
                    "subscription_id": "bench",
                    "flow_instance_id": "bench",
                    "filter_connector_idn": None,
                    "filter_persona_id": None,
                    "attached_to": "bench",
                    "attached_at": now,
                    "created_at": now,
                },
            )
            due = now - timedelta(seconds=10)
            queries.insert_timers(
                conn,
                [
                    rules.apply_set(
                        None,
                        SetCommand(
                            persona_id=f"p{i % 50}",
                            timer_name=f"t{i}",
                            connector_idn="bench",
                            command_act_id=f"a{i}",
                            fire_at=due + timedelta(microseconds=i),
                            given=frozenset({"fireAt"}),
                        ),
                        due - timedelta(seconds=1),
                        Limits(),
                    )[0]
                    for i in range(n * size)
                ],
            )
        times = []
        kept = KeptConnections(engine)  # as the fire loop keeps its connection for a pass
        for _ in range(n):
            started = time.perf_counter()
            with kept.pipelined_transaction() as conn:
                result = fire_batch(
                    conn,
                    datetime.now(UTC),
                    size,
                    "bench",
                    None,
                    Direct({"bench": size}, now),
                    reserve=(size, size),  # what the fire loop takes after such a batch
                )
                next_due = queries.next_due_later(conn)
                queries.commit_in_pipeline(conn)
            next_due()
            times.append(time.perf_counter() - started)
            if result.fired != size or len(result.sends) != size:
                raise RuntimeError(f"a batch fired {result.fired}, sent {len(result.sends)}")
        kept.release()
        return times
    finally:
        engine.dispose()


def wal_per_fire(pg_url: str, n: int, size: int) -> float:
    """WAL bytes a fire (its timer's creation included): the WAL records of the benchmark's
    database over ``n`` batches of ``size`` and over one, each on a fresh database, the
    difference divided by the ``(n - 1) * size`` fires between."""
    if n < 2:
        raise ValueError("--wal needs --n 2 or more")
    written = []
    for batches in (1, n):
        with scratch_database("postgres", pg_url, "wal") as (url, _):
            engine = make_engine(url)
            try:
                with engine.connect() as conn:
                    conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_walinspect"))
                    conn.commit()
                    start = conn.execute(text("SELECT pg_current_wal_lsn()")).scalar_one()
                    measure(url, batches, size)
                    written.append(_database_wal(conn, start))
            finally:
                engine.dispose()
    return (written[1] - written[0]) / ((n - 1) * size)


def _database_wal(conn: Connection, start: str) -> int:
    """Bytes of the WAL records since ``start`` that change this connection's database (by
    ``pg_walinspect``): what other databases of the server write at the same time is left
    out. Read once the server has flushed them."""
    end = conn.execute(text("SELECT pg_current_wal_lsn()")).scalar_one()
    conn.commit()
    deadline = time.monotonic() + 10
    while not conn.execute(
        text("SELECT pg_current_wal_flush_lsn() >= CAST(:end AS pg_lsn)"), {"end": end}
    ).scalar_one():
        conn.commit()
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not flush its WAL within 10 s")
        time.sleep(0.05)
    total = conn.execute(
        text(
            "SELECT coalesce(sum(record_length), 0) FROM pg_get_wal_records_info("
            "CAST(:start AS pg_lsn), CAST(:end AS pg_lsn)) WHERE block_ref ~ ("
            "' rel [0-9]+/' || (SELECT oid FROM pg_database WHERE datname = current_database())"
            " || '/')"
        ),
        {"start": start, "end": end},
    ).scalar_one()
    conn.commit()
    return int(total)


def main() -> None:
    parser = one_database_parser(__doc__.splitlines()[0], 3000, size=True)
    parser.add_argument("--wal", action="store_true", help="WAL bytes a fire (PostgreSQL)")
    args = parser.parse_args()
    if args.wal:
        if args.db != "postgres":
            parser.error("--wal measures PostgreSQL's WAL: add --db postgres")
        wal = wal_per_fire(args.pg_url, args.n, args.size)
        print(f"postgres: {wal:,.1f} bytes of WAL a fire (batches of {args.size:,})")
        return
    with scratch_database(args.db, args.pg_url, "batch") as (url, _):
        times = sorted(measure(url, args.n, args.size))
    us = [t * 1e6 for t in times]
    what = "one-fire batch" if args.size == 1 else f"batch of {args.size:,} fires"
    per_fire = f", {statistics.median(us) / args.size:,.1f} us a fire" if args.size > 1 else ""
    print(
        f"{args.db}: {what}, commit included, {args.n} batches: "
        f"median {statistics.median(us):,.0f} us, mean {statistics.mean(us):,.0f} us, "
        f"p90 {us[int(len(us) * 0.9)]:,.0f} us{per_fire}"
    )


if __name__ == "__main__":
    main()
