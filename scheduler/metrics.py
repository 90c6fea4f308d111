"""In-memory figures for ``status``: fires, drops, and recent lateness (bounded window)."""

from __future__ import annotations

import threading
from collections import deque


class Metrics:
    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.fires = 0
        self.dropped = 0
        self.batches = 0
        self.commands = 0
        self.command_errors = 0
        self._lateness: deque[float] = deque(maxlen=window)

    def record_batch(self, fired: int, dropped: int, lateness: list[float]) -> None:
        with self._lock:
            self.fires += fired
            self.dropped += dropped
            self.batches += 1
            self._lateness.extend(lateness)

    def record_commands(self, total: int, errors: int) -> None:
        with self._lock:
            self.commands += total
            self.command_errors += errors

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
