"""Maintenance: the purge of what outlived its retention, and the daemon's heartbeat.

Both run as APScheduler interval jobs (purge each minute, heartbeat every 5 s). A failure is
retried at the job's next run; it is logged once when it starts and once when it ends
(:class:`~program_timer.core.backoff.Backoff`), an unreachable database once for the whole daemon.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine

from program_timer import __version__
from program_timer.core.backoff import Backoff
from program_timer.core.clock import Clock
from program_timer.core.logs import get_logger
from program_timer.store import queries
from program_timer.store.db import transaction
from program_timer.store.errors import StoreError, StoreUnavailable

log = get_logger()

HEARTBEAT_SECONDS = 5
PURGE_SECONDS = 60
SILENT_DAEMON = timedelta(seconds=60)  # a daemon silent this long is forgotten
COMMAND_ACTS_KEPT = timedelta(hours=24)
FULL_PURGE_RUNS = 60  # the purge looks at every expired event once an hour (and at start)


class Maintenance:
    def __init__(self, engine: Engine, clock: Clock, daemon_id: str, retention: float) -> None:
        self._engine = engine
        self._clock = clock
        self._daemon_id = daemon_id
        self._retention = retention
        self.purge_backoff = Backoff("purge")
        self._purges = 0
        self._purged_upto: datetime | None = None  # expired events before it were purged
        self.heartbeat_backoff = Backoff("heartbeat")
        # Told at each heartbeat whether this daemon is the only live one on the database.
        self.on_alone: Callable[[bool], None] | None = None

    def register(self) -> None:
        """Announce this daemon (start-up); its subscriptions left from a crash are freed."""
        now = self._clock.now()
        with transaction(self._engine) as conn:
            queries.register_daemon(
                conn,
                {
                    "daemon_id": self._daemon_id,
                    "hostname": socket.gethostname(),
                    "pid": os.getpid(),
                    "version": __version__,
                    "started_at": now,
                    "heartbeat_at": now,
                },
            )
            queries.detach_daemon(conn, self._daemon_id)

    def unregister(self) -> None:
        """Leave (clean stop): subscriptions are freed at once, the daemon is forgotten."""
        try:
            with transaction(self._engine) as conn:
                queries.detach_daemon(conn, self._daemon_id)
                queries.forget_daemon(conn, self._daemon_id)
        except StoreError as exc:  # the others forget this daemon after SILENT_DAEMON
            log.warning(
                "could not unregister the daemon", action="unregister_failed", reason=str(exc)
            )

    def purge(self) -> None:
        """Delete what outlived its retention; pending deliveries of expired events become
        dead letters first (kept one more retention, then deleted with their events).

        Each run looks only at the events expired since the previous run; every
        :data:`FULL_PURGE_RUNS` runs (and the first) it looks at all of them, which catches up
        on whatever a redelivery brought back."""
        now = self._clock.now()
        retention = timedelta(seconds=self._retention)
        expired_before = now - retention
        since = None if self._purges % FULL_PURGE_RUNS == 0 else self._purged_upto
        try:
            with transaction(self._engine) as conn:
                timers = queries.purge_fired_timers(conn, expired_before)
                acts = queries.purge_command_acts(conn, now - COMMAND_ACTS_KEPT)
                dead = queries.expire_pending(conn, expired_before, now, expired_after=since)
                deliveries, expired = queries.purge_deliveries_and_events(
                    conn,
                    now - timedelta(seconds=min(3600, self._retention)),
                    expired_before,
                    expired_after=since,
                )
        except StoreError as exc:
            _failed(self.purge_backoff, exc)
            return
        self.purge_backoff.succeeded()
        self._purges += 1
        self._purged_upto = expired_before if since is None else max(since, expired_before)
        if dead:
            log.warning(
                "pending deliveries reached the retention: dead letters now",
                action="deliveries_expired",
                deliveries=dead,
            )
        if timers or acts or deliveries or expired:
            log.info(
                "purged",
                action="purged",
                fired_timers=timers,
                command_acts=acts,
                deliveries=deliveries,
                expired_events=expired,
            )

    def heartbeat(self) -> None:
        """Mark this daemon alive; forget daemons silent for a minute (their subscriptions
        become free to re-attach anywhere)."""
        now = self._clock.now()
        try:
            with transaction(self._engine) as conn:
                queries.heartbeat(conn, self._daemon_id, now)
                dead = queries.purge_dead_daemons(conn, now - SILENT_DAEMON)
                live = queries.live_daemons(conn, now - timedelta(seconds=30))
        except StoreError as exc:
            _failed(self.heartbeat_backoff, exc)
            return
        self.heartbeat_backoff.succeeded()
        if self.on_alone is not None:
            self.on_alone(len(live) <= 1)
        if dead:
            log.warning(
                "daemons gone silent were forgotten", action="daemons_forgotten", daemons=dead
            )


def _failed(backoff: Backoff, exc: StoreError) -> None:
    backoff.failed(str(exc), unavailable=isinstance(exc, StoreUnavailable))
