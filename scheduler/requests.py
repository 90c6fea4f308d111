"""Request handling: request lines in, one reply each out, in order (on the event loop).

Commands go to the store worker (those read together as one run); subscribe, ack and
unsubscribe to the delivery dispatcher; ``status`` is assembled here from what the daemon knows
and one read of the database. Every failure becomes one error reply: ``unavailable`` when the
database cannot be reached, ``internal`` (logged with its traceback) for a bug.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection

from program_timer import __version__
from program_timer.core import logs
from program_timer.core.backoff import Backoff
from program_timer.core.clock import Clock, utc_iso
from program_timer.core.event import event_body
from program_timer.core.model import STATES
from program_timer.events.delivery import Dispatcher
from program_timer.scheduler.commands import READ_ONLY_COMMANDS, Outcome
from program_timer.scheduler.connection import ClientConnection
from program_timer.scheduler.deadlines import Deadline, Deadlines
from program_timer.scheduler.metrics import Metrics
from program_timer.scheduler.protocol import (
    COMMANDS,
    AckRequest,
    CommandRequest,
    DeliveriesRequest,
    PingRequest,
    ProtocolError,
    RedeliverRequest,
    Request,
    StatusRequest,
    SubscribeRequest,
    SubscriptionsRequest,
    UnsubscribeRequest,
    decode_line,
    error_reply,
    ok_reply,
)
from program_timer.scheduler.worker import StoreWorker
from program_timer.store import queries
from program_timer.store.db import Health
from program_timer.store.errors import StoreUnavailable

log = logs.get_logger()
T = TypeVar("T")
PAGE_BYTES = 1024 * 1024  # a page of the deliveries op also ends at about this much event text


@dataclass
class DaemonFacts:
    """What ``status`` tells of the daemon itself."""

    daemon_id: str
    database: str
    started: float  # time.monotonic() at start


class RequestHandler:
    """Answers requests; every wait on the database is bounded by ``database_timeout``."""

    def __init__(
        self,
        facts: DaemonFacts,
        worker: StoreWorker,
        dispatcher: Dispatcher,
        metrics: Metrics,
        clock: Clock,
        connections: Callable[[], int],
        *,
        database_timeout: float,
        health: Health,
        background: dict[str, Backoff] | None = None,
    ) -> None:
        self._background = background or {}
        self._timeout = database_timeout
        self._deadlines = Deadlines(database_timeout)
        self._health = health
        self._facts = facts
        self._worker = worker
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._clock = clock
        self._connections = connections
        # What /metrics reads too (scheduler/prometheus.py).
        self.facts = facts
        self.metrics = metrics
        self.dispatcher = dispatcher
        self.worker = worker
        self.health = health
        self.background = self._background
        self.database_timeout = database_timeout
        self.connections = connections
        self.clock = clock

    def start_lines(
        self, conn: ClientConnection, lines: list[bytes]
    ) -> list[tuple[int, asyncio.Future[Any]]]:
        """The replies to request lines read together, in order: ``(n, future)`` for each of
        their runs, the future giving the reply of one line (a dict) or, for ``n`` commands in
        a row (one or more), the list of their ``n`` replies.

        Commands in a row go to the store worker as one run: one future, one deadline, one
        callback for all, where each command had three futures, a deadline and two callbacks
        (a tenth of the daemon's time per pipelined ``set_timer``; README, "Speed", tenth
        part). Any other request is answered by a task running :meth:`_reply`; a line that is
        not a valid request gets its error reply at once."""
        loop = asyncio.get_running_loop()
        out: list[tuple[int, asyncio.Future[Any]]] = []
        ids: list[Any] = []
        commands: list[CommandRequest] = []
        for line in lines:
            try:
                rid, request = decode_line(line)
            except ProtocolError as err:
                reply: asyncio.Future[Any] = loop.create_future()
                reply.set_result(error_reply(getattr(err, "request_id", None), err))
            else:
                if isinstance(request, CommandRequest):
                    ids.append(rid)
                    commands.append(request)
                    continue
                reply = asyncio.ensure_future(self._reply(conn, rid, request))
            if commands:  # the commands before it come first
                out.append((len(commands), self._start_run(loop, ids, commands)))
                ids, commands = [], []
            out.append((1, reply))
        if commands:
            out.append((len(commands), self._start_run(loop, ids, commands)))
        return out

    async def _reply(self, conn: ClientConnection, rid: Any, request: Request) -> dict[str, Any]:
        try:
            return ok_reply(rid, await self._answer(conn, request))
        except Exception as exc:
            return self._failed(rid, exc)

    def _failed(self, rid: Any, exc: BaseException) -> dict[str, Any]:
        """The one error reply a request that failed gets."""
        if isinstance(exc, ProtocolError):
            return error_reply(getattr(exc, "request_id", rid), exc)
        if isinstance(exc, StoreUnavailable):
            return error_reply(
                rid, ProtocolError("unavailable", f"the database cannot be reached: {exc}")
            )
        log.error("request failed", action="request_failed", exc_info=exc)
        return error_reply(rid, ProtocolError("internal", "internal error; see the daemon's log"))

    async def _bounded(self, work: Awaitable[T], *, write: bool = True) -> T:
        """``work``'s result, or :class:`StoreUnavailable` once the database took longer than
        the timeout. Work still queued then is cancelled (never applied); work already running
        in the database may still complete: the client is told the outcome is unknown."""
        # Not asyncio.wait_for (a task per request), nor a timer handle per request: one
        # handle for every request's deadline (scheduler/deadlines.py).
        fut = asyncio.ensure_future(work)
        deadline = self._deadlines.add(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if not deadline.expired:
                raise  # the request itself was cancelled (shutdown)
            raise self._timed_out(write) from None

    def _timed_out(self, write: bool) -> StoreUnavailable:
        """A request's deadline passed: counted, reported to the health, and told."""
        self._metrics.record_database_error("timeout")
        reason = f"no answer within {self._timeout:g} s (PROGRAM_TIMER_DATABASE_TIMEOUT)"
        self._health.report(False, reason, write=write)
        return StoreUnavailable(
            f"{reason}; the request may or may not have been applied: retry it (with the "
            "same commandActId for a command)"
        )

    async def _answer(self, conn: ClientConnection, request: Request) -> dict[str, Any]:
        if isinstance(request, PingRequest):
            return {"pong": True}
        if isinstance(request, StatusRequest):
            return await self.status()
        if isinstance(request, SubscribeRequest):
            f = request.filter
            return await self._bounded(
                self._dispatcher.subscribe(
                    conn,
                    request.subscriptionId,
                    request.flowInstanceId or request.subscriptionId,
                    f.connectorIdn,
                    f.personaId,
                    since=request.since,
                )
            )
        if isinstance(request, AckRequest):
            return await self._bounded(self._dispatcher.ack(conn, request.deliveryIds))
        if isinstance(request, UnsubscribeRequest):
            return await self._bounded(self._dispatcher.unsubscribe(conn, request.subscriptionId))
        if isinstance(request, SubscriptionsRequest):
            return await self._subscriptions()
        if isinstance(request, DeliveriesRequest):
            return await self._deliveries(request)
        if isinstance(request, RedeliverRequest):
            done = await self._bounded(
                self._dispatcher.redeliver(request.subscriptionId, request.deliveryIds)
            )
            if done is None:
                raise _no_subscription(request.subscriptionId)
            return {"redelivered": done}
        raise AssertionError(request)  # pragma: no cover

    def _start_run(
        self, loop: asyncio.AbstractEventLoop, ids: list[Any], requests: list[CommandRequest]
    ) -> asyncio.Future[list[dict[str, Any]]]:
        """Queue commands for the store worker, within the database timeout; their replies are
        made by :meth:`_run_done` when their outcomes come."""
        outcomes = self._worker.commands(requests, loop)
        deadline = self._deadlines.add(outcomes)
        replies: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
        outcomes.add_done_callback(
            functools.partial(self._run_done, replies, ids, requests, deadline, time.perf_counter())
        )
        return replies

    def _run_done(
        self,
        replies: asyncio.Future[list[dict[str, Any]]],
        ids: list[Any],
        requests: list[CommandRequest],
        deadline: Deadline,
        started: float,
        outcomes: asyncio.Future[list[Outcome]],
    ) -> None:
        """Each command's reply from its outcome; each command counted by name and result
        (``ok`` or the error code)."""
        if outcomes.cancelled() and not deadline.expired:
            replies.cancel()  # the daemon is stopping
            return
        took = time.perf_counter() - started
        done = None if outcomes.cancelled() else outcomes.result()
        out = []
        answered: dict[tuple[str, str], int] = {}  # by (commandIdn, result), for the metrics
        for i, (rid, request) in enumerate(zip(ids, requests, strict=True)):
            result = "internal"
            try:
                if done is None:
                    raise self._timed_out(request.commandIdn not in READ_ONLY_COMMANDS)
                outcome = done[i]
                if outcome.error is not None:
                    raise outcome.error
                assert outcome.result is not None
                result = "ok"
                out.append(ok_reply(rid, outcome.result))
            except Exception as exc:
                if isinstance(exc, ProtocolError):
                    result = exc.code
                elif isinstance(exc, StoreUnavailable):
                    result = "unavailable"
                out.append(self._failed(rid, exc))
            finally:
                key = (request.commandIdn if request.commandIdn in COMMANDS else "other", result)
                answered[key] = answered.get(key, 0) + 1
        self._metrics.record_commands(answered, took)
        replies.set_result(out)

    async def _read(self, fn: Callable[[Connection], T]) -> T:
        """``fn(connection)`` in a read-only transaction on a store reader (on SQLite it does
        not wait for the writer lock), within the database timeout."""
        result: T = await self._bounded(asyncio.wrap_future(self._worker.read(fn)), write=False)
        return result

    async def _subscriptions(self) -> dict[str, Any]:
        now = self._clock.now()
        found = await self._read(lambda c: queries.subscription_figures(c, now))
        return {"subscriptions": [_subscription_to_wire(s) for s in found]}

    async def _deliveries(self, request: DeliveriesRequest) -> dict[str, Any]:
        sid, limit = request.subscriptionId, request.limit
        dead = request.state == "dead"

        def read(conn: Connection) -> list[Any] | None:
            if queries.get_subscription(conn, sid) is None:
                return None
            return queries.list_deliveries(
                conn, sid, dead=dead, after=request.after, limit=limit + 1
            )

        rows = await self._read(read)
        if rows is None:
            raise _no_subscription(sid)
        items: list[dict[str, Any]] = []
        size = 0
        for r in rows[:limit]:
            size += sum(len(k) + len(v) for k, v in r.arguments.items())
            if items and size > PAGE_BYTES:
                break
            items.append(
                {
                    "deliveryId": r.id,
                    "attempt": r.attempt,
                    "state": request.state,
                    # Dead: never sent again (until redelivered).
                    "nextAttemptAt": None if dead else utc_iso(r.next_attempt_at),
                    "event": event_body(
                        external_event_id=r.external_event_id,
                        persona_id=r.persona_id,
                        connector_idn=r.connector_idn,
                        command_act_id=r.command_act_id,
                        arguments=r.arguments,
                    ),
                }
            )
        result: dict[str, Any] = {"deliveries": items}
        if len(items) < len(rows):
            result["nextAfter"] = items[-1]["deliveryId"]
        return result

    async def status(self) -> dict[str, Any]:
        now = self._clock.now()

        def read(conn: Connection) -> dict[str, Any]:
            counts = queries.timer_counts(conn)
            figures = queries.delivery_figures(conn)
            live = queries.live_daemons(conn, now - timedelta(seconds=30))
            return {"counts": counts, "figures": figures, "daemons": live}

        try:
            data: dict[str, Any] | None = await self._bounded(
                asyncio.wrap_future(self._worker.read(read)), write=False
            )
        except StoreUnavailable:
            data = None  # still answer: this is what an operator looks at during an outage
        result = self._daemon_status(data is not None and self._worker.available)
        if data is not None:
            _add_stored_figures(result, data, now)
        return result

    def _daemon_status(self, reachable: bool) -> dict[str, Any]:
        """What the daemon knows without the database."""
        metrics = self._metrics
        return {
            "version": __version__,
            "daemonId": self._facts.daemon_id,
            "uptimeSeconds": round(time.monotonic() - self._facts.started, 3),
            "database": self._facts.database,
            "databaseReachable": reachable,
            "timers": None,
            "fires": {
                "total": metrics.fires,
                "dropped": metrics.dropped,
                "batches": metrics.batches,
                "lateness": metrics.lateness(),
            },
            "commands": {"total": metrics.commands, "errors": metrics.command_errors},
            "events": None,
            "deliveries": {
                "pending": None,
                "dead": None,
                "oldestPendingAgeSeconds": None,
                "inflight": self._dispatcher.inflight,
            },
            "subscriptions": None,
            "connectedSubscribers": self._dispatcher.connected_subscribers,
            "connections": self._connections(),
            "daemons": None,
            # Background work failing now (retried with backoff), with its failures in a row.
            "failing": {
                name: backoff.failures
                for name, backoff in self._background.items()
                if backoff.failing
            },
        }

    def commands_committed(self, done: list[tuple[CommandRequest, Outcome]]) -> datetime | None:
        """After a command group committed (worker thread): log the commands (they are
        counted as their replies go out); the earliest due time they set (to wake the
        firing), if any."""
        earliest: datetime | None = None
        info, debug = logs.enabled(logging.INFO), logs.enabled(logging.DEBUG)
        for req, outcome in done:
            if (
                outcome.error is None
                and outcome.due_at is not None
                and (earliest is None or outcome.due_at < earliest)
            ):
                earliest = outcome.due_at
            if debug or (info and outcome.error is not None):
                _log_command(req, outcome)
        return earliest


