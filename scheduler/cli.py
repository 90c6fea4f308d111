"""The ``program-timer`` command: run the daemon, and talk to it from a terminal.

Every client subcommand reaches the daemon through the same socket setting as ``serve``
(``--socket``, else ``PROGRAM_TIMER_SOCKET``, else the TOML file, else the default path).
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, NoReturn

import click

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
    """
    ctx.obj = {"config": config, "socket": socket_path}


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
        click.echo(f"removed: {result['removed']}")


def _print_timer(timer: dict[str, Any]) -> None:
    width = max(len(k) for k in timer)
    for key, value in timer.items():
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value
        click.echo(f"{key:<{width}}  {'' if shown is None else shown}")


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
    rows = [[_cell(t.get(c)) for c in columns] for t in timers]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    if not rows:
        click.echo("(no timers)")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


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
        click.echo(f"(more: --after {result['nextAfter']})")


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
        click.echo(f"removed: {result['removed']}")


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
        f"program-timer {result['version']}  daemon {result['daemonId']}  "
        f"up {result['uptimeSeconds']:.0f}s  database {result['database']}"
        f"{'' if result['databaseReachable'] else ' (UNREACHABLE)'}"
    )
    if not result["databaseReachable"]:
        click.echo("the database cannot be reached: figures stored there are not shown")
    timers = result["timers"] or {}
    click.echo("timers      " + "  ".join(f"{k} {v}" for k, v in timers.items()))
    click.echo(
        f"fires       total {result['fires']['total']}  dropped "
        f"{result['fires']['dropped']}  lateness p50 {lat['p50Ms']} ms  "
        f"p99 {lat['p99Ms']} ms  max {lat['maxMs']} ms"
    )
    d = result["deliveries"]
    click.echo(
        f"deliveries  pending {d['pending']}  oldest {d['oldestPendingAgeSeconds']} s  "
        f"in flight {d['inflight']}"
    )
    events = result["events"] or {"stored": None, "unrouted": None}
    click.echo(f"events      stored {events['stored']}  unrouted {events['unrouted']}")
    click.echo(
        f"subscribers connected {result['connectedSubscribers']} of "
        f"{result['subscriptions']} subscriptions; connections {result['connections']}"
    )
    for daemon in result["daemons"] or []:
        click.echo(
            f"daemon      {daemon['daemonId']} on {daemon['hostname']} "
            f"heartbeat {daemon['heartbeatAt']}"
        )


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
                    f"{a.get('firedAt')}  {ev['connectorIdn']}  {ev['personaId']}/"
                    f"{a.get('timerName')}  fire #{a.get('fireCount')} missed "
                    f"{a.get('missedCount')}  attempt {message['attempt']}  "
                    f"{ev['externalEventId']}"
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
