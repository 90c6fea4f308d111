"""The Unix-socket server: frames lines, dispatches requests, writes replies in request order.

Each connection has a reader (frames lines, dispatches them) and a writer (awaits each reply in
turn and writes it). Between them sits a bounded pipeline: at most ``max_pipeline`` unanswered
requests and about :data:`PIPELINE_BYTES` of request and reply bytes. A client that stops reading
fills its own pipeline and is no longer read; nobody else is affected and its memory stays bounded
(the stream buffer, one partial line, the pipeline, the transport's write buffer). A request line
that is started but not finished within :data:`LINE_TIMEOUT` seconds gets an error and the
connection is dropped (slow clients cannot pin a partial line forever); an idle connection with
no partial line is never timed out (subscribers wait for events).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final

from program_timer.core.logs import get_logger
from program_timer.scheduler.connection import (
    MIN_REPLY_ESTIMATE,
    READ_CHUNK,
    ClientConnection,
    encode_reply,
)
from program_timer.scheduler.protocol import MAX_LINE, ProtocolError, encode, error_reply
from program_timer.scheduler.socket_file import (
    FD_RESERVE,
    claim_socket_path,
    file_identity,
    raise_fd_limit,
)

log = get_logger()

Handler = Callable[["ClientConnection", list[bytes]], list[tuple[int, "asyncio.Future[Any]"]]]
"""The replies to request lines read together, in order (the daemon's
:meth:`RequestHandler.start_lines`): ``(n, future)`` for each run of ``n`` lines, the future
giving the reply (a dict) of one line, or the list of the ``n`` replies of a run."""


def per_line(answer: Callable[[ClientConnection, bytes], Awaitable[dict[str, Any]]]) -> Handler:
    """A :data:`Handler` answering each line on its own, with ``answer`` run as a task."""

    def start(conn: ClientConnection, lines: list[bytes]) -> list[tuple[int, asyncio.Future[Any]]]:
        return [(1, asyncio.ensure_future(answer(conn, line))) for line in lines]

    return start


LINE_TIMEOUT: Final = 60.0
"""Seconds a started request line may take to be finished before the connection is dropped."""
DROP_GRACE: Final = 5.0
"""Seconds to flush the last error to a dropped client before aborting its connection."""
SOCKET_CHECK: Final = 2.0
"""Seconds between two checks that the socket file is still the daemon's."""


