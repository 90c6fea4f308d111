"""``python -m program_timer`` is the ``program-timer`` command."""

from program_timer.scheduler.cli import main

main()
