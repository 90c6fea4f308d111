"""One client connection: its peer credentials, its pipeline of replies and pushed events in
order, and the byte budget that bounds what it holds (see :mod:`.server`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from typing import Any, Final

from program_timer.core.logs import get_logger
from program_timer.scheduler.protocol import ProtocolError, encode, error_reply

log = get_logger()


READ_CHUNK: Final = 64 * 1024
"""Bytes read from a connection at a time; the stream pauses the socket at twice this."""
PIPELINE_BYTES: Final = 2 * 1024 * 1024
"""Unanswered request bytes plus unwritten reply and event bytes a connection may hold (beyond
one)."""
INITIAL_REPLY_ESTIMATE: Final = PIPELINE_BYTES // 16
MIN_REPLY_ESTIMATE: Final = 256


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
        self.max_pipeline = max_pipeline
        # The pipeline: replies (futures) in request order, pushed events (their bytes), and
        # the bytes both hold. Pushes do not wait behind replies still being computed (an ack
        # waiting for its write, a command for its transaction): a push may come between any
        # two replies (docs/protocol.md).
        self.pending: deque[asyncio.Future[bytes] | bytes] = deque()
        # How many requests each place in ``pending`` answers (a run of commands: several),
        # and how many requests are read and not yet answered in writing.
        self.pending_requests: deque[int] = deque()
        self.requests = 0
        self.pushes: deque[bytes] = deque()
        self.pending_bytes = 0
        # Requests whose reply is not computed yet hold no bytes, but will: each is counted
        # at an estimate of the reply size that starts high (a new connection has 16 requests
        # in flight) and follows the replies seen: it jumps to a large one at once and decays
        # towards small ones, so a client pipelining thousands of small requests with
        # megabyte replies is admitted a few at a time, and one sending small commands soon
        # has its whole pipeline.
        self.unanswered = 0
        self.reply_estimate = INITIAL_REPLY_ESTIMATE
        self.reading_done = False
        self.room = asyncio.Event()  # set by the writer when it frees pipeline space
        self.work = asyncio.Event()  # set by the reader when it adds to the pipeline

    def push(self, data: bytes) -> None:
        """Queue lines the client did not ask for (events, each a line of JSON): written as
        soon as the writer runs, before replies not computed yet; they count in the
        connection's byte budget like a reply."""
        if not self.closed:
            self.pushes.append(data)
            self.pending_bytes += len(data)
            self.work.set()

    @property
    def backlogged(self) -> bool:
        """The client is not reading what it was sent: push nothing more for now."""
        return self.pending_bytes >= PIPELINE_BYTES

    def wake(self, _reply: object = None) -> None:
        """Tell the writer there may be something to write (a reply computed, a push)."""
        self.work.set()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.writer.close()
        self.room.set()
        self.work.set()

    def abort(self) -> None:
        """Close now, dropping whatever the client did not read."""
        self.close()
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    def full(self) -> bool:
        if not self.requests and not self.pushes:
            return False
        expected = self.pending_bytes + self.unanswered * self.reply_estimate
        return self.requests >= self.max_pipeline or expected >= PIPELINE_BYTES


def peer_credentials(writer: asyncio.StreamWriter) -> tuple[int, int, int]:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        return pid, uid, gid
    except (OSError, AttributeError):
        return -1, -1, -1


def encode_reply(reply: dict[str, Any]) -> bytes:
    """The reply's line; an internal error (same id if possible) when it cannot be encoded."""
    try:
        return encode(reply)
    except (ValueError, TypeError) as exc:  # UnicodeEncodeError: a lone surrogate from "\ud800"
        log.warning("a reply could not be encoded", action="reply_unencodable", error=str(exc))
        err = ProtocolError(
            "internal",
            "the reply could not be encoded as UTF-8 JSON (does the request hold a lone "
            "surrogate escape such as \\ud800?)",
        )
        try:
            return encode(error_reply(reply.get("id"), err))
        except (ValueError, TypeError):
            return encode(error_reply(None, err))
