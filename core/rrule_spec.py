"""RFC 5545 RRULE text read into an :class:`RRuleSpec`: every part checked, every error naming
what is wrong (see :mod:`.calendar`)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from dateutil import rrule as du

from program_timer.core.calendar_base import (
    MAX_COUNT,
    MAX_INTERVAL,
    RRULE_EXAMPLE,
    RRULE_MAX_LENGTH,
    _shown,
)
from program_timer.core.model import RuleError

# --- RFC 5545 RRULE ---------------------------------------------------------------------------

_FREQS: Final = {
    "YEARLY": du.YEARLY,
    "MONTHLY": du.MONTHLY,
    "WEEKLY": du.WEEKLY,
    "DAILY": du.DAILY,
    "HOURLY": du.HOURLY,
    "MINUTELY": du.MINUTELY,
    "SECONDLY": du.SECONDLY,
}
_DAYS: Final = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
# The BYxxx parts as dateutil's keyword arguments, with the range of their values.
_BY_RANGES: Final = {
    "BYSECOND": ("bysecond", 0, 59, False),
    "BYMINUTE": ("byminute", 0, 59, False),
    "BYHOUR": ("byhour", 0, 23, False),
    "BYMONTHDAY": ("bymonthday", 1, 31, True),
    "BYYEARDAY": ("byyearday", 1, 366, True),
    "BYWEEKNO": ("byweekno", 1, 53, True),
    "BYMONTH": ("bymonth", 1, 12, False),
    "BYSETPOS": ("bysetpos", 1, 366, True),
}
_PARTS: Final = frozenset({"FREQ", "INTERVAL", "COUNT", "UNTIL", "WKST", "BYDAY", *_BY_RANGES})
_REFUSED_LINES: Final = ("DTSTART", "RDATE", "EXDATE", "EXRULE")
_INT: Final = re.compile(r"^[+-]?\d{1,6}$")
_BYDAY: Final = re.compile(r"^([+-]?\d{1,2})?(MO|TU|WE|TH|FR|SA|SU)$")
_UNTIL: Final = re.compile(r"^(\d{4})(\d{2})(\d{2})(?:T(\d{2})(\d{2})(\d{2})(Z?))?$")
_DAY_FILTERS: Final = ("bymonthday", "byyearday", "byweekno", "byweekday")
_DAY_PARTS: Final = (*_DAY_FILTERS, "bymonth")


@dataclass(frozen=True, slots=True)
class RRuleSpec:
    """A parsed RRULE, independent of any zone: dateutil's arguments, as given."""

    freq: int
    interval: int
    wkst: int
    count: int | None
    until: tuple[int, ...] | None  # (y, m, d) a date; (y, m, d, H, M, S) local; + (1,) in UTC
    by: tuple[tuple[str, Any], ...]  # dateutil keyword -> tuple of values, only those given

    def by_dict(self) -> dict[str, Any]:
        return dict(self.by)


def _rrule_error(text: str, why: str) -> RuleError:
    return RuleError("rrule", f"rrule: got {_shown(text)}: {why}; expected {RRULE_EXAMPLE}")


@functools.lru_cache(maxsize=4096)
def parse_rrule(text: str) -> RRuleSpec:
    """Check an RRULE's text and parse it.

    One rule only: an optional ``RRULE:`` prefix; no ``DTSTART`` (the start is ``fireAt`` or the
    command's time, in the ``timezone`` argument), no ``RDATE``, ``EXDATE`` or ``EXRULE``.
    ``COUNT`` is at most :data:`MAX_COUNT`; ``COUNT`` and ``UNTIL`` exclude each other.

    :raises RuleError: with field ``rrule``.
    """
    if not text.strip():
        raise _rrule_error(text, "it is empty")
    if len(text) > RRULE_MAX_LENGTH:
        raise RuleError(
            "rrule", f"rrule: {len(text)} characters, at most {RRULE_MAX_LENGTH} are accepted"
        )
    body = text.strip()
    upper = body.upper()
    for name in _REFUSED_LINES:
        if name in upper:
            raise _rrule_error(
                text,
                f"{name} is not accepted (only the RRULE itself: the first moment it may match "
                "is fireAt, else the command's time, read in the timezone argument)",
            )
    if upper.startswith("RRULE:"):
        body = body[len("RRULE:") :]
    if any(c in body for c in ":\r\n"):
        raise _rrule_error(text, "one RRULE line only")
    parts: dict[str, str] = {}
    for part in body.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip().upper(), value.strip().upper()
        if not sep or not value:
            raise _rrule_error(text, f"{part.strip()!r} is not NAME=VALUE")
        if name not in _PARTS:
            raise _rrule_error(text, f"{name} is not a rule part this daemon knows")
        if name in parts:
            raise _rrule_error(text, f"{name} is given twice")
        parts[name] = value
    if "FREQ" not in parts:
        raise _rrule_error(text, "FREQ is required")
    freq = _FREQS.get(parts["FREQ"])
    if freq is None:
        raise _rrule_error(text, f"FREQ={parts['FREQ']} is not one of {', '.join(_FREQS)}")
    interval = _int_part(text, parts, "INTERVAL", 1, MAX_INTERVAL, default=1)
    count = _int_part(text, parts, "COUNT", 1, MAX_COUNT, default=None)
    if count is not None and "UNTIL" in parts:
        raise _rrule_error(text, "COUNT and UNTIL cannot both be given (RFC 5545)")
    until = _until_part(text, parts.get("UNTIL"))
    wkst = 0
    if "WKST" in parts:
        if parts["WKST"] not in _DAYS:
            raise _rrule_error(text, f"WKST={parts['WKST']} is not one of {', '.join(_DAYS)}")
        wkst = _DAYS.index(parts["WKST"])
    by: dict[str, Any] = {}
    for name, (keyword, low, high, signed) in _BY_RANGES.items():
        if name in parts:
            by[keyword] = tuple(sorted(set(_by_values(text, name, parts[name], low, high, signed))))
    if "BYDAY" in parts:
        by["byweekday"] = _byday(text, parts["BYDAY"], freq)
    if "bysetpos" in by and not (set(by) - {"bysetpos"}):
        raise _rrule_error(text, "BYSETPOS needs another BYxxx part to choose from")
    # dateutil's own reading of the rule must agree. COUNT and UNTIL are applied here, not by
    # dateutil; so is INTERVAL, whose fit with BYHOUR/BYMINUTE/BYSECOND depends on the start
    # (checked with the real start when a command gives the rule).
    core = ";".join(f"{k}={v}" for k, v in parts.items() if k not in ("COUNT", "UNTIL", "INTERVAL"))
    try:
        du.rrulestr(core, dtstart=datetime(2001, 1, 1))
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise _rrule_error(text, str(exc) or type(exc).__name__) from None
    return RRuleSpec(freq, interval, wkst, count, until, tuple(sorted(by.items())))


