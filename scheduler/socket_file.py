"""The socket file and the process's descriptors: claiming a stale socket path, telling our
socket file from another, and raising the file descriptor limit for ``max_connections``."""

from __future__ import annotations

import os
import resource
import socket
import stat
from pathlib import Path
from typing import Final

from program_timer.core.logs import get_logger

log = get_logger()


FD_RESERVE: Final = 256
"""File descriptors kept beyond ``max_connections`` (database, logs, listening socket)."""


def file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards the hard limit so ``wanted`` descriptors fit.

    systemd and most shells start services with a soft limit of 1024, below what
    ``max_connections`` (default 1024) plus the daemon's own files needs. Returns (soft, hard).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        if new > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            except (ValueError, OSError) as exc:
                log.warning(
                    "cannot raise the file descriptor limit",
                    action="fd_limit",
                    soft=soft,
                    hard=hard,
                    wanted=wanted,
                    error=str(exc),
                )
                return soft, hard
            log.info(
                "raised the file descriptor limit",
                action="fd_limit_raised",
                old=soft,
                soft=new,
                hard=hard,
            )
            soft = new
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "the file descriptor limit is below what max_connections needs",
            action="fd_limit_low",
            soft=soft,
            hard=hard,
            wanted=wanted,
        )
    return soft, hard


def claim_socket_path(path: str) -> None:
    """Remove a stale socket left by a crashed daemon; refuse to steal a live one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = p.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        p.unlink(missing_ok=True)  # stale: nobody listens
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise RuntimeError(f"another daemon is listening on {path}; refusing to take its socket")
