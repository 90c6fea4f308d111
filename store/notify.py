"""LISTEN/NOTIFY between daemons sharing one PostgreSQL database.

A daemon that changes a timer's schedule sends ``program_timer_wakeup``; one that records
deliveries sends ``program_timer_deliveries``. Every daemon listens on a dedicated connection
and wakes its scheduler or its delivery pump. Notifications are a latency optimisation: each
daemon also polls (the job store caps its sleep at the poll interval), so a lost notification
delays work by one poll interval at most and never loses it.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable

from sqlalchemy import Connection
from sqlalchemy.engine import URL

from program_timer.core.logs import get_logger
from program_timer.store.queries import driver

WAKEUP = "program_timer_wakeup"
DELIVERIES = "program_timer_deliveries"

log = get_logger()


def notify(conn: Connection, channel: str, sender: str) -> None:
    """Queue a notification; PostgreSQL delivers it when the transaction commits."""
    if conn.dialect.name == "postgresql":
        driver.execute(conn, "SELECT pg_notify(?, ?)", (channel, sender))


class Listener:
    """A thread that LISTENs and calls ``handlers[channel]()`` for other daemons' notices."""

    def __init__(self, url: URL, daemon_id: str, handlers: dict[str, Callable[[], None]]) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._daemon_id = daemon_id
        self._handlers = handlers
        self._stop = threading.Event()
        # stop() writes a byte here: the thread waits on the connection's socket and this pipe
        # together, so it ends at once instead of at its next wait timeout.
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="pg-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self) -> None:
        import psycopg  # here: a daemon on SQLite never listens, nor loads the driver

        delay = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=3,
                    application_name=f"program-timer {self._daemon_id} listener"[:63],
                ) as conn:
                    for channel in self._handlers:
                        conn.execute(f"LISTEN {channel}")
                    delay = 0.5
                    # Whatever happened while we were not listening: look once.
                    for handler in self._handlers.values():
                        handler()
                    while not self._stop.is_set():
                        ready, _, _ = select.select([conn.fileno(), self._wake_r], [], [], 60.0)
                        if self._wake_r in ready:
                            break
                        # Whatever has arrived (timeout 0: read what is there, never wait).
                        for note in conn.notifies(timeout=0):
                            if note.payload != self._daemon_id:
                                wake = self._handlers.get(note.channel)
                                if wake is not None:
                                    wake()
            except psycopg.Error as exc:
                log.debug("listener reconnecting", action="listener_retry", reason=str(exc))
                select.select([self._wake_r], [], [], delay)
                delay = min(10.0, delay * 2)
