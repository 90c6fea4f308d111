"""The fire loop: due timers fired in batches, one transaction each.

:func:`fire_batch` is one batch: it claims the due timers, records one event per fire, routes it
to the matching subscriptions as delivery rows, and advances or completes the timers, all in the
caller's transaction. :class:`FireLoop` runs batches until nothing is due (APScheduler's
``firing`` executor calls :meth:`FireLoop.fire_pass` through the job store), retries a failing
batch with backoff, and logs and counts what fired.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine

from program_timer.core import logs, rules
from program_timer.core.backoff import Backoff
from program_timer.core.clock import Clock, utc_iso
from program_timer.core.event import event_arguments, event_body, event_json
from program_timer.core.ids import uuid4_strings
from program_timer.core.model import FIRED, Timer
from program_timer.core.routing import Router
from program_timer.events.direct import DirectSends, Send
from program_timer.scheduler.metrics import Metrics
from program_timer.store import queries
from program_timer.store.db import KeptConnections
from program_timer.store.errors import Conflict, StoreError, StoreUnavailable
from program_timer.store.notify import DELIVERIES, notify

log = logs.get_logger()

STEADY_WINDOW = 0.02  # seconds: a timer due this soon after a batch is waited for in the pass
SHARED_FRACTION = 8  # while commands come, a batch fires at most batch_size / this


@dataclass
class BatchResult:
    claimed: int = 0
    limit: int = 0  # the most it could claim: claimed == limit means more may be due
    fired: int = 0
    dropped: int = 0
    deliveries: int = 0
    unrouted: int = 0
    lateness: list[float] = field(default_factory=list)
    fired_timers: list[tuple[str, str, str, str]] = field(default_factory=list)
    sends: list[Send] = field(default_factory=list)  # written as sent: push after the commit
    # every subscription the batch left a delivery waiting for (the pump's to send)
    waiting: set[str] = field(default_factory=set)


@dataclass
class Direct:
    """What a batch may send itself (:mod:`program_timer.events.direct`): a free window per
    attached subscription (used up as it sends), and when what it sends is due again if not
    acked."""

    quota: dict[str, int]
    resend_at: datetime


def fire_batch(
    conn: Connection,
    now: datetime,
    limit: int,
    daemon_id: str,
    misfire_grace: float | None,
    direct: Direct | None = None,
    counts_lane: int = 0,
    reserve: tuple[int, int] = (0, 0),
) -> BatchResult:
    """Fire up to ``limit`` timers due at ``now`` inside the caller's transaction;
    ``counts_lane``: :func:`~program_timer.store.queries.add_timer_counts`; ``reserve``: ids
    for about this many events and deliveries taken with the claim
    (:func:`~program_timer.store.queries.reserve_ids`)."""
    due, subscriptions, ids = queries.claim_due(conn, now, limit, reserve)
    result = BatchResult(claimed=len(due), limit=limit)
    if not due:
        return result
    router = Router(subscriptions)
    now_iso = utc_iso(now)
    external_ids = iter(uuid4_strings(len(due)))
    timer_updates: list[dict[str, Any]] = []
    completed: list[int] = []
    event_rows: list[dict[str, Any]] = []
    routes: list[list[str]] = []
    changes: dict[str, int] = {}  # the kept counts by state
    for timer in due:
        outcome = rules.fire(timer, now, misfire_grace)
        queries.count_change(changes, timer.state, outcome.state)
        if outcome.fired and outcome.state == FIRED and timer.id is not None:
            completed.append(timer.id)  # the common one-shot case: one UPDATE for all
        else:
            timer_updates.append(_fired_update(timer, outcome))
        result.dropped += outcome.dropped
        if not outcome.fired:
            continue
        external_id = next(external_ids)
        subs = router.match(timer.connector_idn, timer.persona_id) if router else []
        routes.append(subs)
        event_rows.append(_event_row(timer, outcome, now, now_iso, external_id, daemon_id))
        event_rows[-1]["routed"] = len(subs)
        # Lateness counts from when the fire became due: a past fireAt is due from its command.
        became_due = max(outcome.scheduled_at, timer.updated_at)
        result.lateness.append(max(0.0, (now - became_due).total_seconds()))
        result.fired_timers.append(
            (timer.persona_id, timer.timer_name, timer.connector_idn, external_id)
        )
    queries.complete_one_shots(conn, completed, now)
    queries.update_fired(conn, timer_updates)
    queries.add_timer_counts(conn, changes, counts_lane)
    if event_rows:
        _record_events(conn, event_rows, routes, now, direct, result, ids)
        result.unrouted = sum(1 for subs in routes if not subs)
    result.fired = len(event_rows)
    return result


def _fired_update(timer: Timer, outcome: rules.FireOutcome) -> dict[str, Any]:
    return {
        "_id": timer.id,
        "planned_at": outcome.planned_at,
        "due_at": outcome.due_at,
        "state": outcome.state,
        "fire_count": outcome.fire_count,
        "last_fired_at": outcome.last_fired_at,
    }


def _event_row(
    timer: Timer,
    outcome: rules.FireOutcome,
    now: datetime,
    now_iso: str | None,
    external_id: str,
    daemon_id: str,
) -> dict[str, Any]:
    return {
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
            timer, outcome.scheduled_at, now, outcome.fire_count, outcome.missed_count, now_iso
        ),
        "routed": 0,
        "fired_by": daemon_id,
    }


def _record_events(
    conn: Connection,
    event_rows: list[dict[str, Any]],
    routes: list[list[str]],
    now: datetime,
    direct: Direct | None,
    result: BatchResult,
    ids: queries.Ids,
) -> None:
    """Insert the events and one delivery per (event, matching subscription): written as sent
    for subscriptions this batch sends to itself, waiting for the pump otherwise. Ids come
    first, in one query: a delivery names its event, and a sent one is pushed by its id."""
    quota = direct.quota if direct is not None else {}
    routed: list[tuple[dict[str, Any], str, bool]] = []  # (event row, subscription, sent)
    for row, subs in zip(event_rows, routes, strict=True):
        for sub in subs:
            sent = quota.get(sub, 0) > 0
            if sent:
                quota[sub] -= 1
            else:
                result.waiting.add(sub)
            routed.append((row, sub, sent))
    event_ids, delivery_ids = queries.allocate_ids(conn, len(event_rows), len(routed), ids)
    for row, event_id in zip(event_rows, event_ids, strict=True):
        row["id"] = event_id
    queries.insert_events(conn, event_rows)
    resend_at = direct.resend_at if direct is not None else now
    queries.insert_fired_deliveries(
        conn,
        [
            (delivery_id, row["id"], sub, int(sent))
            for (row, sub, sent), delivery_id in zip(routed, delivery_ids, strict=True)
        ],
        now=now,
        resend_at=resend_at,
    )
    encoded: dict[int, bytes] = {}  # an event's JSON, made once for all its subscriptions
    for (row, sub, sent), delivery_id in zip(routed, delivery_ids, strict=True):
        if sent:
            event = encoded.get(row["id"])
            if event is None:
                event = encoded[row["id"]] = _json(row)
            result.sends.append(Send(sub, delivery_id, event))
    result.deliveries = len(routed)


def _json(row: dict[str, Any]) -> bytes:
    """The JSON of an event row's ``timer`` event, as pushed."""
    return event_json(
        event_body(
            external_event_id=row["external_event_id"],
            persona_id=row["persona_id"],
            connector_idn=row["connector_idn"],
            command_act_id=row["command_act_id"],
            arguments=row["arguments"],
        )
    )


