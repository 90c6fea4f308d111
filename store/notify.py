"""LISTEN/NOTIFY between daemons sharing one PostgreSQL database.

A daemon that changes a timer's schedule sends ``program_timer_wakeup``; one that records
deliveries sends ``program_timer_deliveries``. Every daemon listens on a dedicated connection
and wakes its scheduler or its delivery pump. Notifications are a latency optimisation: each
daemon also polls (the job store caps its sleep at the poll interval), so a lost notification
delays work by one poll interval at most and never loses it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
from sqlalchemy import Connection, text
from sqlalchemy.engine import URL

from program_timer.core.logs import get_logger

WAKEUP = "program_timer_wakeup"
DELIVERIES = "program_timer_deliveries"

log = get_logger()


def notify(conn: Connection, channel: str, sender: str) -> None:
    """Queue a notification; PostgreSQL delivers it when the transaction commits."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT pg_notify(:channel, :sender)"), {"channel": channel, "sender": sender}
        )


class Listener:
    """A thread that LISTENs and calls ``handlers[channel]()`` for other daemons' notices."""

    def __init__(self, url: URL, daemon_id: str, handlers: dict[str, Callable[[], None]]) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._daemon_id = daemon_id
        self._handlers = handlers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
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
                        for note in conn.notifies(timeout=1.0):
                            if note.payload != self._daemon_id:
                                wake = self._handlers.get(note.channel)
                                if wake is not None:
                                    wake()
            except psycopg.Error as exc:
                log.debug("listener reconnecting", action="listener_retry", reason=str(exc))
                self._stop.wait(delay)
                delay = min(10.0, delay * 2)
