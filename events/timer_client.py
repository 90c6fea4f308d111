"""One connection to the daemon's socket: requests and replies, pushed events queued.
Standard library only."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import time
from collections import deque
from typing import Any

from program_timer.events.client_common import (
    ClientError,
    ConnectionLost,
    default_socket,
)


class TimerClient:
    """One connection. Replies are matched by ``id``; pushed events wait for :meth:`next_event`."""

    def __init__(self, path: str | None = None, timeout: float = 30.0) -> None:
        self.path = path or default_socket()
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError:
            self._sock.close()
            raise
        self._buf = b""
        self._ids = itertools.count(1)
        self._events: deque[dict[str, Any]] = deque()
        self._replies: dict[Any, dict[str, Any]] = {}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> TimerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # raw framing ---------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        self.send_raw(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ConnectionLost(str(exc)) from exc

    def read_message(self, timeout: float | None = None) -> dict[str, Any]:
        """The next line from the daemon (a reply or a pushed event)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no message from the daemon in time")
                self._sock.settimeout(left)
            else:
                self._sock.settimeout(self.timeout)
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                raise
            except OSError as exc:
                raise ConnectionLost(str(exc)) from exc
            if not chunk:
                raise ConnectionLost("the daemon closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    # requests ------------------------------------------------------------------------------

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its ``result``; raises :class:`ClientError`."""
        rid = next(self._ids)
        self.send({"op": op, "id": rid, **fields})
        reply = self.wait_reply(rid)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise ClientError(err.get("code", "?"), err.get("message", ""), err.get("field"))
        result: dict[str, Any] = reply["result"]
        return result

    def wait_reply(self, rid: Any, timeout: float | None = None) -> dict[str, Any]:
        while rid not in self._replies:
            message = self.read_message(timeout)
            if message.get("op") == "event":
                self._events.append(message)
            else:
                self._replies[message.get("id")] = message
        return self._replies.pop(rid)

    def command(
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
        return self.request("command", **fields)

    def subscribe(
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
        return self.request("subscribe", **fields)

    def ack(self, delivery_ids: list[int]) -> int:
        return int(self.request("ack", deliveryIds=delivery_ids)["acked"])

    def unsubscribe(self, subscription_id: str) -> bool:
        return bool(self.request("unsubscribe", subscriptionId=subscription_id)["removed"])

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next pushed ``event`` message (raises TimeoutError when none comes in time)."""
        while not self._events:
            message = self.read_message(timeout)
            if message.get("op") == "event":
                return message
            self._replies[message.get("id")] = message
        return self._events.popleft()
