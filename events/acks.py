"""Acks, written in groups: the acks that arrive while earlier ones are being written are
written together, in one worker call (one statement per acking connection), committed without
waiting for the disk (an ack lost in a database crash only means the delivery is sent again)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from program_timer.store import queries

Db = Callable[..., Awaitable[Any]]


@dataclass(slots=True)
class _PendingAck:
    subscription_ids: tuple[str, ...]  # those of the acking connection
    delivery_ids: list[int]
    future: asyncio.Future[int]  # how many of them this ack acked


class AckWriter:
    def __init__(self, db: Db, now: Callable[[], datetime]) -> None:
        self._db = db
        self._now = now
        self._acks: list[_PendingAck] = []
        self._ack_writer: asyncio.Task[None] | None = None

    async def submit(self, subscription_ids: tuple[str, ...], delivery_ids: list[int]) -> int:
        """Ack these deliveries of these subscriptions (the acking connection's); how many
        were acked now (not before, by an earlier ack naming them too)."""
        pending = _PendingAck(
            subscription_ids, delivery_ids, asyncio.get_running_loop().create_future()
        )
        self._acks.append(pending)
        if self._ack_writer is None or self._ack_writer.done():
            self._ack_writer = asyncio.create_task(self._write_acks(), name="delivery-acks")
        return await pending.future

    async def drain(self) -> None:
        """At a stop: the acks already received are written (their waiters get any error)."""
        if self._ack_writer is not None:
            with contextlib.suppress(Exception):
                await self._ack_writer

    async def _write_acks(self) -> None:
        """Write the queued acks, all of them in one worker call (one statement per acking
        connection); acks arriving meanwhile wait for the next round."""
        while self._acks:
            batch, self._acks = self._acks, []
            by_subs: dict[tuple[str, ...], list[int]] = {}
            for p in batch:
                by_subs.setdefault(p.subscription_ids, []).extend(p.delivery_ids)
            write = functools.partial(_write_acks, by_subs=by_subs, now=self._now())
            try:
                # Not durable: an ack lost in a database crash only means the delivery is
                # sent again.
                acked = await self._db(write, durable=False)
            except BaseException as exc:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for p in batch:
                done = acked[p.subscription_ids]
                count = 0
                for delivery_id in p.delivery_ids:
                    if delivery_id in done:  # counted for the first ack that names it
                        done.discard(delivery_id)
                        count += 1
                if not p.future.done():
                    p.future.set_result(count)


def _write_acks(
    conn: Connection, by_subs: dict[tuple[str, ...], list[int]], now: datetime
) -> dict[tuple[str, ...], set[int]]:
    """Ack each connection's deliveries (of its own subscriptions); the ids acked now."""
    return {
        subs: set(queries.ack_deliveries(conn, ids, subs, now)) for subs, ids in by_subs.items()
    }