class FireLoop:
    """Fire passes: batches until nothing is due, retried with backoff while they fail."""

    def __init__(
        self,
        engine: Engine,
        clock: Clock,
        metrics: Metrics,
        *,
        daemon_id: str,
        batch_size: int,
        misfire_grace: float | None,
        fired: Callable[[], None],
        direct: DirectSends | None = None,
        ack_timeout: float = 30.0,
        commands_waiting: Callable[[], bool] | None = None,
    ) -> None:
        self._commands_waiting = commands_waiting
        self._direct = direct
        self._ack_timeout = ack_timeout
        self._connections = KeptConnections(engine)  # for the length of a pass
        self._clock = clock
        self._metrics = metrics
        self._daemon_id = daemon_id
        self._batch_size = batch_size
        self._misfire_grace = misfire_grace
        self._fired_hook = fired
        self._stop = threading.Event()
        self.backoff = Backoff("fire_pass")
        self._reported = (0, 0)
        # PostgreSQL: a full batch commits in its own thread while the next one is claimed
        # and computed (its rows are locked: the next claim skips them).
        self._overlap = engine.dialect.name == "postgresql"
        self._committer = (
            ThreadPoolExecutor(1, thread_name_prefix="fire-commit") if self._overlap else None
        )
        self._pending: Future[None] | None = None
        self._lane = 0
        self._used = (0, 0)  # events and deliveries of the last batch: the next one's reserve

    def stop(self) -> None:
        """No new batch starts; a pass waiting to retry returns at once."""
        self._stop.set()

    def fire_pass(self) -> None:
        """Fire everything due, in batches of one transaction each. A timer due within
        STEADY_WINDOW of the last batch is waited for here rather than through a round trip of
        the scheduler: a steady stream of fires then costs one transaction per fire and no
        thread hand-over. A failing batch is retried here, with backoff, until it succeeds or
        the daemon stops (the scheduler starts no other pass meanwhile)."""
        try:
            self._fire_pass()
        finally:
            try:
                self._settle_pending()
            except Exception:  # rolled back: its timers are claimed again by the next pass
                log.warning("last fire batch of the pass failed", action="fire_pass_error")
            finally:
                self._connections.release()

    def _fire_pass(self) -> None:
        while not self._stop.is_set():
            try:
                result, next_due = self._one_batch()
            except Conflict:
                continue  # another daemon took some of the rows first: claim again at once
            except StoreUnavailable as exc:
                self._stop.wait(self.backoff.failed(str(exc), unavailable=True))
                continue
            except StoreError as exc:
                self._stop.wait(self.backoff.failed(str(exc)))
                continue
            except Exception as exc:  # a bug: logged once, retried like a failure
                log.exception("fire pass failed", action="fire_pass_error")
                self._stop.wait(self.backoff.failed(repr(exc)))
                continue
            self.backoff.succeeded()
            if result is None:
                continue  # full, committing: more may be due
            self._record(result)
            if result.claimed >= result.limit:
                continue
            if next_due is None:
                return
            wait = (next_due - self._clock.now()).total_seconds()
            if wait > STEADY_WINDOW:
                return
            if wait > 0:
                self._stop.wait(wait)

    def _limit(self, sharing: bool) -> int:
        """Fires in this batch: the configured size, or an eighth of it while clients are
        sending commands (``sharing``). A command waits for the fire transaction in progress
        (on SQLite for its writer lock; on both, for the GIL the batch's Python holds): smaller
        transactions bound that wait at some cost in fires per second, and only while commands
        come. For the same reason batches do not overlap then (:meth:`_one_batch`)."""
        if sharing:
            return max(1, self._batch_size // SHARED_FRACTION)
        return self._batch_size

    def _one_batch(self) -> tuple[BatchResult | None, datetime | None]:
        """One batch; ``(None, None)`` when it was handed to the committer (full, on
        PostgreSQL, no commands coming): the next batch is claimed while this one commits.
        While commands come, batches do not overlap: with two fire transactions at once a
        command's reply during a burst took 16 to 23 ms at p99 instead of 11 to 14 (README,
        "Speed")."""
        now = self._clock.now()
        sharing = self._commands_waiting is not None and self._commands_waiting()
        limit = self._limit(sharing)
        direct = None
        taken: dict[str, int] = {}
        if self._direct is not None:
            quota = self._direct.reserve()
            taken = dict(quota)
            direct = Direct(quota, now + timedelta(seconds=self._ack_timeout))
        try:
            with contextlib.ExitStack() as stack:
                conn = stack.enter_context(self._connections.pipelined_transaction())
                # Two batches at once (the one before committing) count on two lanes.
                self._lane ^= 1
                result = fire_batch(
                    conn,
                    now,
                    limit,
                    self._daemon_id,
                    self._misfire_grace,
                    direct,
                    self._lane,
                    self._reserve(limit),
                )
                self._used = (result.fired, result.deliveries)
                if result.deliveries > len(result.sends):
                    notify(conn, DELIVERIES, self._daemon_id)
                full = result.claimed >= limit
                # The batch before commits first (its error rolls this one back): fire order;
                # and the next due time is read once its timers have moved on. On PostgreSQL
                # that query and the COMMIT go with the pipeline's end: one round trip.
                self._settle_pending()
                next_due = None if full else queries.next_due_later(conn)
                queries.commit_in_pipeline(conn)
                if full and self._overlap and not sharing and not self._lags(result):
                    used = self._direct.unused(result.sends, taken) if self._direct else {}
                    taken = {}
                    assert self._committer is not None
                    self._pending = self._committer.submit(
                        self._commit, stack.pop_all(), result, used
                    )
                    return None, None
        except BaseException:
            if self._direct is not None:
                self._direct.settle(taken)
            raise
        if self._direct is not None:
            if result.waiting:  # those attached here lag: no direct send overtakes them
                self._direct.waiting(result.waiting)
            self._direct.deliver(result.sends, taken)  # committed: push them now
        return result, None if next_due is None else next_due()

    def _reserve(self, limit: int) -> tuple[int, int]:
        """Ids to take with the next claim: one event more than the last batch fired (at a
        steady rate batches of one and two fires alternate), at most ``limit``, and as many
        deliveries per event as the last batch made at most. A batch that needs more takes
        them in a round trip of its own, as every batch did before."""
        fired, deliveries = self._used
        events = min(limit, fired + 1)
        per_event = -(-deliveries // fired) if fired else 1
        return events, events * per_event

    def _lags(self, result: BatchResult) -> bool:
        """Whether the batch left deliveries waiting for a subscription attached here: it then
        commits before the next batch reserves windows, so that the subscription lags first
        and no direct send of the next batch overtakes them."""
        return (
            bool(result.waiting)
            and self._direct is not None
            and self._direct.would_lag(result.waiting)
        )

    def _commit(
        self, stack: contextlib.ExitStack, result: BatchResult, used: dict[str, int]
    ) -> None:
        """The committer thread: a handed-over batch's commit, then its pushes and figures."""
        try:
            stack.close()
        except BaseException:
            if self._direct is not None:
                self._direct.settle(used)
            raise
        if self._direct is not None:
            self._direct.push(result.sends, used)
        self._record(result)

    def _settle_pending(self) -> None:
        """Wait for the batch handed to the committer; its error is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _record(self, result: BatchResult) -> None:
        self._metrics.record_batch(result.fired, result.dropped, result.lateness)
        if result.fired:
            self._fired_hook()
        if logs.enabled(logging.DEBUG):
            for persona, name, connector, external_id in result.fired_timers:
                log.debug(
                    "timer fired",
                    action="timer_fired",
                    persona=persona,
                    timer=name,
                    connector=connector,
                    external_event_id=external_id,
                )
            if result.fired:
                log.debug(
                    "fired",
                    action="batch_fired",
                    fired=result.fired,
                    deliveries=result.deliveries,
                    unrouted=result.unrouted,
                    dropped=result.dropped,
                )
        if result.dropped:
            log.warning(
                "late fires dropped (misfire grace)", action="fires_dropped", dropped=result.dropped
            )

    def report(self) -> None:
        """Once a minute at info: what fired since the last report (fires are debug lines)."""
        fires, dropped = self._metrics.fires, self._metrics.dropped
        last_fires, last_dropped = self._reported
        self._reported = (fires, dropped)
        if fires > last_fires or dropped > last_dropped:
            lateness = self._metrics.lateness()
            log.info(
                "fires in the last minute",
                action="fires_summary",
                fired=fires - last_fires,
                dropped=dropped - last_dropped,
                lateness_p99_ms=lateness["p99Ms"],
                lateness_max_ms=lateness["maxMs"],
            )
