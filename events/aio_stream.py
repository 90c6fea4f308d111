"""The asyncio event stream: what an asyncio flow engine iterates over. Standard library only."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from program_timer.events.aio_client import AsyncTimerClient
from program_timer.events.client_common import (
    CONNECTED,
    FAILED,
    LOST,
    MAX_ACK_IDS,
    RECONNECTED,
    RETRYABLE_CODES,
    ClientError,
    ReconnectBackoff,
    check_positive,
    default_socket,
    describe,
    log,
)

STREAM_LIMIT: Final = 16 * 1024 * 1024
"""Longest line read from the daemon (its lines are at most a few MiB)."""

AsyncConnectionCallback = Callable[[str, Exception | None], object]
"""``on_connection_change(state, error)``: a function, or a coroutine function (awaited)."""


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
