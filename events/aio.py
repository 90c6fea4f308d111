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

import asyncio
import contextlib
import inspect
import itertools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from program_timer.events.client import (
    CONNECTED,
    FAILED,
    LOST,
    MAX_ACK_IDS,
    RECONNECTED,
    RETRYABLE_CODES,
    ClientError,
    ConnectionLost,
    ReconnectBackoff,
    check_positive,
    default_socket,
    describe,
    error_from_reply,
    log,
)

__all__ = [
    "AsyncDelivery",
    "AsyncEventStream",
    "AsyncTimerClient",
    "ClientError",
    "ConnectionLost",
]

STREAM_LIMIT: Final = 16 * 1024 * 1024
"""Longest line read from the daemon (its lines are at most a few MiB)."""

AsyncConnectionCallback = Callable[[str, Exception | None], object]
"""``on_connection_change(state, error)``: a function, or a coroutine function (awaited)."""


class AsyncTimerClient:
    """One connection; ``await client.connect()`` or ``async with AsyncTimerClient(path)``.

    ``timeout`` bounds connecting and each request's reply (:class:`TimeoutError`). Once the
    connection ends, requests and :meth:`next_event` (after the events already received) raise
    :class:`ConnectionLost`, or the :class:`ClientError` the daemon sent before closing it
    (``forbidden``, too many connections).
    """

    def __init__(self, path: str | None = None, timeout: float = 30.0) -> None:
        self.path = path or default_socket()
        self.timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._error: Exception | None = None  # why the connection ended
        self._unsolicited: ClientError | None = None

    async def connect(self) -> AsyncTimerClient:
        if self._writer is None:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path, limit=STREAM_LIMIT), self.timeout
            )
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_loop(reader))
        return self

    @property
    def closed(self) -> bool:
        return self._error is not None

    def close(self) -> None:
        """Close now (what is still running finishes with :class:`ConnectionLost`)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
        else:
            self._finish(ConnectionLost("the client was closed"))

    async def aclose(self) -> None:
        self.close()
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.wait_closed(), 1.0)

    async def __aenter__(self) -> AsyncTimerClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # reading -------------------------------------------------------------------------------

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        error: Exception = ConnectionLost("the daemon closed the connection")
        try:
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    break  # EOF (a partial last line is dropped)
                message: dict[str, Any] = json.loads(line)
                if message.get("op") == "event":
                    self._events.put_nowait(message)
                    continue
                rid = message.get("id")
                future = self._waiting.pop(rid, None)
                if future is not None:
                    if not future.done():
                        future.set_result(message)
                elif rid is None and not message.get("ok"):
                    self._unsolicited = error_from_reply(message)  # the daemon closes next
        except asyncio.CancelledError:
            error = ConnectionLost("the client was closed")
            raise
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or a line over the limit
            error = ConnectionLost(f"the connection failed: {describe(exc)}")
        finally:
            self._finish(self._unsolicited or error)

    def _finish(self, error: Exception) -> None:
        if self._error is not None:
            return
        self._error = error
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(self._closed_error())
        self._waiting.clear()
        self._events.put_nowait(None)  # after the events already received
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()

    def _closed_error(self) -> Exception:
        """A fresh exception saying why the connection ended."""
        error = self._error
        if isinstance(error, ClientError):
            return ClientError(error.code, error.message, error.field)
        if error is None and self._writer is None:
            return ConnectionLost("not connected: call connect() first")
        return ConnectionLost(str(error))

    # requests ------------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def send_raw(self, data: bytes) -> None:
        if self._error is not None or self._writer is None:
            raise self._closed_error()
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as exc:
            raise ConnectionLost(describe(exc)) from exc

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` with a fresh ``id`` and return the raw reply (``ok`` true or false)."""
        if self._error is not None or self._writer is None:
            raise self._closed_error()
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            await self.send({**message, "id": rid})
            return await asyncio.wait_for(future, self.timeout)
        finally:
            self._waiting.pop(rid, None)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its ``result``; raises :class:`ClientError`."""
        reply = await self.call({"op": op, **fields})
        if not reply.get("ok"):
            raise error_from_reply(reply)
        result: dict[str, Any] = reply["result"]
        return result

    async def command(
        self,
        command_idn: str,
        connector_idn: str,
        *,
        integration_idn: str = "program_timer",
        command_act_id: str | None = None,
        **arguments: Any,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "commandIdn": command_idn,
            "integrationIdn": integration_idn,
            "connectorIdn": connector_idn,
            "arguments": arguments,
        }
        if command_act_id:
            fields["commandActId"] = command_act_id
        return await self.request("command", **fields)

    async def subscribe(
        self,
        subscription_id: str,
        *,
        flow_instance_id: str | None = None,
        connector_idn: str | None = None,
        persona_id: str | None = None,
    ) -> dict[str, Any]:
        flt = {k: v for k, v in (("connectorIdn", connector_idn), ("personaId", persona_id)) if v}
        fields: dict[str, Any] = {"subscriptionId": subscription_id, "filter": flt}
        if flow_instance_id:
            fields["flowInstanceId"] = flow_instance_id
        return await self.request("subscribe", **fields)

    async def ack(self, delivery_ids: list[int]) -> int:
        return int((await self.request("ack", deliveryIds=delivery_ids))["acked"])

    async def unsubscribe(self, subscription_id: str) -> bool:
        return bool((await self.request("unsubscribe", subscriptionId=subscription_id))["removed"])

    async def status(self) -> dict[str, Any]:
        return await self.request("status")

    async def ping(self) -> dict[str, Any]:
        return await self.request("ping")

    async def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next pushed ``event`` message (:class:`TimeoutError` when none comes in time)."""
        if self._events.empty():
            if self._writer is None:
                raise self._closed_error()
            if timeout is None:
                message = await self._events.get()
            elif timeout <= 0:
                raise TimeoutError("no event in time")
            else:
                message = await asyncio.wait_for(self._events.get(), timeout)
        else:
            message = self._events.get_nowait()
        if message is None:
            self._events.put_nowait(None)  # for the next caller too
            raise self._closed_error()
        return message


