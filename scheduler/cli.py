"""The ``program-timer`` command: run the daemon, and talk to it from a terminal.

Every client subcommand reaches the daemon through the same socket setting as ``serve``
(``--socket``, else ``PROGRAM_TIMER_SOCKET``, else the TOML file, else the default path).
"""

from __future__ import annotations

from typing import Any

import click

from program_timer import __version__
from program_timer.scheduler import cli_admin
from program_timer.scheduler.cli_common import (
    CONTEXT,
    call,
    cell,
    duration,
    fail,
    load_or_exit,
    ms,
    print_json,
    print_timer,
    print_timers,
    value_text,
)
from program_timer.scheduler.config import load_settings


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
    ("metrics_refresh", float, "Least time between two reads of the database figures, s"),
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

    settings = load_or_exit(ctx.obj["config"], socket=ctx.obj["socket"], **flags)
    configure(settings.log_format, settings.log_level)
    database = normalize_url(settings.database_url).render_as_string(hide_password=True)
    try:
        run(
            settings,
            reload=lambda: load_settings(ctx.obj["config"], socket=ctx.obj["socket"], **flags),
        )
    except AlreadyRunning as exc:
        fail(str(exc), 3)
    except StoreError as exc:  # the database cannot be opened, read or migrated
        get_logger().error("cannot start", action="start_failed", reason=str(exc))
        fail(f"cannot use the database {database}: {exc}", 4)
    except (RuntimeError, OSError) as exc:  # the socket cannot be made
        get_logger().error("cannot start", action="start_failed", reason=str(exc))
        fail(f"cannot start: {exc}", 3)


def _parse_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"arguments are key=value, got {pair!r}", 2)
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
    result = call(
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
        print_json(result)
        return
    for warning in result.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    if "timer" in result:
        print_timer(result["timer"])
    elif "timers" in result:
        print_timers(result["timers"])
    elif "removed" in result:
        click.echo(f"removed: {value_text(result['removed'])}")


# --- output for people: JSON spellings, escaped names, aligned columns -----------------------


# Characters that would move the cursor or reorder text on a terminal (controls, line and
# paragraph separators, bidirectional overrides) are shown escaped; joiners and variation
# selectors (emoji sequences) are kept.
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
    result = call(ctx, lambda c: c.command("list_timers", "cli", **args))
    if as_json:
        print_json(result)
        return
    print_timers(result["timers"])
    if result.get("nextAfter"):
        click.echo(f"(more: --after {value_text(result['nextAfter'])})")


@main.command(context_settings=CONTEXT)
@click.argument("persona_id")
@click.argument("timer_name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def get(ctx: click.Context, persona_id: str, timer_name: str, as_json: bool) -> None:
    """Show one timer's full state."""
    result = call(
        ctx, lambda c: c.command("get_timer", "cli", personaId=persona_id, timerName=timer_name)
    )
    if as_json:
        print_json(result)
    else:
        print_timer(result["timer"])


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
        fail("give either TIMER_NAME or --all", 2)
    if all_:
        result = call(ctx, lambda c: c.command("delete_timers", "cli", personaId=persona_id))
    else:
        result = call(
            ctx,
            lambda c: c.command("delete_timer", "cli", personaId=persona_id, timerName=timer_name),
        )
    if as_json:
        print_json(result)
    else:
        click.echo(f"removed: {value_text(result['removed'])}")


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the daemon's status."""
    result = call(ctx, lambda c: c.status())
    if as_json:
        print_json(result)
        return
    lat = result["fires"]["lateness"]
    click.echo(
        f"program-timer {result['version']}  daemon {value_text(result['daemonId'])}  "
        f"up {duration(result['uptimeSeconds'])}  database {result['database']}"
        f"{'' if result['databaseReachable'] else ' (UNREACHABLE)'}"
    )
    if not result["databaseReachable"]:
        click.echo("the database cannot be reached: figures stored there are not shown (-)")
    timers = result["timers"] or {}
    click.echo("timers      " + ("  ".join(f"{k} {v}" for k, v in timers.items()) or "-"))
    click.echo(
        f"fires       total {result['fires']['total']}  dropped "
        f"{result['fires']['dropped']}  lateness p50 {ms(lat['p50Ms'])}  "
        f"p99 {ms(lat['p99Ms'])}  max {ms(lat['maxMs'])}"
    )
    d = result["deliveries"]
    click.echo(
        f"deliveries  pending {cell(d['pending'])}  oldest "
        f"{duration(d['oldestPendingAgeSeconds'])}  dead {cell(d.get('dead'))}  "
        f"in flight {d['inflight']}"
    )
    events = result["events"] or {"stored": None, "unrouted": None}
    click.echo(f"events      stored {cell(events['stored'])}  unrouted {cell(events['unrouted'])}")
    click.echo(
        f"subscribers connected {result['connectedSubscribers']} of "
        f"{cell(result['subscriptions'])} subscriptions; connections {result['connections']}"
    )
    for name, failures in (result.get("failing") or {}).items():
        click.echo(f"failing     {name}: {failures} failures in a row (retried with backoff)")
    for daemon in result["daemons"] or []:
        click.echo(
            f"daemon      {value_text(daemon['daemonId'])} on {value_text(daemon['hostname'])} "
            f"heartbeat {daemon['heartbeatAt']}"
        )


for _command in (
    cli_admin.subscriptions,
    cli_admin.deliveries,
    cli_admin.redeliver,
    cli_admin.unsubscribe,
    cli_admin.events,
):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
