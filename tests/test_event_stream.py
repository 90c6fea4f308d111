"""The event stream waits, reconnects and stops as SPEC 7.2 says: ``EventStream`` (keep-alive
ping, reconnection with backoff, unfixable errors, acks during an outage) and the CLI's
``events --follow`` (reconnection lines, usage and connection errors, signals), against real
daemons on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from program_timer.events.client import ClientError, Delivery, EventStream, TimerClient
from tests.daemon_proc import DaemonProcess, wait_for

FAST: dict[str, Any] = {"keepalive": 0.5, "ping_timeout": 0.5, "timeout": 1.0, "max_backoff": 0.5}
"""Short timeouts: the stream must outlive all of them."""


class States:
    """Records ``on_connection_change`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Exception | None]] = []

    def __call__(self, state: str, error: Exception | None) -> None:
        self.calls.append((state, error))

    @property
    def names(self) -> list[str]:
        return [state for state, _ in self.calls]


def _set_timer(daemon: DaemonProcess, name: str, interval: str = "0.1") -> None:
    with daemon.client(timeout=10) as c:
        c.command("set_timer", "my_timer", personaId="p", timerName=name, interval=interval)


def _pending(daemon: DaemonProcess) -> int:
    with daemon.client(timeout=10) as c:
        return int(c.status()["deliveries"]["pending"])


def _next_named(it: Iterator[Delivery], name: str) -> tuple[Delivery, list[Delivery]]:
    """The delivery of timer ``name``, and those that came before it."""
    before: list[Any] = []
    for delivery in it:
        if delivery.event["arguments"]["timerName"] == name:
            return delivery, before
        before.append(delivery)
    raise AssertionError(f"the stream ended before {name}")


def test_idle_stream_outlives_every_timeout_and_pings(
    daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = []
    send = TimerClient.send

    def counting_send(self: TimerClient, message: dict[str, Any]) -> None:
        if message.get("op") == "ping":
            pings.append(time.monotonic())
        send(self, message)

    monkeypatch.setattr(TimerClient, "send", counting_send)
    states = States()
    with EventStream(daemon.socket, "idle", on_connection_change=states, **FAST) as stream:
        later = threading.Timer(3.0, _set_timer, (daemon, "late"))
        started = time.monotonic()
        later.start()
        try:
            delivery = next(iter(stream))
        finally:
            later.cancel()
        waited = time.monotonic() - started
        assert delivery.event["arguments"]["timerName"] == "late"
        assert delivery.ack() is True
    assert waited >= 3.0, waited  # six keep-alive periods, three socket timeouts
    assert len(pings) >= 4, pings  # kept alive with pings, on the one connection
    assert states.names == ["connected"] and stream.reconnects == 0


def test_idle_timeout_ends_the_iteration_only_when_asked(daemon: DaemonProcess) -> None:
    with EventStream(daemon.socket, "bounded", idle_timeout=1.2, **FAST) as stream:
        started = time.monotonic()
        assert list(stream) == []
        waited = time.monotonic() - started
    assert 1.2 <= waited < 3.0, waited


def test_reconnects_across_a_daemon_restart(
    daemon: DaemonProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="program_timer.client")
    states = States()
    with EventStream(daemon.socket, "restart", on_connection_change=states, **FAST) as stream:
        it = iter(stream)
        _set_timer(daemon, "before")
        first = next(it)
        assert first.ack() is True
        assert daemon.stop() == 0
        daemon.start()
        _set_timer(daemon, "after")
        second, _ = _next_named(it, "after")
        assert second.ack() is True
    assert states.names == ["connected", "lost", "reconnected"]
    assert isinstance(states.calls[1][1], ConnectionError)
    assert stream.reconnects == 1
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    lost = f"lost the connection to the daemon at {daemon.socket} ("
    assert any(level == logging.WARNING and msg.startswith(lost) for level, msg in records)
    assert any(level == logging.INFO and "reconnected" in msg for level, msg in records), records


def test_hung_daemon_is_noticed_by_the_keepalive_ping(daemon: DaemonProcess) -> None:
    states = States()
    received: list[Delivery] = []
    failure: list[BaseException] = []
    stream = EventStream(daemon.socket, "hung", on_connection_change=states, **FAST)

    def consume() -> None:
        try:
            for delivery in stream:
                received.append(delivery)
                delivery.ack()
        except BaseException as exc:
            failure.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        wait_for(lambda: states.names == ["connected"], timeout=10)
        daemon.signal(signal.SIGSTOP)  # the connection stays open, nothing answers
        try:
            wait_for(lambda: "lost" in states.names, timeout=5)
        finally:
            daemon.signal(signal.SIGCONT)
        wait_for(lambda: states.names[-1:] == ["reconnected"], timeout=15)
        _set_timer(daemon, "after-hang")
        wait_for(lambda: received, timeout=10)
    finally:
        stream.close()
        consumer.join(5)
    assert not failure, failure
    lost_error = states.calls[1][1]
    assert isinstance(lost_error, TimeoutError) and "ping" in str(lost_error)
    assert received[0].event["arguments"]["timerName"] == "after-hang"


@pytest.mark.timeout(30)
def test_an_error_retrying_cannot_fix_raises(daemon: DaemonProcess) -> None:
    states = States()
    stream = EventStream(daemon.socket, "bad", persona_id="x" * 300, on_connection_change=states)
    with stream, pytest.raises(ClientError) as raised:
        next(iter(stream))
    assert raised.value.code == "invalid_request"
    assert raised.value.field == "filter.personaId"
    assert states.names == ["failed"]


@pytest.mark.timeout(30)
def test_a_refused_peer_raises_forbidden(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory(PROGRAM_TIMER_ALLOWED_UIDS=os.getuid() + 1)
    d.start(wait=False)
    wait_for(lambda: os.path.exists(d.socket), timeout=20)
    with EventStream(d.socket, "refused", **FAST) as stream, pytest.raises(ClientError) as raised:
        next(iter(stream))
    assert raised.value.code == "forbidden"


def test_ack_during_an_outage_is_kept_and_sent_after_reconnecting(
    daemon: DaemonProcess,
) -> None:
    with EventStream(daemon.socket, "outage", **FAST) as stream:
        it = iter(stream)
        _set_timer(daemon, "during")
        held = next(it)
        assert daemon.stop() == 0
        assert held.ack() is False  # does not raise: queued
        assert stream.pending_acks == {held.delivery_id}
        daemon.start()
        _set_timer(daemon, "after")
        after, before = _next_named(it, "after")
        # the queued ack went out right after the subscription, before any event came through
        assert stream.pending_acks == frozenset()
        assert all(d.external_event_id == held.external_event_id for d in before)
        assert _pending(daemon) == 1  # "after" only: "during" is acked
        assert after.ack() is True
    assert _pending(daemon) == 0


# the CLI -------------------------------------------------------------------------------------


def _cli(socket_path: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "program_timer", "--socket", socket_path, "events", *args]


def _run_cli(socket_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _cli(socket_path, *args), capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("count", ["0", "-2"])
def test_cli_count_must_be_positive(tmp_path: Path, count: str) -> None:
    done = _run_cli(str(tmp_path / "none.sock"), "--follow", "--count", count)
    assert done.returncode == 2, done
    assert "Invalid value for '--count'" in done.stderr, done.stderr


def test_cli_without_a_daemon_names_the_socket_and_how_to_start_it(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.sock")
    done = _run_cli(path, "--follow")
    assert done.returncode == 1, done
    assert path in done.stderr and "program-timer serve" in done.stderr, done.stderr
    assert "No such file or directory" in done.stderr, done.stderr


def test_cli_unfixable_error_exits_with_the_daemons_message(daemon: DaemonProcess) -> None:
    done = _run_cli(daemon.socket, "--follow", "--persona", "x" * 300)
    assert done.returncode == 1, done
    assert "invalid_request (argument filter.personaId)" in done.stderr, done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_cli_signal_removes_the_throwaway_subscription(
    daemon: DaemonProcess, sig: signal.Signals
) -> None:
    proc = subprocess.Popen(
        _cli(daemon.socket, "--follow"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        with daemon.client(timeout=10) as c:
            wait_for(lambda: c.status()["connectedSubscribers"] == 1, timeout=20)
            assert c.status()["subscriptions"] == 1
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=15)
            assert proc.returncode == 0, err
            assert c.status()["subscriptions"] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_reports_a_reconnection_and_keeps_following(daemon: DaemonProcess) -> None:
    proc = subprocess.Popen(
        _cli(daemon.socket, "--follow", "--ack", "--count", "2", "--subscription", "cli-keep"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with daemon.client(timeout=10) as c:
            wait_for(lambda: c.status()["connectedSubscribers"] == 1, timeout=20)
        _set_timer(daemon, "first")
        assert proc.stdout is not None
        assert "p/first" in proc.stdout.readline()
        wait_for(lambda: _pending(daemon) == 0, timeout=10)  # acked before the restart
        assert daemon.stop() == 0
        daemon.start()
        _set_timer(daemon, "second")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "p/second" in out
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("program-timer: connection lost (") and "reconnecting" in lines[0]
    assert lines[1] == "program-timer: reconnected"
