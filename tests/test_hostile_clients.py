"""Hostile and broken clients through the real socket (SPEC 6, "Bad input"): malformed lines,
deep nesting, NUL bytes, invalid UTF-8, half-written lines, huge lines, clients that never read,
slow clients, thousands of connections, argument limits, and a fuzz. After each, the daemon is
alive and another client is served. These mechanics do not depend on the database: SQLite only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import select
import selectors
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from program_timer.events.client import ConnectionLost
from program_timer.scheduler.protocol import (
    ERROR_CODES,
    MAX_LINE,
    ok_reply,
)
from program_timer.scheduler.server import SocketServer, per_line
from tests.daemon_proc import DaemonProcess, running, short_tmpdir, wait_for


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """Overrides the conftest's backend parametrization: these tests are SQLite only."""
    return sqlite_url


@pytest.fixture(scope="module")
def shared() -> Iterator[DaemonProcess]:
    """One daemon for the cheap checks of this module (each check uses fresh connections)."""
    folder = short_tmpdir()
    try:
        with running(f"sqlite:///{folder / 'shared.db'}") as d:
            yield d
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- helpers ------------------------------------------------------------------------------


def _raw(d: DaemonProcess | str, timeout: float = 20) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Blocking connect: with a timeout set, an AF_UNIX connect fails with EAGAIN instead of
    # waiting while the listen backlog is momentarily full.
    s.connect(d if isinstance(d, str) else d.socket)
    s.settimeout(timeout)
    return s


class _Lines:
    """Reads reply lines from a raw socket; ``None`` at EOF (or a reset after the last line)."""

    def __init__(self, s: socket.socket) -> None:
        self.s = s
        self.buf = b""

    def next(self) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            try:
                chunk = self.s.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message


def _reply(s: socket.socket) -> dict[str, Any] | None:
    return _Lines(s).next()


def _cmd(rid: object, command: str = "set_timer", /, **args: object) -> bytes:
    return (
        json.dumps(
            {
                "op": "command",
                "id": rid,
                "commandIdn": command,
                "integrationIdn": "program_timer",
                "connectorIdn": "my_timer",
                "arguments": args,
            }
        ).encode()
        + b"\n"
    )


def _connections(d: DaemonProcess) -> int:
    """Connections the daemon holds, counting the asking client; -1 while the daemon is still
    at its connection limit (it refuses the asking client: closed connections not yet torn
    down still count)."""
    try:
        with d.client(timeout=10) as c:
            return int(c.status()["connections"])
    except ConnectionLost:
        return -1


def _assert_alive(d: DaemonProcess) -> None:
    """The daemon process runs and a fresh client is served promptly."""
    assert d.proc is not None and d.proc.poll() is None, d.log()
    t0 = time.monotonic()
    with d.client(timeout=10) as c:
        assert c.request("ping") == {"pong": True}
    assert time.monotonic() - t0 < 5


def _log_records(d: DaemonProcess) -> list[dict[str, Any]]:
    out = []
    for line in d.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out


# --- bad lines ----------------------------------------------------------------------------

DEEP = 100_000  # nesting levels, well within 1 MiB

