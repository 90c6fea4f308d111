"""deploy/: the systemd units verify, and the daemon speaks systemd's protocols for real.

Socket activation (``systemd-socket-activate``), readiness and stopping (``NOTIFY_SOCKET``), the
watchdog, SIGHUP, and ``MemoryDenyWriteExecute`` are exercised on a real ``program-timer serve``
subprocess. The backend does not matter here: SQLite only, to keep the suite fast.

``systemd-analyze`` and ``systemd-socket-activate`` come from Debian's ``systemd`` package; the
tests that need them skip with a reason when they are missing, and fail instead under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from program_timer.events.client import TimerClient
from program_timer.scheduler import systemd
from program_timer.scheduler.config import Settings, load_settings
from tests.daemon_proc import DaemonProcess, short_tmpdir, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SERVICE = DEPLOY / "program-timer.service"
SOCKET_UNIT = DEPLOY / "program-timer.socket"
INSTALLED_BINARY = "/usr/local/bin/program-timer"
INSTALLED_CONFIG = "/etc/program-timer/program-timer.toml"

# ---------------------------------------------------------------------------------------------
# helpers


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path:
        return path
    reason = f"{tool} is not installed (Debian package: systemd)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true: the deploy tests must run (.ci/run installs it)")
    pytest.skip(reason)


def _program_timer() -> str:
    """The installed entry script itself (not a version manager's shim), so that the process
    systemd-socket-activate execs keeps its pid (LISTEN_PID) all the way into Python."""
    script = Path(sysconfig.get_path("scripts")) / "program-timer"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    found = shutil.which("program-timer")
    assert found, "program-timer is not installed: pip install -e '.[test]'"
    return found


def _clean_env(**extra: Any) -> dict[str, str]:
    """The test's environment without settings or systemd variables of the outer world."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PROGRAM_TIMER_", "LISTEN_", "WATCHDOG_"))
        and k not in {"NOTIFY_SOCKET", "STATE_DIRECTORY", "RUNTIME_DIRECTORY"}
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values…]}} (enough for these files: no continuations)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _service_text() -> str:
    """The service unit with ExecStart= pointing at this checkout's program-timer (systemd-analyze
    checks that the binary exists)."""
    text = SERVICE.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    return text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={_program_timer()} ")


def _exec_start(config: Path) -> list[str]:
    """The service's ExecStart= command line, run from this checkout."""
    (line,) = _unit(SERVICE)["Service"]["ExecStart"]
    argv = shlex.split(line)
    assert argv[0] == INSTALLED_BINARY
    argv[0] = _program_timer()
    return [str(config) if a == INSTALLED_CONFIG else a for a in argv]


def _log_events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict):
                out.append(item)
    return out


def _actions(path: Path) -> list[str]:
    return [e.get("action", "") for e in _log_events(path)]


class NotifyListener:
    """The receiving end of sd_notify: an AF_UNIX datagram socket, like systemd's."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind_to)
        self.messages: list[dict[str, str]] = []

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return False
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
        self.messages.append(fields)
        return True

    def wait(self, key: str, value: str = "1", timeout: float = 30.0) -> dict[str, str]:
        """The first message (already received or arriving in time) with ``key=value``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if message.get(key) == value:
                    return message
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {key}={value} in time; got {self.messages}")
            self._receive(left)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._receive(left)

    def count(self, key: str, value: str = "1") -> int:
        return sum(1 for m in self.messages if m.get(key) == value)

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def _spawned(argv: list[str], env: dict[str, str], folder: Path, **popen: Any) -> Iterator[Any]:
    """A subprocess logging to ``folder/daemon.log``; SIGTERMed (then killed) at the end."""
    log_path = folder / "daemon.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT, **popen
        )
        proc.log_path = log_path  # type: ignore[attr-defined]
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ping(path: Path | str, timeout: float = 30.0) -> dict[str, Any]:
    with TimerClient(str(path), timeout=timeout) as c:
        return c.request("ping")


