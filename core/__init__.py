"""The domain core: the timer model, the timer rules, time helpers, ids and the event's shape.

It imports nothing of the rest of program-timer and no SQLAlchemy, asyncio, APScheduler or
pydantic (an import-linter contract in the tests keeps it so): it can be read, and tested, on its
own, without a database or a clock.
"""
