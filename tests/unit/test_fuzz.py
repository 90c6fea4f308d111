"""Property-based tests: the decoder and the argument parser only ever fail with their own
errors, and repeating timers stay on their grid whatever the lateness."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from program_timer.core.model import (
    DISABLED,
    SCHEDULED,
    UNSCHEDULED,
    Limits,
    RuleError,
    SetCommand,
)
from program_timer.core.rules import (
    apply_set,
    fire,
)
from program_timer.scheduler import protocol
from program_timer.scheduler.arguments import (
    ArgumentLimits,
    parse_set_command,
    string_arguments,
)
from program_timer.scheduler.protocol import (
    OPS,
    ProtocolError,
    decode_line,
)

# Hypothesis's failure report imports code that warns; keep a real failure readable under
# filterwarnings=error.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- strategies -----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)

FIELD_NAMES = [
    "id",
    "op",
    "commandIdn",
    "integrationIdn",
    "connectorIdn",
    "arguments",
    "commandActId",
    "subscriptionId",
    "flowInstanceId",
    "filter",
    "deliveryIds",
    "personaId",
    "bogus",
]
ops = st.sampled_from([*OPS, "event", "", "PING"]) | json_values
request_objects = st.builds(
    lambda op, fields: {"op": op, **fields},
    ops,
    st.dictionaries(
        st.sampled_from(FIELD_NAMES[2:]) | st.text(max_size=8), json_values, max_size=6
    ),
) | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), json_values, max_size=8)


def _nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "open":
        return b"[" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    # a request whose id / arguments are deeply nested
    return b'{"op":"ping","id":' + b"[" * depth + b"]" * depth + b"}"


deep_lines = st.builds(
    _nested,
    st.integers(min_value=1, max_value=200_000),
    st.sampled_from(["list", "open", "object", "id"]),
)


def _check_decode(raw: bytes) -> None:
    try:
        decode_line(raw)
    except ProtocolError as err:
        assert err.code in {"invalid_json", "invalid_request", "unknown_op"}
        assert isinstance(err.message, str) and err.message


# --- decode_line never raises anything but ProtocolError ------------------------------------


@FAST
@given(st.binary(max_size=300))
def test_decode_line_arbitrary_bytes(raw: bytes) -> None:
    _check_decode(raw)


@FAST
@given(json_values)
def test_decode_line_arbitrary_json_values(value: Any) -> None:
    _check_decode(json.dumps(value).encode())


@FAST
@given(request_objects)
def test_decode_line_arbitrary_request_objects(obj: dict[str, Any]) -> None:
    _check_decode(json.dumps(obj).encode())
    _check_decode(json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass"))


@FAST
@given(deep_lines)
def test_decode_line_deeply_nested(raw: bytes) -> None:
    _check_decode(raw)


@FAST
@given(st.integers(min_value=1, max_value=5000))
def test_decode_line_nested_arguments_of_a_valid_command(depth: int) -> None:
    raw = (
        b'{"op":"command","commandIdn":"set_timer","integrationIdn":"program_timer",'
        b'"connectorIdn":"c","arguments":{"x":' + b"[" * depth + b"]" * depth + b"}}"
    )
    _check_decode(raw)


# --- the direct read (pydantic from the bytes) and the long way agree -----------------------

valid_requests = st.one_of(
    st.builds(
        lambda rid, args, act, connector: {
            "op": "command",
            "id": rid,
            "commandIdn": "set_timer",
            "integrationIdn": "program_timer",
            "connectorIdn": connector,
            "arguments": args,
            **({"commandActId": act} if act else {}),
        },
        json_scalars,
        st.dictionaries(st.text(max_size=12), json_values, max_size=6),
        st.none() | st.uuids().map(str),
        st.text(min_size=1, max_size=8),
    ),
    st.builds(
        lambda rid, ids: {"op": "ack", "id": rid, "deliveryIds": ids},
        json_scalars,
        st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=5),
    ),
    st.builds(
        lambda sub, since, persona: {
            "op": "subscribe",
            "subscriptionId": sub,
            "since": since,
            "filter": {"personaId": persona},
        },
        st.text(min_size=1, max_size=8),
        st.none() | st.datetimes().map(lambda d: d.isoformat()) | st.text(max_size=8),
        st.none() | st.text(max_size=8),
    ),
    st.builds(lambda rid, op: {"op": op, "id": rid}, json_scalars, st.sampled_from(OPS)),
)


def _answer(read: Any, raw: bytes) -> tuple[Any, ...]:
    try:
        rid, request = read(raw)
    except ProtocolError as err:
        return ("refused", err.code, err.message, err.field, err.request_id)  # type: ignore[attr-defined]
    return ("read", type(rid), rid, type(request), request)


def _check_agree(raw: bytes) -> None:
    assert _answer(decode_line, raw) == _answer(protocol._decode_parsed, raw)


@FAST
@given(valid_requests | request_objects)
def test_the_direct_read_and_the_long_way_agree(obj: dict[str, Any]) -> None:
    """Whatever a line holds, reading it straight from its bytes gives what reading its JSON
    value first gives: the same request (its id of the same type), or the same refusal."""
    _check_agree(json.dumps(obj).encode())
    _check_agree(json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize(
    "value", [b"NaN", b"-Infinity", b"1" * 19, b"1" * 5000, b"1e400", b'"\\ud800"', b"-0"]
)
def test_the_direct_read_and_the_long_way_agree_on_the_edges_of_json(value: bytes) -> None:
    """Numbers and escapes that pydantic's JSON reader and the standard read differently."""
    _check_agree(
        b'{"op":"command","id":' + value + b',"commandIdn":"set_timer",'
        b'"integrationIdn":"program_timer","connectorIdn":"c","arguments":{"x":' + value + b"}}"
    )


