"""The ``program-timer`` command: run the daemon, and talk to it from a terminal.

Every client subcommand reaches the daemon through the same socket setting as ``serve``
(``--socket``, else ``PROGRAM_TIMER_SOCKET``, else the TOML file, else the default path).
"""

from __future__ import annotations

import contextlib
import json
import sys
import unicodedata
from datetime import UTC, datetime
from typing import Any, NoReturn

import click
import wcwidth

from program_timer import __version__
from program_timer.events.client import ClientError, ConnectionLost, EventStream, TimerClient
from program_timer.scheduler.config import ConfigError, Settings, load_settings

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"program-timer: {message}", err=True)
    sys.exit(code)


def _settings(config: str | None, **flags: Any) -> Settings:
    try:
        return load_settings(config, **flags)
    except ConfigError as exc:
        _fail(f"configuration: {exc}", 2)


def _client(ctx: click.Context) -> TimerClient:
    settings = _settings(ctx.obj["config"], socket=ctx.obj["socket"])
    try:
        return TimerClient(settings.socket)
    except OSError as exc:
        _fail(f"cannot reach the daemon at {settings.socket}: {exc.strerror or exc}")


def _call(ctx: click.Context, fn: Any) -> Any:
    client = _client(ctx)
    try:
        return fn(client)
    except ClientError as exc:
        where = f" (argument {exc.field})" if exc.field else ""
        _fail(f"{exc.code}{where}: {exc.message}")
    except (ConnectionLost, OSError) as exc:
        _fail(f"lost the connection to the daemon: {exc}")
    finally:
        client.close()


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="program-timer")
@click.option(
    "--config",
    "-c",
    type=click.Path(dir_okay=False),
    envvar="PROGRAM_TIMER_CONFIG",
    show_envvar=True,
    help="TOML configuration file.",
)
@click.option(
    "--socket",
    "-s",
    "socket_path",
    envvar="PROGRAM_TIMER_SOCKET",
    show_envvar=True,
    help="The daemon's Unix socket.",
)
@click.pass_context
def main(ctx: click.Context, config: str | None, socket_path: str | None) -> None:
    """program-timer: persona timers in SQL, fired as durable `timer` events.

    Run the daemon with `program-timer serve`; the other commands talk to it.

    \b
    Shell completion (bash; zsh and fish likewise with zsh_source, fish_source):
      eval "$(_PROGRAM_TIMER_COMPLETE=bash_source program-timer)"
    """
    ctx.obj = {"config": config, "socket": socket_path}


# The other settings, each a flag too (README, "Configuration"): name, type, what it is.
_MORE_SETTINGS: tuple[tuple[str, type, str], ...] = (
    ("allowed_uids", str, "Peer uids allowed, comma-separated (unset: any)"),
    ("allowed_gids", str, "Peer gids allowed, comma-separated (unset: any)"),
    ("database_timeout", float, "Bound of every database wait of a request, s"),
    ("metrics_address", str, "Serve Prometheus /metrics on host:port (unset: off)"),
    ("retry_max_delay", float, "Longest wait between resends of an unacked delivery, s"),
    ("max_attempts", int, "Sends without an ack before a delivery is dead (unset: no limit)"),
    ("connectors", str, "connectorIdns commands may name, comma-separated (unset: any)"),
    ("max_connections", int, "Simultaneous client connections"),
    ("backlog", int, "Listen backlog of a socket the daemon creates"),
    ("max_arguments", int, "Arguments per command"),
    ("max_argument_length", int, "Characters per argument value"),
    ("max_arguments_size", int, "Characters of all a command's arguments"),
    ("max_inflight", int, "Unacked deliveries in flight per connection"),
    ("max_pipeline", int, "Unanswered pipelined requests per connection"),
    ("fire_batch_size", int, "Timers fired per transaction"),
    ("command_batch_size", int, "Commands per transaction"),
    ("poll_interval", float, "Safety-net poll for other daemons' timers, s"),
    ("shutdown_grace", float, "Longest clean stop before exiting at once, s"),
    ("daemon_id", str, "This daemon's name in status and the daemons table"),
)


def _setting_flags(fn: Any) -> Any:
    """Add a ``--<setting>`` flag for each of :data:`_MORE_SETTINGS`."""
    for name, kind, text in reversed(_MORE_SETTINGS):
        fn = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=kind,
            help=f"{text} [env PROGRAM_TIMER_{name.upper()}]",
        )(fn)
    return fn


