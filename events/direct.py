"""Direct sends: a fire batch hands its events to the subscriptions attached to this daemon.

Without them every fired event waited for the delivery pump: a read of the deliveries, a
transaction to mark them sent, then the push, all through the store worker. With them, the fire
transaction itself writes the deliveries of attached subscriptions already marked sent
(``attempt`` 1, resend after the ack timeout) and, once it has committed, the events are
pushed from memory. Only what was not sent this way (detached subscribers, full windows,
resends, other daemons' fires) is read back by the pump.

The guarantees do not change: the rows are durable before the push (commit first); a push
that never happens (the connection closed, the daemon died) is a delivery sent and not acked,
resent after the ack timeout or as soon as its subscriber reconnects, with ``attempt`` counting
on.

Order: first deliveries of a subscription must reach it in fire order. A subscription with
deliveries waiting in the database (its window was full, it just attached, another daemon fired
for it) is *lagging*: it gets no direct sends until the pump has drained it, so that a newer
event never overtakes an older one. With several daemons sharing the database the others'
fires reach a subscription only through the pump: direct sends are used only while this daemon
is the only one (always on SQLite).

Threads: the fire loop (``reserve``, ``settle``, ``deliver``) and the event loop (``refresh``,
``reserved``, ``lag``, ``drained``) meet here under one lock. The event loop computes each
attached subscription's free window; a fire batch reserves it before its transaction and it is
settled once the sends are in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Send:
    """One delivery written as sent by a fire batch, to push once it committed."""

    subscription_id: str
    delivery_id: int
    event: bytes  # its JSON (core.event.event_json), made once for all its subscriptions


class DirectSends:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[str, int] = {}  # window free per attached subscription (event loop)
        self._reserved: dict[str, int] = {}  # taken by fire batches not settled yet
        self._lagging: set[str] = set()  # deliveries wait in the database: no direct sends
        self._known: set[str] = set()  # attached here (the dispatcher's, kept under the lock)
        self._generation: dict[str, int] = {}  # counts lag events, so a stale drain is ignored
        self._deliver: Callable[[list[Send], dict[str, int]], None] | None = None
        self._enabled = True  # off while other daemons share the database

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        """Off while other daemons share the database. Turned on again, every subscription
        attached here lags first: the others' fires may have left deliveries for it in the
        database, which must reach it before any direct send (fire order)."""
        with self._lock:
            turned_on = on and not self._enabled
            self._enabled = on
            known = set(self._known)
        if turned_on and known:
            self.lag(known)

    # the event loop's side ---------------------------------------------------------------

    def attach(self, deliver: Callable[[list[Send], dict[str, int]], None]) -> None:
        """``deliver(sends, taken)`` pushes committed sends, then settles the reservation they
        were made under; it is called from the fire thread and must hand both to the event
        loop (settling before the push would let the pump fill the same window twice)."""
        self._deliver = deliver

    def refresh(self, free: dict[str, int]) -> None:
        """The free window of each attached subscription, as the dispatcher sees it now."""
        with self._lock:
            self._free = free

    def reserved(self, subscription_id: str) -> int:
        with self._lock:
            return self._reserved.get(subscription_id, 0)

    def lag(self, subscription_ids: set[str] | list[str]) -> None:
        """These subscriptions have deliveries waiting in the database."""
        with self._lock:
            for sid in subscription_ids:
                self._lagging.add(sid)
                self._generation[sid] = self._generation.get(sid, 0) + 1

    def joined(self, subscription_id: str) -> None:
        """The subscription attached here: what waited for it is read by the pump first."""
        with self._lock:
            self._known.add(subscription_id)
        self.lag([subscription_id])

    def lagging(self, subscription_id: str) -> bool:
        """Whether deliveries may wait in the database for it: only then does the pump read
        (while direct sends are on; otherwise it always reads)."""
        with self._lock:
            return subscription_id in self._lagging

    def waiting(self, subscription_ids: set[str]) -> None:
        """A committed fire batch left deliveries waiting in the database for these
        subscriptions (full window, attached after the batch began, detached): those attached
        here lag until the pump has read them."""
        with self._lock:
            known = self._known & subscription_ids
        if known:
            self.lag(known)

    def would_lag(self, subscription_ids: set[str]) -> bool:
        """Whether deliveries left waiting for these subscriptions make one attached here lag
        (direct sends on): the batch that left them must commit before the next one reserves
        (:class:`~program_timer.scheduler.firing.FireLoop`)."""
        with self._lock:
            return self._enabled and not self._known.isdisjoint(subscription_ids)

    def generation(self, subscription_id: str) -> int:
        with self._lock:
            return self._generation.get(subscription_id, 0)

    def drained(self, subscription_id: str, generation: int) -> None:
        """The pump found nothing more waiting for it (as of ``generation``)."""
        with self._lock:
            if self._generation.get(subscription_id, 0) == generation:
                self._lagging.discard(subscription_id)

    def forget(self, subscription_id: str) -> None:
        """The subscription is no longer attached here."""
        with self._lock:
            self._known.discard(subscription_id)
            self._free.pop(subscription_id, None)
            self._lagging.discard(subscription_id)
            self._generation.pop(subscription_id, None)

    # the fire loop's side ----------------------------------------------------------------

    def reserve(self) -> dict[str, int]:
        """Take the free windows for one fire batch (settle them afterwards, whatever
        happens). What the batch leaves waiting for a subscription attached here makes it lag
        (:meth:`waiting`)."""
        with self._lock:
            if not self._enabled:
                return {}
            taken = {sid: n for sid, n in self._free.items() if n > 0 and sid not in self._lagging}
            for sid, n in taken.items():
                self._free[sid] = 0  # until settled: what is not used comes back then
                self._reserved[sid] = self._reserved.get(sid, 0) + n
        return taken

    def settle(self, taken: dict[str, int], used: dict[str, int] | None = None) -> None:
        """Close a batch's reservation: after its sends are in flight (event loop), or at
        once when its transaction failed (fire loop, nothing ``used``). The part of the window
        the batch did not use is free again."""
        used = used or {}
        with self._lock:
            for sid, n in taken.items():
                left = self._reserved.get(sid, 0) - n
                if left > 0:
                    self._reserved[sid] = left
                else:
                    self._reserved.pop(sid, None)
                if sid in self._free:
                    self._free[sid] += max(0, n - used.get(sid, 0))

    def deliver(self, sends: list[Send], taken: dict[str, int]) -> None:
        """After the batch committed: free at once the part of ``taken`` it did not use, and
        hand its sends to be pushed with the rest, settled once they are in flight.

        A batch reserves each subscription's whole free window before it knows what is due.
        Were it all held until the event loop has pushed, the next batch (a millisecond later
        at a steady rate) would find no window, leave its deliveries waiting in the database
        and make the subscription lag: the pump's read, mark and push instead of a direct
        send. What was used stays reserved until the push makes it in flight, so the pump
        never fills the same window twice."""
        self.push(sends, self.unused(sends, taken))

    def unused(self, sends: list[Send], taken: dict[str, int]) -> dict[str, int]:
        """Free at once the part of ``taken`` the batch's ``sends`` did not use; returns the
        part used, reserved until :meth:`push`."""
        used: dict[str, int] = {}
        for send in sends:
            used[send.subscription_id] = used.get(send.subscription_id, 0) + 1
        unused = {sid: n - used.get(sid, 0) for sid, n in taken.items() if n > used.get(sid, 0)}
        if unused:
            self.settle(unused)
        return used

    def push(self, sends: list[Send], used: dict[str, int]) -> None:
        """Hand a committed batch's sends to be pushed; ``used`` is settled once they are in
        flight."""
        if not sends:
            return  # nothing to push: no wake-up of the event loop
        # What was sent (always within what was taken) stays reserved until pushed.
        if self._deliver is None:
            self.settle(used)
        else:
            self._deliver(sends, used)
