"""Request deadlines on one timer handle (scheduler/deadlines.py): a request still waiting at
its deadline is cancelled and marked expired, whatever finished around it; one that finished
in time is left alone; finished requests do not pile up in the queue."""

from __future__ import annotations

import asyncio

from program_timer.scheduler.deadlines import Deadlines


def test_a_waiting_request_expires_and_one_done_in_time_does_not() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(0.05)
        stuck: asyncio.Future[None] = loop.create_future()
        quick: asyncio.Future[None] = loop.create_future()
        later: asyncio.Future[None] = loop.create_future()
        a = deadlines.add(stuck)
        b = deadlines.add(quick)
        quick.set_result(None)
        await asyncio.sleep(0.02)
        c = deadlines.add(later)  # its deadline is 20 ms after the first's
        await asyncio.sleep(0.04)  # past the first deadline, not the third
        assert stuck.cancelled() and a.expired
        assert not quick.cancelled() and not b.expired
        assert not later.done() and not c.expired
        await asyncio.sleep(0.1)
        assert later.cancelled() and c.expired  # the handle was armed again for it

    asyncio.run(main())


def test_finished_requests_leave_the_queue_as_new_ones_come() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(60.0)
        for _ in range(1000):
            fut: asyncio.Future[None] = loop.create_future()
            deadlines.add(fut)
            fut.set_result(None)
        assert len(deadlines) == 1  # only the last one, not yet seen done
        waiting: asyncio.Future[None] = loop.create_future()
        deadlines.add(waiting)
        assert len(deadlines) == 1
        assert not waiting.done()

    asyncio.run(main())
