"""Signals of the daemon, in one place: the handlers only set a stop event (or ask for a reload);
the previous handlers are put back when the daemon's run ends.

A stop is graceful within ``grace`` seconds; past it, or at a second SIGTERM/SIGINT, the daemon
exits at once, with status 0 and a log line (a stop must end whatever the database is doing:
what was not finished is redone after the restart, as after a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator

from program_timer.core.logs import get_logger

log = get_logger()

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def handled(on_reload: Callable[[], None], grace: float) -> Iterator[asyncio.Event]:
    """SIGTERM and SIGINT set the event this yields; SIGHUP calls ``on_reload``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def request_stop(sig: signal.Signals) -> None:
        if stop.is_set():
            force_exit(f"a second {sig.name}")
            return
        log.info("stop requested", action="stop_requested", signal=sig.name, grace_s=grace)
        stop.set()
        loop.call_later(grace, force_exit, f"the stop took longer than {grace:g} s")

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, request_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        yield stop
    finally:
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def force_exit(why: str) -> None:
    """End the process now (exit status 0): the graceful stop did not finish."""
    log.warning("stopping at once", action="forced_exit", reason=why)
    with contextlib.suppress(Exception):
        sys.stderr.flush()
        sys.stdout.flush()
    os._exit(0)