BAD_LINES: list[tuple[str, bytes, str, str | None]] = [
    ("truncated object", b'{"op": "ping", "id": 1\n', "invalid_json", None),
    ("bare word", b"ping\n", "invalid_json", None),
    ("trailing garbage", b'{"op":"ping"} {"op":"ping"}\n', "invalid_json", None),
    ("string", b'"just a string"\n', "invalid_request", None),
    ("null", b"null\n", "invalid_request", None),
    ("number", b"123\n", "invalid_request", None),
    ("op is a number", b'{"op": 5, "id": 1}\n', "unknown_op", "op"),
    ("op is a list", b'{"op": ["ping"], "id": 1}\n', "unknown_op", "op"),
    ("op wrong case", b'{"op": "PING", "id": 1}\n', "unknown_op", "op"),
    ("op empty", b'{"op": "", "id": 1}\n', "unknown_op", "op"),
    ("op dunder", b'{"op": "__class__", "id": 1}\n', "unknown_op", "op"),
    ("id is an object", b'{"op": "ping", "id": {"a": 1}}\n', "invalid_request", "id"),
    (
        "arguments is a list",
        _cmd(1).replace(b'"arguments": {}', b'"arguments": [1, 2]'),
        "invalid_request",
        "arguments",
    ),
    ("argument is a list", _cmd(1, personaId="p", timerName="t", x=[[1]]), "invalid_argument", "x"),
    ("argument is null", _cmd(1, personaId="p", timerName="t", x=None), "invalid_argument", "x"),
    (
        "deliveryIds hold a string",
        b'{"op":"ack","id":1,"deliveryIds":[1,"2"]}\n',
        "invalid_request",
        "deliveryIds.1",
    ),
    (
        "filter is a string",
        b'{"op":"subscribe","id":1,"subscriptionId":"s","filter":"x"}\n',
        "invalid_request",
        "filter",
    ),
    (
        "empty subscription id",
        b'{"op":"subscribe","id":1,"subscriptionId":""}\n',
        "invalid_request",
        "subscriptionId",
    ),
    ("deep arrays", b"[" * DEEP + b"]" * DEEP + b"\n", "invalid_json", None),
    ("deep objects", b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"\n", "invalid_json", None),
    (
        "deep inside a request",
        b'{"op":"ping","id":1,"x":' + b"[" * DEEP + b"]" * DEEP + b"}\n",
        "invalid_json",
        None,
    ),
    (
        "deep but parseable argument",
        _cmd(1, personaId="p", timerName="t").replace(
            b"}}", b', "x": ' + b"[" * 500 + b"]" * 500 + b"}}"
        ),
        "invalid_argument",
        "x",
    ),
    ("NUL after the object", b'{"op":"ping","id":1}\x00\n', "invalid_json", None),
    ("only NULs", b"\x00\x00\x00\x00\n", "invalid_json", None),
    ("raw NUL inside a string", b'{"op":"ping","id":"a\x00b"}\n', "invalid_json", None),
    ("invalid UTF-8", b'{"op":"ping","id":"\xff\xfe"}\n', "invalid_json", None),
    ("overlong UTF-8", b'{"op":"ping","id":"\xc0\xaf"}\n', "invalid_json", None),
    ("truncated UTF-8", b'{"op":"ping","id":"\xe2\x82"}\n', "invalid_json", None),
    ("huge integer", b'{"op":"ping","id":' + b"9" * 5000 + b"}\n", "invalid_json", None),
    ("huge op name", json.dumps({"op": "x" * 500_000}).encode() + b"\n", "unknown_op", "op"),
]


def test_bad_lines_get_a_clear_error_and_nobody_else_is_affected(shared: DaemonProcess) -> None:
    with _raw(shared) as bystander:
        bystander.sendall(b'{"op":"ping","id":')  # a bystander mid-line meanwhile
        for name, payload, code, field in BAD_LINES:
            with _raw(shared) as s:
                s.sendall(payload)
                reply = _reply(s)
                assert reply is not None, name
                assert reply["ok"] is False, (name, reply)
                assert reply["error"]["code"] == code, (name, reply)
                assert reply["error"].get("field") == field, (name, reply)
                assert reply["error"]["message"], name
                # the same connection still works after a bad line
                s.sendall(b'{"op":"ping","id":"after"}\n')
                assert _reply(s) == {"id": "after", "ok": True, "result": {"pong": True}}, name
        bystander.sendall(b'"b"}\n')
        assert _reply(bystander) == {"id": "b", "ok": True, "result": {"pong": True}}
    _assert_alive(shared)


def test_escaped_nul_crlf_and_blank_lines_are_fine(shared: DaemonProcess) -> None:
    with _raw(shared) as s:
        lines = _Lines(s)
        s.sendall(b'{"op":"ping","id":"a\\u0000b"}\n')
        assert lines.next() == {"id": "a\x00b", "ok": True, "result": {"pong": True}}
        s.sendall(b'{"op":"ping","id":"crlf"}\r\n')
        assert lines.next() == {"id": "crlf", "ok": True, "result": {"pong": True}}
        s.sendall(b"\n  \n\t\r\n" + b'{"op":"ping","id":"after blanks"}\n')
        assert lines.next() == {"id": "after blanks", "ok": True, "result": {"pong": True}}


