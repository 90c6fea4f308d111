"""The daemon: start-up and shutdown read top to bottom as one exit stack.

Threads: the asyncio loop (socket server, delivery pump), the store worker (database work of
the socket side, commands group-committed), and APScheduler's scheduler thread plus its
one-thread ``firing`` executor, which runs the fire passes of :class:`store.jobstore.TimerJobStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Connection

from events.delivery import Dispatcher
from scheduler import __version__, logs, rules, systemd
from scheduler.clock import Clock, SystemClock, utc_iso
from scheduler.commands import CommandSettings, Outcome
from scheduler.config import Settings
from scheduler.firing import BatchResult, fire_batch
from scheduler.logs import get_logger
from scheduler.metrics import Metrics
from scheduler.protocol import (
    AckRequest,
    ArgumentLimits,
    CommandRequest,
    PingRequest,
    ProtocolError,
    StatusRequest,
    SubscribeRequest,
    UnsubscribeRequest,
    decode_line,
    error_reply,
    ok_reply,
)
from scheduler.server import ClientConnection, SocketServer
from scheduler.worker import StoreWorker
from store import queries
from store.db import SQLiteLock, make_engine, normalize_url, sqlite_path, transaction, upgrade
from store.errors import Conflict, StoreError, StoreUnavailable
from store.jobstore import TimerJobStore
from store.notify import DELIVERIES, WAKEUP, Listener, notify

log = get_logger()

STEADY_WINDOW = 0.02  # seconds: a timer due this soon after a batch is waited for in the pass


class Daemon:
    def __init__(
        self,
        settings: Settings,
        clock: Clock | None = None,
        reload: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self._reload_settings = reload
        self.clock = clock or SystemClock()
        self.daemon_id = (
            settings.daemon_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.metrics = Metrics()
        self.started = time.monotonic()
        self.url = normalize_url(settings.database_url)
        self.kind = self.url.get_backend_name()
        self._stop = asyncio.Event()
        self._stopping = False
        self._reported = (0, 0)
        self.command_settings = CommandSettings(
            limits=rules.Limits(min_interval=settings.min_interval),
            arguments=ArgumentLimits(
                max_arguments=settings.max_arguments,
                max_argument_length=settings.max_argument_length,
                max_arguments_size=settings.max_arguments_size,
                default_timezone=settings.timezone,
            ),
            max_timers_per_persona=settings.max_timers_per_persona,
            connectors=settings.connector_allow_list,
        )

    # lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            with contextlib.ExitStack() as stack:
                await self._start(stack)
                await self._stop.wait()
                systemd.notify("STOPPING=1")
                log.info("stopping", action="stopping")
                await self._shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("stopped", action="stopped")

    def request_stop(self, sig: Any = None) -> None:
        if self._stop.is_set():
            return
        log.info(
            "stop requested",
            action="stop_requested",
            signal=signal.Signals(sig).name if sig else None,
        )
        self._stop.set()

    def _reload(self) -> None:
        """SIGHUP: read the configuration again and apply the log format and level (the
        output is reopened). Other settings need a restart; a bad file keeps the old ones."""
        from scheduler.config import ConfigError
        from scheduler.logs import configure

        fmt, level = self.settings.log_format, self.settings.log_level
        if self._reload_settings is not None:
            try:
                fresh = self._reload_settings()
                fmt, level = fresh.log_format, fresh.log_level
            except ConfigError as exc:
                log.error("configuration not reloaded", action="reload_failed", reason=str(exc))
        configure(fmt, level)
        log.info("logging reconfigured", action="reloaded", log_format=fmt, log_level=level)

    async def _start(self, stack: contextlib.ExitStack) -> None:
        settings = self.settings
        path = sqlite_path(self.url)
        if path is not None:
            lock = SQLiteLock(path)
            lock.acquire()
            stack.callback(lock.release)
        self.engine = make_engine(settings.database_url, name=f"program-timer {self.daemon_id}")
        stack.callback(self.engine.dispose)
        await asyncio.to_thread(upgrade, self.engine)
        now = self.clock.now()
        with transaction(self.engine) as conn:
            queries.register_daemon(
                conn,
                {
                    "daemon_id": self.daemon_id,
                    "hostname": socket.gethostname(),
                    "pid": os.getpid(),
                    "version": __version__,
                    "started_at": now,
                    "heartbeat_at": now,
                },
            )
            queries.detach_daemon(conn, self.daemon_id)

        self.worker = StoreWorker(
            self.engine,
            self.command_settings,
            self.clock,
            max_batch=settings.command_batch_size,
            on_committed=self._commands_committed,
        )
        self.worker.start()
        stack.callback(self.worker.stop)

        self.dispatcher = Dispatcher(
            self.worker,
            self.daemon_id,
            ack_timeout=settings.ack_timeout,
            max_inflight=settings.max_inflight,
            now=self.clock.now,
        )
        self.dispatcher.start()

        self.jobstore = TimerJobStore(
            self.engine,
            self._fire_pass,
            poll_interval=settings.poll_interval,
            now=self.clock.now,
        )
        self.scheduler = BackgroundScheduler(
            timezone="UTC",
            jobstore_retry_interval=1,
            executors={
                "default": ThreadPoolExecutor(1),
                "firing": ThreadPoolExecutor(1),
            },
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self.scheduler.add_jobstore(self.jobstore, alias="timers")
        self.scheduler.add_job(self._maintain, "interval", seconds=60, id="maintenance")
        self.scheduler.add_job(self._heartbeat, "interval", seconds=5, id="heartbeat")
        self.scheduler.add_job(self._report, "interval", seconds=60, id="report")
        self.scheduler.start()

        if self.kind == "postgresql":
            # Several daemons may share the database: wake on each other's changes.
            listener = Listener(
                self.url,
                self.daemon_id,
                {WAKEUP: self.scheduler.wakeup, DELIVERIES: self.dispatcher.kick},
            )
            listener.start()
            stack.callback(listener.stop)

        self.server = SocketServer(
            self._handle,
            path=settings.socket,
            mode=settings.mode,
            allowed_uids=settings.uid_allow_list,
            allowed_gids=settings.gid_allow_list,
            max_connections=settings.max_connections,
            max_pipeline=settings.max_pipeline,
            on_disconnect=self.dispatcher.disconnected,
        )
        inherited = systemd.listen_fds()
        await self.server.start(inherited[0] if inherited else None)

        interval = systemd.watchdog_interval()
        if interval:
            self._watchdog = asyncio.create_task(self._watchdog_loop(interval))
        systemd.notify(f"READY=1\nSTATUS=serving on {settings.socket}\nMAINPID={os.getpid()}")
        log.info(
            "ready",
            action="ready",
            version=__version__,
            database=self.kind,
            database_url=self.url.render_as_string(hide_password=True),
            socket=settings.socket,
            daemon=self.daemon_id,
        )

    async def _shutdown(self) -> None:
        self._stopping = True
        await self.server.stop_accepting()
        # Finish the fire pass in hand; no new one starts.
        await asyncio.to_thread(self.scheduler.shutdown, True)
        await self.dispatcher.stop()
        await self.server.close_all()
        with contextlib.suppress(StoreError), transaction(self.engine) as conn:
            queries.detach_daemon(conn, self.daemon_id)
            queries.forget_daemon(conn, self.daemon_id)

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # firing (runs on the APScheduler "firing" executor thread) -----------------------------

    def _fire_pass(self) -> None:
        """Fire everything due, in batches of one transaction each (APScheduler's firing
        executor runs this). A timer due within STEADY_WINDOW of the last batch is waited for
        here rather than through a round trip of the scheduler: a steady stream of fires then
        costs one transaction per fire and no thread hand-over."""
        size = self.settings.fire_batch_size
        while not self._stopping:
            now = self.clock.now()
            try:
                with transaction(self.engine) as conn:
                    result = fire_batch(
                        conn, now, size, self.daemon_id, self.settings.misfire_grace
                    )
                    if result.deliveries:
                        notify(conn, DELIVERIES, self.daemon_id)
                    full = result.claimed >= size
                    next_due = None if full else queries.next_due_at(conn)
            except Conflict:
                continue
            except StoreUnavailable as exc:
                log.warning(
                    "fire pass interrupted: database unreachable",
                    action="fire_failed",
                    reason=str(exc),
                )
                return
            self._fired(result)
            if full:
                continue
            if next_due is None:
                return
            wait = (next_due - self.clock.now()).total_seconds()
            if wait > STEADY_WINDOW:
                return
            if wait > 0:
                time.sleep(wait)

    def _fired(self, result: BatchResult) -> None:
        self.metrics.record_batch(result.fired, result.dropped, result.lateness)
        if result.fired:
            self.dispatcher.kick()
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
                "late fires dropped (misfire grace)",
                action="fires_dropped",
                dropped=result.dropped,
            )

    def _report(self) -> None:
        """Once a minute at info: what fired since the last report (fires are debug lines)."""
        fires, dropped = self.metrics.fires, self.metrics.dropped
        last_fires, last_dropped = self._reported
        self._reported = (fires, dropped)
        if fires > last_fires or dropped > last_dropped:
            lateness = self.metrics.lateness()
            log.info(
                "fires in the last minute",
                action="fires_summary",
                fired=fires - last_fires,
                dropped=dropped - last_dropped,
                lateness_p99_ms=lateness["p99Ms"],
                lateness_max_ms=lateness["maxMs"],
            )

    def _maintain(self) -> None:
        now = self.clock.now()
        retention = timedelta(seconds=self.settings.retention)
        try:
            with transaction(self.engine) as conn:
                timers = queries.purge_fired_timers(conn, now - retention)
                acts = queries.purge_command_acts(conn, now - timedelta(hours=24))
                acked, expired = queries.purge_deliveries_and_events(
                    conn,
                    now - timedelta(seconds=min(3600, self.settings.retention)),
                    now - retention,
                )
        except StoreError as exc:
            log.warning("maintenance skipped", action="maintenance_failed", reason=str(exc))
            return
        if timers or acts or acked or expired:
            log.info(
                "purged",
                action="purged",
                fired_timers=timers,
                command_acts=acts,
                acked_deliveries=acked,
                expired_events=expired,
            )

    def _heartbeat(self) -> None:
        """Mark this daemon alive; forget daemons silent for a minute (their subscriptions
        become free to re-attach anywhere)."""
        now = self.clock.now()
        dead: list[str] = []
        with contextlib.suppress(StoreError), transaction(self.engine) as conn:
            queries.heartbeat(conn, self.daemon_id, now)
            dead = queries.purge_dead_daemons(conn, now - timedelta(seconds=60))
        if dead:
            log.warning(
                "daemons gone silent were forgotten", action="daemons_forgotten", daemons=dead
            )

    # requests (on the event loop) ----------------------------------------------------------

    def _commands_committed(self, done: list[tuple[CommandRequest, Outcome]]) -> None:
        """After a command group committed (worker thread): log, count, wake the firing."""
        errors = 0
        earliest: datetime | None = None
        info, debug = logs.enabled(logging.INFO), logs.enabled(logging.DEBUG)
        for req, outcome in done:
            if outcome.error is not None:
                errors += 1
            elif outcome.due_at is not None and (earliest is None or outcome.due_at < earliest):
                earliest = outcome.due_at
            if not (debug or (info and outcome.error is not None)):
                continue
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
        self.metrics.record_commands(len(done), errors)
        if earliest is None:
            return
        self.jobstore.wake_if_before(earliest)
        if self.kind == "postgresql" and earliest < self.clock.now() + timedelta(
            seconds=self.settings.poll_interval
        ):
            # Other daemons sharing the database plan at most one poll interval ahead: tell
            # them only about a timer due sooner than that.
            with contextlib.suppress(StoreError), transaction(self.engine) as conn:
                notify(conn, WAKEUP, self.daemon_id)

    async def _handle(self, conn: ClientConnection, line: bytes) -> dict[str, Any]:
        rid: Any = None
        try:
            rid, request = decode_line(line)
            if isinstance(request, CommandRequest):
                outcome = await self.worker.command_async(request)
                if outcome.error is not None:
                    return error_reply(rid, outcome.error)
                assert outcome.result is not None
                return ok_reply(rid, outcome.result)
            if isinstance(request, PingRequest):
                return ok_reply(rid, {"pong": True})
            if isinstance(request, StatusRequest):
                return ok_reply(rid, await self.status())
            if isinstance(request, SubscribeRequest):
                f = request.filter
                return ok_reply(
                    rid,
                    await self.dispatcher.subscribe(
                        conn,
                        request.subscriptionId,
                        request.flowInstanceId or request.subscriptionId,
                        f.connectorIdn,
                        f.personaId,
                    ),
                )
            if isinstance(request, AckRequest):
                return ok_reply(rid, await self.dispatcher.ack(conn, request.deliveryIds))
            if isinstance(request, UnsubscribeRequest):
                return ok_reply(
                    rid, await self.dispatcher.unsubscribe(conn, request.subscriptionId)
                )
            raise AssertionError(request)  # pragma: no cover
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

    async def status(self) -> dict[str, Any]:
        now = self.clock.now()

        def read(conn: Connection) -> dict[str, Any]:
            counts = queries.timer_counts(conn)
            figures = queries.delivery_figures(conn)
            live = queries.live_daemons(conn, now - timedelta(seconds=30))
            return {"counts": counts, "figures": figures, "daemons": live}

        try:
            data: dict[str, Any] | None = await asyncio.wrap_future(self.worker.call(read))
        except StoreUnavailable:
            data = None  # still answer: this is what an operator looks at during an outage
        result: dict[str, Any] = {
            "version": __version__,
            "daemonId": self.daemon_id,
            "uptimeSeconds": round(time.monotonic() - self.started, 3),
            "database": self.kind,
            "databaseReachable": data is not None and self.worker.available,
            "timers": None,
            "fires": {
                "total": self.metrics.fires,
                "dropped": self.metrics.dropped,
                "batches": self.metrics.batches,
                "lateness": self.metrics.lateness(),
            },
            "commands": {"total": self.metrics.commands, "errors": self.metrics.command_errors},
            "events": None,
            "deliveries": {
                "pending": None,
                "oldestPendingAgeSeconds": None,
                "inflight": self.dispatcher.inflight,
            },
            "subscriptions": None,
            "connectedSubscribers": self.dispatcher.connected_subscribers,
            "connections": len(self.server.connections),
            "daemons": None,
        }
        if data is None:
            return result
        figures = data["figures"]
        oldest = figures["oldest_pending_at"]
        result["timers"] = {state: data["counts"].get(state, 0) for state in rules.STATES}
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
        return result


def serve(settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT; SIGHUP calls ``reload``."""
    asyncio.run(Daemon(settings, reload=reload).run())
