"""Run the whole benchmark with one command:

    python -m bench.run                       # full sizes, SQLite and PostgreSQL
    python -m bench.run --sizes small         # tiny sizes, under a minute
    python -m bench.run --db sqlite --out bench/results/

On each database, in one run: the daemon (burst, burst with one acking subscriber, steady rate,
pipelined commands, commands during a burst, 1,000,000 stored timers), stock APScheduler (burst
and steady) and the bare batched-SQL ceiling (burst); on PostgreSQL only, a burst fired by 1, 2
and 3 daemons sharing the database, and the same with one of them SIGKILLed mid-burst
(``multi``). Prints a table with the ratios, writes the raw figures as JSON and a PNG of the
lateness distribution into ``--out``.

PostgreSQL: ``--pg-url`` (or ``BENCH_PG_URL``) names a server and a database to connect to as an
administrator (default ``postgresql://postgres@127.0.0.1:5432/test``); the benchmark creates its
own database ``bench_<random>`` there and drops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import signal
import sys
import tempfile
import time
import timeit
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import calendar_burst, ceiling, flow, multi, ours, stock_apscheduler
from bench.common import DEFAULT_PG_ADMIN, Database, log, stop_all_daemons
from bench.report import format_table


@dataclass(frozen=True)
class Sizes:
    burst: int  # timers due at one instant (ours and the ceiling)
    burst_delivered: int  # the same with one acking subscriber
    steady_rate: float  # fires per second ...
    steady_seconds: float  # ... for this long
    commands: int  # pipelined set_timer commands
    during_burst: int  # burst size while a client sends commands
    scale: int  # stored timers for start time, memory, list_timers
    list_calls: int
    stock_burst: int  # stock APScheduler is slow: a smaller burst
    stock_steady_seconds: float
    multi: int  # burst fired by several daemons on one PostgreSQL database
    steady_high_rate: float  # steady_read's second rate (steady_seconds long too)


SIZES = {
    "full": Sizes(
        20_000, 20_000, 1000, 30, 20_000, 20_000, 1_000_000, 100, 2_000, 30, 20_000, 5000
    ),
    "small": Sizes(1_000, 1_000, 1000, 1.5, 2_000, 2_000, 20_000, 20, 300, 1.5, 1_000, 5000),
    # For the smoke test only: exercises every code path in seconds.
    "tiny": Sizes(200, 200, 200, 0.5, 200, 200, 2_000, 5, 50, 1, 200, 400),
}

SCENARIOS = (
    "ceiling",
    "burst",
    "calendar",
    "burst_delivered",
    "steady",
    "steady_read",
    "commands",
    "commands_4",
    "commands_during_burst",
    "multi",
    "stock",
    "scale",
)


def stock_steady_rate(sizes: Sizes, stock_burst_rate: float | None) -> float:
    """Stock APScheduler's steady rate: ours if it can sustain it, else about half of what it
    fired in its burst (its sustainable rate), in steps of 50 per second."""
    if not stock_burst_rate:
        return min(sizes.steady_rate, 100)
    return float(min(sizes.steady_rate, max(50, int(stock_burst_rate * 0.5 / 50) * 50)))


def run_database(
    kind: str,
    sizes: Sizes,
    workdir: Path,
    *,
    pg_url: str,
    scenarios: set[str],
    profile_dir: Path | None,
    stock_rate: float | None,
) -> dict[str, Any]:
    db = Database(kind, workdir, pg_url)
    db.setup()
    out: dict[str, Any] = {"errors": {}, "skipped": {}}
    if db.pg_name:
        out["database"] = db.pg_name  # created for the run, dropped at its end

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        load = os.getloadavg()[0]
        before = db.checkpoints()  # outside the scenario: a failure to ask only drops the figure
        t = time.monotonic()
        log(f"{kind}: {name} ...")
        try:
            result = fn()
        except Exception as exc:
            log(f"{kind}: {name} FAILED: {exc}")
            traceback.print_exc()
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
            stop_all_daemons()
            return None
        result["elapsed_s"] = round(time.monotonic() - t, 2)
        result["load_before"] = round(load, 2)
        after = db.checkpoints()
        if before is not None and after is not None:
            # the server's checkpoints met by the scenario (the table notes them)
            result["checkpoints"] = {"started": after[0] - before[0], "running_at_start": before[1]}
        out[name] = result
        brief = {k: v for k, v in result.items() if not k.endswith("_samples_s")}
        log(f"{kind}: {name}: {json.dumps(brief)}")
        return result

    def prof(name: str) -> Path | None:
        return None if profile_dir is None else profile_dir / f"profile-{kind}-{name}.txt"

    def steady_read(name: str, rate: float) -> dict[str, Any]:
        return flow.run_steady_read(
            db,
            workdir,
            rate,
            sizes.steady_seconds,
            label=name.replace("_", "-"),
            profile=prof(name),
        )

    try:
        if "ceiling" in scenarios:
            step(
                "ceiling_burst", lambda: ceiling.run_ceiling_burst(db, sizes.burst, label="ceiling")
            )
        if "burst" in scenarios:
            step(
                "burst",
                lambda: ours.run_burst(
                    db, workdir, sizes.burst, label="burst", profile=prof("burst")
                ),
            )
        if "calendar" in scenarios:
            step(
                "calendar",
                lambda: calendar_burst.run_calendar_burst(
                    db, workdir, sizes.burst, label="calendar"
                ),
            )
        if "burst_delivered" in scenarios:
            step(
                "burst_delivered",
                lambda: ours.run_burst(
                    db,
                    workdir,
                    sizes.burst_delivered,
                    label="burst-delivered",
                    subscriber=True,
                    profile=prof("burst_delivered"),
                ),
            )
        if "steady" in scenarios:
            step(
                "steady",
                lambda: ours.run_steady(
                    db,
                    workdir,
                    sizes.steady_rate,
                    sizes.steady_seconds,
                    label="steady",
                    profile=prof("steady"),
                ),
            )
        if "steady_read" in scenarios:
            for name, rate in (
                ("steady_read", sizes.steady_rate),
                ("steady_read_high", sizes.steady_high_rate),
            ):
                step(name, functools.partial(steady_read, name, rate))
        if "commands" in scenarios:
            step(
                "commands",
                lambda: ours.run_commands(
                    db, workdir, sizes.commands, label="commands", profile=prof("commands")
                ),
            )
        if "commands_4" in scenarios:
            step(
                "commands_4",
                lambda: flow.run_commands_clients(
                    db, workdir, sizes.commands, label="commands-4", profile=prof("commands_4")
                ),
            )
        if "commands_during_burst" in scenarios:
            step(
                "commands_during_burst",
                lambda: ours.run_commands_during_burst(
                    db, workdir, sizes.during_burst, label="commands-during-burst"
                ),
            )
        if "multi" in scenarios:
            run_multi(db, workdir, sizes.multi, step, out)
        if "stock" in scenarios:
            burst = step(
                "stock_burst",
                lambda: stock_apscheduler.run_stock_burst(
                    db, sizes.stock_burst, label="stock-burst"
                ),
            )
            burst_rate = burst.get("durable_per_s") if burst else None
            rate = stock_rate or stock_steady_rate(sizes, burst_rate)
            step(
                "stock_steady",
                lambda: stock_apscheduler.run_stock_steady(
                    db, rate, sizes.stock_steady_seconds, label="stock-steady"
                ),
            )
            if "steady" in scenarios and rate != sizes.steady_rate:
                step(
                    "steady_at_stock_rate",
                    lambda: ours.run_steady(
                        db, workdir, rate, sizes.stock_steady_seconds, label="steady-low"
                    ),
                )
        if "scale" in scenarios:
            step(
                "scale",
                lambda: ours.run_scale(
                    db,
                    workdir,
                    sizes.scale,
                    label="scale",
                    list_calls=sizes.list_calls,
                    profile=prof("list_timers"),
                ),
            )
    finally:
        stop_all_daemons()
        db.cleanup()
    return out


def run_multi(
    db: Database,
    workdir: Path,
    n: int,
    step: Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any] | None],
    out: dict[str, Any],
) -> None:
    """The multi-daemon scenario: a burst with 1, 2, 3 daemons (``multi_1`` …), then with one
    SIGKILLed mid-burst (``multi_kill_2`` …). PostgreSQL only: skipped with a note on SQLite."""
    if db.kind != "postgres":
        out["skipped"]["multi"] = "SQLite is single-daemon (a second daemon is refused)"
        log(f"{db.kind}: multi skipped: {out['skipped']['multi']}")
        return
    for k in multi.DAEMON_COUNTS:
        step(
            f"multi_{k}",
            functools.partial(multi.run_multi_burst, db, workdir, n, k, label=f"multi{k}"),
        )
    for k in multi.KILL_COUNTS:
        # Killed at half the time the same burst took without a kill (or at half the events).
        plain = out.get(f"multi_{k}") or {}
        hint = plain.get("durable_s")
        step(
            f"multi_kill_{k}",
            functools.partial(
                multi.run_multi_burst,
                db,
                workdir,
                n,
                k,
                label=f"mkill{k}",
                kill=True,
                kill_hint_s=hint / 2 if hint else None,
            ),
        )
    names = [f"multi_{k}" for k in multi.DAEMON_COUNTS]
    names += [f"multi_kill_{k}" for k in multi.KILL_COUNTS]
    for name in names:
        r = out.get(name)
        if r and not r["exactly_once"]:
            out["errors"][name] = (
                f"not exactly once: {r['duplicates']} fired twice or more, {r['missing']} missing"
            )


def machine_probe_us() -> float:
    """The machine's speed for pure Python now: µs for the README's probe, ``python -m timeit
    "d={}" "for i in range(1000): d[i]=str(i)"`` (best of 5). The same machine has run it in 56
    to 174 µs: a run's rates are read against its own probe, before and after."""
    loop = timeit.Timer("for i in range(1000): d[i]=str(i)", "d={}")
    return round(min(loop.repeat(repeat=5, number=500)) / 500 * 1e6, 1)


