"""The arguments of a ``command`` (SPEC 1.1): strings checked against their limits, and the
rule arguments of ``set_timer`` parsed into a :class:`~program_timer.core.model.SetCommand`.

Every refusal is one :class:`~program_timer.scheduler.protocol.ProtocolError` whose ``field``
names the argument, with what was given and what is expected.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict

from program_timer.core import calendar
from program_timer.core.model import EVENT_ARGUMENT_KEYS, RuleError, SetCommand, format_interval
from program_timer.scheduler.protocol import ProtocolError

_FIRE_AT = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?"
    r"(Z|z|[+-]\d{2}:?\d{2})?$"
)
# ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` in ASCII digits: a shape ``datetime.fromisoformat`` reads
# as the pattern above does (it reads ISO week dates, seven digits of fraction and more, which
# the pattern refuses, and a newer Python reads ``T24:00:00``).
_UTC_SHAPE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?Z",
    re.ASCII,
)
_NUMBER = re.compile(r"^\s*(\d+(\.\d*)?|\.\d+)\s*$")
FIRE_AT_FORMAT: Final = "YYYY-MM-DD[T]HH:MM[:SS[.ffffff]][Z or ±HH[:]MM]"


def argument_string(key: str, value: Any) -> str:
    """Arguments are strings; JSON numbers and booleans mean their string form."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(
                "invalid_argument", f"{key}: expected a finite number, got {value!r}", key
            )
        return format_interval(value) or repr(value)
    raise ProtocolError(
        "invalid_argument",
        f"{key}: expected a string (or a number or boolean), got {type(value).__name__}",
        key,
    )


def _bad(key: str, given: str, expected: str) -> ProtocolError:
    shown = given if len(given) <= 80 else given[:77] + "..."
    return ProtocolError("invalid_argument", f"{key}: got {shown!r}, expected {expected}", key)


def parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise _bad(key, value, '"true" or "false"')


def parse_interval(value: str) -> float:
    if not _NUMBER.match(value):
        raise _bad("interval", value, 'a positive number of seconds, like "120" or "0.5"')
    seconds = float(value)
    if not seconds > 0 or seconds > 10 * 365 * 86400:
        raise _bad("interval", value, "a positive number of seconds, at most ten years")
    return seconds


def parse_timezone(value: str) -> ZoneInfo:
    try:
        if not value or value.startswith(("/", ".")) or ".." in value:
            raise ValueError
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise _bad("timezone", value, 'an IANA time zone name like "Europe/Paris"') from exc


def parse_fire_at(value: str, tz: ZoneInfo) -> datetime:
    if value[-1:] == "Z" and _UTC_SHAPE.fullmatch(value):
        # The usual form, ``2030-06-01T12:00:00Z``: built in C, a sixth of the general path's
        # time; what ``fromisoformat`` refuses (``2030-02-30…``) gets the error below.
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    m = _FIRE_AT.match(value.strip())
    if not m:
        raise _bad("fireAt", value, FIRE_AT_FORMAT)
    year, month, day, hour, minute = map(int, m.group(1, 2, 3, 4, 5))
    second = int(m.group(6) or 0)
    micro = int((m.group(7) or "0").ljust(6, "0"))
    offset = m.group(8)
    try:
        if offset is None:
            local = datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
            return local.astimezone(UTC)
        if offset in ("Z", "z"):  # built aware: replace(tzinfo=…) costs as much again
            return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)
        naive = datetime(year, month, day, hour, minute, second, micro)
        sign = 1 if offset[0] == "+" else -1
        digits = offset[1:].replace(":", "")
        oh, om = int(digits[:2]), int(digits[2:])
        if oh > 23 or om > 59:
            raise ValueError("offset out of range")
        return naive.replace(tzinfo=timezone(sign * timedelta(hours=oh, minutes=om))).astimezone(
            UTC
        )
    except (ValueError, OverflowError) as exc:
        raise _bad("fireAt", value, f"a real date and time, {FIRE_AT_FORMAT}") from exc


RULE_ARGUMENTS: Final = frozenset(
    {
        "personaId",
        "timerName",
        "fireAt",
        "interval",
        "repeatable",
        "enabled",
        "timezone",
        "rrule",
        "cron",
    }
)


