"""The daemon as a flow engine sees it (issue 12): events read by a subscriber at a steady rate,
and commands from several clients at once.

``steady_read``: one-shot timers spread evenly (as in :func:`bench.ours.run_steady`), one
subscriber attached over the socket; latency = ``time.time()`` when the pushed event was read
off the socket - its ``scheduledAt``. ``commands_4``: four client processes, each pipelining
``set_timer`` (distinct personas) with at most ``window`` requests unanswered.

Both clients run in processes of their own (``fork``: nothing to import, nothing to pickle) so
that neither the harness's work nor its GIL delays a read or a send. The subscriber reads on one
thread, which only stamps the time, splits lines and parses them (orjson); the raw
``scheduledAt`` strings are kept and converted after the run. It acks in batches from a second
thread (every :data:`ACK_BATCH` events or :data:`ACK_EVERY` seconds, whichever comes first), as
a flow engine that acks what it has handled would. The clocks are one machine's ``time.time()``
(the daemon's ``scheduledAt`` is the timer's ``fireAt``, which the harness chose).
"""

from __future__ import annotations

import multiprocessing
import socket
import sys
import threading
import time
from datetime import datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    BenchError,
    Daemon,
    Database,
    encode,
    from_epoch,
    iso_z,
    set_timer_message,
    sleep_until,
    steady_specs,
    summarize_ms,
    utcnow,
)
from bench.ours import _lead, _load_due

ACK_BATCH = 50  # ack once this many events are unacked (far below half the window) ...
ACK_EVERY = 0.01  # ... or this long after the previous ack, whichever comes first
COMMAND_CLIENTS = 4
COMMAND_WINDOW = 256  # requests unanswered per client ("a few hundred", docs/protocol.md 7)
MAX_WINDOW = 1024
SUBSCRIPTION = "bench-flow"

# ``fork``: the children only use a socket, orjson and their arguments (no pickling, no
# imports); the harness has no thread running when it forks them.
_MP = multiprocessing.get_context("fork")


