"""What a flow engine iterates over: :class:`EventStream` subscribes, waits, pings when quiet,
reconnects with backoff, and raises what retrying cannot fix. Standard library only."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from program_timer.events.client_common import (
    CONNECTED,
    FAILED,
    LOST,
    MAX_ACK_IDS,
    RECONNECTED,
    RETRYABLE_CODES,
    ClientError,
    ConnectionCallback,
    ReconnectBackoff,
    check_positive,
    default_socket,
    describe,
    error_from_reply,
    log,
)
from program_timer.events.timer_client import TimerClient


def _unsolicited_error(client: TimerClient) -> ClientError | None:
    """The error the daemon wrote with ``id: null`` before closing the connection (``forbidden``,
    too many connections), if it did: it says why the connection ended."""
    reply = client._replies.pop(None, None)
    if reply is None:
        with contextlib.suppress(OSError, ValueError):
            for _ in range(100):  # what is left to read of a closing connection, briefly
                message = client.read_message(0.2)
                if message.get("op") != "event" and message.get("id") is None:
                    reply = message
                    break
    if reply is None or reply.get("ok"):
        return None
    return error_from_reply(reply)


@dataclass
class Delivery:
    """One pushed event; call :meth:`ack` once it is handled."""

    message: dict[str, Any]
    _stream: EventStream = field(repr=False)

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

    def ack(self) -> bool:
        """Ack this delivery: True when the daemon took the ack now, False when it is queued
        (connection lost, or ``unavailable``) and sent again right after the stream subscribes
        again. Never raises for a lost connection; see :meth:`EventStream.ack`."""
        return self._stream.ack(self.delivery_id)


class EventStream:
    """Subscribe, then iterate over the subscription's deliveries, reconnecting as needed.

    Waiting: iteration waits for the next event for as long as it takes (``idle_timeout=None``,
    the default); with ``idle_timeout`` set, it stops (the ``for`` loop ends) once that many
    seconds passed without an event, whether connected or reconnecting. While no line arrives for
    ``keepalive`` seconds, the stream sends a ``ping``; no reply within ``ping_timeout`` seconds
    (a hung daemon, a dead peer) counts as a lost connection. ``timeout`` bounds each request
    (``subscribe``, ``ack``, ``ping`` aside) and the connection itself.

    Reconnecting: after a lost connection, a failed connection, or ``unavailable`` /
    ``internal`` from ``subscribe``, the stream waits ``initial_backoff`` seconds doubling up to
    ``max_backoff`` (times a random 0.5 to 1.5, capped), then connects and subscribes again. The
    delay starts over after a connection that stayed up at least ``max_backoff`` seconds, so a
    connection that keeps dropping at once is retried ever more slowly. Each outage is logged
    once at warning on ``program_timer.client`` and its end at info, and reported to
    ``on_connection_change(state, error)`` (:data:`CONNECTED`, :data:`LOST`,
    :data:`RECONNECTED`, :data:`FAILED`); ``reconnects`` counts the successful reconnections.
    With ``wait_for_daemon=False``, failing to connect to the socket before the first
    subscription raises that :class:`OSError` instead of retrying (the CLI uses it).

    Errors: any other error code from ``subscribe`` (see :data:`RETRYABLE_CODES`) raises
    :class:`ClientError` out of the iteration, as does ``forbidden`` sent by the daemon on
    connecting.

    Acks: see :meth:`ack`. Use the stream (iterate and ack) from one thread; :meth:`close` may be
    called from another.
    """

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
        on_connection_change: ConnectionCallback | None = None,
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
        self.client: TimerClient | None = None
        self.reconnects = 0
        self._backoff = ReconnectBackoff(initial_backoff, max_backoff)
        self._pending_acks: set[int] = set()
        self._state = ""  # "", "up" or "down"
        self._ever_connected = False
        self._connected_at = 0.0
        self._last_heard = 0.0
        self._closed = False
        self._wake = threading.Event()

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

    def __iter__(self) -> Iterator[Delivery]:
        while True:
            deadline = None if self.idle_timeout is None else time.monotonic() + self.idle_timeout
            message = self._next_message(deadline)
            if message is None:
                return
            yield Delivery(message, self)

    def ack(self, delivery_id: int) -> bool:
        """Ack one delivery; True if the daemon took it now.

        A lost connection (or a daemon that does not answer in ``timeout``) or ``unavailable`` /
        ``internal`` does not raise: the id is kept in :attr:`pending_acks` and sent again right
        after the next successful subscription (and with the next ack that gets through), and
        False is returned. Meanwhile the daemon may send the event again (``attempt`` + 1, same
        ``externalEventId``): consumers deduplicate on it, and may ack the repeat too. Queued
        acks are dropped by :meth:`close`; the daemon then resends those events to the next
        subscriber. Any other error code (a bug: the id is sent as given) raises
        :class:`ClientError`.
        """
        if isinstance(delivery_id, bool) or not isinstance(delivery_id, int):
            raise TypeError(f"a delivery id is an int, got {delivery_id!r}")
        self._pending_acks.add(delivery_id)
        client = self.client
        if client is None or self._closed:
            return False
        try:
            return self._send_acks(client)
        except (OSError, ValueError) as exc:
            self._lost(exc)
            return False

    def unsubscribe(self, timeout: float = 5.0) -> bool:
        """Delete the subscription (and its pending deliveries), on a connection of its own;
        raises :class:`ClientError` or :class:`OSError` when that fails."""
        with TimerClient(self.path, timeout=timeout) as client:
            return client.unsubscribe(self.subscription_id)

    def close(self) -> None:
        """Disconnect and end the iteration (queued acks are dropped)."""
        self._closed = True
        self._wake.set()
        client = self.client
        if client is not None:  # wakes an iteration blocked on it in another thread
            with contextlib.suppress(OSError):
                client._sock.shutdown(socket.SHUT_RDWR)
        self._drop()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # waiting -------------------------------------------------------------------------------

    def _next_message(self, deadline: float | None) -> dict[str, Any] | None:
        """The next pushed event, or None when ``deadline`` passed or the stream was closed."""
        while not self._closed:
            client = self.client or self._connect(deadline)
            if client is None:
                return None
            now = time.monotonic()
            wait = max(0.0, self._last_heard + self.keepalive - now)
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - now))
            try:
                message = client.next_event(wait)  # what is already read comes first
            except TimeoutError:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return None
                if now - self._last_heard >= self.keepalive:
                    self._ping(client)
                continue
            except (OSError, ValueError) as exc:
                self._lost(exc)
                continue
            self._last_heard = time.monotonic()
            return message
        return None

    def _ping(self, client: TimerClient) -> None:
        """Nothing came for ``keepalive`` seconds: is the daemon still there?"""
        rid = f"keepalive-{next(client._ids)}"
        try:
            client.send({"op": "ping", "id": rid})
            client.wait_reply(rid, self.ping_timeout)
        except TimeoutError:
            self._lost(TimeoutError(f"no reply to a ping within {self.ping_timeout:g} s"))
            return
        except (OSError, ValueError) as exc:
            self._lost(exc)
            return
        self._last_heard = time.monotonic()

    # connecting ----------------------------------------------------------------------------

    def _connect(self, deadline: float | None) -> TimerClient | None:
        """Connect and subscribe, retrying with backoff; None when ``deadline`` passed or the
        stream was closed. Raises the errors retrying cannot fix."""
        while not self._closed:
            if self._state == "down":
                delay = self._backoff.next()
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    delay = min(delay, left)
                if self._wake.wait(delay):
                    return None  # closed
            try:
                client = TimerClient(self.path, timeout=self.timeout)
            except OSError as exc:
                if not self.wait_for_daemon and not self._ever_connected:
                    raise
                self._down(exc)
                continue
            try:
                self._subscribe(client)
            except ClientError as exc:
                client.close()
                if exc.code not in RETRYABLE_CODES:
                    self._fail(exc)
                    raise
                self._down(exc)
                continue
            except (OSError, ValueError) as exc:
                error = _unsolicited_error(client)
                client.close()
                if error is not None and error.code not in RETRYABLE_CODES:
                    self._fail(error)
                    raise error from exc
                self._down(error or exc)
                continue
            if self._closed:
                client.close()
                return None
            self.client = client
            self._up()
            return client
        return None

    def _subscribe(self, client: TimerClient) -> None:
        client.subscribe(
            self.subscription_id,
            flow_instance_id=self.flow_instance_id,
            connector_idn=self.connector_idn,
            persona_id=self.persona_id,
        )
        if self._pending_acks:
            try:
                self._send_acks(client)
            except ClientError as exc:  # not retryable: never sent again
                log.warning("the daemon refused queued acks (%s); dropped", exc)
                self._pending_acks.clear()

    def _send_acks(self, client: TimerClient) -> bool:
        """Send the queued acks; True once all were taken, False on a retryable error code.
        Raises OSError (connection) and the other :class:`ClientError` codes."""
        ids = sorted(self._pending_acks)
        for i in range(0, len(ids), MAX_ACK_IDS):
            chunk = ids[i : i + MAX_ACK_IDS]
            try:
                client.ack(chunk)
            except ClientError as exc:
                if exc.code in RETRYABLE_CODES:
                    return False
                self._pending_acks.difference_update(chunk)
                raise
            self._pending_acks.difference_update(chunk)
        self._last_heard = time.monotonic()
        return True

    # state ---------------------------------------------------------------------------------

    def _drop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()

    def _lost(self, exc: Exception) -> None:
        """The connection in use failed: drop it; the iteration reconnects."""
        self._drop()
        if self._closed:
            return
        if time.monotonic() - self._connected_at >= self.max_backoff:
            self._backoff.reset()  # it had been working: come back quickly
        self._down(exc)

    def _down(self, exc: Exception) -> None:
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
        self._notify(LOST, exc)

    def _up(self) -> None:
        was_down = self._state == "down"
        self._state = "up"
        self._connected_at = self._last_heard = time.monotonic()
        if not self._ever_connected:
            self._ever_connected = True
            if was_down:
                log.info("connected to the daemon at %s", self.path)
            self._notify(CONNECTED, None)
            return
        self.reconnects += 1
        log.info(
            "reconnected to the daemon at %s (subscription %s)", self.path, self.subscription_id
        )
        self._notify(RECONNECTED, None)

    def _fail(self, exc: ClientError) -> None:
        self._state = ""
        log.error("the daemon refused the subscription %s: %s", self.subscription_id, exc)
        self._notify(FAILED, exc)

    def _notify(self, state: str, error: Exception | None) -> None:
        if self.on_connection_change is not None:
            self.on_connection_change(state, error)
