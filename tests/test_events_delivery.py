"""Durable timer events for subscribed flow instances (SPEC 3), through the real socket, on
SQLite and PostgreSQL."""

from __future__ import annotations

import time
import uuid

import psutil
import pytest

from events.client import EventStream, TimerClient
from tests.daemon_proc import DaemonProcess, wait_for

EVENT_KEYS = {"idn", "integrationIdn", "connectorIdn", "personaId", "arguments",
              "uninterruptible", "externalEventId", "commandActId"}


def _events(c: TimerClient, n: int, timeout: float = 15.0) -> list[dict]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        out.append(c.next_event(max(0.1, deadline - time.monotonic())))
    return out


def _no_event(c: TimerClient, wait: float) -> None:
    with pytest.raises(TimeoutError):
        c.next_event(wait)


def test_event_with_every_field_reaches_its_subscriber(daemon: DaemonProcess) -> None:
    act = str(uuid.uuid4())
    with daemon.client() as sub, daemon.client() as c:
        assert sub.subscribe("flow-1", flow_instance_id="fi-1") == {
            "subscriptionId": "flow-1", "created": True}
        c.command("set_timer", "my_timer", command_act_id=act, personaId="u1",
                  timerName="remind", interval="0.2", topic="invoice")
        (msg,) = _events(sub, 1)
        assert msg["op"] == "event" and msg["subscriptionId"] == "flow-1"
        assert msg["flowInstanceId"] == "fi-1" and msg["attempt"] == 1
        assert isinstance(msg["deliveryId"], int)
        ev = msg["event"]
        assert set(ev) == EVENT_KEYS
        assert ev["idn"] == "timer" and ev["integrationIdn"] == "program_timer"
        assert ev["connectorIdn"] == "my_timer" and ev["personaId"] == "u1"
        assert ev["uninterruptible"] is False and ev["commandActId"] == act
        uuid.UUID(ev["externalEventId"])
        args = ev["arguments"]
        assert args["personaId"] == "u1" and args["timerName"] == "remind"
        assert args["fireCount"] == "1" and args["missedCount"] == "0"
        assert args["repeatable"] == "false" and args["interval"] == "0.2"
        assert args["topic"] == "invoice"
        assert args["scheduledAt"].endswith("Z") and args["firedAt"].endswith("Z")
        assert all(isinstance(v, str) for v in args.values())
        assert sub.ack([msg["deliveryId"]]) == 1


def test_filters_route_and_each_subscription_gets_its_copy(daemon: DaemonProcess) -> None:
    with daemon.client() as by_conn, daemon.client() as by_persona, daemon.client() as both, \
            daemon.client() as anything, daemon.client() as c:
        by_conn.subscribe("s-conn", connector_idn="alpha")
        by_persona.subscribe("s-persona", persona_id="p2")
        both.subscribe("s-both", connector_idn="alpha", persona_id="p2")
        anything.subscribe("s-any")
        c.command("set_timer", "alpha", personaId="p1", timerName="a", interval="0.1")
        c.command("set_timer", "beta", personaId="p2", timerName="b", interval="0.1")
        c.command("set_timer", "alpha", personaId="p2", timerName="c", interval="0.1")

        def names(client: TimerClient, n: int) -> set[str]:
            got = _events(client, n)
            client.ack([m["deliveryId"] for m in got])
            return {m["event"]["arguments"]["timerName"] for m in got}

        assert names(anything, 3) == {"a", "b", "c"}
        assert names(by_conn, 2) == {"a", "c"}
        assert names(by_persona, 2) == {"b", "c"}
        assert names(both, 1) == {"c"}
        for client in (by_conn, by_persona, both, anything):
            _no_event(client, 0.5)
        ids = set()
        st = c.status()
        assert st["connectedSubscribers"] == 4
        assert st["deliveries"]["pending"] == 0
        del ids


