"""The one thread that runs the socket side's database work.

Commands queue here and are applied in groups: everything waiting when the thread is free (up
to ``max_batch`` commands) goes into one transaction, so a pipelining client costs one commit per
group, not per command. Other work (subscriptions, acks, delivery refills, status) is a callable;
consecutive callables are grouped the same way, each run in turn on one connection in one
transaction (a command still ends the group: order with the commands is kept). Results come back
as :class:`concurrent.futures.Future`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine

from scheduler.clock import Clock
from scheduler.commands import CommandSettings, Outcome, apply_batch
from scheduler.logs import get_logger
from scheduler.protocol import CommandRequest, ProtocolError
from store.db import health, read_modify_write, transaction
from store.errors import Conflict, StoreUnavailable

log = get_logger()


@dataclass(slots=True)
class _Command:
    request: CommandRequest
    future: Future[Outcome] | asyncio.Future[Outcome]
    loop: asyncio.AbstractEventLoop | None = None


@dataclass(slots=True)
class _Call:
    fn: Callable[[Connection], Any]
    future: Future[Any]
    durable: bool = True


_STOP = object()


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
        self._settings = settings
        self._clock = clock
        self._max_batch = max_batch
        self._on_committed = on_committed
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="store-worker", daemon=True)
        self._health = health(engine)

    @property
    def available(self) -> bool:
        """Whether the database answered last time (here or in the job store)."""
        return self._health.available

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def command(self, request: CommandRequest) -> Future[Outcome]:
        fut: Future[Outcome] = Future()
        self._queue.put(_Command(request, fut))
        return fut

    def command_async(self, request: CommandRequest) -> asyncio.Future[Outcome]:
        """Like :meth:`command`, for the event loop: the outcomes of a whole group are handed
        to the loop in one wake-up, not one per command."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome] = loop.create_future()
        self._queue.put(_Command(request, fut, loop))
        return fut

    def call(self, fn: Callable[[Connection], Any], *, durable: bool = True) -> Future[Any]:
        """Run ``fn(connection)`` in a transaction on the worker thread.

        The transaction may be shared with other calls queued at the same time (group commit),
        and ``fn`` may be run a second time, on its own, when another call of its group failed:
        it must do nothing but database work on ``conn`` (and return what it found).

        ``durable=False``: the work may be committed without waiting for the disk (see
        :func:`_relaxed_commit`), for writes whose loss in a database crash or power cut is
        harmless: acks and send marks (a lost one only means a delivery is sent once more, as
        at-least-once allows). A group is committed that way only if all of its calls are.
        """
        fut: Future[Any] = Future()
        self._queue.put(_Call(fn, fut, durable))
        return fut

    def _run(self) -> None:
        pending: Any = None
        while True:
            item = pending if pending is not None else self._queue.get()
            pending = None
            if item is _STOP:
                return
            if isinstance(item, _Call):
                calls = [item]
                while len(calls) < self._max_batch:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(nxt, _Call):
                        pending = nxt
                        break
                    calls.append(nxt)
                self._run_calls(calls)
                continue
            group = [item]
            while len(group) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(nxt, _Command):
                    pending = nxt
                    break
                group.append(nxt)
            self._run_commands(group)

    def _run_calls(self, calls: list[_Call]) -> None:
        """Run the calls in one transaction; if one of them fails (other than the database
        being unreachable), run each on its own, so that one bad call does not fail the
        others."""
        durable = any(c.durable for c in calls)
        try:
            with transaction(self._engine) as conn:
                if not durable:
                    _relaxed_commit(conn)
                results = [c.fn(conn) for c in calls]
            self._mark_available(True)
        except StoreUnavailable as exc:
            self._mark_available(False, str(exc))
            for c in calls:
                c.future.set_exception(exc)
        except BaseException as exc:
            if len(calls) > 1:
                for c in calls:
                    self._run_calls([c])
                return
            calls[0].future.set_exception(exc)
        else:
            for c, result in zip(calls, results, strict=True):
                c.future.set_result(result)

    def _run_commands(self, group: list[_Command]) -> None:
        requests = [c.request for c in group]
        for attempt in range(3):
            try:
                with transaction(self._command_engine) as conn:
                    outcomes = apply_batch(conn, requests, self._settings, self._clock.now())
                self._mark_available(True)
                break
            except Conflict:
                if attempt == 2:
                    if len(group) > 1:
                        for cmd in group:  # isolate the command that keeps conflicting
                            self._run_commands([cmd])
                        return
                    outcomes = [_error("internal", "the command kept conflicting; retry it")]
                    break
            except StoreUnavailable as exc:
                self._mark_available(False, str(exc))
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

    def _mark_available(self, ok: bool, reason: str = "") -> None:
        self._health.report(ok, reason)  # logs database_down / database_back once each


def _relaxed_commit(conn: Connection) -> None:
    """Let this transaction commit without waiting for its WAL to reach the disk.

    PostgreSQL: ``synchronous_commit = off`` for this transaction only. The commit is still
    atomic and in WAL order (a later synchronous commit, of a fire or a command, flushes it
    too); a database crash may lose the last few hundred milliseconds of such commits, and
    corrupts nothing. Losing an ack or a send mark is harmless: the delivery is sent again (at
    least once), with the attempt it had. Fire and command transactions never take this path.

    SQLite: nothing; these commits stay ``synchronous=FULL``. (``PRAGMA synchronous=NORMAL``
    would do the same there, but it is per connection and would have to be put back after the
    commit, before the pooled connection serves a fire.)
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")


def _resolve(group: list[_Command], outcomes: list[Outcome]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Outcome]]] = {}
    for cmd, outcome in zip(group, outcomes, strict=True):
        if cmd.loop is None:
            cmd.future.set_result(outcome)
        else:
            by_loop.setdefault(cmd.loop, []).append((cmd.future, outcome))
    for loop, pairs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
            loop.call_soon_threadsafe(_set_all, pairs)


def _set_all(pairs: list[tuple[Any, Outcome]]) -> None:
    for fut, outcome in pairs:
        if not fut.done():
            fut.set_result(outcome)


def _error(code: str, message: str) -> Outcome:
    return Outcome(error=ProtocolError(code, message))
