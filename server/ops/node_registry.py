"""The node registry: with ``[cluster] database``, each node publishes what it runs in the
shared table ``cluster_nodes`` (docs/cluster.md, "Which nodes run what"), so that any node's
``/api/status`` and ``scriptsftp cluster status`` (even with the local daemon down) show every
node, whether it is alive, and where the nodes differ.

Alive is judged by the database's clock, never a node's: each node stamps its heartbeat with
PostgreSQL's ``clock_timestamp()`` every :data:`HEARTBEAT` seconds, and a reader compares the
stamp with the same clock. A node whose heartbeat is older than :data:`DOWN_AFTER` is down,
whatever the clocks of the machines say. The heartbeat also carries what may change while a
node runs (a reload's config hash and scripts, a drain), so a change shows within one beat.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from scriptsftp.server.contract.state import Cursor
from scriptsftp.server.stores.sql import PostgresDatabase
from scriptsftp.server.stores.state import STATE_TIMEOUT, migrate

log = logging.getLogger("scriptsftp.cluster")

#: seconds between two heartbeats of a node
HEARTBEAT = 2.0
#: seconds without a heartbeat after which a node shows as down (several missed beats: a
#: busy database or a slow machine does not make a live node flap)
DOWN_AFTER = 10.0
#: seconds between two log lines about a heartbeat that cannot be written
_COMPLAINT_EVERY = 60.0

MIGRATIONS = [
    (1, ["""CREATE TABLE IF NOT EXISTS cluster_nodes (
            name TEXT PRIMARY KEY,
            version TEXT NOT NULL,
            config_hash TEXT NOT NULL,
            script_hashes TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            heartbeat DOUBLE PRECISION NOT NULL,
            draining BOOLEAN NOT NULL,
            listeners TEXT NOT NULL)"""]),
]

#: the database's clock, in Unix seconds
_NOW = "CAST(extract(epoch FROM clock_timestamp()) AS DOUBLE PRECISION)"


@dataclass(frozen=True)
class NodeReport:
    """What one node publishes about itself."""

    name: str
    version: str
    config_hash: str
    script_hashes: dict[str, str]
    started_at: float
    draining: bool
    #: [{"name": "sftp", "bound": ["127.0.0.1:2222"]}, …]
    listeners: list[dict[str, Any]] = field(default_factory=list)


class NodeRegistry:
    """The shared ``cluster_nodes`` table, for the heartbeat and for the readers."""

    def __init__(self, url: str) -> None:
        self.db = PostgresDatabase(url, max_connections=2, timeout=STATE_TIMEOUT, name="scriptsftp-nodes")
        try:
            migrate(self.db, "nodes", MIGRATIONS)
        except BaseException:
            self.db.close()
            raise

    def publish(self, report: NodeReport) -> None:
        """This node's row, its heartbeat stamped now by the database's clock."""
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO cluster_nodes (name, version, config_hash, script_hashes, started_at, heartbeat, "
                f"draining, listeners) VALUES (?, ?, ?, ?, ?, {_NOW}, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "version = excluded.version, config_hash = excluded.config_hash, "
                "script_hashes = excluded.script_hashes, started_at = excluded.started_at, "
                "heartbeat = excluded.heartbeat, draining = excluded.draining, listeners = excluded.listeners",
                (report.name, report.version, report.config_hash, json.dumps(report.script_hashes, sort_keys=True),
                 report.started_at, report.draining, json.dumps(report.listeners)))

    def nodes(self) -> list[dict[str, Any]]:
        """Every node that ever published, by name, each with ``heartbeat_age`` (seconds, by
        the database's clock)."""
        with self.db.read() as cur:
            return _rows(cur)

    def close(self) -> None:
        self.db.close()


def _rows(cur: Cursor) -> list[dict[str, Any]]:
    rows = cur.execute(
        f"SELECT name, version, config_hash, script_hashes, started_at, {_NOW} - heartbeat, draining, listeners "
        "FROM cluster_nodes ORDER BY name").fetchall()
    return [{"node": r[0], "version": r[1], "config_hash": r[2], "script_hashes": json.loads(r[3]),
             "started_at": r[4], "heartbeat_age": round(max(0.0, float(r[5])), 1), "draining": bool(r[6]),
             "listeners": json.loads(r[7])} for r in rows]


def cluster_view(rows: list[dict[str, Any]], down_after: float = DOWN_AFTER) -> dict[str, Any]:
    """The cluster as ``/api/status`` ``cluster`` and ``scriptsftp cluster status --json``
    show it: every node with ``alive``, and the drift among the **alive** nodes (a down node's
    row is what it ran when it stopped, not what it runs): which versions, which config
    hashes (each with its nodes), which script differs on which node (``null``: the node
    does not run it). ``ok``: every node alive and no drift."""
    nodes = [{**r, "alive": r["heartbeat_age"] <= down_after} for r in rows]
    alive = [n for n in nodes if n["alive"]]

    def groups(key: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in alive:
            out.setdefault(n[key], []).append(n["node"])
        return out

    versions, configs = groups("version"), groups("config_hash")
    names = sorted({s for n in alive for s in n["script_hashes"]})
    scripts = {}
    for s in names:
        by_node = {n["node"]: n["script_hashes"].get(s) for n in alive}
        if len(set(by_node.values())) > 1:
            scripts[s] = by_node
    drift = {
        "versions": versions if len(versions) > 1 else {},
        "config_hashes": configs if len(configs) > 1 else {},
        "scripts": scripts,
    }
    down = [n["node"] for n in nodes if not n["alive"]]
    return {"nodes": nodes, "down": down, "down_after": down_after, "drift": drift,
            "ok": not down and not any(drift.values())}


class Heartbeat:
    """This node's heartbeat: a thread that publishes ``report()`` every :data:`HEARTBEAT`
    seconds. A failed beat (the database away) is logged at most once a minute and tried
    again at the next one; the node serves on, and shows as down elsewhere meanwhile."""

    def __init__(self, registry: NodeRegistry, report: Callable[[], NodeReport], every: float = HEARTBEAT) -> None:
        self.registry = registry
        self._report = report
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-heartbeat", daemon=True)
        self._complained = 0.0

    def start(self) -> None:
        self.beat()  # published before "ready": a reader sees the node as soon as it serves
        self._thread.start()

    def beat(self) -> None:
        try:
            self.registry.publish(self._report())
        except Exception as exc:  # noqa: BLE001  (the database away, or anything else: the node serves on)
            now = time.monotonic()
            if now - self._complained >= _COMPLAINT_EVERY:
                self._complained = now
                log.warning("cluster: cannot publish this node's heartbeat: %s", " ".join(str(exc).split()))

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


__all__ = ["DOWN_AFTER", "HEARTBEAT", "Heartbeat", "NodeRegistry", "NodeReport", "cluster_view"]
