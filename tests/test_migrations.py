"""Schema migrations: a database at an earlier revision is upgraded in place, its rows kept
(SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory

from program_timer.store import queries
from program_timer.store.db import MIGRATIONS, at_head, head_revision, make_engine, upgrade
from program_timer.store.errors import StoreError
from program_timer.store.schema import timers

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def _upgrade_to(engine: sa.Engine, revision: str) -> None:
    """Alembic's own command on the daemon's migrations, stopped at ``revision``."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", MIGRATIONS)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        alembic_command.upgrade(cfg, revision)
        conn.commit()


def _empty(engine: sa.Engine) -> None:
    """The PostgreSQL test databases are copies of a migrated template: start from nothing."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))


def test_timer_of_revision_0001_survives_the_upgrade(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        _empty(engine)
        _upgrade_to(engine, "0001")
        with engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("timers")}
        assert "rrule" not in columns and "cron" not in columns
        act = str(uuid.uuid4())
        row = {
            "persona_id": "u1",
            "timer_name": "old",
            "connector_idn": "my_timer",
            "fire_at": T0,
            "timezone": "Europe/Paris",
            "interval_s": 240.0,
            "repeatable": True,
            "enabled": True,
            "anchor_at": T0,
            "planned_at": T0,
            "due_at": T0,
            "state": "scheduled",
            "fire_count": 2,
            "last_fired_at": T0,
            "arguments": {"topic": "billing"},
            "command_act_id": act,
            "created_at": T0,
            "updated_at": T0,
        }
        with engine.begin() as conn:  # only the columns revision 0001 has
            conn.execute(sa.insert(timers).values(**row))

        upgrade(engine)

        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            columns = {c["name"] for c in inspector.get_columns("timers")}
            assert {"rrule", "cron"} <= columns
            assert "dead_at" in {c["name"] for c in inspector.get_columns("deliveries")}
            assert "last_ack_at" in {c["name"] for c in inspector.get_columns("subscriptions")}
            timer = queries.get_timer(conn, "u1", "old")
            assert queries.timer_counts(conn) == {"scheduled": 1}  # 0004 counted what was there
        assert timer is not None
        assert timer.rrule is None and timer.cron is None
        for name, value in row.items():
            field = "interval" if name == "interval_s" else name
            assert getattr(timer, field) == value, name
        upgrade(engine)  # at head already: nothing to do
    finally:
        engine.dispose()


def test_head_revision_is_alembics_head() -> None:
    """The start skips Alembic when the schema is at ``head_revision()``: it must be the head
    Alembic itself would upgrade to, and every file name its revision."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", MIGRATIONS)
    scripts = ScriptDirectory.from_config(cfg)
    assert scripts.get_heads() == [head_revision()]
    for script in scripts.walk_revisions():
        assert script.path.rsplit("/", 1)[-1].startswith(f"{script.revision}_")


def test_start_skips_alembic_only_at_head(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        _empty(engine)
        assert not at_head(engine)  # no schema at all
        _upgrade_to(engine, "0003")
        assert not at_head(engine)  # an older revision: upgrade() runs the migrations
        upgrade(engine)
        assert at_head(engine)
        with engine.connect() as conn:
            assert "timer_counts" in sa.inspect(conn).get_table_names()
        with engine.begin() as conn:  # a revision this code does not know (a newer schema)
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
        assert not at_head(engine)
        with pytest.raises(StoreError, match="newer version"):
            upgrade(engine)
    finally:
        engine.dispose()


def test_deliveries_of_revision_0004_keep_their_ids_and_ids_are_never_given_again(
    db_url: str,
) -> None:
    """0005 rebuilds SQLite's deliveries with ``AUTOINCREMENT``: the rows and their ids are
    kept, and once the newest are deleted (acks delete them) the next ids still come after
    them. Without it the next delivery took the deleted one's id, and a late ack of that id
    would ack it."""
    from program_timer.store.schema import deliveries, events, subscriptions

    engine = make_engine(db_url)
    try:
        _empty(engine)
        _upgrade_to(engine, "0004")
        with engine.begin() as conn:
            conn.execute(
                sa.insert(subscriptions).values(
                    subscription_id="s", flow_instance_id="f", created_at=T0
                )
            )
            for i in (1, 2):
                conn.execute(
                    sa.insert(events).values(
                        id=i,
                        external_event_id=str(uuid.uuid4()),
                        persona_id="u1",
                        timer_name=f"t{i}",
                        connector_idn="c",
                        command_act_id=str(uuid.uuid4()),
                        scheduled_at=T0,
                        fired_at=T0,
                        fire_count=1,
                        missed_count=0,
                        arguments={},
                        routed=1,
                        fired_by="test",
                    )
                )
            for delivery_id in (7, 9):
                conn.execute(
                    sa.insert(deliveries).values(
                        id=delivery_id,
                        subscription_id="s",
                        event_id=delivery_id // 7,
                        attempt=1,
                        next_attempt_at=T0,
                        created_at=T0,
                    )
                )
            if engine.dialect.name == "postgresql":  # the daemon takes its ids from the sequence
                conn.execute(
                    sa.text("SELECT setval(pg_get_serial_sequence('deliveries', 'id'), 9)")
                )
        upgrade(engine)
        with engine.begin() as conn:
            kept = conn.execute(sa.select(deliveries.c.id).order_by(deliveries.c.id)).scalars()
            assert list(kept) == [7, 9]
            assert queries.ack_deliveries(conn, [9, 7], ["s"], T0) in ([7, 9], [9, 7])
            _event_ids, delivery_ids = queries.allocate_ids(conn, 0, 2)
        assert delivery_ids == [10, 11]  # not 1 and 2: 7 and 9 are never given again
    finally:
        engine.dispose()
