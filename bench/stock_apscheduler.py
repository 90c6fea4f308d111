"""Stock APScheduler 3.11, the comparison: ``BackgroundScheduler`` with its own
``SQLAlchemyJobStore``, one job per timer, the job function writing its event row in a transaction
of its own (events durable, as ours are).

Same database, same durability settings as the daemon (SQLite: WAL, ``synchronous=FULL``,
busy timeout; PostgreSQL: defaults), default executor (a pool of 10 threads), jobs that are never
dropped as misfired (``misfire_grace_time=None``, as the daemon never drops by default).

The jobs are added with stock ``add_job`` (the job store pickles them: that is its own format;
nothing in this project imports pickle), before their run time: ``_lead`` leaves time for that,
and ``setup_margin_s`` in the results shows what was left when the first job fell due.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger

from bench.common import (
    CONNECTOR,
    BenchError,
    Database,
    from_epoch,
    summarize_ms,
)
from program_timer.store.db import normalize_url
from program_timer.store.schema import UTCDateTime

_metadata = sa.MetaData()
# The same columns as the daemon's own ``events`` rows.
stock_events = sa.Table(
    "stock_events",
    _metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("external_event_id", sa.String(36), nullable=False, unique=True),
    sa.Column("persona_id", sa.String(255), nullable=False),
    sa.Column("timer_name", sa.String(255), nullable=False),
    sa.Column("connector_idn", sa.String(255), nullable=False),
    sa.Column("command_act_id", sa.String(36), nullable=False),
    sa.Column("scheduled_at", UTCDateTime(), nullable=False),
    sa.Column("fired_at", UTCDateTime(), nullable=False),
    sa.Column("fire_count", sa.Integer(), nullable=False),
    sa.Column("missed_count", sa.Integer(), nullable=False),
    sa.Column("arguments", sa.JSON(), nullable=False),
    sa.Column("routed", sa.Integer(), nullable=False),
    sa.Column("fired_by", sa.String(64), nullable=False),
)


class _State:
    """What the job function needs (set by the harness before the scheduler starts)."""

    engine: sa.Engine | None = None
    lock = threading.Lock()
    done = 0
    last_done_at = 0.0
    errors = 0


def fire_job(persona_id: str, timer_name: str, scheduled_ts: float, act_id: str) -> None:
    """The job: record the timer's event durably, in a transaction of its own."""
    now = datetime.now(UTC)
    scheduled = datetime.fromtimestamp(scheduled_ts, UTC)
    arguments = {
        "flow": "bench",
        "personaId": persona_id,
        "timerName": timer_name,
        "scheduledAt": scheduled.isoformat().replace("+00:00", "Z"),
        "firedAt": now.isoformat().replace("+00:00", "Z"),
        "fireCount": "1",
        "missedCount": "0",
        "repeatable": "false",
    }
    assert _State.engine is not None
    try:
        with _State.engine.begin() as conn:
            conn.execute(
                stock_events.insert(),
                {
                    "external_event_id": str(uuid.uuid4()),
                    "persona_id": persona_id,
                    "timer_name": timer_name,
                    "connector_idn": CONNECTOR,
                    "command_act_id": act_id,
                    "scheduled_at": scheduled,
                    "fired_at": now,
                    "fire_count": 1,
                    "missed_count": 0,
                    "arguments": arguments,
                    "routed": 0,
                    "fired_by": "stock-apscheduler",
                },
            )
    except Exception:
        with _State.lock:
            _State.errors += 1
        raise
    with _State.lock:
        _State.done += 1
        _State.last_done_at = time.time()


def _engine(db: Database) -> sa.Engine:
    """The engine a careful user of stock APScheduler would give it: SQLite in WAL with full
    sync and a busy timeout (ten worker threads write at once), PostgreSQL as is."""
    url = normalize_url(db.url)
    if db.kind == "sqlite":
        engine = sa.create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=12
        )

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return sa.create_engine(url, pool_size=12)


