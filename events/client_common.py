"""What the clients (:mod:`.client`, :mod:`.aio`) share: errors, the socket's default path,
the reconnection backoff, connection states. Standard library only."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("program_timer.client")
log.addHandler(logging.NullHandler())  # a library: the application decides where lines go

RETRYABLE_CODES: Final = frozenset({"unavailable", "internal"})
"""Error codes that retrying can fix (the database is down, a transient fault). Any other code
a subscription gets (``invalid_request``, ``invalid_json``, ``unknown_op``, ``forbidden``,
``too_large``, ``invalid_argument``, …) is the caller's to fix: the stream raises it."""

MAX_ACK_IDS: Final = 10_000
"""Delivery ids one ``ack`` request may carry."""

CONNECTED: Final = "connected"
"""``on_connection_change`` state: the stream subscribed for the first time."""
LOST: Final = "lost"
"""``on_connection_change`` state: no working connection (lost, or the daemon cannot be reached
or answers ``unavailable``); the stream retries with backoff. Reported once per outage, with
the error that started it."""
RECONNECTED: Final = "reconnected"
"""``on_connection_change`` state: subscribed again after ``lost``."""
FAILED: Final = "failed"
"""``on_connection_change`` state: an error retrying cannot fix; the iteration raises it."""

ConnectionCallback = Callable[[str, Exception | None], object]


class ClientError(Exception):
    """The daemon answered with an error: ``code``, ``message``, ``field``."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field


class ConnectionLost(ConnectionError):
    """The socket closed (daemon stopped or restarted)."""


def default_socket() -> str:
    path = os.environ.get("PROGRAM_TIMER_SOCKET")
    if path:
        return path
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime or ".", "program-timer.sock")


class ReconnectBackoff:
    """Delays between reconnection attempts: ``first`` doubling up to ``cap``, each multiplied by
    a random factor between 0.5 and 1.5 (jitter, so that many clients do not come back in step)
    and never more than ``cap``."""

    def __init__(self, first: float, cap: float) -> None:
        self.cap = max(0.0, cap)
        self.first = min(max(0.0, first), self.cap)
        self._base = 0.0

    def next(self) -> float:
        self._base = self.first if self._base == 0.0 else min(self.cap, self._base * 2)
        return min(self.cap, self._base * (0.5 + random.random()))

    def reset(self) -> None:
        self._base = 0.0


def describe(exc: BaseException) -> str:
    """A short human reason: ``No such file or directory``, ``unavailable: …``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def error_from_reply(reply: dict[str, Any]) -> ClientError:
    err = reply.get("error") or {}
    return ClientError(err.get("code", "?"), err.get("message", ""), err.get("field"))
