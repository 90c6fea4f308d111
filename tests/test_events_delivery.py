"""Durable timer events for subscribed flow instances (SPEC 3), through the real socket, on
SQLite and PostgreSQL."""

from __future__ import annotations

import time
import uuid

import psutil
import pytest

from program_timer.events.client import EventStream, TimerClient
from tests.daemon_proc import DaemonProcess, wait_for

EVENT_KEYS = {
    "idn",
    "integrationIdn",
    "connectorIdn",
    "personaId",
    "arguments",
    "uninterruptible",
    "externalEventId",
    "commandActId",
}


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
            "subscriptionId": "flow-1",
            "created": True,
        }
        c.command(
            "set_timer",
            "my_timer",
            command_act_id=act,
            personaId="u1",
            timerName="remind",
            interval="0.2",
            topic="invoice",
        )
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
    with (
        daemon.client() as by_conn,
        daemon.client() as by_persona,
        daemon.client() as both,
        daemon.client() as anything,
        daemon.client() as c,
    ):
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
        c.command("set_repeatable_timer", "my_timer", personaId="p", timerName="r", interval="1")
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
                    c.send(
                        {
                            "op": "command",
                            "id": j,
                            "commandIdn": "set_timer",
                            "integrationIdn": "program_timer",
                            "connectorIdn": "my_timer",
                            "arguments": {
                                "personaId": f"{prefix}{j % 50}",
                                "timerName": f"t{j}",
                                "interval": "0.1",
                                "payload": "x" * 4000,
                            },
                        }
                    )
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


def test_attempt_counts_up_across_a_crash_and_a_restart(daemon: DaemonProcess) -> None:
    with daemon.client() as sub, daemon.client() as c:
        sub.subscribe("count")
        c.command("set_timer", "my_timer", personaId="p", timerName="t", interval="0.1")
        (first,) = _events(sub, 1)
    daemon.kill()  # the send mark was committed before the push: a crash does not undo it
    daemon.start()
    with daemon.client() as sub:
        sub.subscribe("count")
        (second,) = _events(sub, 1)
    assert daemon.stop() == 0
    daemon.start()
    with daemon.client() as sub:
        sub.subscribe("count")
        (third,) = _events(sub, 1)
        assert sub.ack([third["deliveryId"]]) == 1
    got = (first, second, third)
    assert [m["attempt"] for m in got] == [1, 2, 3]
    assert len({m["deliveryId"] for m in got}) == 1
    assert len({m["event"]["externalEventId"] for m in got}) == 1


def _pending_deliveries(daemon: DaemonProcess, subscription: str, n: int) -> None:
    """Let ``n`` deliveries wait for a subscription whose subscriber is away."""
    with daemon.client() as sub:
        sub.subscribe(subscription)
    with daemon.client() as c:
        for i in range(n):
            c.command("set_timer", "my_timer", personaId="p", timerName=f"w{i}", interval="0.1")
        wait_for(lambda: c.status()["deliveries"]["pending"] == n)


def test_window_is_refilled_once_half_of_it_is_free(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d: DaemonProcess = daemon_factory(PROGRAM_TIMER_MAX_INFLIGHT=4)
    d.start()
    _pending_deliveries(d, "window", 8)
    with d.client() as sub:
        sub.subscribe("window")
        first = _events(sub, 4)
        _no_event(sub, 1.0)  # the window is full
        assert sub.ack([first[0]["deliveryId"]]) == 1
        _no_event(sub, 1.0)  # a quarter of it free: not worth a refill yet
        assert sub.ack([first[1]["deliveryId"]]) == 1
        second = _events(sub, 2, timeout=5)  # half of it free: refilled
        _no_event(sub, 0.5)
        assert sub.ack([m["deliveryId"] for m in first[2:] + second]) == 4
        third = _events(sub, 2, timeout=5)
        assert sub.ack([m["deliveryId"] for m in third]) == 2
    names = [m["event"]["arguments"]["timerName"] for m in first + second + third]
    assert sorted(names) == [f"w{i}" for i in range(8)]


def test_due_resend_goes_out_with_less_than_half_the_window_free(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d: DaemonProcess = daemon_factory(PROGRAM_TIMER_MAX_INFLIGHT=10, PROGRAM_TIMER_ACK_TIMEOUT=3)
    d.start()
    with d.client() as sub, d.client() as c:
        sub.subscribe("resend")
        c.command("set_timer", "my_timer", personaId="p", timerName="a", interval="0.1")
        (a,) = _events(sub, 1)
        received_a = time.monotonic()
        time.sleep(1.5)
        for i in range(9):  # pipelined: they fire together
            c.send(
                {
                    "op": "command",
                    "id": i,
                    "commandIdn": "set_timer",
                    "integrationIdn": "program_timer",
                    "connectorIdn": "my_timer",
                    "arguments": {"personaId": "p", "timerName": f"b{i}", "interval": "0.1"},
                }
            )
        for i in range(9):
            assert c.wait_reply(i)["ok"]
        # a's ack timeout passes while the 9 b's are in flight (1 of 10 free): a is sent again
        # then, not once half of the window times out too (1.5 s later)
        got = _events(sub, 10, timeout=10)
        again = next(m for m in got if m["event"]["arguments"]["timerName"] == "a")
        resent_after = time.monotonic() - received_a
        assert again["deliveryId"] == a["deliveryId"] and again["attempt"] == 2
        bs = [m for m in got if m is not again]
        assert sorted(m["event"]["arguments"]["timerName"] for m in bs) == [
            f"b{i}" for i in range(9)
        ]
        assert all(m["attempt"] == 1 for m in bs)
        assert 2.5 < resent_after < 4.0, resent_after
        assert sub.ack([m["deliveryId"] for m in got]) == 10


def test_pipelined_acks_count_each_delivery_once_and_only_their_own(
    daemon: DaemonProcess,
) -> None:
    with daemon.client() as one, daemon.client() as two, daemon.client() as c:
        one.subscribe("one", persona_id="p1")
        two.subscribe("two", persona_id="p2")
        for i in range(3):
            c.command("set_timer", "my_timer", personaId="p1", timerName=f"t{i}", interval="0.1")
        c.command("set_timer", "my_timer", personaId="p2", timerName="t", interval="0.1")
        a, b, cc = (m["deliveryId"] for m in _events(one, 3))
        (other,) = (m["deliveryId"] for m in _events(two, 1))
        # sent without waiting: they are written together
        one.send({"op": "ack", "id": 101, "deliveryIds": [a, b, other]})
        one.send({"op": "ack", "id": 102, "deliveryIds": [b, cc]})
        one.send({"op": "ack", "id": 103, "deliveryIds": [cc, a]})
        two.send({"op": "ack", "id": 201, "deliveryIds": [a, other]})
        counts = [one.wait_reply(i)["result"]["acked"] for i in (101, 102, 103)]
        assert counts == [2, 1, 0]  # the other subscription's delivery is not theirs to ack
        assert two.wait_reply(201)["result"]["acked"] == 1
        assert c.status()["deliveries"]["pending"] == 0
