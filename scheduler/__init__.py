"""The program-timer daemon: timer rules, commands, the socket server, APScheduler wiring, CLI."""

__version__ = "0.1.0"