def run(
    sizes_name: str,
    databases: list[str],
    out_dir: Path,
    *,
    pg_url: str = DEFAULT_PG_ADMIN,
    scenarios: set[str] | None = None,
    profile: bool = False,
    stock_rate: float | None = None,
    plot: bool = True,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the benchmark; returns the results and the files written."""
    sizes = SIZES[sizes_name]
    scenarios = set(scenarios or SCENARIOS)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = out_dir / f"bench-{sizes_name}-{stamp}"
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "sizes": sizes_name,
            "size_values": asdict(sizes),
            "databases": databases,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_before": os.getloadavg()[0],
            "probe_us_before": machine_probe_us(),
            "scenarios": sorted(scenarios),
            "versions": _versions(),
        }
    }
    profile_dir = out_dir if profile else None
    with tempfile.TemporaryDirectory(prefix="ptbench-") as tmp:
        for kind in databases:
            results[kind] = run_database(
                kind,
                sizes,
                Path(tmp),
                pg_url=pg_url,
                scenarios=scenarios,
                profile_dir=profile_dir,
                stock_rate=stock_rate,
            )
    results["meta"]["load_after"] = os.getloadavg()[0]
    results["meta"]["probe_us_after"] = machine_probe_us()
    results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)

    # Raw lateness samples go to a file of their own; the main JSON keeps the summaries.
    samples: dict[str, dict[str, Any]] = {}
    for kind in databases:
        series = {}
        for key, name, label in (
            ("ours", "steady", "program-timer"),
            ("ours_low", "steady_at_stock_rate", "program-timer"),
            ("stock", "stock_steady", "stock APScheduler"),
        ):
            data = results[kind].get(name)
            if data and "lateness_samples_s" in data:
                series[key] = {
                    "label": f"{label} @ {data['rate']:g}/s",
                    "lateness_s": data.pop("lateness_samples_s"),
                }
        for key, name in (("read", "steady_read"), ("read_high", "steady_read_high")):
            data = results[kind].get(name)
            if data and "read_latency_samples_s" in data:
                # scheduledAt -> read by the subscriber: kept here, not drawn in the plot.
                series[key] = {
                    "label": f"program-timer @ {data['rate']:g}/s, read by a subscriber",
                    "read_latency_s": data.pop("read_latency_samples_s"),
                }
        samples[kind] = series
    files = {"json": base.with_suffix(".json"), "samples": Path(f"{base}-lateness.json")}
    files["json"].write_text(json.dumps(results, indent=2) + "\n")
    files["samples"].write_text(json.dumps(samples) + "\n")
    table = format_table(results)
    files["table"] = base.with_suffix(".txt")
    files["table"].write_text(table + "\n")
    if plot and any("lateness_s" in v for series in samples.values() for v in series.values()):
        from bench.plot import plot_lateness

        try:
            files["png"] = plot_lateness(samples, base.with_suffix(".png"))
        except ImportError:
            log("matplotlib is missing (pip install matplotlib, or the [bench] extra): no plot")
    return results, files


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("program-timer", "APScheduler", "SQLAlchemy", "psycopg"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes", choices=sorted(SIZES), default="full")
    parser.add_argument(
        "--db", default="sqlite,postgres", help="comma-separated: sqlite, postgres (default both)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", DEFAULT_PG_ADMIN),
        help="PostgreSQL server to create the benchmark database on",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of: {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--stock-steady-rate",
        type=float,
        default=None,
        help="stock APScheduler's steady rate (default: about half its burst rate)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record the daemon with py-spy (burst, delivery, steady, steady_read, commands, "
        "commands_4, list_timers) into --out; summarize with python -m bench.profile_summary",
    )
    args = parser.parse_args(argv)
    databases = [d.strip() for d in args.db.split(",") if d.strip()]
    for d in databases:
        if d not in ("sqlite", "postgres"):
            parser.error(f"--db: unknown database {d!r}")
    scenarios = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    if unknown := scenarios - set(SCENARIOS):
        parser.error(f"--scenarios: unknown {', '.join(sorted(unknown))}")

    # SIGTERM/SIGHUP: unwind normally so that daemons are stopped and databases dropped.
    def _exit(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)
    try:
        results, files = run(
            args.sizes,
            databases,
            args.out,
            pg_url=args.pg_url,
            scenarios=scenarios,
            profile=args.profile,
            stock_rate=args.stock_steady_rate,
        )
    finally:
        stop_all_daemons()
    print()
    print(files["table"].read_text(), end="")
    print()
    for what, path in files.items():
        print(f"{what:>8}: {path}")
    failed = [f"{k}/{n}" for k in databases for n in results[k].get("errors", {})]
    if failed:
        print(f"FAILED scenarios: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
