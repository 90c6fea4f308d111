"""program-timer: the ``program_timer`` integration as a daemon.

Layers, each importing only those below it (checked by import-linter, see ``pyproject.toml``):

- :mod:`program_timer.scheduler`: the application: daemon, socket server, wire protocol, CLI;
- :mod:`program_timer.events`: subscriptions and delivery, and the clients for flow engines;
- :mod:`program_timer.store`: SQL: schema, queries, migrations, the APScheduler job store;
- :mod:`program_timer.core`: the timer model and rules, time helpers, ids, the event's shape.
"""

__version__ = "0.2.0"
