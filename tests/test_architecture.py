"""The house rules that keep the architecture readable, checked like any behaviour:

- the layers point one way (import-linter contracts in ``pyproject.toml``);
- the old top-level names (``scheduler``, ``store``, ``events``, ``core``) are never imported, and
  the code is ruff-clean, ruff-formatted and mypy-strict clean;
- a wheel installs exactly one import package, ``program_timer``;
- the timer's columns have one source, the schema.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from program_timer.core.model import Timer
from program_timer.store.queries.timers import TIMER_COLUMNS
from program_timer.store.schema import timers

ROOT = Path(__file__).resolve().parent.parent


def _run(
    *cmd: str,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


LINT_IMPORTS = (
    sys.executable,
    "-c",
    "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))",
)


def test_layers_point_one_way() -> None:
    result = _run(*LINT_IMPORTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def test_the_contracts_catch_an_upward_import(tmp_path: Path) -> None:
    """The contract is not vacuous: a core module importing the store breaks it. The probe goes
    into a copy of the package, never into the checkout, where the other checks (run by another
    worker at the same time) would see it."""
    copy = tmp_path / "program_timer"
    shutil.copytree(ROOT / "program_timer", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "core" / "_probe_upward.py").write_text(
        "from program_timer.store import schema\n\nprint(schema)\n"
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)  # the contracts
    # PYTHONPATH: the copy, ahead of the checkout
    result = _run(*LINT_IMPORTS, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert "program_timer.core._probe_upward -> program_timer.store" in result.stdout


def test_ruff_check_and_format() -> None:
    check = _run(sys.executable, "-m", "ruff", "check", ".")
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = _run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_old_top_level_names_are_banned() -> None:
    """The probe is given on standard input under a name in tests/ (no file is written: the
    other checks may be running on the checkout meanwhile)."""
    check = _run(
        *(sys.executable, "-m", "ruff", "check", "--no-cache"),
        *("--stdin-filename", "tests/_probe_old_import.py", "-"),
        stdin="from scheduler.rules import fire\n\nprint(fire)\n",
    )
    assert check.returncode != 0
    assert "TID251" in check.stdout


def test_mypy_strict() -> None:
    result = _run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_the_wheel_holds_one_import_package(tmp_path: Path) -> None:
    result = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("program_timer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"program_timer"}, top
    for module in (
        "program_timer/core/rules.py",
        "program_timer/scheduler/daemon.py",
        "program_timer/store/queries/timers.py",
        "program_timer/store/migrations/script.py.mako",
        "program_timer/events/client.py",
    ):
        assert module in names, module


def test_the_timer_columns_have_one_source() -> None:
    """The store maps every column of the schema to the Timer field of the same name."""
    fields = {f.name for f in dataclasses.fields(Timer)}
    columns = {c.name for c in timers.c}
    assert fields == (columns - {"interval_s"}) | {"interval"}
    assert set(TIMER_COLUMNS) == columns - {"id"}
