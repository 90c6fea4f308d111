"""Statements on the hot paths (fire batches, command groups, acks) through the driver, not
SQLAlchemy Core.

Core processes every bound value in Python (a UTC datetime goes through two bind processors,
a JSON column through the serializer): at thousands of rows a second that was a third of the
store worker's time. Here the values are converted once, the way the column types would store
them, and handed to the driver's ``executemany`` as tuples. The column lists still come from
the schema, and a row written here reads the same as one written by Core
(tests/test_store_contract.py checks both ways). Inside a transaction the statements run on
the driver's own cursor, without SQLAlchemy's per-statement work, their errors still handled
by SQLAlchemy (:func:`_driver_errors`).

On PostgreSQL a fire batch runs its statements in a :func:`pipeline`: they go to the server
without waiting for each one's answer, and a query's rows wait for everything sent before them
in one round trip (psycopg's pipeline mode). A one-fire batch was 14 round trips; it is 5. A
command group sends its reads together, then its writes together; an ack group's ``BEGIN``
goes with its first statement. Lists of ids go as one parameter (:func:`in_list`), so a
statement is the same whatever their number.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, NoReturn

import orjson
from sqlalchemy import Column, Connection, Table

Converter = Callable[[Any], Any]
RowConverter = Callable[[Sequence[Any]], list[Any]]


@functools.lru_cache(maxsize=256)
def sqlite_datetime(value: datetime | None) -> str | None:
    """What SQLAlchemy's SQLite DATETIME stores for our UTC instants: naive UTC, always with
    microseconds (``2026-11-28 03:10:02.000000``), so that text order is time order.

    Cut from orjson's RFC 3339 text (a third of the instructions of ``isoformat()``), which
    leaves out microseconds that are zero; and remembered for the last instants written: a fire
    batch writes its ``now`` four times a fire (the event, its delivery, the timer), a command
    batch twice a timer, and looking it up costs a tenth of formatting it."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    text = orjson.dumps(value)  # b'"2026-11-28T03:10:02.000001+00:00"'
    if value.microsecond:
        return (text[1:11] + b" " + text[12:27]).decode()
    return (text[1:11] + b" " + text[12:20] + b".000000").decode()