def _wait_answering(path: Path, proc: Any, timeout: float = 30.0) -> None:
    def answers() -> bool:
        assert proc.poll() is None, f"daemon exited {proc.returncode}:\n{_text(proc)}"
        try:
            return _ping(path, timeout=2)["pong"] is True
        except (OSError, ConnectionError):
            return False

    wait_for(answers, timeout=timeout)


def _text(proc: Any) -> str:
    return Path(proc.log_path).read_text(errors="replace")[-10000:]


@pytest.fixture
def folder() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# (a) the unit files


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _require("systemd-analyze")
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(SOCKET_UNIT, units / SOCKET_UNIT.name)
    text = _service_text()
    (units / SERVICE.name).write_text(text)

    def verify(*names: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [analyze, "verify", *(str(units / n) for n in names)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=units,
        )

    result = verify(SOCKET_UNIT.name, SERVICE.name)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys, bad values and missing binaries are only warnings: none may mention ours.
    complaints = [line for line in output.splitlines() if "program-timer" in line]
    assert complaints == [], output

    # ...and verify does notice a typo in this systemd version, so the check above means something.
    (units / SERVICE.name).write_text(text.replace("LockPersonality=", "LockPersonalty=", 1))
    broken = verify(SERVICE.name)
    assert "LockPersonalty" in broken.stdout + broken.stderr


def test_service_hardening_exposure(tmp_path: Path) -> None:
    analyze = _require("systemd-analyze")
    help_text = subprocess.run(
        [analyze, "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    if "--offline" not in help_text:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or later")
    unit = tmp_path / SERVICE.name
    unit.write_text(_service_text())
    # --threshold is the exposure level times ten: 2.0 ("OK") at most.
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_units_declare_activation_notify_and_hardening() -> None:
    sock = _unit(SOCKET_UNIT)
    svc = _unit(SERVICE)
    s = sock["Socket"]
    assert s["ListenStream"] == ["/run/program-timer/program-timer.sock"]
    assert s["SocketMode"] == ["0660"]
    assert s["SocketGroup"] == ["program-timer"]
    unit = svc["Unit"]
    assert "program-timer.socket" in " ".join(unit["Requires"])
    assert "program-timer.socket" in " ".join(unit["After"])
    service = {k: " ".join(v) for k, v in svc["Service"].items()}
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "User": "program-timer",
        "Group": "program-timer",
        "StateDirectory": "program-timer",
        "RuntimeDirectory": "program-timer",
        "RuntimeDirectoryPreserve": "yes",
        "EnvironmentFile": "-/etc/program-timer/program-timer.env",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "30s",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures": "native",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert svc["Service"]["SystemCallFilter"][0] == "@system-service"
    # The socket's group is a static one (sysusers.d), not a DynamicUser= allocation.
    assert "DynamicUser" not in service
    sysusers = (DEPLOY / "program-timer.sysusers").read_text()
    assert re.search(r"^u\s+program-timer\s", sysusers, re.M), sysusers


# ---------------------------------------------------------------------------------------------
# the example configuration files


def _example_toml() -> dict[str, str]:
    """First ``#name = value`` line per setting of deploy/program-timer.toml."""
    found: dict[str, str] = {}
    for line in (DEPLOY / "program-timer.toml").read_text().splitlines():
        m = re.match(r"^#([a-z_]+) = (.+)$", line)
        if m:
            found.setdefault(m.group(1), m.group(2))
    return found


def test_example_toml_lists_every_setting_with_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("PROGRAM_TIMER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/program-timer")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/program-timer")
    examples = _example_toml()
    settings = set(Settings.model_fields) - {"config_file"}
    assert set(examples) == settings

    # The file as shipped (all comments) is valid: every setting takes its default.
    shipped = load_settings(DEPLOY / "program-timer.toml")
    defaults = Settings()
    assert shipped == defaults

    # Uncommented, each value parses; those of settings with a default are that default.
    uncommented = tmp_path / "all.toml"
    uncommented.write_text("".join(f"{k} = {v}\n" for k, v in examples.items()))
    tomllib.loads(uncommented.read_text())
    loaded = load_settings(uncommented)
    for name in settings:
        default = getattr(defaults, name)
        if default is not None:
            assert getattr(loaded, name) == default, name


def test_example_env_file_names_real_settings() -> None:
    text = (DEPLOY / "program-timer.env").read_text()
    names = re.findall(r"^#?(PROGRAM_TIMER_[A-Z_]+)=", text, re.M)
    assert names
    known = {f"PROGRAM_TIMER_{n.upper()}" for n in Settings.model_fields}
    assert set(names) <= known, set(names) - known


# ---------------------------------------------------------------------------------------------
# (b) socket activation


def test_socket_activation_serves_on_the_passed_socket(folder: Path, sqlite_url: str) -> None:
    activate = _require("systemd-socket-activate")
    passed = folder / "act.sock"
    own = folder / "own.sock"  # where the daemon would create its own socket
    settings = {
        "PROGRAM_TIMER_DATABASE_URL": sqlite_url,
        "PROGRAM_TIMER_SOCKET": str(own),
        "PROGRAM_TIMER_LOG_FORMAT": "json",
        "PROGRAM_TIMER_LOG_LEVEL": "debug",
        "PYTHONUNBUFFERED": "1",
    }
    # systemd-socket-activate passes only -E variables (and LISTEN_FDS/LISTEN_PID) on.
    argv = [activate, "-l", str(passed)]
    for key, value in settings.items():
        argv += ["-E", f"{key}={value}"]
    argv += [_program_timer(), "serve"]
    with _spawned(argv, _clean_env(), folder) as proc:
        wait_for(passed.exists, timeout=10)
        # It execs the daemon on the first connection, which waits in the listen queue.
        with TimerClient(str(passed), timeout=30) as c:
            assert c.request("ping") == {"pong": True}
            c.command("set_timer", "my_timer", personaId="p", timerName="t", interval="3600")
        with TimerClient(str(passed), timeout=30) as c:  # not inetd style: one daemon, many
            listed = c.command("list_timers", "my_timer", personaId="p")
            assert [t["timerName"] for t in listed["timers"]] == ["t"]
        assert not own.exists(), "the daemon created its own socket besides the passed one"
        events = _log_events(proc.log_path)
        listening = [e for e in events if e.get("action") == "listening"]
        assert listening and listening[0].get("activated") is True, _text(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, _text(proc)
    assert "stopped" in _actions(proc.log_path)
    # The socket belongs to whoever passed it (systemd's RemoveOnStop=): the daemon leaves it.
    assert passed.exists()
    assert not own.exists()


# ---------------------------------------------------------------------------------------------
# (c) readiness and stopping, as the service runs it


def test_ready_then_stopping_with_the_units_command_line(folder: Path) -> None:
    state = folder / "state"
    runtime = folder / "run"
    state.mkdir(mode=0o700)
    runtime.mkdir()
    listener = NotifyListener(str(folder / "notify"))
    env = _clean_env(
        NOTIFY_SOCKET=listener.address,
        STATE_DIRECTORY=state,
        RUNTIME_DIRECTORY=runtime,
    )
    try:
        with _spawned(_exec_start(DEPLOY / "program-timer.toml"), env, folder) as proc:
            ready = listener.wait("READY", timeout=30)
            # READY=1 means serving: the very first request is answered, no retry.
            assert _ping(runtime / "program-timer.sock") == {"pong": True}
            assert ready.get("MAINPID") == str(proc.pid)
            assert "STATUS" in ready
            assert listener.count("STOPPING") == 0
            # The defaults of a unit with StateDirectory=/RuntimeDirectory=:
            assert (state / "program-timer.db").exists()
            assert "ready" in _actions(proc.log_path)  # JSON: stdout is not a terminal
            proc.send_signal(signal.SIGTERM)
            listener.wait("STOPPING", timeout=15)
            assert proc.wait(15) == 0, _text(proc)
        assert listener.count("READY") == 1
        assert not (runtime / "program-timer.sock").exists()  # its own socket: removed
    finally:
        listener.close()


# ---------------------------------------------------------------------------------------------
# (d) watchdog


def test_watchdog_pings_repeatedly(folder: Path, sqlite_url: str) -> None:
    # An abstract-namespace NOTIFY_SOCKET ("@…") this time; systemd may pass either kind.
    listener = NotifyListener(f"@program-timer-test-{os.getpid()}-{folder.name}")
    daemon = DaemonProcess(
        sqlite_url,
        folder,
        NOTIFY_SOCKET=listener.address,
        WATCHDOG_USEC=1_000_000,  # no WATCHDOG_PID: the child's pid is not known before spawn
    )
    try:
        daemon.start()
        listener.wait("READY", timeout=30)
        listener.wait("WATCHDOG", timeout=5)
        first = listener.count("WATCHDOG")
        listener.drain(2.2)  # every WATCHDOG_USEC / 2 = 0.5 s
        assert listener.count("WATCHDOG") - first >= 3, listener.messages
        assert daemon.stop() == 0
    finally:
        daemon.stop()
        listener.close()


def test_no_watchdog_for_another_pid(folder: Path, sqlite_url: str) -> None:
    listener = NotifyListener(str(folder / "notify"))
    daemon = DaemonProcess(
        sqlite_url,
        folder,
        NOTIFY_SOCKET=listener.address,
        WATCHDOG_USEC=200_000,
        WATCHDOG_PID=1,  # meant for another process (e.g. a wrapper that exec'd nothing)
    )
    try:
        daemon.start()
        listener.wait("READY", timeout=30)
        listener.drain(0.5)
        assert listener.count("WATCHDOG") == 0, listener.messages
        assert daemon.stop() == 0
    finally:
        daemon.stop()
        listener.close()


def test_watchdog_interval_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval() is None, bad


def test_notify_and_listen_fds_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert systemd.notify("READY=1") is False  # never raises: not being supervised is fine
    # LISTEN_FDS meant for another process (the pid check) are left alone.
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == []
    assert os.environ["LISTEN_FDS"] == "1"


# ---------------------------------------------------------------------------------------------
# (e) SIGHUP


def test_sighup_reopens_logging_and_keeps_serving(folder: Path, sqlite_url: str) -> None:
    daemon = DaemonProcess(sqlite_url, folder)
    try:
        daemon.start()
        pid = daemon.proc.pid if daemon.proc else None
        for _ in range(2):
            daemon.signal(signal.SIGHUP)
            wait_for(lambda: '"action": "reloaded"' in daemon.log(), timeout=10)
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert daemon.proc.pid == pid
        with daemon.client() as c:
            assert c.request("ping") == {"pong": True}
        # Still JSON lines after the reconfiguration.
        assert _actions(daemon.log_path).count("reloaded") == 2
        assert daemon.stop() == 0
        assert "stopped" in _actions(daemon.log_path)
    finally:
        daemon.stop()


# ---------------------------------------------------------------------------------------------
# MemoryDenyWriteExecute=yes: CPython and the daemon's libraries need no W+X memory


PR_SET_MDWE = 65
PR_GET_MDWE = 66
# Runs a program with PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN): no memory may be writable and
# executable, or become executable after being writable, as under MemoryDenyWriteExecute=yes
# (kept across execve).
DENY_WRITE_EXECUTE = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(97)
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_daemon_runs_with_memory_deny_write_execute(folder: Path, sqlite_url: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) < 0 and ctypes.get_errno() == errno.EINVAL:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+), the MemoryDenyWriteExecute twin")
    sock = folder / "pt.sock"
    env = _clean_env(
        PROGRAM_TIMER_DATABASE_URL=sqlite_url,
        PROGRAM_TIMER_SOCKET=sock,
        PROGRAM_TIMER_LOG_FORMAT="json",
        PROGRAM_TIMER_LOG_LEVEL="debug",
    )
    wrap = [sys.executable, "-c", DENY_WRITE_EXECUTE]
    probe = subprocess.run(
        [*wrap, sys.executable, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode == 1 and "PermissionError" in probe.stderr, probe
    with _spawned([*wrap, _program_timer(), "serve"], env, folder) as proc:
        _wait_answering(sock, proc)
        with TimerClient(str(sock), timeout=30) as c:
            c.command("set_timer", "my_timer", personaId="p", timerName="soon", interval="1")
        wait_for(lambda: "timer_fired" in _actions(proc.log_path), timeout=15)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, _text(proc)
