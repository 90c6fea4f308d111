"""Splitting long key lists into statements of a bounded size: the one chunking helper."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Final, TypeVar

T = TypeVar("T")

CHUNK: Final = 512
"""Keys per statement: far below what the drivers bind in one statement (SQLite 32,766 values,
PostgreSQL 65,535), and a size SQLAlchemy's statement cache sees again and again."""


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[list[T]]:
    """``items`` in lists of at most ``size``."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
