"""An RRULE as a :class:`Calendar`: re-anchored lookups, never iterating from the start (see
:mod:`.calendar`)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from dateutil import rrule as du

from program_timer.core.calendar_base import (
    _SECOND,
    SEARCH_YEARS,
    Calendar,
    _shown,
    to_instant,
)
from program_timer.core.model import RuleError
from program_timer.core.rrule_spec import (
    _DAY_FILTERS,
    _DAY_PARTS,
    RRuleSpec,
    _defaults,
    _rrule_error,
    _rule,
)


def _period_start(freq: int, t: datetime, wkst: int) -> datetime:
    if freq == du.SECONDLY:
        return t.replace(microsecond=0)
    if freq == du.MINUTELY:
        return t.replace(second=0, microsecond=0)
    if freq == du.HOURLY:
        return t.replace(minute=0, second=0, microsecond=0)
    if freq == du.DAILY:
        return datetime.combine(t.date(), time())
    if freq == du.WEEKLY:
        return datetime.combine(t.date() - timedelta(days=(t.weekday() - wkst) % 7), time())
    if freq == du.MONTHLY:
        return datetime(t.year, t.month, 1)
    return datetime(t.year, 1, 1)


_UNITS: Final = {
    du.SECONDLY: timedelta(seconds=1),
    du.MINUTELY: timedelta(minutes=1),
    du.HOURLY: timedelta(hours=1),
    du.DAILY: timedelta(days=1),
    du.WEEKLY: timedelta(days=7),
}


def _periods_between(freq: int, a: datetime, b: datetime) -> int:
    if freq == du.MONTHLY:
        return (b.year - a.year) * 12 + b.month - a.month
    if freq == du.YEARLY:
        return b.year - a.year
    return (b - a) // _UNITS[freq]


def _add_periods(freq: int, a: datetime, k: int) -> datetime:
    if freq == du.MONTHLY:
        months = a.month - 1 + k
        return datetime(a.year + months // 12, months % 12 + 1, 1)
    if freq == du.YEARLY:
        return datetime(a.year + k, 1, 1)
    return a + k * _UNITS[freq]


def _shift_to_search_window(begin: datetime) -> datetime:
    """``begin`` moved by whole 400-year Gregorian cycles (the calendar repeats exactly: leap
    years, weekdays, week numbers) to where year 9999, after which dateutil stops, is
    :data:`SEARCH_YEARS` to twice that ahead: a search there for a rule that never matches
    ends."""
    target = 9999 - 2 * SEARCH_YEARS
    return begin.replace(year=begin.year + (target - begin.year) // 400 * 400)


@dataclass(frozen=True, eq=False)
class RRuleCalendar(Calendar):
    spec: RRuleSpec
    text: str
    zone: ZoneInfo
    kind: str = "rrule"
    by: dict[str, Any] = field(init=False, repr=False)
    until: datetime | None = field(init=False)
    # A daily or shorter rule with day filters steps from day to day that the filters let
    # through (see _stepped): `times` is the rule without them, `days` a yearly rule of them.
    stepped: bool = field(init=False)
    times: dict[str, Any] = field(init=False, repr=False)
    days: dict[str, Any] = field(init=False, repr=False)
    # FREQ=SECONDLY/MINUTELY/HOURLY without BYxxx: every INTERVAL units from the start, computed.
    step: timedelta | None = field(init=False)
    # _check_matches' answers (a cache: a plain dict, bounded, shared by the threads that only
    # ever add the same answer for a key).
    checked: dict[Any, tuple[RuleError | None, bool]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by = self.spec.by_dict()
        days = {k: v for k, v in by.items() if k in _DAY_PARTS}
        if "byweekday" in days:
            days["byweekday"] = tuple(d.weekday for d in days["byweekday"])
        if days and not any(k in days for k in _DAY_FILTERS):
            days["bymonthday"] = tuple(range(1, 32))  # else dateutil takes the start's day
        set_ = functools.partial(object.__setattr__, self)
        set_("by", by)
        set_("stepped", self.spec.freq >= du.DAILY and bool(days))
        set_("times", {k: v for k, v in by.items() if k not in _DAY_PARTS})
        set_("days", days)
        set_("checked", {})
        plain = self.spec.freq in (du.HOURLY, du.MINUTELY, du.SECONDLY) and not by
        set_("step", self.spec.interval * _UNITS[self.spec.freq] if plain else None)
        until = self.spec.until
        end: datetime | None = None
        if until is not None:
            if len(until) == 7:  # ...Z: an instant
                end = datetime(*until[:6], tzinfo=UTC)
            elif len(until) == 3:  # a date: the whole day, in the zone
                last = datetime(*until) + timedelta(days=1) - _SECOND
                end = to_instant(last, self.zone)
            else:  # a wall time in the zone
                end = to_instant(datetime(*until), self.zone)  # type: ignore[arg-type]
        set_("until", end)

    def _kw(self, begin: datetime) -> dict[str, Any]:
        return _defaults(self.spec, begin)

    def _rebased(self, begin: datetime, from_: datetime) -> datetime:
        """A DTSTART from which the rule generates exactly the original occurrences not before
        ``from_``: ``from_`` itself when its period is on the rule's grid (every INTERVAL-th
        period from ``begin``'s), else the next period of the grid; for a weekly rule with
        BYSETPOS, the start of the week (dateutil chooses positions in the days of the week
        from DTSTART on)."""
        if from_ <= begin:
            return begin
        spec = self.spec
        origin = _period_start(spec.freq, begin, spec.wkst)
        period = _period_start(spec.freq, from_, spec.wkst)
        k = _periods_between(spec.freq, origin, period)
        if k % spec.interval:
            return _add_periods(spec.freq, origin, (k // spec.interval + 1) * spec.interval)
        if spec.freq == du.WEEKLY and "bysetpos" in self.by:
            return begin if k == 0 else period
        return from_.replace(microsecond=0)

    def _local_from(self, begin: datetime, from_: datetime) -> Iterator[datetime]:
        if self.step is not None:
            return self._grid(begin, from_, self.step)
        if self.stepped:
            return self._stepped(begin, from_)
        rule = _rule(self.spec, self.by, self._rebased(begin, from_), self._kw(begin))
        return (local for local in rule if local >= from_)

    @staticmethod
    def _grid(begin: datetime, from_: datetime, step: timedelta) -> Iterator[datetime]:
        """A plain grid, ``begin + k * step`` in wall-clock arithmetic, as dateutil steps it."""
        k = 0 if from_ <= begin else -((begin - from_) // step)
        local = begin + k * step
        while True:
            yield local
            local += step

    def _stepped(
        self, begin: datetime, from_: datetime, max_steps: int | None = None
    ) -> Iterator[datetime]:
        """The occurrences of a daily or shorter rule with day filters (BYMONTH, BYMONTHDAY,
        BYYEARDAY, BYWEEKNO, BYDAY), which apply to whole periods there: the rule without them
        from each day they let through (a yearly rule of them finds those days), kept while its
        occurrences stay on that day. dateutil alone would try every period in between, one by
        one: millions for a secondly rule on 29 February."""
        spec, defaults = self.spec, self._kw(begin)
        probe = iter(
            du.rrule(
                du.YEARLY,
                dtstart=datetime.combine(from_.date(), time()),
                wkst=spec.wkst,
                byhour=0,
                byminute=0,
                bysecond=0,
                cache=False,
                **self.days,
            )
        )
        day = next(probe, None)
        t = from_
        steps = 0
        while day is not None:
            steps += 1
            if max_steps is not None and steps > max_steps:
                raise _SearchTooLong
            start = max(t, day)
            for local in _rule(spec, self.times, self._rebased(begin, start), defaults):
                if local < start:
                    continue
                if local.date() != day.date():
                    t = local
                    break
                yield local
            else:
                return
            while day is not None and day < datetime.combine(t.date(), time()):
                day = next(probe, None)

    def _end(self, begin: datetime) -> datetime | None:
        if self.spec.count is None:
            return self.until
        return _count_end(self, begin)

    def _check_matches(self, begin: datetime) -> None:
        """Whether the rule matches depends on the start only through the values it takes from
        it and, with an INTERVAL, the phase of its grid: the answer is kept per those (every
        command sending the same rule at another time of day asks the same question)."""
        if self.step is not None:
            return  # a plain grid: its start is an occurrence
        key = (tuple(sorted(self._kw(begin).items())), begin if self.spec.interval > 1 else None)
        known = self.checked.get(key)
        if known is None:
            try:
                self._search_first(begin)
                known = None, True
            except RuleError as err:
                known = err, False
            if len(self.checked) >= 1024:
                self.checked.clear()
            self.checked[key] = known
        if known[0] is not None:
            raise known[0]

    def _search_first(self, begin: datetime) -> None:
        spec, by = self.spec, self.by
        shifted = _shift_to_search_window(begin)
        if "bysetpos" in by and not any(abs(p) <= _period_size(spec, by) for p in by["bysetpos"]):
            raise self._never()  # positions beyond the most times one period can hold
        try:
            if self.stepped:
                found = next(self._stepped(shifted, shifted, _MAX_STEPS), None) is not None
            else:
                if spec.freq == du.WEEKLY and any(k in by for k in _DAY_PARTS):
                    # The days alone first, as a yearly rule: a contradiction (30 February) is
                    # found in a few hundred steps instead of one step per week.
                    probe = du.rrule(
                        du.YEARLY,
                        dtstart=shifted,
                        wkst=spec.wkst,
                        byhour=0,
                        byminute=0,
                        bysecond=0,
                        cache=False,
                        **self.days,
                    )
                    if next(iter(probe), None) is None:
                        raise _SearchTooLong
                rule = _rule(spec, by, shifted, self._kw(begin))
                found = next(iter(rule), None) is not None
        except _SearchTooLong:
            found = False
        except (ValueError, OverflowError) as exc:
            raise _rrule_error(
                self.text, f"{exc} (with its start at {begin.isoformat()} local time)"
            ) from None
        if not found:
            raise self._never()

    def _never(self) -> RuleError:
        return RuleError(
            "rrule",
            f"rrule: {_shown(self.text)} never matches (no occurrence found in the "
            f"{SEARCH_YEARS} years after its start)",
        )


_PERIOD_DAYS: Final = {du.YEARLY: 366, du.MONTHLY: 31, du.WEEKLY: 7}
_PERIOD_TIMES: Final = {
    du.HOURLY: ("byminute", "bysecond"),
    du.MINUTELY: ("bysecond",),
    du.SECONDLY: (),
}


def _period_size(spec: RRuleSpec, by: dict[str, Any]) -> int:
    """The most occurrences one period of the rule can hold (what BYSETPOS counts)."""
    size = 1
    for key in _PERIOD_TIMES.get(spec.freq, ("byhour", "byminute", "bysecond")):
        size *= len(by[key]) if key in by else 1
    days = _PERIOD_DAYS.get(spec.freq, 1)
    if spec.freq == du.WEEKLY and "byweekday" in by:
        days = len(by["byweekday"])
    return size * days


class _SearchTooLong(Exception):
    """A search for a first occurrence gave up (:data:`_MAX_STEPS`)."""


# Days the day filters let through that a search for a first occurrence tries before it gives
# up (a daily rule whose INTERVAL never lands on them: FREQ=DAILY;INTERVAL=7;BYDAY=MO).
_MAX_STEPS: Final = 5_000


@functools.lru_cache(maxsize=4096)
def _count_end(cal: RRuleCalendar, begin: datetime) -> datetime | None:
    """The instant of a COUNT rule's last occurrence from ``begin``."""
    last = None
    for last in itertools.islice(cal._local_from(begin, begin), cal.spec.count):  # noqa: B007
        pass
    return None if last is None else to_instant(last, cal.zone)