def test_lone_surrogate_gets_an_error_and_the_connection_goes_on(shared: DaemonProcess) -> None:
    """JSON lets ``"\\ud800"`` through but it cannot be written back as UTF-8: before the server
    guarded its encoder this killed the connection's writer and the client hung forever."""
    with _raw(shared, timeout=10) as s:
        lines = _Lines(s)
        for payload in (
            b'{"op":"ping","id":"\\ud800"}\n',
            b'{"op":"ping","id":"\xed\xa0\x80"}\n',  # UTF-8 encoded surrogate; json lets it pass
            _cmd(1, personaId="\ud800", timerName="t", interval="60"),
        ):
            s.sendall(payload)
            reply = lines.next()
            assert reply is not None and reply["ok"] is False, reply
            assert reply["error"]["code"] in ("internal", "invalid_json", "invalid_argument")
            s.sendall(b'{"op":"ping","id":"next"}\n')
            assert lines.next() == {"id": "next", "ok": True, "result": {"pong": True}}
    _assert_alive(shared)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"op":"ping","id":NaN}\n',
        b'{"op":"ping","id":-Infinity}\n',
        b'{"op":"ping","id":"\\udc00"}\n',
        b'{"op":"ping","id":"\xed\xa0\x80"}\n',
    ],
    ids=["NaN", "Infinity", "escaped lone surrogate", "UTF-8 encoded surrogate"],
)
def test_non_json_constants_and_lone_surrogates_are_invalid_json(
    shared: DaemonProcess, payload: bytes
) -> None:
    with _raw(shared, timeout=10) as s:
        s.sendall(payload)
        line = s.recv(1 << 16).split(b"\n")[0]
    reply = json.loads(line, parse_constant=lambda c: pytest.fail(f"reply holds {c}"))
    assert reply["error"]["code"] == "invalid_json"


# --- lines that end a connection ----------------------------------------------------------


