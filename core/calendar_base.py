"""What every calendar schedule shares: rule limits, wall clock and instants across DST, and
the :class:`Calendar` interface (see :mod:`.calendar`)."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

from program_timer.core.model import RuleError

RRULE_MAX_LENGTH: Final = 1024
CRON_MAX_LENGTH: Final = 255
MAX_COUNT: Final = 10_000  # a longer series: use UNTIL
MAX_INTERVAL: Final = 1_000_000
# Missed occurrences are counted one by one up to this many; beyond, the rest is estimated from
# the rate of the ones counted (only sub-daily rules get there, and their rate is regular).
EXACT_COUNT: Final = 1_000
# A rule with no occurrence in this many years after its start is refused as never matching.
SEARCH_YEARS: Final = 400

RRULE_EXAMPLE: Final = "an RFC 5545 RRULE like FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR;BYHOUR=9;BYMINUTE=0"
CRON_EXAMPLE: Final = (
    'five crontab fields "minute hour day-of-month month day-of-week", like "0 9 * * 1-5"'
)

_MICRO: Final = timedelta(microseconds=1)
_SECOND: Final = timedelta(seconds=1)
_MINUTE: Final = timedelta(minutes=1)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


# --- wall clock <-> instants ----------------------------------------------------------------


def wall(instant: datetime, zone: ZoneInfo) -> datetime:
    """The naive wall-clock time of ``instant`` in ``zone`` (``fold`` cleared)."""
    return instant.astimezone(zone).replace(tzinfo=None, fold=0)


def to_instant(local: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant of a naive wall time: the first of two in a fold, the end of a gap."""
    aware = local.replace(tzinfo=zone, fold=0)
    before = aware.utcoffset()  # a fold or a gap: the offset before the change
    after = aware.replace(fold=1).utcoffset()
    assert before is not None and after is not None
    if before < after:  # the clock jumped forward over this time
        return _gap_end(local, zone)
    return (local - before).replace(tzinfo=UTC)


@functools.lru_cache(maxsize=1024)
def _gap_end(local: datetime, zone: ZoneInfo) -> datetime:
    """The first instant whose wall time is not before ``local``, a wall time in a gap: the
    change itself. Found by bisection between the instants the two offsets give (time zone
    changes fall on whole seconds)."""
    late = local.replace(tzinfo=zone, fold=0).astimezone(UTC)  # the offset before the gap
    early = local.replace(tzinfo=zone, fold=1).astimezone(UTC)  # the offset after it
    lo, hi = min(early, late), max(early, late)
    while hi - lo > _SECOND:
        mid = lo + timedelta(seconds=((hi - lo) // _SECOND) // 2)
        if wall(mid, zone) >= local:
            hi = mid
        else:
            lo = mid
    return hi


def _ceil_second(t: datetime) -> datetime:
    return t if not t.microsecond else t.replace(microsecond=0) + _SECOND


# --- the common part ------------------------------------------------------------------------


class Calendar(ABC):
    """One rule in one zone. Instants in and out are aware UTC datetimes; ``start`` is the
    first moment the rule may match (the timer's ``anchor_at``)."""

    kind: str
    text: str
    zone: ZoneInfo

    def begin(self, start: datetime) -> datetime:
        """The rule's DTSTART: the start's wall time, rounded up to a whole second."""
        return _ceil_second(wall(start, self.zone))

    # what subclasses provide: local occurrences, an end, and the never-matching check

    @abstractmethod
    def _local_from(self, begin: datetime, from_: datetime) -> Iterator[datetime]:
        """The rule's wall-clock occurrences not before ``from_`` (naive, ``>= begin``), in
        order, without duplicates."""

    def _end(self, begin: datetime) -> datetime | None:
        """The last instant the rule may fire (UNTIL, COUNT), or None."""
        return None

    @abstractmethod
    def _check_matches(self, begin: datetime) -> None:
        """Raise :class:`RuleError` when the rule has no occurrence at all from ``begin``."""

    # the questions the timer rules ask

    def instants(self, start: datetime, after: datetime) -> Iterator[datetime]:
        """The distinct occurrences strictly after ``after`` and not before ``start``."""
        zone = self.zone
        begin = self.begin(start)
        floor = max(after, start - _MICRO)
        floor_wall = wall(floor, zone)
        last = floor
        try:
            end = self._end(begin)
            for local in self._local_from(begin, max(begin, floor_wall)):
                if local <= floor_wall:
                    continue  # its instant is not after `floor` either (folds included)
                instant = to_instant(local, zone)
                if instant <= last:
                    continue  # before `after` (a fold's second pass), or a gap already fired
                if end is not None and instant > end:
                    return
                last = instant
                yield instant
        except (ValueError, OverflowError):
            return  # past year 9999: the rule has ended

    def next_after(self, start: datetime, after: datetime) -> datetime | None:
        """The first occurrence strictly after ``after``; None when the rule has ended."""
        return next(self.instants(start, after), None)

    def at_or_after(self, start: datetime, when: datetime) -> datetime | None:
        """The first occurrence at or after ``when``; None when the rule has ended."""
        return next(self.instants(start, when - _MICRO), None)

    def scan(
        self, start: datetime, after: datetime, until: datetime
    ) -> tuple[int, datetime | None]:
        """How many occurrences fall in ``(after, until]``, and the first one after ``until``.

        The occurrences are counted one by one up to :data:`EXACT_COUNT`; the rest of a longer
        span is estimated from the rate of those counted (an RRULE or cron line that fires that
        often is sub-daily, and fires at a regular pace)."""
        count = 0
        first = last = None
        for instant in self.instants(start, after):
            if instant > until:
                return count, instant
            count += 1
            if first is None:
                first = instant
            last = instant
            if count >= EXACT_COUNT:
                break
        else:
            return count, None
        assert first is not None and last is not None
        span = (last - first).total_seconds()
        if span > 0:
            count += int((until - last).total_seconds() * (count - 1) / span)
        return count, self.next_after(start, until)

    def count(self, start: datetime, after: datetime, until: datetime) -> int:
        """How many occurrences fall in ``(after, until]`` (see :meth:`scan`)."""
        return self.scan(start, after, until)[0]

    def first(self, start: datetime, not_before: datetime) -> datetime:
        """The first occurrence at or after both ``start`` and ``not_before``, for a command.

        :raises RuleError: the rule never matches, or has ended (``COUNT``, ``UNTIL``) before
            ``not_before``."""
        self._check_matches(self.begin(start))
        when = max(start, not_before)
        found = self.at_or_after(start, when)
        if found is None:
            raise RuleError(
                self.kind,
                f"{self.kind}: {_shown(self.text)} has no occurrence at or after "
                f"{_iso(when)} in {self.zone.key}: its COUNT or UNTIL ended it",
            )
        return found


def _iso(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")
