"""SQL storage of program-timer: the schema, migrations, queries and the APScheduler job store.

SQL lives in this package and nowhere else. Driver errors are translated here into
:class:`store.errors.StoreUnavailable` and :class:`store.errors.Conflict`.
"""
