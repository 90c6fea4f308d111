"""Summarize a py-spy ``--format raw`` profile (folded stacks) taken by ``bench.run --profile``:

    python -m bench.profile_summary bench/results/profile-sqlite-burst.txt [--top 25]

Prints, over the samples of busy threads: the functions with the most samples on top of the stack
(self), and the functions present anywhere in the stack (inclusive), grouped by thread kind.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")


def _func(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m['func']} ({path})"


def _thread_kind(frames: list[str]) -> str:
    text = ";".join(frames)
    for needle, kind in (
        ("StoreWorker._run", "store-worker"),
        ("_fire_pass", "firing"),
        ("BackgroundScheduler._main_loop", "apscheduler-loop"),
        ("BaseScheduler._main_loop", "apscheduler-loop"),
        ("_process_jobs", "apscheduler-loop"),
        ("Runner.run", "event-loop"),
        ("run_until_complete", "event-loop"),
    ):
        if needle in text:
            return kind
    return "other"


def summarize(path: Path, top: int = 25) -> str:
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        threads[_thread_kind(frames)] += count
        self_counts[_func(frames[-1])] += count
        for func in {_func(f) for f in frames}:
            incl_counts[func] += count
    if not total:
        return f"{path}: no samples"
    out = [f"{path}: {total} samples of busy threads"]
    out.append(
        "  by thread: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in threads.most_common())
    )
    out.append("  self (top of stack):")
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in self_counts.most_common(top)]
    out.append("  inclusive (program-timer code):")
    ours = [
        (f, c)
        for f, c in incl_counts.most_common()
        if any(p in f for p in ("core/", "scheduler/", "store/", "events/"))
        and "apscheduler/" not in f
    ]
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in ours[:top]]
    out.append("  inclusive (libraries):")
    libs = [
        (f, c)
        for f, c in incl_counts.most_common()
        if any(
            p in f
            for p in (
                "sqlalchemy/",
                "psycopg/",
                "sqlite3",
                "structlog/",
                "json/",
                "pydantic",
                "asyncio/",
                "apscheduler/",
                "uuid",
            )
        )
    ]
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in libs[:top]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_summary")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    for f in args.files:
        print(summarize(f, args.top))
        print()


if __name__ == "__main__":
    main()
