"""Request decoding (SPEC 2) and argument validation (SPEC 1.1)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from program_timer.core.event import (
    event_body,
    event_json,
    event_line,
    event_line_start,
)
from program_timer.scheduler.arguments import (
    ArgumentLimits,
    parse_fire_at,
    parse_set_command,
    string_arguments,
)
from program_timer.scheduler.protocol import (
    AckRequest,
    CommandRequest,
    PingRequest,
    ProtocolError,
    SubscribeRequest,
    decode_line,
    encode,
    ok_reply,
)

LIMITS = ArgumentLimits()
UTC_TZ = ZoneInfo("UTC")


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def command(**fields: Any) -> dict[str, Any]:
    req: dict[str, Any] = {
        "op": "command",
        "commandIdn": "set_timer",
        "integrationIdn": "program_timer",
        "connectorIdn": "my_timer",
        "arguments": {"personaId": "p", "timerName": "t"},
    }
    req.update(fields)
    return req


def decode_error(raw: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as exc:
        decode_line(raw)
    return exc.value


def parse(args: dict[str, Any], idn: str = "set_timer", limits: ArgumentLimits = LIMITS) -> Any:
    full: dict[str, Any] = {"personaId": "p", "timerName": "t", **args}
    return parse_set_command(idn, "my_timer", string_arguments(full, limits), "act", limits)


def parse_error(args: dict[str, Any], idn: str = "set_timer") -> ProtocolError:
    with pytest.raises(ProtocolError) as exc:
        parse(args, idn)
    return exc.value


# --- decode_line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"not json", b'{"op": "ping",}', b"\xff\xfe\x00garbage", b'{"op": "ping"} x'],
)
def test_invalid_json(raw: bytes) -> None:
    err = decode_error(raw)
    assert err.code == "invalid_json"
    assert err.request_id is None  # type: ignore[attr-defined]


def test_deeply_nested_json_is_invalid_json_not_a_crash() -> None:
    err = decode_error(b"[" * 200_000 + b"]" * 200_000)
    assert err.code == "invalid_json"


@pytest.mark.parametrize("value", [[], [1, 2], "ping", 3, 1.5, True, None])
def test_non_object_is_invalid_request(value: Any) -> None:
    err = decode_error(line(value))
    assert err.code == "invalid_request"
    assert "object" in err.message


def test_missing_op() -> None:
    err = decode_error(line({"id": 7}))
    assert err.code == "invalid_request"
    assert err.field == "op"
    assert err.request_id == 7  # type: ignore[attr-defined]


@pytest.mark.parametrize("op", ["nope", "PING", "", 5, ["ping"], {"op": "ping"}, True])
def test_unknown_op(op: Any) -> None:
    err = decode_error(line({"id": "r1", "op": op}))
    assert err.code == "unknown_op"
    assert err.field == "op"
    assert "ping" in err.message, "the message lists the known ops"
    assert err.request_id == "r1"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("request_obj", "field"),
    [
        (command(commandIdn=5), "commandIdn"),
        (command(commandIdn=""), "commandIdn"),
        (command(connectorIdn=None), "connectorIdn"),
        (command(integrationIdn=["program_timer"]), "integrationIdn"),
        (command(arguments=[1, 2]), "arguments"),
        (command(arguments="personaId=p"), "arguments"),
        (command(commandActId="not-a-uuid"), "commandActId"),
        (command(bogus=1), "bogus"),
        ({"op": "ack", "deliveryIds": "1"}, "deliveryIds"),
        ({"op": "ack", "deliveryIds": ["1"]}, "deliveryIds.0"),
        ({"op": "ack", "deliveryIds": [True]}, "deliveryIds.0"),
        ({"op": "ack"}, "deliveryIds"),
        ({"op": "subscribe", "subscriptionId": 3}, "subscriptionId"),
        ({"op": "subscribe", "subscriptionId": "s", "filter": []}, "filter"),
        ({"op": "subscribe", "subscriptionId": "s", "filter": {"x": 1}}, "filter.x"),
        (
            {"op": "subscribe", "subscriptionId": "s", "filter": {"personaId": 1}},
            "filter.personaId",
        ),
        ({"op": "unsubscribe"}, "subscriptionId"),
        ({"op": "ping", "extra": True}, "extra"),
    ],
)
def test_wrong_field_types_are_invalid_request_naming_the_field(
    request_obj: dict[str, Any], field: str
) -> None:
    request_obj = {"id": 42, **request_obj}
    err = decode_error(line(request_obj))
    assert err.code == "invalid_request"
    assert err.field == field
    assert field in err.message
    assert err.request_id == 42, "the id is echoed when it could be read"  # type: ignore[attr-defined]


def test_missing_command_fields() -> None:
    req = command()
    del req["commandIdn"]
    err = decode_error(line(req))
    assert err.code == "invalid_request" and err.field == "commandIdn"


@pytest.mark.parametrize(
    "rid",
    [
        "abc",
        0,
        -3,
        1.5,
        True,
        False,
        None,
        "",
        2**63 - 1,
        -(2**63),
        2**64,  # beyond 64 bits orjson would read a float: the standard library reads these
        -(2**64),
        10**40,
        123456789012345678,  # 18 digits: orjson's (exact) reading
    ],
)
def test_scalar_id_is_echoed(rid: Any) -> None:
    got, req = decode_line(line({"id": rid, "op": "ping"}))
    assert got == rid
    assert type(got) is type(rid)
    assert isinstance(req, PingRequest)


def test_absent_id_is_none() -> None:
    got, _ = decode_line(b'{"op": "ping"}')
    assert got is None


@pytest.mark.parametrize("rid", [[1], {"a": 1}, []])
def test_non_scalar_id_is_invalid_request_and_not_echoed(rid: Any) -> None:
    err = decode_error(line({"id": rid, "op": "ping"}))
    assert err.code == "invalid_request"
    assert err.field == "id"
    assert err.request_id is None  # type: ignore[attr-defined]


def test_id_echoed_on_unknown_op_and_validation_errors() -> None:
    assert decode_error(line({"id": "x", "op": "zzz"})).request_id == "x"  # type: ignore[attr-defined]
    err = decode_error(line({"id": "y", "op": "ack", "deliveryIds": "no"}))
    assert err.request_id == "y"  # type: ignore[attr-defined]


def test_valid_requests_decode_to_models() -> None:
    act = str(uuid.uuid4())
    rid, req = decode_line(line(command(id=1, commandActId=act)))
    assert rid == 1
    assert isinstance(req, CommandRequest)
    assert req.commandIdn == "set_timer"
    assert req.arguments == {"personaId": "p", "timerName": "t"}
    assert str(req.commandActId) == act

    _, sub = decode_line(line({"op": "subscribe", "subscriptionId": "s1"}))
    assert isinstance(sub, SubscribeRequest)
    assert sub.filter.personaId is None and sub.filter.connectorIdn is None
    assert sub.flowInstanceId is None

    _, ack = decode_line(line({"op": "ack", "deliveryIds": [1, 2, 3]}))
    assert isinstance(ack, AckRequest) and ack.deliveryIds == [1, 2, 3]


def test_utf8_line_decodes() -> None:
    rid, req = decode_line(line(command(id="é✓")).replace(b"\\u00e9", "é".encode()))
    assert rid == "é✓"
    assert isinstance(req, CommandRequest)


# --- fireAt formats (SPEC 1.1) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-06-01T12:00", datetime(2030, 6, 1, 12, 0, tzinfo=UTC)),
        ("2030-06-01 12:00", datetime(2030, 6, 1, 12, 0, tzinfo=UTC)),
        ("2030-06-01T12:00:07", datetime(2030, 6, 1, 12, 0, 7, tzinfo=UTC)),
        ("2030-06-01T12:00:07.5", datetime(2030, 6, 1, 12, 0, 7, 500_000, tzinfo=UTC)),
        ("2030-06-01T12:00:07.123456", datetime(2030, 6, 1, 12, 0, 7, 123_456, tzinfo=UTC)),
        ("2030-06-01T12:00:07.000001", datetime(2030, 6, 1, 12, 0, 7, 1, tzinfo=UTC)),
        ("2030-06-01T12:00Z", datetime(2030, 6, 1, 12, 0, tzinfo=UTC)),
        ("2030-06-01T12:00:07Z", datetime(2030, 6, 1, 12, 0, 7, tzinfo=UTC)),
        ("2030-06-01T12:00:07.25Z", datetime(2030, 6, 1, 12, 0, 7, 250_000, tzinfo=UTC)),
        ("2030-06-01T12:00+02:00", datetime(2030, 6, 1, 10, 0, tzinfo=UTC)),
        ("2030-06-01T12:00:00+02:00", datetime(2030, 6, 1, 10, 0, tzinfo=UTC)),
        ("2030-06-01T12:00:00+0200", datetime(2030, 6, 1, 10, 0, tzinfo=UTC)),
        ("2030-06-01T12:00:00-05:00", datetime(2030, 6, 1, 17, 0, tzinfo=UTC)),
        ("2030-06-01T12:00:00-0530", datetime(2030, 6, 1, 17, 30, tzinfo=UTC)),
        ("2030-06-01 23:30-05:00", datetime(2030, 6, 2, 4, 30, tzinfo=UTC)),
        ("2030-06-01T12:00:00.5+00:00", datetime(2030, 6, 1, 12, 0, 0, 500_000, tzinfo=UTC)),
    ],
)
def test_fire_at_formats(text: str, expected: datetime) -> None:
    got = parse({"fireAt": text}).fire_at
    assert got == expected
    assert got.utcoffset().total_seconds() == 0, "kept in UTC"


def test_fire_at_without_offset_read_in_timezone_argument() -> None:
    # Paris is UTC+2 in June, UTC+1 in January
    cmd = parse({"fireAt": "2030-06-01T12:00", "timezone": "Europe/Paris"})
    assert cmd.fire_at == datetime(2030, 6, 1, 10, 0, tzinfo=UTC)
    assert cmd.timezone == "Europe/Paris"
    winter = parse({"fireAt": "2030-01-15 12:00:00", "timezone": "Europe/Paris"})
    assert winter.fire_at == datetime(2030, 1, 15, 11, 0, tzinfo=UTC)
    ny = parse({"fireAt": "2030-06-01T12:00", "timezone": "America/New_York"})
    assert ny.fire_at == datetime(2030, 6, 1, 16, 0, tzinfo=UTC)


def test_fire_at_with_offset_ignores_timezone_argument() -> None:
    cmd = parse({"fireAt": "2030-06-01T12:00Z", "timezone": "Europe/Paris"})
    assert cmd.fire_at == datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    cmd = parse({"fireAt": "2030-06-01T12:00-05:00", "timezone": "Asia/Tokyo"})
    assert cmd.fire_at == datetime(2030, 6, 1, 17, 0, tzinfo=UTC)


def test_fire_at_without_offset_uses_default_timezone() -> None:
    assert parse({"fireAt": "2030-06-01T12:00"}).fire_at == datetime(2030, 6, 1, 12, tzinfo=UTC)
    tokyo = ArgumentLimits(default_timezone="Asia/Tokyo")
    cmd = parse({"fireAt": "2030-06-01T12:00"}, limits=tokyo)
    assert cmd.fire_at == datetime(2030, 6, 1, 3, 0, tzinfo=UTC)
    # the timezone argument beats the default
    cmd = parse({"fireAt": "2030-06-01T12:00", "timezone": "UTC"}, limits=tokyo)
    assert cmd.fire_at == datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def test_parse_fire_at_directly() -> None:
    paris = ZoneInfo("Europe/Paris")
    assert parse_fire_at("2030-06-01T12:00", paris) == datetime(2030, 6, 1, 10, tzinfo=UTC)
    assert parse_fire_at(" 2030-06-01T12:00Z ", paris) == datetime(2030, 6, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    "text",
    [
        "2030-06-01T12:00:00Z",
        "2030-06-01T12:00:00.5Z",
        "2030-06-01T12:00:00.000001Z",
        "2030-06-01T12:00:00.123456Z",
        "2030-06-01T12:00:00.1234567Z",
        "2030-06-01T12:00:00.Z",
        "2030-06-01T12:00Z",
        "2030-06-01T23:59:59Z",
        "2030-06-01T24:00:00Z",
        "2030-06-01T12:60:00Z",
        "2030-06-01T12:00:60Z",
        "2030-02-29T12:00:00Z",
        "2032-02-29T12:00:00Z",
        "2030-13-01T12:00:00Z",
        "2030-00-01T12:00:00Z",
        "0000-01-01T00:00:00Z",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "2030-W22-6T12:00:00Z",
        "2030-06-01 12:00:00Z",
        "2030-06-01t12:00:00Z",
        "2030-06-01T12:00:00z",
        "\uff12\uff10\uff13\uff10-06-01T12:00:00Z",  # full-width digits
        "2030-06-01T12:00:0\u0661Z",
    ],
)
def test_fire_at_in_utc_read_as_the_general_form_reads_it(text: str) -> None:
    """``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` has a path of its own (``datetime.fromisoformat``);
    the same text with a trailing space takes the general one: both give the same instant or
    both refuse."""
    paris = ZoneInfo("Europe/Paris")

    def outcome(value: str) -> datetime | str:
        try:
            return parse_fire_at(value, paris)
        except ProtocolError as err:
            return err.message.replace(repr(value), "<given>")

    fast, general = outcome(text), outcome(text + " ")
    assert fast == general
    if isinstance(fast, datetime):
        assert fast.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tomorrow",
        "2030-06-01",
        "2030-06-01T12",
        "2030-6-1T12:00",
        "2030/06/01T12:00",
        "2030-13-01T12:00",
        "2030-02-30T12:00",
        "2030-06-01T24:00",
        "2030-06-01T12:60",
        "2030-06-01T12:00:61",
        "2030-06-01T12:00:00.1234567",
        "2030-06-01T12:00:00.",
        "2030-06-01T12:00+2",
        "2030-06-01T12:00+02:60",
        "2030-06-01T12:00+24:00",
        "2030-06-01T12:00 UTC",
        "0000-01-01T00:00",
        "9999-12-31T23:59-05:00",
        "1717171717",
    ],
)
def test_bad_fire_at(text: str) -> None:
    err = parse_error({"fireAt": text})
    assert err.code == "invalid_argument"
    assert err.field == "fireAt"
    assert err.message.startswith("fireAt")
    assert repr(text) in err.message, "names what was given"
    assert "expected" in err.message and "YYYY-MM-DD" in err.message, "says what is expected"


# --- interval -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("120", 120.0), ("0.5", 0.5), ("1", 1.0), ("86400", 86400.0), ("1.25", 1.25), (".5", 0.5)],
)
def test_interval_values(text: str, seconds: float) -> None:
    cmd = parse({"interval": text})
    assert cmd.interval == seconds
    assert "interval" in cmd.given


@pytest.mark.parametrize(
    "text", ["", "0", "0.0", "-5", "abc", "1e3", "nan", "inf", "1,5", "10s", "PT5M", "999999999999"]
)
def test_bad_interval(text: str) -> None:
    err = parse_error({"interval": text})
    assert err.code == "invalid_argument"
    assert err.field == "interval"
    assert repr(text) in err.message
    assert "expected" in err.message and "seconds" in err.message


# --- repeatable / enabled -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("TRUE", True), ("True", True), ("false", False), ("FaLsE", False)],
)
def test_boolean_arguments_any_case(text: str, value: bool) -> None:
    cmd = parse({"repeatable": text, "enabled": text, "interval": "5"})
    assert cmd.repeatable is value
    assert cmd.enabled is value
    assert {"repeatable", "enabled"} <= cmd.given


def test_boolean_defaults_not_given() -> None:
    cmd = parse({})
    assert cmd.repeatable is False and cmd.enabled is True
    assert cmd.given == frozenset()
    assert cmd.extra is None


@pytest.mark.parametrize("key", ["repeatable", "enabled"])
@pytest.mark.parametrize("text", ["yes", "1", "0", "", "t", "on", "truee"])
def test_bad_boolean(key: str, text: str) -> None:
    err = parse_error({key: text})
    assert err.code == "invalid_argument"
    assert err.field == key
    assert repr(text) in err.message
    assert '"true" or "false"' in err.message


def test_set_repeatable_timer_implies_repeatable() -> None:
    cmd = parse({"interval": "60"}, idn="set_repeatable_timer")
    assert cmd.repeatable is True
    assert "repeatable" in cmd.given
    assert parse({"interval": "60", "repeatable": "TRUE"}, idn="set_repeatable_timer").repeatable


def test_set_repeatable_timer_refuses_repeatable_false() -> None:
    err = parse_error({"interval": "60", "repeatable": "false"}, idn="set_repeatable_timer")
    assert err.code == "invalid_argument" and err.field == "repeatable"


# --- timezone -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tz", ["Mars/Olympus", "", "../../etc/passwd", "/etc/localtime", "Europe/", "Paris", "+02:00"]
)
def test_bad_timezone(tz: str) -> None:
    err = parse_error({"fireAt": "2030-06-01T12:00", "timezone": tz})
    assert err.code == "invalid_argument"
    assert err.field == "timezone"
    assert repr(tz) in err.message
    assert "IANA" in err.message


def test_bad_timezone_refused_even_without_fire_at() -> None:
    err = parse_error({"timezone": "Not/AZone"})
    assert err.field == "timezone"


# --- string_arguments: numbers and booleans as their string form ----------------------------


def test_numbers_and_booleans_mean_their_string_form() -> None:
    args = string_arguments(
        {
            "personaId": 12,
            "timerName": "t",
            "interval": 120,
            "repeatable": True,
            "enabled": False,
            "half": 0.5,
            "whole": 3.0,
            "flag": False,
            "s": "x",
        },
        LIMITS,
    )
    assert args == {
        "personaId": "12",
        "timerName": "t",
        "interval": "120",
        "repeatable": "true",
        "enabled": "false",
        "half": "0.5",
        "whole": "3",
        "flag": "false",
        "s": "x",
    }
    cmd = parse_set_command("set_timer", "c", args, "act", LIMITS)
    assert cmd.persona_id == "12"
    assert cmd.interval == 120.0 and cmd.repeatable is True and cmd.enabled is False
    assert cmd.extra == {"half": "0.5", "whole": "3", "flag": "false", "s": "x"}


def test_json_number_interval_and_boolean_flags_parse() -> None:
    cmd = parse({"interval": 0.5, "repeatable": False, "enabled": True})
    assert cmd.interval == 0.5 and cmd.repeatable is False and cmd.enabled is True


@pytest.mark.parametrize("value", [None, [1], {"a": "b"}, []])
def test_non_scalar_argument_values_are_refused(value: Any) -> None:
    with pytest.raises(ProtocolError) as exc:
        string_arguments({"personaId": "p", "timerName": "t", "note": value}, LIMITS)
    assert exc.value.code == "invalid_argument"
    assert exc.value.field == "note"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_number_arguments_are_refused(value: float) -> None:
    with pytest.raises(ProtocolError) as exc:
        string_arguments({"personaId": "p", "timerName": "t", "note": value}, LIMITS)
    assert exc.value.code == "invalid_argument"


def test_nan_in_request_line_arguments_is_refused_as_invalid_json() -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_line(
            b'{"op":"command","commandIdn":"set_timer","integrationIdn":"program_timer",'
            b'"connectorIdn":"c","arguments":{"personaId":"p","timerName":"t","interval":NaN}}'
        )
    assert exc.value.code == "invalid_json"


def test_argument_count_and_length_limits() -> None:
    small = ArgumentLimits(max_arguments=3, max_argument_length=10)
    with pytest.raises(ProtocolError) as exc:
        string_arguments({"personaId": "p", "timerName": "t", "a": "1", "b": "2"}, small)
    assert exc.value.code == "invalid_argument" and exc.value.field == "arguments"
    with pytest.raises(ProtocolError) as exc:
        string_arguments({"personaId": "p", "note": "x" * 11}, small)
    assert exc.value.code == "invalid_argument" and exc.value.field == "note"
    with pytest.raises(ProtocolError) as exc:
        string_arguments({"": "x"}, small)
    assert exc.value.field == "arguments"


# --- personaId / timerName ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["personaId", "timerName"])
def test_name_lengths(key: str) -> None:
    for ok in ("x", "é" * 255, "a" * 255):
        cmd = parse({key: ok})
        assert getattr(cmd, "persona_id" if key == "personaId" else "timer_name") == ok
    for bad in ("", "a" * 256):
        err = parse_error({key: bad})
        assert err.code == "invalid_argument"
        assert err.field == key
        assert "1 to 255" in err.message


@pytest.mark.parametrize("key", ["personaId", "timerName"])
def test_names_are_required(key: str) -> None:
    args = {"personaId": "p", "timerName": "t"}
    del args[key]
    with pytest.raises(ProtocolError) as exc:
        parse_set_command("set_timer", "c", string_arguments(args, LIMITS), "act", LIMITS)
    assert exc.value.code == "invalid_argument"
    assert exc.value.field == key
    assert "required" in exc.value.message


# --- extra arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["scheduledAt", "fireCount", "missedCount", "firedAt"])
def test_extra_argument_colliding_with_event_key_is_refused(key: str) -> None:
    err = parse_error({key: "1", "interval": "5"})
    assert err.code == "invalid_argument"
    assert err.field == key
    assert key in err.message


def test_extra_arguments_are_carried_unchanged() -> None:
    cmd = parse({"interval": "5", "topic": "  Follow up ", "n": 3, "empty": ""})
    assert cmd.extra == {"topic": "  Follow up ", "n": "3", "empty": ""}
    assert cmd.given == frozenset({"interval"})
    assert cmd.persona_id == "p" and cmd.timer_name == "t"
    assert cmd.connector_idn == "my_timer" and cmd.command_act_id == "act"


def test_rule_arguments_are_not_extras() -> None:
    cmd = parse(
        {
            "fireAt": "2030-01-01T00:00Z",
            "interval": "5",
            "repeatable": "true",
            "enabled": "true",
            "timezone": "UTC",
        }
    )
    assert cmd.extra is None
    assert cmd.given == frozenset({"fireAt", "interval", "repeatable", "enabled"})


def test_rejected_argument_is_reported_first_by_its_name_only() -> None:
    err = parse_error({"interval": "x", "topic": "fine"})
    assert err.field == "interval"
    assert err.to_dict() == {
        "code": "invalid_argument",
        "message": err.message,
        "field": "interval",
    }


def test_long_bad_value_is_shortened_in_message() -> None:
    err = parse_error({"interval": "9" * 500 + "x"})
    assert err.field == "interval"
    assert len(err.message) < 250
    assert "..." in err.message


# --- replies to what decode_line accepted must be encodable ---------------------------------


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_constants_are_invalid_json(constant: bytes) -> None:
    err = decode_error(b'{"op":"ping","id":' + constant + b"}")
    assert err.code == "invalid_json"


def test_lone_surrogate_is_refused_or_reply_is_encodable() -> None:
    raw = b'{"op":"ping","id":"\\ud800"}'
    try:
        rid, _ = decode_line(raw)
    except ProtocolError as err:
        assert err.code in {"invalid_json", "invalid_request"}
        return
    reply = encode(ok_reply(rid, {"pong": True}))
    assert json.loads(reply)["id"] == rid


@pytest.mark.parametrize(
    ("subscription_id", "flow_instance_id", "delivery_id", "attempt"),
    [
        ("flow-42", "flow-42", 1, 1),
        ('quote " back \\ slash', "é 日本 😀 \n\t", 2**63 - 1, 17),
        ("", "</script>", 0, 2),
    ],
)
def test_a_push_line_is_the_push_message_encoded(
    subscription_id: str, flow_instance_id: str, delivery_id: int, attempt: int
) -> None:
    """Pushes are spliced from bytes (the subscription's start, the event's JSON made once):
    the line is byte for byte what encoding the whole message gives, and one JSON line."""
    event = event_body(
        external_event_id=str(uuid.uuid4()),
        persona_id='p "1" \\ ü',
        connector_idn="c",
        command_act_id=str(uuid.uuid4()),
        arguments={"timerName": "t\u2028", "k": "v"},
    )
    line = event_line(
        event_line_start(subscription_id, flow_instance_id),
        delivery_id,
        attempt,
        event_json(event),
    )
    message = {
        "op": "event",
        "subscriptionId": subscription_id,
        "flowInstanceId": flow_instance_id,
        "deliveryId": delivery_id,
        "attempt": attempt,
        "event": event,
    }
    assert line == encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == message
