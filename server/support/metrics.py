"""Prometheus metrics: one registry for the process, and one-line hooks for the code that counts.

The registry is our own :class:`CollectorRegistry` (not prometheus-client's
global one), so importing a library that registers its own metrics never
changes what ``GET /metrics`` shows, and tests can read values directly.

Two kinds of numbers:

* **Counters that happen** (logins, transfers, events, script runs) are
  incremented where they happen, through the small functions below, each a
  single call from login.py, session.py and the scripting engine. Incrementing
  a prometheus-client counter is a lock and an add: cheap enough for every
  transfer.
* **State** (open sessions, worker pool health, pending notifications, bans)
  is read from the daemon when Prometheus scrapes, by :class:`DaemonCollector`,
  so nothing has to be kept in sync and nothing is counted twice.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("scriptsftp.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

AUTH = Counter("scriptsftp_auth", "Login attempts by protocol, method and result (success|failure).",
               ["protocol", "method", "result"], registry=REGISTRY)
TRANSFER_BYTES = Counter("scriptsftp_transfer_bytes", "Bytes transferred by protocol and direction (upload|download).",
                         ["protocol", "direction"], registry=REGISTRY)
TRANSFERS = Counter("scriptsftp_transfers", "Finished transfers by protocol, direction and result "
                    "(ok|aborted|rejected).", ["protocol", "direction", "result"], registry=REGISTRY)
EVENTS = Counter("scriptsftp_events", "Events dispatched to scripts, by event name and decision "
                 "(allow|veto|error for pre-events, done for the others).", ["event", "decision"], registry=REGISTRY)
SCRIPT_DURATION = Histogram("scriptsftp_script_duration_seconds", "Wall-clock time of one handler call "
                            "(including the wait for a free worker), by script.", ["script"], registry=REGISTRY,
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
SCRIPT_ERRORS = Counter("scriptsftp_script_errors", "Handler calls that failed, by script and kind "
                        "(exception, timeout, cpu, memory, crash, ...).", ["script", "kind"], registry=REGISTRY)
SCRIPT_TIMEOUTS = Counter("scriptsftp_script_timeouts", "Handler calls stopped for exceeding their wall-clock "
                          "or CPU limit, by script.", ["script"], registry=REGISTRY)
REFUSALS = Counter("scriptsftp_refusals", "Operations and logins refused by the server itself (not by a script), "
                   "by protocol, operation (upload, download, delete, ..., login, connect, session: one ended "
                   "because its account changed) and kind (permission, filter, limit, space, policy, defender, "
                   "account).", ["protocol", "operation", "kind"],
                   registry=REGISTRY)
AUDIT_DROPPED = Counter("scriptsftp_audit_dropped", "Audit records dropped because the write queue was full.",
                        registry=REGISTRY)

_TIMEOUT_KINDS = frozenset({"timeout", "cpu"})
_DEFENDER_GAUGES = frozenset({"open_connections", "active_bans"})  # the rest of defender.stats() are counters


# --- one-line hooks -------------------------------------------------------------------


def auth(protocol: str, method: str, ok: bool) -> None:
    """A login attempt finished (login.py)."""
    AUTH.labels(protocol or "unknown", method or "unknown", "success" if ok else "failure").inc()


def transfer(protocol: str, direction: str, nbytes: int, result: str = "ok") -> None:
    """A file handle closed (session.py): ``direction`` is "upload" or "download"."""
    if nbytes:
        TRANSFER_BYTES.labels(protocol, direction).inc(nbytes)
    TRANSFERS.labels(protocol, direction, result).inc()


def refusal(protocol: str, operation: str, kind: str) -> None:
    """The server refused an operation or a login (session.py, login.py)."""
    REFUSALS.labels(protocol or "unknown", operation, kind).inc()


def event(name: str, decision: str) -> None:
    """The engine decided an event (scripting/engine.py, through ops/audit.py ScriptAuditRecorder)."""
    EVENTS.labels(name, decision).inc()


def script_run(script: str, duration: float, verdict: str, error_kind: str | None) -> None:
    """One handler call finished (scripting/engine.py, through ops/audit.py ScriptAuditRecorder)."""
    SCRIPT_DURATION.labels(script).observe(duration)
    if verdict not in ("allow", "veto"):
        SCRIPT_ERRORS.labels(script, error_kind or "error").inc()
        if error_kind in _TIMEOUT_KINDS:
            SCRIPT_TIMEOUTS.labels(script).inc()


# --- state read at scrape time ------------------------------------------------------------


def _stats(obj: Any) -> dict[str, Any]:
    """``obj.stats()`` as a dict, or {} (the outbox may not exist, or may fail: metrics never do)."""
    fn = getattr(obj, "stats", None)
    if fn is None:
        return {}
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - a scrape must not fail on one source
        log.warning("metrics: %r.stats() failed: %s", obj, exc)
        return {}
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class DaemonCollector(Collector):
    """Gauges and counters read from the running daemon at each scrape."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def describe(self) -> Iterable[Any]:
        return []  # values depend on the daemon: collected lazily, never at registration

    def collect(self) -> Iterable[Any]:
        d = self.daemon
        sessions = GaugeMetricFamily("scriptsftp_sessions", "Open client connections by protocol.",
                                     labels=["protocol"])
        counts: dict[str, int] = {}
        preauth = 0
        for conn in d.core.connections():
            counts[conn.protocol] = counts.get(conn.protocol, 0) + 1
            preauth += bool(getattr(conn, "preauth", False))
        for proto in sorted(set(counts) | {"sftp"}):
            sessions.add_metric([proto], counts.get(proto, 0))
        yield sessions
        yield GaugeMetricFamily("scriptsftp_preauth_connections", "Open connections not logged in yet "
                                "(bounded by [defender] max_preauth_connections).", value=preauth)
        yield CounterMetricFamily("scriptsftp_preauth_evicted", "Connections not logged in closed to make room "
                                  "for newer ones (max_preauth_connections reached).",
                                  value=getattr(d.core, "preauth_evicted", 0))

        yield GaugeMetricFamily("scriptsftp_start_time_seconds", "When the daemon started (Unix time).",
                                value=d.started)
        yield GaugeMetricFamily("scriptsftp_draining", "1 while the daemon drains (no new connections), else 0.",
                                value=1 if getattr(d, "draining", None) else 0)
        node = getattr(d, "node", None)
        if node is not None:  # what runs here, to compare across nodes: 1 per node and hash
            info = GaugeMetricFamily("scriptsftp_config_info", "The running configuration's hash (always 1).",
                                     labels=["node", "config_hash"])
            info.add_metric([node, d.config_hash], 1)
            yield info
            scripts = GaugeMetricFamily("scriptsftp_script_info", "Each bound script's running version "
                                        "(always 1).", labels=["node", "script", "sha256"])
            for s in d.engine.scripts_info():
                if s.get("sha256"):
                    scripts.add_metric([node, s["name"], s["sha256"]], 1)
            yield scripts

        health = d.engine.worker_health() or {}
        if health:
            workers = GaugeMetricFamily("scriptsftp_workers", "Script worker processes by state.", labels=["state"])
            for state in ("alive", "idle", "busy", "starting"):
                workers.add_metric([state], health.get(state, 0))
            yield workers
            yield CounterMetricFamily("scriptsftp_worker_restarts", "Script workers replaced (crash, limit, "
                                      "timeout or call budget).", value=health.get("restarts", 0))
        yield CounterMetricFamily("scriptsftp_async_dropped", "Async post-event calls dropped because "
                                  "the queue was full.", value=d.engine.dropped_calls())

        try:  # the outbox's database may fail: metrics never do
            ob: dict[str, Any] = d.engine.outbox_stats() or {}
        except Exception as exc:  # noqa: BLE001
            log.warning("metrics: outbox stats failed: %s", exc)
            ob = {}
        pending = _number(ob.get("pending"))
        failed = _number(ob.get("failed"))
        yield GaugeMetricFamily("scriptsftp_notifications_pending", "Notifications (email, webhook) waiting "
                                "for delivery or a retry.", value=pending or 0)
        yield GaugeMetricFamily("scriptsftp_notifications_failed", "Notifications in the outbox given up "
                                "after their last retry.", value=failed or 0)

        defender = getattr(d, "defender", None)
        bans: list[Any] = []
        if defender is not None:
            try:
                bans = list(defender.bans())
            except Exception as exc:  # noqa: BLE001
                log.warning("metrics: defender.bans() failed: %s", exc)
        yield GaugeMetricFamily("scriptsftp_bans", "Source addresses banned right now.", value=len(bans))
        for key, value in _stats(defender).items() if defender is not None else ():
            v = _number(value)
            if v is None or not key.replace("_", "").isalnum():
                continue
            if key in _DEFENDER_GAUGES:
                yield GaugeMetricFamily(f"scriptsftp_defender_{key}", f"Defender: {key}.", value=v)
            else:
                yield CounterMetricFamily(f"scriptsftp_defender_{key}", f"Defender: {key} since start.", value=v)

        audit = getattr(d, "audit", None)
        if audit is not None:
            st = audit.stats()
            yield GaugeMetricFamily("scriptsftp_audit_queue", "Audit records waiting to be written.",
                                    value=st.get("queued", 0))
            yield CounterMetricFamily("scriptsftp_audit_written", "Audit records written.",
                                      value=st.get("written", 0))


def install(daemon: Any) -> None:
    """Add the daemon's state to the registry (once per process; the admin listener calls it)."""
    global _installed
    if _installed is None:
        _installed = DaemonCollector(daemon)
        REGISTRY.register(_installed)
    else:
        _installed.daemon = daemon


_installed: DaemonCollector | None = None


def exposition() -> tuple[bytes, str]:
    """The text format Prometheus scrapes, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
