"""A small blocking client of the daemon's socket, for flow engines, the CLI and the tests.

    from program_timer.events.client import EventStream, TimerClient

    with TimerClient("/run/program-timer/program-timer.sock") as client:
        client.command("set_timer", "my_timer", personaId="u1", timerName="t", interval="60")

    for delivery in EventStream(path, "flow-42", connector_idn="my_timer"):
        handle(delivery.event)          # deduplicate on delivery.event["externalEventId"]
        delivery.ack()

:class:`TimerClient` is one connection, request and reply. :class:`EventStream` is what a flow
engine iterates over: it subscribes, waits for events for as long as it is asked to (forever by
default) while checking the connection with a ``ping`` when it is quiet, reconnects with
exponential backoff after a lost connection and subscribes again, and raises on an error that
retrying cannot fix. Deliveries that were in flight are sent again by the daemon after the
reconnection (``attempt`` + 1, same ``externalEventId``), so a consumer sees each event at least
once. Standard library only (an import-linter contract checks it); :mod:`.aio` is the asyncio
twin.
"""

from __future__ import annotations

from program_timer.events.client_common import (
    CONNECTED,
    FAILED,
    LOST,
    MAX_ACK_IDS,
    RECONNECTED,
    RETRYABLE_CODES,
    ClientError,
    ConnectionCallback,
    ConnectionLost,
    ReconnectBackoff,
    check_positive,
    default_socket,
    describe,
    error_from_reply,
    log,
)
from program_timer.events.event_stream import Delivery, EventStream
from program_timer.events.timer_client import TimerClient

__all__ = [
    "CONNECTED",
    "FAILED",
    "LOST",
    "MAX_ACK_IDS",
    "RECONNECTED",
    "RETRYABLE_CODES",
    "ClientError",
    "ConnectionCallback",
    "ConnectionLost",
    "Delivery",
    "EventStream",
    "ReconnectBackoff",
    "TimerClient",
    "check_positive",
    "default_socket",
    "describe",
    "error_from_reply",
    "log",
]