@dataclass
class AsyncDelivery:
    """One pushed event; ``await delivery.ack()`` once it is handled."""

    message: dict[str, Any]
    _stream: AsyncEventStream = field(repr=False)

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = self.message["event"]
        return event

    @property
    def delivery_id(self) -> int:
        return int(self.message["deliveryId"])

    @property
    def attempt(self) -> int:
        return int(self.message["attempt"])

    @property
    def external_event_id(self) -> str:
        """The id to deduplicate on: the same for every delivery of one fire."""
        return str(self.event["externalEventId"])

    async def ack(self) -> bool:
        """True when the daemon took the ack now, False when it is queued (see
        :meth:`AsyncEventStream.ack`); never raises for a lost connection."""
        return await self._stream.ack(self.delivery_id)


class AsyncEventStream:
    """``async for delivery in stream``: the asyncio :class:`EventStream` (same arguments, same
    waiting, keep-alive, reconnection, error and ack rules; see its documentation).
    ``on_connection_change`` may be a coroutine function. Close with :meth:`aclose` or
    ``async with``."""

    def __init__(
        self,
        path: str | None,
        subscription_id: str | None = None,
        *,
        flow_instance_id: str | None = None,
        connector_idn: str | None = None,
        persona_id: str | None = None,
        max_backoff: float = 10.0,
        idle_timeout: float | None = None,
        keepalive: float = 15.0,
        ping_timeout: float = 5.0,
        timeout: float = 30.0,
        initial_backoff: float = 0.1,
        wait_for_daemon: bool = True,
        on_connection_change: AsyncConnectionCallback | None = None,
    ) -> None:
        check_positive(keepalive=keepalive, ping_timeout=ping_timeout, timeout=timeout)
        self.path = path or default_socket()
        self.subscription_id = subscription_id or f"cli-{uuid.uuid4()}"
        self.flow_instance_id = flow_instance_id
        self.connector_idn = connector_idn
        self.persona_id = persona_id
        self.max_backoff = max_backoff
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self.ping_timeout = ping_timeout
        self.timeout = timeout
        self.wait_for_daemon = wait_for_daemon
        self.on_connection_change = on_connection_change
        self.client: AsyncTimerClient | None = None
        self.reconnects = 0
        self._backoff = ReconnectBackoff(initial_backoff, max_backoff)
        self._pending_acks: set[int] = set()
        self._state = ""  # "", "up" or "down"
        self._ever_connected = False
        self._connected_at = 0.0
        self._last_heard = 0.0
        self._closed = False
        self._wake = asyncio.Event()

    # public --------------------------------------------------------------------------------

    @property
    def pending_acks(self) -> frozenset[int]:
        """Delivery ids acked during an outage, to be sent after the next subscription."""
        return frozenset(self._pending_acks)

    @property
    def connected(self) -> bool:
        return self.client is not None

    @property
    def has_subscribed(self) -> bool:
        """Whether a subscribe succeeded once (the subscription exists unless removed since)."""
        return self._ever_connected

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> AsyncDelivery:
        deadline = None if self.idle_timeout is None else time.monotonic() + self.idle_timeout
        message = await self._next_message(deadline)
        if message is None:
            raise StopAsyncIteration
        return AsyncDelivery(message, self)

    async def ack(self, delivery_id: int) -> bool:
        """Ack one delivery; True if the daemon took it now, False if it is queued: as
        :meth:`EventStream.ack <program_timer.events.client.EventStream.ack>`."""
        if isinstance(delivery_id, bool) or not isinstance(delivery_id, int):
            raise TypeError(f"a delivery id is an int, got {delivery_id!r}")
        self._pending_acks.add(delivery_id)
        client = self.client
        if client is None or self._closed:
            return False
        try:
            return await self._send_acks(client)
        except (OSError, ValueError) as exc:
            await self._lost(client, exc)
            return False

    async def unsubscribe(self, timeout: float = 5.0) -> bool:
        """Delete the subscription (and its pending deliveries), on a connection of its own."""
        async with AsyncTimerClient(self.path, timeout=timeout) as client:
            return await client.unsubscribe(self.subscription_id)

    async def aclose(self) -> None:
        """Disconnect and end the iteration (queued acks are dropped)."""
        self._closed = True
        self._wake.set()
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # waiting -------------------------------------------------------------------------------

    async def _next_message(self, deadline: float | None) -> dict[str, Any] | None:
        while not self._closed:
            client = self.client or await self._connect(deadline)
            if client is None:
                return None
            now = time.monotonic()
            wait = max(0.0, self._last_heard + self.keepalive - now)
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - now))
            try:
                message = await client.next_event(wait)
            except TimeoutError:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return None
                if now - self._last_heard >= self.keepalive:
                    await self._ping(client)
                continue
            except (OSError, ValueError) as exc:
                await self._lost(client, exc)
                continue
            self._last_heard = time.monotonic()
            return message
        return None

    async def _ping(self, client: AsyncTimerClient) -> None:
        try:
            await asyncio.wait_for(client.ping(), self.ping_timeout)
        except TimeoutError:
            error = TimeoutError(f"no reply to a ping within {self.ping_timeout:g} s")
            await self._lost(client, error)
            return
        except (OSError, ValueError, ClientError) as exc:
            await self._lost(client, exc)
            return
        self._last_heard = time.monotonic()

    # connecting ----------------------------------------------------------------------------

    async def _connect(self, deadline: float | None) -> AsyncTimerClient | None:
        while not self._closed:
            if self._state == "down":
                delay = self._backoff.next()
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    delay = min(delay, left)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                if self._closed:
                    return None
            client = AsyncTimerClient(self.path, timeout=self.timeout)
            try:
                await client.connect()
            except OSError as exc:  # TimeoutError included
                if not self.wait_for_daemon and not self._ever_connected:
                    raise
                await self._down(exc)
                continue
            try:
                await self._subscribe(client)
            except ClientError as exc:
                await client.aclose()
                if exc.code not in RETRYABLE_CODES:
                    await self._fail(exc)
                    raise
                await self._down(exc)
                continue
            except (OSError, ValueError) as exc:
                await client.aclose()
                await self._down(exc)
                continue
            if self._closed:
                await client.aclose()
                return None
            self.client = client
            await self._up()
            return client
        return None

    async def _subscribe(self, client: AsyncTimerClient) -> None:
        await client.subscribe(
            self.subscription_id,
            flow_instance_id=self.flow_instance_id,
            connector_idn=self.connector_idn,
            persona_id=self.persona_id,
        )
        if self._pending_acks:
            try:
                await self._send_acks(client)
            except ClientError as exc:  # not retryable: never sent again
                log.warning("the daemon refused queued acks (%s); dropped", exc)
                self._pending_acks.clear()

    async def _send_acks(self, client: AsyncTimerClient) -> bool:
        ids = sorted(self._pending_acks)
        for i in range(0, len(ids), MAX_ACK_IDS):
            chunk = ids[i : i + MAX_ACK_IDS]
            try:
                await client.ack(chunk)
            except ClientError as exc:
                if exc.code in RETRYABLE_CODES:
                    return False
                self._pending_acks.difference_update(chunk)
                raise
            self._pending_acks.difference_update(chunk)
        self._last_heard = time.monotonic()
        return True

    # state ---------------------------------------------------------------------------------

    async def _lost(self, client: AsyncTimerClient, exc: Exception) -> None:
        if self.client is client:
            self.client = None
        await client.aclose()
        if self._closed or self._state != "up":
            return  # already known (another task saw it first)
        if time.monotonic() - self._connected_at >= self.max_backoff:
            self._backoff.reset()
        await self._down(exc)

    async def _down(self, exc: Exception) -> None:
        if self._state == "down":
            log.debug("reconnection to %s failed: %s", self.path, describe(exc))
            return
        self._state = "down"
        if self._ever_connected:
            log.warning(
                "lost the connection to the daemon at %s (%s); reconnecting",
                self.path,
                describe(exc),
            )
        else:
            log.warning("cannot reach the daemon at %s (%s); retrying", self.path, describe(exc))
        await self._notify(LOST, exc)

    async def _up(self) -> None:
        was_down = self._state == "down"
        self._state = "up"
        self._connected_at = self._last_heard = time.monotonic()
        if not self._ever_connected:
            self._ever_connected = True
            if was_down:
                log.info("connected to the daemon at %s", self.path)
            await self._notify(CONNECTED, None)
            return
        self.reconnects += 1
        log.info(
            "reconnected to the daemon at %s (subscription %s)", self.path, self.subscription_id
        )
        await self._notify(RECONNECTED, None)

    async def _fail(self, exc: ClientError) -> None:
        self._state = ""
        log.error("the daemon refused the subscription %s: %s", self.subscription_id, exc)
        await self._notify(FAILED, exc)

    async def _notify(self, state: str, error: Exception | None) -> None:
        if self.on_connection_change is not None:
            result = self.on_connection_change(state, error)
            if inspect.isawaitable(result):
                await result
