"""Backends for the contract suite: a fresh SQLite file, and a fresh PostgreSQL database copied
from a migrated template (dropped after). PostgreSQL tests skip with a reason when no server is
reachable, and fail instead under ``CI=true``.
"""

from __future__ import annotations

import compileall
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine

from program_timer.store.db import make_engine, upgrade
from tests.daemon_proc import DaemonProcess, short_tmpdir


def pytest_configure(config: pytest.Config) -> None:
    """Compile the package once, before the workers start: the tests start hundreds of daemons
    and CLI processes from this checkout (an editable install), and where
    PYTHONDONTWRITEBYTECODE is set, as on this project's CI machines, each of them would
    compile every module of it again (about 0.2 s of a daemon's start there)."""
    if not hasattr(config, "workerinput"):  # the xdist controller, or a run without workers
        package = Path(__file__).resolve().parent.parent / "program_timer"
        linked = [p.resolve() for p in package.iterdir() if p.is_symlink() and p.is_dir()]
        for folder in [package, *linked]:  # compile_dir does not follow the links
            compileall.compile_dir(folder, quiet=1)


PG_ADMIN = os.environ.get("PROGRAM_TIMER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
RUN_ID = uuid.uuid4().hex[:8]
TEMPLATE = f"pt_{RUN_ID}_tmpl"


def _pg_reason() -> str | None:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3, autocommit=True):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN}: {str(exc).strip().splitlines()[0]}"


def _admin_url(database: str) -> str:
    base, _, _ = PG_ADMIN.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    reason = _pg_reason()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)")
        pytest.skip(reason)
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    engine = make_engine(_admin_url(TEMPLATE))
    upgrade(engine)
    engine.dispose()
    yield TEMPLATE
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    name = f"pt_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield _admin_url(name)
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'timers.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """The contract suite runs once per backend."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(name)
    return url


def _migrated_engine(url: str) -> Iterator[Engine]:
    eng = make_engine(url)
    upgrade(eng)
    yield eng
    pool = eng.pool
    checked_out = pool.checkedout() if hasattr(pool, "checkedout") else 0
    eng.dispose()
    assert checked_out == 0, f"{checked_out} database connections leaked"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    yield from _migrated_engine(db_url)


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    """The ``engine`` of a test that runs on PostgreSQL only."""
    yield from _migrated_engine(pg_url)


@pytest.fixture
def daemon_factory(db_url: str) -> Iterator[object]:
    """Start real daemons as subprocesses on the test's database; all are stopped after."""
    started: list[DaemonProcess] = []
    folders: list[Path] = []

    def make(**env: object) -> DaemonProcess:
        folder = short_tmpdir()
        folders.append(folder)
        d = DaemonProcess(db_url, folder, **env)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def daemon(daemon_factory: object) -> DaemonProcess:
    d: DaemonProcess = daemon_factory()  # type: ignore[operator]
    return d.start()
