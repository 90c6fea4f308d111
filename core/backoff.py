"""Capped exponential backoff, and the one way failing background work is logged.

The error policy (README, "Errors and retries") in one place: background work that fails (a fire
pass, a delivery refill, the heartbeat, the purge) is retried after a delay that doubles from
``first`` to ``cap``; its first failure is logged once as ``<name>_failing`` and its recovery once
as ``<name>_recovered``, never a line per attempt. An unreachable database is logged once more,
as ``database_down`` / ``database_back``, by the store's health record.
"""

from __future__ import annotations

from dataclasses import dataclass

from program_timer.core.logs import get_logger

log = get_logger()


@dataclass
class Backoff:
    """Delays that double from ``first`` up to ``cap`` while failures repeat."""

    name: str
    first: float = 0.1
    cap: float = 5.0
    failures: int = 0
    _delay: float = 0.0
    _logged: bool = False

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, reason: str, *, unavailable: bool = False, **context: object) -> float:
        """Count a failure; the delay before the next try. Logs the first failure only, and
        not at all when the database is unreachable (``unavailable``): that is logged once,
        for the whole daemon, as ``database_down``."""
        self._delay = self.first if self.failures == 0 else min(self.cap, self._delay * 2)
        if self.failures == 0 and not unavailable:
            log.warning(
                f"{self.name.replace('_', ' ')} failing; retrying with backoff",
                action=f"{self.name}_failing",
                reason=reason,
                **context,
            )
            self._logged = True
        self.failures += 1
        return self._delay

    @property
    def failed_delay(self) -> float:
        """The delay the last :meth:`failed` returned."""
        return self._delay

    def succeeded(self) -> None:
        if self.failures and self._logged:
            log.info(
                f"{self.name.replace('_', ' ')} recovered",
                action=f"{self.name}_recovered",
                failures=self.failures,
            )
        self.failures = 0
        self._delay = 0.0
        self._logged = False
