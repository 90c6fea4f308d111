"""What the delivery dispatcher holds for each subscription attached to one of its connections:
the deliveries in flight and when each is due again; and what it needs of a connection and of
the store worker."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Connection

from program_timer.core.event import event_line_start


class Peer(Protocol):
    """What the dispatcher needs of a client connection."""

    closed: bool

    def push(self, data: bytes) -> None:
        """Queue pushed lines (events), each a line of JSON."""
        ...

    @property
    def backlogged(self) -> bool:
        """The peer is not reading: nothing more is pushed to it for now."""
        ...


class Worker(Protocol):
    def call(self, fn: Callable[[Connection], Any], *, durable: bool = True) -> Future[Any]: ...


@dataclass
class Attachment:
    subscription_id: str
    flow_instance_id: str
    peer: Peer
    # delivery id -> resend deadline (monotonic): the deliveries in flight.
    inflight: dict[int, float] = field(default_factory=dict)
    # The same deliveries by resend wait (the ack timeout, doubled per send up to the cap):
    # wait -> {delivery id: deadline} in send order. Every send re-inserts its id at the end of
    # its wait's queue with a deadline of now + that wait, so deadlines never decrease along a
    # queue: the expired ones and the next deadline are found at the queues' heads, without
    # scanning the window (a handful of queues: one per doubling).
    _queues: dict[float, dict[int, float]] = field(default_factory=dict)
    _wait_of: dict[int, float] = field(default_factory=dict)
    # Some in-flight delivery passed its deadline: it is sendable again, refill even if less
    # than half the window is free.
    resend_due: bool = False
    # What every push to this subscription starts with (core.event.event_line_start).
    line_start: bytes = b""

    def __post_init__(self) -> None:
        self.line_start = event_line_start(self.subscription_id, self.flow_instance_id)

    def sent(self, delivery_id: int, deadline: float, wait: float) -> None:
        """In flight until ``deadline`` (monotonic; the send's time plus ``wait``)."""
        self.forget(delivery_id)  # a resend goes to the end: send order is kept
        self.inflight[delivery_id] = deadline
        self._wait_of[delivery_id] = wait
        self._queues.setdefault(wait, {})[delivery_id] = deadline

    def forget(self, delivery_id: int) -> None:
        """No longer in flight (acked, or sent again)."""
        if self.inflight.pop(delivery_id, None) is None:
            return
        wait = self._wait_of.pop(delivery_id)
        queue = self._queues[wait]
        del queue[delivery_id]
        if not queue:
            del self._queues[wait]

    def expire(self, mono: float) -> None:
        """Drop the deliveries whose resend wait passed (the database has them due again)."""
        for wait, queue in list(self._queues.items()):
            while queue:
                delivery_id, deadline = next(iter(queue.items()))
                if deadline > mono:
                    break
                del queue[delivery_id]
                del self.inflight[delivery_id]
                del self._wait_of[delivery_id]
                self.resend_due = True
            if not queue:
                del self._queues[wait]

    def next_deadline(self) -> float | None:
        heads = [next(iter(queue.values())) for queue in self._queues.values() if queue]
        return min(heads) if heads else None