def _int_part(
    text: str, parts: dict[str, str], name: str, low: int, high: int, default: Any
) -> Any:
    if name not in parts:
        return default
    value = parts[name]
    if not value.isdigit() or not low <= int(value) <= high:
        raise _rrule_error(text, f"{name}={value}: expected an integer from {low} to {high:,}")
    return int(value)


def _until_part(text: str, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    m = _UNTIL.match(value)
    if not m:
        raise _rrule_error(text, f"UNTIL={value}: expected YYYYMMDD, YYYYMMDDTHHMMSS or …Z")
    numbers = tuple(int(g) for g in m.groups()[:6] if g is not None)
    try:
        datetime(*numbers)  # type: ignore[arg-type]
    except ValueError:
        raise _rrule_error(text, f"UNTIL={value} is not a real date and time") from None
    return (*numbers, 1) if m.group(7) else numbers


def _by_values(text: str, name: str, value: str, low: int, high: int, signed: bool) -> list[int]:
    out = []
    for item in value.split(","):
        item = item.strip()
        number = int(item) if _INT.match(item) else None
        if number is None or not (low <= number <= high or (signed and -high <= number <= -low)):
            span = f"{low} to {high}" + (f" or -{high} to -{low}" if signed else "")
            raise _rrule_error(text, f"{name}: {item!r} is not an integer from {span}")
        out.append(number)
    return out


def _byday(text: str, value: str, freq: int) -> tuple[Any, ...]:
    days = []
    for item in value.split(","):
        m = _BYDAY.match(item.strip())
        if not m:
            raise _rrule_error(text, f"BYDAY: {item!r} is not a day like MO, 1MO or -1FR")
        n = int(m.group(1)) if m.group(1) else None
        day = du.weekday(_DAYS.index(m.group(2)))
        if n is not None:
            if n == 0 or abs(n) > 53:
                raise _rrule_error(
                    text, f"BYDAY: {item!r}: the number is from 1 to 53 or -53 to -1"
                )
            if freq not in (du.MONTHLY, du.YEARLY):
                raise _rrule_error(
                    text, f"BYDAY: a numbered day ({item!r}) needs FREQ=MONTHLY or FREQ=YEARLY"
                )
            day = day(n)
        days.append(day)
    return tuple(dict.fromkeys(days))


def _defaults(spec: RRuleSpec, begin: datetime) -> dict[str, Any]:
    """The values an RRULE takes from its DTSTART when it leaves them out (as dateutil does,
    but for the time of day: see below), made explicit, so that the rule can be re-anchored
    later without changing them."""
    by = spec.by_dict()
    out: dict[str, Any] = {}
    if not any(k in by for k in _DAY_FILTERS):
        if spec.freq == du.YEARLY:
            if "bymonth" not in by:
                out["bymonth"] = begin.month
            out["bymonthday"] = begin.day
        elif spec.freq == du.MONTHLY:
            out["bymonthday"] = begin.day
        elif spec.freq == du.WEEKLY:
            out["byweekday"] = begin.weekday()
    # The time of day: a field left out below one the rule gives is 0 (BYHOUR=9 is 09:00:00,
    # not 09:MM:SS with the start's minutes and seconds, as RFC 5545 would have it).
    if spec.freq < du.HOURLY and "byhour" not in by:
        out["byhour"] = begin.hour
    if spec.freq < du.MINUTELY and "byminute" not in by:
        out["byminute"] = 0 if "byhour" in by else begin.minute
    if spec.freq < du.SECONDLY and "bysecond" not in by:
        out["bysecond"] = 0 if "byhour" in by or "byminute" in by else begin.second
    return out


def _rule(
    spec: RRuleSpec, by: dict[str, Any], dtstart: datetime, defaults: dict[str, Any], **extra: Any
) -> Any:
    return du.rrule(
        spec.freq,
        dtstart=dtstart,
        interval=spec.interval,
        wkst=spec.wkst,
        cache=False,
        **by,
        **defaults,
        **extra,
    )
