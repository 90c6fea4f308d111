"""The benchmark (bench/, outside the package) runs end to end on tiny sizes, so it cannot rot:
every scenario on SQLite, and the multi-daemon one on PostgreSQL (skipped when no server is
reachable, failed instead under ``CI=true``, as the other PostgreSQL tests). Nothing here judges
speed: only that every scenario ran and reported its figures."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import ack_batch as bench_ack_batch  # noqa: E402
from bench import command_batch as bench_command_batch  # noqa: E402
from bench import command_cpu as bench_command_cpu  # noqa: E402
from bench import common as bench_common  # noqa: E402
from bench import fire_batch as bench_fire_batch  # noqa: E402
from bench import multi as bench_multi  # noqa: E402
from bench import run as bench_run  # noqa: E402
from bench.report import format_table  # noqa: E402
from tests.conftest import PG_ADMIN  # noqa: E402


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


@pytest.mark.timeout(110)
def test_benchmark_runs_every_scenario_on_tiny_sizes(tmp_path: Path) -> None:
    results, files = bench_run.run("tiny", ["sqlite"], tmp_path / "results")

    r = results["sqlite"]
    assert r["errors"] == {}
    for name in (
        "ceiling_burst",
        "burst",
        "burst_delivered",
        "steady",
        "steady_read",
        "steady_read_high",
        "commands",
        "commands_4",
        "commands_during_burst",
        "stock_burst",
        "stock_steady",
        "scale",
    ):
        assert name in r, name
    sizes = bench_run.SIZES["tiny"]
    assert r["burst"]["n"] == sizes.burst
    assert _positive(r["burst"]["durable_per_s"])
    assert _positive(r["ceiling_burst"]["durable_per_s"])
    assert _positive(r["stock_burst"]["durable_per_s"])
    assert r["burst_delivered"]["received"] >= sizes.burst_delivered
    assert _positive(r["burst_delivered"]["delivered_acked_per_s"])
    assert r["steady"]["lateness"]["n"] == int(sizes.steady_rate * sizes.steady_seconds)
    assert r["stock_steady"]["lateness"]["n"] == r["stock_steady"]["n"]
    # Read by a subscriber (its own process), at the steady rate and at the high one: every
    # event read once and acked, each with its latency; the committed lateness too.
    for name, rate in (
        ("steady_read", sizes.steady_rate),
        ("steady_read_high", sizes.steady_high_rate),
    ):
        read = r[name]
        n = int(rate * sizes.steady_seconds)
        assert read["rate"] == rate and read["n"] == n
        assert read["received"] == n and read["acked"] == n and read["resent"] == 0
        assert 0 < read["ack_requests"] < n  # batched
        assert read["read_latency"]["n"] == n and read["lateness"]["n"] == n
        assert _positive(read["read_latency"]["p99_ms"])
        # Read after it fired: scheduledAt -> read covers the fire's lateness.
        assert read["read_latency"]["p50_ms"] >= read["fired_to_read"]["p50_ms"]
        assert "read_latency_samples_s" not in read  # moved to the samples file
    assert r["commands"]["errors"] == {}
    assert _positive(r["commands"]["per_s"])
    four = r["commands_4"]
    assert four["clients"] == 4 and four["per_client"] == sizes.commands
    assert four["n"] == 4 * sizes.commands and four["errors"] == {}
    assert four["reply_time"]["n"] == four["n"]
    assert len(four["per_client_per_s"]) == 4 and all(map(_positive, four["per_client_per_s"]))
    assert _positive(four["per_s"])
    assert r["commands_during_burst"]["errors"] == 0
    scale = r["scale"]
    assert scale["n"] == sizes.scale
    assert _positive(scale["start_s"])
    assert _positive(scale["rss_after_start_mb"])
    assert _positive(scale["list_timers_100"]["p50_ms"])
    # Several daemons need PostgreSQL: skipped with a note on SQLite.
    assert "single-daemon" in r["skipped"]["multi"]
    assert "checkpoints" not in r["burst"]  # PostgreSQL's only
    assert not any(name.startswith("multi_") for name in r)

    # The files: raw figures, lateness samples, the table, and the plot.
    meta = json.loads(files["json"].read_text())["meta"]
    assert meta["sizes"] == "tiny"
    # The machine's speed before and after, to read the run's rates against.
    assert _positive(meta["probe_us_before"]) and _positive(meta["probe_us_after"])
    samples = json.loads(files["samples"].read_text())["sqlite"]
    assert {"ours", "stock", "read", "read_high"} <= set(samples)
    assert len(samples["read_high"]["read_latency_s"]) == r["steady_read_high"]["n"]
    table = files["table"].read_text()
    assert "stock APS" in table and "ceiling" in table and "sqlite" in table
    assert table.strip() == format_table(results).strip()
    assert "sqlite: multi skipped" in table
    probe = f"{meta['probe_us_before']:.0f} us before / {meta['probe_us_after']:.0f} us after"
    assert probe in table
    assert table.count("scheduledAt → read by subscriber") == 2
    assert "4 clients together pipelining set_timer/s" in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert files["png"].stat().st_size > 0


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_multi_daemon_scenario_on_tiny_sizes_on_postgres(tmp_path: Path, pg_template: str) -> None:
    """``pg_template`` (tests/conftest.py) skips without a server, or fails under CI=true; the
    benchmark creates and drops its own database on the same server."""
    results, files = bench_run.run(
        "tiny", ["postgres"], tmp_path / "results", pg_url=PG_ADMIN, scenarios={"multi"}
    )

    r = results["postgres"]
    assert r["errors"] == {}
    n = bench_run.SIZES["tiny"].multi
    for k in bench_multi.DAEMON_COUNTS:
        run = r[f"multi_{k}"]
        assert run["daemons"] == k and run["n"] == n
        assert _positive(run["durable_per_s"])
        assert run["exactly_once"] and run["events"] == n
        assert sum(run["fires_by_daemon"].values()) == n
        assert list(run["fires_by_daemon"]) == list(bench_multi.DAEMON_IDS[:k])
    for k in bench_multi.KILL_COUNTS:
        run = r[f"multi_kill_{k}"]
        assert run["killed"] == bench_multi.KILLED
        assert run["exactly_once"] and run["events"] == n
        assert sum(run["fires_by_daemon"].values()) == n
        assert run["durable_s"] > 0 and run["after_kill_s"] >= 0

    stored = json.loads(files["json"].read_text())["postgres"]
    assert stored["multi_kill_2"]["fires_by_daemon"] == r["multi_kill_2"]["fires_by_daemon"]
    # Each scenario records the server's checkpoints it met, and the table notes them.
    for name in ("multi_1", "multi_kill_2"):
        met = r[name]["checkpoints"]
        assert met["started"] >= 0 and isinstance(met["running_at_start"], bool)
    for name in [k for k in r if k.startswith("multi_")]:
        r[name]["checkpoints"] = {"started": 0, "running_at_start": False}
    r["multi_1"]["checkpoints"] = {"started": 0, "running_at_start": True}
    assert "began a checkpoint" not in format_table(results)
    r["multi_2"]["checkpoints"] = {"started": 2, "running_at_start": True}
    r["multi_kill_3"]["checkpoints"] = {"started": 1, "running_at_start": False}
    assert (
        "Note: postgres: the server began a checkpoint during multi_2 (2 started), "
        "multi_kill_3 (1 started)"
    ) in format_table(results)
    table = files["table"].read_text()
    assert "coordination overhead" in table
    assert "multi-daemon burst" in table and "SIGKILLed" in table
    # Every daemon was stopped, and the benchmark's database dropped.
    assert not bench_common._RUNNING
    assert stored["database"].startswith("bench_")
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert stored["database"] not in names


@pytest.mark.postgres
def test_the_server_checkpoints_are_counted(tmp_path: Path, pg_template: str) -> None:
    assert bench_common.Database("sqlite", tmp_path).checkpoints() is None
    db = bench_common.Database("postgres", tmp_path, PG_ADMIN)
    db.setup()
    try:
        before = db.checkpoints()
        assert before is not None and before[1] in (True, False, None)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        # The server wakes CHECKPOINT before it publishes the checkpointer's counts: wait.
        deadline = time.monotonic() + 10
        while (after := db.checkpoints()) is not None and after[0] < before[0] + 1:
            assert time.monotonic() < deadline, "the CHECKPOINT was never counted"
            time.sleep(0.05)
        assert after is not None
    finally:
        db.cleanup()
    # A server that cannot be asked leaves the figure out instead of failing the scenario.
    assert db.checkpoints() is None  # its database is dropped


def test_command_line_refuses_unknown_options() -> None:
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--db", "oracle"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--scenarios", "nope"])
    assert exc.value.code == 2


@pytest.mark.parametrize("size", [1, 7])
def test_fire_batch_fires_size_timers_per_transaction_and_sends_them(
    tmp_path: Path, size: int
) -> None:
    from sqlalchemy import func, select

    from program_timer.store.db import make_engine
    from program_timer.store.schema import deliveries, events, timers

    url = bench_common.Database("sqlite", tmp_path).fresh("batch")
    times = bench_fire_batch.measure(url, 20, size)  # raises unless each batch fired and sent size
    assert len(times) == 20 and all(t > 0 for t in times)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(events)).scalar() == 20 * size
            sent = select(func.count()).where(deliveries.c.sent_at.is_not(None))
            assert conn.execute(sent).scalar() == 20 * size
            due = select(func.count()).where(timers.c.due_at.is_not(None))
            assert conn.execute(due).scalar() == 0
    finally:
        engine.dispose()


def test_command_batch_sets_every_timer_of_every_group(tmp_path: Path) -> None:
    from sqlalchemy import func, select

    from program_timer.store.db import make_engine
    from program_timer.store.schema import timers

    url = bench_common.Database("sqlite", tmp_path).fresh("commands")
    times = bench_command_batch.measure(url, 3, 5)  # raises if a command was refused
    assert len(times) == 3 and all(t > 0 and cpu > 0 for t, cpu in times)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(timers)).scalar() == 15
    finally:
        engine.dispose()


def test_command_cpu_counts_the_daemons_cpu_per_command(tmp_path: Path) -> None:
    db = bench_common.Database("sqlite", tmp_path)
    # Enough commands for some clock ticks (10 ms) of CPU in each process.
    r = bench_command_cpu.measure(db, tmp_path, 3000, "cpu")  # raises if a command was refused
    assert db.count("timers") == 3000
    assert _positive(r["per_s"]) and _positive(r["daemon_us"]) and _positive(r["client_us"])
    assert _positive(r["daemon_cores"])
    assert r["server_us"] == 0.0  # no database server on SQLite


def test_command_cpu_runs_the_daemon_under_a_wrapper_and_reads_its_instructions(
    tmp_path: Path,
) -> None:
    db = bench_common.Database("sqlite", tmp_path)
    # "env" runs the daemon as it is (SIGTERM reaches it): the commands are applied, and a log
    # without callgrind's line gives no count.
    assert bench_command_cpu.instructions(db, tmp_path, 300, "wrapped", wrapper=["env"]) is None
    assert db.count("timers") == 300
    with pytest.raises(RuntimeError, match="no instruction count"):
        bench_command_cpu.instructions_a_command(db, tmp_path, 30, wrapper=["env"])
    # callgrind's last line in a log (valgrind 3.19), thousands separators or not
    log = "==12079== Events    : Ir\n==12079== Collected : 4,891,681,057\n"
    assert bench_command_cpu._COLLECTED.findall(log) == ["4,891,681,057"]
    assert bench_command_cpu._COLLECTED.findall("==7== Collected : 123") == ["123"]


@pytest.mark.postgres
def test_fire_batch_counts_the_wal_a_fire_writes(pg_template: str) -> None:
    """``--wal``: the WAL a fire writes into its database, from two fresh databases (dropped
    after); the other tests writing to the same server at the same time are not counted. A
    fire writes its event, its delivery and its timer, each with its indexes: hundreds of
    bytes at the least, and far from a page a fire."""
    wal = bench_fire_batch.wal_per_fire(PG_ADMIN, 2, 200)
    assert 500 < wal < 8192, wal
    with pytest.raises(ValueError, match="--n 2"):
        bench_fire_batch.wal_per_fire(PG_ADMIN, 1, 200)


def test_ack_batch_acks_every_delivery(tmp_path: Path) -> None:
    from sqlalchemy import func, select

    from program_timer.store.db import make_engine
    from program_timer.store.schema import deliveries

    url = bench_common.Database("sqlite", tmp_path).fresh("acks")
    total, statement, cpu = bench_ack_batch.measure(url, 2000, 333)  # raises if one was not acked
    assert total >= statement > 0 and cpu > 0
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            pending = select(func.count()).where(deliveries.c.acked_at.is_(None))
            assert conn.execute(pending).scalar() == 0
    finally:
        engine.dispose()
