"""What the ``program-timer`` subcommands share: reaching the daemon, failing with one line,
and printing for people (tables escaped and aligned, values in JSON spellings)."""

from __future__ import annotations

import json
import sys
import unicodedata
from datetime import UTC, datetime
from typing import Any, NoReturn

import click
import wcwidth

from program_timer.events.client import ClientError, ConnectionLost, TimerClient
from program_timer.scheduler.config import ConfigError, Settings, load_settings

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"program-timer: {message}", err=True)
    sys.exit(code)


def load_or_exit(config: str | None, **flags: Any) -> Settings:
    try:
        return load_settings(config, **flags)
    except ConfigError as exc:
        fail(f"configuration: {exc}", 2)


def connect(ctx: click.Context) -> TimerClient:
    settings = load_or_exit(ctx.obj["config"], socket=ctx.obj["socket"])
    try:
        return TimerClient(settings.socket)
    except OSError as exc:
        fail(
            f"cannot reach the daemon at {settings.socket}: {exc.strerror or exc}. Is it "
            "running? Start it with `program-timer serve`, or name its socket with --socket "
            "or PROGRAM_TIMER_SOCKET."
        )


def call(ctx: click.Context, fn: Any) -> Any:
    client = connect(ctx)
    try:
        return fn(client)
    except ClientError as exc:
        where = f" (argument {exc.field})" if exc.field else ""
        fail(f"{exc.code}{where}: {exc.message}")
    except (ConnectionLost, OSError) as exc:
        fail(f"lost the connection to the daemon: {exc}")
    finally:
        client.close()


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


_BIDI = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def escape(text: str) -> str:
    """``text`` safe for one terminal cell: control characters as ``\\n``, ``\\x1b``,
    ``\\u2028`` ..."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif ch in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def value_text(value: Any) -> str:
    """A value as people read it, in JSON's spellings: ``true``, ``false``, ``null``; strings
    bare but escaped; objects and lists as compact JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict | list):
        return escape(json.dumps(value, ensure_ascii=False))
    return str(value)


def cell(value: Any) -> str:
    """A table cell: as :func:`value_text`, but ``-`` for nothing."""
    return "-" if value is None else value_text(value)


def width(text: str) -> int:
    """Terminal columns ``text`` takes (CJK and emoji take two)."""
    n = wcwidth.wcswidth(text)
    return n if n >= 0 else len(text)


def pad(text: str, columns: int) -> str:
    return text + " " * max(0, columns - width(text))


def print_rows(headers: list[str], rows: list[list[str]], empty: str) -> None:
    """A table: headers, then rows of cells already made safe (:func:`cell`)."""
    if not rows:
        click.echo(empty)
        return
    widths = [max([width(h)] + [width(r[i]) for r in rows]) for i, h in enumerate(headers)]
    last = len(headers) - 1
    for line in [headers, *rows]:
        click.echo(
            "  ".join(
                cell if i == last else pad(cell, w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )


def duration(seconds: float | None) -> str:
    """``850 ms``, ``12.3 s``, ``5 min 3 s``, ``2 h 5 min``, ``3 d 4 h``; ``-`` for nothing."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 60:
        return f"{seconds:.3g} s"
    units = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
    whole = int(seconds)
    parts: list[str] = []
    for name, size in units:
        if whole >= size or parts:
            parts.append(f"{whole // size} {name}")
            whole %= size
        if len(parts) == 2:
            break
    return " ".join(p for p in parts if not p.startswith("0 ")) or "0 s"


def ms(value: float | None) -> str:
    return "-" if value is None else duration(value / 1000)


def age(stamp: str | None) -> str:
    """How long ago an ISO time of the daemon's was (``-`` for none)."""
    if stamp is None:
        return "-"
    then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return duration(max(0.0, (datetime.now(UTC) - then).total_seconds())) + " ago"


def print_timer(timer: dict[str, Any]) -> None:
    width = max(len(k) for k in timer)
    for key, value in timer.items():
        click.echo(f"{key:<{width}}  {value_text(value)}")


def print_timers(timers: list[dict[str, Any]]) -> None:
    columns = [
        "timerName",
        "state",
        "nextFireAt",
        "interval",
        "repeatable",
        "enabled",
        "fireCount",
        "connectorIdn",
    ]
    print_rows(
        [c.upper() for c in columns],
        [[cell(t.get(c)) for c in columns] for t in timers],
        "(no timers)",
    )


def filter_text(flt: dict[str, str]) -> str:
    parts = [f"connector={escape(flt['connectorIdn'])}"] if "connectorIdn" in flt else []
    if "personaId" in flt:
        parts.append(f"persona={escape(flt['personaId'])}")
    return " ".join(parts) or "any"
