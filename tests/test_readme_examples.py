"""The README's complete asyncio example runs as written against a real daemon."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess

README = Path(__file__).resolve().parent.parent / "README.md"


def _asyncio_example() -> str:
    text = README.read_text()
    after = text.split("The same with asyncio, complete:", 1)[1]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match, "the README lost its asyncio example"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_readme_asyncio_example_receives_and_acks(daemon: DaemonProcess, tmp_path: Path) -> None:
    code = _asyncio_example()
    assert '"/run/program-timer/program-timer.sock"' in code and 'interval="60"' in code
    code = code.replace('"/run/program-timer/program-timer.sock"', repr(daemon.socket))
    code = code.replace('interval="60"', 'interval="1"')  # an event within a second
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        second = proc.stdout.readline()
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert first.strip() == "u1 nudge", (first, err)
    assert second.strip() == "u1 nudge", (second, err)
    with daemon.client() as c:
        assert c.status()["deliveries"]["pending"] <= 1  # each event acked as it was handled
