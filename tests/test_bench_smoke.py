"""The benchmark (bench/, outside the package) runs end to end on tiny sizes, on SQLite only, so it
cannot rot. Nothing here judges speed: only that every scenario ran and reported its figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run as bench_run  # noqa: E402
from bench.report import format_table  # noqa: E402


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
        "commands",
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
    assert r["commands"]["errors"] == {}
    assert _positive(r["commands"]["per_s"])
    assert r["commands_during_burst"]["errors"] == 0
    scale = r["scale"]
    assert scale["n"] == sizes.scale
    assert _positive(scale["start_s"])
    assert _positive(scale["rss_after_start_mb"])
    assert _positive(scale["list_timers_100"]["p50_ms"])

    # The files: raw figures, lateness samples, the table, and the plot.
    assert json.loads(files["json"].read_text())["meta"]["sizes"] == "tiny"
    samples = json.loads(files["samples"].read_text())["sqlite"]
    assert {"ours", "stock"} <= set(samples)
    table = files["table"].read_text()
    assert "stock APS" in table and "ceiling" in table and "sqlite" in table
    assert table.strip() == format_table(results).strip()
    if importlib.util.find_spec("matplotlib") is not None:
        assert files["png"].stat().st_size > 0


def test_command_line_refuses_unknown_options() -> None:
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--db", "oracle"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--scenarios", "nope"])
    assert exc.value.code == 2
