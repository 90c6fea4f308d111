"""Unit tests of the timer rules (SPEC 1.2) with an injected clock: no database, no sleeping."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from program_timer.core.clock import FakeClock
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
from program_timer.core.rules import (
    FireOutcome,
    apply_set,
    fire,
    next_grid_time,
)
from program_timer.scheduler.arguments import parse_fire_at

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LIMITS = Limits()

_GIVEN = {
    "fire_at": "fireAt",
    "interval": "interval",
    "repeatable": "repeatable",
    "enabled": "enabled",
}


def cmd(**kw: Any) -> SetCommand:
    """A validated set command; ``given`` follows the rule arguments passed."""
    given = frozenset(name for key, name in _GIVEN.items() if key in kw)
    if "timezone" in kw and "fire_at" not in kw:
        raise AssertionError("timezone only goes with fire_at")
    base: dict[str, Any] = {
        "persona_id": "p1",
        "timer_name": "t1",
        "connector_idn": "c1",
        "command_act_id": "act-1",
    }
    base.update(kw)
    return SetCommand(**base, given=given)


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


def set_timer(
    clock: FakeClock, existing: Timer | None = None, limits: Limits = LIMITS, **kw: Any
) -> tuple[Timer, list[str]]:
    return apply_set(existing, cmd(**kw), clock.now(), limits)


def fire_and_store(
    timer: Timer, now: datetime, misfire_grace: float | None = None
) -> tuple[FireOutcome, Timer]:
    """Fire a due timer and keep what the store keeps (as scheduler.firing does)."""
    assert timer.due_at is not None and timer.due_at <= now, "fire() is only called when due"
    out = fire(timer, now, misfire_grace)
    stored = replace(
        timer,
        planned_at=out.planned_at,
        due_at=out.due_at,
        state=out.state,
        fire_count=out.fire_count,
        last_fired_at=out.last_fired_at,
    )
    return out, stored


def run_until(timer: Timer, clock: FakeClock, until: datetime) -> tuple[list[FireOutcome], Timer]:
    """Drive a timer with a perfectly punctual firing loop up to ``until``."""
    fires: list[FireOutcome] = []
    while timer.due_at is not None and timer.due_at <= until:
        clock.set(max(clock.now(), timer.due_at))
        out, timer = fire_and_store(timer, clock.now())
        fires.append(out)
    return fires, timer


# --- the table of SPEC 1.2 ------------------------------------------------------------------


def test_fire_at_only_fires_once_at_fire_at(clock: FakeClock) -> None:
    at = T0 + s(3600)
    timer, warnings = set_timer(clock, fire_at=at)
    assert warnings == []
    assert timer.state == SCHEDULED
    assert timer.planned_at == timer.due_at == at
    assert timer.repeatable is False
    clock.set(at)
    out, timer = fire_and_store(timer, clock.now())
    assert out.fired and out.scheduled_at == at and out.missed_count == 0
    assert timer.state == FIRED and timer.due_at is None and timer.fire_count == 1
    assert timer.last_fired_at == at


def test_interval_only_not_repeatable_fires_once_interval_after_command(clock: FakeClock) -> None:
    clock.advance(17)
    command_time = clock.now()
    timer, warnings = set_timer(clock, interval=120.0)
    assert warnings == []
    assert timer.state == SCHEDULED
    assert timer.due_at == command_time + s(120)
    clock.advance(120)
    out, timer = fire_and_store(timer, clock.now())
    assert out.fired and out.scheduled_at == command_time + s(120)
    assert timer.state == FIRED and timer.due_at is None
    # never again, however long we wait
    clock.advance(10 * 120)
    assert timer.due_at is None


def test_interval_only_repeatable_fires_every_interval_first_after_one_interval(
    clock: FakeClock,
) -> None:
    timer, warnings = set_timer(clock, interval=240.0, repeatable=True)
    assert warnings == []
    assert timer.state == SCHEDULED
    assert timer.due_at == T0 + s(240), "the first fire is one interval after the command"
    fires, _ = run_until(timer, clock, T0 + s(240 * 5))
    assert [f.scheduled_at for f in fires] == [T0 + s(240 * k) for k in range(1, 6)]
    assert all(f.fired and f.missed_count == 0 for f in fires)
    assert [f.fire_count for f in fires] == [1, 2, 3, 4, 5]
    assert fires[-1].due_at == T0 + s(240 * 6)
    assert fires[-1].state == SCHEDULED


def test_fire_at_and_interval_not_repeatable_ignores_interval_with_warning(
    clock: FakeClock,
) -> None:
    at = T0 + s(1000)
    timer, warnings = set_timer(clock, fire_at=at, interval=60.0)
    assert timer.due_at == at, "fires at fireAt, not after the interval"
    assert len(warnings) == 1 and "interval" in warnings[0] and "ignored" in warnings[0]
    clock.set(at)
    out, timer = fire_and_store(timer, clock.now())
    assert out.fired and timer.state == FIRED and timer.due_at is None


def test_fire_at_and_interval_repeatable_fires_at_fire_at_then_every_interval(
    clock: FakeClock,
) -> None:
    at = T0 + s(500)
    timer, warnings = set_timer(clock, fire_at=at, interval=60.0, repeatable=True)
    assert warnings == []
    assert timer.due_at == at, "the first fire is at fireAt itself"
    fires, _ = run_until(timer, clock, at + s(60 * 3))
    assert [f.scheduled_at for f in fires] == [at + s(60 * k) for k in range(4)]
    assert fires[-1].due_at == at + s(60 * 4)


@pytest.mark.parametrize("with_fire_at", [False, True])
def test_repeatable_without_interval_is_an_error(clock: FakeClock, with_fire_at: bool) -> None:
    kw: dict[str, Any] = {"repeatable": True}
    if with_fire_at:
        kw["fire_at"] = T0 + s(60)
    with pytest.raises(RuleError) as exc:
        set_timer(clock, **kw)
    assert exc.value.field == "interval"
    assert exc.value.code == "invalid_argument"
    assert "interval" in exc.value.message and "repeatable" in exc.value.message


def test_repeatable_on_existing_timer_without_interval_is_an_error_and_changes_nothing(
    clock: FakeClock,
) -> None:
    timer, _ = set_timer(clock, fire_at=T0 + s(60), extra={"a": "1"})
    snapshot = replace(timer, arguments=dict(timer.arguments))
    with pytest.raises(RuleError) as exc:
        set_timer(clock, timer, repeatable=True, extra={"b": "2"})
    assert exc.value.field == "interval"
    assert timer == snapshot, "a rejected command changes nothing"


# --- upsert ---------------------------------------------------------------------------------


def test_upsert_given_arguments_replace_others_are_kept(clock: FakeClock) -> None:
    timer, _ = set_timer(
        clock,
        fire_at=T0 + s(3600),
        interval=60.0,
        repeatable=True,
        extra={"topic": "x"},
    )
    created = timer.created_at
    clock.advance(10)
    # only interval given: fireAt, repeatable, enabled, extras keep their stored value
    timer2, _ = set_timer(clock, timer, interval=30.0)
    assert timer2.interval == 30.0
    assert timer2.fire_at == T0 + s(3600)
    assert timer2.repeatable is True
    assert timer2.enabled is True
    assert timer2.arguments == {"topic": "x"}
    assert timer2.created_at == created
    assert timer2.updated_at == clock.now()


def test_upsert_defaults_apply_only_at_creation(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=60.0, repeatable=True, enabled=False)
    assert timer.enabled is False and timer.repeatable is True
    # a later command without repeatable/enabled does not reset them to their defaults
    clock.advance(5)
    timer2, _ = set_timer(clock, timer, interval=90.0)
    assert timer2.enabled is False
    assert timer2.repeatable is True
    assert timer2.state == DISABLED and timer2.due_at is None


def test_upsert_defaults_at_creation(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=60.0)
    assert timer.enabled is True
    assert timer.repeatable is False
    assert timer.arguments == {}
    assert timer.fire_count == 0 and timer.last_fired_at is None
    assert timer.created_at == timer.updated_at == T0


def test_upsert_does_not_mutate_existing(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=60.0, repeatable=True, extra={"a": "1"})
    snapshot = replace(timer, arguments=dict(timer.arguments))
    clock.advance(1)
    set_timer(clock, timer, enabled=False, extra={"b": "2"})
    assert timer == snapshot


def test_enabled_false_alone_pauses_and_keeps_schedule(clock: FakeClock) -> None:
    at = T0 + s(600)
    timer, _ = set_timer(clock, fire_at=at, interval=60.0, repeatable=True)
    clock.advance(100)
    paused, warnings = set_timer(clock, timer, enabled=False)
    assert warnings == []
    assert paused.state == DISABLED
    assert paused.due_at is None, "a disabled timer is never due"
    assert paused.planned_at == at, "the schedule is kept"
    assert paused.anchor_at == timer.anchor_at
    assert paused.fire_at == at and paused.interval == 60.0


def test_enabled_true_alone_resumes(clock: FakeClock) -> None:
    at = T0 + s(600)
    timer, _ = set_timer(clock, fire_at=at)
    clock.advance(100)
    paused, _ = set_timer(clock, timer, enabled=False)
    clock.advance(100)
    resumed, warnings = set_timer(clock, paused, enabled=True)
    assert warnings == []
    assert resumed.state == SCHEDULED
    assert resumed.due_at == at, "resumes with the kept schedule"


def test_giving_interval_restarts_countdown_from_the_command(clock: FakeClock) -> None:
    """A follow-up timer re-set on every user message restarts its countdown."""
    timer, _ = set_timer(clock, interval=300.0)
    assert timer.due_at == T0 + s(300)
    clock.advance(200)
    timer, _ = set_timer(clock, timer, interval=300.0)
    assert timer.due_at == T0 + s(500)
    clock.advance(299)
    timer, _ = set_timer(clock, timer, interval=300.0)
    assert timer.due_at == T0 + s(799)


def test_giving_interval_restarts_repeating_grid_from_the_command(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=100.0, repeatable=True)
    clock.advance(250)
    timer, _ = set_timer(clock, timer, interval=100.0)
    assert timer.anchor_at == T0 + s(250)
    assert timer.due_at == T0 + s(350)


def test_giving_fire_at_restarts_the_schedule(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, fire_at=T0 + s(100))
    clock.advance(50)
    timer, _ = set_timer(clock, timer, fire_at=T0 + s(1000))
    assert timer.due_at == T0 + s(1000)
    assert timer.state == SCHEDULED


def test_extra_arguments_given_replace_stored_ones(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=60.0, extra={"a": "1", "b": "2"})
    assert timer.arguments == {"a": "1", "b": "2"}
    kept, _ = set_timer(clock, timer, enabled=False)
    assert kept.arguments == {"a": "1", "b": "2"}, "no extras given: stored ones kept"
    replaced, _ = set_timer(clock, kept, extra={"c": "3"})
    assert replaced.arguments == {"c": "3"}, "extras given replace (not merge) stored ones"
    # the stored dict is not shared with the command
    replaced.arguments["d"] = "4"
    assert kept.arguments == {"a": "1", "b": "2"}


def test_last_setter_connector_and_act_id_are_remembered(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=60.0)
    again, _ = set_timer(clock, timer, connector_idn="c2", command_act_id="act-2", enabled=True)
    assert again.connector_idn == "c2"
    assert again.command_act_id == "act-2"


# --- no schedule ----------------------------------------------------------------------------


def test_no_schedule_is_kept_unscheduled_with_warning(clock: FakeClock) -> None:
    timer, warnings = set_timer(clock, extra={"k": "v"})
    assert timer.state == UNSCHEDULED
    assert timer.due_at is None and timer.planned_at is None
    assert timer.arguments == {"k": "v"}
    assert len(warnings) == 1 and "never fires" in warnings[0]


def test_no_schedule_enabled_only_stays_unscheduled(clock: FakeClock) -> None:
    timer, _ = set_timer(clock)
    timer, warnings = set_timer(clock, timer, enabled=False)
    assert timer.state == UNSCHEDULED and timer.due_at is None
    assert warnings
    timer, warnings = set_timer(clock, timer, enabled=True)
    assert timer.state == UNSCHEDULED and timer.due_at is None
    assert warnings


def test_no_schedule_then_later_command_gives_one(clock: FakeClock) -> None:
    timer, _ = set_timer(clock)
    clock.advance(30)
    timer, warnings = set_timer(clock, timer, interval=10.0)
    assert warnings == []
    assert timer.state == SCHEDULED
    assert timer.due_at == T0 + s(40)


# --- past fireAt ----------------------------------------------------------------------------


def test_past_fire_at_one_shot_fires_at_once_with_warning(clock: FakeClock) -> None:
    past = T0 - s(3600)
    timer, warnings = set_timer(clock, fire_at=past)
    assert timer.state == SCHEDULED
    assert timer.due_at is not None and timer.due_at <= clock.now(), "due immediately"
    assert any("past" in w for w in warnings)
    out, timer = fire_and_store(timer, clock.now())
    assert out.fired and out.missed_count == 0
    assert timer.state == FIRED and timer.fire_count == 1


def test_past_fire_at_repeating_fires_next_on_grid_not_in_past(clock: FakeClock) -> None:
    anchor = T0 - s(1000)
    timer, warnings = set_timer(clock, fire_at=anchor, interval=300.0, repeatable=True)
    # grid: -1000, -700, -400, -100, +200 ... the first not in the past is +200
    assert timer.due_at == T0 + s(200)
    assert timer.state == SCHEDULED
    assert any("past" in w for w in warnings)
    assert any("2030-01-01T12:03:20Z" in w for w in warnings), "names the next fire time in UTC"
    # the earlier occurrences are not fired: nothing is due now
    assert timer.due_at > clock.now()
    clock.advance(200)
    out, _ = fire_and_store(timer, clock.now())
    assert out.scheduled_at == T0 + s(200)
    assert out.missed_count == 0, "occurrences before the command are not counted as missed"


def test_past_fire_at_repeating_exactly_on_grid_fires_now(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, fire_at=T0 - s(600), interval=300.0, repeatable=True)
    assert timer.due_at == T0


def test_past_fire_at_repeating_with_huge_interval_is_not_in_the_past(clock: FakeClock) -> None:
    """The grid search must not round a time that is already past up to "now"."""
    interval = 10 * 365 * 86400.0  # the largest interval the protocol accepts
    anchor = T0 - s(interval) - s(0.2)
    timer, _ = set_timer(clock, fire_at=anchor, interval=interval, repeatable=True)
    assert timer.due_at == anchor + s(2 * interval)
    assert timer.due_at > clock.now()


def test_repeating_fire_just_before_next_grid_time_does_not_consume_it(
    clock: FakeClock,
) -> None:
    """A late fire just before the next occurrence must not fire that occurrence early."""
    interval = 10 * 365 * 86400.0
    timer, _ = set_timer(clock, fire_at=T0, interval=interval, repeatable=True)
    assert timer.due_at == T0
    clock.set(T0 + s(interval) - s(0.2))
    out, timer = fire_and_store(timer, clock.now())
    assert out.scheduled_at == T0
    assert out.missed_count == 0, "the next occurrence is 0.2 s in the future, not missed"
    assert timer.due_at == T0 + s(interval)
    assert timer.due_at > clock.now()


# --- disabled -------------------------------------------------------------------------------


def test_disabled_at_creation_keeps_schedule_never_due(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, fire_at=T0 + s(60), enabled=False)
    assert timer.state == DISABLED
    assert timer.due_at is None
    assert timer.planned_at == T0 + s(60)


def test_disabled_repeating_never_due_while_time_passes(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=10.0, repeatable=True, enabled=False)
    assert timer.state == DISABLED and timer.due_at is None
    clock.advance(10_000)
    assert run_until(timer, clock, clock.now())[0] == []


def test_reenable_one_shot_whose_time_passed_fires_at_once(clock: FakeClock) -> None:
    at = T0 + s(60)
    timer, _ = set_timer(clock, fire_at=at)
    clock.advance(10)
    timer, _ = set_timer(clock, timer, enabled=False)
    clock.advance(3600)  # fireAt passes while disabled
    timer, _ = set_timer(clock, timer, enabled=True)
    assert timer.state == SCHEDULED
    assert timer.due_at is not None and timer.due_at <= clock.now()
    out, timer = fire_and_store(timer, clock.now())
    assert out.fired and timer.state == FIRED and timer.fire_count == 1


def test_reenable_interval_only_one_shot_whose_time_passed_fires_at_once(
    clock: FakeClock,
) -> None:
    timer, _ = set_timer(clock, interval=60.0)
    timer, _ = set_timer(clock, timer, enabled=False)
    clock.advance(600)
    timer, _ = set_timer(clock, timer, enabled=True)
    assert timer.due_at == T0 + s(60)
    assert timer.due_at <= clock.now()


def test_reenable_repeating_continues_at_next_grid_time_skipping_missed(
    clock: FakeClock,
) -> None:
    anchor = T0 + s(100)
    timer, _ = set_timer(clock, fire_at=anchor, interval=60.0, repeatable=True)
    timer, _ = set_timer(clock, timer, enabled=False)
    clock.set(anchor + s(60 * 7 + 25))  # 8 occurrences skipped while disabled
    timer, _ = set_timer(clock, timer, enabled=True)
    assert timer.state == SCHEDULED
    assert timer.due_at == anchor + s(60 * 8)
    assert timer.anchor_at == anchor, "still on the original grid"
    clock.set(timer.due_at)
    out, _ = fire_and_store(timer, clock.now())
    assert out.scheduled_at == anchor + s(60 * 8)
    assert out.missed_count == 0, "occurrences skipped while disabled are not fired"


def test_reenable_interval_only_repeating_continues_on_start_grid(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=50.0, repeatable=True)
    timer, _ = set_timer(clock, timer, enabled=False)
    clock.advance(1234)
    timer, _ = set_timer(clock, timer, enabled=True)
    # start + k * interval: T0 + 1250 is the first not before T0 + 1234
    assert timer.due_at == T0 + s(1250)
    assert timer.anchor_at == T0


def test_reenable_repeating_before_next_time_keeps_it(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=50.0, repeatable=True)
    timer, _ = set_timer(clock, timer, enabled=False)
    clock.advance(20)
    timer, _ = set_timer(clock, timer, enabled=True)
    assert timer.due_at == T0 + s(50)


# --- after a fire ---------------------------------------------------------------------------


def test_after_fire_repeating_moves_to_next_grid_time(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=60.0, repeatable=True)
    clock.set(T0 + s(60) + s(0.3))  # fired slightly late
    out, timer = fire_and_store(timer, clock.now())
    assert out.fired and out.scheduled_at == T0 + s(60) and out.missed_count == 0
    assert timer.due_at == T0 + s(120), "lateness does not shift the grid"
    assert timer.state == SCHEDULED
    assert timer.fire_count == 1 and timer.last_fired_at == clock.now()


def test_after_fire_one_shot_is_fired_and_stays_fired_on_enabled_only(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, fire_at=T0 + s(10))
    clock.advance(10)
    _, timer = fire_and_store(timer, clock.now())
    assert timer.state == FIRED and timer.due_at is None
    clock.advance(5)
    for enabled in (True, False, True):
        timer, _ = set_timer(clock, timer, enabled=enabled)
        assert timer.state == FIRED
        assert timer.due_at is None
    timer, _ = set_timer(clock, timer, extra={"x": "y"})
    assert timer.state == FIRED and timer.due_at is None


def test_after_fire_one_shot_fires_again_after_new_schedule(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=10.0)
    clock.advance(10)
    _, timer = fire_and_store(timer, clock.now())
    assert timer.state == FIRED
    clock.advance(100)
    timer, _ = set_timer(clock, timer, interval=10.0)
    assert timer.state == SCHEDULED and timer.due_at == clock.now() + s(10)
    clock.advance(10)
    out, timer = fire_and_store(timer, clock.now())
    assert out.fired and timer.fire_count == 2 and timer.state == FIRED

    timer, _ = set_timer(clock, timer, fire_at=clock.now() + s(30))
    assert timer.state == SCHEDULED and timer.due_at == clock.now() + s(30)


# --- downtime -------------------------------------------------------------------------------


def test_downtime_repeating_fires_once_with_missed_count_then_continues_on_grid(
    clock: FakeClock,
) -> None:
    timer, _ = set_timer(clock, interval=60.0, repeatable=True)
    assert timer.due_at == T0 + s(60)
    # the daemon was stopped; it starts again at T0 + 60*10 + 30
    clock.set(T0 + s(60 * 10 + 30))
    out, timer = fire_and_store(timer, clock.now())
    assert out.fired
    assert out.scheduled_at == T0 + s(60)
    # occurrences 1..10 were due: one fire for all, missed_count = 9 beyond the first
    assert out.missed_count == 9
    assert out.dropped == 0
    assert timer.fire_count == 1
    assert timer.due_at == T0 + s(60 * 11)
    # and then continues normally
    clock.set(timer.due_at)
    out, timer = fire_and_store(timer, clock.now())
    assert out.missed_count == 0 and out.scheduled_at == T0 + s(660)
    assert timer.due_at == T0 + s(720)


def test_downtime_repeating_exactly_on_grid_counts_that_occurrence(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, fire_at=T0, interval=60.0, repeatable=True)
    clock.set(T0 + s(180))
    out, timer = fire_and_store(timer, clock.now())
    assert out.missed_count == 3  # 0, 60, 120, 180 were due
    assert timer.due_at == T0 + s(240)


def test_downtime_one_shot_fires_once(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, fire_at=T0 + s(60))
    clock.set(T0 + s(86400 * 3))
    out, timer = fire_and_store(timer, clock.now())
    assert out.fired and out.missed_count == 0 and out.dropped == 0
    assert out.scheduled_at == T0 + s(60)
    assert timer.state == FIRED and timer.due_at is None and timer.fire_count == 1


# --- misfire grace --------------------------------------------------------------------------


def test_misfire_grace_drops_late_one_shot(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, fire_at=T0 + s(60))
    clock.set(T0 + s(60 + 31))
    out, timer = fire_and_store(timer, clock.now(), misfire_grace=30)
    assert not out.fired
    assert out.dropped == 1
    assert timer.fire_count == 0 and timer.last_fired_at is None
    assert timer.state == FIRED and timer.due_at is None, "dropped: done, never fires again"


def test_misfire_grace_keeps_one_shot_within_grace(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, fire_at=T0 + s(60))
    clock.set(T0 + s(60 + 30))
    out, _ = fire_and_store(timer, clock.now(), misfire_grace=30)
    assert out.fired and out.dropped == 0


def test_misfire_grace_repeating_fires_only_occurrences_within_grace(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, fire_at=T0, interval=60.0, repeatable=True)
    # due occurrences: 0, 60, ..., 600 (11); grace 150 s covers 480, 540, 600
    clock.set(T0 + s(600 + 10))
    out, timer = fire_and_store(timer, clock.now(), misfire_grace=150)
    assert out.fired
    assert out.scheduled_at == T0 + s(480)
    assert out.missed_count == 2
    assert out.dropped == 8
    assert timer.due_at == T0 + s(660)
    assert timer.fire_count == 1


def test_misfire_grace_repeating_all_late_drops_and_moves_on(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, fire_at=T0, interval=600.0, repeatable=True)
    clock.set(T0 + s(1200 + 100))  # occurrences 0, 600, 1200 all more than 50 s late
    out, timer = fire_and_store(timer, clock.now(), misfire_grace=50)
    assert not out.fired
    assert out.dropped == 3
    assert timer.fire_count == 0
    assert timer.state == SCHEDULED
    assert timer.due_at == T0 + s(1800)


def test_no_misfire_grace_never_drops(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, fire_at=T0, interval=1.0, repeatable=True)
    clock.set(T0 + s(86400 * 365))
    out, _ = fire_and_store(timer, clock.now(), misfire_grace=None)
    assert out.fired and out.dropped == 0
    assert out.missed_count == 86400 * 365


# --- minimum interval, fractional intervals -------------------------------------------------


def test_repeating_interval_below_minimum_is_an_error(clock: FakeClock) -> None:
    with pytest.raises(RuleError) as exc:
        set_timer(clock, interval=0.5, repeatable=True)
    assert exc.value.field == "interval"
    assert "0.5" in exc.value.message and "minimum" in exc.value.message


def test_repeating_interval_below_configured_minimum_is_an_error(clock: FakeClock) -> None:
    limits = Limits(min_interval=10.0)
    with pytest.raises(RuleError) as exc:
        set_timer(clock, limits=limits, interval=9.0, repeatable=True)
    assert exc.value.field == "interval"
    timer, _ = set_timer(clock, limits=limits, interval=10.0, repeatable=True)
    assert timer.due_at == T0 + s(10)


def test_becoming_repeatable_with_small_stored_interval_is_an_error(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=0.5)
    with pytest.raises(RuleError) as exc:
        set_timer(clock, timer, repeatable=True)
    assert exc.value.field == "interval"


def test_fractional_interval_one_shot(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=0.5)
    assert timer.due_at == T0 + s(0.5)
    assert timer.due_at == T0 + timedelta(microseconds=500_000)


def test_fractional_interval_repeating(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=1.5, repeatable=True)
    fires, timer = run_until(timer, clock, T0 + s(6))
    assert [f.scheduled_at for f in fires] == [T0 + s(1.5 * k) for k in range(1, 5)]
    assert timer.due_at == T0 + s(7.5)
    clock.set(T0 + s(6 + 3.2))  # 7.5 and 9.0 were due
    out, _ = fire_and_store(timer, clock.now())
    assert out.scheduled_at == T0 + s(7.5)
    assert out.missed_count == 1
    assert out.due_at == T0 + s(10.5)


# --- DST ------------------------------------------------------------------------------------


def test_intervals_are_absolute_seconds_across_spring_forward(clock: FakeClock) -> None:
    paris = ZoneInfo("Europe/Paris")
    # 2030-03-31 is the last Sunday of March: 02:00 CET becomes 03:00 CEST (01:00Z)
    anchor = parse_fire_at("2030-03-31T01:30", paris)
    assert anchor == datetime(2030, 3, 31, 0, 30, tzinfo=UTC)
    clock.set(datetime(2030, 3, 30, 12, 0, tzinfo=UTC))
    timer, _ = set_timer(
        clock, fire_at=anchor, timezone="Europe/Paris", interval=3600.0, repeatable=True
    )
    fires, _ = run_until(timer, clock, anchor + s(3600 * 4))
    times = [f.scheduled_at for f in fires]
    assert times == [anchor + s(3600 * k) for k in range(5)]
    assert all(b - a == s(3600) for a, b in itertools.pairwise(times))
    local_hours = [t.astimezone(paris).hour for t in times]
    assert local_hours == [1, 3, 4, 5, 6], "the wall clock jumps, the interval does not"


def test_intervals_are_absolute_seconds_across_fall_back(clock: FakeClock) -> None:
    paris = ZoneInfo("Europe/Paris")
    # 2030-10-27: 03:00 CEST becomes 02:00 CET (01:00Z); a daily timer at 12:00 local
    anchor = parse_fire_at("2030-10-26T12:00", paris)
    assert anchor == datetime(2030, 10, 26, 10, 0, tzinfo=UTC)
    clock.set(anchor - s(60))
    timer, _ = set_timer(
        clock, fire_at=anchor, timezone="Europe/Paris", interval=86400.0, repeatable=True
    )
    fires, _ = run_until(timer, clock, anchor + s(86400 * 2))
    times = [f.scheduled_at for f in fires]
    assert times == [anchor, anchor + s(86400), anchor + s(2 * 86400)]
    assert [t.astimezone(UTC).hour for t in times] == [10, 10, 10]
    assert [t.astimezone(paris).hour for t in times] == [12, 11, 11]


# --- next_grid_time -------------------------------------------------------------------------


def test_next_grid_time_fire_at_grid_includes_anchor(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, fire_at=T0 + s(100), interval=10.0, repeatable=True)
    assert next_grid_time(timer, T0) == T0 + s(100)
    assert next_grid_time(timer, T0 + s(100)) == T0 + s(100)
    assert next_grid_time(timer, T0 + s(100.001)) == T0 + s(110)
    assert next_grid_time(timer, T0 + s(125)) == T0 + s(130)


def test_next_grid_time_interval_only_grid_excludes_start(clock: FakeClock) -> None:
    timer, _ = set_timer(clock, interval=10.0, repeatable=True)
    assert next_grid_time(timer, T0) == T0 + s(10)
    assert next_grid_time(timer, T0 - s(50)) == T0 + s(10)
    assert next_grid_time(timer, T0 + s(10)) == T0 + s(10)
    assert next_grid_time(timer, T0 + s(10) + timedelta(microseconds=1)) == T0 + s(20)
