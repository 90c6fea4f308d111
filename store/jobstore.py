"""An APScheduler 3.x job store over the ``timers`` table.

Timers are not stored as APScheduler jobs (no pickled state, nothing loaded whole into memory).
The store presents the table to the scheduler as what the scheduler needs to know: *when* it must
next wake up (:meth:`get_next_run_time`, one index lookup of the earliest ``due_at``), and, once
timers are due, one job (:data:`FIRE_JOB_ID`) that the scheduler hands to its executor. That job
fires the due timers in bounded batches, one transaction each, and tells the scheduler to look
again when it is done. While a fire pass runs the store reports nothing due, so the scheduler
neither spins nor starts a second pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
)
from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, JobLookupError
from apscheduler.triggers.date import DateTrigger
from sqlalchemy import Engine

from program_timer.core.backoff import Backoff
from program_timer.store import queries
from program_timer.store.db import read_transaction
from program_timer.store.errors import StoreError, StoreUnavailable

FIRE_JOB_ID = "program-timer:fire-due"


class TimerJobStore(BaseJobStore):  # type: ignore[misc]
    """Job store of the timers table; see the module docstring for the contract."""

    def __init__(
        self,
        engine: Engine,
        fire_pass: Callable[[], None],
        *,
        executor: str = "firing",
        retry_interval: float = 1.0,
        poll_interval: float = 5.0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__()
        self._engine = engine
        self._fire_pass = fire_pass
        self._executor = executor
        self._poll = timedelta(seconds=poll_interval)
        self._now = now
        self._busy = threading.Event()
        self._closing = threading.Event()  # the daemon stops: no fire job is handed out
        self._planned: datetime | None = None  # the wake-up last given to the scheduler
        self._changes = 0  # commands seen by wake_if_before (guards a plan read meanwhile)
        self._lock = threading.Lock()
        self.backoff = Backoff("due_lookup", first=retry_interval / 8, cap=retry_interval * 5)

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        # The pass is over for the scheduler only once its executor has counted the instance
        # finished: that is when it dispatches these events (after the count drops).
        scheduler.add_listener(
            self._fire_job_ended,
            EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES,
        )

    def close(self) -> None:
        """Hand out no more fire jobs (the daemon is stopping; the scheduler shuts down next:
        a job handed to its executor meanwhile would be refused, with an error logged)."""
        self._closing.set()

    def shutdown(self) -> None:
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None:
            scheduler.remove_listener(self._fire_job_ended)
        super().shutdown()

    # What the scheduler asks -------------------------------------------------------------

    def get_next_run_time(self) -> datetime | None:
        """The earliest ``due_at``, capped at one poll interval from now (other daemons sharing
        the database may add timers without telling us). Never raises: when the database is
        unreachable, the answer is "retry soon"."""
        now = self._now()
        if self._busy.is_set() or self._closing.is_set():
            return None
        seen = self._changes
        try:
            due = self._next_due()
        except StoreError:
            return now + timedelta(seconds=self.backoff.failed_delay)
        horizon = now + self._poll
        plan = horizon if due is None or due > horizon else due
        with self._lock:
            if self._changes != seen:
                # A command committed while we read: our answer may predate it. Look again.
                self._planned = None
                return now
            self._planned = plan
        return plan

    def wake_if_before(self, due: datetime | None) -> None:
        """A command made a timer due at ``due``: wake the scheduler if that is earlier than
        the wake-up it planned (a later timer changes nothing: no query, no wake-up)."""
        if due is None:
            return
        with self._lock:
            self._changes += 1
            planned = self._planned
            if self._busy.is_set() or (planned is not None and due >= planned):
                return
            self._planned = due
        self._scheduler.wakeup()

    def get_due_jobs(self, now: datetime) -> list[Job]:
        """The fire job when a timer is due at ``now``. When the database is unreachable:
        nothing, and :meth:`get_next_run_time` (asked right after) says "retry soon". (Raising
        would make the scheduler log a warning at every retry, once a second for the whole
        outage; the outage is logged once, through :func:`program_timer.store.db.health`.)"""
        if self._busy.is_set() or self._closing.is_set():
            return []
        try:
            due = self._next_due()
        except StoreError:
            return []
        if due is None or due > now:
            return []
        self._busy.set()
        return [self._fire_job(due)]

    def _next_due(self) -> datetime | None:
        """The earliest ``due_at``; a failure is counted in the backoff (an unreachable
        database is logged once, as ``database_down``, by the store's health record)."""
        try:
            with read_transaction(self._engine) as conn:
                due = queries.next_due_at(conn)
        except StoreUnavailable as exc:
            self.backoff.failed(str(exc), unavailable=True)
            raise
        except StoreError as exc:
            self.backoff.failed(str(exc))
            raise
        self.backoff.succeeded()
        return due

    def lookup_job(self, job_id: str) -> Job | None:
        return None

    def get_all_jobs(self) -> list[Job]:
        """Timers are listed per persona through ``list_timers``, never all at once."""
        return []

    def add_job(self, job: Job) -> None:
        raise TypeError("timers are created by set_timer commands, not by add_job()")

    def update_job(self, job: Job) -> None:
        raise JobLookupError(job.id)

    def remove_job(self, job_id: str) -> None:
        """The scheduler removes the fire job once submitted; nothing is stored for it."""
        if job_id != FIRE_JOB_ID:
            raise JobLookupError(job_id)

    def remove_all_jobs(self) -> None:
        """Timers are deleted by commands only; this never deletes timers."""

    # The fire job -----------------------------------------------------------------------

    def _fire_job(self, due: datetime) -> Job:
        job = Job(
            self._scheduler,
            id=FIRE_JOB_ID,
            func=self._run_fire_pass,
            args=(),
            kwargs={},
            trigger=DateTrigger(run_date=due, timezone=UTC),
            executor=self._executor,
            name="fire due timers",
            misfire_grace_time=None,
            coalesce=True,
            max_instances=1,
            next_run_time=due,
        )
        job._jobstore_alias = self._alias  # as the scheduler's own stores do: events name it
        return job

    def _run_fire_pass(self) -> None:
        self._fire_pass()

    def _fire_job_ended(self, event: JobEvent) -> None:
        """The fire job ran, failed, or was not started (its previous run not yet counted as
        finished by the executor): let the scheduler ask again. Clearing ``_busy`` when the fire
        pass returns would be too early: the executor drops its instance count for the job
        only afterwards, in the future's callback, and a fire job handed over in between is
        refused (``max_instances``) with ``_busy`` left set, so nothing would fire again."""
        if event.job_id != FIRE_JOB_ID or event.jobstore != self._alias:
            return
        self._busy.clear()
        self._scheduler.wakeup()

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} ({self._engine.url.render_as_string()})>"

    def debug_state(self) -> dict[str, Any]:
        return {"busy": self._busy.is_set()}
