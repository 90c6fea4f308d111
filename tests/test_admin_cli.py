"""The operators' CLI (SPEC 7.4): ``subscriptions``, ``deliveries``, ``redeliver`` and
``unsubscribe`` against a real daemon, as a person reads them (tables) and as a script does
(``--json``); and the polish of every command's output: JSON spellings, escaped names, columns
aligned with wide characters, every setting a ``serve`` flag, shell completion."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wcwidth

from program_timer.scheduler.cli import serve
from program_timer.scheduler.config import Settings
from tests.daemon_proc import DaemonProcess, short_tmpdir, wait_for

# A timer name with a terminal escape and a newline, a persona in CJK, a connector with emoji.
NASTY = "t\x1b[31m\nred"
PERSONA = "ペルソナ"
CONNECTOR = "conn🎉"


def cli(d: DaemonProcess, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRAM_TIMER_")}
    result = subprocess.run(
        [sys.executable, "-m", "program_timer", "--socket", d.socket, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def cli_json(d: DaemonProcess, *args: str) -> Any:
    return json.loads(cli(d, *args, "--json").stdout)


def table(text: str) -> list[list[str]]:
    """The rows of a table printed by the CLI, cells split on runs of 2+ spaces."""
    return [re.split(r" {2,}", line.rstrip()) for line in text.splitlines() if line.strip()]


def assert_aligned(text: str) -> None:
    """Every column starts at the same terminal column on every line (wide characters count
    two): the header's columns are where the cells are."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("(")]
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", header)]
    for line in lines[1:]:
        cells = re.split(r"(?<=\S) {2,}(?=\S)", line.rstrip())
        col = 0
        positions = []
        rest = line
        for cell in cells:
            at = rest.index(cell)
            col += wcwidth.wcswidth(rest[:at])
            positions.append(col)
            col += wcwidth.wcswidth(cell)
            rest = rest[at + len(cell) :]
        assert positions == starts[: len(positions)], (line, positions, starts)


@pytest.fixture
def busy(sqlite_url: str) -> Iterator[DaemonProcess]:
    """A daemon with a subscription that never acks (its deliveries die after one send) and
    one whose subscriber is away (its deliveries wait), two events each."""
    d = DaemonProcess(
        sqlite_url,
        short_tmpdir(),
        PROGRAM_TIMER_ACK_TIMEOUT=0.3,
        PROGRAM_TIMER_MAX_ATTEMPTS=1,
    )
    d.start()
    with d.client() as away:
        away.subscribe("away", persona_id=PERSONA)
    lazy = d.client()
    lazy.subscribe("lazy", connector_idn=CONNECTOR, flow_instance_id="fi-🎉")
    with d.client() as c:
        for name in (NASTY, "日本語の名前"):
            c.command("set_timer", CONNECTOR, personaId=PERSONA, timerName=name, interval="0.1")
        wait_for(lambda: c.status()["deliveries"]["dead"] == 2, timeout=10)
    d.lazy = lazy  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        lazy.close()
        d.stop()


def test_subscriptions_table_and_json(busy: DaemonProcess) -> None:
    out = cli(busy, "subscriptions").stdout
    assert "\x1b" not in out
    rows = table(out)
    assert rows[0] == [
        "SUBSCRIPTION",
        "FLOW INSTANCE",
        "FILTER",
        "ATTACHED",
        "PENDING",
        "IN FLIGHT",
        "DEAD",
        "OLDEST PENDING",
        "LAST ACK",
    ]
    away, lazy = rows[1], rows[2]
    assert away[:7] == ["away", "away", f"persona={PERSONA}", "false", "2", "0", "0"]
    assert away[7].endswith(" ago") and away[8] == "-"
    assert lazy[:7] == ["lazy", "fi-🎉", f"connector={CONNECTOR}", "true", "0", "0", "2"]
    assert_aligned(out)

    data = cli_json(busy, "subscriptions")
    assert [s["subscriptionId"] for s in data["subscriptions"]] == ["away", "lazy"]
    assert data["subscriptions"][1]["dead"] == 2
    assert data["subscriptions"][0]["filter"] == {"personaId": PERSONA}