class SocketServer:
    def __init__(
        self,
        handler: Handler,
        *,
        path: str,
        mode: int,
        allowed_uids: frozenset[int] | None,
        allowed_gids: frozenset[int] | None,
        max_connections: int,
        max_pipeline: int,
        on_disconnect: Callable[[ClientConnection], Awaitable[None]],
        line_timeout: float = LINE_TIMEOUT,
        backlog: int = 1024,
    ) -> None:
        self._handler = handler
        self.path = path
        self._mode = mode
        self._allowed_uids = allowed_uids
        self._allowed_gids = allowed_gids
        self._max_connections = max_connections
        self._max_pipeline = max_pipeline
        self._on_disconnect = on_disconnect
        self._line_timeout = line_timeout
        self._backlog = backlog
        self._server: asyncio.AbstractServer | None = None
        self._owns_path = False
        self._identity: tuple[int, int] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.connections: set[ClientConnection] = set()
        self._counter = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, inherited: socket.socket | None = None) -> None:
        raise_fd_limit(self._max_connections + FD_RESERVE)
        if inherited is not None:
            inherited.setblocking(False)
            self._server = await asyncio.start_unix_server(
                self._client, sock=inherited, limit=READ_CHUNK
            )
            log.info("listening on the socket systemd passed", action="listening", activated=True)
            return
        claim_socket_path(self.path)
        await self._listen()
        log.info("listening", action="listening", socket=self.path, mode=f"{self._mode:04o}")
        self._watch = asyncio.create_task(self._watch_path(), name="socket-watch")

    async def _listen(self) -> None:
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=self.path, limit=READ_CHUNK, backlog=self._backlog
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, self._mode)
        self._identity = file_identity(self.path)
        self._owns_path = True

    async def _watch_path(self) -> None:
        """The socket file is the daemon's only door: when it disappears (or another file takes
        its place), listen again at the same path, so that clients can reach the daemon."""
        while self._owns_path:
            await asyncio.sleep(SOCKET_CHECK)
            if not self._owns_path or file_identity(self.path) == self._identity:
                continue
            log.error(
                "the socket file disappeared; listening on a new one",
                action="socket_recreated",
                socket=self.path,
            )
            old = self._server
            try:
                claim_socket_path(self.path)
                await self._listen()
            except (OSError, RuntimeError) as exc:
                log.error(
                    "cannot listen on the socket again: restart the daemon",
                    action="socket_lost",
                    reason=str(exc),
                )
                self._owns_path = False
                return
            if old is not None:
                old.close()  # its connections stay open

    async def stop(self) -> None:
        """Stop accepting, then close every connection (their last replies are flushed)."""
        await self.stop_accepting()
        await self.close_all()

    async def stop_accepting(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._server is not None:
            self._server.close()
        if self._owns_path:
            self._owns_path = False
            if file_identity(self.path) == self._identity:  # never remove another's socket
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    async def close_all(self, grace: float = 2.0) -> None:
        for conn in list(self.connections):
            conn.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace)
        for conn in list(self.connections):
            conn.abort()  # clients that do not read their last replies

    def _allowed(self, conn: ClientConnection) -> bool:
        if self._allowed_uids is None and self._allowed_gids is None:
            return True
        if self._allowed_uids is not None and conn.uid in self._allowed_uids:
            return True
        return self._allowed_gids is not None and conn.gid in self._allowed_gids

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._counter += 1
        conn = ClientConnection(reader, writer, self._counter, self._max_pipeline)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if not self._allowed(conn):
                log.warning(
                    "peer refused",
                    action="peer_refused",
                    peer_uid=conn.uid,
                    peer_gid=conn.gid,
                    peer_pid=conn.pid,
                )
                await self._refuse(conn, "forbidden", "this user or group may not use the daemon")
                return
            if len(self.connections) >= self._max_connections:
                log.warning(
                    "too many connections",
                    action="connection_refused",
                    limit=self._max_connections,
                    peer_uid=conn.uid,
                    peer_pid=conn.pid,
                )
                await self._refuse(conn, "unavailable", "too many connections; retry later")
                return
            self.connections.add(conn)
            writer_task = asyncio.create_task(self._write_loop(conn))
            dropped = False
            try:
                dropped = await self._read_loop(conn)
            finally:
                conn.reading_done = True
                conn.work.set()
                if dropped:
                    # Flush the error that says why, but do not wait on a client that does
                    # not read.
                    done, _ = await asyncio.wait({writer_task}, timeout=DROP_GRACE)
                    if not done:
                        conn.abort()
                # Otherwise the client closed its sending side: its replies are still written
                # (as long as it reads them; its leaving ends the writer).
                await writer_task
        except Exception:
            log.exception("connection failed", action="connection_failed")
        finally:
            self.connections.discard(conn)
            conn.close()
            await self._on_disconnect(conn)
            self._tasks.discard(task)

    async def _refuse(self, conn: ClientConnection, code: str, message: str) -> None:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            conn.writer.write(encode(error_reply(None, ProtocolError(code, message))))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.writer.drain(), 1.0)
        conn.close()

    async def _read_loop(self, conn: ClientConnection) -> bool:
        """Frame and dispatch lines until EOF; True when the client is dropped for a bad line."""
        reader = conn.reader
        loop = asyncio.get_running_loop()
        buf = bytearray()
        deadline = 0.0  # when the partial line in buf must be finished
        while not conn.closed:
            try:
                if buf:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise TimeoutError
                    chunk = await asyncio.wait_for(reader.read(READ_CHUNK), left)
                else:
                    chunk = await reader.read(READ_CHUNK)
            except TimeoutError:
                log.warning(
                    "dropping a client that did not finish its request line",
                    action="slow_client_dropped",
                    connection=conn.number,
                    peer_uid=conn.uid,
                    peer_pid=conn.pid,
                    partial_bytes=len(buf),
                )
                self._dispatch_error(
                    conn,
                    "invalid_request",
                    f"a request line must be finished within {self._line_timeout:g} s; closing",
                )
                return True
            except (ConnectionError, OSError):
                return False
            if not chunk:
                return False  # EOF; a half-written last line is dropped
            if not buf:
                deadline = loop.time() + self._line_timeout
            scan = len(buf)
            buf += chunk
            start = 0
            lines: list[bytes] = []  # read, not dispatched yet: dispatched together
            while (end := buf.find(b"\n", scan)) >= 0:
                if end - start > MAX_LINE:
                    self._dispatch(conn, lines)
                    return await self._too_large(conn)
                line = bytes(buf[start : end + 1])
                start = scan = end + 1
                if not line.strip():
                    continue
                if conn.full():
                    self._dispatch(conn, lines)  # they make room as they are answered
                    lines = []
                    if not await self._wait_for_room(conn):
                        return False
                conn.requests += 1
                conn.unanswered += 1
                conn.pending_bytes += len(line)
                lines.append(line)
            self._dispatch(conn, lines)
            if start:
                del buf[:start]
                deadline = loop.time() + self._line_timeout  # a new line starts now
            if len(buf) > MAX_LINE:
                return await self._too_large(conn)
        return False

    async def _too_large(self, conn: ClientConnection) -> bool:
        log.info("request line too long", action="line_too_large", connection=conn.number)
        self._dispatch_error(conn, "too_large", f"a request line may be at most {MAX_LINE} bytes")
        return True

    async def _wait_for_room(self, conn: ClientConnection) -> bool:
        while conn.full():
            if conn.closed:
                return False
            conn.room.clear()
            await conn.room.wait()
        return not conn.closed

    def _dispatch(self, conn: ClientConnection, lines: list[bytes]) -> None:
        """Hand lines (counted in the pipeline already) to the handler; each run of them takes
        one place in the pipeline, its replies written together in request order."""
        if not lines:
            return
        loop = asyncio.get_running_loop()
        at = 0
        for n, answer in self._handler(conn, lines):
            size = sum(len(line) for line in lines[at : at + n]) if n > 1 else len(lines[at])
            at += n
            reply = loop.create_future()
            answer.add_done_callback(functools.partial(self._answered, conn, n, size, reply))
            conn.pending.append(reply)
            conn.pending_requests.append(n)
        conn.work.set()

    def _dispatch_error(self, conn: ClientConnection, code: str, message: str) -> None:
        """Queue the last reply of a dropped client (beyond the pipeline's bounds: one line)."""
        if conn.closed:
            return
        data = encode(error_reply(None, ProtocolError(code, message)))
        conn.pending_bytes += len(data)
        conn.pending.append(data)
        conn.pending_requests.append(0)
        conn.work.set()

    def _answered(
        self,
        conn: ClientConnection,
        n: int,
        size: int,
        reply: asyncio.Future[bytes],
        answer: asyncio.Future[Any],
    ) -> None:
        """The answer to ``n`` lines of ``size`` bytes came: their reply lines, at their place
        in the pipeline, and the writer is told (it waits for the reply at its head)."""
        conn.unanswered -= n
        if answer.cancelled():
            reply.cancel()  # the daemon is stopping
        else:
            exc = answer.exception()
            if exc is not None:  # the handler answers every failure: this is a bug
                log.error("request failed", action="request_failed", exc_info=exc)
                failed = error_reply(None, ProtocolError("internal", "internal error; see the log"))
                messages = [failed] * n
            else:
                result = answer.result()
                messages = result if isinstance(result, list) else [result]
            estimate = conn.reply_estimate
            parts = []
            for message in messages:
                part = encode_reply(message)
                estimate = max(len(part), MIN_REPLY_ESTIMATE, estimate * 15 // 16)
                parts.append(part)
            data = parts[0] if n == 1 else b"".join(parts)
            conn.pending_bytes += len(data) - size
            conn.reply_estimate = estimate
            reply.set_result(data)
        conn.wake()

    async def _write_loop(self, conn: ClientConnection) -> None:
        """Write replies in request order as they are computed, and pushes as they come (not
        behind a reply still being computed); wait on ``conn.work``, set by the reader, by
        every reply computed and by every push."""
        writer = conn.writer
        pending, pushes = conn.pending, conn.pushes
        try:
            while not conn.closed:
                # Everything ready goes out in one write: one system call, not one per event
                # or reply (a fire batch pushes up to a thousand events at once).
                ready: list[bytes] = []
                while pushes:
                    ready.append(pushes.popleft())
                while pending and (isinstance(pending[0], bytes) or pending[0].done()):
                    head = pending.popleft()
                    conn.requests -= conn.pending_requests.popleft()
                    ready.append(head if isinstance(head, bytes) else head.result())
                if ready:
                    data = ready[0] if len(ready) == 1 else b"".join(ready)
                    wrote = len(data)
                    writer.write(data)
                    conn.pending_bytes -= wrote
                    conn.room.set()
                    if not pending or writer.transport.get_write_buffer_size() > READ_CHUNK:
                        await writer.drain()
                    continue
                if not pending and conn.reading_done:
                    await writer.drain()
                    break
                conn.work.clear()
                if pushes or (pending and (isinstance(pending[0], bytes) or pending[0].done())):
                    continue  # came while we looked
                await conn.work.wait()
        except (ConnectionError, OSError, RuntimeError):  # uvloop: RuntimeError, transport closed
            pass
        finally:
            # The client is gone or done: stop its reader too (it may wait for room).
            conn.close()
