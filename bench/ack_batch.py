"""The cost of acks, in process: what the daemon's ack writes pay per acked delivery.

    python -m bench.ack_batch                          # SQLite, 20,000 deliveries
    python -m bench.ack_batch --db postgres --size 333

A subscriber acks what it read: during the burst with one subscriber (``burst_delivered``) that
is about 60 acks of 300 to 400 delivery ids each. This fires ``--n`` one-shot timers with one
attached subscription (the daemon's own ``fire_batch``, batches of 1,000, deliveries written as
sent), then acks them ``--size`` ids at a time with the daemon's own ``ack_deliveries``, one
transaction each, and prints per acked delivery: the time of the whole transaction, the time of
the ack statement alone, and the CPU time of this process (what is left of the time is the
database's: PostgreSQL's server, or SQLite's writing outside the GIL counted in both). No socket,
no threads; each transaction runs as the daemon's store worker runs an ack (on the connection it
keeps; on PostgreSQL in one pipeline from its BEGIN to its COMMIT, committed without waiting for
the disk), the commit in the first figure only.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from bench.common import one_database_args, scratch_database
from bench.fire_batch import measure as fire
from program_timer.store import queries
from program_timer.store.db import KeptConnections, make_engine
from program_timer.store.schema import deliveries


def measure(url: str, n: int, size: int) -> tuple[float, float, float]:
    """(seconds, seconds in the ack statement, CPU seconds) per acked delivery."""
    fire(url, max(1, n // 1000), 1000)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ids = list(
                conn.execute(deliveries.select().with_only_columns(deliveries.c.id)).scalars()
            )
        total = statement = 0.0
        kept = KeptConnections(engine)  # as the worker keeps its connection while work comes
        cpu = time.process_time()
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            began = time.perf_counter()
            with kept.pipelined_transaction(durable=False) as conn:
                ack_began = time.perf_counter()
                acked = queries.ack_deliveries(conn, chunk, ["bench"], datetime.now(UTC))
                statement += time.perf_counter() - ack_began
                queries.commit_in_pipeline(conn)
            total += time.perf_counter() - began
            if len(acked) != len(chunk):
                raise RuntimeError(f"acked {len(acked)} of {len(chunk)}")
        cpu = time.process_time() - cpu
        kept.release()
        return total / len(ids), statement / len(ids), cpu / len(ids)
    finally:
        engine.dispose()


def main() -> None:
    args = one_database_args(__doc__.splitlines()[0], 20000, size=True, default_size=333)
    with scratch_database(args.db, args.pg_url, "ack") as (url, _):
        total, statement, cpu = measure(url, args.n, args.size)
    print(
        f"{args.db}: acks of {args.size} ids, {args.n:,} deliveries: per acked delivery "
        f"{total * 1e6:.1f} us with the commit, {statement * 1e6:.1f} us in the statement, "
        f"{cpu * 1e6:.1f} us of CPU here"
    )


if __name__ == "__main__":
    main()
