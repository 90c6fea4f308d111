"""The two formatters of instants, written by orjson, give exactly what ``isoformat()`` gives:
on the wire (``utc_iso``) and in SQLite's text columns (``sqlite_datetime``, whose text order
must stay time order)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from program_timer.core.clock import utc_iso
from program_timer.store.queries.driver import sqlite_datetime

ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-11))]
)
INSTANTS = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 30), timezones=ZONES
)


def _wire(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()[:-6] + "Z"


def _sqlite(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(" ", "microseconds")[:26]


@given(INSTANTS)
def test_formatted_as_isoformat_does(value: datetime) -> None:
    utc_iso.cache_clear()
    sqlite_datetime.cache_clear()
    assert utc_iso(value) == _wire(value)
    assert sqlite_datetime(value) == _sqlite(value)


def test_edges() -> None:
    whole = datetime(2026, 11, 28, 3, 10, 2, tzinfo=UTC)
    for value in (
        whole,
        whole.replace(microsecond=1),
        whole.replace(microsecond=999_999),
        whole.replace(microsecond=100_000),
        datetime(999, 1, 1, tzinfo=UTC),
        whole.astimezone(timezone(timedelta(hours=-3))),
    ):
        assert utc_iso(value) == _wire(value)
        assert sqlite_datetime(value) == _sqlite(value)
    assert utc_iso(whole) == "2026-11-28T03:10:02Z"
    assert sqlite_datetime(whole) == "2026-11-28 03:10:02.000000"
    assert utc_iso(None) is None
    assert sqlite_datetime(None) is None


@given(st.lists(INSTANTS, min_size=2, max_size=20))
def test_sqlite_text_order_is_time_order(values: list[datetime]) -> None:
    texts = [sqlite_datetime(v) for v in sorted(values)]
    assert texts == sorted(texts)  # type: ignore[type-var]
