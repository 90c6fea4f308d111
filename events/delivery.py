"""At-least-once delivery of fired events to subscribed connections.

Deliveries are rows (written in the fire transaction). The dispatcher, on the daemon's event
loop, pushes the sendable ones of each subscription attached to one of its connections, marks
them sent with ``next_attempt_at = now + resend wait`` (so they are sent again if not acked in
time), and keeps at most ``max_inflight`` unacked deliveries per connection (back-pressure: a
flow engine that never acks holds that many and no more).

Retries and dead letters (SPEC 7.4): the resend wait is the ack timeout after the first send,
doubling with every send up to ``retry_max_delay``
(:func:`~program_timer.store.queries.resend_delay`). With ``max_attempts`` set, a delivery
sent that many times whose last wait passed without an ack becomes dead when it falls due
(``dead_at``): never sent again, kept and counted until ``redeliver`` makes it pending with a
fresh budget. (A pending delivery whose event reaches the retention is made dead by the purge.)

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
sending the rows again before their resend wait passed. The resend deadline itself is also
kept in memory: each attachment holds its in-flight deliveries in send order, one queue per
resend wait, so the pump finds the expired ones and the next deadline without scanning the
window.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from program_timer.core.backoff import Backoff
from program_timer.core.event import event_body, event_json, event_line
from program_timer.core.logs import get_logger
from program_timer.events.acks import AckWriter
from program_timer.events.attachment import Attachment, Peer, Worker
from program_timer.events.direct import DirectSends, Send
from program_timer.store import queries
from program_timer.store.errors import StoreUnavailable
from program_timer.store.notify import DELIVERIES, notify

log = get_logger()


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
        retry_max_delay: float = 3600.0,
        max_attempts: int | None = None,
        retention: float | None = None,
    ) -> None:
        self._worker = worker
        self._daemon_id = daemon_id
        self._ack_timeout = ack_timeout
        self._retry_max_delay = retry_max_delay
        self._max_attempts = max_attempts
        self._retention = retention
        # Since the start, for /metrics: pushes (resends included), acks, deliveries given up
        # after max_attempts sends, dead deliveries made pending again.
        self.sent = 0
        self.acked = 0
        self.dead_letters = 0
        self.redelivered = 0
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
        self._acks = AckWriter(self._db, now)
        self.backoff = Backoff("delivery_refill")
        self.direct = DirectSends()  # fire batches send to attached subscriptions themselves
        self.direct.attach(self._deliver_from_fire_thread)

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
        await self._acks.drain()
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

    def snapshot(self) -> dict[str, int]:
        """The dispatcher's figures, safe to read from another thread (``/metrics``): the
        attachments are copied in one step, under the GIL, before they are looked at."""
        attached = list(self._attached.values())
        return {
            "subscribers": len(attached),
            "inflight": sum(len(a.inflight) for a in attached),
            "sent": self.sent,
            "acked": self.acked,
            "dead_letters": self.dead_letters,
            "redelivered": self.redelivered,
        }

    def resend_wait(self, attempt: int) -> float:
        """How long a delivery sent for the ``attempt``-th time waits for its ack."""
        return queries.resend_delay(attempt, self._ack_timeout, self._retry_max_delay)

    # ops -----------------------------------------------------------------------------------

    async def subscribe(
        self,
        peer: Peer,
        subscription_id: str,
        flow_instance_id: str,
        connector_idn: str | None,
        persona_id: str | None,
        since: datetime | None = None,
    ) -> dict[str, Any]:
        now = self._now()
        if since is not None and self._retention is not None:
            # Replay within the retention: older events are gone, or kept only for their
            # dead letters.
            since = max(since, now - timedelta(seconds=self._retention))
        values = {
            "subscription_id": subscription_id,
            "flow_instance_id": flow_instance_id,
            "filter_connector_idn": connector_idn,
            "filter_persona_id": persona_id,
            "created_at": now,
            "attached_to": self._daemon_id,
            "attached_at": now,
        }

        def attach(conn: Connection) -> tuple[bool, int]:
            created = queries.upsert_subscription(conn, values)
            replayed = 0
            if created and since is not None:
                # The stored events it asked for, in the transaction that creates it.
                replayed = queries.replay_events(
                    conn,
                    subscription_id,
                    connector_idn=connector_idn,
                    persona_id=persona_id,
                    since=since,
                    now=now,
                )
            # Whatever was in flight to an earlier connection is sent again now.
            queries.release_unacked(conn, [subscription_id], now)
            return created, replayed

        created, replayed = await self._db(attach)
        previous = self._attached.get(subscription_id)
        if previous is not None and previous.peer is not peer:
            log.info(
                "subscription moved to a new connection",
                action="subscription_taken_over",
                subscription=subscription_id,
            )
        self._attached[subscription_id] = Attachment(subscription_id, flow_instance_id, peer)
        self.direct.joined(subscription_id)  # what waited for it goes first, through the pump
        log.info(
            "subscribed",
            action="subscribed",
            subscription=subscription_id,
            created=created,
            connector=connector_idn,
            persona=persona_id,
            **({"replayed": replayed} if since is not None else {}),
        )
        self._wake.set()
        return {"subscriptionId": subscription_id, "created": created}

    async def redeliver(self, subscription_id: str, delivery_ids: list[int] | None) -> int | None:
        """Dead deliveries of a subscription (the given ones, else all) become pending with a
        fresh attempt budget and are sent promptly; how many, or None if no such
        subscription."""
        now = self._now()

        def revive(conn: Connection) -> int | None:
            if queries.get_subscription(conn, subscription_id) is None:
                return None
            n = queries.redeliver(conn, subscription_id, delivery_ids, now)
            if n:
                notify(conn, DELIVERIES, self._daemon_id)  # the daemon it is attached to
            return n

        done: int | None = await self._db(revive)
        if done:
            self.redelivered += done
            self.direct.lag([subscription_id])
            self._wake.set()
            log.info(
                "dead deliveries made pending again",
                action="redelivered",
                subscription=subscription_id,
                deliveries=done,
            )
        return done

    async def unsubscribe(self, peer: Peer, subscription_id: str) -> dict[str, Any]:
        removed = await self._db(lambda c: queries.delete_subscription(c, subscription_id))
        self._attached.pop(subscription_id, None)
        self.direct.forget(subscription_id)
        log.info(
            "unsubscribed", action="unsubscribed", subscription=subscription_id, removed=removed
        )
        return {"removed": removed}

    async def ack(self, peer: Peer, delivery_ids: list[int]) -> dict[str, Any]:
        mine = [a for a in self._attached.values() if a.peer is peer]
        subs = [a.subscription_id for a in mine]
        if not subs or not delivery_ids:
            return {"acked": 0}
        acked = await self._acks.submit(tuple(subs), delivery_ids)
        self.acked += acked
        # Acks of deliveries already acked (a resend raced the ack) are not errors.
        for attachment in mine:
            for delivery_id in delivery_ids:
                attachment.forget(delivery_id)
        self._wake.set()
        return {"acked": acked}

    async def disconnected(self, peer: Peer) -> None:
        gone = [sid for sid, a in self._attached.items() if a.peer is peer]
        for sid in gone:
            del self._attached[sid]
            self.direct.forget(sid)
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
            woken = False
            with contextlib.suppress(TimeoutError):
                woken = await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            try:
                # Woken (a fire, an ack): read only for subscriptions whose deliveries may
                # wait in the database; every poll interval (or resend deadline): for all.
                await self.pump(everyone=not woken)
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                # The outage is logged once, as database_down; pumping resumes after it.
                await asyncio.sleep(self.backoff.failed(str(exc), unavailable=True))
            except Exception as exc:
                await asyncio.sleep(self.backoff.failed(repr(exc)))
            else:
                self.backoff.succeeded()

    def _wanted(self, everyone: bool = True) -> dict[str, int]:
        """How many deliveries each attached subscription may be sent now.

        The window (``max_inflight`` unacked deliveries) is the connection's, shared by the
        subscriptions it holds: a connection is refilled once at least half of its window is
        free, or at once when a resend fell due, each of its subscriptions getting an equal
        share. A connection that does not read what it was sent gets nothing more.

        While direct sends are on, a subscription that fire batches keep up with has nothing
        waiting in the database: unless ``everyone``, it is read only when it lags (it just
        attached, a batch left it deliveries, dead ones were revived) or a resend fell due.
        Without that, every ack and every fire batch cost a refill transaction that found
        nothing (on SQLite, holding the writer lock the fire transactions wait for)."""
        selective = not everyone and self.direct.enabled
        mono = time.monotonic()
        by_peer: dict[int, list[Attachment]] = {}
        for a in self._attached.values():
            if a.peer.closed or a.peer.backlogged:
                continue
            a.expire(mono)
            by_peer.setdefault(id(a.peer), []).append(a)
        wanted: dict[str, int] = {}
        windows: dict[str, int] = {}
        for subs in by_peer.values():
            free = self._max_inflight - sum(
                len(a.inflight) + self.direct.reserved(a.subscription_id) for a in subs
            )
            for a in subs:
                windows[a.subscription_id] = max(0, free) // len(subs)
            if free >= self._refill_at or (free > 0 and any(a.resend_due for a in subs)):
                share = max(1, free // len(subs))
                self._turn += 1  # more subscriptions than free places: each gets its turn
                start = self._turn % len(subs)
                for a in (subs[start:] + subs[:start])[:free]:
                    if selective and not (a.resend_due or self.direct.lagging(a.subscription_id)):
                        continue
                    wanted[a.subscription_id] = share
                    a.resend_due = False
        self.direct.refresh(windows)
        return wanted

    async def pump(self, everyone: bool = True) -> None:
        """Send what each attached subscription may receive now (see :meth:`_wanted`)."""
        wanted = self._wanted(everyone)
        if not wanted:
            return
        now = self._now()
        generations = {sid: self.direct.generation(sid) for sid in wanted}
        spent = self._max_attempts
        fetch = functools.partial(self._fetch, wanted=wanted, now=now)
        # Not durable: a send mark lost in a database crash only means the delivery is sent
        # again (sooner than its resend wait), with the attempt number it had.
        found, moved, fetched, killed = await self._db(fetch, durable=False)
        if killed:
            self.dead_letters += killed
            log.warning(
                "deliveries sent max_attempts times without an ack are dead letters",
                action="deliveries_dead",
                deliveries=killed,
                max_attempts=spent,
            )
            self._wake.set()  # their places in the window are free: refill again
        for sid in moved:
            self.direct.forget(sid)
            if self._attached.pop(sid, None) is not None:
                log.info(
                    "subscription re-attached elsewhere",
                    action="subscription_moved",
                    subscription=sid,
                )
        for sid, capacity in wanted.items():
            if fetched.get(sid, 0) < capacity:  # nothing more waits: direct sends again
                self.direct.drained(sid, generations[sid])
        mono = time.monotonic()
        for sid, rows in found.items():
            attachment = self._attached.get(sid)
            if attachment is None or attachment.peer.closed:
                continue  # sent again on reattach (release_unacked) or after the ack timeout
            lines = []
            for r in rows:
                event = event_body(
                    external_event_id=r.external_event_id,
                    persona_id=r.persona_id,
                    connector_idn=r.connector_idn,
                    command_act_id=r.command_act_id,
                    arguments=r.arguments,
                )
                lines.append(self._send(attachment, r.id, r.attempt + 1, event_json(event), mono))
            if lines:
                attachment.peer.push(b"".join(lines))

    def _fetch(
        self, conn: Connection, *, wanted: dict[str, int], now: datetime
    ) -> tuple[dict[str, list[Any]], set[str], dict[str, int], int]:
        """The refill's database work (store worker): the sendable deliveries of each wanted
        subscription, dead letters marked, the rest marked sent; also which subscriptions
        moved to another daemon and how many rows each had."""
        spent = self._max_attempts
        found: dict[str, list[Any]] = {}
        fetched: dict[str, int] = {}
        dead: list[int] = []
        # A subscriber that re-attached through another daemon is that daemon's now. On
        # PostgreSQL both reads are one round trip (the rows of a subscription found moved are
        # dropped), the marks and the COMMIT another.
        moved_later = queries.attached_elsewhere_later(conn, list(wanted), self._daemon_id)
        due = queries.due_deliveries_of(conn, wanted, now)
        moved = moved_later()
        for sid, rows in due.items():
            if sid in moved:
                continue
            fetched[sid] = len(rows)
            if spent is not None:
                # Sent max_attempts times and its last wait passed unacked: a dead letter.
                dead.extend(r.id for r in rows if r.attempt >= spent)
                rows = [r for r in rows if r.attempt < spent]
            if rows:
                found[sid] = rows
        killed = queries.mark_dead(conn, dead, now) if dead else 0
        # Persisted before the push (the push happens after the commit): the attempt
        # counts up even if the daemon dies right after sending. Each is due again after
        # its resend wait (the ack timeout, doubled per send up to retry_max_delay).
        queries.mark_sent(
            conn,
            [(r.id, r.attempt) for rows in found.values() for r in rows],
            now,
            ack_timeout=self._ack_timeout,
            retry_max_delay=self._retry_max_delay,
        )
        return found, moved, fetched, killed

    def _send(
        self, attachment: Attachment, delivery_id: int, attempt: int, event: bytes, mono: float
    ) -> bytes:
        """One delivery's push line (its ``attempt``-th send, at ``mono``; ``event``: the
        event's JSON), kept in flight for its resend wait (the one the send mark wrote). The
        caller pushes the lines of a batch together."""
        wait = self.resend_wait(attempt)
        attachment.sent(delivery_id, mono + wait, wait)
        self.sent += 1
        return event_line(attachment.line_start, delivery_id, attempt, event)

    def _deliver_from_fire_thread(self, sends: list[Send], taken: dict[str, int]) -> None:
        """A fire batch committed sends to attached subscriptions (fire thread)."""
        loop = self._loop
        try:
            if loop is None:
                raise RuntimeError("not started")
            loop.call_soon_threadsafe(self._push_direct, sends, taken)
        except RuntimeError:  # the loop is closed (shutdown): resent after the ack timeout
            self.direct.settle(taken)

    def _push_direct(self, sends: list[Send], taken: dict[str, int]) -> None:
        """A fire batch's sends, pushed: each attached subscription's lines in one push."""
        mono = time.monotonic()
        used: dict[str, int] = {}
        lines: dict[str, list[bytes]] = {}
        try:
            for send in sends:
                sid = send.subscription_id
                used[sid] = used.get(sid, 0) + 1
                attachment = self._attached.get(sid)
                if attachment is not None and not attachment.peer.closed:
                    line = self._send(attachment, send.delivery_id, 1, send.event, mono)
                    lines.setdefault(sid, []).append(line)
                # else: sent again when its subscriber attaches, or after the ack timeout
            for sid, pushed in lines.items():
                self._attached[sid].peer.push(b"".join(pushed))
        finally:
            self.direct.settle(taken, used)