def _lines(buf: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines of ``buf + chunk``, and what is left of an incomplete one."""
    data = buf + chunk if buf else chunk
    if b"\n" not in chunk:
        return [], data
    head, _, rest = data.rpartition(b"\n")
    return head.split(b"\n"), rest


# --- the subscriber ------------------------------------------------------------------------------


class _Acker(threading.Thread):
    """Acks the delivery ids the reader hands over, in batches, off the reading thread."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(name="bench-acker", daemon=True)
        self.sock = sock
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.pending: list[int] = []
        self.requests = 0
        self.error: BaseException | None = None

    def add(self, ids: list[int]) -> None:
        with self.lock:
            self.pending.extend(ids)
            full = len(self.pending) >= ACK_BATCH
        if full:
            self.wake.set()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.wake.wait(ACK_EVERY)
                self.wake.clear()
                with self.lock:
                    ids, self.pending = self.pending, []
                if ids:
                    self.requests += 1
                    message = {"op": "ack", "id": f"a{self.requests}", "deliveryIds": ids}
                    self.sock.sendall(orjson.dumps(message) + b"\n")
        except BaseException as exc:
            self.error = exc


def _subscriber(path: str, expected: int, timeout: float, out: Connection) -> None:
    """The subscriber process: ``("ready", None)`` once subscribed, then ``("done", figures)``
    once ``expected`` events were read and acked, or ``("error", text)``."""
    sys.setswitchinterval(0.0005)  # the acker never keeps the reader waiting for the GIL long
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        subscribe = {"op": "subscribe", "id": "sub", "subscriptionId": SUBSCRIPTION, "filter": {}}
        sock.sendall(orjson.dumps(subscribe) + b"\n")
        acker = _Acker(sock)
        acker.start()
        read_at: list[float] = []  # per event: when the chunk completing it was read
        scheduled: list[str] = []
        fired: list[str] = []
        resent = 0
        acked = 0
        buf = b""
        while len(read_at) < expected or acked < expected:
            chunk = sock.recv(1 << 20)
            now = time.time()
            if not chunk:
                raise BenchError("the daemon closed the subscriber's connection")
            lines, buf = _lines(buf, chunk)
            ids = []
            for line in lines:
                m = orjson.loads(line)
                if m.get("op") == "event":
                    args = m["event"]["arguments"]
                    read_at.append(now)
                    scheduled.append(args["scheduledAt"])
                    fired.append(args["firedAt"])
                    ids.append(m["deliveryId"])
                    if m["attempt"] != 1:
                        resent += 1
                elif not m.get("ok"):
                    raise BenchError(f"refused: {m}")
                elif m.get("id") == "sub":
                    out.send(("ready", None))
                else:
                    acked += int(m["result"]["acked"])
            if ids:
                acker.add(ids)
            if acker.error is not None:
                raise acker.error
        acker.stop.set()
        acker.wake.set()
        acker.join(5)
        out.send(
            (
                "done",
                {
                    "read_at": read_at,
                    "scheduled": scheduled,
                    "fired": fired,
                    "resent": resent,
                    "acked": acked,
                    "ack_requests": acker.requests,
                    "cpu_s": time.process_time(),
                },
            )
        )
    except BaseException as exc:
        out.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        sock.close()
        out.close()


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _receive(conn: Connection, who: str, what: str, timeout: float) -> Any:
    """The next message of a child process, which must be ``what``."""
    if not conn.poll(timeout):
        raise BenchError(f"{who} sent no {what!r} within {timeout:.0f} s")
    kind, value = conn.recv()
    if kind == "error":
        raise BenchError(f"{who} failed: {value}")
    if kind != what:
        raise BenchError(f"{who} sent {kind!r}, expected {what!r}")
    return value


def _cpu_s(daemon: Daemon) -> float:
    """CPU seconds the daemon process used so far (all its threads)."""
    import psutil

    times = psutil.Process(daemon.pid).cpu_times()
    return float(times.user + times.system)


def run_steady_read(
    db: Database,
    workdir: Path,
    rate: float,
    seconds: float,
    *,
    label: str,
    profile: Path | None = None,
) -> dict[str, Any]:
    """``rate`` fires per second for ``seconds`` with one subscriber attached: ``scheduledAt`` →
    the moment the subscriber read the event, and, from the same run, the committed lateness
    (``events.fired_at - scheduled_at``) and ``firedAt`` → read."""
    n = int(rate * seconds)
    timeout = seconds + 120
    url = db.fresh(label)
    with Daemon(url, workdir, label) as daemon:
        daemon.start()
        results, child_end = _MP.Pipe(duplex=False)
        proc = _MP.Process(
            target=_subscriber,
            args=(daemon.socket, n, timeout, child_end),
            name="bench-flow-subscriber",
            daemon=True,
        )
        proc.start()
        child_end.close()
        try:
            _receive(results, "the subscriber", "ready", 30)
            t0 = time.time() + _lead(n)
            margin = _load_due(db, daemon, list(steady_specs(rate, seconds, from_epoch(t0))), t0)
            if profile is not None:
                daemon.start_profile(profile)
            sleep_until(t0)
            cpu = _cpu_s(daemon)
            got = _receive(results, "the subscriber", "done", timeout)
            cpu = _cpu_s(daemon) - cpu
            daemon.stop_profile()
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            results.close()
    read_at: list[float] = got["read_at"]
    if len(read_at) != n:
        raise BenchError(f"{label}: the subscriber read {len(read_at)} events for {n} timers")
    latency = [r - _epoch(s) for r, s in zip(read_at, got["scheduled"], strict=True)]
    fired_to_read = [r - _epoch(f) for r, f in zip(read_at, got["fired"], strict=True)]
    committed = [f - s for s, f in db.event_times()]
    return {
        "rate": rate,
        "seconds": seconds,
        "n": n,
        "setup_margin_s": margin,
        "received": len(read_at),
        "acked": got["acked"],
        "ack_requests": got["ack_requests"],
        "resent": got["resent"],
        # Of one CPU, from t0 to the last event read (the daemon's threads together).
        "daemon_cpu_share": round(cpu / max(read_at[-1] - t0, 1e-3), 3),
        "subscriber_cpu_s": round(got["cpu_s"], 3),
        "read_latency": summarize_ms(latency),
        "fired_to_read": summarize_ms(fired_to_read),
        "lateness": summarize_ms(committed),
        "read_latency_samples_s": latency,
    }


# --- several command clients ---------------------------------------------------------------------


def _command_client(path: str, lines: list[bytes], window: int, go: Any, out: Connection) -> None:
    """One client process: connect, say ``ready``, wait for ``go``, then pipeline ``lines``
    (request ``id`` = index) keeping at most ``window`` unanswered, on one thread."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(120)
        sock.connect(path)
        n = len(lines)
        sent_at = [0.0] * n
        latencies: list[float] = []
        errors: dict[str, int] = {}
        refill = max(1, window // 4)  # send when this many slots are free
        out.send(("ready", None))
        go.wait(60)
        cpu = time.process_time()
        first = time.time()
        sent = replies = 0
        buf = b""
        while replies < n:
            free = window - (sent - replies)
            if sent < n and free >= min(refill, n - sent):
                end = min(n, sent + free)
                now = time.time()
                for i in range(sent, end):
                    sent_at[i] = now
                sock.sendall(b"".join(lines[sent:end]))
                sent = end
            chunk = sock.recv(1 << 18)
            now = time.time()
            if not chunk:
                raise BenchError("the daemon closed the connection")
            got, buf = _lines(buf, chunk)
            for line in got:
                m = orjson.loads(line)
                replies += 1
                latencies.append(now - sent_at[m["id"]])
                if not m.get("ok"):
                    code = str(m.get("error", {}).get("code", "?"))
                    errors[code] = errors.get(code, 0) + 1
        last = time.time()
        out.send(
            (
                "done",
                {
                    "n": n,
                    "first": first,
                    "last": last,
                    "latencies": latencies,
                    "errors": errors,
                    "cpu_s": time.process_time() - cpu,
                },
            )
        )
    except BaseException as exc:
        out.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        sock.close()
        out.close()


def run_commands_clients(
    db: Database,
    workdir: Path,
    per_client: int,
    *,
    label: str,
    clients: int = COMMAND_CLIENTS,
    window: int = COMMAND_WINDOW,
    profile: Path | None = None,
) -> dict[str, Any]:
    """``clients`` processes, each pipelining ``per_client`` ``set_timer`` (new timers, personas
    of 1,000, distinct per client), started together: total commands per second, reply time.

    ``window`` stays at most :data:`MAX_WINDOW`: a client that sends without reading on one
    thread would block with the daemon once neither reads (the protocol asks for a few
    hundred unanswered at most)."""
    if not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"window {window}: 1 to {MAX_WINDOW}")
    url = db.fresh(label)
    far = iso_z(utcnow() + timedelta(days=1))
    work = [
        [
            encode(set_timer_message(i, f"cmd{c}-{i // 1000:05d}", f"t{i:07d}", fire_at=far))
            for i in range(per_client)
        ]
        for c in range(clients)
    ]
    go = _MP.Event()
    with Daemon(url, workdir, label) as daemon:
        daemon.start()
        pipes: list[Connection] = []
        procs = []
        try:
            for c in range(clients):
                results, child_end = _MP.Pipe(duplex=False)
                proc = _MP.Process(
                    target=_command_client,
                    args=(daemon.socket, work[c], window, go, child_end),
                    name=f"bench-commands-{c}",
                    daemon=True,
                )
                proc.start()
                child_end.close()
                pipes.append(results)
                procs.append(proc)
            for c, results in enumerate(pipes):
                _receive(results, f"command client {c}", "ready", 30)
            if profile is not None:
                daemon.start_profile(profile)
            cpu = _cpu_s(daemon)
            go.set()
            timeout = max(60.0, per_client / 200)
            done = [
                _receive(results, f"command client {c}", "done", timeout)
                for c, results in enumerate(pipes)
            ]
            cpu = _cpu_s(daemon) - cpu
            daemon.stop_profile()
        finally:
            go.set()
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            for results in pipes:
                results.close()
    total = sum(d["n"] for d in done)
    first = min(d["first"] for d in done)
    last = max(d["last"] for d in done)
    errors: dict[str, int] = {}
    for d in done:
        for code, count in d["errors"].items():
            errors[code] = errors.get(code, 0) + count
    stored = db.count("timers")
    if errors or stored < total:
        raise BenchError(f"{label}: errors {errors}, {stored} timers stored of {total}")
    return {
        "clients": clients,
        "per_client": per_client,
        "window": window,
        "n": total,
        "seconds": round(last - first, 4),
        "per_s": round(total / (last - first), 1),
        "per_client_per_s": [round(d["n"] / (d["last"] - d["first"]), 1) for d in done],
        "daemon_cpu_share": round(cpu / (last - first), 3),  # of one CPU, while they ran
        "client_cpu_s": [round(d["cpu_s"], 3) for d in done],
        "errors": errors,
        "reply_time": summarize_ms(x for d in done for x in d["latencies"]),
    }
