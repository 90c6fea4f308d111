"""The timer model: what a timer is, what a set command carries, and the names of its states.

Pure data (no database, no clock, no wire format): :mod:`program_timer.core.rules` computes with
it, the store maps it to the ``timers`` table column by column, the protocol renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, NamedTuple

SCHEDULED: Final = "scheduled"
DISABLED: Final = "disabled"
UNSCHEDULED: Final = "unscheduled"
FIRED: Final = "fired"
STATES: Final = (SCHEDULED, DISABLED, UNSCHEDULED, FIRED)

# Keys the fired event sets in its own `arguments`: extra arguments may not use them.
EVENT_ARGUMENT_KEYS: Final = frozenset(
    {
        "personaId",
        "timerName",
        "scheduledAt",
        "firedAt",
        "fireCount",
        "missedCount",
        "repeatable",
        "interval",
        "rrule",
        "cron",
    }
)


class RuleError(ValueError):
    """A command breaks a timer rule; nothing is changed. ``field`` names the argument."""

    def __init__(self, field: str, message: str, code: str = "invalid_argument") -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code


@dataclass(slots=True)
class Timer:
    """One timer as stored: the command's arguments plus its schedule and history."""

    persona_id: str
    timer_name: str
    connector_idn: str
    fire_at: datetime | None
    timezone: str | None
    interval: float | None
    rrule: str | None
    cron: str | None
    repeatable: bool
    enabled: bool
    anchor_at: datetime | None
    planned_at: datetime | None
    due_at: datetime | None
    state: str
    fire_count: int
    last_fired_at: datetime | None
    arguments: dict[str, str]
    command_act_id: str
    created_at: datetime
    updated_at: datetime
    id: int | None = None


class SetCommand(NamedTuple):
    """A validated ``set_timer``: ``given`` names the rule arguments the command carried.

    A named tuple, not a frozen dataclass: as immutable, and made in a third of the time (one
    is made per command; a frozen dataclass sets each of its 14 fields through
    ``object.__setattr__``)."""

    persona_id: str
    timer_name: str
    connector_idn: str
    command_act_id: str
    fire_at: datetime | None = None
    timezone: str | None = None
    interval: float | None = None
    rrule: str | None = None
    cron: str | None = None
    repeatable: bool = False
    enabled: bool = True
    extra: dict[str, str] | None = None
    given: frozenset[str] = frozenset()
    # Warnings found while reading the arguments (an extra argument named like a rule one).
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Limits:
    min_interval: float = 1.0


def format_interval(interval: float | None) -> str | None:
    """An interval as the string the platform uses: ``"240"``, ``"0.5"``."""
    if interval is None:
        return None
    if interval == int(interval):
        return str(int(interval))
    return repr(interval)
