"""The cost of a group of commands, in process: what the daemon pays per ``set_timer``.

    python -m bench.command_batch                      # SQLite, 40 groups of 256
    python -m bench.command_batch --db postgres --n 20

A pipelining client's commands reach the store worker in groups (one transaction each). This
runs, per group of ``--size`` new timers (default 256, the benchmark client's window): the
request lines decoded and validated as the event loop does (:func:`decode_line`), the daemon's
own :func:`apply_batch` in one transaction, and every reply encoded; it prints the time per
command, and the thread's CPU time per command. No socket, no threads, no event loop: what is
left of a command's cost in the daemon (about as much again) is the event loop's and the hand
over to the store worker. Under ``valgrind --tool=callgrind`` the instruction count of two
runs with different ``--n`` gives the instructions per command, the steadiest A/B measure on a
noisy machine.
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta

import orjson

from bench.common import one_database_args, scratch_database, set_timer_message
from program_timer.scheduler.commands import CommandSettings, apply_batch
from program_timer.scheduler.protocol import CommandRequest, decode_line, encode, ok_reply
from program_timer.store import queries
from program_timer.store.db import KeptConnections, make_engine, read_modify_write


def measure(url: str, n: int, size: int = 256) -> list[tuple[float, float]]:
    """(seconds, CPU seconds) of each of ``n`` groups of ``size`` new ``set_timer``."""
    plain = make_engine(url)
    engine = read_modify_write(plain)
    kept = KeptConnections(plain)  # as the store worker keeps its connection while work comes
    far = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    settings = CommandSettings()
    lines = [
        orjson.dumps(set_timer_message(i, f"cmd-{i // 1000:05d}", f"t{i:07d}", fire_at=far))
        for i in range(n * size)
    ]
    times = []
    try:
        for b in range(n):
            started, cpu = time.perf_counter(), time.thread_time()
            requests = [decode_line(line) for line in lines[b * size : (b + 1) * size]]
            commands = [r for _, r in requests if isinstance(r, CommandRequest)]
            with kept.pipelined_transaction(engine=engine) as conn:  # as the worker runs a group
                outcomes = apply_batch(conn, commands, settings, datetime.now(UTC))
                queries.commit_in_pipeline(conn)
            for (rid, _), outcome in zip(requests, outcomes, strict=True):
                if outcome.result is None:
                    raise RuntimeError(f"a command was refused: {outcome.error}")
                encode(ok_reply(rid, outcome.result))
            times.append((time.perf_counter() - started, time.thread_time() - cpu))
        kept.release()
        return times
    finally:
        plain.dispose()


def main() -> None:
    args = one_database_args(__doc__.splitlines()[0], 40, size=True, default_size=256)
    with scratch_database(args.db, args.pg_url, "commands") as (url, _):
        times = measure(url, args.n, args.size)
    per = [t / args.size * 1e6 for t, _ in times]
    cpu = [c / args.size * 1e6 for _, c in times]
    print(
        f"{args.db}: {args.n} groups of {args.size} set_timer, commit included: "
        f"median {statistics.median(per):,.1f} us a command ({statistics.median(cpu):,.1f} us "
        f"of CPU), min {min(per):,.1f} us"
    )


if __name__ == "__main__":
    main()