def test_unrouted_event_is_kept_and_counted(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        c.command("set_timer", "nobody", personaId="p", timerName="t", interval="0.1")
        wait_for(lambda: c.status()["events"]["unrouted"] == 1)


def test_unacked_delivery_comes_again_after_ack_timeout(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d: DaemonProcess = daemon_factory(PROGRAM_TIMER_ACK_TIMEOUT=1)
    d.start()
    with d.client() as sub, d.client() as c:
        sub.subscribe("s")
        c.command("set_timer", "my_timer", personaId="p", timerName="t", interval="0.1")
        (first,) = _events(sub, 1)
        (again,) = _events(sub, 1, timeout=10)
        assert again["deliveryId"] == first["deliveryId"]
        assert again["attempt"] == first["attempt"] + 1
        assert again["event"]["externalEventId"] == first["event"]["externalEventId"]
        assert sub.ack([again["deliveryId"]]) == 1
        _no_event(sub, 2.5)  # acked: never again


def test_disconnected_subscriber_gets_everything_after_resubscribing(
    daemon: DaemonProcess,
) -> None:
    with daemon.client() as sub:
        sub.subscribe("durable", connector_idn="my_timer")
    with daemon.client() as c:
        for i in range(5):
            c.command("set_timer", "my_timer", personaId="p", timerName=f"t{i}", interval="0.1")
        wait_for(lambda: c.status()["deliveries"]["pending"] == 5)
    with daemon.client() as sub:
        assert sub.subscribe("durable", connector_idn="my_timer")["created"] is False
        got = _events(sub, 5)
        assert {m["event"]["arguments"]["timerName"] for m in got} == {f"t{i}" for i in range(5)}
        assert sub.ack([m["deliveryId"] for m in got]) == 5


def test_in_flight_delivery_is_sent_again_on_reconnect(daemon: DaemonProcess) -> None:
    with daemon.client() as sub, daemon.client() as c:
        sub.subscribe("re")
        c.command("set_timer", "my_timer", personaId="p", timerName="t", interval="0.1")
        (first,) = _events(sub, 1)
    with daemon.client() as sub:
        sub.subscribe("re")
        (again,) = _events(sub, 1, timeout=5)  # well before the 30 s ack timeout
        assert again["event"]["externalEventId"] == first["event"]["externalEventId"]
        assert again["attempt"] == 2


def test_pending_delivery_survives_a_restart(daemon: DaemonProcess) -> None:
    with daemon.client() as sub, daemon.client() as c:
        sub.subscribe("keep")
        c.command("set_timer", "my_timer", personaId="p", timerName="t", interval="0.1")
        (first,) = _events(sub, 1)
    assert daemon.stop() == 0
    daemon.start()
    with daemon.client() as sub:
        sub.subscribe("keep")
        (again,) = _events(sub, 1)
        assert again["event"]["externalEventId"] == first["event"]["externalEventId"]
        sub.ack([again["deliveryId"]])
        _no_event(sub, 1.0)


def test_repeating_timer_events_in_order_with_distinct_ids(daemon: DaemonProcess) -> None:
    with daemon.client() as sub, daemon.client() as c:
        sub.subscribe("order", persona_id="p")
        c.command("set_repeatable_timer", "my_timer", personaId="p", timerName="r",
                  interval="1")
        got = _events(sub, 4, timeout=15)
        sub.ack([m["deliveryId"] for m in got])
    counts = [int(m["event"]["arguments"]["fireCount"]) for m in got]
    assert counts == sorted(counts) and len(set(counts)) == 4
    assert len({m["event"]["externalEventId"] for m in got}) == 4


def test_unsubscribe_drops_pending(daemon: DaemonProcess) -> None:
    with daemon.client() as sub, daemon.client() as c:
        sub.subscribe("gone")
        c.command("set_timer", "my_timer", personaId="p", timerName="t", interval="0.1")
        _events(sub, 1)
        assert sub.unsubscribe("gone") is True
        assert c.status()["deliveries"]["pending"] == 0
        assert sub.unsubscribe("gone") is False


def test_event_stream_client_reconnects_and_resubscribes(daemon: DaemonProcess) -> None:
    stream = EventStream(daemon.socket, "stream-1", idle_timeout=15)
    it = iter(stream)
    with daemon.client() as c:
        c.command("set_timer", "my_timer", personaId="p", timerName="a", interval="0.1")
        first = next(it)
        first.ack()
        assert stream.client is not None
        stream.client.close()  # the connection drops under the stream
        c.command("set_timer", "my_timer", personaId="p", timerName="b", interval="0.1")
        second = next(it)
        second.ack()
    assert second.event["arguments"]["timerName"] == "b"
    stream.close()


def test_never_acking_subscriber_does_not_grow_memory(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d: DaemonProcess = daemon_factory(PROGRAM_TIMER_MAX_INFLIGHT=50)
    d.start()
    assert d.proc is not None
    proc = psutil.Process(d.proc.pid)
    with d.client() as sub, d.client() as c:
        sub.subscribe("lazy")  # never acks, never reads

        def fire(prefix: str, n: int) -> None:
            for i in range(0, n, 100):  # pipelined, reading replies as it goes
                for j in range(i, min(n, i + 100)):
                    c.send({"op": "command", "id": j, "commandIdn": "set_timer",
                            "integrationIdn": "program_timer", "connectorIdn": "my_timer",
                            "arguments": {"personaId": f"{prefix}{j % 50}",
                                          "timerName": f"t{j}", "interval": "0.1",
                                          "payload": "x" * 4000}})
                for j in range(i, min(n, i + 100)):
                    assert c.wait_reply(j)["ok"]

        # warm up (caches, allocator), then two equal rounds: a daemon holding undelivered
        # events in memory would grow by ~4000 x 4 KB = 16+ MB per round.
        fire("a", 2000)
        wait_for(lambda: c.status()["fires"]["total"] >= 2000, timeout=60)
        fire("b", 4000)
        wait_for(lambda: c.status()["fires"]["total"] >= 6000, timeout=60)
        rss_1 = proc.memory_info().rss
        fire("c", 4000)
        wait_for(lambda: c.status()["fires"]["total"] >= 10000, timeout=60)
        st = c.status()
        rss_2 = proc.memory_info().rss
    assert st["deliveries"]["inflight"] <= 50
    assert st["deliveries"]["pending"] == 10000  # kept in the database, not in memory
    assert rss_2 - rss_1 < 6 * 1024 * 1024, (rss_1, rss_2)