def _folded(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


# An extra argument named like a rule argument but for case, "_" or "-" (SPEC 7.5): kept, warned.
_LOOK_ALIKES: Final = {_folded(name): name for name in RULE_ARGUMENTS}


def look_alike_warning(key: str) -> str | None:
    """The warning for an extra argument named like a rule argument (``Interval``,
    ``fire_at``, ``time_zone``), or None."""
    meant = _LOOK_ALIKES.get(_folded(key))
    if meant is None or meant == key:
        return None
    return f'"{key}" is kept as an extra argument: did you mean "{meant}"?'


def parse_rule(key: str, value: str) -> str:
    """An ``rrule`` or ``cron`` argument, checked (syntax, length, a cron line that never
    matches); the text is kept as given. Whether an RRULE ever matches depends on its start and
    zone: the timer rules check it."""
    try:
        if key == "rrule":
            calendar.parse_rrule(value)
        else:
            calendar.parse_cron(value)
    except RuleError as err:
        raise ProtocolError("invalid_argument", err.message, key) from None
    return value


class ArgumentLimits(BaseModel):
    model_config = ConfigDict(frozen=True)
    max_arguments: int = 64
    max_argument_length: int = 65536
    max_arguments_size: int = 262144
    default_timezone: str = "UTC"


def _name(args: dict[str, str], key: str) -> str:
    value = args.get(key)
    if value is None:
        raise ProtocolError("invalid_argument", f"{key} is required", key)
    if not 1 <= len(value) <= 255:
        raise _bad(key, value, "1 to 255 characters")
    return value


def string_arguments(raw: dict[str, Any], limits: ArgumentLimits) -> dict[str, str]:
    if len(raw) > limits.max_arguments:
        raise ProtocolError(
            "invalid_argument",
            f"arguments: {len(raw)} given, at most {limits.max_arguments} are accepted",
            "arguments",
        )
    out: dict[str, str] = {}
    total = 0
    for key, value in raw.items():
        if not key or len(key) > 255 or "\x00" in key:
            raise ProtocolError(
                "invalid_argument",
                "argument names are 1 to 255 characters, without NUL",
                "arguments",
            )
        text = argument_string(key, value)
        if "\x00" in text:
            raise ProtocolError("invalid_argument", f"{key}: NUL characters are not accepted", key)
        if len(text) > limits.max_argument_length:
            raise ProtocolError(
                "invalid_argument",
                f"{key}: {len(text)} characters, at most {limits.max_argument_length}",
                key,
            )
        total += len(key) + len(text)
        if total > limits.max_arguments_size:
            raise ProtocolError(
                "invalid_argument",
                f"arguments: more than {limits.max_arguments_size} characters in all "
                "(PROGRAM_TIMER_MAX_ARGUMENTS_SIZE)",
                "arguments",
            )
        out[key] = text
    return out


def persona_and_name(args: dict[str, str]) -> tuple[str, str]:
    return _name(args, "personaId"), _name(args, "timerName")


def persona_only(args: dict[str, str]) -> str:
    return _name(args, "personaId")


def parse_set_command(
    command_idn: str,
    connector_idn: str,
    args: dict[str, str],
    command_act_id: str,
    limits: ArgumentLimits,
) -> SetCommand:
    """Validate the arguments of ``set_timer``/``set_repeatable_timer`` (SPEC 1.1)."""
    persona_id, timer_name = persona_and_name(args)
    given: set[str] = set()
    repeatable = False
    if command_idn == "set_repeatable_timer":
        repeatable = True
        given.add("repeatable")
        if "repeatable" in args and not parse_bool("repeatable", args["repeatable"]):
            raise _bad("repeatable", args["repeatable"], '"true" (set_repeatable_timer repeats)')
    elif "repeatable" in args:
        repeatable = parse_bool("repeatable", args["repeatable"])
        given.add("repeatable")
    enabled = True
    if "enabled" in args:
        enabled = parse_bool("enabled", args["enabled"])
        given.add("enabled")
    interval = None
    if "interval" in args:
        interval = parse_interval(args["interval"])
        given.add("interval")
    rules: dict[str, str] = {}
    for key in ("rrule", "cron"):
        if key in args:
            rules[key] = parse_rule(key, args[key])
            given.add(key)
    if "rrule" in rules and "cron" in rules:
        raise ProtocolError(
            "invalid_argument",
            "cron: rrule and cron cannot both be given; a timer follows one calendar rule",
            "cron",
        )
    if rules and interval is not None:
        raise ProtocolError(
            "invalid_argument",
            f"interval: interval and {next(iter(rules))} cannot both be given; a repeating "
            "timer follows either an interval or a calendar rule",
            "interval",
        )
    tz_name = args.get("timezone")
    tz = parse_timezone(tz_name) if tz_name is not None else ZoneInfo(limits.default_timezone)
    if rules and tz_name is None:
        tz_name = limits.default_timezone  # a calendar keeps the zone it was given in
    fire_at = None
    if "fireAt" in args:
        fire_at = parse_fire_at(args["fireAt"], tz)
        given.add("fireAt")
    extra = {k: v for k, v in args.items() if k not in RULE_ARGUMENTS}
    warnings = []
    for key in extra:
        if key in EVENT_ARGUMENT_KEYS:
            raise ProtocolError(
                "invalid_argument",
                f"{key}: the fired event sets this argument itself; choose another name",
                key,
            )
        warning = look_alike_warning(key)
        if warning is not None:
            warnings.append(warning)
    return SetCommand(
        persona_id=persona_id,
        timer_name=timer_name,
        connector_idn=connector_idn,
        command_act_id=command_act_id,
        fire_at=fire_at,
        timezone=tz_name,
        interval=interval,
        rrule=rules.get("rrule"),
        cron=rules.get("cron"),
        repeatable=repeatable,
        enabled=enabled,
        extra=extra or None,
        given=frozenset(given),
        warnings=tuple(warnings),
    )
