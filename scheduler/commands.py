"""The commands of SPEC 1.3 and 2, applied in batches: one transaction for many commands.

:func:`apply_batch` runs inside one database transaction. Keyed commands (``set_timer``,
``get_timer``, ``delete_timer``) read the timers they touch in one query and write them back in
a few ``executemany`` statements; ``list_timers`` and ``delete_timers`` flush what is pending
first, so every command sees the effect of the ones before it, exactly as if they had run one by
one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection

from program_timer.core import rules
from program_timer.core.clock import utc_iso
from program_timer.core.ids import uuid4_strings
from program_timer.core.model import Limits, RuleError, Timer
from program_timer.scheduler.arguments import (
    ArgumentLimits,
    parse_set_command,
    persona_and_name,
    persona_only,
    string_arguments,
)
from program_timer.scheduler.protocol import (
    COMMANDS,
    INTEGRATION,
    SET_COMMANDS,
    CommandRequest,
    ProtocolError,
    timer_to_wire,
)
from program_timer.store import queries

Key = tuple[str, str]
READ_ONLY_COMMANDS: Final = frozenset({"get_timer", "list_timers"})
LIST_PAGE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class CommandSettings:
    limits: Limits = field(default_factory=Limits)
    arguments: ArgumentLimits = field(default_factory=ArgumentLimits)
    max_timers_per_persona: int = 1000
    connectors: frozenset[str] | None = None
    list_limit_max: int = 1000


@dataclass
class Outcome:
    """One command's reply (``result`` or ``error``) and what it logs."""

    result: dict[str, Any] | None = None
    error: ProtocolError | None = None
    log: dict[str, Any] = field(default_factory=dict)
    due_at: datetime | None = None  # when the timer it set is next due (to wake the firing)


def check_envelope(req: CommandRequest, settings: CommandSettings) -> None:
    if req.integrationIdn != INTEGRATION:
        raise ProtocolError(
            "unknown_integration",
            f"integrationIdn {req.integrationIdn!r} is not served here; use {INTEGRATION!r}",
            "integrationIdn",
        )
    if req.commandIdn not in COMMANDS:
        raise ProtocolError(
            "unknown_command",
            f"unknown commandIdn {req.commandIdn!r}; expected one of {', '.join(sorted(COMMANDS))}",
            "commandIdn",
        )
    if settings.connectors is not None and req.connectorIdn not in settings.connectors:
        raise ProtocolError(
            "unknown_connector",
            f"connectorIdn {req.connectorIdn!r} is not configured",
            "connectorIdn",
        )


class _Batch:
    """The working set of one transaction: timers read once, written back at flush."""

    def __init__(self, conn: Connection, settings: CommandSettings, now: datetime) -> None:
        self.conn = conn
        self.settings = settings
        self.now = now
        self.timers: dict[Key, Timer | None] = {}
        self.ids: dict[Key, int] = {}  # rows that exist in the database
        self.states: dict[Key, str | None] = {}  # their states there (None: no row)
        self.dirty: set[Key] = set()
        self.counts: dict[str, int] = {}
        self.acts: dict[str, dict[str, Any]] = {}
        self.new_acts: list[dict[str, Any]] = []

    def preload(self, keys: list[Key], personas: list[str], act_ids: list[str]) -> None:
        missing = [k for k in keys if k not in self.timers]
        need = [p for p in personas if p not in self.counts]
        if not (missing or need or act_ids):
            return
        loaded, counts, acts = queries.load_working_set(self.conn, missing, need, act_ids)
        for key in missing:
            timer = loaded.get(key)
            self.timers[key] = timer
            self.states[key] = None if timer is None else timer.state
            if timer is not None and timer.id is not None:
                self.ids[key] = timer.id
        self.counts.update(counts)
        self.acts.update(acts)

    def flush(self) -> None:
        inserts, updates, deletes = [], [], []
        changes: dict[str, int] = {}  # the kept counts by state
        for key in self.dirty:
            timer = self.timers[key]
            new_state = None if timer is None else timer.state
            queries.count_change(changes, self.states.get(key), new_state)
            self.states[key] = new_state
            row_id = self.ids.get(key)
            if timer is None:
                if row_id is not None:
                    deletes.append(row_id)
                    del self.ids[key]
            elif row_id is None:
                inserts.append(timer)
            else:
                timer.id = row_id
                updates.append(timer)
        # Sent together, in one round trip on PostgreSQL.
        with queries.pipeline(self.conn):
            queries.delete_timer_ids(self.conn, deletes)
            queries.update_timers(self.conn, updates)
            queries.insert_timers(self.conn, inserts)
            queries.add_timer_counts(self.conn, changes)
            queries.save_command_acts(self.conn, self.new_acts)
        if inserts:
            # New rows got ids; forget them so a later command in this batch re-reads them.
            for timer in inserts:
                key = (timer.persona_id, timer.timer_name)
                self.timers.pop(key, None)
                self.states.pop(key, None)
        self.dirty.clear()
        self.new_acts.clear()

    def forget_persona(self, persona_id: str) -> None:
        for key in [k for k in self.timers if k[0] == persona_id]:
            self.timers.pop(key)
            self.ids.pop(key, None)
            self.states.pop(key, None)
        self.counts[persona_id] = 0


