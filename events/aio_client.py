"""One asyncio connection to the daemon's socket: concurrent requests matched by id, pushed
events queued. Standard library only."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Callable
from typing import Any, Final

from program_timer.events.client_common import (
    ClientError,
    ConnectionLost,
    default_socket,
    describe,
    error_from_reply,
)

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