@main.command(context_settings=CONTEXT)
@click.option(
    "--database-url",
    envvar=None,
    help="sqlite:///file.db or postgresql://… [env PROGRAM_TIMER_DATABASE_URL]",
)
@click.option("--socket-mode", help="Octal mode of the socket file [env PROGRAM_TIMER_SOCKET_MODE]")
@click.option("--timezone", help="Default time zone of fireAt [env PROGRAM_TIMER_TIMEZONE]")
@click.option(
    "--min-interval", type=float, help="Minimum repeat interval, s [env PROGRAM_TIMER_MIN_INTERVAL]"
)
@click.option(
    "--max-timers-per-persona",
    type=int,
    help="Quota of timers per persona [env PROGRAM_TIMER_MAX_TIMERS_PER_PERSONA]",
)
@click.option(
    "--ack-timeout",
    type=float,
    help="Resend unacked deliveries after, s [env PROGRAM_TIMER_ACK_TIMEOUT]",
)
@click.option(
    "--retention",
    type=float,
    help="Keep fired timers and events for, s [env PROGRAM_TIMER_RETENTION]",
)
@click.option(
    "--misfire-grace",
    type=float,
    help="Drop fires later than this, s (unset: never) [env PROGRAM_TIMER_MISFIRE_GRACE]",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    help="[env PROGRAM_TIMER_LOG_FORMAT]",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="[env PROGRAM_TIMER_LOG_LEVEL]",
)
@_setting_flags
@click.pass_context
def serve(ctx: click.Context, /, **flags: Any) -> None:
    """Run the daemon in the foreground (SQLite file in the current folder by default)."""
    from program_timer.core.logs import configure, get_logger
    from program_timer.scheduler.daemon import serve as run
    from program_timer.store.db import normalize_url
    from program_timer.store.errors import AlreadyRunning, StoreError

    settings = _settings(ctx.obj["config"], socket=ctx.obj["socket"], **flags)
    configure(settings.log_format, settings.log_level)
    database = normalize_url(settings.database_url).render_as_string(hide_password=True)
    try:
        run(
            settings,
            reload=lambda: load_settings(ctx.obj["config"], socket=ctx.obj["socket"], **flags),
        )
    except AlreadyRunning as exc:
        _fail(str(exc), 3)
    except StoreError as exc:  # the database cannot be opened, read or migrated
        get_logger().error("cannot start", action="start_failed", reason=str(exc))
        _fail(f"cannot use the database {database}: {exc}", 4)
    except (RuntimeError, OSError) as exc:  # the socket cannot be made
        get_logger().error("cannot start", action="start_failed", reason=str(exc))
        _fail(f"cannot start: {exc}", 3)


def _parse_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"arguments are key=value, got {pair!r}", 2)
        out[key] = value
    return out


@main.command(context_settings=CONTEXT)
@click.argument("command_idn")
@click.argument("arguments", nargs=-1)
@click.option("--connector", "-C", default="cli", show_default=True, help="connectorIdn")
@click.option("--integration", default="program_timer", show_default=True, help="integrationIdn")
@click.option("--command-act-id", help="commandActId (a UUID) for a safe retry")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's result as JSON.")
@click.pass_context
def send(
    ctx: click.Context,
    command_idn: str,
    arguments: tuple[str, ...],
    connector: str,
    integration: str,
    command_act_id: str | None,
    as_json: bool,
) -> None:
    """Send any command, arguments as key=value.

    \b
    program-timer send set_timer -C my_timer personaId=u1 timerName=t1 interval=120
    """
    args = _parse_pairs(arguments)
    result = _call(
        ctx,
        lambda c: c.command(
            command_idn,
            connector,
            integration_idn=integration,
            command_act_id=command_act_id,
            **args,
        ),
    )
    if as_json:
        _print_json(result)
        return
    for warning in result.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    if "timer" in result:
        _print_timer(result["timer"])
    elif "timers" in result:
        _print_table(result["timers"])
    elif "removed" in result:
        click.echo(f"removed: {_value(result['removed'])}")


# --- output for people: JSON spellings, escaped names, aligned columns -----------------------

# Characters that would move the cursor or reorder text on a terminal (controls, line and
# paragraph separators, bidirectional overrides) are shown escaped; joiners and variation
# selectors (emoji sequences) are kept.
_BIDI = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(text: str) -> str:
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


