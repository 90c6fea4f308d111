"""The scenarios run against the real daemon (``program-timer serve`` as a subprocess).

Timers are loaded straight into the ``timers`` table (rows exactly as ``set_timer`` leaves them)
while the daemon runs, all due at one instant ``t0`` a little ahead (or, for the steady rate,
from ``t0`` on); the earliest one is set with a real ``set_timer`` command instead, which tells
the daemon when to wake, and the harness watches the ``events`` table.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import (
    CONNECTOR,
    BenchError,
    Daemon,
    Database,
    LineConn,
    TimerSpec,
    burst_specs,
    encode,
    from_epoch,
    iso_z,
    load_due,
    log,
    set_timer_message,
    sleep_until,
    steady_specs,
    summarize_ms,
    timer_rows,
    utcnow,
    wait_for_events,
)
from program_timer.events.client import TimerClient


def _lead(n: int) -> float:
    """How far ahead ``t0`` is set: room to load ``n`` rows and wake the daemon before it."""
    return 0.5 + n * 50e-6


def _load_due(db: Database, daemon: Daemon, specs: list[TimerSpec], t0: float) -> float:
    """Load the timers (the earliest through the socket, which tells the daemon when to wake);
    returns the margin left before ``t0`` (negative: late)."""
    load_due(db, daemon.socket, specs)
    margin = t0 - time.time()
    if margin < 0:
        log(f"warning: the load finished {-margin:.3f} s after t0; the rate counts from t0")
    return round(margin, 3)


class Subscriber(threading.Thread):
    """One subscriber (filter: everything) that acks every pushed event as soon as it arrives:
    one ``ack`` per read with every delivery id received, without waiting for its reply."""

    def __init__(self, path: str, expected: int, timeout: float = 120.0) -> None:
        super().__init__(name="bench-subscriber", daemon=True)
        self.conn = LineConn(path, timeout=timeout)
        self.expected = expected
        self.ready = threading.Event()
        self.received = 0
        self.acked = 0
        self.ack_requests = 0
        self.done_at: float | None = None
        self.latencies: list[float] = []  # received - scheduledAt, seconds
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            reply = self.conn.request(
                {"op": "subscribe", "subscriptionId": "bench-subscriber", "filter": {}}
            )
            if not reply.get("ok"):
                raise BenchError(f"subscribe refused: {reply}")
            self.ready.set()
            ack_id = 0
            while self.acked < self.expected:
                messages = self.conn.read_messages()
                now = time.time()
                ids = []
                for m in messages:
                    if m.get("op") == "event":
                        ids.append(m["deliveryId"])
                        self.received += 1
                        scheduled = datetime.fromisoformat(m["event"]["arguments"]["scheduledAt"])
                        self.latencies.append(now - scheduled.timestamp())
                    elif m.get("ok"):
                        self.acked += int(m["result"].get("acked", 0))
                    else:
                        raise BenchError(f"ack refused: {m}")
                if ids:
                    ack_id += 1
                    self.ack_requests = ack_id
                    self.conn.send({"op": "ack", "id": ack_id, "deliveryIds": ids})
            self.done_at = time.time()
        except BaseException as exc:
            self.error = exc
            self.ready.set()
        finally:
            self.conn.close()


def run_burst(
    db: Database,
    workdir: Path,
    n: int,
    *,
    label: str,
    subscriber: bool = False,
    profile: Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """``n`` timers due at one instant; with ``subscriber``, one subscriber acks every event."""
    timeout = timeout or max(60.0, n / 100)
    url = db.fresh(label)
    daemon = Daemon(url, workdir, label)
    sub: Subscriber | None = None
    with daemon:
        daemon.start()
        if subscriber:
            sub = Subscriber(daemon.socket, n, timeout=timeout)
            sub.start()
            sub.ready.wait(30)
            if sub.error:
                raise BenchError(f"subscriber failed: {sub.error}")
        t0 = time.time() + _lead(n)
        margin = _load_due(db, daemon, list(burst_specs(n, from_epoch(t0))), t0)
        if profile is not None:
            daemon.start_profile(profile)
        done = wait_for_events(db, n, timeout)
        if sub is not None:
            sub.join(timeout)
        daemon.stop_profile()
        rss = daemon.rss()
    if done is None:
        raise BenchError(f"{label}: not all {n} timers fired within {timeout:.0f} s")
    times = db.event_times()
    if len(times) != n:
        raise BenchError(f"{label}: {len(times)} events for {n} timers")
    last_fired = max(f for _, f in times)
    result: dict[str, Any] = {
        "n": n,
        "setup_margin_s": margin,
        "durable_s": round(done - t0, 4),
        "durable_per_s": round(n / (done - t0), 1),
        "last_fired_at_s": round(last_fired - t0, 4),
        "fired_at_per_s": round(n / max(last_fired - t0, 1e-6), 1),
        "lateness": summarize_ms(f - s for s, f in times),
        "rss_mb": round(rss / 2**20, 1),
    }
    if sub is not None:
        if sub.error or sub.done_at is None:
            raise BenchError(
                f"{label}: subscriber got {sub.received}, acked {sub.acked} of {n}: {sub.error}"
            )
        result.update(
            delivered_acked_s=round(sub.done_at - t0, 4),
            delivered_acked_per_s=round(n / (sub.done_at - t0), 1),
            delivery_latency=summarize_ms(sub.latencies),
            received=sub.received,
            ack_requests=sub.ack_requests,
        )
    return result


def run_steady(
    db: Database,
    workdir: Path,
    rate: float,
    seconds: float,
    *,
    label: str,
    profile: Path | None = None,
) -> dict[str, Any]:
    """``rate`` fires per second for ``seconds``: one-shot timers with evenly spread ``fireAt``."""
    n = int(rate * seconds)
    url = db.fresh(label)
    with Daemon(url, workdir, label) as daemon:
        daemon.start()
        t0 = time.time() + _lead(n)
        margin = _load_due(db, daemon, list(steady_specs(rate, seconds, from_epoch(t0))), t0)
        if profile is not None:
            daemon.start_profile(profile)
        done = wait_for_events(db, n, seconds + 120, poll=0.05)
        daemon.stop_profile()
    if done is None:
        raise BenchError(f"{label}: not all {n} timers fired")
    times = db.event_times()
    lateness = [f - s for s, f in times]
    return {
        "rate": rate,
        "seconds": seconds,
        "n": n,
        "setup_margin_s": margin,
        "lateness": summarize_ms(lateness),
        "lateness_samples_s": lateness,
    }


def _pipelined(path: str, lines: list[bytes], chunk: int = 64) -> dict[str, Any]:
    """Send every line without waiting (a sender thread), read the replies (this thread)."""
    n = len(lines)
    sent_at = [0.0] * n
    conn = LineConn(path)

    def sender() -> None:
        for start in range(0, n, chunk):
            now = time.time()
            for i in range(start, min(n, start + chunk)):
                sent_at[i] = now
            conn.send_bytes(b"".join(lines[start : start + chunk]))

    thread = threading.Thread(target=sender, name="bench-sender", daemon=True)
    replies = 0
    errors: dict[str, int] = {}
    latencies = []
    first = time.time()
    thread.start()
    try:
        while replies < n:
            for m in conn.read_messages():
                now = time.time()
                replies += 1
                latencies.append(now - sent_at[m["id"]])
                if not m.get("ok"):
                    code = m.get("error", {}).get("code", "?")
                    errors[code] = errors.get(code, 0) + 1
        last = time.time()
    finally:
        thread.join(30)
        conn.close()
    return {
        "n": n,
        "seconds": round(last - first, 4),
        "per_s": round(n / (last - first), 1),
        "errors": errors,
        "reply_time": summarize_ms(latencies),
    }


def set_timer_lines(n: int) -> list[bytes]:
    """``n`` request lines of ``set_timer`` for new timers due in a day, 1,000 per persona."""
    far = iso_z(utcnow() + timedelta(days=1))
    return [
        encode(set_timer_message(i, f"cmd-{i // 1000:05d}", f"t{i:07d}", fire_at=far))
        for i in range(n)
    ]


def run_commands(
    db: Database, workdir: Path, n: int, *, label: str, profile: Path | None = None
) -> dict[str, Any]:
    """One client pipelines ``n`` ``set_timer`` commands (new timers, 1,000 per persona)."""
    url = db.fresh(label)
    lines = set_timer_lines(n)
    with Daemon(url, workdir, label) as daemon:
        daemon.start()
        if profile is not None:
            daemon.start_profile(profile)
        result = _pipelined(daemon.socket, lines)
        daemon.stop_profile()
    stored = db.count("timers")
    if result["errors"] or stored < n:
        raise BenchError(f"{label}: errors {result['errors']}, {stored} timers stored of {n}")
    return result


class _Prober(threading.Thread):
    """A flow engine: one ``set_timer`` at a time (waits for its reply), every ``pace`` s."""

    def __init__(self, path: str, pace: float) -> None:
        super().__init__(name="bench-prober", daemon=True)
        self.conn = LineConn(path)
        self.pace = pace
        self.stop = threading.Event()
        self.samples: list[tuple[float, float]] = []
        self.errors = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        far = iso_z(utcnow() + timedelta(days=1))
        i = 0
        try:
            while not self.stop.is_set():
                start = time.time()
                reply = self.conn.request(
                    set_timer_message(i, f"probe-{i // 1000:05d}", f"t{i:07d}", fire_at=far)
                )
                self.samples.append((start, time.time() - start))
                if not reply.get("ok"):
                    self.errors += 1
                i += 1
                sleep_until(start + self.pace)
        except BaseException as exc:
            self.error = exc
        finally:
            self.conn.close()


def run_commands_during_burst(
    db: Database, workdir: Path, n: int, *, label: str, pace: float = 0.005
) -> dict[str, Any]:
    """Reply times of commands (one client, one at a time) while a burst of ``n`` fires."""
    url = db.fresh(label)
    timeout = max(60.0, n / 100)
    with Daemon(url, workdir, label) as daemon:
        daemon.start()
        t0 = time.time() + _lead(n)
        margin = _load_due(db, daemon, list(burst_specs(n, from_epoch(t0))), t0)
        prober = _Prober(daemon.socket, pace)
        prober.start()
        done = wait_for_events(db, n, timeout)
        time.sleep(0.2)
        prober.stop.set()
        prober.join(30)
    if done is None or prober.error:
        raise BenchError(f"{label}: burst incomplete or prober failed: {prober.error}")
    during = [d for s, d in prober.samples if t0 <= s <= done]
    idle = [d for s, d in prober.samples if s < t0]
    return {
        "burst_n": n,
        "setup_margin_s": margin,
        "burst_durable_per_s": round(n / (done - t0), 1),
        "pace_s": pace,
        "errors": prober.errors,
        "reply_during_burst": summarize_ms(during),
        "reply_idle": summarize_ms(idle),
    }


def scale_specs(n: int, start: datetime) -> tuple[list[TimerSpec], list[str], str | None]:
    """``n`` timers: personas of 100 (one page of ``list_timers``) and, when ``n`` allows, one
    persona at the default quota of 1,000. Due over the next 30 days (none fires during the
    measure); one in three repeats hourly."""
    specs: list[TimerSpec] = []
    big = "scale-big" if n >= 10_000 else None
    spread = timedelta(days=30).total_seconds() / max(n, 1)
    i = 0
    if big:
        for k in range(1000):
            specs.append(TimerSpec(big, f"t{k:04d}", start + timedelta(seconds=i * spread)))
            i += 1
    personas: list[str] = []
    while i < n:
        persona = f"scale-{len(personas):07d}"
        personas.append(persona)
        for k in range(min(100, n - i)):
            interval = 3600.0 if i % 3 == 0 else None
            specs.append(
                TimerSpec(persona, f"t{k:03d}", start + timedelta(seconds=i * spread), interval)
            )
            i += 1
    return specs, personas, big


def _timed(fn: Any, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def load_scale(db: Database, n: int, label: str) -> tuple[list[str], str | None, float]:
    """Bulk-load the :func:`scale_specs` timers and settle the database (checkpoint / vacuum,
    analyze); the personas, the persona at the quota, and the load's seconds."""
    t = time.time()
    specs, personas, big = scale_specs(n, utcnow() + timedelta(days=1))
    db.insert_timers(timer_rows(db, specs, utcnow()))
    del specs
    loaded = time.time() - t
    db.settle()
    settled = time.time() - t - loaded
    log(f"{label}: loaded {n} timers in {loaded:.1f} s (+{settled:.1f} s checkpoint/vacuum)")
    return personas, big, loaded


