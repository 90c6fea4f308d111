"""The asyncio twin of :mod:`.client`, for flow engines built on an event loop.

    from program_timer.events.aio import AsyncEventStream, AsyncTimerClient

    async with AsyncTimerClient(path) as client:
        await client.command("set_timer", "my_timer", personaId="u1", timerName="t", interval="60")

    async with AsyncEventStream(path, "flow-42", connector_idn="my_timer") as stream:
        async for delivery in stream:
            await handle(delivery.event)    # deduplicate on delivery.event["externalEventId"]
            await delivery.ack()

:class:`AsyncTimerClient` is one connection: a reader task routes replies to the request that
waits for their ``id`` (so requests may be sent concurrently from several tasks) and queues
pushed events for :meth:`AsyncTimerClient.next_event`. :class:`AsyncEventStream` behaves as
:class:`~program_timer.events.client.EventStream` does: waits for as long as asked, ``ping`` when
quiet, reconnection with backoff, :class:`ClientError` for what retrying cannot fix, and acks
queued during an outage. Standard library only.
"""

from __future__ import annotations

from program_timer.events.aio_client import AsyncTimerClient
from program_timer.events.aio_stream import AsyncDelivery, AsyncEventStream
from program_timer.events.client_common import ClientError, ConnectionLost

__all__ = [
    "AsyncDelivery",
    "AsyncEventStream",
    "AsyncTimerClient",
    "ClientError",
    "ConnectionLost",
]
