"""Writes on the hot paths (commands, fire batches) through the driver, not SQLAlchemy Core.

Core processes every bound value in Python (a UTC datetime goes through two bind processors,
a JSON column through the serializer): at thousands of rows a second that was a third of the
store worker's time. Here the values are converted once, the way the column types would store
them, and handed to the driver's ``executemany`` as tuples. The column lists still come from
the schema; what is read back goes through Core as before, so a row written here reads the
same as one written by Core (tests/test_store_contract.py checks both ways).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from sqlalchemy import Connection, Row, Table
from sqlalchemy import exc as sa_exc

Converter = Callable[[Any], Any]


def sqlite_datetime(value: datetime | None) -> str | None:
    """What SQLAlchemy's SQLite DATETIME stores for our UTC instants: naive UTC, always with
    microseconds (``2026-11-28 03:10:02.000000``), so that text order is time order."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]


def json_dumps(value: Any) -> str:
    """JSON text of a column value: orjson, several times faster than the standard library."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # what orjson refuses (a lone surrogate), the standard library escapes
        return json.dumps(value)


json_loads: Final = orjson.loads


def _sqlite_json(value: Any) -> str:
    return json_dumps(value)


def _sqlite_bool(value: bool | None) -> int | None:
    return None if value is None else int(value)


def _same(value: Any) -> Any:
    return value


_SQLITE: dict[str, Converter] = {
    "UTCDateTime": sqlite_datetime,
    "JSONDoc": _sqlite_json,
    "Boolean": _sqlite_bool,
}


@functools.cache
def _postgres() -> dict[str, Converter]:
    """PostgreSQL's converters; psycopg is imported only by a daemon that uses it."""
    from psycopg.types.json import Jsonb

    return {"JSONDoc": Jsonb}


@functools.cache
def _converters(dialect: str, table: Table, columns: tuple[str, ...]) -> tuple[Converter, ...]:
    """One converter per column, by its type (JSONDoc is JSON, or JSONB on PostgreSQL)."""
    by_type = _SQLITE if dialect == "sqlite" else _postgres()
    return tuple(by_type.get(type(table.c[c].type).__name__, _same) for c in columns)


@functools.cache
def _insert_sql(dialect: str, table: str, columns: tuple[str, ...]) -> str:
    mark = "?" if dialect == "sqlite" else "%s"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join([mark] * len(columns))})"


@functools.cache
def _update_sql(dialect: str, table: str, columns: tuple[str, ...], key: str) -> str:
    mark = "?" if dialect == "sqlite" else "%s"
    sets = ", ".join(f"{c} = {mark}" for c in columns)
    return f"UPDATE {table} SET {sets} WHERE {key} = {mark}"


# Reading ----------------------------------------------------------------------------------


