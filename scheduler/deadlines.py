"""The database deadline of every request, on one timer handle.

Each request that waits on the database is given up after ``database_timeout`` (its future
cancelled, the client told the outcome is unknown). One ``call_later`` handle per request,
created and cancelled again for each of thousands of commands a second, was a tenth of the
event loop's time per command (measured with py-spy on ``bench.run --scenarios commands``).
Every request has the same timeout, so deadlines come in the order the requests do: they wait
in one queue, and one handle is armed for the earliest that is still waiting. Requests end
mostly in order, so finished ones leave from the head as new ones come, and the queue holds
about as many as are unanswered; one still waiting at the head keeps those behind it queued
until it ends or expires, so at most the requests of one timeout.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class Deadline:
    """One request's deadline; ``expired`` once its future was cancelled for it."""

    __slots__ = ("at", "expired", "future")

    def __init__(self, future: asyncio.Future[Any], at: float) -> None:
        self.future = future
        self.at = at
        self.expired = False


class Deadlines:
    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._queue: deque[Deadline] = deque()
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, future: asyncio.Future[Any]) -> Deadline:
        """Cancel ``future`` if it is not done within the timeout from now."""
        loop = asyncio.get_running_loop()
        queue = self._queue
        while queue and queue[0].future.done():
            queue.popleft()
        deadline = Deadline(future, loop.time() + self._timeout)
        queue.append(deadline)
        if self._handle is None:
            self._handle = loop.call_at(deadline.at, self._expire, loop)
        return deadline

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        now = loop.time()
        queue = self._queue
        while queue and (queue[0].future.done() or queue[0].at <= now):
            deadline = queue.popleft()
            if not deadline.future.done():
                deadline.expired = True
                deadline.future.cancel()
        if queue:
            self._handle = loop.call_at(queue[0].at, self._expire, loop)
