"""The ``timer`` event of SPEC 3 and the ``event`` push message that carries it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from program_timer.core.clock import utc_iso
from program_timer.core.model import Timer, format_interval


def event_arguments(
    timer: Timer,
    scheduled_at: datetime,
    fired_at: datetime,
    fire_count: int,
    missed: int,
    fired_at_iso: str | None = None,
) -> dict[str, str]:
    """The event's ``arguments``: the timer's extra arguments, then the ones the event sets.

    All values are strings, as on the platform. ``interval``, ``rrule`` and ``cron`` are
    present only when the timer has one.
    """
    args = dict(timer.arguments)
    args["personaId"] = timer.persona_id
    args["timerName"] = timer.timer_name
    args["scheduledAt"] = utc_iso(scheduled_at) or ""
    args["firedAt"] = fired_at_iso or utc_iso(fired_at) or ""
    args["fireCount"] = str(fire_count)
    args["missedCount"] = str(missed)
    args["repeatable"] = "true" if timer.repeatable else "false"
    interval = format_interval(timer.interval)
    if interval is not None:
        args["interval"] = interval
    if timer.rrule is not None:
        args["rrule"] = timer.rrule
    if timer.cron is not None:
        args["cron"] = timer.cron
    return args


def event_body(
    *,
    external_event_id: str,
    persona_id: str,
    connector_idn: str,
    command_act_id: str,
    arguments: dict[str, str],
) -> dict[str, Any]:
    return {
        "idn": "timer",
        "integrationIdn": "program_timer",
        "connectorIdn": connector_idn,
        "personaId": persona_id,
        "arguments": arguments,
        "uninterruptible": False,
        "externalEventId": external_event_id,
        "commandActId": command_act_id,
    }


def event_message(
    *,
    subscription_id: str,
    flow_instance_id: str,
    delivery_id: int,
    attempt: int,
    event: dict[str, Any],
) -> dict[str, Any]:
    return {
        "op": "event",
        "subscriptionId": subscription_id,
        "flowInstanceId": flow_instance_id,
        "deliveryId": delivery_id,
        "attempt": attempt,
        "event": event,
    }
