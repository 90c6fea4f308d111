"""The wire envelope of the local socket protocol (docs/protocol.md): requests, replies, errors.

One JSON object per line. Requests are validated by the pydantic models below into exactly one
:class:`ProtocolError`; replies are plain dicts built by the functions here. The arguments of a
``command`` are parsed apart, in :mod:`program_timer.scheduler.arguments`.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from program_timer.core.clock import utc_iso
from program_timer.core.model import Timer, format_interval

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
OPS: Final = (
    "command",
    "subscribe",
    "ack",
    "unsubscribe",
    "status",
    "ping",
    "subscriptions",
    "deliveries",
    "redeliver",
)


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


def _iso_time(value: Any) -> datetime:
    """An ISO 8601 time (``2026-03-01T12:00:00Z``, with an offset, or without one: UTC)."""
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 time string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"expected an ISO 8601 time like 2026-03-01T12:00:00Z, got {_shorten(value)}"
        ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


IsoTime = Annotated[datetime, BeforeValidator(_iso_time)]
MAX_IDS: Final = 10_000  # delivery ids in one ack or redeliver


class SubscribeRequest(_Request):
    op: Literal["subscribe"]
    subscriptionId: Name
    flowInstanceId: Name | None = None
    filter: SubscriptionFilter = Field(default_factory=SubscriptionFilter)
    # A subscription created with it also gets the stored events fired at or after it.
    since: IsoTime | None = None


class AckRequest(_Request):
    op: Literal["ack"]
    deliveryIds: Annotated[list[StrictInt], Field(max_length=MAX_IDS)]


class UnsubscribeRequest(_Request):
    op: Literal["unsubscribe"]
    subscriptionId: Name


class StatusRequest(_Request):
    op: Literal["status"]


class PingRequest(_Request):
    op: Literal["ping"]


class SubscriptionsRequest(_Request):
    op: Literal["subscriptions"]


class DeliveriesRequest(_Request):
    op: Literal["deliveries"]
    subscriptionId: Name
    state: Literal["pending", "dead"]
    limit: Annotated[StrictInt, Field(ge=1, le=1000)] = 100
    after: Annotated[StrictInt, Field(ge=0)] | None = None  # a deliveryId: those after it


class RedeliverRequest(_Request):
    op: Literal["redeliver"]
    subscriptionId: Name
    # Absent: every dead delivery of the subscription.
    deliveryIds: Annotated[list[StrictInt], Field(max_length=MAX_IDS)] | None = None


Request = (
    CommandRequest
    | SubscribeRequest
    | AckRequest
    | UnsubscribeRequest
    | StatusRequest
    | PingRequest
    | SubscriptionsRequest
    | DeliveriesRequest
    | RedeliverRequest
)
_MODELS: Final[dict[str, type[BaseModel]]] = {
    "command": CommandRequest,
    "subscribe": SubscribeRequest,
    "ack": AckRequest,
    "unsubscribe": UnsubscribeRequest,
    "status": StatusRequest,
    "ping": PingRequest,
    "subscriptions": SubscriptionsRequest,
    "deliveries": DeliveriesRequest,
    "redeliver": RedeliverRequest,
}
_SCALAR: Final[TypeAdapter[Any]] = TypeAdapter(Scalar)
# Every request kind in one validator, told apart by its op: what :func:`decode_line` reads
# straight from a line's bytes.
_REQUEST: Final[TypeAdapter[Request]] = TypeAdapter(Annotated[Request, Field(discriminator="op")])


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

    A line is first validated by pydantic straight from its bytes (``validate_json``: no
    dict built first; 29,000 instructions a ``set_timer`` against 51,000). Where that refuses
    it, the line is read again the long way (:func:`_decode_parsed`), which gives the refusal
    its one message. Lines that pydantic's JSON reader would accept and the JSON standard
    does not (``NaN``, ``Infinity``) go the long way from the start. (Integers beyond 64 bits
    it reads exactly, as the standard library does, up to the same 4,300 digits.)

    :raises ProtocolError: ``invalid_json``, ``invalid_request``, ``unknown_op``, with the
        request's id attached as ``exc.request_id`` where one could be read.
    """
    if b"NaN" not in line and b"Infinity" not in line:
        try:
            request = _REQUEST.validate_json(line)
        except ValidationError:
            pass  # refused: told below, with its message
        else:
            return request.id, request
    return _decode_parsed(line)


def _decode_parsed(line: bytes) -> tuple[Any, Request]:
    """:func:`decode_line` the long way: the JSON value first, then the envelope, then the
    op's model, each refusal with its own message."""
    try:
        obj = _parse(line)
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


def _parse(line: bytes) -> Any:
    """The JSON value of a request line.

    orjson where it gives what the standard library gives: the usual line (a third of the
    standard library's time on a ``set_timer``). The standard library, with its error
    messages, for whatever orjson refuses (invalid JSON or UTF-8, a lone surrogate escape,
    deep nesting, ``NaN``, a number out of range) and for a line holding 19 digits in a row:
    orjson reads an integer beyond 64 bits as a float, where a request's ``id`` must be echoed
    as it came."""
    if _NINETEEN_DIGITS not in line.translate(_DIGITS_AS_NINES):
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            pass  # told below, by the standard library
    text = line.decode("utf-8")  # strict: no surrogates, no UTF-16/32 guessing
    obj = _DECODER.decode(text)
    if "\\u" in text and _has_lone_surrogate(obj):
        raise ValueError("a \\u escape encodes half of a surrogate pair, which is not text")
    return obj


# Every digit made a 9 (in C): a run of nineteen 9s is then a run of nineteen digits, found
# faster than by a regular expression.
_DIGITS_AS_NINES: Final = bytes.maketrans(b"012345678", b"999999999")
_NINETEEN_DIGITS: Final = b"9" * 19


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
    """One line of compact UTF-8 JSON (orjson: every reply and pushed event goes through here).

    :raises TypeError: the message holds a lone surrogate, which is not text.
    """
    return orjson.dumps(message, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE)


def timer_to_wire(timer: Timer) -> dict[str, Any]:
    return {
        "personaId": timer.persona_id,
        "timerName": timer.timer_name,
        "connectorIdn": timer.connector_idn,
        "fireAt": utc_iso(timer.fire_at),
        "interval": format_interval(timer.interval),
        "rrule": timer.rrule,
        "cron": timer.cron,
        "timezone": timer.timezone,
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
