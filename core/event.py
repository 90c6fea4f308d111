"""The ``timer`` event of SPEC 3 and the ``event`` push message that carries it."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import orjson

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


def event_json(event: dict[str, Any]) -> bytes:
    """An event's JSON, made once and spliced into every push of it (:func:`event_line`)."""
    try:
        return orjson.dumps(event)
    except TypeError:  # what orjson refuses (a lone surrogate), the standard library escapes
        return json.dumps(event, separators=(",", ":")).encode()


def event_line_start(subscription_id: str, flow_instance_id: str) -> bytes:
    """The part of every push to one subscription before its ``deliveryId``."""
    return (
        b'{"op":"event","subscriptionId":'
        + orjson.dumps(subscription_id)
        + b',"flowInstanceId":'
        + orjson.dumps(flow_instance_id)
        + b',"deliveryId":'
    )


def event_line(start: bytes, delivery_id: int, attempt: int, event: bytes) -> bytes:
    """One push, a line of JSON (``{"op": "event", "subscriptionId", "flowInstanceId",
    "deliveryId", "attempt", "event"}``, docs/protocol.md), from the subscription's
    :func:`event_line_start` and the event's :func:`event_json`: building the message as a dict
    and encoding it whole cost several times as much, a push at a time."""
    return b'%s%d,"attempt":%d,"event":%s}\n' % (start, delivery_id, attempt, event)