def apply_batch(
    conn: Connection,
    requests: list[CommandRequest],
    settings: CommandSettings,
    now: datetime,
) -> list[Outcome]:
    """Apply commands in order inside the caller's transaction; one outcome per command."""
    batch = _Batch(conn, settings, now)
    parsed: list[tuple[CommandRequest, str, dict[str, str] | ProtocolError]] = []
    args: dict[str, str] | ProtocolError
    keys: list[Key] = []
    personas: list[str] = []
    act_ids: list[str] = []
    fresh_ids = iter(uuid4_strings(sum(1 for r in requests if not r.commandActId)))
    for req in requests:
        act_id = str(req.commandActId) if req.commandActId else next(fresh_ids)
        try:
            check_envelope(req, settings)
            args = string_arguments(req.arguments, settings.arguments)
            if req.commandIdn in SET_COMMANDS | {"get_timer", "delete_timer"}:
                key = persona_and_name(args)
                keys.append(key)
                personas.append(key[0])
            if req.commandActId:
                act_ids.append(act_id)
            parsed.append((req, act_id, args))
        except ProtocolError as err:
            parsed.append((req, act_id, err))
    batch.preload(keys, personas, act_ids)

    outcomes: list[Outcome] = []
    for req, act_id, args in parsed:
        if isinstance(args, ProtocolError):
            outcomes.append(Outcome(error=args))
            continue
        if req.commandActId and act_id in batch.acts:
            outcomes.append(Outcome(result=batch.acts[act_id], log={"replayed": True}))
            continue
        try:
            outcome = _apply_one(batch, req, act_id, args)
        except RuleError as err:
            outcome = Outcome(error=ProtocolError(err.code, err.message, err.field))
        except ProtocolError as err:
            outcome = Outcome(error=err)
        if outcome.result is not None and req.commandActId:
            batch.acts[act_id] = outcome.result
            batch.new_acts.append(
                {"command_act_id": act_id, "reply": outcome.result, "created_at": now}
            )
        outcomes.append(outcome)
    batch.flush()
    return outcomes


def _apply_one(batch: _Batch, req: CommandRequest, act_id: str, args: dict[str, str]) -> Outcome:
    cmd = req.commandIdn
    if cmd in SET_COMMANDS:
        return _set_timer(batch, req, act_id, args)
    return _OTHERS[cmd](batch, act_id, args)