def _value(value: Any) -> str:
    """A value as people read it, in JSON's spellings: ``true``, ``false``, ``null``; strings
    bare but escaped; objects and lists as compact JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _escape(value)
    if isinstance(value, dict | list):
        return _escape(json.dumps(value, ensure_ascii=False))
    return str(value)


def _cell(value: Any) -> str:
    """A table cell: as :func:`_value`, but ``-`` for nothing."""
    return "-" if value is None else _value(value)


def _width(text: str) -> int:
    """Terminal columns ``text`` takes (CJK and emoji take two)."""
    n = wcwidth.wcswidth(text)
    return n if n >= 0 else len(text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _width(text))


def _print_rows(headers: list[str], rows: list[list[str]], empty: str) -> None:
    """A table: headers, then rows of cells already made safe (:func:`_cell`)."""
    if not rows:
        click.echo(empty)
        return
    widths = [max([_width(h)] + [_width(r[i]) for r in rows]) for i, h in enumerate(headers)]
    last = len(headers) - 1
    for line in [headers, *rows]:
        click.echo(
            "  ".join(
                cell if i == last else _pad(cell, w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )


def _duration(seconds: float | None) -> str:
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


def _ms(value: float | None) -> str:
    return "-" if value is None else _duration(value / 1000)


def _age(stamp: str | None) -> str:
    """How long ago an ISO time of the daemon's was (``-`` for none)."""
    if stamp is None:
        return "-"
    then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return _duration(max(0.0, (datetime.now(UTC) - then).total_seconds())) + " ago"


def _print_timer(timer: dict[str, Any]) -> None:
    width = max(len(k) for k in timer)
    for key, value in timer.items():
        click.echo(f"{key:<{width}}  {_value(value)}")


def _print_table(timers: list[dict[str, Any]]) -> None:
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
    _print_rows(
        [c.upper() for c in columns],
        [[_cell(t.get(c)) for c in columns] for t in timers],
        "(no timers)",
    )


@main.command("list", context_settings=CONTEXT)
@click.argument("persona_id")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--after", help="Start after this timer name (paging).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_(
    ctx: click.Context, persona_id: str, limit: int, after: str | None, as_json: bool
) -> None:
    """List a persona's timers in name order."""
    args: dict[str, Any] = {"personaId": persona_id, "limit": str(limit)}
    if after:
        args["after"] = after
    result = _call(ctx, lambda c: c.command("list_timers", "cli", **args))
    if as_json:
        _print_json(result)
        return
    _print_table(result["timers"])
    if result.get("nextAfter"):
        click.echo(f"(more: --after {_value(result['nextAfter'])})")