def test_a_usual_line_is_read_straight_from_its_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    def long_way(line: bytes) -> Any:
        raise AssertionError("read the long way")

    monkeypatch.setattr(protocol, "_decode_parsed", long_way)
    rid, request = decode_line(
        b'{"op":"command","id":7,"commandIdn":"set_timer","integrationIdn":"program_timer",'
        b'"connectorIdn":"c","arguments":{"personaId":"p","timerName":"t","interval":"5"}}'
    )
    assert rid == 7
    assert isinstance(request, protocol.CommandRequest)
    assert request.arguments == {"personaId": "p", "timerName": "t", "interval": "5"}
    _, ack = decode_line(b'{"op":"ack","deliveryIds":[1,2]}')
    assert isinstance(ack, protocol.AckRequest) and ack.deliveryIds == [1, 2]


# --- string_arguments + parse_set_command (+ apply_set) -------------------------------------

ARG_KEYS = [
    "personaId",
    "timerName",
    "fireAt",
    "interval",
    "repeatable",
    "enabled",
    "timezone",
    "scheduledAt",
    "firedAt",
    "fireCount",
    "missedCount",
    "topic",
]
argument_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["true", "false", "TRUE", "0", "1", "0.5", "120", "-1", "1e9", ".5", "5."]),
    st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Mars/Base", "../x", "Factory"]),
    st.from_regex(
        r"\A\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,7})?)?(Z|[+-]\d{2}:?\d{2})?\Z"
    ),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
)
# Non-finite floats are left out here: they crash string_arguments (see the strict xfail
# test_non_finite_number_arguments_are_refused in test_protocol.py).
argument_values = st.one_of(
    argument_text,
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
fire_at_texts = st.from_regex(
    r"\A\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,7})?)?(Z|[+-]\d{2}:?\d{2})?\Z"
) | st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
).map(lambda d: d.isoformat())
interval_values = st.one_of(
    st.integers(min_value=1, max_value=10**6),
    st.floats(min_value=0.001, max_value=1e6),
    st.floats(min_value=0.001, max_value=1e6).map(str),
    st.sampled_from(["0", "-1", "0.5", "315360000", "315360001", "1e3"]),
)