def test_deliveries_pages_and_shows_dead_ones(busy: DaemonProcess) -> None:
    out = cli(busy, "deliveries", "lazy", "--dead").stdout
    assert "\x1b" not in out and "\\x1b[31m\\nred" in out  # the name, escaped
    rows = table(out)
    assert rows[0][:4] == ["ID", "ATTEMPT", "NEXT ATTEMPT", "FIRED AT"]
    assert len(rows) == 3 and all(r[1] == "1" and r[2] == "-" for r in rows[1:])
    assert_aligned(out)
    dead = cli_json(busy, "deliveries", "lazy", "--dead")["deliveries"]
    assert [x["state"] for x in dead] == ["dead", "dead"]
    assert dead[0]["event"]["arguments"]["timerName"] == NASTY

    assert "(no pending deliveries)" in cli(busy, "deliveries", "lazy").stdout
    first = cli(busy, "deliveries", "away", "--limit", "1").stdout
    (more,) = re.findall(r"\(more: --after (\d+)\)", first)
    page = cli_json(busy, "deliveries", "away", "--limit", "1")
    assert page["nextAfter"] == int(more) and len(page["deliveries"]) == 1
    rest = cli_json(busy, "deliveries", "away", "--after", more)
    assert len(rest["deliveries"]) == 1 and "nextAfter" not in rest
    assert rest["deliveries"][0]["deliveryId"] > int(more)

    missing = cli(busy, "deliveries", "nobody", ok=False)
    assert missing.returncode == 1 and "not_found" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = cli(busy, "deliveries", "away", "--limit", "0", ok=False)
    assert bad.returncode == 2


def test_redeliver_and_unsubscribe(busy: DaemonProcess) -> None:
    lazy = busy.lazy  # type: ignore[attr-defined]
    dead = cli_json(busy, "deliveries", "lazy", "--dead")["deliveries"]
    one, other = (x["deliveryId"] for x in dead)
    assert cli(busy, "redeliver", "lazy", str(one)).stdout.strip() == "redelivered: 1"
    deadline = time.monotonic() + 10
    seen = []
    while not any(m["deliveryId"] == one for m in seen):
        seen.append(lazy.next_event(max(0.1, deadline - time.monotonic())))
    again = next(m for m in seen if m["deliveryId"] == one)
    assert again["attempt"] == 1  # a fresh budget
    assert cli_json(busy, "redeliver", "lazy", str(other), "999999") == {"redelivered": 1}
    wait_for(lambda: cli_json(busy, "subscriptions")["subscriptions"][1]["dead"] == 2)
    assert cli(busy, "redeliver", "lazy").stdout.strip() == "redelivered: 2"

    assert cli(busy, "unsubscribe", "away").stdout.strip() == "removed: true"
    assert cli(busy, "unsubscribe", "away").stdout.strip() == "removed: false"
    assert cli_json(busy, "unsubscribe", "lazy") == {"removed": True}
    assert "(no subscriptions)" in cli(busy, "subscriptions").stdout
    missing = cli(busy, "redeliver", "away", ok=False)
    assert missing.returncode == 1 and "not_found" in missing.stderr


def test_outputs_use_json_spellings_escape_names_and_align(busy: DaemonProcess) -> None:
    shown = cli(busy, "get", PERSONA, "日本語の名前").stdout
    fields = dict(line.split(None, 1) if " " in line else (line, "") for line in shown.splitlines())
    assert fields["repeatable"].strip() == "false" and fields["enabled"].strip() == "true"
    assert fields["fireAt"].strip() == "null" and fields["arguments"].strip() == "{}"
    for python in ("True", "False", "None"):
        assert not re.search(rf"\b{python}\b", shown)

    listed = cli(busy, "list", PERSONA).stdout
    assert "\x1b" not in listed and "\n" + "red" not in listed
    assert "t\\x1b[31m\\nred" in listed
    assert_aligned(listed)

    status = cli(busy, "status").stdout
    for python in ("True", "False", "None"):
        assert not re.search(rf"\b{python}\b", status), status
    assert re.search(r"lateness p50 [\d.]+ (ms|s)", status), status
    assert re.search(r"dead 2\b", status), status

    removed = cli(busy, "delete", PERSONA, "日本語の名前").stdout
    assert removed.strip() == "removed: true"
    assert cli(busy, "delete", PERSONA, "--all").stdout.strip() == "removed: 1"


def test_every_setting_is_a_serve_flag(tmp_path: Path) -> None:
    flags = {p.name for p in serve.params}
    settings = set(Settings.model_fields) - {"config_file", "socket"}  # --socket is global
    assert settings <= flags, settings - flags
    bad = subprocess.run(
        [sys.executable, "-m", "program_timer", "serve", "--max-attempts", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "PROGRAM_TIMER_MAX_ATTEMPTS" in bad.stderr


def test_shell_completion_script() -> None:
    script = Path(sysconfig.get_path("scripts")) / "program-timer"
    env = dict(os.environ, _PROGRAM_TIMER_COMPLETE="bash_source")
    out = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0
    assert "complete " in out.stdout and "_PROGRAM_TIMER_COMPLETE=bash_complete" in out.stdout
    words = subprocess.run(
        [str(script)],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(
            os.environ,
            _PROGRAM_TIMER_COMPLETE="bash_complete",
            COMP_WORDS="program-timer red",
            COMP_CWORD="1",
        ),
    )
    assert "redeliver" in words.stdout