@main.command(context_settings=CONTEXT)
@click.argument("persona_id")
@click.argument("timer_name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def get(ctx: click.Context, persona_id: str, timer_name: str, as_json: bool) -> None:
    """Show one timer's full state."""
    result = _call(
        ctx, lambda c: c.command("get_timer", "cli", personaId=persona_id, timerName=timer_name)
    )
    if as_json:
        _print_json(result)
    else:
        _print_timer(result["timer"])


@main.command(context_settings=CONTEXT)
@click.argument("persona_id")
@click.argument("timer_name", required=False)
@click.option("--all", "all_", is_flag=True, help="Delete all of the persona's timers.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def delete(
    ctx: click.Context, persona_id: str, timer_name: str | None, all_: bool, as_json: bool
) -> None:
    """Delete a timer (or, with --all, every timer of the persona)."""
    if all_ == bool(timer_name):
        _fail("give either TIMER_NAME or --all", 2)
    if all_:
        result = _call(ctx, lambda c: c.command("delete_timers", "cli", personaId=persona_id))
    else:
        result = _call(
            ctx,
            lambda c: c.command("delete_timer", "cli", personaId=persona_id, timerName=timer_name),
        )
    if as_json:
        _print_json(result)
    else:
        click.echo(f"removed: {_value(result['removed'])}")


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the daemon's status."""
    result = _call(ctx, lambda c: c.status())
    if as_json:
        _print_json(result)
        return
    lat = result["fires"]["lateness"]
    click.echo(
        f"program-timer {result['version']}  daemon {_value(result['daemonId'])}  "
        f"up {_duration(result['uptimeSeconds'])}  database {result['database']}"
        f"{'' if result['databaseReachable'] else ' (UNREACHABLE)'}"
    )
    if not result["databaseReachable"]:
        click.echo("the database cannot be reached: figures stored there are not shown (-)")
    timers = result["timers"] or {}
    click.echo("timers      " + ("  ".join(f"{k} {v}" for k, v in timers.items()) or "-"))
    click.echo(
        f"fires       total {result['fires']['total']}  dropped "
        f"{result['fires']['dropped']}  lateness p50 {_ms(lat['p50Ms'])}  "
        f"p99 {_ms(lat['p99Ms'])}  max {_ms(lat['maxMs'])}"
    )
    d = result["deliveries"]
    click.echo(
        f"deliveries  pending {_cell(d['pending'])}  oldest "
        f"{_duration(d['oldestPendingAgeSeconds'])}  dead {_cell(d.get('dead'))}  "
        f"in flight {d['inflight']}"
    )
    events = result["events"] or {"stored": None, "unrouted": None}
    click.echo(
        f"events      stored {_cell(events['stored'])}  unrouted {_cell(events['unrouted'])}"
    )
    click.echo(
        f"subscribers connected {result['connectedSubscribers']} of "
        f"{_cell(result['subscriptions'])} subscriptions; connections {result['connections']}"
    )
    for name, failures in (result.get("failing") or {}).items():
        click.echo(f"failing     {name}: {failures} failures in a row (retried with backoff)")
    for daemon in result["daemons"] or []:
        click.echo(
            f"daemon      {_value(daemon['daemonId'])} on {_value(daemon['hostname'])} "
            f"heartbeat {daemon['heartbeatAt']}"
        )


# --- subscriptions and their deliveries (operators) -------------------------------------------


def _filter_text(flt: dict[str, str]) -> str:
    parts = [f"connector={_escape(flt['connectorIdn'])}"] if "connectorIdn" in flt else []
    if "personaId" in flt:
        parts.append(f"persona={_escape(flt['personaId'])}")
    return " ".join(parts) or "any"


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's result as JSON.")
@click.pass_context
def subscriptions(ctx: click.Context, as_json: bool) -> None:
    """List the subscriptions: attached or not, pending, in-flight and dead deliveries."""
    result = _call(ctx, lambda c: c.request("subscriptions"))
    if as_json:
        _print_json(result)
        return
    _print_rows(
        [
            "SUBSCRIPTION",
            "FLOW INSTANCE",
            "FILTER",
            "ATTACHED",
            "PENDING",
            "IN FLIGHT",
            "DEAD",
            "OLDEST PENDING",
            "LAST ACK",
        ],
        [
            [
                _cell(s["subscriptionId"]),
                _cell(s["flowInstanceId"]),
                _filter_text(s["filter"]),
                _cell(s["attached"]),
                _cell(s["pending"]),
                _cell(s["inflight"]),
                _cell(s["dead"]),
                _age(s["oldestPendingAt"]),
                _age(s["lastAckAt"]),
            ]
            for s in result["subscriptions"]
        ],
        "(no subscriptions)",
    )


@main.command(context_settings=CONTEXT)
@click.argument("subscription")
@click.option("--dead", is_flag=True, help="The dead deliveries (default: the pending ones).")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--after", type=click.IntRange(min=0), help="Start after this delivery id (paging).")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's result as JSON.")
@click.pass_context
def deliveries(
    ctx: click.Context, subscription: str, dead: bool, limit: int, after: int | None, as_json: bool
) -> None:
    """List a subscription's pending (or, with --dead, dead) deliveries, oldest first."""
    fields: dict[str, Any] = {
        "subscriptionId": subscription,
        "state": "dead" if dead else "pending",
        "limit": limit,
    }
    if after is not None:
        fields["after"] = after
    result = _call(ctx, lambda c: c.request("deliveries", **fields))
    if as_json:
        _print_json(result)
        return
    rows = []
    for x in result["deliveries"]:
        ev = x["event"]
        a = ev["arguments"]
        rows.append(
            [
                _cell(x["deliveryId"]),
                _cell(x["attempt"]),
                _cell(x["nextAttemptAt"]),
                _cell(a.get("firedAt")),
                _cell(ev["connectorIdn"]),
                f"{_escape(ev['personaId'])}/{_escape(a.get('timerName', ''))}",
                _cell(a.get("fireCount")),
                _cell(ev["externalEventId"]),
            ]
        )
    _print_rows(
        [
            "ID",
            "ATTEMPT",
            "NEXT ATTEMPT",
            "FIRED AT",
            "CONNECTOR",
            "PERSONA/TIMER",
            "FIRE",
            "EVENT",
        ],
        rows,
        f"(no {'dead' if dead else 'pending'} deliveries)",
    )
    if "nextAfter" in result:
        click.echo(f"(more: --after {result['nextAfter']})")


