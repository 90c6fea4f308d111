"""Who may use the daemon (SPEC 5): the socket's file mode, then SO_PEERCRED allow-lists of user
and group ids. Through the real socket against a real daemon; SQLite only (the database plays no
part). The tests that connect as another user need root (they run a client as ``nobody``).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, wait_for

NOBODY = 65534
STRANGER = 4242  # a uid and gid nobody here has


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """Overrides the conftest's backend parametrization: these tests are SQLite only."""
    return sqlite_url


def _connect(d: DaemonProcess) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.socket)
    s.settimeout(10)
    return s


def _first_line(s: socket.socket) -> dict[str, Any] | None:
    buf = b""
    while b"\n" not in buf:
        try:
            chunk = s.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        buf += chunk
    message: dict[str, Any] = json.loads(buf.partition(b"\n")[0])
    return message


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1 << 16) == b""
    except ConnectionResetError:
        return True


def _start_refusing(d: DaemonProcess) -> DaemonProcess:
    """Start a daemon that refuses us: its readiness cannot be checked with a ping."""
    d.start(wait=False)

    def ready() -> bool:
        assert d.proc is not None
        if d.proc.poll() is not None:
            raise RuntimeError(f"daemon exited:\n{d.log()}")
        return any(r.get("action") == "ready" for r in _log_records(d))

    wait_for(ready, timeout=30)
    return d


def _log_records(d: DaemonProcess) -> list[dict[str, Any]]:
    out = []
    for line in d.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _served(d: DaemonProcess) -> bool:
    with d.client(timeout=10) as c:
        return c.request("ping") == {"pong": True}


def _assert_refused_as_forbidden(d: DaemonProcess) -> None:
    with _connect(d) as s:
        # The refusal comes unasked, before the client says anything; then the daemon closes.
        reply = _first_line(s)
        assert reply is not None
        assert reply["ok"] is False and reply["id"] is None
        assert reply["error"]["code"] == "forbidden", reply
        assert reply["error"]["message"]
        assert _closed(s)


# --- file mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["0600", "0640", "0666"])
def test_socket_mode_is_the_configured_one(daemon_factory: Any, mode: str) -> None:
    d: DaemonProcess = daemon_factory(PROGRAM_TIMER_SOCKET_MODE=mode).start()
    st = os.stat(d.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == int(mode, 8)
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert _served(d)


# --- SO_PEERCRED allow-lists --------------------------------------------------------------


def test_uid_not_in_the_allow_list_is_refused_and_logged(daemon_factory: Any) -> None:
    d = _start_refusing(daemon_factory(PROGRAM_TIMER_ALLOWED_UIDS=STRANGER))
    for _ in range(3):
        _assert_refused_as_forbidden(d)
    assert d.proc is not None and d.proc.poll() is None  # refusing is no reason to stop
    time.sleep(0.2)
    refused = [r for r in _log_records(d) if r.get("action") == "peer_refused"]
    assert len(refused) == 3, refused
    assert all(r["peer_uid"] == os.geteuid() for r in refused)
    assert all(r["peer_gid"] == os.getegid() for r in refused)
    assert all(r["peer_pid"] == os.getpid() for r in refused)
    assert all(r["level"] == "warning" for r in refused)


def test_gid_not_in_the_allow_list_is_refused(daemon_factory: Any) -> None:
    d = _start_refusing(daemon_factory(PROGRAM_TIMER_ALLOWED_GIDS=STRANGER))
    _assert_refused_as_forbidden(d)


@pytest.mark.parametrize(
    "env",
    [
        {"PROGRAM_TIMER_ALLOWED_UIDS": "our uid"},
        {"PROGRAM_TIMER_ALLOWED_UIDS": f"{STRANGER},our uid"},
        {"PROGRAM_TIMER_ALLOWED_GIDS": "our gid"},
        # either list is enough
        {"PROGRAM_TIMER_ALLOWED_UIDS": STRANGER, "PROGRAM_TIMER_ALLOWED_GIDS": "our gid"},
        {"PROGRAM_TIMER_ALLOWED_UIDS": "our uid", "PROGRAM_TIMER_ALLOWED_GIDS": STRANGER},
    ],
    ids=["uid", "uid among others", "gid", "stranger uid but our gid", "our uid, stranger gid"],
)
def test_allowed_peers_are_served(daemon_factory: Any, env: dict[str, Any]) -> None:
    env = {
        k: str(v).replace("our uid", str(os.geteuid())).replace("our gid", str(os.getegid()))
        for k, v in env.items()
    }
    d: DaemonProcess = daemon_factory(**env).start()
    assert _served(d)
    with d.client() as c:
        c.command("set_timer", "my_timer", personaId="p", timerName="t", interval="60")
        assert c.command("get_timer", "my_timer", personaId="p", timerName="t")["timer"]
    assert not [r for r in _log_records(d) if r.get("action") == "peer_refused"]


# --- another real user --------------------------------------------------------------------

_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": type(exc).__name__}))
    sys.exit(0)
try:
    s.sendall(b'{"op":"ping","id":1}\n')
except OSError:
    pass  # a refused client may find the socket closed already; the reply is still there
buf = b""
while b"\n" not in buf:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        chunk = b""
    if not chunk:
        break
    buf += chunk
reply = json.loads(buf.split(b"\n")[0]) if buf else None
print(json.dumps({"connect": "ok", "reply": reply}))
"""


def _as_nobody(d: DaemonProcess) -> dict[str, Any]:
    """Run a tiny client as uid/gid 65534 with no supplementary groups."""
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    done = subprocess.run(
        [python, "-I", "-c", _CLIENT, d.socket],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        cwd="/",
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="running a client as another user needs root"
)


def _open_folder(d: DaemonProcess) -> None:
    # Let other users reach the socket's folder, so only the socket's own mode decides.
    os.chmod(d.folder, 0o755)


@needs_root
def test_other_user_is_stopped_by_the_file_mode(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory(PROGRAM_TIMER_SOCKET_MODE="0660").start()
    _open_folder(d)
    st = os.stat(d.socket)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o660)
    assert _as_nobody(d) == {"connect": "PermissionError"}
    assert _served(d)  # the owner still is


@needs_root
def test_other_user_is_served_by_mode_0666_then_refused_by_the_uid_list(
    daemon_factory: Any,
) -> None:
    open_daemon: DaemonProcess = daemon_factory(PROGRAM_TIMER_SOCKET_MODE="0666").start()
    _open_folder(open_daemon)
    result = _as_nobody(open_daemon)
    assert result == {"connect": "ok", "reply": {"id": 1, "ok": True, "result": {"pong": True}}}
    open_daemon.stop()  # SQLite takes one daemon at a time

    guarded: DaemonProcess = daemon_factory(
        PROGRAM_TIMER_SOCKET_MODE="0666", PROGRAM_TIMER_ALLOWED_UIDS="0"
    ).start()
    _open_folder(guarded)
    result = _as_nobody(guarded)
    assert result["connect"] == "ok"
    assert result["reply"]["error"]["code"] == "forbidden"
    time.sleep(0.2)
    refused = [r for r in _log_records(guarded) if r.get("action") == "peer_refused"]
    assert [(r["peer_uid"], r["peer_gid"]) for r in refused] == [(NOBODY, NOBODY)]
    assert _served(guarded)  # root is on the list
