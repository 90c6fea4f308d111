"""Firing due timers: one transaction per batch claims the timers, records one event per fire,
routes it to the matching subscriptions as delivery rows, and advances or completes the timers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection

from events.model import event_arguments
from events.routing import Router
from scheduler import rules
from scheduler.clock import utc_iso
from scheduler.ids import uuid4_strings
from store import queries


@dataclass
class BatchResult:
    claimed: int = 0
    fired: int = 0
    dropped: int = 0
    deliveries: int = 0
    unrouted: int = 0
    lateness: list[float] = field(default_factory=list)
    fired_timers: list[tuple[str, str, str, str]] = field(default_factory=list)


def fire_batch(
    conn: Connection,
    now: datetime,
    limit: int,
    daemon_id: str,
    misfire_grace: float | None,
) -> BatchResult:
    """Fire up to ``limit`` timers due at ``now`` inside the caller's transaction."""
    due = queries.claim_due(conn, now, limit)
    result = BatchResult(claimed=len(due))
    if not due:
        return result
    router = Router(queries.all_subscriptions(conn))
    now_iso = utc_iso(now)
    external_ids = iter(uuid4_strings(len(due)))
    timer_updates = []
    completed: list[int] = []
    event_rows = []
    routes: list[list[str]] = []
    for timer in due:
        outcome = rules.fire(timer, now, misfire_grace)
        if outcome.fired and outcome.state == rules.FIRED and timer.id is not None:
            completed.append(timer.id)  # the common one-shot case: one UPDATE for all
        else:
            timer_updates.append(
                {
                    "_id": timer.id,
                    "planned_at": outcome.planned_at,
                    "due_at": outcome.due_at,
                    "state": outcome.state,
                    "fire_count": outcome.fire_count,
                    "last_fired_at": outcome.last_fired_at,
                }
            )
        result.dropped += outcome.dropped
        if not outcome.fired:
            continue
        external_id = next(external_ids)
        subs = router.match(timer.connector_idn, timer.persona_id) if router else []
        routes.append(subs)
        event_rows.append(
            {
                "external_event_id": external_id,
                "persona_id": timer.persona_id,
                "timer_name": timer.timer_name,
                "connector_idn": timer.connector_idn,
                "command_act_id": timer.command_act_id,
                "scheduled_at": outcome.scheduled_at,
                "fired_at": now,
                "fire_count": outcome.fire_count,
                "missed_count": outcome.missed_count,
                "arguments": event_arguments(
                    timer,
                    outcome.scheduled_at,
                    now,
                    outcome.fire_count,
                    outcome.missed_count,
                    now_iso,
                ),
                "routed": len(subs),
                "fired_by": daemon_id,
            }
        )
        # Lateness counts from when the fire became due: a past fireAt is due from its command.
        became_due = max(outcome.scheduled_at, timer.updated_at)
        result.lateness.append(max(0.0, (now - became_due).total_seconds()))
        result.fired_timers.append(
            (timer.persona_id, timer.timer_name, timer.connector_idn, external_id)
        )
    queries.complete_one_shots(conn, completed, now)
    queries.update_fired(conn, timer_updates)
    if event_rows:
        event_ids = queries.allocate_event_ids(conn, len(event_rows))
        for row, event_id in zip(event_rows, event_ids, strict=True):
            row["id"] = event_id
        queries.insert_events(conn, event_rows)
        delivery_rows = [
            {
                "subscription_id": sub,
                "event_id": event_id,
                "attempt": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for event_id, subs in zip(event_ids, routes, strict=True)
            for sub in subs
        ]
        queries.insert_deliveries(conn, delivery_rows)
        result.deliveries = len(delivery_rows)
        result.unrouted = sum(1 for subs in routes if not subs)
    result.fired = len(event_rows)
    return result
