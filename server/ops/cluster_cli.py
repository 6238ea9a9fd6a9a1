"""``scriptsftp cluster status``: every node of the cluster, alive or not, and where they
differ, read from the node registry in ``[cluster] database`` itself (not through a daemon),
so it answers with the local daemon down, and on any machine that has a node's config.

Exit status: 0 every node alive, one version, one config hash, the same scripts; 1 a node is
down or the nodes differ (drift); 2 a bad configuration or no ``[cluster] database``; 6 the
database cannot be read.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from scriptsftp.server.ops.node_registry import DOWN_AFTER, NodeRegistry, cluster_view
from scriptsftp.server.stores.sql import redact_url
from scriptsftp.server.support.config import ConfigError, default_config_path, load_config

CONFIG_HELP = "config file (default: $SCRIPTSFTP_CONFIG, else ./conf/scriptsftp.toml)"
EXIT_OK, EXIT_DRIFT, EXIT_CONFIG, EXIT_DATABASE = 0, 1, 2, 6


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "(not run)"


def _listeners(node: dict[str, Any]) -> str:
    return " ".join(f"{x['name']}={','.join(x['bound'])}" for x in node["listeners"] if x.get("bound")) or "-"


def format_view(view: dict[str, Any]) -> list[str]:
    """The view as a table of nodes, then one line per difference (what ``cluster status`` prints)."""
    rows = [("NODE", "STATE", "VERSION", "HEARTBEAT", "CONFIG", "SCRIPTS", "UP SINCE", "LISTENERS")]
    for n in view["nodes"]:
        state = ("up" if n["alive"] else "DOWN") + (",draining" if n["draining"] else "")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(n["started_at"]))
        rows.append((n["node"], state, n["version"], f"{n['heartbeat_age']:.1f}s ago", _short(n["config_hash"]),
                     str(len(n["script_hashes"])), since, _listeners(n)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    drift = view["drift"]
    for version, nodes in sorted(drift["versions"].items()):
        lines.append(f"drift: version {version} on {', '.join(nodes)}")
    for sha, nodes in sorted(drift["config_hashes"].items()):
        lines.append(f"drift: config {_short(sha)} on {', '.join(nodes)}")
    for script, by_node in sorted(drift["scripts"].items()):
        lines.append(f"drift: script {script}: " + ", ".join(f"{node} {_short(sha)}"
                                                           for node, sha in sorted(by_node.items())))
    for n in view["nodes"]:
        if not n["alive"]:
            lines.append(f"down: {n['node']}: no heartbeat for {n['heartbeat_age']:.1f}s "
                         f"(down after {view['down_after']:.0f}s)")
    if not view["nodes"]:
        lines.append("no node has published itself in this database yet")
    elif view["ok"]:
        lines.append(f"ok: {len(view['nodes'])} node(s) up, same version, config and scripts")
    return lines


@click.group()
def cluster() -> None:
    """The nodes sharing [cluster] database."""


@cluster.command()
@click.option("-c", "--config", "config_path", help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the view as JSON (as /api/status cluster)")
def status(config_path: str | None, as_json: bool) -> None:
    """Every node, up or down (no heartbeat for 10 s), and any drift in version, config or scripts
    between the nodes up; read from the shared database (the local daemon may be down). Exit 0:
    all up and alike; 1: a node down or drift; 2: bad config or no [cluster] database; 6: the
    database cannot be read."""
    try:
        cfg = load_config(Path(config_path) if config_path else default_config_path())
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(line, err=True)
        sys.exit(EXIT_CONFIG)
    url = cfg.model.cluster.database
    if not url:
        click.echo(f"{cfg.path}: no [cluster] database: this server is not a cluster", err=True)
        sys.exit(EXIT_CONFIG)
    try:
        registry = NodeRegistry(url)
        try:
            view = cluster_view(registry.nodes(), DOWN_AFTER)
        finally:
            registry.close()
    except Exception as exc:  # noqa: BLE001  (psycopg's errors, a pool timeout, a schema too new: one line)
        click.echo(f"scriptsftp: [cluster] database: cannot read {redact_url(url)}: "
                   f"{redact_url(' '.join(str(exc).split()))}", err=True)
        sys.exit(EXIT_DATABASE)
    if as_json:
        click.echo(json.dumps(view, indent=2, sort_keys=True))
    else:
        for line in format_view(view):
            click.echo(line)
    sys.exit(EXIT_OK if view["ok"] else EXIT_DRIFT)


__all__ = ["cluster", "format_view"]
