"""The one thread that runs the socket side's database writes, and the readers beside it.

Commands queue here and are applied in groups: everything waiting when the thread is free (up
to ``max_batch`` commands) goes into one transaction, so a pipelining client costs one commit per
group, not per command. Other writes (subscriptions, acks, send marks) are callables; consecutive
callables are grouped the same way, each run in turn on one connection in one transaction (a
command still ends the group: order with the commands is kept). Results come back as futures.

Reads that need no order with the writes (``status``, the admin listings) run on a small pool of
reader threads in read-only transactions: on SQLite they never wait for the writer lock.

Error policy (README, "Errors and retries"): a group that lost a race (:class:`Conflict`) is run
again, at once, up to :data:`CONFLICT_RETRIES` times on fresh data, then each of its members on
its own; an unreachable database fails the whole group with :class:`StoreUnavailable` at once
(the caller answers ``unavailable``; nothing is retried behind its back); any other error is a
bug: the members are run one by one so that only the faulty one fails, and it is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, cast, overload

from sqlalchemy import Connection, Engine

from program_timer.core.clock import Clock
from program_timer.core.logs import get_logger
from program_timer.scheduler.commands import (
    READ_ONLY_COMMANDS,
    CommandSettings,
    Outcome,
    apply_batch,
)
from program_timer.scheduler.protocol import CommandRequest, ProtocolError
from program_timer.store import queries
from program_timer.store.db import (
    KeptConnections,
    health,
    read_modify_write,
    read_transaction,
)
from program_timer.store.errors import Conflict, StoreUnavailable

log = get_logger()

CONFLICT_RETRIES: Final = 3
KEEP_IDLE: Final = 1.0  # seconds without work after which the worker's connection is released


@dataclass(slots=True)
class _Run:
    """Commands queued together (one client's pipelined lines of one read): one future for
    all their outcomes, set once the last is known (a run may span two groups)."""

    future: Future[list[Outcome]] | asyncio.Future[list[Outcome]]
    loop: asyncio.AbstractEventLoop | None
    outcomes: list[Outcome | None]
    left: int


@dataclass(slots=True)
class _Command:
    request: CommandRequest
    run: _Run
    index: int

    @property
    def future(self) -> Future[list[Outcome]] | asyncio.Future[list[Outcome]]:
        return self.run.future


@dataclass(slots=True)
class _Call:
    fn: Callable[[Connection], Any]
    future: Future[Any]
    durable: bool = True


_STOP = object()
COMMANDS_RECENT: Final = 1.0  # seconds


class StoreWorker:
    def __init__(
        self,
        engine: Engine,
        settings: CommandSettings,
        clock: Clock,
        *,
        max_batch: int = 512,
        on_committed: Callable[[list[tuple[CommandRequest, Outcome]]], None] | None = None,
    ) -> None:
        self._engine = engine
        self._command_engine = read_modify_write(engine)
        self._connections = KeptConnections(engine)  # while work comes (KEEP_IDLE)
        self._settings = settings
        self._clock = clock
        self._max_batch = max_batch
        self._on_committed = on_committed
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="store-worker", daemon=True)
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="store-reader")
        self._health = health(engine)
        self._last_command = -COMMANDS_RECENT  # time.monotonic() of the latest command queued

    def commands_recent(self) -> bool:
        """Whether a command was queued in the last :data:`COMMANDS_RECENT` seconds: the fire
        loop then fires in smaller transactions, so that a command waits less for one."""
        return time.monotonic() - self._last_command < COMMANDS_RECENT

    @property
    def available(self) -> bool:
        """Whether the database answered last time (here or in the job store)."""
        return self._health.available

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._readers.shutdown(wait=False, cancel_futures=True)

    @overload
    def commands(self, requests: list[CommandRequest]) -> Future[list[Outcome]]: ...

    @overload
    def commands(
        self, requests: list[CommandRequest], loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[list[Outcome]]: ...

    def commands(
        self, requests: list[CommandRequest], loop: asyncio.AbstractEventLoop | None = None
    ) -> Future[list[Outcome]] | asyncio.Future[list[Outcome]]:
        """Queue commands, in order; one future for their outcomes, in the same order. With
        ``loop`` (the event loop calling), the future is that loop's, and the outcomes of a
        whole group are handed to it in one wake-up; without, a
        :class:`concurrent.futures.Future`. One future for many commands, not one each: a
        pipelining client's lines of one read cost the event loop one future, one deadline and
        one callback (README, "Speed", tenth part)."""
        fut: Future[list[Outcome]] | asyncio.Future[list[Outcome]] = (
            Future() if loop is None else loop.create_future()
        )
        run = _Run(fut, loop, [None] * len(requests), len(requests))
        self._last_command = time.monotonic()
        put = self._queue.put
        for index, request in enumerate(requests):
            put(_Command(request, run, index))
        return fut

    def read(self, fn: Callable[[Connection], Any]) -> Future[Any]:
        """Run ``fn(connection)`` in a read-only transaction on a reader thread (no order with
        the writes queued here; on SQLite it does not wait for the writer lock)."""

        def run() -> Any:
            with read_transaction(self._engine) as conn:
                return fn(conn)

        return self._readers.submit(run)

    def call(self, fn: Callable[[Connection], Any], *, durable: bool = True) -> Future[Any]:
        """Run ``fn(connection)`` in a transaction on the worker thread.

        The transaction may be shared with other calls queued at the same time (group commit),
        and ``fn`` may be run a second time, on its own, when another call of its group failed:
        it must do nothing but database work on ``conn`` (and return what it found).

        ``durable=False``: the work may be committed without waiting for the disk (see
        :func:`~program_timer.store.db.pipelined_transaction`), for writes whose loss in a
        database crash or power cut is harmless: acks and send marks (a lost one only means a
        delivery is sent once more, as at-least-once allows). A group is committed that way
        only if all of its calls are.
        """
        fut: Future[Any] = Future()
        self._queue.put(_Call(fn, fut, durable))
        return fut

    def _run(self) -> None:
        pending: Any = None
        while True:
            item = pending if pending is not None else self._next()
            pending = None
            if item is _STOP:
                self._connections.release()
                return
            kind = type(item)
            group = [item]
            while len(group) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if type(nxt) is not kind:
                    pending = nxt
                    break
                group.append(nxt)
            # Work whose requester gave up (its deadline passed) is never applied.
            if kind is _Call:
                calls = [c for c in group if c.future.set_running_or_notify_cancel()]
                if calls:
                    self._run_calls(calls)
            else:
                commands = [c for c in group if not c.future.cancelled()]
                if commands:
                    self._run_commands(commands)

    def _next(self) -> Any:
        """The next item queued; while none comes for :data:`KEEP_IDLE` seconds, the kept
        connection goes back to the pool."""
        try:
            return self._queue.get(timeout=KEEP_IDLE)
        except queue.Empty:
            self._connections.release()
            return self._queue.get()

    def _run_calls(self, calls: list[_Call]) -> None:
        """Run the calls in one transaction, under the error policy of the module docstring."""
        durable = any(c.durable for c in calls)
        failure: Exception | None = None
        for _ in range(CONFLICT_RETRIES):
            try:
                # On PostgreSQL in one pipeline, BEGIN to COMMIT: an ack is two round trips
                # (its DELETE's answer, then the rest and the COMMIT), a refill too.
                with self._connections.pipelined_transaction(durable=durable) as conn:
                    results = [c.fn(conn) for c in calls]
                    queries.commit_in_pipeline(conn)
            except Conflict as exc:
                failure = exc
                continue
            except StoreUnavailable as exc:
                for c in calls:
                    _settle(c.future, exc=exc)
                return
            except Exception as exc:
                failure = exc
                break
            for c, result in zip(calls, results, strict=True):
                _settle(c.future, result)
            return
        if len(calls) > 1:
            for c in calls:  # only the call at fault fails
                self._run_calls([c])
            return
        if not isinstance(failure, Conflict):
            log.error("database call failed", action="call_failed", exc_info=failure)
        assert failure is not None
        _settle(calls[0].future, exc=failure)

    def _run_commands(self, group: list[_Command]) -> None:
        requests = [c.request for c in group]
        read_only = all(
            r.commandIdn in READ_ONLY_COMMANDS and r.commandActId is None for r in requests
        )
        # A group that writes runs in one pipeline on PostgreSQL, BEGIN to COMMIT: its reads
        # are one round trip, its writes and the COMMIT another. One that only reads runs its
        # queries without a transaction, one round trip each.
        kept = self._connections
        for attempt in range(CONFLICT_RETRIES):
            try:
                with (
                    kept.read_statements()
                    if read_only
                    else kept.pipelined_transaction(engine=self._command_engine)
                ) as conn:
                    outcomes = apply_batch(conn, requests, self._settings, self._clock.now())
                    queries.commit_in_pipeline(conn)
                break
            except Conflict:
                if attempt == CONFLICT_RETRIES - 1:
                    if len(group) > 1:
                        for cmd in group:  # isolate the command that keeps conflicting
                            self._run_commands([cmd])
                        return
                    outcomes = [_error("internal", "the command kept conflicting; retry it")]
                    break
            except StoreUnavailable as exc:
                outcomes = [_error("unavailable", f"the database cannot be reached: {exc}")] * len(
                    group
                )
                break
            except Exception:
                if len(group) > 1:
                    for cmd in group:  # one bad command must not fail the others
                        self._run_commands([cmd])
                    return
                log.exception("command failed", action="command_failed")
                outcomes = [_error("internal", "internal error; see the daemon's log")]
                break
        _resolve(group, outcomes)
        if self._on_committed is not None:
            self._on_committed(list(zip(requests, outcomes, strict=True)))


def _resolve(group: list[_Command], outcomes: list[Outcome]) -> None:
    """Each command's outcome into its run; the runs now complete settled, those of an event
    loop in one wake-up of it."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, list[Outcome]]]] = {}
    for cmd, outcome in zip(group, outcomes, strict=True):
        run = cmd.run
        run.outcomes[cmd.index] = outcome
        run.left -= 1
        if run.left:
            continue
        done = cast(list[Outcome], run.outcomes)
        if run.loop is None:
            _settle(run.future, done)
        else:
            by_loop.setdefault(run.loop, []).append((run.future, done))
    for loop, pairs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
            loop.call_soon_threadsafe(_set_all, pairs)


def _set_all(pairs: list[tuple[Any, list[Outcome]]]) -> None:
    for fut, outcome in pairs:
        _settle(fut, outcome)


def _settle(fut: Any, result: Any = None, exc: BaseException | None = None) -> None:
    """Complete a future unless it is done already: its waiter may have given up (a request's
    deadline, a shutdown) and cancelled it."""
    if fut.done():
        return
    with contextlib.suppress(asyncio.InvalidStateError, InvalidStateError, RuntimeError):
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


def _error(code: str, message: str) -> Outcome:
    return Outcome(error=ProtocolError(code, message))
