"""Counting the database's errors by kind, for ``/metrics``.

Every error the driver raises on an engine (a statement, a commit, a connection attempt) is
classified as :func:`~program_timer.store.db.translate_errors` would translate it: ``unavailable``
(the database did not answer, dropped the connection, refused the write), ``conflict`` (a
transaction lost a race and is retried) or ``error`` (anything else: a bug). The callback gets
the kind; it runs on the thread that saw the error and must be quick.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext

from program_timer.store.db import translate_errors
from program_timer.store.errors import Conflict, StoreError, StoreUnavailable

KINDS = ("unavailable", "conflict", "error")


def error_kind(exc: BaseException) -> str:
    """The kind of a driver error (one of :data:`KINDS`)."""
    try:
        with translate_errors():
            raise exc
    except Conflict:
        return "conflict"
    except StoreUnavailable:
        return "unavailable"
    except StoreError:
        return "error"
    except BaseException:  # not a driver error at all
        return "error"


def count_errors(engine: Engine, record: Callable[[str], None]) -> None:
    """Call ``record(kind)`` for every driver error on ``engine`` (and the engines derived
    from it with other execution options)."""

    def on_error(context: ExceptionContext) -> None:
        exc = context.sqlalchemy_exception or context.original_exception
        with contextlib.suppress(Exception):  # counting never changes how it is handled
            record(error_kind(exc))

    event.listen(engine, "handle_error", on_error)
