"""Structured logs through structlog: readable on a terminal, JSON lines otherwise (journald)."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_level = logging.INFO


def enabled(level: int) -> bool:
    """Whether a line at ``level`` would be written: hot paths check before building one."""
    return level >= _level


def configure(log_format: str = "auto", level: str = "info", stream: Any = None) -> None:
    global _level
    _level = _LEVELS[level]
    stream = stream or sys.stderr
    json_lines = log_format == "json" or (log_format == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library: route them through the same renderer.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, _library_action],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    logging.captureWarnings(True)  # Python warnings (a library's deprecation…) are log lines
    # APScheduler logs every run of the fire job; we log the fires themselves.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _library_action(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Lines of other libraries (psycopg, APScheduler, Python warnings) get an ``action`` too,
    so that every line can be filtered on it: ``library_<logger>``."""
    if "action" not in event:
        logger = str(event.get("logger") or "python").split(".")[0]
        event["action"] = f"library_{logger}"
    return event


def get_logger(**context: Any) -> Any:
    """A lazy logger: it takes the configuration in force when it first logs, so module-level
    loggers created before :func:`configure` still render as configured."""
    return structlog.get_logger("program_timer", **context)
