"""The local socket protocol of SPEC 2, in one place.

One JSON object per line. Requests are validated by the pydantic models below into exactly one
:class:`ProtocolError`; replies and pushed events are plain dicts built by the functions here.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from scheduler.clock import utc_iso
from scheduler.rules import EVENT_ARGUMENT_KEYS, SetCommand, Timer, format_interval

MAX_LINE: Final = 1024 * 1024
INTEGRATION: Final = "program_timer"

ERROR_CODES: Final = frozenset(
    {
        "invalid_json",
        "invalid_request",
        "unknown_op",
        "unknown_command",
        "unknown_integration",
        "unknown_connector",
        "invalid_argument",
        "not_found",
        "quota_exceeded",
        "too_large",
        "unavailable",
        "internal",
        "forbidden",
    }
)

SET_COMMANDS: Final = frozenset({"set_timer", "set_repeatable_timer"})
COMMANDS: Final = SET_COMMANDS | {"delete_timer", "get_timer", "list_timers", "delete_timers"}
OPS: Final = ("command", "subscribe", "ack", "unsubscribe", "status", "ping")


class ProtocolError(Exception):
    """A request that gets an error reply: ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        assert code in ERROR_CODES, code
        self.code = code
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return error


Scalar = StrictStr | StrictInt | StrictFloat | StrictBool | None
Name = Annotated[str, Field(min_length=1, max_length=255)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Scalar = None


class CommandRequest(_Request):
    op: Literal["command"]
    commandIdn: Name
    integrationIdn: Name
    connectorIdn: Name
    arguments: dict[str, Any] = Field(default_factory=dict)
    commandActId: uuid.UUID | None = None


class SubscriptionFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    connectorIdn: Name | None = None
    personaId: Name | None = None


class SubscribeRequest(_Request):
    op: Literal["subscribe"]
    subscriptionId: Name
    flowInstanceId: Name | None = None
    filter: SubscriptionFilter = Field(default_factory=SubscriptionFilter)


class AckRequest(_Request):
    op: Literal["ack"]
    deliveryIds: Annotated[list[StrictInt], Field(max_length=10_000)]


class UnsubscribeRequest(_Request):
    op: Literal["unsubscribe"]
    subscriptionId: Name


class StatusRequest(_Request):
    op: Literal["status"]


class PingRequest(_Request):
    op: Literal["ping"]


Request = (
    CommandRequest
    | SubscribeRequest
    | AckRequest
    | UnsubscribeRequest
    | StatusRequest
    | PingRequest
)
_MODELS: Final[dict[str, type[BaseModel]]] = {
    "command": CommandRequest,
    "subscribe": SubscribeRequest,
    "ack": AckRequest,
    "unsubscribe": UnsubscribeRequest,
    "status": StatusRequest,
    "ping": PingRequest,
}
_SCALAR: Final[TypeAdapter[Any]] = TypeAdapter(Scalar)


def _first_error(exc: ValidationError) -> tuple[str | None, str]:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"]) or None
    msg = str(err["msg"]).removeprefix("Value error, ")
    return loc, msg


def request_id(obj: Any) -> Any:
    """The ``id`` to echo, or ``None`` where the request has no usable one."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if rid is None or isinstance(rid, str | int | float | bool):
            return rid
    return None


def decode_line(line: bytes) -> tuple[Any, Request]:
    """Parse one request line into (its id, the validated request).

    :raises ProtocolError: ``invalid_json``, ``invalid_request``, ``unknown_op``, with the
        request's id attached as ``exc.request_id`` where one could be read.
    """
    try:
        text = line.decode("utf-8")  # strict: no surrogates, no UTF-16/32 guessing
        obj = _DECODER.decode(text)
        if "\\u" in text and _has_lone_surrogate(obj):
            raise ValueError("a \\u escape encodes half of a surrogate pair, which is not text")
    except RecursionError as exc:
        raise _with_id(
            ProtocolError("invalid_json", "the JSON is nested too deeply"), None
        ) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise _with_id(ProtocolError("invalid_json", f"not valid JSON: {exc}"), None) from exc
    rid = request_id(obj)
    if not isinstance(obj, dict):
        raise _with_id(ProtocolError("invalid_request", "a request must be a JSON object"), None)
    op = obj.get("op")
    if op is None:
        raise _with_id(ProtocolError("invalid_request", "op is required", "op"), rid)
    if not isinstance(op, str) or op not in _MODELS:
        raise _with_id(
            ProtocolError(
                "unknown_op", f"unknown op {_shorten(op)}; expected one of {', '.join(OPS)}", "op"
            ),
            rid,
        )
    try:
        _SCALAR.validate_python(obj.get("id"))
    except ValidationError as exc:
        raise _with_id(
            ProtocolError("invalid_request", "id must be a JSON scalar", "id"), None
        ) from exc
    try:
        request = _MODELS[op].model_validate(obj)
    except ValidationError as exc:
        loc, msg = _first_error(exc)
        loc = None if loc is None else _shorten(loc, quote=False)
        raise _with_id(
            ProtocolError("invalid_request", f"{loc}: {msg}" if loc else msg, loc), rid
        ) from exc
    return rid, request  # type: ignore[return-value]


def _shorten(value: Any, quote: bool = True, limit: int = 80) -> str:
    """A value for an error message: a hostile client's megabyte is not echoed back."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant)


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _with_id(err: ProtocolError, rid: Any) -> ProtocolError:
    err.request_id = rid  # type: ignore[attr-defined]
    return err


def ok_reply(rid: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "ok": True, "result": result}


def error_reply(rid: Any, err: ProtocolError) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": err.to_dict()}


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


# --- command arguments (SPEC 1.1) -----------------------------------------------------------

_FIRE_AT = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?"
    r"(Z|z|[+-]\d{2}:?\d{2})?$"
)
_NUMBER = re.compile(r"^\s*(\d+(\.\d*)?|\.\d+)\s*$")
FIRE_AT_FORMAT: Final = "YYYY-MM-DD[T]HH:MM[:SS[.ffffff]][Z or ±HH[:]MM]"


