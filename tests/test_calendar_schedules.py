"""Calendar schedules end to end (SPEC 7.5): rrule and cron timers set over the socket of a real
daemon, fired as events, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from program_timer.events.client import ClientError, TimerClient
from tests.daemon_proc import DaemonProcess


def _events(c: TimerClient, n: int, timeout: float = 15.0) -> list[dict]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        out.append(c.next_event(max(0.1, deadline - time.monotonic())))
    return out


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_secondly_rrule_with_count_fires_exactly_three_times(daemon: DaemonProcess) -> None:
    with daemon.client() as sub, daemon.client() as c:
        sub.subscribe("flow-cal")
        reply = c.command(
            "set_repeatable_timer",
            "my_timer",
            personaId="u1",
            timerName="thrice",
            rrule="FREQ=SECONDLY;COUNT=3",
            topic="x",
        )
        timer = reply["timer"]
        assert reply["warnings"] == []
        assert timer["rrule"] == "FREQ=SECONDLY;COUNT=3" and timer["cron"] is None
        assert timer["interval"] is None and timer["repeatable"] is True
        assert timer["state"] == "scheduled"
        first = _parse(timer["nextFireAt"])
        assert first.microsecond == 0 and first >= _parse(timer["updatedAt"])

        messages = _events(sub, 3)
        sub.ack([m["deliveryId"] for m in messages])
        args = [m["event"]["arguments"] for m in messages]
        assert [a["fireCount"] for a in args] == ["1", "2", "3"]
        assert [_parse(a["scheduledAt"]) for a in args] == [
            first + timedelta(seconds=k) for k in range(3)
        ]
        assert all(a["rrule"] == "FREQ=SECONDLY;COUNT=3" for a in args)
        assert all("interval" not in a and "cron" not in a for a in args)
        assert all(a["repeatable"] == "true" and a["topic"] == "x" for a in args)
        assert all(a["missedCount"] == "0" for a in args)

        with pytest.raises(TimeoutError):
            sub.next_event(2.0)  # no fourth
        timer = c.command("get_timer", "my_timer", personaId="u1", timerName="thrice")["timer"]
        assert timer["state"] == "fired" and timer["nextFireAt"] is None
        assert timer["fireCount"] == 3 and timer["rrule"] == "FREQ=SECONDLY;COUNT=3"


def _next_weekday_9(now: datetime, zone: ZoneInfo) -> datetime:
    """The next 09:00 on a weekday in ``zone`` after ``now``, by hand."""
    day = now.astimezone(zone).date()
    while True:
        candidate = datetime(day.year, day.month, day.day, 9, tzinfo=zone)
        if candidate.weekday() < 5 and candidate > now:
            return candidate.astimezone(UTC)
        day += timedelta(days=1)


def test_cron_timer_is_accepted_with_its_next_fire_time(
    daemon_factory: object,
) -> None:
    paris = ZoneInfo("Europe/Paris")
    daemon: DaemonProcess = daemon_factory().start()  # type: ignore[operator]
    with daemon.client() as c:
        before = datetime.now(UTC)
        reply = c.command(
            "set_repeatable_timer",
            "my_timer",
            personaId="u1",
            timerName="standup",
            cron="0 9 * * 1-5",
            timezone="Europe/Paris",
        )
        timer = reply["timer"]
        assert reply["warnings"] == []
        assert timer["cron"] == "0 9 * * 1-5" and timer["rrule"] is None
        assert timer["timezone"] == "Europe/Paris"
        assert timer["state"] == "scheduled"
        assert _parse(timer["nextFireAt"]) == _next_weekday_9(before, paris)
        # The same rule as an RRULE, in the daemon's default zone (UTC here).
        rrule = c.command(
            "set_timer",
            "my_timer",
            personaId="u1",
            timerName="standup-utc",
            repeatable="true",
            rrule="FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR;BYHOUR=9;BYMINUTE=0",
        )["timer"]
        assert _parse(rrule["nextFireAt"]) == _next_weekday_9(before, ZoneInfo("UTC"))
        assert rrule["timezone"] == "UTC"  # the default it was set in, kept with the calendar
    daemon.stop()

    # Stored in the rrule/cron columns: a restarted daemon reads the same timers back.
    again: DaemonProcess = daemon_factory().start()  # type: ignore[operator]
    with again.client() as c:
        stored = c.command("get_timer", "my_timer", personaId="u1", timerName="standup")["timer"]
        listed = c.command("list_timers", "my_timer", personaId="u1")["timers"]
    assert stored == timer
    assert [t["timerName"] for t in listed] == ["standup", "standup-utc"]
    assert listed[1]["rrule"] == "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR;BYHOUR=9;BYMINUTE=0"


ERRORS = [
    ("set_repeatable_timer", {"cron": "0 9 * * *", "interval": "60"}, "interval"),
    ("set_repeatable_timer", {"cron": "0 9 * * *", "rrule": "FREQ=DAILY"}, "cron"),
    ("set_repeatable_timer", {"cron": "0 0 30 2 *"}, "cron"),
    ("set_repeatable_timer", {"rrule": "FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=30"}, "rrule"),
    ("set_repeatable_timer", {"rrule": "DTSTART:20300101T000000Z\nRRULE:FREQ=DAILY"}, "rrule"),
    ("set_repeatable_timer", {"rrule": "FREQ=DAILY;" * 100}, "rrule"),
    ("set_timer", {"cron": "0 9 * * *"}, "cron"),
]


def test_calendar_errors_name_the_argument(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        for command, arguments, field in ERRORS:
            with pytest.raises(ClientError) as exc:
                c.command(command, "my_timer", personaId="u1", timerName="bad", **arguments)
            assert exc.value.code == "invalid_argument", arguments
            assert exc.value.field == field, arguments
        with pytest.raises(ClientError) as missing:
            c.command("get_timer", "my_timer", personaId="u1", timerName="bad")
        assert missing.value.code == "not_found", "a refused command changes nothing"


def test_look_alike_argument_is_kept_with_a_warning(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        reply = c.command(
            "set_timer", "my_timer", personaId="u1", timerName="t", Interval="60", fire_at="x"
        )
    assert reply["timer"]["arguments"] == {"Interval": "60", "fire_at": "x"}
    assert reply["timer"]["state"] == "unscheduled"
    assert reply["warnings"][:2] == [
        '"Interval" is kept as an extra argument: did you mean "interval"?',
        '"fire_at" is kept as an extra argument: did you mean "fireAt"?',
    ]