def json_dumps(value: Any) -> str:
    """JSON text of a column value or a parameter: orjson, several times faster than the
    standard library (datetimes as RFC 3339 with their offset, by both)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # what orjson refuses (a lone surrogate), the standard library escapes
        return json.dumps(value, default=datetime.isoformat)


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
def _row_converter(conv: tuple[Converter, ...]) -> RowConverter:
    """A row's values through ``conv``, one converter per column: only the columns whose
    converter does something are touched (a generator over every column's pair cost half of
    reading or writing a timer row)."""
    width = len(conv)
    active = tuple((i, f) for i, f in enumerate(conv) if f is not _same)

    def convert(row: Sequence[Any]) -> list[Any]:
        if len(row) != width:
            raise ValueError(f"a row of {len(row)} values for {width} columns")
        values = list(row)
        for i, f in active:
            values[i] = f(values[i])
        return values

    return convert


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
    # The stored text is naive UTC: parsed with its offset spelled out, the instant comes aware
    # in one call, about seven times faster than ``fromisoformat(value).replace(tzinfo=UTC)``
    # (``replace`` with a keyword is the slow part; seven such columns in a timer row).
    return None if value is None else datetime.fromisoformat(value + "+00:00")


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


def _readers(dialect: str, table: Table) -> RowConverter:
    return _column_readers(dialect, tuple(table.c))


def column_readers(conn: Connection, columns: Sequence[Column[Any]]) -> RowConverter:
    """What reads rows of these columns (of any tables) as the column types would give them."""
    return _column_readers(conn.dialect.name, tuple(columns))


@functools.cache
def _column_readers(dialect: str, columns: tuple[Column[Any], ...]) -> RowConverter:
    by_type = _SQLITE_READ if dialect == "sqlite" else _POSTGRES_READ
    return _row_converter(tuple(by_type.get(type(c.type).__name__, _same) for c in columns))


def select_statement(
    conn: Connection, table: Table, where: str, params: Sequence[Any], *, keys: str = ""
) -> Statement:
    """For :func:`fetch_many`: ``SELECT`` every column of ``table`` (in the schema's order)
    ``where`` …, the values read as the column types would give them (aware UTC datetimes,
    dicts, booleans). ``where`` uses ``?`` for parameters (``%s`` on PostgreSQL, made so by
    :func:`fetch_many`). ``keys``: a ``WITH`` clause that names the relation ``k``, joined to
    the table by ``where`` (its parameters first): one index probe per row of ``k``."""
    dialect = conn.dialect.name
    return Statement(
        _select_sql(dialect, table.name, _column_names(table), where, keys),
        tuple(params),
        _readers(dialect, table),
    )


@functools.cache
def _column_names(table: Table) -> tuple[str, ...]:
    return tuple(c.name for c in table.c)


@functools.cache
def _select_sql(dialect: str, table: str, columns: tuple[str, ...], where: str, keys: str) -> str:
    """With ``?`` marks, as every :class:`Statement` (:func:`fetch_many` makes them ``%s``).

    PostgreSQL joins ``k`` through a ``LATERAL`` subquery that it may not flatten (``OFFSET
    0``): it cannot tell how many rows ``k`` has (100, it guesses, for a function over a
    parameter), and up to some 25,000 rows in the table it chose to read the whole table into a
    hash join, 2.6 ms for 256 keys at 10,000 rows against 1.1 ms probing the index per key."""
    names = ", ".join(f"{table}.{c}" for c in columns)
    if not keys:
        return f"SELECT {names} FROM {table} WHERE {where}"
    if dialect == "postgresql":
        return (
            f"{keys} SELECT {names} FROM k CROSS JOIN LATERAL "
            f"(SELECT * FROM {table} WHERE {where} OFFSET 0) AS {table}"
        )
    return f"{keys} SELECT {names} FROM k JOIN {table} ON {where}"


def param(conn: Connection, value: Any) -> Any:
    """A value bound by hand in ``select_statement`` or ``execute``: a datetime as its column
    stores it."""
    if conn.dialect.name == "sqlite" and isinstance(value, datetime):
        return sqlite_datetime(value)
    return value


def in_list(conn: Connection, sql: str) -> str:
    """``sql`` with each ``IN ?*`` made a test against one list parameter (see
    :func:`list_param`): ``IN (SELECT value FROM json_each(?))`` on SQLite, ``= ANY(?)`` on
    PostgreSQL. One statement for any length of list: no statement per length to prepare."""
    return _in_list(conn.dialect.name, sql)


@functools.cache
def _in_list(dialect: str, sql: str) -> str:
    test = "IN (SELECT value FROM json_each(?))" if dialect == "sqlite" else "= ANY(?)"
    return sql.replace("IN ?*", test)


def list_param(conn: Connection, values: Sequence[Any]) -> Any:
    """The parameter of an ``IN ?*`` (:func:`in_list`): JSON text on SQLite, an array on
    PostgreSQL."""
    return json_dumps(list(values)) if conn.dialect.name == "sqlite" else list(values)


def id_list_param(conn: Connection, ids: Sequence[int]) -> str:
    """:func:`list_param` for integers (row ids): on PostgreSQL the array's text (``{1,2,3}``),
    which the server reads as the array type the statement needs. psycopg dumps a list element
    by element in Python: a twentieth of a PostgreSQL burst's time with one subscriber, for the
    acks and the send marks. An id beyond 64 bits (a client may ack anything) names no row and
    is left out: the server would refuse the whole statement."""
    if ids and (min(ids) < _INT64_MIN or max(ids) > _INT64_MAX):
        ids = [i for i in ids if _INT64_MIN <= i <= _INT64_MAX]
    if conn.dialect.name == "sqlite":
        return json_dumps(list(ids))
    return "{" + ",".join(map(str, ids)) + "}"


_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


def execute(conn: Connection, sql: str, params: Sequence[Any]) -> int:
    """One statement with ``?`` parameters (``%s`` on PostgreSQL); the rows it changed (-1
    in a :func:`pipeline`: its answer is not waited for)."""
    if conn.dialect.name == "sqlite":
        return _run(
            conn, sql, [sqlite_datetime(p) if isinstance(p, datetime) else p for p in params]
        )
    sql = _postgres_marks(sql)
    pipe = _pipe(conn)
    if pipe is not None:
        pipe.send(sql, tuple(params))
        return -1
    return _run(conn, sql, tuple(params))


def fetch(conn: Connection, sql: str, params: Sequence[Any] = ()) -> Sequence[Sequence[Any]]:
    """The rows of one query with ``?`` parameters (``%s`` on PostgreSQL), as the driver gives
    the values (no column type conversion: see :func:`read_datetime`). Run once per fire
    batch, a Core ``select`` cost more to build and compile than the query took."""
    return fetch_many(conn, [Statement(sql, tuple(params))])[0]


class Statement(NamedTuple):
    """A query for :func:`fetch_many`: ``?`` parameters, and optionally what converts each of
    its rows (:func:`_row_converter`). A named tuple: made for every query of a fire batch, a
    frozen dataclass set each field through ``object.__setattr__``."""

    sql: str
    params: tuple[Any, ...] = ()
    readers: RowConverter | None = None

    def convert(self, rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        if self.readers is None:
            return [tuple(row) for row in rows]
        readers = self.readers
        return [tuple(readers(row)) for row in rows]


def fetch_many(conn: Connection, statements: Sequence[Statement]) -> list[list[tuple[Any, ...]]]:
    """The rows of several queries, in their order: in a :func:`pipeline` all are sent before
    the first answer is read (one round trip), elsewhere they run in turn."""
    postgres = conn.dialect.name != "sqlite"
    pipe = _pipe(conn) if postgres else None
    if pipe is None:
        return [
            st.convert(_query(conn, _postgres_marks(st.sql) if postgres else st.sql, st.params))
            for st in statements
        ]
    pending = [pipe.query(_postgres_marks(st.sql), st.params) for st in statements]
    return [st.convert(rows()) for st, rows in zip(statements, pending, strict=True)]


def fetch_later(
    conn: Connection, sql: str, params: Sequence[Any] = ()
) -> Callable[[], list[tuple[Any, ...]]]:
    """A query whose rows are read later: in a :func:`pipeline` it is sent now and answered
    with whatever waits for an answer next (at the latest the pipeline's end), so that it adds
    no round trip of its own; the function returned reads its rows, once that has happened.
    Elsewhere it runs now."""
    pipe = _pipe(conn) if conn.dialect.name != "sqlite" else None
    if pipe is None:
        result = fetch(conn, sql, params)
        return lambda: [tuple(row) for row in result]
    rows = pipe.query(_postgres_marks(sql), tuple(params))
    return lambda: [tuple(row) for row in rows()]


def commit_in_pipeline(conn: Connection) -> None:
    """PostgreSQL, in a :func:`pipeline`: COMMIT is sent now, behind everything sent before it,
    and answered with the pipeline's end, whose sync is then the transaction's last round trip
    (it was two: the sync, then SQLAlchemy's commit). Nothing may be sent after it. An error of
    any statement before it comes out of the pipeline's end as it would have (a failed
    statement aborts the pipeline: the COMMIT is not run); SQLAlchemy's commit at the
    transaction's end then finds the driver's connection idle and sends nothing. Elsewhere it
    does nothing: the transaction's end commits."""
    pipe = _pipe(conn) if conn.dialect.name != "sqlite" else None
    if pipe is not None:
        pipe.send("COMMIT", ())


def _run(conn: Connection, sql: str, params: Any, *, many: bool = False) -> int:
    """A statement (``executemany`` with ``many``); the rows it changed."""
    count: int = _on_driver(conn, sql, params, many=many, rows=False)
    return count


def _query(conn: Connection, sql: str, params: Sequence[Any]) -> Sequence[Sequence[Any]]:
    """A query's rows."""
    rows: Sequence[Sequence[Any]] = _on_driver(conn, sql, params, many=False, rows=True)
    return rows


def _on_driver(conn: Connection, sql: str, params: Any, *, many: bool, rows: bool) -> Any:
    """A statement on the driver's own cursor. Inside a transaction, SQLAlchemy's part of a
    statement (an execution context, a cursor result, its bookkeeping) is skipped: on the fire
    batch's ten small statements it cost more than SQLite took to run them. Errors go through
    SQLAlchemy's handling all the same (:func:`_driver_errors`). Outside one, SQLAlchemy runs
    it, so that its autobegin (``BEGIN IMMEDIATE`` on SQLite) applies."""
    if not conn.in_transaction():
        result = conn.exec_driver_sql(sql, list(params) if many else tuple(params))
        return result.fetchall() if rows else result.rowcount
    try:
        dbapi: Any = conn.connection.dbapi_connection
        if not many and conn.dialect.name == "sqlite":  # its cursor made and dropped in C
            cur = dbapi.execute(sql, params)
            return cur.fetchall() if rows else int(cur.rowcount)
        cur = dbapi.cursor()
        try:
            if many:
                cur.executemany(sql, params)
            else:
                cur.execute(sql, params)
            return cur.fetchall() if rows else int(cur.rowcount)
        finally:
            cur.close()
    except conn.dialect.loaded_dbapi.Error as exc:  # _driver_errors, without a generator
        _raise_handled(conn, exc, sql)


def begin(conn: Connection, sql: str) -> None:
    """``sql`` (SQLite's ``BEGIN`` or ``BEGIN IMMEDIATE``) run on the driver in the engine's
    ``begin`` event, its errors handled as SQLAlchemy's (:func:`_driver_errors`)."""
    try:
        conn.connection.dbapi_connection.execute(sql)  # type: ignore[union-attr]
    except conn.dialect.loaded_dbapi.Error as exc:
        _raise_handled(conn, exc, sql)


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
    """``INSERT`` rows given as value tuples in ``columns``' order: ``executemany`` on SQLite;
    on PostgreSQL a few rows as one ``INSERT`` each in a :func:`pipeline`, more as one JSON
    parameter (:func:`_insert_json_sql`), in the pipeline too."""
    if not rows:
        return
    dialect = conn.dialect.name
    conv = _converters(dialect, table, columns)
    if dialect == "postgresql":
        pipe = _pipe(conn)
        if pipe is not None and len(rows) <= PIPELINE_ROWS:
            pipe.send_many(_insert_sql(dialect, table.name, columns), _convert(conv, rows))
            return
        sql = _insert_json_sql(table, columns)
        for start in range(0, len(rows), JSON_ROWS):
            execute(conn, sql, (json_dumps(rows[start : start + JSON_ROWS]),))
        return
    _run(conn, _insert_sql(dialect, table.name, columns), _convert(conv, rows), many=True)


JSON_ROWS: Final = 4096
"""Rows per ``INSERT`` of :func:`insert_rows` on PostgreSQL beyond :data:`PIPELINE_ROWS` (one
JSON parameter of at most a few megabytes)."""

# How a value of each column type is read back from a row of the JSON parameter.
_FROM_JSON: Final = {
    "UTCDateTime": "(r->>{i})::timestamptz",
    "JSONDoc": "(r->{i})::jsonb",
    "Boolean": "(r->>{i})::boolean",
    "Integer": "(r->>{i})::integer",
    "BigInteger": "(r->>{i})::bigint",
    "Float": "(r->>{i})::float8",
    "String": "r->>{i}",
}


@functools.cache
def _insert_json_sql(table: Table, columns: tuple[str, ...]) -> str:
    """``INSERT`` of any number of rows given as one JSON array of arrays, each value read back
    as its column's type (a column type not listed in ``_FROM_JSON`` is a bug here, found by
    the first test that writes that table). ``jsonb``: parsed once; ``json`` text would be
    parsed again for every value taken from it (a third slower command group). The JSON is
    made in C by orjson, where psycopg's ``COPY`` formatted every value in Python (a tenth of a
    command group's time) and could not run in a pipeline."""
    values = ", ".join(
        _FROM_JSON[type(table.c[c].type).__name__].format(i=i) for i, c in enumerate(columns)
    )
    return (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"SELECT {values} FROM jsonb_array_elements(?::jsonb) AS r"
    )


def insert_dicts(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """:func:`insert_rows` for rows given as dicts with the same keys, the first row's order
    giving the columns'."""
    if rows:
        columns = tuple(rows[0])
        if len(columns) == 1:
            insert_rows(conn, table, columns, [(r[columns[0]],) for r in rows])
        else:
            values = operator.itemgetter(*columns)
            insert_rows(conn, table, columns, [values(r) for r in rows])


def _convert(conv: tuple[Converter, ...], rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    convert = _row_converter(conv)
    return [convert(row) for row in rows]


@contextlib.contextmanager
def _driver_errors(conn: Connection, sql: str) -> Iterator[None]:
    """The driver's errors raised here, outside SQLAlchemy (psycopg's pipeline on its own
    connection), handled as SQLAlchemy handles a statement's: wrapped, the connection
    invalidated when it is gone, and the engine's ``handle_error`` listeners called (the
    store's error counts for ``/metrics``)."""
    try:
        yield
    except conn.dialect.loaded_dbapi.Error as exc:
        _raise_handled(conn, exc, sql)


def _raise_handled(conn: Connection, exc: Exception, sql: str) -> NoReturn:
    """A driver error of ``sql`` through SQLAlchemy's handling (:func:`_driver_errors`)."""
    conn._handle_dbapi_exception(exc, sql, None, None, None)
    raise exc  # not reached: SQLAlchemy raises its own


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
        sql = _update_sql(dialect, table.name, columns, key)
        pipe = _pipe(conn) if dialect == "postgresql" else None
        if pipe is not None:
            pipe.send_many(sql, _convert(conv, rows))
        else:
            _run(conn, sql, _convert(conv, rows), many=True)


# A pipeline (PostgreSQL) -------------------------------------------------------------------

PIPELINE_ROWS: Final = 16
"""Rows that :func:`insert_rows` sends in a pipeline as one ``INSERT`` each; more go as one
JSON parameter (cheaper than a statement per row from about 20 rows on). Also
where a fire batch's few rows keep a plain statement (a steady rate) and more go as one list
or JSON parameter: its deliveries, its completed one-shot timers."""

_PIPE: Final = "program_timer_pipeline"


class _Pipeline:
    """psycopg's pipeline mode on the connection of a SQLAlchemy transaction, entered when
    the first statement is sent: a block that sends nothing costs nothing (psycopg syncs when
    pipeline mode ends, a round trip even with nothing sent; a read-only command group loads
    and flushes nothing)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._raw: Any = conn.connection.dbapi_connection
        self._mode: Any = None
        self._left = False
        self._writes: Any = None  # the cursor of the statements whose rows nobody reads

    def enter(self, begin: str | None) -> None:
        if begin is not None:
            self.send(begin, ())

    def _entered(self) -> Any:
        """The raw connection, in pipeline mode."""
        if self._mode is None:
            self._mode = self._raw.pipeline()
            self._mode.__enter__()
        return self._raw

    def leave(self) -> None:
        """Out of pipeline mode: everything sent is synced (its errors raised here)."""
        self._left = True
        mode, self._mode = self._mode, None
        try:
            if mode is not None:
                with _driver_errors(self._conn, "(pipeline sync)"):
                    mode.__exit__(None, None, None)
        finally:
            self._close_writes()

    def abandon(self) -> None:
        """Out of pipeline mode after an error (the transaction is lost: what the sync says
        about the statements after it adds nothing)."""
        self._left = True
        mode, self._mode = self._mode, None
        if mode is not None:
            with contextlib.suppress(Exception):  # psycopg leaves pipeline mode whatever fails
                mode.__exit__(None, None, None)
        self._close_writes()

    def _close_writes(self) -> None:
        writes, self._writes = self._writes, None
        if writes is not None:
            writes.close()

    @property
    def active(self) -> bool:
        return not self._left

    def _writer(self) -> Any:
        """One cursor for every statement sent whose rows are not read (the writes, BEGIN,
        COMMIT): psycopg hands each statement's results to the cursor that sent it, where
        nothing reads them, and raises a failed one's error at the next sync all the same. A
        cursor each cost about 20,000 instructions (a one-fire batch sends six such)."""
        if self._writes is None:
            self._writes = self._entered().cursor()
        return self._writes

    def send(self, sql: str, params: Sequence[Any]) -> None:
        with _driver_errors(self._conn, sql):
            self._writer().execute(sql, params)

    def send_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        with _driver_errors(self._conn, sql):
            self._writer().executemany(sql, params)

    def query(self, sql: str, params: Sequence[Any]) -> Callable[[], Sequence[Sequence[Any]]]:
        """Send a query now; the function returned reads its rows (waiting for them)."""
        with _driver_errors(self._conn, sql):
            cur = self._entered().cursor()
            cur.execute(sql, params)

        def rows() -> Sequence[Sequence[Any]]:
            with _driver_errors(self._conn, sql), cur:
                result: Sequence[Sequence[Any]] = cur.fetchall()
                return result

        return rows


def _pipe(conn: Connection) -> _Pipeline | None:
    pipe: _Pipeline | None = conn.info.get(_PIPE)
    return pipe if pipe is not None and pipe.active else None


def suspend_pipeline(conn: Connection) -> None:
    """Leave the connection's pipeline, if it is in one, for good (what was sent is synced, its
    errors raised here): a statement SQLAlchemy runs itself must not be sent in pipeline mode
    (its rows are not there when SQLAlchemy reads them). The engine's
    ``before_cursor_execute`` listener calls this (:mod:`program_timer.store.postgres`); the
    rest of the block runs its statements one round trip each, and
    :func:`commit_in_pipeline` leaves the COMMIT to SQLAlchemy."""
    pipe: _Pipeline | None = conn.info.get(_PIPE)
    if pipe is not None:
        pipe.leave()


@contextlib.contextmanager
def pipeline(conn: Connection, *, begin: str | None = None) -> Iterator[None]:
    """PostgreSQL: the statements this module runs in the block (``execute``, ``fetch``,
    ``fetch_many``, ``insert_rows``, ``update_rows``) are sent without waiting
    for their answers; reading a query's rows waits for everything sent before it, in one
    round trip, and the block's end for the rest. Errors come out wrapped as a statement's
    would, at the latest at the block's end. A statement run through SQLAlchemy itself in the
    block would leave it first (:func:`suspend_pipeline`). With ``begin`` (a BEGIN statement),
    that is sent first (:func:`~program_timer.store.db.pipelined_transaction`, whose connection
    is in autocommit mode). SQLite: nothing changes (it has no round trips)."""
    if conn.dialect.name != "postgresql" or _PIPE in conn.info:
        yield
        return
    pipe = _Pipeline(conn)
    info = conn.info  # kept: an invalidated connection has no info until rolled back
    info[_PIPE] = pipe
    try:
        pipe.enter(begin)
        yield
        pipe.leave()
    except BaseException:
        pipe.abandon()
        raise
    finally:
        info.pop(_PIPE, None)