def argument_string(key: str, value: Any) -> str:
    """Arguments are strings; JSON numbers and booleans mean their string form."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(
                "invalid_argument", f"{key}: expected a finite number, got {value!r}", key
            )
        return format_interval(value) or repr(value)
    raise ProtocolError(
        "invalid_argument",
        f"{key}: expected a string (or a number or boolean), got {type(value).__name__}",
        key,
    )


def _bad(key: str, given: str, expected: str) -> ProtocolError:
    shown = given if len(given) <= 80 else given[:77] + "..."
    return ProtocolError("invalid_argument", f"{key}: got {shown!r}, expected {expected}", key)


def parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise _bad(key, value, '"true" or "false"')


def parse_interval(value: str) -> float:
    if not _NUMBER.match(value):
        raise _bad("interval", value, 'a positive number of seconds, like "120" or "0.5"')
    seconds = float(value)
    if not seconds > 0 or seconds > 10 * 365 * 86400:
        raise _bad("interval", value, "a positive number of seconds, at most ten years")
    return seconds


def parse_timezone(value: str) -> ZoneInfo:
    try:
        if not value or value.startswith(("/", ".")) or ".." in value:
            raise ValueError
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise _bad("timezone", value, 'an IANA time zone name like "Europe/Paris"') from exc


def parse_fire_at(value: str, tz: ZoneInfo) -> datetime:
    m = _FIRE_AT.match(value.strip())
    if not m:
        raise _bad("fireAt", value, FIRE_AT_FORMAT)
    year, month, day, hour, minute = (int(m.group(i)) for i in range(1, 6))
    second = int(m.group(6) or 0)
    micro = int((m.group(7) or "0").ljust(6, "0"))
    offset = m.group(8)
    try:
        if offset is None:
            local = datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
            return local.astimezone(UTC)
        naive = datetime(year, month, day, hour, minute, second, micro)
        if offset in ("Z", "z"):
            return naive.replace(tzinfo=UTC)
        sign = 1 if offset[0] == "+" else -1
        digits = offset[1:].replace(":", "")
        oh, om = int(digits[:2]), int(digits[2:])
        if oh > 23 or om > 59:
            raise ValueError("offset out of range")
        from datetime import timedelta, timezone

        return naive.replace(tzinfo=timezone(sign * timedelta(hours=oh, minutes=om))).astimezone(
            UTC
        )
    except (ValueError, OverflowError) as exc:
        raise _bad("fireAt", value, f"a real date and time, {FIRE_AT_FORMAT}") from exc


RULE_ARGUMENTS: Final = frozenset(
    {"personaId", "timerName", "fireAt", "interval", "repeatable", "enabled", "timezone"}
)


class ArgumentLimits(BaseModel):
    model_config = ConfigDict(frozen=True)
    max_arguments: int = 64
    max_argument_length: int = 65536
    max_arguments_size: int = 262144
    default_timezone: str = "UTC"


def _name(args: dict[str, str], key: str) -> str:
    value = args.get(key)
    if value is None:
        raise ProtocolError("invalid_argument", f"{key} is required", key)
    if not 1 <= len(value) <= 255:
        raise _bad(key, value, "1 to 255 characters")
    return value


def string_arguments(raw: dict[str, Any], limits: ArgumentLimits) -> dict[str, str]:
    if len(raw) > limits.max_arguments:
        raise ProtocolError(
            "invalid_argument",
            f"arguments: {len(raw)} given, at most {limits.max_arguments} are accepted",
            "arguments",
        )
    out: dict[str, str] = {}
    total = 0
    for key, value in raw.items():
        if not key or len(key) > 255 or "\x00" in key:
            raise ProtocolError(
                "invalid_argument",
                "argument names are 1 to 255 characters, without NUL",
                "arguments",
            )
        text = argument_string(key, value)
        if "\x00" in text:
            raise ProtocolError(
                "invalid_argument", f"{key}: NUL characters are not accepted", key
            )
        if len(text) > limits.max_argument_length:
            raise ProtocolError(
                "invalid_argument",
                f"{key}: {len(text)} characters, at most {limits.max_argument_length}",
                key,
            )
        total += len(key) + len(text)
        if total > limits.max_arguments_size:
            raise ProtocolError(
                "invalid_argument",
                f"arguments: more than {limits.max_arguments_size} characters in all "
                "(PROGRAM_TIMER_MAX_ARGUMENTS_SIZE)",
                "arguments",
            )
        out[key] = text
    return out


def persona_and_name(args: dict[str, str]) -> tuple[str, str]:
    return _name(args, "personaId"), _name(args, "timerName")


def persona_only(args: dict[str, str]) -> str:
    return _name(args, "personaId")


def parse_set_command(
    command_idn: str,
    connector_idn: str,
    args: dict[str, str],
    command_act_id: str,
    limits: ArgumentLimits,
) -> SetCommand:
    """Validate the arguments of ``set_timer``/``set_repeatable_timer`` (SPEC 1.1)."""
    persona_id, timer_name = persona_and_name(args)
    given: set[str] = set()
    repeatable = False
    if command_idn == "set_repeatable_timer":
        repeatable = True
        given.add("repeatable")
        if "repeatable" in args and not parse_bool("repeatable", args["repeatable"]):
            raise _bad("repeatable", args["repeatable"], '"true" (set_repeatable_timer repeats)')
    elif "repeatable" in args:
        repeatable = parse_bool("repeatable", args["repeatable"])
        given.add("repeatable")
    enabled = True
    if "enabled" in args:
        enabled = parse_bool("enabled", args["enabled"])
        given.add("enabled")
    interval = None
    if "interval" in args:
        interval = parse_interval(args["interval"])
        given.add("interval")
    tz_name = args.get("timezone")
    tz = parse_timezone(tz_name) if tz_name is not None else ZoneInfo(limits.default_timezone)
    fire_at = None
    if "fireAt" in args:
        fire_at = parse_fire_at(args["fireAt"], tz)
        given.add("fireAt")
    extra = {k: v for k, v in args.items() if k not in RULE_ARGUMENTS}
    for key in extra:
        if key in EVENT_ARGUMENT_KEYS:
            raise ProtocolError(
                "invalid_argument",
                f"{key}: the fired event sets this argument itself; choose another name",
                key,
            )
    return SetCommand(
        persona_id=persona_id,
        timer_name=timer_name,
        connector_idn=connector_idn,
        command_act_id=command_act_id,
        fire_at=fire_at,
        timezone=tz_name,
        interval=interval,
        repeatable=repeatable,
        enabled=enabled,
        extra=extra or None,
        given=frozenset(given),
    )


def timer_to_wire(timer: Timer) -> dict[str, Any]:
    return {
        "personaId": timer.persona_id,
        "timerName": timer.timer_name,
        "connectorIdn": timer.connector_idn,
        "fireAt": utc_iso(timer.fire_at),
        "interval": format_interval(timer.interval),
        "repeatable": timer.repeatable,
        "enabled": timer.enabled,
        "state": timer.state,
        "nextFireAt": utc_iso(timer.due_at),
        "fireCount": timer.fire_count,
        "lastFiredAt": utc_iso(timer.last_fired_at),
        "arguments": timer.arguments,
        "commandActId": timer.command_act_id,
        "createdAt": utc_iso(timer.created_at),
        "updatedAt": utc_iso(timer.updated_at),
    }