def test_half_written_line_then_disconnect_is_dropped(shared: DaemonProcess) -> None:
    before = _connections(shared)
    with _raw(shared) as s:
        full = _cmd("half", personaId="half", timerName="t", interval="60")
        s.sendall(full[: len(full) // 2])
    wait_for(lambda: _connections(shared) == before, timeout=10)
    with shared.client() as c, pytest.raises(Exception, match="not_found"):
        c.command("get_timer", "my_timer", personaId="half", timerName="t")
    _assert_alive(shared)


def test_a_line_over_one_mib_without_newline_is_too_large_and_closed(
    shared: DaemonProcess,
) -> None:
    with _raw(shared) as s:
        lines = _Lines(s)
        s.sendall(b'{"op":"ping","id":1}\n')
        assert lines.next() == {"id": 1, "ok": True, "result": {"pong": True}}
        chunk = b"x" * (256 * 1024)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(MAX_LINE // len(chunk) + 4):  # 2 MiB, no newline at all
                s.sendall(chunk)
        reply = lines.next()
        assert reply is not None and reply["error"]["code"] == "too_large"
        assert str(MAX_LINE) in reply["error"]["message"]
        assert lines.next() is None  # and the connection is closed
    _assert_alive(shared)


def test_client_vanishing_with_replies_pending(shared: DaemonProcess) -> None:
    before = _connections(shared)
    for _ in range(5):
        with _raw(shared) as s:
            s.sendall(b"".join(b'{"op":"ping","id":%d}\n' % i for i in range(2000)))
            s.sendall(b'{"op":"status","id":"x"}\n')
    wait_for(lambda: _connections(shared) == before, timeout=15)
    _assert_alive(shared)


# --- clients that never read --------------------------------------------------------------


def _flood(
    path: str, make_chunk: Any, budget: int, stall: float = 2.0
) -> tuple[socket.socket, int, int]:
    """Send pipelined requests without reading until the daemon stops reading (no progress for
    ``stall`` s) or ``budget`` bytes went out. Returns the socket, bytes sent, whole lines sent."""
    s = _raw(path)
    s.setblocking(False)
    sent = lines = 0
    pending = b""
    last_progress = time.monotonic()
    while sent < budget and time.monotonic() - last_progress < stall:
        if not pending:
            pending = make_chunk()
        try:
            n = s.send(pending)
        except BlockingIOError:
            select.select([], [s], [], 0.05)
            continue
        lines += pending[:n].count(b"\n")
        pending = pending[n:]
        sent += n
        last_progress = time.monotonic()
    s.setblocking(True)
    s.settimeout(20)
    return s, sent, lines


def _ping_chunks() -> Any:
    counter = iter(range(10**9))

    def chunk() -> bytes:
        return b"".join(b'{"op":"ping","id":%d}\n' % next(counter) for _ in range(10_000))

    return chunk


BIG_ARGS = {f"blob{i}": "x" * 60_000 for i in range(16)}


def _big_reply_chunks() -> Any:
    # small get_timer lines whose replies carry ~1 MB of the timer's extra arguments
    line = (
        json.dumps(
            {
                "op": "command",
                "commandIdn": "get_timer",
                "integrationIdn": "program_timer",
                "connectorIdn": "my_timer",
                "arguments": {"personaId": "big", "timerName": "big"},
            }
        ).encode()
        + b"\n"
    )
    return lambda: line * 100


def _served_meanwhile(d: DaemonProcess) -> float:
    """A bystander's round trips; returns the slowest one in seconds."""
    worst = 0.0
    with d.client(timeout=10) as c:
        for i in range(20):
            t0 = time.monotonic()
            if i % 2:
                assert c.request("ping") == {"pong": True}
            else:
                c.command(
                    "set_timer",
                    "my_timer",
                    personaId="bystander",
                    timerName=f"t{i}",
                    interval="3600",
                )
            worst = max(worst, time.monotonic() - t0)
        assert c.status()["timers"]["scheduled"] >= 10
    return worst


FLOOD = 50 * 1024 * 1024


@pytest.mark.parametrize("kind", ["pings", "big_replies"])
def test_non_reading_client_is_no_longer_read_and_memory_stays_bounded(
    daemon_factory: Any, kind: str
) -> None:
    # big_replies: timers may carry ~1 MB of arguments here, so each get_timer reply is ~1 MB
    d: DaemonProcess = daemon_factory(PROGRAM_TIMER_MAX_ARGUMENTS_SIZE=2_000_000).start()
    proc = psutil.Process(d.proc.pid)  # type: ignore[union-attr]
    _served_meanwhile(d)  # warm up
    with d.client() as c:
        c.command(
            "set_timer", "my_timer", personaId="big", timerName="big", interval="3600", **BIG_ARGS
        )
    rss_before = proc.memory_info().rss
    make = _ping_chunks() if kind == "pings" else _big_reply_chunks()
    s, sent, lines_sent = _flood(d.socket, make, FLOOD)
    try:
        rss_after = proc.memory_info().rss
        growth = rss_after - rss_before
        worst = _served_meanwhile(d)
        print(
            f"\n[{kind}] non-reading client: daemon took {sent / 1e6:.2f} MB "
            f"({lines_sent} lines) of {FLOOD / 1e6:.0f} MB offered, then stopped reading; "
            f"RSS {rss_before / 1e6:.1f} -> {rss_after / 1e6:.1f} MB "
            f"(+{growth / 1e6:.1f} MB); bystander's slowest round trip {worst * 1000:.0f} ms"
        )
        assert sent < 20 * 1024 * 1024, "the daemon kept reading from a client that never reads"
        assert growth < 40 * 1024 * 1024, f"RSS grew {growth / 1e6:.1f} MB"
        assert worst < 2.0
        # Nothing was lost: once the client reads, every whole line it sent is answered in order.
        reader = _Lines(s)
        for i in range(lines_sent):
            reply = reader.next()
            assert reply is not None, f"reply {i} of {lines_sent} missing"
            if kind == "pings":
                assert reply == {"id": i, "ok": True, "result": {"pong": True}}
            else:
                assert reply["ok"] and reply["result"]["timer"]["arguments"] == BIG_ARGS
    finally:
        s.close()
    wait_for(lambda: _connections(d) == 1, timeout=15)
    _assert_alive(d)


def test_non_reading_client_that_leaves_frees_its_connection(shared: DaemonProcess) -> None:
    """A client whose pipeline is full and which then disconnects must not hold a connection
    slot forever (the reader used to wait on the full pipeline after the writer had died)."""
    before = _connections(shared)
    for _ in range(3):
        s, _sent, _lines = _flood(shared.socket, _ping_chunks(), 8 * 1024 * 1024, stall=1.0)
        s.close()
    wait_for(lambda: _connections(shared) == before, timeout=15)
    _assert_alive(shared)


# --- slow clients -------------------------------------------------------------------------


def test_slow_loris_does_not_block_others(shared: DaemonProcess) -> None:
    stalled = []
    try:
        for i in range(200):
            s = _raw(shared)
            s.sendall(b'{"op":"ping","id":"slow%d"' % i)  # started, never finished (yet)
            stalled.append(s)
        assert _served_meanwhile(shared) < 2.0
        # a client trickling one byte at a time does not hold anyone up either
        trickle = _raw(shared)
        stalled.append(trickle)
        line = b'{"op":"ping","id":"trickle"}\n'

        def dribble() -> None:
            for b in line:
                trickle.sendall(bytes([b]))
                time.sleep(0.01)

        t = threading.Thread(target=dribble)
        t.start()
        assert _served_meanwhile(shared) < 2.0
        t.join()
        assert _reply(trickle) == {"id": "trickle", "ok": True, "result": {"pong": True}}
        # the stalled clients finish their lines and are answered
        for i, s in enumerate(stalled[:-1]):
            s.sendall(b"}\n")
            assert _reply(s) == {"id": f"slow{i}", "ok": True, "result": {"pong": True}}
    finally:
        for s in stalled:
            s.close()
    _assert_alive(shared)


class _InProcessServer:
    """The real SocketServer on a real socket, in a thread, with a short line timeout."""

    def __init__(self, line_timeout: float) -> None:
        self.folder = short_tmpdir()
        self.path = str(self.folder / "s.sock")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def handler(conn: Any, line: bytes) -> dict[str, Any]:
            return ok_reply(json.loads(line).get("id"), {"pong": True})

        async def gone(conn: Any) -> None:
            return None

        self.server = SocketServer(
            per_line(handler),
            path=self.path,
            mode=0o600,
            allowed_uids=None,
            allowed_gids=None,
            max_connections=10,
            max_pipeline=10,
            on_disconnect=gone,
            line_timeout=line_timeout,
        )
        self._run(self.server.start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self._run(self.server.stop_accepting())
        self._run(self.server.close_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def quick_timeout_server() -> Iterator[_InProcessServer]:
    srv = _InProcessServer(line_timeout=0.5)
    try:
        yield srv
    finally:
        srv.close()


def test_an_unfinished_line_times_out_but_idle_connections_do_not(
    quick_timeout_server: _InProcessServer,
) -> None:
    path = quick_timeout_server.path
    with _raw(path) as idle, _raw(path) as slow, _raw(path) as trickle, _raw(path) as steady:
        slow.sendall(b'{"op":"ping","id":')
        t0 = time.monotonic()
        reply = _reply(slow)
        assert reply is not None and reply["error"]["code"] == "invalid_request"
        assert "finished within 0.5 s" in reply["error"]["message"]
        assert 0.4 < time.monotonic() - t0 < 5
        assert _Lines(slow).next() is None  # dropped
        # a client still sending bytes of the same line is dropped too: the limit is per line
        trickle.settimeout(0.1)
        t0 = time.monotonic()
        got = b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - t0 < 5 and b"\n" not in got:
                trickle.sendall(b" ")
                with contextlib.suppress(TimeoutError):
                    got += trickle.recv(1 << 16)
        # the daemon closed: a send may fail first (EPIPE), but its error reply is still queued
        trickle.settimeout(2)
        with contextlib.suppress(OSError):
            while b"\n" not in got and (chunk := trickle.recv(1 << 16)):
                got += chunk
        assert b"finished within" in got
        # lines each finished in time are fine, however long the connection lives
        lines = _Lines(steady)
        for i in range(4):
            steady.sendall(b'{"op":"ping",')
            time.sleep(0.3)
            steady.sendall(b'"id":%d}\n' % i)
            assert lines.next() == {"id": i, "ok": True, "result": {"pong": True}}
        # an idle connection (no partial line) is never timed out: subscribers wait for events
        idle.sendall(b'{"op":"ping","id":"idle"}\n')
        assert _reply(idle) == {"id": "idle", "ok": True, "result": {"pong": True}}


# --- many connections ---------------------------------------------------------------------

N_CONNECTIONS = 2000
MAX_CONNECTIONS = 1500


@contextlib.contextmanager
def _nofile(soft: int) -> Iterator[None]:
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def test_thousands_of_connections(daemon_factory: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = N_CONNECTIONS + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    d: DaemonProcess = daemon_factory(PROGRAM_TIMER_MAX_CONNECTIONS=MAX_CONNECTIONS)
    # Start the daemon with the usual soft limit of 1024: it must raise its own.
    with _nofile(1024):
        d.start()
    daemon_soft, _ = psutil.Process(d.proc.pid).rlimit(psutil.RLIMIT_NOFILE)  # type: ignore[union-attr]
    assert daemon_soft >= MAX_CONNECTIONS + 100, daemon_soft
    assert any(r.get("action") == "fd_limit_raised" for r in _log_records(d))

    socks: list[socket.socket] = []
    with _nofile(max(soft, need) if hard == resource.RLIM_INFINITY else min(hard, max(soft, need))):
        try:
            t0 = time.monotonic()
            for _ in range(N_CONNECTIONS):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                socks.append(s)
                s.connect(d.socket)  # blocking: waits while the listen backlog is full
                s.settimeout(20)
            connect_time = time.monotonic() - t0
            # Those over the limit are told so, unasked, and closed.
            sel = selectors.DefaultSelector()
            for i, s in enumerate(socks):
                sel.register(s, selectors.EVENT_READ, i)
            refused: set[int] = set()
            deadline = time.monotonic() + 30
            while len(refused) < N_CONNECTIONS - MAX_CONNECTIONS and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=1):
                    i = key.data
                    sel.unregister(socks[i])
                    lines = _Lines(socks[i])
                    reply = lines.next()
                    assert reply is not None, i
                    assert reply["ok"] is False and reply["error"]["code"] == "unavailable"
                    assert "too many connections" in reply["error"]["message"]
                    assert lines.next() is None  # closed
                    refused.add(i)
            sel.close()
            assert len(refused) == N_CONNECTIONS - MAX_CONNECTIONS
            # The others are all served.
            served = [s for i, s in enumerate(socks) if i not in refused]
            for i, s in enumerate(served):
                s.sendall(b'{"op":"ping","id":%d}\n' % i)
            for i, s in enumerate(served):
                assert _reply(s) == {"id": i, "ok": True, "result": {"pong": True}}
            # One more is refused while they are all there.
            with _raw(d) as extra:
                reply = _reply(extra)
                assert reply is not None and reply["error"]["code"] == "unavailable"
            assert d.proc.poll() is None  # type: ignore[union-attr]
        finally:
            for s in socks:
                s.close()
    print(
        f"\n{N_CONNECTIONS} connections in {connect_time:.2f} s, "
        f"{len(refused)} refused, daemon soft RLIMIT_NOFILE {daemon_soft}"
    )
    # Every connection over the limit was refused, and logged, once.
    refusals = [r for r in _log_records(d) if r.get("action") == "connection_refused"]
    assert len(refusals) == N_CONNECTIONS - MAX_CONNECTIONS + 1
    # After they close, a fresh client is served and nothing is left over (asking while the
    # daemon still tears them down may itself be refused: _connections reads that as not yet).
    wait_for(lambda: _connections(d) == 1, timeout=30)
    _assert_alive(d)


# --- argument limits ----------------------------------------------------------------------


def test_argument_count_and_size_limits_are_configurable(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory(
        PROGRAM_TIMER_MAX_ARGUMENTS=4, PROGRAM_TIMER_MAX_ARGUMENT_LENGTH=16
    ).start()
    base = {"personaId": "p", "timerName": "t", "interval": "60"}
    with _raw(d) as s:
        lines = _Lines(s)

        def send(**args: object) -> dict[str, Any]:
            s.sendall(_cmd("x", **args))
            reply = lines.next()
            assert reply is not None
            return reply

        assert send(**base, note="a" * 16)["ok"] is True  # 4 arguments, 16 characters
        r = send(**base, note="a", more="b")
        assert r["error"]["code"] == "invalid_argument" and r["error"]["field"] == "arguments"
        assert "5 given, at most 4" in r["error"]["message"]
        r = send(**base, note="a" * 17)
        assert r["error"]["code"] == "invalid_argument" and r["error"]["field"] == "note"
        assert r["error"]["message"].startswith("note:") and "at most 16" in r["error"]["message"]
        r = send(**{**base, "personaId": "p" * 17})
        assert r["error"]["field"] == "personaId"
        r = send(**base, count=12345678901234567)  # the limit applies to the string form
        assert r["error"]["code"] == "invalid_argument" and r["error"]["field"] == "count"
    with d.client() as c:
        timer = c.command("get_timer", "my_timer", personaId="p", timerName="t")["timer"]
    assert timer["arguments"] == {"note": "a" * 16}  # the refused ones changed nothing


def test_default_argument_limits(shared: DaemonProcess) -> None:
    base = {"personaId": "lim", "timerName": "t", "interval": "60"}
    with _raw(shared) as s:
        lines = _Lines(s)
        s.sendall(_cmd(1, **base, **{f"a{i}": "x" for i in range(62)}))  # 65 arguments
        r = lines.next()
        assert r is not None and r["error"]["field"] == "arguments"
        s.sendall(_cmd(2, **base, big="y" * 65537))
        r = lines.next()
        assert r is not None and r["error"]["field"] == "big"
        s.sendall(_cmd(3, **base, **{f"a{i}": "x" for i in range(60)}, big="y" * 65536))  # 64
        r = lines.next()
        assert r is not None and r["ok"] is True, r
        # all of a command's arguments together: at most 262144 characters by default
        four = {f"b{i}": "z" * 65000 for i in range(4)}
        s.sendall(_cmd(4, **base, **four))
        r = lines.next()
        assert r is not None and r["ok"] is True, r
        s.sendall(_cmd(5, **base, **four, b4="z" * 5000))
        r = lines.next()
        assert r is not None and r["error"]["field"] == "arguments", r


# --- fuzz ---------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_requests = st.fixed_dictionaries(
    {"op": st.sampled_from(["command", "subscribe", "ack", "unsubscribe", "status", "ping", "x"])},
    optional={
        "id": _json,
        "commandIdn": st.sampled_from(["set_timer", "get_timer", "list_timers", "nope"]) | _json,
        "integrationIdn": st.just("program_timer") | _json,
        "connectorIdn": st.text(max_size=5) | _json,
        "arguments": st.dictionaries(
            st.sampled_from(["personaId", "timerName", "interval", "fireAt", "x"]) | st.text(),
            _json,
        )
        | _json,
        "deliveryIds": _json,
        "subscriptionId": _json,
    },
)
_fuzz_lines = st.one_of(
    st.binary(max_size=400),
    _json.map(lambda v: json.dumps(v).encode()),
    _requests.map(lambda v: json.dumps(v).encode()),
    _requests.map(lambda v: json.dumps(v).encode()).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda n: b[:n])  # cut anywhere
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(payload=_fuzz_lines)
def test_fuzz_every_line_gets_a_json_reply(shared: DaemonProcess, payload: bytes) -> None:
    sentinel = b'{"op":"ping","id":"fuzz-sentinel"}\n'
    with _raw(shared, timeout=10) as s:
        s.sendall(payload + b"\n" + sentinel)
        lines = _Lines(s)
        while True:
            reply = lines.next()
            assert reply is not None, f"connection closed on {payload!r}"
            assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
            if reply.get("id") == "fuzz-sentinel" and reply["ok"]:
                break
            if not reply["ok"]:
                assert reply["error"]["code"] in ERROR_CODES, reply


def test_daemon_survived_the_module(shared: DaemonProcess) -> None:
    _assert_alive(shared)
    bad = [
        r
        for r in _log_records(shared)
        if r.get("action") in ("connection_failed", "request_failed")
    ]
    assert not bad, bad[:3]
