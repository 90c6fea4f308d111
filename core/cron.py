"""crontab(5) lines as a :class:`Calendar`: five fields, day of week 0 or 7 = Sunday, crontab's
OR of the two day fields (see :mod:`.calendar`)."""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo

from program_timer.core.calendar_base import (
    _MINUTE,
    CRON_EXAMPLE,
    CRON_MAX_LENGTH,
    Calendar,
    _shown,
)
from program_timer.core.model import RuleError

# --- crontab(5) ---------------------------------------------------------------------------------

_MONTH_NAMES: Final = (
    "JAN",
    "FEB",
    "MAR",
    "APR",
    "MAY",
    "JUN",
    "JUL",
    "AUG",
    "SEP",
    "OCT",
    "NOV",
    "DEC",
)
_DOW_NAMES: Final = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# (name, low, high, names that stand for low, low + 1, ...)
_CRON_FIELDS: Final = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTH_NAMES),
    ("day of week", 0, 7, _DOW_NAMES),
)
_CRON_ITEM: Final = re.compile(r"^(\*|[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)(?:/(\d+))?$")
_MONTH_DAYS: Final = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # the most each month has


def _cron_error(text: str, why: str) -> RuleError:
    return RuleError("cron", f"cron: got {_shown(text)}: {why}; expected {CRON_EXAMPLE}")


@dataclass(frozen=True, slots=True)
class CronSpec:
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # Python's: Monday 0 ... Sunday 6
    any_day: bool  # day of month starts with "*"
    any_weekday: bool  # day of week starts with "*"

    def day_matches(self, d: date) -> bool:
        """crontab(5): when both day fields are restricted (neither starts with ``*``), a day
        matching either one matches; otherwise both must."""
        if self.any_day or self.any_weekday:
            return d.day in self.days and d.weekday() in self.weekdays
        return d.day in self.days or d.weekday() in self.weekdays


def _cron_value(
    text: str, field: str, token: str, low: int, high: int, names: tuple[str, ...]
) -> int:
    if token.isdigit():
        value = int(token)
    elif token.upper() in names:
        value = low + names.index(token.upper())
    else:
        raise _cron_error(text, f"{field}: {token!r} is not a number from {low} to {high}")
    if not low <= value <= high:
        raise _cron_error(text, f"{field}: {value} is out of range {low}-{high}")
    return value


def _cron_field(text: str, index: int, value: str) -> set[int]:
    field, low, high, names = _CRON_FIELDS[index]
    out: set[int] = set()
    for item in value.split(","):
        m = _CRON_ITEM.match(item)
        if not m:
            raise _cron_error(text, f"{field}: {item!r} is not *, N, N-M or one of them /STEP")
        span, step_text = m.group(1), m.group(2)
        step = int(step_text) if step_text is not None else 1
        if step < 1:
            raise _cron_error(text, f"{field}: the step of {item!r} must be at least 1")
        if span == "*":
            first, last = low, high
        elif "-" in span:
            a, b = span.split("-")
            first = _cron_value(text, field, a, low, high, names)
            last = _cron_value(text, field, b, low, high, names)
            if first > last:
                raise _cron_error(text, f"{field}: the range {item!r} runs backwards")
        else:
            first = _cron_value(text, field, span, low, high, names)
            last = high if step_text is not None else first  # N/STEP: from N to the end
        out.update(range(first, last + 1, step))
    return out


@functools.lru_cache(maxsize=4096)
def parse_cron(text: str) -> CronSpec:
    """Check a crontab(5) line of five fields and parse it.

    Lists, ranges, steps and ``*``; month and day names (``JAN``, ``MON``, any case); day of
    week 0 or 7 is Sunday. When both day fields are restricted, crontab's OR rule applies.

    :raises RuleError: with field ``cron``; also for a line that never matches (``0 0 30 2 *``).
    """
    if len(text) > CRON_MAX_LENGTH:
        raise RuleError(
            "cron", f"cron: {len(text)} characters, at most {CRON_MAX_LENGTH} are accepted"
        )
    fields = text.split()
    if len(fields) != 5:
        raise _cron_error(text, f"{len(fields)} fields")
    minutes, hours, days, months, dows = (_cron_field(text, i, f) for i, f in enumerate(fields))
    spec = CronSpec(
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=frozenset(days),
        months=frozenset(months),
        weekdays=frozenset((d - 1) % 7 for d in dows),
        any_day=fields[2].startswith("*"),
        any_weekday=fields[4].startswith("*"),
    )
    # Every day of month falls on every day of week some year, and "*..." holds the 1st: a line
    # can only never match when its days of month exist in none of its months.
    if (
        not spec.any_day
        and spec.any_weekday
        and not any(d <= _MONTH_DAYS[m - 1] for m in spec.months for d in spec.days)
    ):
        raise RuleError("cron", f"cron: {_shown(text)} never matches: no such day in its months")
    return spec


def _next_month_start(t: datetime) -> datetime:
    return datetime(t.year + t.month // 12, t.month % 12 + 1, 1)


@dataclass(frozen=True, eq=False)
class CronCalendar(Calendar):
    spec: CronSpec
    text: str
    zone: ZoneInfo
    kind: str = "cron"

    def _match_from(self, t: datetime) -> datetime | None:
        """The first matching minute at or after ``t`` (a whole minute)."""
        spec = self.spec
        while t.year <= 9999:
            if t.month not in spec.months:
                t = _next_month_start(t)
                continue
            if not spec.day_matches(t.date()):
                t = datetime.combine(t.date() + timedelta(days=1), time())
                continue
            if t.hour not in spec.hours:
                i = bisect.bisect_left(spec.hours, t.hour)
                if i == len(spec.hours):
                    t = datetime.combine(t.date() + timedelta(days=1), time())
                else:
                    t = t.replace(hour=spec.hours[i], minute=0)
                continue
            i = bisect.bisect_left(spec.minutes, t.minute)
            if i == len(spec.minutes):
                t = t.replace(minute=0) + timedelta(hours=1)
                continue
            return t.replace(minute=spec.minutes[i])
        return None

    def _local_from(self, begin: datetime, from_: datetime) -> Iterator[datetime]:
        t: datetime | None = from_
        assert t is not None
        if t.second or t.microsecond:
            t = t.replace(second=0, microsecond=0) + _MINUTE
        while True:
            t = self._match_from(t)
            if t is None:
                return
            yield t
            t += _MINUTE

    def _check_matches(self, begin: datetime) -> None:
        pass  # parse_cron refused the lines that never match
