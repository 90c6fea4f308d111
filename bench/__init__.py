"""The program-timer benchmark (SPEC 6 "Speed"): ``python -m bench.run``.

It runs the real daemon (``program-timer serve`` as a subprocess) on SQLite and PostgreSQL, and in
the same run, on the same databases, stock APScheduler 3.11 (:mod:`bench.stock_apscheduler`) and a
bare batched-SQL ceiling (:mod:`bench.ceiling`), then prints the figures and their ratios.
This package is not installed with the daemon; it lives beside it.
"""