def _sqlite_read_datetime(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def _sqlite_read_json(value: str | None) -> Any:
    return None if value is None else orjson.loads(value)


def _sqlite_read_bool(value: int | None) -> bool | None:
    return None if value is None else bool(value)


def _pg_read_datetime(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is UTC:
        return value
    return value.astimezone(UTC)


_SQLITE_READ: dict[str, Converter] = {
    "UTCDateTime": _sqlite_read_datetime,
    "JSONDoc": _sqlite_read_json,
    "Boolean": _sqlite_read_bool,
}
_POSTGRES_READ: dict[str, Converter] = {"UTCDateTime": _pg_read_datetime}


@functools.cache
def _readers(dialect: str, table: Table) -> tuple[Converter, ...]:
    by_type = _SQLITE_READ if dialect == "sqlite" else _POSTGRES_READ
    return tuple(by_type.get(type(c.type).__name__, _same) for c in table.c)


def select_rows(
    conn: Connection, table: Table, where: str, params: Sequence[Any]
) -> list[tuple[Any, ...]]:
    """``SELECT`` every column of ``table`` (in the schema's order) ``where`` …, with the values
    as the column types would give them (aware UTC datetimes, dicts, booleans). ``where`` uses
    ``?`` for parameters; it becomes ``%s`` on PostgreSQL."""
    dialect = conn.dialect.name
    sql = _select_sql(dialect, table.name, tuple(c.name for c in table.c), where)
    readers = _readers(dialect, table)
    rows = conn.exec_driver_sql(sql, tuple(params)).fetchall()
    return [tuple(f(v) for f, v in zip(readers, row, strict=True)) for row in rows]


@functools.cache
def _select_sql(dialect: str, table: str, columns: tuple[str, ...], where: str) -> str:
    if dialect != "sqlite":
        where = where.replace("?", "%s")
    return f"SELECT {', '.join(columns)} FROM {table} WHERE {where}"


def param(conn: Connection, value: Any) -> Any:
    """A value bound by hand in ``select_rows`` or ``execute``: a datetime as its column
    stores it."""
    if conn.dialect.name == "sqlite" and isinstance(value, datetime):
        return sqlite_datetime(value)
    return value


def execute(conn: Connection, sql: str, params: Sequence[Any]) -> int:
    """One statement with ``?`` parameters (``%s`` on PostgreSQL); the rows it changed."""
    if conn.dialect.name != "sqlite":
        sql = _postgres_marks(sql)
    result = conn.exec_driver_sql(sql, tuple(param(conn, p) for p in params))
    return int(result.rowcount)


def fetch(conn: Connection, sql: str, params: Sequence[Any] = ()) -> Sequence[Row[Any]]:
    """The rows of one query with ``?`` parameters (``%s`` on PostgreSQL), as the driver gives
    the values (no column type conversion: see :func:`read_datetime`). Run once per fire
    batch, a Core ``select`` cost more to build and compile than the query took."""
    if conn.dialect.name != "sqlite":
        sql = _postgres_marks(sql)
    return conn.exec_driver_sql(sql, tuple(params)).fetchall()


@functools.lru_cache(maxsize=1024)  # statements with a chunk's worth of marks vary in length
def _postgres_marks(sql: str) -> str:
    return sql.replace("?", "%s")


def read_datetime(conn: Connection, value: Any) -> datetime | None:
    """A UTCDateTime column's value as the driver gave it (SQLite: text), as an aware UTC
    datetime."""
    if conn.dialect.name == "sqlite":
        return _sqlite_read_datetime(value)
    return _pg_read_datetime(value)


# Writing ----------------------------------------------------------------------------------


def insert_rows(
    conn: Connection, table: Table, columns: tuple[str, ...], rows: Sequence[Sequence[Any]]
) -> None:
    """``INSERT`` rows given as value tuples in ``columns``' order: ``executemany`` on SQLite,
    ``COPY`` on PostgreSQL (one stream in the caller's transaction instead of a statement per
    row)."""
    if not rows:
        return
    dialect = conn.dialect.name
    conv = _converters(dialect, table, columns)
    if dialect == "postgresql":
        _copy_rows(conn, f"COPY {table.name} ({', '.join(columns)}) FROM STDIN", conv, rows)
        return
    params = [tuple(f(v) for f, v in zip(conv, row, strict=True)) for row in rows]
    conn.exec_driver_sql(_insert_sql(dialect, table.name, columns), params)


def _copy_rows(
    conn: Connection, sql: str, conv: Sequence[Converter], rows: Sequence[Sequence[Any]]
) -> None:
    """``COPY … FROM STDIN`` on psycopg's own connection. Its errors come from the driver
    itself, not through SQLAlchemy: they are wrapped here as SQLAlchemy wraps a statement's
    (and the connection invalidated when it is gone), so that the store's error policy
    (``db.translate_errors``) sees them like any other: a duplicate is a ``Conflict``, a lost
    server ``StoreUnavailable``, not an unexplained exception."""
    import psycopg

    raw: Any = conn.connection.dbapi_connection
    try:
        with raw.cursor() as cur, cur.copy(sql) as copy:
            for row in rows:
                copy.write_row([f(v) for f, v in zip(conv, row, strict=True)])
    except psycopg.Error as exc:
        orig: Any = exc  # SQLAlchemy types it as its DBAPI protocol's Error
        gone = conn.dialect.is_disconnect(orig, raw, None)
        if gone:
            conn.invalidate(exc)
        raise sa_exc.DBAPIError.instance(
            sql, None, exc, psycopg.Error, connection_invalidated=gone, dialect=conn.dialect
        ) from exc


def update_rows(
    conn: Connection,
    table: Table,
    columns: tuple[str, ...],
    rows: Sequence[Sequence[Any]],
    key: str = "id",
) -> None:
    """``UPDATE … WHERE key = ?`` for rows given as value tuples in ``columns``' order, each
    followed by its key."""
    if rows:
        dialect = conn.dialect.name
        conv = (*_converters(dialect, table, columns), _same)
        params = [tuple(f(v) for f, v in zip(conv, row, strict=True)) for row in rows]
        conn.exec_driver_sql(_update_sql(dialect, table.name, columns, key), params)