def _set_timer(batch: _Batch, req: CommandRequest, act_id: str, args: dict[str, str]) -> Outcome:
    settings = batch.settings
    set_cmd = parse_set_command(req.commandIdn, req.connectorIdn, args, act_id, settings.arguments)
    key = (set_cmd.persona_id, set_cmd.timer_name)
    if key not in batch.timers:
        batch.preload([key], [key[0]], [])
    existing = batch.timers[key]
    if existing is None:
        count = batch.counts.get(key[0], 0)
        if count >= settings.max_timers_per_persona:
            raise ProtocolError(
                "quota_exceeded",
                f"persona {key[0]!r} already has {count} timers, the most allowed "
                f"(PROGRAM_TIMER_MAX_TIMERS_PER_PERSONA={settings.max_timers_per_persona})",
                "timerName",
            )
    timer, warnings = rules.apply_set(existing, set_cmd, batch.now, settings.limits)
    if existing is None:
        batch.counts[key[0]] = batch.counts.get(key[0], 0) + 1
    batch.timers[key] = timer
    batch.dirty.add(key)
    return Outcome(
        result={"commandActId": act_id, "timer": timer_to_wire(timer), "warnings": warnings},
        log={
            "action": "timer_set",
            "created": existing is None,
            "state": timer.state,
            "next_fire_at": utc_iso(timer.due_at),
        },
        due_at=timer.due_at,
    )


def _get_timer(batch: _Batch, act_id: str, args: dict[str, str]) -> Outcome:
    key = persona_and_name(args)
    if key not in batch.timers:
        batch.preload([key], [], [])
    found = batch.timers[key]
    if found is None:
        raise ProtocolError(
            "not_found", f"persona {key[0]!r} has no timer named {key[1]!r}", "timerName"
        )
    return Outcome(result={"commandActId": act_id, "timer": timer_to_wire(found), "warnings": []})


def _delete_timer(batch: _Batch, act_id: str, args: dict[str, str]) -> Outcome:
    key = persona_and_name(args)
    if key not in batch.timers:
        batch.preload([key], [key[0]], [])
    removed = batch.timers.get(key) is not None
    if removed:
        batch.timers[key] = None
        batch.dirty.add(key)
        batch.counts[key[0]] = max(0, batch.counts.get(key[0], 1) - 1)
    return Outcome(
        result={"commandActId": act_id, "removed": removed, "warnings": []},
        log={"action": "timer_deleted", "removed": removed},
    )


def _list_timers(batch: _Batch, act_id: str, args: dict[str, str]) -> Outcome:
    persona_id = persona_only(args)
    limit = _limit(args.get("limit"), batch.settings.list_limit_max)
    after = args.get("after")
    batch.flush()
    batch.timers.clear()
    batch.ids.clear()
    batch.states.clear()
    found = queries.list_timers(batch.conn, persona_id, after, limit + 1)
    more = len(found) > limit
    found = found[:limit]
    # A page also stops at about LIST_PAGE_BYTES of reply (at least one timer).
    size = 0
    for i, timer in enumerate(found):
        size += 512 + sum(len(k) + len(v) for k, v in timer.arguments.items())
        if size > LIST_PAGE_BYTES and i > 0:
            found, more = found[:i], True
            break
    return Outcome(
        result={
            "commandActId": act_id,
            "timers": [timer_to_wire(t) for t in found],
            "nextAfter": found[-1].timer_name if more and found else None,
            "warnings": [],
        }
    )


def _delete_timers(batch: _Batch, act_id: str, args: dict[str, str]) -> Outcome:
    persona_id = persona_only(args)
    batch.flush()
    batch.forget_persona(persona_id)
    removed = queries.delete_persona_timers(batch.conn, persona_id)
    return Outcome(
        result={"commandActId": act_id, "removed": removed, "warnings": []},
        log={"action": "persona_timers_deleted", "removed": removed},
    )


_OTHERS: Final = {
    "get_timer": _get_timer,
    "delete_timer": _delete_timer,
    "list_timers": _list_timers,
    "delete_timers": _delete_timers,
}


def _limit(value: str | None, maximum: int) -> int:
    if value is None:
        return 100
    if not value.isdigit() or not 1 <= int(value) <= maximum:
        raise ProtocolError(
            "invalid_argument",
            f"limit: got {value!r}, expected a whole number from 1 to {maximum}",
            "limit",
        )
    return int(value)
