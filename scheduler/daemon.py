"""The daemon's composition root: start-up and shutdown read top to bottom as one exit stack.

Every component is started in order and registers its own clean-up on one
:class:`contextlib.AsyncExitStack`; a stop (or a start that fails half-way) unwinds them in
reverse: the socket stops accepting and its connections close, the fire pass in hand finishes,
the delivery dispatcher detaches its subscriptions, the daemon unregisters, the store worker
stops, the engine is disposed, the SQLite lock is released.

Threads: the asyncio loop (socket server, request handling, delivery pump), the store worker and
its readers (database work of the socket side), APScheduler's scheduler thread and its executors
(``firing`` runs :meth:`FireLoop.fire_pass`; ``default`` runs maintenance), and on PostgreSQL
the LISTEN thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Final

import uvloop
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from program_timer import __version__
from program_timer.core.clock import Clock, SystemClock
from program_timer.core.logs import get_logger
from program_timer.core.model import Limits
from program_timer.events.delivery import Dispatcher
from program_timer.scheduler import signals, systemd
from program_timer.scheduler.arguments import ArgumentLimits
from program_timer.scheduler.commands import CommandSettings, Outcome
from program_timer.scheduler.config import Settings
from program_timer.scheduler.firing import FireLoop
from program_timer.scheduler.maintenance import HEARTBEAT_SECONDS, PURGE_SECONDS, Maintenance
from program_timer.scheduler.metrics import Metrics
from program_timer.scheduler.protocol import CommandRequest
from program_timer.scheduler.requests import DaemonFacts, RequestHandler
from program_timer.scheduler.server import SocketServer
from program_timer.scheduler.worker import StoreWorker
from program_timer.store import observe, sqlite
from program_timer.store.db import health, make_engine, normalize_url, transaction, upgrade
from program_timer.store.errors import StoreError
from program_timer.store.jobstore import FIRE_JOB_ID, TimerJobStore
from program_timer.store.notify import DELIVERIES, WAKEUP, Listener, notify

log = get_logger()


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
        self.url = normalize_url(settings.database_url)
        self.kind = self.url.get_backend_name()
        self.command_settings = CommandSettings(
            limits=Limits(min_interval=settings.min_interval),
            arguments=ArgumentLimits(
                max_arguments=settings.max_arguments,
                max_argument_length=settings.max_argument_length,
                max_arguments_size=settings.max_arguments_size,
                default_timezone=settings.timezone,
            ),
            max_timers_per_persona=settings.max_timers_per_persona,
            connectors=settings.connector_allow_list,
        )

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT (SIGHUP reloads the log settings)."""
        with signals.handled(self._reload, self.settings.shutdown_grace) as stop:
            async with contextlib.AsyncExitStack() as stack:
                await self._start(stack)
                await stop.wait()
                systemd.notify("STOPPING=1")
                log.info("stopping", action="stopping")
        log.info("stopped", action="stopped")

    def _reload(self) -> None:
        """SIGHUP: read the configuration again and apply the log format and level (the
        output is reopened). Other settings need a restart; a bad file keeps the old ones."""
        from program_timer.core.logs import configure
        from program_timer.scheduler.config import ConfigError

        if self._reload_settings is None:
            return
        try:
            fresh = self._reload_settings()
        except ConfigError as exc:
            log.error("configuration not reloaded", action="reload_failed", reason=str(exc))
            return
        configure(fresh.log_format, fresh.log_level)
        log.info(
            "logging reconfigured",
            action="reloaded",
            log_format=fresh.log_format,
            log_level=fresh.log_level,
        )

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        """Every component in order; each registers its clean-up on ``stack`` as it starts."""
        await self._open_store(stack)
        _freeze_startup_objects()
        self._start_workers(stack)
        await self._start_delivery(stack)
        self._start_firing(stack)
        await self._start_socket(stack)
        self._start_observers(stack)
        systemd.notify(f"READY=1\nSTATUS=serving on {self.settings.socket}\nMAINPID={os.getpid()}")
        log.info(
            "ready",
            action="ready",
            version=__version__,
            database=self.kind,
            database_url=self.url.render_as_string(hide_password=True),
            socket=self.settings.socket,
            daemon=self.daemon_id,
        )

    async def _open_store(self, stack: contextlib.AsyncExitStack) -> None:
        """The SQLite lock, the engine, the schema, and this daemon's registration."""
        settings = self.settings
        path = sqlite.path_of(self.url)
        if path is not None:
            lock = sqlite.SQLiteLock(path)
            lock.acquire(create_folder=not settings.database_url_given)
            stack.callback(lock.release)
        self.engine = make_engine(
            settings.database_url,
            name=f"program-timer {self.daemon_id}",
            timeout=settings.database_timeout,
        )
        stack.callback(self.engine.dispose)
        observe.count_errors(self.engine, self.metrics.record_database_error)
        await asyncio.to_thread(upgrade, self.engine)
        if path is not None:
            # From now on the file must stay the one just opened (and migrated).
            sqlite.DatabaseFile(path).watch(self.engine)
        self._maintenance = Maintenance(self.engine, self.clock, self.daemon_id, settings.retention)
        await asyncio.to_thread(self._maintenance.register)
        stack.push_async_callback(asyncio.to_thread, self._maintenance.unregister)

    def _start_workers(self, stack: contextlib.AsyncExitStack) -> None:
        self.worker = StoreWorker(
            self.engine,
            self.command_settings,
            self.clock,
            max_batch=self.settings.command_batch_size,
            on_committed=self._commands_committed,
        )
        self.worker.start()
        stack.callback(self.worker.stop)

    async def _start_delivery(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        self.dispatcher = Dispatcher(
            self.worker,
            self.daemon_id,
            ack_timeout=settings.ack_timeout,
            max_inflight=settings.max_inflight,
            now=self.clock.now,
            retry_max_delay=settings.retry_max_delay,
            max_attempts=settings.max_attempts,
            retention=settings.retention,
        )
        self.dispatcher.start()
        stack.push_async_callback(self.dispatcher.stop)
        if self.kind == "postgresql":
            # Fire batches send to subscribers themselves only while no other daemon shares
            # the database (events/direct.py says why); the heartbeat keeps this up to date.
            self.dispatcher.direct.enabled = False
            self._maintenance.on_alone = self._set_alone
            await asyncio.to_thread(self._maintenance.heartbeat)

    def _start_firing(self, stack: contextlib.AsyncExitStack) -> None:
        """The fire loop under APScheduler; on PostgreSQL, the LISTEN thread."""
        settings = self.settings
        self.fire_loop = FireLoop(
            self.engine,
            self.clock,
            self.metrics,
            daemon_id=self.daemon_id,
            batch_size=settings.fire_batch_size,
            misfire_grace=settings.misfire_grace,
            fired=self.dispatcher.kick,
            direct=self.dispatcher.direct,
            ack_timeout=settings.ack_timeout,
            commands_waiting=self.worker.commands_recent,
        )
        self._start_scheduler(self._maintenance)
        stack.push_async_callback(self._stop_scheduler)
        if self.kind == "postgresql":
            # Several daemons may share the database: wake on each other's changes.
            listener = Listener(
                self.url,
                self.daemon_id,
                {WAKEUP: self.scheduler.wakeup, DELIVERIES: self.dispatcher.kick},
            )
            listener.start()
            stack.callback(listener.stop)

    async def _start_socket(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        self.server = SocketServer(
            self._handler().start_lines,
            path=settings.socket,
            mode=settings.mode,
            allowed_uids=settings.uid_allow_list,
            allowed_gids=settings.gid_allow_list,
            max_connections=settings.max_connections,
            max_pipeline=settings.max_pipeline,
            backlog=settings.backlog,
            on_disconnect=self.dispatcher.disconnected,
        )
        inherited = systemd.listen_fds()
        await self.server.start(inherited[0] if inherited else None)
        stack.push_async_callback(self.server.stop)
        # The first thing a stop does: no new fire batch starts (the one in hand finishes).
        stack.callback(self.fire_loop.stop)
        stack.callback(self.jobstore.close)

    def _start_observers(self, stack: contextlib.AsyncExitStack) -> None:
        """Prometheus' /metrics (SPEC 7.3) when asked for, and systemd's watchdog."""
        if self.settings.metrics_endpoint is not None:
            from program_timer.scheduler.prometheus import MetricsExporter, registry_for

            exporter = MetricsExporter(
                self.settings.metrics_endpoint,
                registry_for(self.requests, self.settings.metrics_refresh),
            )
            exporter.start()
            stack.callback(exporter.stop)
        interval = systemd.watchdog_interval()
        if interval:
            watchdog = asyncio.create_task(_watchdog(interval), name="watchdog")
            stack.callback(watchdog.cancel)

    def _handler(self) -> RequestHandler:
        self.requests = RequestHandler(
            DaemonFacts(self.daemon_id, self.kind, time.monotonic()),
            self.worker,
            self.dispatcher,
            self.metrics,
            self.clock,
            connections=lambda: len(self.server.connections),
            database_timeout=self.settings.database_timeout,
            health=health(self.engine),
            background={
                "firePass": self.fire_loop.backoff,
                "deliveryRefill": self.dispatcher.backoff,
                "dueLookup": self.jobstore.backoff,
                "heartbeat": self._maintenance.heartbeat_backoff,
                "purge": self._maintenance.purge_backoff,
            },
        )
        return self.requests

    def _start_scheduler(self, maintenance: Maintenance) -> None:
        self.jobstore = TimerJobStore(
            self.engine,
            self.fire_loop.fire_pass,
            poll_interval=self.settings.poll_interval,
            now=self.clock.now,
        )
        self.scheduler = _Scheduler(
            timezone="UTC",
            jobstore_retry_interval=1,
            executors={"default": ThreadPoolExecutor(1), "firing": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self.scheduler.add_jobstore(self.jobstore, alias="timers")
        self.scheduler.add_job(maintenance.purge, "interval", seconds=PURGE_SECONDS, id="purge")
        self.scheduler.add_job(
            maintenance.heartbeat, "interval", seconds=HEARTBEAT_SECONDS, id="heartbeat"
        )
        self.scheduler.add_job(self.fire_loop.report, "interval", seconds=60, id="report")
        self.scheduler.start()

    async def _stop_scheduler(self) -> None:
        """Finish the fire batch in hand; no new one starts."""
        self.fire_loop.stop()
        await asyncio.to_thread(self.scheduler.shutdown, True)

    def _set_alone(self, alone: bool) -> None:
        self.dispatcher.direct.enabled = alone

    def _commands_committed(self, done: list[tuple[CommandRequest, Outcome]]) -> None:
        """After a command group committed (worker thread): log, count, wake the firing."""
        earliest = self.requests.commands_committed(done)
        if earliest is not None:
            self._wake(earliest)

    def _wake(self, earliest: datetime) -> None:
        self.jobstore.wake_if_before(earliest)
        if self.kind == "postgresql" and earliest < self.clock.now() + timedelta(
            seconds=self.settings.poll_interval
        ):
            # Other daemons sharing the database plan at most one poll interval ahead: tell
            # them only about a timer due sooner than that.
            with contextlib.suppress(StoreError), transaction(self.engine) as conn:
                notify(conn, WAKEUP, self.daemon_id)


class _Scheduler(BackgroundScheduler):  # type: ignore[misc]
    """APScheduler's background scheduler; at a stop, the fire job's removal after its last
    run may find the scheduler already stopped (its job list empty): that is no error."""

    def remove_job(self, job_id: str, jobstore: str | None = None) -> None:
        try:
            super().remove_job(job_id, jobstore)
        except JobLookupError:
            if job_id != FIRE_JOB_ID:
                raise


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


YOUNG_COLLECTION: Final = 10_000  # see _freeze_startup_objects


def _freeze_startup_objects() -> None:
    """Collect once, then leave every object alive now (modules, the schema, SQLAlchemy's and
    pydantic's structures: some 80,000) out of all later collections (``gc.freeze``). They live
    as long as the daemon; otherwise each full collection walks them all, with the GIL held:
    50 ms in which no thread fires, answers or pushes (measured in a fire-batch loop on the
    2-core machine of 2026-12-03; the first comes soon after start-up, while the new objects of
    the imports are still counted as pending).

    Young collections then come every YOUNG_COLLECTION objects allocated and not freed rather
    than Python's 700: a command, a fire and a push each leave a few dozen behind for a
    while (the request's model, the timer, the event's rows), so at 700 a collection came
    every few dozen of them. Instructions of the daemon's process a pipelined ``set_timer``
    (``python -m bench.command_cpu --callgrind --n 6000``, two rounds): 315,455 / 313,932 at
    700, 306,232 / 303,801 at 10,000 (-3 %); a collection of 10,000 young objects takes well
    under a millisecond."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION, *gc.get_threshold()[1:])


def serve(settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT; SIGHUP calls ``reload``.

    The event loop is uvloop's (libuv): the socket side's framing, pipelining and pushes cost
    less CPU per message than on asyncio's default loop, under the one GIL the daemon has.
    Files the daemon creates (the SQLite database, its WAL, the lock file) are private to its
    user, as under systemd's ``UMask=0077``; the socket gets its own configured mode."""
    os.umask(0o077)
    uvloop.run(Daemon(settings, reload=reload).run())
