"""Prometheus metrics at ``/metrics`` (SPEC 7.3), when ``PROGRAM_TIMER_METRICS_ADDRESS`` is set.

One private :class:`~prometheus_client.CollectorRegistry` (nothing registers itself into the
process-wide default one) with two collectors: the standard ``process_*`` figures, and
:class:`DaemonCollector`, which builds every ``program_timer_*`` family at scrape time from
what the daemon already keeps (:class:`~program_timer.scheduler.metrics.Metrics`, the delivery
dispatcher, the connections, the background work's backoffs, the database's health) plus a few
figures read from the database.

The database figures (timers by state, pending and dead deliveries, the oldest pending one)
are read at most once per :data:`REFRESH` seconds, and less often when reading them is slow
(the next read waits ten times the last one's duration: at most a tenth of the database's time),
on a store reader, within the database timeout. Between reads the cached values are served; when
the database cannot be read they are left out (and ``program_timer_database_up`` is 0) rather
than shown stale. Counting pending and dead deliveries reads one range of
``ix_deliveries_pending`` per subscription, never the table.

The HTTP server runs on its own thread (``prometheus_client``'s WSGI server, one thread per
scrape): a scrape never waits for the event loop, and a busy event loop never delays a scrape.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Connection

from program_timer import __version__
from program_timer.core.logs import get_logger
from program_timer.core.model import STATES
from program_timer.scheduler.metrics import Histogram
from program_timer.scheduler.requests import RequestHandler
from program_timer.store import queries
from program_timer.store.observe import KINDS

log = get_logger()

REFRESH: Final = 5.0  # seconds between two reads of the database figures, at least
SLOW_FACTOR: Final = 10.0  # ... and at least this many times the last read's duration


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """(``le`` as Prometheus writes it, cumulative count)."""
    return [
        ("+Inf" if bound == float("inf") else repr(float(bound)), float(n))
        for bound, n in histogram.buckets()
    ]


class DaemonCollector(Collector):
    """Every ``program_timer_*`` metric, built at scrape time (on the HTTP server's thread)."""

    def __init__(self, handler: RequestHandler, *, refresh: float = REFRESH) -> None:
        self._handler = handler
        self._refresh = refresh
        self._lock = threading.Lock()
        self._stored: dict[str, Any] | None = None  # the last database figures read
        self._stored_ok = False  # whether the last read succeeded (in time)
        self._reading: concurrent.futures.Future[dict[str, Any]] | None = None
        self._read_started = 0.0
        self._next_read = 0.0

    # the database figures, cached ----------------------------------------------------------

    def _read(self, conn: Connection) -> dict[str, Any]:
        return {
            # A count over the timers table (by state): cached like the rest.
            "timers": queries.timer_counts(conn),
            "deliveries": queries.pending_figures(conn),
            "now": self._handler.clock.now(),
        }

    def stored(self) -> dict[str, Any] | None:
        """The database figures, read now if the cached ones are old enough; None when the
        database could not be read within its timeout."""
        timeout = self._handler.database_timeout
        with self._lock:
            mono = time.monotonic()
            if self._reading is None and mono >= self._next_read:
                try:
                    self._reading = self._handler.worker.read(self._read)
                except RuntimeError:  # the readers are shut down: the daemon is stopping
                    self._stored_ok = False
                    return None
                self._read_started = mono
            reading, started = self._reading, self._read_started
        if reading is not None:
            left = max(0.0, started + timeout - time.monotonic())
            try:
                data = reading.result(timeout=left)
            except concurrent.futures.TimeoutError:
                with self._lock:
                    self._stored_ok = False  # still running: a later scrape takes its result
                return None
            except Exception:
                data = None
            with self._lock:
                if self._reading is reading:
                    self._reading = None
                    took = time.monotonic() - started
                    self._next_read = time.monotonic() + max(self._refresh, SLOW_FACTOR * took)
                    self._stored_ok = data is not None
                    if data is not None:
                        self._stored = data
        with self._lock:
            return self._stored if self._stored_ok else None

    # the families --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        h = self._handler
        stored = self.stored()
        yield from self._daemon_families(h)
        up = GaugeMetricFamily(
            "program_timer_database_up",
            "1 if the database answered the daemon's last work and the last metrics read, "
            "within PROGRAM_TIMER_DATABASE_TIMEOUT",
        )
        up.add_metric([], 1.0 if stored is not None and h.health.available else 0.0)
        yield up
        if stored is not None:
            yield from _stored_families(stored)

    def _daemon_families(self, h: RequestHandler) -> Iterable[Metric]:
        # One flat list of the families the daemon knows in memory: it reads better whole (a
        # reader checks the names against SPEC 7.3 and deploy/ in one place) than cut in parts.
        snap = h.metrics.snapshot()
        info = GaugeMetricFamily(
            "program_timer_info",
            "The daemon: version, id, database kind (always 1)",
            labels=["version", "daemon_id", "database"],
        )
        info.add_metric([__version__, h.facts.daemon_id, h.facts.database], 1.0)
        yield info
        yield _counter("program_timer_fires", "Timers fired (events recorded)", snap["fires"])
        yield _counter(
            "program_timer_fires_dropped",
            "Fires dropped as later than PROGRAM_TIMER_MISFIRE_GRACE",
            snap["dropped"],
        )
        yield _counter("program_timer_fire_batches", "Fire transactions committed", snap["batches"])
        batch: Histogram = snap["batch_sizes"]
        yield HistogramMetricFamily(
            "program_timer_fire_batch_size",
            "Timers fired per fire transaction",
            buckets=_buckets(batch),
            sum_value=batch.total,
        )
        lateness: Histogram = snap["lateness"]
        yield HistogramMetricFamily(
            "program_timer_fire_lateness_seconds",
            "How late each fire was: from when it became due to its fire transaction",
            buckets=_buckets(lateness),
            sum_value=lateness.total,
        )
        commands = CounterMetricFamily(
            "program_timer_commands",
            "Commands answered, by commandIdn and result (ok or the error code)",
            labels=["command", "result"],
        )
        for (command, result), n in sorted(snap["commands"].items()):
            commands.add_metric([command, result], float(n))
        yield commands
        latency = HistogramMetricFamily(
            "program_timer_command_duration_seconds",
            "Time from a command request read to its reply, by commandIdn",
            labels=["command"],
        )
        for command, histogram in sorted(snap["command_latency"].items()):
            latency.add_metric([command], _buckets(histogram), histogram.total)
        yield latency
        errors = CounterMetricFamily(
            "program_timer_database_errors",
            "Database errors by kind: unavailable (no answer, connection lost, write refused), "
            "conflict (a transaction lost a race; retried), error (anything else), timeout (a "
            "request's database work passed PROGRAM_TIMER_DATABASE_TIMEOUT)",
            labels=["kind"],
        )
        found = snap["database_errors"]
        for kind in (*KINDS, "timeout"):
            errors.add_metric([kind], float(found.get(kind, 0)))
        yield errors
        failing = GaugeMetricFamily(
            "program_timer_background_failing",
            "Failures in a row of background work now failing and retried with backoff (0: "
            "working)",
            labels=["work"],
        )
        for name, backoff in sorted(h.background.items()):
            failing.add_metric([name], float(backoff.failures))
        yield failing

        d = h.dispatcher.snapshot()
        yield _gauge("program_timer_connections", "Open client connections", h.connections())
        yield _gauge(
            "program_timer_subscribers",
            "Subscriptions attached to this daemon's connections",
            d["subscribers"],
        )
        yield _gauge(
            "program_timer_deliveries_inflight",
            "Deliveries sent on this daemon's connections and awaiting an ack",
            d["inflight"],
        )
        yield _counter(
            "program_timer_deliveries_sent", "Deliveries pushed (resends included)", d["sent"]
        )
        yield _counter("program_timer_deliveries_acked", "Deliveries acked", d["acked"])
        yield _counter(
            "program_timer_dead_letters",
            "Deliveries this daemon gave up on after PROGRAM_TIMER_MAX_ATTEMPTS sends",
            d["dead_letters"],
        )
        yield _counter(
            "program_timer_redelivered",
            "Dead deliveries made pending again by redeliver",
            d["redelivered"],
        )


def _stored_families(stored: dict[str, Any]) -> Iterable[Metric]:
    timers = GaugeMetricFamily(
        "program_timer_timers", "Stored timers by state (all daemons)", labels=["state"]
    )
    for state in STATES:
        timers.add_metric([state], float(stored["timers"].get(state, 0)))
    yield timers
    figures = stored["deliveries"]
    yield _gauge(
        "program_timer_deliveries_pending",
        "Deliveries neither acked nor dead, in flight included (all subscriptions)",
        figures["pending"],
    )
    yield _gauge(
        "program_timer_deliveries_dead",
        "Dead deliveries (attempts spent, or their event reached the retention): kept, not "
        "sent, until redelivered or purged",
        figures["dead"],
    )
    oldest = figures["oldest_pending_at"]
    age = max(0.0, (stored["now"] - oldest).total_seconds()) if oldest is not None else 0.0
    yield _gauge(
        "program_timer_oldest_pending_delivery_seconds",
        "Age of the oldest pending delivery (0: none pending)",
        age,
    )
    yield _gauge("program_timer_subscriptions", "Stored subscriptions", figures["subscriptions"])


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=float(value))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def registry_for(handler: RequestHandler, refresh: float = REFRESH) -> CollectorRegistry:
    """The private registry: the daemon's metrics and the process's."""
    registry = CollectorRegistry()
    registry.register(ProcessCollector(registry=None))
    registry.register(DaemonCollector(handler, refresh=refresh))
    return registry


