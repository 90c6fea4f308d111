"""Where a pipelined command's CPU goes: the daemon's, the database server's and the client's.

    python -m bench.command_cpu                       # SQLite, 3 rounds of 20,000
    python -m bench.command_cpu --db postgres --n 20000
    python -m bench.command_cpu --callgrind --n 6000  # instructions a command (valgrind)

Each round starts a real daemon (``program-timer serve``) on a fresh database and has one
client pipeline ``--n`` new ``set_timer`` commands through its socket, as the ``commands``
row of ``bench.run`` does. Around the client's run it reads the CPU time of the daemon's
process and of every PostgreSQL server process (``/proc/<pid>/stat``) and of this process
(the client, ``getrusage``), and prints them per command with the rate and how many cores
the daemon kept busy. CPU per command moves less than a rate with what else the machine
runs, so it is the A/B measure for the socket side; a daemon at about one core is bound by
its one GIL, one well below it waits for its database.

With ``--callgrind`` the daemon runs under ``valgrind --tool=callgrind`` instead, once with
``--n`` commands and once with a third of them, and the difference of the instructions its
process executed (every thread: the event loop, the store worker) is divided by the
difference of the commands: the instructions a pipelined ``set_timer`` costs the daemon, the
same on a busy machine as on a quiet one (a daemon under valgrind starts in about half a
minute and runs some fifty times slower).
"""

from __future__ import annotations

import os
import re
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from bench.common import Daemon, Database, one_database_parser
from bench.ours import _pipelined, set_timer_lines

_TICK = os.sysconf("SC_CLK_TCK")


def _process_cpu(pid: int | str) -> float:
    """User + system CPU seconds of one process, from ``/proc``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _server_cpu() -> float:
    """CPU seconds of every PostgreSQL server process on this machine (0 without one)."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "postgres":
                    total += _process_cpu(pid)
        except OSError:
            continue  # ended meanwhile
    return total


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(db: Database, workdir: Path, n: int, label: str) -> dict[str, Any]:
    """One round: ``n`` pipelined ``set_timer`` on a fresh database; CPU µs per command."""
    url = db.fresh(label)
    lines = set_timer_lines(n)
    with Daemon(url, workdir, label) as daemon:
        daemon.start()
        before = (_process_cpu(daemon.pid), _server_cpu(), _client_cpu(), time.perf_counter())
        result = _pipelined(daemon.socket, lines)
        after = (_process_cpu(daemon.pid), _server_cpu(), _client_cpu(), time.perf_counter())
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} commands were refused")
    wall = after[3] - before[3]
    daemon_s, server_s, client_s = (after[i] - before[i] for i in range(3))
    return {
        "per_s": n / wall,
        "daemon_us": daemon_s / n * 1e6,
        "server_us": server_s / n * 1e6 if db.kind == "postgres" else 0.0,
        "client_us": client_s / n * 1e6,
        "daemon_cores": daemon_s / wall,
    }


CALLGRIND: Final = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
_COLLECTED: Final = re.compile(r"==\d+== Collected : ([\d,]+)")


def instructions(
    db: Database, workdir: Path, n: int, label: str, wrapper: Sequence[str] = CALLGRIND
) -> int | None:
    """The instructions the daemon's process executed from its start to its stop, with ``n``
    pipelined ``set_timer`` between, as ``wrapper`` (callgrind) wrote them in its log; None
    where the log has no such line."""
    url = db.fresh(label)
    lines = set_timer_lines(n)
    with Daemon(url, workdir, label, wrapper=wrapper) as daemon:
        daemon.start(timeout=600)
        result = _pipelined(daemon.socket, lines)
        daemon.stop(timeout=600)
        log = daemon.log_path.read_text(errors="replace")
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} commands were refused")
    found = _COLLECTED.findall(log)
    return int(found[-1].replace(",", "")) if found else None


def instructions_a_command(
    db: Database, workdir: Path, n: int, wrapper: Sequence[str] = CALLGRIND
) -> float:
    """Instructions a command: the daemon's with ``n`` commands less those with a third."""
    small = max(1, n // 3)
    few, many = (instructions(db, workdir, k, f"cg{k}", wrapper) for k in (small, n))
    if few is None or many is None:
        raise RuntimeError("the daemon's log has no instruction count: is valgrind installed?")
    return (many - few) / (n - small)


def main() -> None:
    parser = one_database_parser(__doc__.splitlines()[0], 20_000)
    parser.add_argument("--callgrind", action="store_true", help="instructions a command")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pt-cpu-") as folder:
        db = Database(args.db, Path(folder), args.pg_url)
        db.setup()
        try:
            if args.callgrind:
                per = instructions_a_command(db, Path(folder), args.n)
                print(f"{args.db}: {per:,.0f} instructions of the daemon a set_timer")
                return
            for i in range(3):
                r = measure(db, Path(folder), args.n, f"cpu{i}")
                print(
                    f"{args.db} round {i + 1}: {r['per_s']:,.0f} set_timer/s; CPU µs a command: "
                    f"daemon {r['daemon_us']:.1f} (at {r['daemon_cores']:.2f} cores), "
                    f"server {r['server_us']:.1f}, client {r['client_us']:.1f}"
                )
        finally:
            db.cleanup()


if __name__ == "__main__":
    main()