def run_scale(
    db: Database,
    workdir: Path,
    n: int,
    *,
    label: str,
    list_calls: int = 100,
    profile: Path | None = None,
) -> dict[str, Any]:
    """``n`` stored timers: daemon start time, resident memory, ``list_timers`` of one persona."""
    import psutil  # noqa: F401 - fail early if missing

    url = db.fresh(label)
    personas, big, loaded = load_scale(db, n, label)
    rng = random.Random(42)
    result: dict[str, Any] = {"n": n, "load_s": round(loaded, 2)}
    with Daemon(url, workdir, label) as daemon:
        result["start_s"] = round(daemon.start(), 3)
        result["rss_after_start_mb"] = round(daemon.rss() / 2**20, 1)
        with TimerClient(daemon.socket) as client:

            def list_one() -> None:
                persona = rng.choice(personas)
                got = client.command("list_timers", CONNECTOR, personaId=persona)
                if len(got["timers"]) != min(100, n) and persona != personas[-1]:
                    raise BenchError(f"list_timers {persona}: {len(got['timers'])} timers")

            _timed(list_one, 5)  # warm-up
            if profile is not None:
                daemon.start_profile(profile)
            result["list_timers_100"] = summarize_ms(_timed(list_one, list_calls))
            daemon.stop_profile()
            if big:

                def list_big() -> None:
                    got = client.command("list_timers", CONNECTOR, personaId=big, limit="1000")
                    if len(got["timers"]) != 1000:
                        raise BenchError(f"list_timers {big}: {len(got['timers'])} timers")

                result["list_timers_1000"] = summarize_ms(_timed(list_big, max(5, list_calls // 5)))
            result["status"] = summarize_ms(_timed(client.status, 3))
        result["rss_after_list_mb"] = round(daemon.rss() / 2**20, 1)
        t = time.monotonic()
        daemon.stop()
        result["stop_s"] = round(time.monotonic() - t, 3)
        # A second start: the usual case of a restart, with the database in the OS cache.
        result["restart_s"] = round(daemon.start(), 3)
        result["rss_after_restart_mb"] = round(daemon.rss() / 2**20, 1)
    return result
