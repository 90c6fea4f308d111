"""At-least-once delivery of fired events to subscribed connections.

Deliveries are rows (written in the fire transaction). The dispatcher, on the daemon's event
loop, pushes the sendable ones of each subscription attached to one of its connections, marks
them sent with ``next_attempt_at = now + ack timeout`` (so they are sent again if not acked in
time), and keeps at most ``max_inflight`` unacked deliveries per connection (back-pressure: a
flow engine that never acks holds that many and no more).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection

from events.model import event_body, event_message
from scheduler.logs import get_logger
from store import queries
from store.errors import StoreUnavailable

log = get_logger()


class Peer(Protocol):
    """What the dispatcher needs of a client connection."""

    closed: bool

    def push(self, message: dict[str, Any]) -> None: ...


class Worker(Protocol):
    def call(self, fn: Callable[[Connection], Any]) -> Future[Any]: ...


@dataclass
class Attachment:
    subscription_id: str
    flow_instance_id: str
    peer: Peer
    inflight: dict[int, float] = field(default_factory=dict)  # delivery id -> resend deadline


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
        self._now = now
        self._poll = poll_interval
        self._attached: dict[str, Attachment] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pushed = 0

    async def _db(self, fn: Callable[[Connection], Any]) -> Any:
        return await asyncio.wrap_future(self._worker.call(fn))

    # lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._pump_loop(), name="delivery-pump")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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
        now = self._now()
        acked = await self._db(lambda c: queries.ack_deliveries(c, delivery_ids, subs, now))
        for attachment in mine:
            for delivery_id in acked:
                attachment.inflight.pop(delivery_id, None)
        # Acks of deliveries already acked (a resend raced the ack) are not errors.
        for attachment in mine:
            for delivery_id in delivery_ids:
                attachment.inflight.pop(delivery_id, None)
        self._wake.set()
        return {"acked": len(acked)}

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
            deadlines = [d for a in self._attached.values() for d in a.inflight.values()]
            if deadlines:
                timeout = max(0.0, min(timeout, min(deadlines) - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            try:
                await self.pump()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable:
                # The outage is logged once, where it is detected; pumping resumes after it.
                await asyncio.sleep(1.0)
            except Exception as exc:
                log.warning("delivery pump failed", action="pump_failed", reason=str(exc))
                await asyncio.sleep(0.5)

    async def pump(self) -> None:
        """Send what each attached subscription may receive now, up to its capacity."""
        mono = time.monotonic()
        wanted: dict[str, int] = {}
        for sid, a in list(self._attached.items()):
            if a.peer.closed:
                continue
            live = sum(1 for d in a.inflight.values() if d > mono)
            capacity = self._max_inflight - live
            if capacity > 0:
                wanted[sid] = capacity
        if not wanted:
            return
        now = self._now()
        resend_at = now + timedelta(seconds=self._ack_timeout)

        def fetch(conn: Connection) -> tuple[dict[str, list[Any]], set[str]]:
            found: dict[str, list[Any]] = {}
            marks: list[dict[str, Any]] = []
            # A subscriber that re-attached through another daemon is that daemon's now.
            moved = queries.attached_elsewhere(conn, list(wanted), self._daemon_id)
            for sid, capacity in wanted.items():
                if sid in moved:
                    continue
                rows = queries.due_deliveries(conn, sid, now, capacity)
                if rows:
                    found[sid] = rows
                    marks.extend(
                        {
                            "_id": r.id,
                            "attempt": r.attempt + 1,
                            "sent_at": now,
                            "next_attempt_at": resend_at,
                        }
                        for r in rows
                    )
            queries.mark_sent(conn, marks)
            return found, moved

        found, moved = await self._db(fetch)
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
            for r in rows:
                attachment.inflight[r.id] = deadline
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
                self.pushed += 1
            if len(rows) == wanted[sid]:
                self._wake.set()  # there may be more once acks come
