"""In-memory figures of this daemon since it started: fires, drops, batches, commands by result,
lateness and latency histograms, database errors by kind.

``status`` reads them (and keeps the recent lateness window for its percentiles); ``/metrics``
(:mod:`program_timer.scheduler.prometheus`) exports them. Recording is cheap and thread-safe:
the fire thread records batches, the event loop records commands, any thread records database
errors; one lock, held for a few additions.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

# Upper bounds, seconds. Lateness: a healthy daemon is in the first few (SPEC 6: p99 ≤ 20 ms);
# the tail shows catch-up after downtime. Commands: a group commit is milliseconds.
LATENESS_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
)
COMMAND_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS: Final = (1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)
# Label values a client can choose are bounded: unknown commands count as "other".
MAX_LABELS: Final = 64


@dataclass
class Histogram:
    """A cumulative histogram: counts per upper bound (the last one: +Inf), count and sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.count += times
        self.total += value * times

    def buckets(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count), ``inf`` last."""
        out = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def copy(self) -> Histogram:
        clone = Histogram(self.bounds)
        clone.counts = list(self.counts)
        clone.count = self.count
        clone.total = self.total
        return clone


class Metrics:
    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.fires = 0
        self.dropped = 0
        self.batches = 0
        self._lateness: deque[float] = deque(maxlen=window)
        self._lateness_histogram = Histogram(LATENESS_BUCKETS)
        self._batch_sizes = Histogram(BATCH_BUCKETS)
        self._commands: dict[tuple[str, str], int] = {}
        self._command_latency: dict[str, Histogram] = {}
        self._database_errors: dict[str, int] = {}

    def record_batch(self, fired: int, dropped: int, lateness: list[float]) -> None:
        """One fire batch committed: ``lateness`` holds one figure (s) per fire."""
        with self._lock:
            self.fires += fired
            self.dropped += dropped
            self.batches += 1
            self._lateness.extend(lateness)
            self._batch_sizes.observe(fired)
            observe = self._lateness_histogram.observe
            for value in lateness:
                observe(value)

    def record_commands(self, answered: dict[tuple[str, str], int], seconds: float) -> None:
        """``command`` requests answered together (one run of the store worker), counted by
        (``commandIdn``, already bounded by the caller to the known commands and ``other``;
        ``ok`` or the error code); each took ``seconds``. One lock and one histogram update
        per kind, not per command."""
        with self._lock:
            commands = self._commands
            for key, times in answered.items():
                command, result = key
                if key not in commands and len(commands) >= MAX_LABELS * 4:
                    key = ("other", result)
                commands[key] = commands.get(key, 0) + times
                latency = self._command_latency.get(command)
                if latency is None:
                    if len(self._command_latency) >= MAX_LABELS:
                        command = "other"
                    latency = self._command_latency.setdefault(command, Histogram(COMMAND_BUCKETS))
                latency.observe(seconds, times)

    def record_database_error(self, kind: str) -> None:
        with self._lock:
            self._database_errors[kind] = self._database_errors.get(kind, 0) + 1

    @property
    def commands(self) -> int:
        with self._lock:
            return sum(self._commands.values())

    @property
    def command_errors(self) -> int:
        with self._lock:
            return sum(n for (_, result), n in self._commands.items() if result != "ok")

    def lateness(self) -> dict[str, float | None]:
        with self._lock:
            values = sorted(self._lateness)
        if not values:
            return {"samples": 0, "p50Ms": None, "p99Ms": None, "maxMs": None}

        def pct(p: float) -> float:
            return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 3)

        return {
            "samples": len(values),
            "p50Ms": pct(0.5),
            "p99Ms": pct(0.99),
            "maxMs": round(values[-1] * 1000, 3),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything, copied under the lock (for ``/metrics``)."""
        with self._lock:
            return {
                "fires": self.fires,
                "dropped": self.dropped,
                "batches": self.batches,
                "batch_sizes": self._batch_sizes.copy(),
                "lateness": self._lateness_histogram.copy(),
                "commands": dict(self._commands),
                "command_latency": {k: h.copy() for k, h in self._command_latency.items()},
                "database_errors": dict(self._database_errors),
            }
