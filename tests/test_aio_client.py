"""The asyncio client (SPEC 7.1): ``AsyncTimerClient`` requests and pushed events, and
``AsyncEventStream`` receiving, acking, keeping an idle connection alive, reconnecting across a
daemon restart and raising what retrying cannot fix, against real daemons."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from program_timer.events.aio import (
    AsyncDelivery,
    AsyncEventStream,
    AsyncTimerClient,
    ClientError,
    ConnectionLost,
)
from tests.daemon_proc import DaemonProcess

FAST: dict[str, Any] = {"keepalive": 0.5, "ping_timeout": 0.5, "timeout": 2.0, "max_backoff": 0.5}


async def _set_timer(daemon: DaemonProcess, name: str, interval: str = "0.1") -> None:
    async with AsyncTimerClient(daemon.socket, timeout=10) as c:
        await c.command("set_timer", "my_timer", personaId="p", timerName=name, interval=interval)


async def _pending(daemon: DaemonProcess) -> int:
    async with AsyncTimerClient(daemon.socket, timeout=10) as c:
        return int((await c.status())["deliveries"]["pending"])


async def _next_named(stream: AsyncEventStream, name: str) -> tuple[AsyncDelivery, list[str]]:
    """The delivery of timer ``name``, and the externalEventIds of those before it."""
    before: list[Any] = []
    async for delivery in stream:
        if delivery.event["arguments"]["timerName"] == name:
            return delivery, before
        before.append(delivery.external_event_id)
    raise AssertionError(f"the stream ended before {name}")


def test_client_requests_concurrently_and_receives_events(daemon: DaemonProcess) -> None:
    async def main() -> None:
        async with AsyncTimerClient(daemon.socket, timeout=10) as c:
            assert await c.ping() == {"pong": True}
            assert await c.subscribe("aio-1", connector_idn="my_timer") == {
                "subscriptionId": "aio-1",
                "created": True,
            }
            # concurrent requests on one connection: each gets its own reply
            names = [f"t{i}" for i in range(20)]
            results = await asyncio.gather(
                *(
                    c.command("set_timer", "my_timer", personaId="p", timerName=n, interval="0.2")
                    for n in names
                )
            )
            assert [r["timer"]["timerName"] for r in results] == names
            with pytest.raises(ClientError) as raised:
                await c.command("get_timer", "my_timer", personaId="p", timerName="none")
            assert raised.value.code == "not_found"
            got = [await c.next_event(10) for _ in names]
            assert sorted(m["event"]["arguments"]["timerName"] for m in got) == sorted(names)
            assert await c.ack([m["deliveryId"] for m in got]) == len(names)
            with pytest.raises(TimeoutError):
                await c.next_event(0.3)
            assert (await c.status())["deliveries"]["pending"] == 0
            assert await c.unsubscribe("aio-1") is True
        with pytest.raises(ConnectionLost):
            await c.ping()

    asyncio.run(main())


def test_stream_keeps_an_idle_connection_alive(
    daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = []
    ping = AsyncTimerClient.ping

    async def counting_ping(self: AsyncTimerClient) -> dict[str, Any]:
        pings.append(time.monotonic())
        return await ping(self)

    monkeypatch.setattr(AsyncTimerClient, "ping", counting_ping)
    states: list[str] = []

    async def on_change(state: str, error: Exception | None) -> None:
        states.append(state)

    async def main() -> float:
        async with AsyncEventStream(
            daemon.socket, "aio-idle", on_connection_change=on_change, **FAST
        ) as stream:

            async def later() -> None:
                await asyncio.sleep(3.0)
                await _set_timer(daemon, "late")

            task = asyncio.create_task(later())
            started = time.monotonic()
            delivery = await anext(stream)
            waited = time.monotonic() - started
            await task
            assert delivery.event["arguments"]["timerName"] == "late"
            assert await delivery.ack() is True
            assert stream.reconnects == 0
            return waited

    waited = asyncio.run(main())
    assert waited >= 3.0, waited
    assert len(pings) >= 4, pings
    assert states == ["connected"]


def test_stream_idle_timeout_ends_the_iteration(daemon: DaemonProcess) -> None:
    async def main() -> float:
        async with AsyncEventStream(daemon.socket, "aio-bounded", idle_timeout=1.0) as stream:
            started = time.monotonic()
            assert [d async for d in stream] == []
            return time.monotonic() - started

    waited = asyncio.run(main())
    assert 1.0 <= waited < 3.0, waited


def test_stream_receives_acks_and_reconnects_across_a_restart(daemon: DaemonProcess) -> None:
    states: list[tuple[str, Exception | None]] = []

    async def main() -> AsyncEventStream:
        stream = AsyncEventStream(
            daemon.socket,
            "aio-restart",
            connector_idn="my_timer",
            on_connection_change=lambda s, e: states.append((s, e)),
            **FAST,
        )
        async with stream:
            await _set_timer(daemon, "first")
            first = await anext(stream)
            assert first.attempt == 1 and await first.ack() is True
            await _set_timer(daemon, "held")
            held, _ = await _next_named(stream, "held")
            assert daemon.stop() == 0
            assert await held.ack() is False  # the daemon is down: queued, no exception
            assert stream.pending_acks == {held.delivery_id}
            daemon.start()
            await _set_timer(daemon, "after")
            after, before = await _next_named(stream, "after")
            assert set(before) <= {held.external_event_id}  # at most the resend of "held"
            assert stream.pending_acks == frozenset()
            assert await _pending(daemon) == 1  # "after" only: the queued ack went through
            assert await after.ack() is True
        assert await _pending(daemon) == 0
        return stream

    stream = asyncio.run(main())
    assert [s for s, _ in states] == ["connected", "lost", "reconnected"]
    assert isinstance(states[1][1], ConnectionError)
    assert stream.reconnects == 1


@pytest.mark.timeout(30)
def test_stream_raises_what_retrying_cannot_fix(daemon: DaemonProcess) -> None:
    states: list[str] = []

    async def main() -> None:
        async with AsyncEventStream(
            daemon.socket,
            "aio-bad",
            persona_id="x" * 300,
            on_connection_change=lambda s, e: states.append(s),
        ) as stream:
            with pytest.raises(ClientError) as raised:
                await anext(stream)
            assert raised.value.code == "invalid_request"

    asyncio.run(main())
    assert states == ["failed"]


def test_stream_without_waiting_raises_when_no_daemon(tmp_path: Any) -> None:
    async def main() -> None:
        stream = AsyncEventStream(str(tmp_path / "none.sock"), "x", wait_for_daemon=False)
        with pytest.raises(FileNotFoundError):
            await anext(stream)
        await stream.aclose()

    asyncio.run(main())


def test_stream_notices_a_hung_daemon_by_its_keepalive_ping(daemon: DaemonProcess) -> None:
    states: list[tuple[str, Exception | None]] = []

    async def until(predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.05)

    async def main() -> AsyncDelivery:
        stream = AsyncEventStream(
            daemon.socket,
            "aio-hung",
            on_connection_change=lambda s, e: states.append((s, e)),
            **FAST,
        )
        async with stream:
            consumer = asyncio.create_task(anext(stream))
            await until(lambda: len(states) == 1, 10)
            daemon.signal(signal.SIGSTOP)  # the connection stays open, nothing answers
            try:
                await until(lambda: len(states) == 2, 5)
            finally:
                daemon.signal(signal.SIGCONT)
            await until(lambda: len(states) == 3, 15)
            await _set_timer(daemon, "after-hang")
            delivery = await asyncio.wait_for(consumer, 10)
            assert await delivery.ack() is True
            return delivery

    delivery = asyncio.run(main())
    assert [s for s, _ in states] == ["connected", "lost", "reconnected"]
    assert isinstance(states[1][1], TimeoutError) and "ping" in str(states[1][1])
    assert delivery.event["arguments"]["timerName"] == "after-hang"