# Mostly well-formed rule arguments, so that parsing often gets as far as apply_set, plus
# random extra keys (including the event's own keys) that may override them.
def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` nine times in ten, any argument value otherwise."""
    return st.integers(min_value=0, max_value=9).flatmap(
        lambda i: argument_values if i == 0 else valid
    )


argument_dicts = st.builds(
    lambda extra, rule: {**extra, **rule},
    st.one_of(
        st.dictionaries(st.text(min_size=1, max_size=10), argument_text, max_size=3),
        st.dictionaries(
            st.sampled_from(ARG_KEYS) | st.text(max_size=10), argument_values, max_size=6
        ),
    ),
    st.fixed_dictionaries(
        {"personaId": mostly(st.just("p")), "timerName": mostly(st.just("t"))},
        optional={
            "fireAt": mostly(fire_at_texts),
            "interval": mostly(interval_values),
            "repeatable": mostly(st.booleans()),
            "enabled": mostly(st.booleans()),
            "timezone": mostly(st.sampled_from(["UTC", "Europe/Paris", "Asia/Kolkata"])),
        },
    ),
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@FAST
@given(
    argument_dicts,
    st.sampled_from(["set_timer", "set_repeatable_timer"]),
    st.sampled_from(["UTC", "Europe/Paris", "Pacific/Kiritimati"]),
)
def test_argument_parsing_raises_only_protocol_or_rule_errors(
    raw: dict[str, Any], idn: str, default_tz: str
) -> None:
    limits = ArgumentLimits(default_timezone=default_tz)
    try:
        args = string_arguments(raw, limits)
        assert all(isinstance(v, str) for v in args.values())
        cmd = parse_set_command(idn, "conn", args, "act", limits)
        timer, warnings = apply_set(None, cmd, NOW, Limits())
        again, _ = apply_set(timer, cmd, NOW + timedelta(seconds=1), Limits())
    except ProtocolError as err:
        assert err.code == "invalid_argument"
        assert err.field
        return
    except RuleError as err:
        assert err.field == "interval"
        return
    assert timer.state in {SCHEDULED, DISABLED, UNSCHEDULED}
    assert (timer.due_at is not None) == (timer.state == SCHEDULED)
    assert all(isinstance(w, str) for w in warnings)
    assert again.created_at == NOW


# --- repeating timers stay on their grid ----------------------------------------------------

anchors = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
intervals = st.integers(min_value=1, max_value=1000).map(float) | st.floats(
    min_value=1.0, max_value=1000.0, allow_nan=False, allow_infinity=False
)
MICRO = timedelta(microseconds=1)


def grid(anchor: datetime, interval: float, k: int) -> datetime:
    return anchor + timedelta(seconds=k * interval)


@st.composite
def late_fires(draw: st.DrawFn) -> tuple[Any, datetime, datetime]:
    """A due repeating timer, its due time and a firing time at or after it."""
    anchor = draw(anchors)
    interval = draw(intervals)
    with_fire_at = draw(st.booleans())
    # the command came some time before or after the anchor
    cmd_time = anchor + timedelta(seconds=draw(st.floats(min_value=-86400, max_value=86400 * 30)))
    given = {"interval", "repeatable"} | ({"fireAt"} if with_fire_at else set())
    cmd = SetCommand(
        persona_id="p",
        timer_name="t",
        connector_idn="c",
        command_act_id="a",
        fire_at=anchor if with_fire_at else None,
        interval=interval,
        repeatable=True,
        given=frozenset(given),
    )
    timer, _ = apply_set(None, cmd, cmd_time, Limits())
    due = timer.due_at
    assert due is not None
    # late by a random amount, or exactly on / next to a later grid point
    steps = draw(st.integers(min_value=0, max_value=300))
    kind = draw(st.sampled_from(["random", "on", "before", "after"]))
    if kind == "random":
        now = due + timedelta(seconds=draw(st.floats(min_value=0, max_value=interval * 300)))
    else:
        k_due = round((due - timer.anchor_at).total_seconds() / interval)
        now = grid(timer.anchor_at, interval, k_due + steps)
        now += {"on": 0 * MICRO, "before": -MICRO, "after": MICRO}[kind]
    assume(now >= due)
    return timer, due, now


@FAST
@given(late_fires())
def test_repeating_fire_moves_to_first_grid_time_after_now(
    case: tuple[Any, datetime, datetime],
) -> None:
    timer, due, now = case
    anchor, interval = timer.anchor_at, timer.interval
    out = fire(timer, now, None)

    assert out.fired and out.dropped == 0
    assert out.state == SCHEDULED
    assert out.scheduled_at == due
    assert out.fire_count == timer.fire_count + 1
    nxt = out.due_at
    assert nxt is not None and out.planned_at == nxt
    # strictly after now, and on the grid (within 1 ms)
    assert nxt > now
    k_next = round((nxt - anchor).total_seconds() / interval)
    assert abs((nxt - grid(anchor, interval, k_next)).total_seconds()) <= 1e-3
    # the first grid time after now: the one before it is not after now
    assert grid(anchor, interval, k_next - 1) <= now
    # one fire for every grid point in [due, now]
    k_due = round((due - anchor).total_seconds() / interval)
    assert abs((due - grid(anchor, interval, k_due)).total_seconds()) <= 1e-3
    points = sum(1 for k in range(k_due, k_next + 2) if due <= grid(anchor, interval, k) <= now)
    assert out.missed_count + 1 == points
