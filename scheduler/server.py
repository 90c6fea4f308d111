"""The Unix-socket server: frames lines, dispatches requests, writes replies in request order.

Each connection has a reader (parses and dispatches lines, at most ``max_pipeline`` unanswered
at once) and a writer (awaits each reply in turn and writes it). A client that stops reading
fills its own pipeline and is no longer read: nobody else is affected and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from scheduler.logs import get_logger
from scheduler.protocol import MAX_LINE, ProtocolError, encode, error_reply

log = get_logger()

Handler = Callable[["ClientConnection", bytes], Awaitable[dict[str, Any]]]


class ClientConnection:
    """One client: its peer credentials, its reply pipeline, and pushes (events)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
        max_pipeline: int,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.number = number
        self.closed = False
        self.pid, self.uid, self.gid = peer_credentials(writer)
        self._replies: asyncio.Queue[Awaitable[dict[str, Any]] | None] = asyncio.Queue(max_pipeline)

    def push(self, message: dict[str, Any]) -> None:
        if not self.closed:
            self.writer.write(encode(message))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.writer.close()


def peer_credentials(writer: asyncio.StreamWriter) -> tuple[int, int, int]:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        return pid, uid, gid
    except (OSError, AttributeError):
        return -1, -1, -1


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
    ) -> None:
        self._handler = handler
        self.path = path
        self._mode = mode
        self._allowed_uids = allowed_uids
        self._allowed_gids = allowed_gids
        self._max_connections = max_connections
        self._max_pipeline = max_pipeline
        self._on_disconnect = on_disconnect
        self._server: asyncio.AbstractServer | None = None
        self._owns_path = False
        self.connections: set[ClientConnection] = set()
        self._counter = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, inherited: socket.socket | None = None) -> None:
        if inherited is not None:
            inherited.setblocking(False)
            self._server = await asyncio.start_unix_server(
                self._client, sock=inherited, limit=MAX_LINE + 1
            )
            log.info("listening on the socket systemd passed", action="listening", activated=True)
            return
        claim_socket_path(self.path)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=self.path, limit=MAX_LINE + 1
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, self._mode)
        self._owns_path = True
        log.info("listening", action="listening", socket=self.path, mode=oct(self._mode))

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._owns_path = False

    async def close_all(self, grace: float = 2.0) -> None:
        for conn in list(self.connections):
            conn.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace)

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
                    "too many connections", action="connection_refused", limit=self._max_connections
                )
                await self._refuse(conn, "unavailable", "too many connections; retry later")
                return
            self.connections.add(conn)
            writer_task = asyncio.create_task(self._write_loop(conn))
            try:
                await self._read_loop(conn)
            finally:
                await conn._replies.put(None)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer_task, 5.0)
                writer_task.cancel()
        except Exception:
            log.exception("connection failed", action="connection_failed")
        finally:
            self.connections.discard(conn)
            conn.close()
            await self._on_disconnect(conn)
            self._tasks.discard(task)

    async def _refuse(self, conn: ClientConnection, code: str, message: str) -> None:
        conn.push(error_reply(None, ProtocolError(code, message)))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.writer.drain(), 1.0)
        conn.close()

    async def _read_loop(self, conn: ClientConnection) -> None:
        reader = conn.reader
        while not conn.closed:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                return  # EOF; a half-written last line is dropped
            except asyncio.LimitOverrunError:
                await conn._replies.put(
                    _ready(
                        error_reply(
                            None,
                            ProtocolError(
                                "too_large", f"a request line may be at most {MAX_LINE} bytes"
                            ),
                        )
                    )
                )
                return
            except (ConnectionError, OSError):
                return
            if not line.strip():
                continue
            await conn._replies.put(asyncio.ensure_future(self._handler(conn, line)))

    async def _write_loop(self, conn: ClientConnection) -> None:
        writer = conn.writer
        try:
            while True:
                item = await conn._replies.get()
                if item is None:
                    break
                reply = await item
                if conn.closed:
                    continue
                writer.write(encode(reply))
                if conn._replies.empty() or writer.transport.get_write_buffer_size() > 65536:
                    await writer.drain()
            if not conn.closed:
                await writer.drain()
        except (ConnectionError, OSError):
            conn.close()


def _ready(value: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


def claim_socket_path(path: str) -> None:
    """Remove a stale socket left by a crashed daemon; refuse to steal a live one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = p.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        p.unlink(missing_ok=True)  # stale: nobody listens
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise RuntimeError(f"another daemon is listening on {path}; refusing to take its socket")