@main.command(context_settings=CONTEXT)
@click.argument("subscription")
@click.argument("delivery_ids", nargs=-1, type=click.IntRange(min=0), metavar="[ID]...")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's result as JSON.")
@click.pass_context
def redeliver(
    ctx: click.Context, subscription: str, delivery_ids: tuple[int, ...], as_json: bool
) -> None:
    """Make dead deliveries pending again, with a fresh attempt budget: those given by id, else
    all of the subscription's. They are sent again at once if it is attached."""
    fields: dict[str, Any] = {"subscriptionId": subscription}
    if delivery_ids:
        fields["deliveryIds"] = list(delivery_ids)
    result = _call(ctx, lambda c: c.request("redeliver", **fields))
    if as_json:
        _print_json(result)
    else:
        click.echo(f"redelivered: {result['redelivered']}")


@main.command(context_settings=CONTEXT)
@click.argument("subscription")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's result as JSON.")
@click.pass_context
def unsubscribe(ctx: click.Context, subscription: str, as_json: bool) -> None:
    """Delete a subscription and all its deliveries (its pending events are dropped)."""
    result = _call(ctx, lambda c: c.request("unsubscribe", subscriptionId=subscription))
    if as_json:
        _print_json(result)
    else:
        click.echo(f"removed: {_value(result['removed'])}")


@main.command(context_settings=CONTEXT)
@click.option("--follow", "-f", is_flag=True, required=True, help="Print events as they fire.")
@click.option("--connector", "-C", help="Only events of this connectorIdn.")
@click.option("--persona", "-p", help="Only events of this personaId.")
@click.option(
    "--subscription",
    help="Durable subscription id (default: a new one each run, removed when it ends).",
)
@click.option("--ack", is_flag=True, help="Ack each event once printed (consumes it).")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per event message.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many events.")
@click.pass_context
def events(
    ctx: click.Context,
    follow: bool,
    connector: str | None,
    persona: str | None,
    subscription: str | None,
    ack: bool,
    as_json: bool,
    count: int | None,
) -> None:
    """Follow timer events as they fire (Ctrl-C, SIGTERM or SIGHUP to stop).

    Waits for events for as long as it runs. A lost connection is retried with backoff, with one
    line on stderr when it is lost and one when it is back; an error retrying cannot fix ends
    the command with the daemon's message. Without --subscription, the subscription is a new
    one, removed when the command ends.
    """
    import signal

    from program_timer.events.client import describe

    settings = _settings(ctx.obj["config"], socket=ctx.obj["socket"])
    down = False

    def on_change(state: str, error: Exception | None) -> None:
        nonlocal down
        if state == "lost" and not down:
            down = True
            reason = describe(error) if error is not None else "unknown reason"
            what = "connection lost" if stream.has_subscribed else "cannot subscribe yet"
            click.echo(f"program-timer: {what} ({reason}); reconnecting", err=True)
        elif state in ("connected", "reconnected") and down:
            down = False
            click.echo("program-timer: reconnected", err=True)

    stream = EventStream(
        settings.socket,
        subscription,
        connector_idn=connector,
        persona_id=persona,
        wait_for_daemon=False,
        on_connection_change=on_change,
    )
    temporary = subscription is None

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM and SIGHUP end the command as Ctrl-C does

    previous: dict[signal.Signals, Any] = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave the signals alone
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, stop)
    seen = 0
    try:
        for delivery in stream:
            message = delivery.message
            if as_json:
                click.echo(json.dumps(message, ensure_ascii=False), nl=True)
            else:
                ev = message["event"]
                a = ev["arguments"]
                click.echo(
                    f"{a.get('firedAt')}  {_escape(ev['connectorIdn'])}  "
                    f"{_escape(ev['personaId'])}/{_escape(a.get('timerName', ''))}  "
                    f"fire #{a.get('fireCount')} missed {a.get('missedCount')}  "
                    f"attempt {message['attempt']}  {ev['externalEventId']}"
                )
            sys.stdout.flush()
            if ack:
                delivery.ack()
            seen += 1
            if count is not None and seen >= count:
                break
    except KeyboardInterrupt:
        pass
    except ClientError as exc:
        where = f" (argument {exc.field})" if exc.field else ""
        _fail(f"{exc.code}{where}: {exc.message}")
    except OSError as exc:  # the first connection: retrying is for connections that worked
        _fail(
            f"cannot reach the daemon at {settings.socket}: {describe(exc)}. Is it running? "
            "Start it with `program-timer serve` (the socket is set by --socket, "
            "PROGRAM_TIMER_SOCKET or the configuration file, the same for both commands)."
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stream.close()
        if temporary and stream.has_subscribed:
            try:
                stream.unsubscribe(timeout=5.0)
            except (ClientError, OSError) as exc:
                click.echo(
                    f"program-timer: could not remove the subscription "
                    f"{stream.subscription_id}: {describe(exc)}",
                    err=True,
                )


if __name__ == "__main__":  # pragma: no cover
    main()
