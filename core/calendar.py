"""Calendar schedules (SPEC 7.5): RFC 5545 recurrence rules and crontab(5) lines, as pure
arithmetic on instants.

A :class:`Calendar` is one rule read in one time zone. Its occurrences are wall-clock times in
that zone, turned into UTC instants:

- a wall time that does not exist (the spring-forward gap, 02:30 on the change day in Paris)
  fires at the first instant after the gap (03:00 local), as cron implementations run the jobs
  of a skipped hour; several occurrences in one gap (and one at the gap's end) are one fire;
- a wall time that exists twice (fall back) fires once, at the first of the two instants.

The code: :mod:`.calendar_base` (the interface, wall clock and instants), :mod:`.rrule_spec`
(RRULE text), :mod:`.rrule` (its calendar), :mod:`.cron`; this module is their face and keeps
the cache.

Every question is asked about a timer's *start* (its ``anchor_at``: ``fireAt``, else the time of
the command that gave the rule), the first moment the rule may match; the rule's ``DTSTART`` is
the start's wall time, rounded up to a whole second (an RRULE counts ``COUNT`` and steps
``INTERVAL`` from it, and takes the fields it leaves out, such as the hour of a ``FREQ=DAILY``,
from it).

Nothing iterates a rule from its start: an RRULE is re-anchored (its ``DTSTART`` moved to the
period of its grid that holds the instant asked about, with every default the original start
implied made explicit) so that a lookup costs one period's worth of work, however long the timer
has run. Parsed rules are cached by (text, zone), so a batch of timers that share a rule parses
it once.
"""

from __future__ import annotations

import functools
from zoneinfo import ZoneInfo

# The package's face for calendar schedules: what the rules and the argument parsing use.
from program_timer.core.calendar_base import Calendar as Calendar
from program_timer.core.calendar_base import to_instant as to_instant
from program_timer.core.cron import CronCalendar as CronCalendar
from program_timer.core.cron import parse_cron as parse_cron
from program_timer.core.rrule import RRuleCalendar as RRuleCalendar
from program_timer.core.rrule_spec import _defaults as _defaults
from program_timer.core.rrule_spec import parse_rrule as parse_rrule

# --- the cache ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def calendar(kind: str, text: str, zone: str) -> Calendar:
    """The calendar of a rule (``kind`` ``rrule`` or ``cron``) in a zone, parsed once per
    (kind, text, zone).

    :raises RuleError: the rule's text is refused (field ``rrule`` or ``cron``).
    """
    tz = ZoneInfo(zone)
    if kind == "rrule":
        return RRuleCalendar(parse_rrule(text), text, tz)
    if kind == "cron":
        return CronCalendar(parse_cron(text), text, tz)
    raise ValueError(f"unknown calendar kind {kind!r}")
