"""The operators' subcommands: subscriptions, their deliveries and dead letters, and events
followed as they fire."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from typing import Any

import click

from program_timer.events.client import ClientError, EventStream
from program_timer.scheduler.cli_common import (
    CONTEXT,
    age,
    call,
    cell,
    escape,
    fail,
    filter_text,
    load_or_exit,
    print_json,
    print_rows,
    value_text,
)


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's result as JSON.")
@click.pass_context
def subscriptions(ctx: click.Context, as_json: bool) -> None:
    """List the subscriptions: attached or not, pending, in-flight and dead deliveries."""
    result = call(ctx, lambda c: c.request("subscriptions"))
    if as_json:
        print_json(result)
        return
    print_rows(
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
                cell(s["subscriptionId"]),
                cell(s["flowInstanceId"]),
                filter_text(s["filter"]),
                cell(s["attached"]),
                cell(s["pending"]),
                cell(s["inflight"]),
                cell(s["dead"]),
                age(s["oldestPendingAt"]),
                age(s["lastAckAt"]),
            ]
            for s in result["subscriptions"]
        ],
        "(no subscriptions)",
    )


@click.command(context_settings=CONTEXT)
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
    result = call(ctx, lambda c: c.request("deliveries", **fields))
    if as_json:
        print_json(result)
        return
    rows = []
    for x in result["deliveries"]:
        ev = x["event"]
        a = ev["arguments"]
        rows.append(
            [
                cell(x["deliveryId"]),
                cell(x["attempt"]),
                cell(x["nextAttemptAt"]),
                cell(a.get("firedAt")),
                cell(ev["connectorIdn"]),
                f"{escape(ev['personaId'])}/{escape(a.get('timerName', ''))}",
                cell(a.get("fireCount")),
                cell(ev["externalEventId"]),
            ]
        )
    print_rows(
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


@click.command(context_settings=CONTEXT)
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
    result = call(ctx, lambda c: c.request("redeliver", **fields))
    if as_json:
        print_json(result)
    else:
        click.echo(f"redelivered: {result['redelivered']}")


@click.command(context_settings=CONTEXT)
@click.argument("subscription")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's result as JSON.")
@click.pass_context
def unsubscribe(ctx: click.Context, subscription: str, as_json: bool) -> None:
    """Delete a subscription and all its deliveries (its pending events are dropped)."""
    result = call(ctx, lambda c: c.request("unsubscribe", subscriptionId=subscription))
    if as_json:
        print_json(result)
    else:
        click.echo(f"removed: {value_text(result['removed'])}")


@click.command(context_settings=CONTEXT)
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
    # Whole on purpose: the signal handlers it installs, the loop, and the clean-up of its
    # throwaway subscription (which those handlers must reach) belong in one reading.
    import signal

    from program_timer.events.client import describe

    settings = load_or_exit(ctx.obj["config"], socket=ctx.obj["socket"])
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
                    f"{a.get('firedAt')}  {escape(ev['connectorIdn'])}  "
                    f"{escape(ev['personaId'])}/{escape(a.get('timerName', ''))}  "
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
        fail(f"{exc.code}{where}: {exc.message}")
    except OSError as exc:  # the first connection: retrying is for connections that worked
        fail(
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
