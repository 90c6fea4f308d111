"""Time sources: the daemon reads the wall clock through a :class:`Clock`; tests inject one."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current instant, an aware UTC datetime."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class FakeClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> datetime:
        self._now += timedelta(seconds=seconds)
        return self._now

    def set(self, when: datetime) -> None:
        self._now = when


@functools.lru_cache(maxsize=256)
def utc_iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z``, as every time on the wire is.

    Remembered for the last instants shown: a timer's reply repeats its ``now`` (created,
    updated) and its next fire (fireAt, nextFireAt), a fire batch its ``now`` in every event,
    and looking one up costs a tenth of formatting it."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat()[:-6] + "Z"  # an aware UTC isoformat() ends with "+00:00"
