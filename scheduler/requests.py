"""Request handling: one decoded request line in, one reply out (on the event loop).

Commands go to the store worker; subscribe, ack and unsubscribe to the delivery dispatcher;
``status`` is assembled here from what the daemon knows and one read of the database. Every
failure becomes one error reply: ``unavailable`` when the database cannot be reached, ``internal``
(logged with its traceback) for a bug.
"""

from __future__ import annotations

import asyncio
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
from program_timer.core.model import STATES
from program_timer.events.delivery import Dispatcher
from program_timer.scheduler.commands import READ_ONLY_COMMANDS, Outcome
from program_timer.scheduler.metrics import Metrics
from program_timer.scheduler.protocol import (
    AckRequest,
    CommandRequest,
    PingRequest,
    ProtocolError,
    Request,
    StatusRequest,
    SubscribeRequest,
    UnsubscribeRequest,
    decode_line,
    error_reply,
    ok_reply,
)
from program_timer.scheduler.server import ClientConnection
from program_timer.scheduler.worker import StoreWorker
from program_timer.store import queries
from program_timer.store.db import Health
from program_timer.store.errors import StoreUnavailable

log = logs.get_logger()
T = TypeVar("T")


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
        self._health = health
        self._facts = facts
        self._worker = worker
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._clock = clock
        self._connections = connections

    async def handle(self, conn: ClientConnection, line: bytes) -> dict[str, Any]:
        rid: Any = None
        try:
            rid, request = decode_line(line)
            return ok_reply(rid, await self._answer(conn, request))
        except ProtocolError as err:
            return error_reply(getattr(err, "request_id", rid), err)
        except StoreUnavailable as exc:
            return error_reply(
                rid, ProtocolError("unavailable", f"the database cannot be reached: {exc}")
            )
        except Exception:
            log.exception("request failed", action="request_failed")
            return error_reply(
                rid, ProtocolError("internal", "internal error; see the daemon's log")
            )

    async def _bounded(self, work: Awaitable[T], *, write: bool = True) -> T:
        """``work``'s result, or :class:`StoreUnavailable` once the database took longer than
        the timeout. Work still queued then is cancelled (never applied); work already running
        in the database may still complete: the client is told the outcome is unknown."""
        # A timer handle that cancels the future, not asyncio.wait_for: no extra task per
        # request (a tenth of the event loop's time per command, measured).
        fut = asyncio.ensure_future(work)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            fut.cancel()

        deadline = asyncio.get_running_loop().call_later(self._timeout, expire)
        try:
            return await fut
        except asyncio.CancelledError:
            if not expired:
                raise  # the request itself was cancelled (shutdown)
            reason = f"no answer within {self._timeout:g} s (PROGRAM_TIMER_DATABASE_TIMEOUT)"
            self._health.report(False, reason, write=write)
            raise StoreUnavailable(
                f"{reason}; the request may or may not have been applied: retry it (with the "
                "same commandActId for a command)"
            ) from None
        finally:
            deadline.cancel()

    async def _answer(self, conn: ClientConnection, request: Request) -> dict[str, Any]:
        if isinstance(request, CommandRequest):
            outcome = await self._bounded(
                self._worker.command(request, asyncio.get_running_loop()),
                write=request.commandIdn not in READ_ONLY_COMMANDS,
            )
            if outcome.error is not None:
                raise outcome.error
            assert outcome.result is not None
            return outcome.result
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
                )
            )
        if isinstance(request, AckRequest):
            return await self._bounded(self._dispatcher.ack(conn, request.deliveryIds))
        if isinstance(request, UnsubscribeRequest):
            return await self._bounded(self._dispatcher.unsubscribe(conn, request.subscriptionId))
        raise AssertionError(request)  # pragma: no cover

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
        """After a command group committed (worker thread): log and count the commands; the
        earliest due time they set (to wake the firing), if any."""
        errors = 0
        earliest: datetime | None = None
        info, debug = logs.enabled(logging.INFO), logs.enabled(logging.DEBUG)
        for req, outcome in done:
            if outcome.error is not None:
                errors += 1
            elif outcome.due_at is not None and (earliest is None or outcome.due_at < earliest):
                earliest = outcome.due_at
            if debug or (info and outcome.error is not None):
                _log_command(req, outcome)
        self._metrics.record_commands(len(done), errors)
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
