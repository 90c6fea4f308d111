"""Start to first ``ping``: the daemon restarted on an existing database, several times.

    python -m bench.start                          # SQLite, median of 6 restarts
    python -m bench.start --db postgres --n 10

The database is made and migrated first; the first start is not counted, every later one is a
restart as an operator or systemd does it: ``program-timer serve`` started, ``ping`` polled
every 2 ms until it answers, then SIGTERM. What it measures is mostly imports and opening the
store; ``python -m bench.scale`` measures the same on millions of stored timers.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.common import Daemon, one_database_args, scratch_database


def measure(url: str, workdir: Path, n: int) -> list[float]:
    daemon = Daemon(url, workdir, "start")
    times = []
    for i in range(n + 1):
        seconds = daemon.start()
        daemon.stop()
        if i:  # the first start warms the page cache and registers the daemon
            times.append(seconds)
    return times


def main() -> None:
    args = one_database_args(__doc__.splitlines()[0], 6)
    with scratch_database(args.db, args.pg_url, "start") as (url, folder):
        times = measure(url, folder, args.n)
    print(
        f"{args.db}: start to first ping, restart on an existing database, median of {args.n}: "
        f"{statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f})"
    )


if __name__ == "__main__":
    main()
