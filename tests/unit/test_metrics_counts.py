"""The daemon's own counters (scheduler/metrics.py): commands answered together."""

from __future__ import annotations

import pytest

from program_timer.scheduler.metrics import COMMAND_BUCKETS, Metrics


def test_commands_answered_together_count_each_command() -> None:
    m = Metrics()
    m.record_commands({("set_timer", "ok"): 3, ("get_timer", "not_found"): 2}, 0.004)
    m.record_commands({("set_timer", "ok"): 1}, 0.5)
    snap = m.snapshot()
    assert snap["commands"] == {("set_timer", "ok"): 4, ("get_timer", "not_found"): 2}
    assert m.commands == 6 and m.command_errors == 2
    set_timer = snap["command_latency"]["set_timer"]
    assert set_timer.count == 4
    assert set_timer.total == pytest.approx(3 * 0.004 + 0.5)
    buckets = dict(set_timer.buckets())
    assert buckets[float("inf")] == 4
    first_above = min(b for b in COMMAND_BUCKETS if b >= 0.004)
    assert buckets[first_above] == 3  # the three of the run, in one bucket
    assert snap["command_latency"]["get_timer"].count == 2
