"""PostgreSQL's particulars: the engine's settings, and how a pooled connection is checked
before a transaction uses it.

Every wait is bounded (connect, a pooled connection, a lock, a statement, a peer that stopped
answering), so an outage is noticed instead of hanging.

A pooled connection may have outlived its server session (a restart, ``pg_terminate_backend``,
a failover). SQLAlchemy's ``pool_pre_ping`` finds out with a ``SELECT 1`` before every
transaction: one round trip each, which was about a tenth of a one-fire batch and of a small
command group. Here the connection's socket is looked at first, without a round trip: a
server that ends a session sends its reason and closes the socket, which makes it readable
while the connection is idle (keepalives do the same for a peer that vanished, within about
11 s). Only then is it pinged, and a connection that fails the ping is replaced, with every
other pooled one older than it, before the transaction starts: the caller never sees it.
"""

from __future__ import annotations

import math
import select
from typing import Any

import sqlalchemy.exc as sa_exc
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL

from program_timer.store.queries import driver


def engine(parsed: URL, *, pool_size: int, name: str, timeout: float) -> Engine:
    """psycopg 3 with every wait bounded: ``connect_timeout`` and ``pool_timeout`` for a
    connection, ``statement_timeout`` and ``lock_timeout`` for the server's own work,
    ``tcp_user_timeout`` and keepalives for a peer that stopped answering. (A server frozen
    whole, e.g. by SIGSTOP, still has its kernel acknowledging the packets: only the deadline
    each request has in the daemon bounds that.)"""
    ms = max(1, int(timeout * 1000))
    eng = create_engine(
        parsed,
        json_serializer=driver.json_dumps,
        json_deserializer=driver.json_loads,
        pool_size=pool_size,
        max_overflow=4,
        pool_timeout=timeout,
        connect_args={
            "connect_timeout": max(2, math.ceil(timeout)),
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": ms,
            "application_name": name[:63],
            # TimeZone: timestamps come back in timezone.utc itself, which the readers keep
            # as they are (a server zone such as Etc/UTC gives ZoneInfo values, converted one
            # by one: seven columns in a timer row).
            "options": (
                "-c TimeZone=UTC -c idle_in_transaction_session_timeout=60000"
                f" -c statement_timeout={ms} -c lock_timeout={ms}"
            ),
        },
    )
    dialect = eng.dialect

    @event.listens_for(eng, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if quiet(dbapi_conn):
            return
        try:
            dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # The pool replaces this connection and every pooled one older than it, then
            # retries the checkout (connecting anew: a server still down fails that).
            raise sa_exc.InvalidatePoolError(f"pooled connection lost: {exc}") from exc

    @event.listens_for(eng, "before_cursor_execute")
    def _leave_pipeline(conn: Any, *_: Any) -> None:
        driver.suspend_pipeline(conn)

    return eng


def quiet(dbapi_conn: Any) -> bool:
    """Whether an idle psycopg connection looks alive: open, and nothing to read on its socket
    (an idle session receives nothing unless its server is ending it). When in doubt, False:
    the caller pings."""
    try:
        if dbapi_conn.closed or dbapi_conn.broken:
            return False
        fd = dbapi_conn.fileno()
    except Exception:
        return False
    poller = select.poll()  # not select.select: descriptors above 1,023 are common here
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return not poller.poll(0)
