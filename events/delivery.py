"""At-least-once delivery of fired events to subscribed connections.

Deliveries are rows (written in the fire transaction). The dispatcher, on the daemon's event
loop, pushes the sendable ones of each subscription attached to one of its connections, marks
them sent with ``next_attempt_at = now + ack timeout`` (so they are sent again if not acked in
time), and keeps at most ``max_inflight`` unacked deliveries per connection (back-pressure: a
flow engine that never acks holds that many and no more).

Cost: the database work of delivery is acks and refills (read the next sendable deliveries, mark
them sent). Both go through the store worker, which runs the calls queued together in one
transaction, committed without waiting for the disk (``durable=False``: losing an ack or a send
mark in a database crash only means the delivery is sent again). Acks that arrive while earlier
ones are being written are written together, one statement per acking connection. A subscription
is refilled only once half of its window is free (or a resend fell due), so a subscriber acking a
few deliveries at a time costs one refill per half window, not one per ack.

The send mark (``attempt + 1``, ``next_attempt_at``) is one set-based ``UPDATE`` per refill, in
the transaction that reads the rows, committed before they are pushed. It is the one write per
send that cannot be skipped: it makes ``attempt`` count up across reconnects, restarts and
daemon crashes, and keeps the next refill (by this daemon or, after a takeover, another) from
sending the rows again before their ack timeout. The resend deadline itself is also kept in
memory: each attachment holds its in-flight deliveries in send order, so the pump finds the
expired ones and the next deadline without scanning the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection

from program_timer.core.backoff import Backoff
from program_timer.core.event import event_body, event_message
from program_timer.core.logs import get_logger
from program_timer.store import queries
from program_timer.store.errors import StoreUnavailable

log = get_logger()


class Peer(Protocol):
    """What the dispatcher needs of a client connection."""

    closed: bool

    def push(self, message: dict[str, Any]) -> None: ...

    @property
    def backlogged(self) -> bool:
        """The peer is not reading: nothing more is pushed to it for now."""
        ...


class Worker(Protocol):
    def call(self, fn: Callable[[Connection], Any], *, durable: bool = True) -> Future[Any]: ...


@dataclass(slots=True)
class _PendingAck:
    subscription_ids: tuple[str, ...]  # those of the acking connection
    delivery_ids: list[int]
    future: asyncio.Future[int]  # how many of them this ack acked


@dataclass
class Attachment:
    subscription_id: str
    flow_instance_id: str
    peer: Peer
    # delivery id -> resend deadline (monotonic), in send order: every send re-inserts its id
    # at the end with a deadline of now + ack timeout, so deadlines never decrease along it.
    inflight: dict[int, float] = field(default_factory=dict)
    # Some in-flight delivery passed its deadline: it is sendable again, refill even if less
    # than half the window is free.
    resend_due: bool = False

    def expire(self, mono: float) -> None:
        """Drop the deliveries whose ack timeout passed (the database has them due again)."""
        inflight = self.inflight
        while inflight:
            delivery_id, deadline = next(iter(inflight.items()))
            if deadline > mono:
                return
            del inflight[delivery_id]
            self.resend_due = True

    def next_deadline(self) -> float | None:
        for deadline in self.inflight.values():
            return deadline
        return None


class Dispatcher:
    def __init__(
        self,
        worker: Worker,
        daemon_id: str,
        *,
        ack_timeout: float,
        max_inflight: int,
        now: Callable[[], datetime],
        poll_interval: float = 1.0,
    ) -> None:
        self._worker = worker
        self._daemon_id = daemon_id
        self._ack_timeout = ack_timeout
        self._max_inflight = max_inflight
        # Refill a connection once this much of its window is free (half of it).
        self._refill_at = max(1, max_inflight // 2)
        self._turn = 0
        self._now = now
        self._poll = poll_interval
        self._attached: dict[str, Attachment] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._acks: list[_PendingAck] = []
        self._ack_writer: asyncio.Task[None] | None = None
        self.backoff = Backoff("delivery_refill")

    async def _db(self, fn: Callable[[Connection], Any], *, durable: bool = True) -> Any:
        return await asyncio.wrap_future(self._worker.call(fn, durable=durable))

    # lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._pump_loop(), name="delivery-pump")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._ack_writer is not None:
            with contextlib.suppress(Exception):  # its acks get the error
                await self._ack_writer  # the acks already received are written
        ids = list(self._attached)
        self._attached.clear()
        if ids:
            try:
                await self._db(lambda c: queries.detach_subscriptions(c, ids, self._daemon_id))
            except Exception:  # the database may be gone; the lease ends with the heartbeat
                log.warning("could not detach subscriptions at stop", action="detach_failed")

    def kick(self) -> None:
        """Something may be sendable (a fire committed, an ack): pump soon. Thread-safe."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed at shutdown
            loop.call_soon_threadsafe(self._wake.set)

    @property
    def connected_subscribers(self) -> int:
        return len(self._attached)

    @property
    def inflight(self) -> int:
        return sum(len(a.inflight) for a in self._attached.values())

    # ops -----------------------------------------------------------------------------------

    async def subscribe(
        self,
        peer: Peer,
        subscription_id: str,
        flow_instance_id: str,
        connector_idn: str | None,
        persona_id: str | None,
    ) -> dict[str, Any]:
        now = self._now()
        values = {
            "subscription_id": subscription_id,
            "flow_instance_id": flow_instance_id,
            "filter_connector_idn": connector_idn,
            "filter_persona_id": persona_id,
            "created_at": now,
            "attached_to": self._daemon_id,
            "attached_at": now,
        }

        def attach(conn: Connection) -> bool:
            created = queries.upsert_subscription(conn, values)
            # Whatever was in flight to an earlier connection is sent again now.
            queries.release_unacked(conn, [subscription_id], now)
            return created

        created = await self._db(attach)
        previous = self._attached.get(subscription_id)
        if previous is not None and previous.peer is not peer:
            log.info(
                "subscription moved to a new connection",
                action="subscription_taken_over",
                subscription=subscription_id,
            )
        self._attached[subscription_id] = Attachment(subscription_id, flow_instance_id, peer)
        log.info(
            "subscribed",
            action="subscribed",
            subscription=subscription_id,
            created=created,
            connector=connector_idn,
            persona=persona_id,
        )
        self._wake.set()
        return {"subscriptionId": subscription_id, "created": created}

    async def unsubscribe(self, peer: Peer, subscription_id: str) -> dict[str, Any]:
        removed = await self._db(lambda c: queries.delete_subscription(c, subscription_id))
        self._attached.pop(subscription_id, None)
        log.info(
            "unsubscribed", action="unsubscribed", subscription=subscription_id, removed=removed
        )
        return {"removed": removed}

    async def ack(self, peer: Peer, delivery_ids: list[int]) -> dict[str, Any]:
        mine = [a for a in self._attached.values() if a.peer is peer]
        subs = [a.subscription_id for a in mine]
        if not subs or not delivery_ids:
            return {"acked": 0}
        pending = _PendingAck(tuple(subs), delivery_ids, asyncio.get_running_loop().create_future())
        self._acks.append(pending)
        if self._ack_writer is None or self._ack_writer.done():
            self._ack_writer = asyncio.create_task(self._write_acks(), name="delivery-acks")
        acked = await pending.future
        # Acks of deliveries already acked (a resend raced the ack) are not errors.
        for attachment in mine:
            inflight = attachment.inflight
            for delivery_id in delivery_ids:
                inflight.pop(delivery_id, None)
        self._wake.set()
        return {"acked": acked}

    async def _write_acks(self) -> None:
        """Write the queued acks, all of them in one worker call (one ``UPDATE`` per acking
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

    async def disconnected(self, peer: Peer) -> None:
        gone = [sid for sid, a in self._attached.items() if a.peer is peer]
        for sid in gone:
            del self._attached[sid]
        if gone:
            try:
                await self._db(lambda c: queries.detach_subscriptions(c, gone, self._daemon_id))
            except Exception:
                log.warning("could not detach subscriptions", action="detach_failed")

    # the pump ------------------------------------------------------------------------------

    async def _pump_loop(self) -> None:
        while True:
            timeout = self._poll
            deadlines = [
                d
                for a in self._attached.values()
                if not a.peer.closed and (d := a.next_deadline()) is not None
            ]
            if deadlines:
                timeout = max(0.0, min(timeout, min(deadlines) - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            try:
                await self.pump()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                # The outage is logged once, as database_down; pumping resumes after it.
                await asyncio.sleep(self.backoff.failed(str(exc), unavailable=True))
            except Exception as exc:
                await asyncio.sleep(self.backoff.failed(repr(exc)))
            else:
                self.backoff.succeeded()

    def _wanted(self) -> dict[str, int]:
        """How many deliveries each attached subscription may be sent now.

        The window (``max_inflight`` unacked deliveries) is the connection's, shared by the
        subscriptions it holds: a connection is refilled once at least half of its window is
        free, or at once when a resend fell due, each of its subscriptions getting an equal
        share. A connection that does not read what it was sent gets nothing more."""
        mono = time.monotonic()
        by_peer: dict[int, list[Attachment]] = {}
        for a in self._attached.values():
            if a.peer.closed or a.peer.backlogged:
                continue
            a.expire(mono)
            by_peer.setdefault(id(a.peer), []).append(a)
        wanted: dict[str, int] = {}
        for subs in by_peer.values():
            free = self._max_inflight - sum(len(a.inflight) for a in subs)
            if free >= self._refill_at or (free > 0 and any(a.resend_due for a in subs)):
                share = max(1, free // len(subs))
                self._turn += 1  # more subscriptions than free places: each gets its turn
                start = self._turn % len(subs)
                for a in (subs[start:] + subs[:start])[:free]:
                    wanted[a.subscription_id] = share
                    a.resend_due = False
        return wanted

    async def pump(self) -> None:
        """Send what each attached subscription may receive now (see :meth:`_wanted`)."""
        wanted = self._wanted()
        if not wanted:
            return
        now = self._now()
        resend_at = now + timedelta(seconds=self._ack_timeout)

        def fetch(conn: Connection) -> tuple[dict[str, list[Any]], set[str]]:
            found: dict[str, list[Any]] = {}
            # A subscriber that re-attached through another daemon is that daemon's now.
            moved = queries.attached_elsewhere(conn, list(wanted), self._daemon_id)
            for sid, capacity in wanted.items():
                if sid in moved:
                    continue
                rows = queries.due_deliveries(conn, sid, now, capacity)
                if rows:
                    found[sid] = rows
            # Persisted before the push (the push happens after the commit): the attempt
            # counts up even if the daemon dies right after sending.
            queries.mark_sent(conn, [r.id for rows in found.values() for r in rows], now, resend_at)
            return found, moved

        # Not durable: a send mark lost in a database crash only means the delivery is sent
        # again (sooner than the ack timeout), with the attempt number it had.
        found, moved = await self._db(fetch, durable=False)
        for sid in moved:
            if self._attached.pop(sid, None) is not None:
                log.info(
                    "subscription re-attached elsewhere",
                    action="subscription_moved",
                    subscription=sid,
                )
        deadline = time.monotonic() + self._ack_timeout
        for sid, rows in found.items():
            attachment = self._attached.get(sid)
            if attachment is None or attachment.peer.closed:
                continue  # sent again on reattach (release_unacked) or after the ack timeout
            inflight = attachment.inflight
            for r in rows:
                inflight.pop(r.id, None)  # a resend goes to the end: send order is kept
                inflight[r.id] = deadline
                attachment.peer.push(
                    event_message(
                        subscription_id=sid,
                        flow_instance_id=attachment.flow_instance_id,
                        delivery_id=r.id,
                        attempt=r.attempt + 1,
                        event=event_body(
                            external_event_id=r.external_event_id,
                            persona_id=r.persona_id,
                            connector_idn=r.connector_idn,
                            command_act_id=r.command_act_id,
                            arguments=r.arguments,
                        ),
                    )
                )


def _write_acks(
    conn: Connection, by_subs: dict[tuple[str, ...], list[int]], now: datetime
) -> dict[tuple[str, ...], set[int]]:
    """Ack each connection's deliveries (of its own subscriptions); the ids acked now."""
    return {
        subs: set(queries.ack_deliveries(conn, ids, subs, now)) for subs, ids in by_subs.items()
    }
