"""The wire protocol of SPEC 2 through the real socket: replies, error codes with field,
pipelining in order, the 1 MiB line limit, socket mode, and isolation between clients."""

from __future__ import annotations

import json
import os
import socket
import stat
import uuid

import pytest

from tests.daemon_proc import DaemonProcess


def _raw(d: DaemonProcess) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(d.socket)
    return s


def _lines(s: socket.socket, n: int) -> list[dict]:
    buf = b""
    out: list[dict] = []
    while len(out) < n:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf and len(out) < n:
            line, _, buf = buf.partition(b"\n")
            out.append(json.loads(line))
    return out


def _cmd(rid: object, command: str = "set_timer", **args: object) -> dict:
    return {
        "op": "command",
        "id": rid,
        "commandIdn": command,
        "integrationIdn": "program_timer",
        "connectorIdn": "my_timer",
        "arguments": args,
    }


def test_socket_created_with_mode_0660(daemon: DaemonProcess) -> None:
    mode = stat.S_IMODE(os.stat(daemon.socket).st_mode)
    assert mode == 0o660


def test_ping_and_status(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        assert c.request("ping") == {"pong": True}
        st = c.status()
    assert st["version"] and st["database"] in ("sqlite", "postgresql")
    assert set(st["timers"]) == {"scheduled", "disabled", "unscheduled", "fired"}
    assert "lateness" in st["fires"] and "pending" in st["deliveries"]


@pytest.mark.parametrize(
    ("payload", "code", "field"),
    [
        (b"{not json}\n", "invalid_json", None),
        (b"[1,2]\n", "invalid_request", None),
        (b'{"id": 7}\n', "invalid_request", "op"),
        (b'{"op": "fly", "id": 7}\n', "unknown_op", "op"),
        (b'{"op": "command", "id": 7, "commandIdn": 5}\n', "invalid_request", "commandIdn"),
        (b'{"op": "ack", "id": 7, "deliveryIds": "x"}\n', "invalid_request", "deliveryIds"),
        (
            json.dumps(_cmd(7, "explode", personaId="p")).encode() + b"\n",
            "unknown_command",
            "commandIdn",
        ),
        (
            json.dumps(
                {**_cmd(7, personaId="p", timerName="t"), "integrationIdn": "twilio"}
            ).encode()
            + b"\n",
            "unknown_integration",
            "integrationIdn",
        ),
        (
            json.dumps(_cmd(7, personaId="p", timerName="t", interval="soon")).encode() + b"\n",
            "invalid_argument",
            "interval",
        ),
        (
            json.dumps(_cmd(7, personaId="p", timerName="t", repeatable="true")).encode() + b"\n",
            "invalid_argument",
            "interval",
        ),
        (json.dumps(_cmd(7, timerName="t")).encode() + b"\n", "invalid_argument", "personaId"),
        (
            json.dumps(_cmd(7, personaId="p", timerName="t", fireAt="tomorrow")).encode() + b"\n",
            "invalid_argument",
            "fireAt",
        ),
        (
            json.dumps(_cmd(7, personaId="p", timerName="t", firedAt="x", interval="5")).encode()
            + b"\n",
            "invalid_argument",
            "firedAt",
        ),
        (
            json.dumps(_cmd(7, "get_timer", personaId="p", timerName="nope")).encode() + b"\n",
            "not_found",
            "timerName",
        ),
    ],
)
def test_errors_have_code_and_field(
    daemon: DaemonProcess, payload: bytes, code: str, field: str | None
) -> None:
    with _raw(daemon) as s:
        s.sendall(payload)
        (reply,) = _lines(s, 1)
        assert reply["ok"] is False
        assert reply["error"]["code"] == code, reply
        assert reply["error"].get("field") == field, reply
        assert reply["error"]["message"]
        if code not in ("invalid_json", "invalid_request") or field:
            assert reply["id"] in (7, None)
        # the connection still works after an error
        s.sendall(b'{"op":"ping","id":"after"}\n')
        (pong,) = _lines(s, 1)
        assert pong == {"id": "after", "ok": True, "result": {"pong": True}}


def test_rejected_command_changes_nothing(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        c.command("set_timer", "my_timer", personaId="p", timerName="t", interval="60", a="1")
        with pytest.raises(Exception, match="invalid_argument"):
            c.command("set_timer", "my_timer", personaId="p", timerName="t", interval="-1", a="2")
        timer = c.command("get_timer", "my_timer", personaId="p", timerName="t")["timer"]
    assert timer["interval"] == "60" and timer["arguments"] == {"a": "1"}


def test_pipelined_replies_in_request_order(daemon: DaemonProcess) -> None:
    n = 500
    with _raw(daemon) as s:
        batch = b"".join(
            json.dumps(
                _cmd(i, personaId="pipe", timerName=f"t{i:04d}", interval="3600")
                if i % 7
                else {"op": "ping", "id": i}
            ).encode()
            + b"\n"
            for i in range(n)
        )
        s.sendall(batch)
        replies = _lines(s, n)
    assert [r["id"] for r in replies] == list(range(n))
    assert all(r["ok"] for r in replies)
    with daemon.client() as c:
        listed = c.command("list_timers", "my_timer", personaId="pipe", limit="1000")["timers"]
    assert len(listed) == n - len(range(0, n, 7))


def test_commands_read_together_are_each_answered_in_place(daemon: DaemonProcess) -> None:
    """Lines read together go to the store worker as runs of commands (one future for a run):
    every command still gets its own reply, in its place among pings, lines that are not
    requests and commands that fail."""
    lines = [
        _cmd(0, personaId="run", timerName="a", interval="60"),
        _cmd(1, personaId="run", timerName="b", interval="-1"),
        b'{"op":"command","id":2,',
        {"op": "ping", "id": 3},
        _cmd(4, personaId="run", timerName="a", interval="120"),
        _cmd(5, "get_timer", personaId="run", timerName="nope"),
        b"   ",
        _cmd(6, "get_timer", personaId="run", timerName="a"),
        {"op": "command", "id": 7, "commandIdn": "set_timer"},
        _cmd(8, "delete_timer", personaId="run", timerName="a"),
    ]
    payload = b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )
    with _raw(daemon) as s:
        s.sendall(payload)
        replies = _lines(s, 9)
    outcome = [(r.get("id"), r["ok"] or r["error"]["code"]) for r in replies]
    assert outcome == [
        (0, True),
        (1, "invalid_argument"),
        (None, "invalid_json"),
        (3, True),
        (4, True),
        (5, "not_found"),
        (6, True),
        (7, "invalid_request"),
        (8, True),
    ]
    assert replies[4]["result"]["timer"]["interval"] == "120"
    assert replies[6]["result"]["timer"]["interval"] == "120"  # the command before it applied
    assert replies[8]["result"]["removed"] is True


def test_a_line_over_one_mib_is_too_large_and_others_unaffected(daemon: DaemonProcess) -> None:
    with _raw(daemon) as bystander, _raw(daemon) as s:
        s.sendall(b'{"op":"ping","pad":"' + b"x" * (1024 * 1024 + 10) + b'"}\n')
        (reply,) = _lines(s, 1)
        assert reply["error"]["code"] == "too_large"
        bystander.sendall(b'{"op":"ping","id":1}\n')
        assert _lines(bystander, 1)[0]["ok"] is True


def test_a_line_just_under_the_limit_is_read(daemon: DaemonProcess) -> None:
    with _raw(daemon) as s:
        pad = "x" * (1024 * 1024 - 100)
        s.sendall(json.dumps({"op": "ping", "id": 1, "pad": pad}).encode() + b"\n")
        (reply,) = _lines(s, 1)
        # an unknown field is refused, but the line was read and parsed
        assert reply["error"]["code"] == "invalid_request"


def test_command_act_id_replays_the_first_reply(daemon: DaemonProcess) -> None:
    act = str(uuid.uuid4())
    with daemon.client() as c:
        first = c.command(
            "set_timer",
            "my_timer",
            command_act_id=act,
            personaId="p",
            timerName="once",
            interval="60",
        )
        again = c.command(
            "set_timer",
            "my_timer",
            command_act_id=act,
            personaId="p",
            timerName="once",
            interval="999",
        )
        assert again == first
        assert first["commandActId"] == act
        timer = c.command("get_timer", "my_timer", personaId="p", timerName="once")["timer"]
        assert timer["interval"] == "60" and timer["commandActId"] == act
        fresh = c.command("set_timer", "my_timer", personaId="p", timerName="x", interval="5")
        uuid.UUID(fresh["commandActId"])


def test_quota_per_persona(daemon_factory: object) -> None:
    d: DaemonProcess = daemon_factory(PROGRAM_TIMER_MAX_TIMERS_PER_PERSONA=3)  # type: ignore[operator]
    d.start()
    with d.client() as c:
        for i in range(3):
            c.command("set_timer", "my_timer", personaId="q", timerName=f"t{i}", interval="60")
        with pytest.raises(Exception, match="quota_exceeded"):
            c.command("set_timer", "my_timer", personaId="q", timerName="t3", interval="60")
        # re-setting an existing name is not a new timer
        c.command("set_timer", "my_timer", personaId="q", timerName="t0", interval="30")
        # another persona has its own quota
        c.command("set_timer", "my_timer", personaId="other", timerName="t3", interval="60")
        c.command("delete_timer", "my_timer", personaId="q", timerName="t1")
        c.command("set_timer", "my_timer", personaId="q", timerName="t3", interval="60")


def test_list_paging_delete_and_delete_all(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        for i in range(5):
            c.command("set_timer", "my_timer", personaId="pg", timerName=f"n{i}", interval="60")
        page = c.command("list_timers", "my_timer", personaId="pg", limit="2")
        assert [t["timerName"] for t in page["timers"]] == ["n0", "n1"]
        assert page["nextAfter"] == "n1"
        page2 = c.command("list_timers", "my_timer", personaId="pg", limit="2", after="n1")
        assert [t["timerName"] for t in page2["timers"]] == ["n2", "n3"]
        assert c.command("delete_timer", "my_timer", personaId="pg", timerName="n0")["removed"]
        assert not c.command("delete_timer", "my_timer", personaId="pg", timerName="n0")["removed"]
        assert c.command("delete_timers", "my_timer", personaId="pg")["removed"] == 4
        assert c.command("list_timers", "my_timer", personaId="pg")["timers"] == []


def test_upsert_keeps_unsent_arguments_and_replaces_extras(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        c.command(
            "set_repeatable_timer",
            "my_timer",
            personaId="u",
            timerName="t",
            interval="60",
            a="1",
            b="2",
        )
        t = c.command("set_timer", "other_conn", personaId="u", timerName="t", enabled="false")[
            "timer"
        ]
        assert t["repeatable"] is True and t["interval"] == "60"
        assert t["arguments"] == {"a": "1", "b": "2"} and t["connectorIdn"] == "other_conn"
        t = c.command("set_timer", "my_timer", personaId="u", timerName="t", c="3")["timer"]
        assert t["arguments"] == {"c": "3"} and t["enabled"] is False


def test_numbers_and_booleans_mean_their_string_form(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        t = c.command(
            "set_timer",
            "my_timer",
            personaId="u",
            timerName="n",
            interval=90,
            repeatable=True,
            count=3,
        )["timer"]
    assert t["interval"] == "90" and t["repeatable"] is True
    assert t["arguments"] == {"count": "3"}