class StockRun:
    """One stock scheduler on a fresh database."""

    def __init__(self, db: Database, label: str) -> None:
        db.fresh(label)
        self.db = db
        self.engine = _engine(db)
        _metadata.create_all(self.engine)
        self.jobstore = SQLAlchemyJobStore(engine=self.engine)
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            jobstores={"default": self.jobstore},
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
        )
        _State.engine = self.engine
        _State.done = 0
        _State.errors = 0
        _State.last_done_at = 0.0

    def __enter__(self) -> StockRun:
        self.scheduler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.engine.dispose()
        _State.engine = None

    def add_jobs(self, jobs: Iterable[tuple[str, str, datetime]]) -> None:
        """Add the jobs (persona, name, run time) through stock ``add_job``, as a user of
        APScheduler would: the job store serializes each job itself (its own pickled format;
        nothing in this project pickles). The scheduler is paused meanwhile so that each
        addition does not also start a look for due jobs."""
        self.scheduler.pause()
        try:
            for persona, name, when in jobs:
                self.scheduler.add_job(
                    fire_job,
                    trigger=DateTrigger(run_date=when, timezone=UTC),
                    id=f"{persona}/{name}",
                    name=name,
                    args=(persona, name, when.timestamp(), str(uuid.uuid4())),
                )
            if self.db.kind == "postgres":
                with self.engine.begin() as conn:
                    conn.execute(sa.text("ANALYZE apscheduler_jobs"))
        finally:
            self.scheduler.resume()

    def wait(self, n: int, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with _State.lock:
                if _State.done >= n:
                    return _State.last_done_at
            time.sleep(0.005)
        return None

    def event_times(self) -> list[tuple[float, float]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(stock_events.c.scheduled_at, stock_events.c.fired_at).order_by(
                    stock_events.c.id
                )
            ).all()
        return [(s.timestamp(), f.timestamp()) for s, f in rows]


def _lead(n: int) -> float:
    # stock add_job is one transaction per job (a few ms with synchronous=FULL)
    return 1.0 + n * 4e-3


def run_stock_burst(db: Database, n: int, *, label: str) -> dict[str, Any]:
    """``n`` one-shot jobs all due at one instant."""
    timeout = max(60.0, n / 20)
    with StockRun(db, label) as run:
        t0 = time.time() + _lead(n)
        when = from_epoch(t0)
        run.add_jobs((f"burst-{i // 1000:05d}", f"t{i:07d}", when) for i in range(n))
        margin = t0 - time.time()
        done = run.wait(n, timeout)
        times = run.event_times()
        errors = _State.errors
    if done is None:
        raise BenchError(f"{label}: {len(times)} of {n} stock jobs ran within {timeout:.0f} s")
    last_fired = max(f for _, f in times)
    return {
        "n": n,
        "setup_margin_s": round(margin, 3),
        "durable_s": round(done - t0, 4),
        "durable_per_s": round(n / (done - t0), 1),
        "last_fired_at_s": round(last_fired - t0, 4),
        "fired_at_per_s": round(n / max(last_fired - t0, 1e-6), 1),
        "lateness": summarize_ms(f - s for s, f in times),
        "errors": errors,
    }


def run_stock_steady(db: Database, rate: float, seconds: float, *, label: str) -> dict[str, Any]:
    """``rate`` jobs per second for ``seconds``, run times evenly spread."""
    n = int(rate * seconds)
    with StockRun(db, label) as run:
        t0 = time.time() + _lead(n)
        run.add_jobs(
            (f"steady-{i // 1000:05d}", f"t{i:07d}", from_epoch(t0) + timedelta(seconds=i / rate))
            for i in range(n)
        )
        margin = t0 - time.time()
        done = run.wait(n, seconds + max(60.0, n / 20))
        times = run.event_times()
    if done is None:
        raise BenchError(f"{label}: {len(times)} of {n} stock jobs ran")
    lateness = [f - s for s, f in times]
    return {
        "rate": rate,
        "seconds": seconds,
        "n": n,
        "setup_margin_s": round(margin, 3),
        "lateness": summarize_ms(lateness),
        "lateness_samples_s": lateness,
    }


if __name__ == "__main__":  # pragma: no cover - quick manual check
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="bench-stock-") as tmp:
        database = Database(sys.argv[1] if len(sys.argv) > 1 else "sqlite", Path(tmp))
        database.setup()
        try:
            print(json.dumps(run_stock_burst(database, 500, label="stock-burst"), indent=1))
        finally:
            database.cleanup()
