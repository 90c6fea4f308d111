"""SQL storage: the schema (one source for every column), the queries, the migrations and the
APScheduler job store. SQL lives in this package and nowhere else; driver errors are translated
here into :class:`program_timer.store.errors.StoreUnavailable` and ``Conflict``."""
