"""The timer rules of SPEC 1.2, as pure functions of (timer, command, now).

Nothing here touches a database or reads a clock: the caller passes ``now``. The store keeps
what these functions return; the firing path asks :func:`fire` what a due timer does.

Schedule model: a timer remembers its ``anchor_at`` (the grid origin) and ``planned_at`` (its
next fire whether or not it is enabled). ``due_at`` is ``planned_at`` when the timer is enabled
and scheduled, else ``None``; only ``due_at`` is indexed and scanned for due timers. A repeating
timer fires on the grid ``anchor_at + k * interval``: ``k >= 0`` when ``fireAt`` was given (the
anchor is ``fireAt``), ``k >= 1`` for an interval-only timer (the anchor is the command's time).

A calendar timer (SPEC 7.5: ``rrule`` or ``cron`` instead of ``interval``, always repeating) fires
on its rule's occurrences instead, read in its ``timezone``; its ``anchor_at`` is the first
moment the rule may match (``fireAt``, else the command's time). The calendar arithmetic is in
:mod:`program_timer.core.calendar`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final

from program_timer.core.calendar import Calendar, calendar
from program_timer.core.clock import utc_iso
from program_timer.core.model import (
    DISABLED,
    FIRED,
    SCHEDULED,
    UNSCHEDULED,
    Limits,
    RuleError,
    SetCommand,
    Timer,
)

# Giving one of these restarts the schedule from the command.
RESTARTS: Final = frozenset({"fireAt", "interval", "repeatable", "rrule", "cron"})
RULES: Final = frozenset({"rrule", "cron"})
_MICROSECOND: Final = timedelta(microseconds=1)


def timer_calendar(timer: Timer) -> Calendar | None:
    """The calendar a timer follows (its rule in its zone; UTC if it has none), or None.

    :raises RuleError: the stored rule's text is refused.
    """
    zone = timer.timezone or "UTC"
    if timer.rrule is not None:
        return calendar("rrule", timer.rrule, zone)
    if timer.cron is not None:
        return calendar("cron", timer.cron, zone)
    return None


def _seconds(delta: timedelta) -> float:
    return delta.total_seconds()


def _grid_index_at_or_after(anchor: datetime, interval: float, when: datetime, k_min: int) -> int:
    """The least ``k >= k_min`` with ``_grid_time(k) >= when``.

    The float estimate can be off by one (division rounding, grid times rounded to the
    microsecond); it is settled on the datetimes themselves.
    """
    k = max(math.ceil(_seconds(when - anchor) / interval), k_min)
    while k > k_min and _grid_time(anchor, interval, k - 1) >= when:
        k -= 1
    while _grid_time(anchor, interval, k) < when:
        k += 1
    return k


def _grid_index_at_or_before(anchor: datetime, interval: float, when: datetime) -> int:
    """The greatest ``k`` with ``_grid_time(k) <= when``, settled like the one above."""
    k = math.floor(_seconds(when - anchor) / interval)
    while _grid_time(anchor, interval, k + 1) <= when:
        k += 1
    while _grid_time(anchor, interval, k) > when:
        k -= 1
    return k


def _grid_time(anchor: datetime, interval: float, k: int) -> datetime:
    return anchor + timedelta(seconds=k * interval)


def _k_min(timer: Timer) -> int:
    """Interval-only repeating timers start one interval after their anchor."""
    return 0 if timer.fire_at is not None else 1


def next_grid_time(timer: Timer, not_before: datetime) -> datetime:
    """The first grid time of a repeating timer that is not before ``not_before``."""
    assert timer.anchor_at is not None and timer.interval is not None
    k = _grid_index_at_or_after(timer.anchor_at, timer.interval, not_before, _k_min(timer))
    return _grid_time(timer.anchor_at, timer.interval, k)


def derive_state(timer: Timer, completed: bool) -> str:
    if completed:
        return FIRED
    if timer.planned_at is None:
        return UNSCHEDULED
    if not timer.enabled:
        return DISABLED
    return SCHEDULED


def apply_set(
    existing: Timer | None, cmd: SetCommand, now: datetime, limits: Limits
) -> tuple[Timer, list[str]]:
    """The timer that ``cmd`` leaves behind, and the reply's warnings.

    Upsert: the arguments given replace the stored ones, the others keep their stored value;
    defaults apply only on creation. Giving ``fireAt``, ``interval``, ``repeatable``, ``rrule``
    or ``cron`` restarts the schedule from ``now``; ``enabled`` alone keeps it. A timer follows
    one of ``interval``, ``rrule`` and ``cron``: giving one clears the others.

    :raises RuleError: the command is refused; ``existing`` is untouched.
    """
    warnings: list[str] = list(cmd.warnings)
    if existing is None:
        timer, was_enabled, completed = _new_timer(cmd, now), True, False
    else:
        timer = replace(existing, arguments=dict(existing.arguments))
        was_enabled, completed = existing.enabled, existing.state == FIRED
    _take_arguments(timer, cmd, now)
    _check_repeat(timer, cmd, limits)

    if existing is None or cmd.given & RESTARTS:
        completed = False
        _plan(timer, now, warnings)
    elif (
        not was_enabled
        and timer.enabled
        and timer.repeatable
        and timer.planned_at is not None
        and timer.planned_at < now
    ):
        # Re-enabled: continue on the grid; occurrences skipped while disabled are not fired.
        cal = timer_calendar(timer)
        if cal is None:
            timer.planned_at = next_grid_time(timer, now)
        else:
            assert timer.anchor_at is not None
            timer.planned_at = cal.at_or_after(timer.anchor_at, now)
            completed = timer.planned_at is None  # its COUNT or UNTIL ended while disabled

    timer.state = derive_state(timer, completed)
    timer.due_at = timer.planned_at if timer.state == SCHEDULED else None
    if timer.state == UNSCHEDULED:
        warnings.append(
            "the timer has neither fireAt, interval, rrule nor cron: it is kept but never fires"
        )
    return timer, warnings


def _new_timer(cmd: SetCommand, now: datetime) -> Timer:
    """A timer as created: every rule argument at its default, no schedule yet."""
    return Timer(
        persona_id=cmd.persona_id,
        timer_name=cmd.timer_name,
        connector_idn=cmd.connector_idn,
        fire_at=None,
        timezone=None,
        interval=None,
        rrule=None,
        cron=None,
        repeatable=False,
        enabled=True,
        anchor_at=None,
        planned_at=None,
        due_at=None,
        state=UNSCHEDULED,
        fire_count=0,
        last_fired_at=None,
        arguments={},
        command_act_id=cmd.command_act_id,
        created_at=now,
        updated_at=now,
    )


def _take_arguments(timer: Timer, cmd: SetCommand, now: datetime) -> None:
    """The arguments the command gave replace the stored ones (upsert).

    A timer follows one of ``interval``, ``rrule`` and ``cron``: giving one clears the others,
    giving two is refused. The zone of a calendar is the ``timezone`` of the command that gave
    its rule (the parser puts the default zone there when none was given); a later ``fireAt``
    with a ``timezone`` moves it, one without keeps it.
    """
    given = cmd.given
    if given >= RULES:
        raise RuleError(
            "cron", "rrule and cron cannot both be given: a timer follows one calendar rule"
        )
    if "interval" in given and given & RULES:
        rule = "rrule" if "rrule" in given else "cron"
        raise RuleError(
            "interval",
            f"interval and {rule} cannot both be given: a repeating timer follows either an "
            "interval or a calendar rule",
        )
    if "fireAt" in given:
        timer.fire_at = cmd.fire_at
        if cmd.timezone is not None or (timer.rrule is None and timer.cron is None):
            timer.timezone = cmd.timezone
    if "interval" in given:
        timer.interval = cmd.interval
        timer.rrule = timer.cron = None
    if "rrule" in given:
        timer.rrule, timer.cron, timer.interval = cmd.rrule, None, None
    if "cron" in given:
        timer.cron, timer.rrule, timer.interval = cmd.cron, None, None
    if given & RULES:
        timer.timezone = cmd.timezone
    if "repeatable" in given:
        timer.repeatable = cmd.repeatable
    if "enabled" in given:
        timer.enabled = cmd.enabled
    if cmd.extra is not None:
        timer.arguments = dict(cmd.extra)
    timer.connector_idn = cmd.connector_idn
    timer.command_act_id = cmd.command_act_id
    timer.updated_at = now


def _check_repeat(timer: Timer, cmd: SetCommand, limits: Limits) -> None:
    rule = "rrule" if timer.rrule is not None else "cron" if timer.cron is not None else None
    if not timer.repeatable:
        if rule is not None and rule in cmd.given:
            raise RuleError(
                rule,
                f'{rule} needs a repeating timer: use set_repeatable_timer or repeatable="true"',
            )
        if rule is not None:
            raise RuleError(
                "repeatable",
                f"the timer follows its {rule}, which repeats: give interval (which replaces "
                'the rule) with repeatable="false" to make it a one-shot',
            )
        return
    if rule is not None:
        return
    if timer.interval is None:
        raise RuleError("interval", 'interval, rrule or cron is required when repeatable is "true"')
    if timer.interval < limits.min_interval:
        raise RuleError(
            "interval",
            f"interval {timer.interval:g} s is below the minimum repeat interval of "
            f"{limits.min_interval:g} s",
        )


def _plan(timer: Timer, now: datetime, warnings: list[str]) -> None:
    """Restart the schedule from ``now`` (the command's time)."""
    fire_at, interval = timer.fire_at, timer.interval
    cal = timer_calendar(timer)
    if cal is not None:  # repeating (checked): from fireAt, else from the command
        timer.anchor_at = fire_at if fire_at is not None else now
        timer.planned_at = cal.first(timer.anchor_at, now)
        if fire_at is not None and fire_at < now:
            warnings.append(
                f"fireAt is in the past: the timer fires next at {utc_iso(timer.planned_at)}"
            )
        return
    if fire_at is None and interval is None:
        timer.anchor_at = timer.planned_at = None
        return
    if not timer.repeatable:
        timer.anchor_at = None
        if fire_at is not None:
            if interval is not None:
                warnings.append("interval is ignored: the timer is not repeatable and has fireAt")
            timer.planned_at = fire_at
            if fire_at < now:
                warnings.append("fireAt is in the past: the timer fires at once")
        else:
            assert interval is not None
            timer.planned_at = now + timedelta(seconds=interval)
        return
    assert interval is not None
    timer.anchor_at = fire_at if fire_at is not None else now
    timer.planned_at = next_grid_time(timer, now)
    if fire_at is not None and fire_at < now:
        warnings.append(
            f"fireAt is in the past: the timer fires next at {utc_iso(timer.planned_at)}"
        )


@dataclass(frozen=True, slots=True)
class FireOutcome:
    """What a due timer does at ``now``.

    ``fired`` is false when every due occurrence was later than the misfire grace (dropped).
    The timer fields to store are ``planned_at``/``due_at``/``state``/``fire_count``/
    ``last_fired_at``.
    """

    fired: bool
    scheduled_at: datetime
    missed_count: int
    dropped: int
    fire_count: int
    last_fired_at: datetime | None
    planned_at: datetime | None
    due_at: datetime | None
    state: str


def fire(timer: Timer, now: datetime, misfire_grace: float | None) -> FireOutcome:
    """Fire a due timer (``timer.due_at <= now``).

    One-shot: fires once and is completed (state ``fired``). Repeating: fires once for every
    occurrence due by ``now`` (``missed_count`` = the occurrences beyond the first) and moves to
    the first grid time after ``now``. With ``misfire_grace`` set, occurrences later than it are
    dropped (counted in ``dropped``) instead of fired.
    """
    assert timer.due_at is not None
    due = timer.due_at
    grace = None if misfire_grace is None else timedelta(seconds=misfire_grace)
    if timer.repeatable and (timer.rrule is not None or timer.cron is not None):
        return _fire_calendar(timer, now, grace)
    if not timer.repeatable or timer.interval is None or timer.anchor_at is None:
        if grace is not None and now - due > grace:
            return FireOutcome(
                False, due, 0, 1, timer.fire_count, timer.last_fired_at, None, None, FIRED
            )
        return FireOutcome(True, due, 0, 0, timer.fire_count + 1, now, None, None, FIRED)

    anchor, interval = timer.anchor_at, timer.interval
    k_due = round(_seconds(due - anchor) / interval)
    k_now = max(k_due, _grid_index_at_or_before(anchor, interval, now))
    next_at = _grid_time(anchor, interval, k_now + 1)
    occurrences = k_now - k_due + 1
    first_k = k_due
    if grace is not None:
        oldest_allowed = now - grace
        first_k = max(k_due, _grid_index_at_or_after(anchor, interval, oldest_allowed, k_due))
    dropped = first_k - k_due
    if first_k > k_now:
        return FireOutcome(
            False,
            due,
            0,
            occurrences,
            timer.fire_count,
            timer.last_fired_at,
            next_at,
            next_at if timer.enabled else None,
            SCHEDULED,
        )
    scheduled = due if first_k == k_due else _grid_time(anchor, interval, first_k)
    return FireOutcome(
        True,
        scheduled,
        k_now - first_k,
        dropped,
        timer.fire_count + 1,
        now,
        next_at,
        next_at,
        SCHEDULED,
    )


def _fire_calendar(timer: Timer, now: datetime, grace: timedelta | None) -> FireOutcome:
    """:func:`fire` for a calendar timer: the same catch-up and grace, on the rule's
    occurrences; when none is left (``COUNT``, ``UNTIL``) the timer is ``fired``."""
    assert timer.due_at is not None
    due, anchor = timer.due_at, timer.anchor_at or timer.due_at
    try:
        cal = timer_calendar(timer)
    except RuleError:
        cal = None
    if cal is None:  # a stored rule this version refuses: end the timer rather than fail
        return FireOutcome(
            False, due, 0, 0, timer.fire_count, timer.last_fired_at, None, None, FIRED
        )
    first, dropped = due, 0
    if grace is not None and now - due > grace:
        first_allowed = cal.at_or_after(anchor, now - grace)
        if first_allowed is None or first_allowed > now:
            missed, next_at = cal.scan(anchor, due, now)
            return FireOutcome(
                False,
                due,
                0,
                1 + missed,
                timer.fire_count,
                timer.last_fired_at,
                next_at,
                next_at if timer.enabled else None,
                SCHEDULED if next_at is not None else FIRED,
            )
        first = first_allowed
        dropped = 1 + cal.count(anchor, due, first - _MICROSECOND)
    missed, next_at = cal.scan(anchor, first, now)
    return FireOutcome(
        True,
        first,
        missed,
        dropped,
        timer.fire_count + 1,
        now,
        next_at,
        next_at,
        SCHEDULED if next_at is not None else FIRED,
    )