# the HTTP server ---------------------------------------------------------------------------


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (every 15 s forever)."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _only_metrics(app: Callable[..., Any]) -> Callable[..., Any]:
    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO") or "/"
        if path in ("/metrics", "/metrics/"):
            return app(environ, start_response)
        status = "200 OK" if path == "/" else "404 Not Found"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [b"program-timer: Prometheus metrics are at /metrics\n"]

    return serve


class MetricsExporter:
    """``/metrics`` over HTTP on ``host:port``, served by its own threads."""

    def __init__(self, endpoint: tuple[str, int], registry: CollectorRegistry) -> None:
        self._endpoint = endpoint
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port the system chose when 0 was asked)."""
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Listen now; :class:`OSError` when the address cannot be had (in use, not local)."""
        host, port = self._endpoint
        try:
            family = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]
            server_class = type("MetricsServer", (_Server,), {"address_family": family})
            self._server = make_server(
                host,
                port,
                _only_metrics(make_wsgi_app(self._registry)),
                server_class=server_class,
                handler_class=_Quiet,
            )
        except OSError as exc:  # in use, not an address of this host, unknown name
            reason = exc.strerror or str(exc)
            raise OSError(
                exc.errno,
                f"metrics_address (PROGRAM_TIMER_METRICS_ADDRESS) {host}:{port}: {reason}",
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()
        host, port = self.address
        log.info("serving metrics", action="metrics_serving", address=f"{host}:{port}")

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None
