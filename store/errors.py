"""The store's own exceptions: the rest of the code never sees a driver error."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreUnavailable(StoreError):
    """The database cannot be reached (or dropped the connection mid-transaction).

    The operation was not applied; it may be retried once the database is back.
    """


class Conflict(StoreError):
    """A write lost a race (unique key taken, serialization failure); retrying may succeed."""


class AlreadyRunning(StoreError):
    """Another daemon already owns this (single-daemon) SQLite database."""