def _log_command(req: CommandRequest, outcome: Outcome) -> None:
    args = req.arguments
    ctx = {
        "persona": args.get("personaId"),
        "timer": args.get("timerName"),
        "connector": req.connectorIdn,
        "command": req.commandIdn,
    }
    if outcome.error is not None:
        log.info(
            "command refused",
            action="command_refused",
            code=outcome.error.code,
            field=outcome.error.field,
            reason=outcome.error.message,
            **ctx,
        )
    elif outcome.log:
        log.debug("command applied", **ctx, **outcome.log)


def _add_stored_figures(result: dict[str, Any], data: dict[str, Any], now: datetime) -> None:
    figures = data["figures"]
    oldest = figures["oldest_pending_at"]
    result["timers"] = {state: data["counts"].get(state, 0) for state in STATES}
    result["events"] = {"stored": figures["events"], "unrouted": figures["unrouted_events"]}
    result["deliveries"]["pending"] = figures["pending"]
    result["deliveries"]["dead"] = figures["dead"]
    result["deliveries"]["oldestPendingAgeSeconds"] = (
        round((now - oldest).total_seconds(), 3) if oldest else None
    )
    result["subscriptions"] = figures["subscriptions"]
    result["daemons"] = [
        {
            "daemonId": d.daemon_id,
            "hostname": d.hostname,
            "pid": d.pid,
            "startedAt": utc_iso(d.started_at),
            "heartbeatAt": utc_iso(d.heartbeat_at),
        }
        for d in data["daemons"]
    ]


def _no_subscription(subscription_id: str) -> ProtocolError:
    return ProtocolError(
        "not_found", f"no subscription {subscription_id!r}"[:300], "subscriptionId"
    )


def _subscription_to_wire(found: dict[str, Any]) -> dict[str, Any]:
    row = found["row"]
    filter_ = {}
    if row.filter_connector_idn is not None:
        filter_["connectorIdn"] = row.filter_connector_idn
    if row.filter_persona_id is not None:
        filter_["personaId"] = row.filter_persona_id
    return {
        "subscriptionId": row.subscription_id,
        "flowInstanceId": row.flow_instance_id,
        "filter": filter_,
        "attached": row.attached_to is not None,
        "pending": found["pending"],
        "inflight": found["inflight"],
        "dead": found["dead"],
        "oldestPendingAt": utc_iso(found["oldest_pending_at"]),
        "lastAckAt": utc_iso(row.last_ack_at),
    }
