"""Prometheus metrics (SPEC 7.3) from real daemons, parsed with prometheus_client's own parser;
the settings that turn them on; and deploy/'s Grafana dashboard and alert rules, which must
load and name only metrics a daemon really exports."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from program_timer.scheduler.config import ConfigError, load_settings
from tests.daemon_proc import DaemonProcess, short_tmpdir, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SPEC_METRICS = {
    "program_timer_fires",
    "program_timer_fire_lateness_seconds",
    "program_timer_commands",
    "program_timer_timers",
    "program_timer_deliveries_pending",
    "program_timer_deliveries_dead",
    "program_timer_oldest_pending_delivery_seconds",
    "program_timer_database_up",
    "program_timer_connections",
}


def _metrics_url(d: DaemonProcess) -> str:
    """Where the daemon serves metrics (it was asked for port 0 and logged the one it got)."""

    def logged() -> str | None:
        for line in d.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("action") == "metrics_serving":
                return str(entry["address"])
        return None

    return f"http://{wait_for(logged, timeout=10)}/metrics"


REFRESH = 2.0  # PROGRAM_TIMER_METRICS_REFRESH of the scrape test (default 5 s)


def _start(factory: Any, **env: Any) -> tuple[DaemonProcess, str]:
    d: DaemonProcess = factory(PROGRAM_TIMER_METRICS_ADDRESS="127.0.0.1:0", **env)
    d.start()
    return d, _metrics_url(d)


class Scrape:
    """One scrape, parsed: families by name, and samples by (name, labels)."""

    def __init__(self, url: str) -> None:
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            self.text = reply.read().decode()
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in self.families.values():
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.samples)

    @property
    def sample_names(self) -> set[str]:
        return {n for n, _ in self.samples}


def _events(c: Any, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        out.append(c.next_event(max(0.1, deadline - time.monotonic())))
    return out


def test_scrape_shows_commands_fires_deliveries_and_database_figures(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d, url = _start(
        daemon_factory,
        PROGRAM_TIMER_ACK_TIMEOUT=1,
        PROGRAM_TIMER_MAX_ATTEMPTS=1,
        PROGRAM_TIMER_METRICS_REFRESH=REFRESH,
    )
    with d.client() as away:
        away.subscribe("away")  # detached from now on: its deliveries wait
    with d.client() as here, d.client() as lazy, d.client() as c:
        here.subscribe("here")
        lazy.subscribe("lazy")  # never acks: one attempt each, then dead
        for i in range(3):
            c.command("set_timer", "my_timer", personaId="p", timerName=f"t{i}", interval="0.1")
        with pytest.raises(Exception, match="not_found"):
            c.command("get_timer", "my_timer", personaId="p", timerName="nope")
        with pytest.raises(Exception, match="unknown_command"):
            c.command("no_such_command", "my_timer", personaId="p")
        got = _events(here, 3)
        assert here.ack([m["deliveryId"] for m in got]) == 3
        _events(lazy, 3)
        wait_for(lambda: c.status()["deliveries"]["dead"] == 3, timeout=10)
        time.sleep(REFRESH + 0.2)  # past the cache of the database figures

        s = Scrape(url)
        assert set(s.families) >= SPEC_METRICS, SPEC_METRICS - set(s.families)
        assert s.families["program_timer_fires"].type == "counter"
        assert s.families["program_timer_fire_lateness_seconds"].type == "histogram"
        assert s.value("program_timer_fires_total") == 3
        assert s.value("program_timer_fire_batches_total") >= 1
        assert s.value("program_timer_fires_dropped_total") == 0
        # the histogram: cumulative buckets ending in +Inf = count = fires, sane sum
        lateness = [
            (float(dict(k)["le"]), v)
            for (n, k), v in s.samples.items()
            if n == "program_timer_fire_lateness_seconds_bucket"
        ]
        lateness.sort()
        assert [v for _, v in lateness] == sorted(v for _, v in lateness)
        assert lateness[-1] == (float("inf"), 3)
        assert s.value("program_timer_fire_lateness_seconds_count") == 3
        assert 0 <= s.value("program_timer_fire_lateness_seconds_sum") < 3 * 5
        assert s.value("program_timer_commands_total", command="set_timer", result="ok") == 3
        assert s.value("program_timer_commands_total", command="get_timer", result="not_found") == 1
        assert (
            s.value("program_timer_commands_total", command="other", result="unknown_command") == 1
        )
        assert s.value("program_timer_command_duration_seconds_count", command="set_timer") == 3
        assert 0 < s.value("program_timer_command_duration_seconds_sum", command="set_timer") < 15
        assert s.value("program_timer_timers", state="fired") == 3
        assert s.value("program_timer_timers", state="scheduled") == 0
        assert s.value("program_timer_deliveries_pending") == 3  # away's
        assert s.value("program_timer_deliveries_dead") == 3  # lazy's
        assert REFRESH < s.value("program_timer_oldest_pending_delivery_seconds") < 60
        assert s.value("program_timer_subscriptions") == 3
        assert s.value("program_timer_database_up") == 1
        assert s.value("program_timer_connections") == 3
        assert s.value("program_timer_subscribers") == 2
        assert s.value("program_timer_deliveries_sent_total") == 6
        assert s.value("program_timer_deliveries_acked_total") == 3
        assert s.value("program_timer_dead_letters_total") == 3
        assert s.value("program_timer_deliveries_inflight") == 0
        for work in ("firePass", "deliveryRefill", "dueLookup", "heartbeat", "purge"):
            assert s.value("program_timer_background_failing", work=work) == 0
        for kind in ("unavailable", "conflict", "error", "timeout"):
            assert s.value("program_timer_database_errors_total", kind=kind) >= 0
        assert s.value("process_resident_memory_bytes") > 10_000_000
        (info,) = s.families["program_timer_info"].samples
        assert info.labels["version"] and info.labels["database"] in ("sqlite", "postgresql")

        # The database figures are cached: a timer set now shows in the next read, not at once;
        # the daemon's own counters are live.
        c.command("set_timer", "my_timer", personaId="p", timerName="later", interval="3600")
        s2 = Scrape(url)
        assert s2.value("program_timer_commands_total", command="set_timer", result="ok") == 4
        assert s2.value("program_timer_timers", state="scheduled") == 0
        wait_for(
            lambda: Scrape(url).value("program_timer_timers", state="scheduled") == 1,
            timeout=10,
            interval=0.5,
        )

    base = url.removesuffix("/metrics")
    with urllib.request.urlopen(base + "/", timeout=5) as reply:
        assert b"/metrics" in reply.read()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/other", timeout=5)
    assert err.value.code == 404


def test_database_figures_are_left_out_while_the_database_is_lost(sqlite_url: str) -> None:
    d = DaemonProcess(sqlite_url, short_tmpdir(), PROGRAM_TIMER_METRICS_ADDRESS="127.0.0.1:0")
    d.start()
    try:
        url = _metrics_url(d)
        s = Scrape(url)
        assert s.value("program_timer_database_up") == 1 and s.has("program_timer_timers")
        Path(sqlite_url.removeprefix("sqlite:///")).unlink()  # a fault, never a fresh database

        def down() -> bool:
            s = Scrape(url)
            return s.value("program_timer_database_up") == 0 and not s.has("program_timer_timers")

        wait_for(down, timeout=20, interval=0.5)
        s = Scrape(url)  # the daemon's own figures are still served
        assert s.has("program_timer_fires_total") and s.has("program_timer_connections")
    finally:
        d.stop()


def test_metrics_address_taken_stops_the_start(sqlite_url: str) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    d = DaemonProcess(sqlite_url, short_tmpdir(), PROGRAM_TIMER_METRICS_ADDRESS=f"127.0.0.1:{port}")
    try:
        with pytest.raises(RuntimeError, match="daemon exited with 3"):
            d.start()
        assert "PROGRAM_TIMER_METRICS_ADDRESS" in d.log()
        assert "Address already in use" in d.log()
    finally:
        d.stop()
        taken.close()


def test_metrics_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("METRICS_ADDRESS", "RETRY_MAX_DELAY", "MAX_ATTEMPTS"):
        monkeypatch.delenv(f"PROGRAM_TIMER_{name}", raising=False)
    default = load_settings()
    assert default.metrics_endpoint is None
    assert default.retry_max_delay == 3600 and default.max_attempts is None
    assert load_settings(metrics_address="127.0.0.1:9464").metrics_endpoint == ("127.0.0.1", 9464)
    assert load_settings(metrics_address="[::1]:9464").metrics_endpoint == ("::1", 9464)
    assert load_settings(metrics_address=":9464").metrics_endpoint == ("0.0.0.0", 9464)
    for bad in ("9464", "localhost", "host:port", "127.0.0.1:70000", "::1:9464"):
        with pytest.raises(ConfigError, match="PROGRAM_TIMER_METRICS_ADDRESS"):
            load_settings(metrics_address=bad)
    monkeypatch.setenv("PROGRAM_TIMER_MAX_ATTEMPTS", "0")
    with pytest.raises(ConfigError, match="PROGRAM_TIMER_MAX_ATTEMPTS"):
        load_settings()
    monkeypatch.setenv("PROGRAM_TIMER_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("PROGRAM_TIMER_RETRY_MAX_DELAY", "inf")
    with pytest.raises(ConfigError, match="PROGRAM_TIMER_RETRY_MAX_DELAY"):
        load_settings()
    monkeypatch.setenv("PROGRAM_TIMER_RETRY_MAX_DELAY", "60")
    loaded = load_settings()
    assert (loaded.max_attempts, loaded.retry_max_delay) == (5, 60)


# ---------------------------------------------------------------------------------------------
# deploy/: the dashboard and the alert rules

_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana template query) reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)  # grouping labels
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function or a keyword
        names.add(word)
    return names


def _dashboard_expressions(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            elif key == "definition" and isinstance(value, str):
                found.append(value)  # template variables: label_values(metric, label)
            else:
                found.extend(_dashboard_expressions(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_dashboard_expressions(item))
    return found


def _label_values_metrics(expr: str) -> set[str]:
    m = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", expr.split(",")[0])
    return {m.group(1)} if m else set()


def test_dashboard_and_alerts_load_and_name_only_exported_metrics(sqlite_url: str) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())
    (group,) = rules["groups"]
    alerts = group["rules"]
    assert len(alerts) >= 7
    for rule in alerts:
        assert set(rule) >= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]

    expressions = [r["expr"] for r in alerts]
    panel_exprs = _dashboard_expressions(dashboard)
    used: set[str] = set()
    for expr in expressions + panel_exprs:
        if expr.lstrip().startswith("label_values("):
            used |= _label_values_metrics(expr)
        else:
            used |= _metric_names(expr)
    assert "program_timer_fire_lateness_seconds_bucket" in used  # the parser sees names
    assert _metric_names('sum by (le) (rate(x_total{a="b"}[5m])) > 1') == {"x_total"}

    d = DaemonProcess(sqlite_url, short_tmpdir(), PROGRAM_TIMER_METRICS_ADDRESS="127.0.0.1:0")
    d.start()
    try:
        url = _metrics_url(d)
        with d.client() as c:  # something in every family
            c.command("set_timer", "my_timer", personaId="p", timerName="t", interval="0.1")
            wait_for(lambda: c.status()["fires"]["total"] == 1)
        exported = Scrape(url).sample_names | {"up"}  # `up` is Prometheus' own, per target
    finally:
        d.stop()
    assert used <= exported, used - exported
    # What an operator must watch is on the dashboard and in the rules.
    covered = {n.removesuffix("_bucket").removesuffix("_total") for n in used}
    assert {
        "program_timer_fire_lateness_seconds",
        "program_timer_oldest_pending_delivery_seconds",
        "program_timer_deliveries_dead",
        "program_timer_database_up",
        "up",
    } <= covered
    alert_names = {n for e in expressions for n in _metric_names(e)}
    assert {
        "up",
        "program_timer_database_up",
        "program_timer_fire_lateness_seconds_bucket",
        "program_timer_oldest_pending_delivery_seconds",
        "program_timer_deliveries_dead",
    } <= alert_names
