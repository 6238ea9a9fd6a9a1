"""The node registry (docs/cluster.md, "Which nodes run what"): two daemons sharing real
PostgreSQL publish themselves; ``scriptsftp cluster status`` (reading the database, not a
daemon) and ``/api/status`` ``cluster`` name a script that differs between them, a node
SIGKILLed shows as down once its heartbeat is older than DOWN_AFTER (by the database's clock),
and the command still answers with the local daemon stopped."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

from adminkit import admin_toml, get, token_hash, wait_for  # noqa: F401 (a fixture)
from conftest import BIN, DaemonFactory, paramiko_client
from test_cluster import cluster_toml, two_nodes  # noqa: F401 (a fixture)
from test_scripting import binding, write_script

from scriptsftp.server.ops.node_registry import DOWN_AFTER, HEARTBEAT

COUNT = """
def on_post_mkdir(event, api):
    api.store.incr("n")
"""


def cluster_status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), "cluster", "status", "-c", str(config), *extra], capture_output=True,
                          text=True, timeout=60)


def as_json(config: Path) -> tuple[int, dict]:
    proc = cluster_status(config, "--json")
    assert proc.returncode in (0, 1), proc
    return proc.returncode, json.loads(proc.stdout)


def test_cluster_status_names_the_drift_and_a_killed_node(two_nodes: list[DaemonFactory], pg_dsn: str,
                                                         token_hash: str):
    nodes = []
    for name, factory in zip(("node-a", "node-b"), two_nodes):
        # node-b runs another version of count.py: a half-finished rollout
        write_script(factory, "count.py", COUNT + ("# v2\n" if name == "node-b" else ""))
        nodes.append(factory.start(admin_toml(token_hash, bindings=binding("post-mkdir", "count.py",
                                                                           allow=["store"]))
                                   + cluster_toml(name, pg_dsn)))
    a, b = nodes
    sha = {name: hashlib.sha256((f.root / "scripts" / "count.py").read_bytes()).hexdigest()
           for name, f in zip(("node-a", "node-b"), two_nodes)}
    assert sha["node-a"] != sha["node-b"]

    code, view = as_json(a.config)
    assert code == 1  # drift
    assert [(n["node"], n["alive"], n["draining"]) for n in view["nodes"]] == [("node-a", True, False),
                                                                               ("node-b", True, False)]
    assert view["drift"]["scripts"] == {"count.py": sha}
    assert view["drift"]["config_hashes"] == {} and view["drift"]["versions"] == {}  # same settings, same release
    assert view["down"] == [] and view["ok"] is False
    for n, d in zip(view["nodes"], nodes):  # what each node publishes is what its own /api/status says
        status = get(d, "/api/status")
        assert (n["config_hash"], n["script_hashes"], n["version"]) == (
            status["config_hash"], status["script_hashes"], status["version"])
        assert f"127.0.0.1:{d.port}" in next(x["bound"] for x in n["listeners"] if x["name"] == "sftp")
    # the table names the script, each node with its hash
    proc = cluster_status(b.config)
    assert proc.returncode == 1, proc
    assert f"drift: script count.py: node-a {sha['node-a'][:12]}, node-b {sha['node-b'][:12]}" in proc.stdout
    assert "drift: config" not in proc.stdout and "down:" not in proc.stdout
    # /api/status on either node shows the same cluster view
    cluster = get(a, "/api/status")["cluster"]
    assert cluster["drift"]["scripts"] == {"count.py": sha} and [n["node"] for n in cluster["nodes"]] == [
        "node-a", "node-b"]

    # SIGKILL node-b: no goodbye, only its heartbeat stopping
    b.kill()
    killed = time.monotonic()
    code, view = wait_for(lambda: (lambda r: r if r[1]["down"] else None)(as_json(a.config)),
                          timeout=DOWN_AFTER + HEARTBEAT + 40, what="node-b shown as down")
    took = time.monotonic() - killed
    # down no sooner than DOWN_AFTER after its last beat (at most HEARTBEAT before the kill)
    assert took >= DOWN_AFTER - HEARTBEAT - 0.5, took
    assert code == 1 and view["down"] == ["node-b"]
    dead = next(n for n in view["nodes"] if n["node"] == "node-b")
    assert dead["alive"] is False and dead["heartbeat_age"] > DOWN_AFTER
    assert view["drift"]["scripts"] == {}  # drift is among the nodes up: node-b's row is what it ran when it died
    proc = cluster_status(a.config)
    assert proc.returncode == 1 and "node-b" in proc.stdout and "DOWN" in proc.stdout, proc
    assert "down: node-b: no heartbeat for" in proc.stdout
    status = get(a, "/api/status")["cluster"]
    assert status["down"] == ["node-b"] and [n["alive"] for n in status["nodes"]] == [True, False]

    # the local daemon stopped: the command still reads the shared database
    a.stop()
    proc = cluster_status(a.config)
    assert proc.returncode == 1 and "node-a" in proc.stdout and "down: node-b" in proc.stdout, proc


def test_cluster_status_all_alike_exits_0_and_shows_a_drain(two_nodes: list[DaemonFactory], pg_dsn: str):
    nodes = [factory.start(cluster_toml(name, pg_dsn)) for name, factory in zip(("node-a", "node-b"), two_nodes)]
    config = two_nodes[0].root / "scriptsftp.toml"
    proc = cluster_status(config)
    assert proc.returncode == 0, proc
    assert proc.stdout.rstrip().endswith("ok: 2 node(s) up, same version, config and scripts")
    assert "drift" not in proc.stdout
    # node-b drains (SIGUSR2) while a session holds it open: its next heartbeat says so
    client = paramiko_client(nodes[1], key=two_nodes[1].alice_key)
    try:
        nodes[1].proc.send_signal(signal.SIGUSR2)
        nodes[1].wait_log("draining", timeout=30)
        _, view = wait_for(lambda: (lambda r: r if r[1]["nodes"][1]["draining"] else None)(as_json(config)),
                           timeout=HEARTBEAT + 30, what="node-b shown as draining")
        assert [n["draining"] for n in view["nodes"]] == [False, True]
        assert "up,draining" in cluster_status(config).stdout
    finally:
        client.get_channel().get_transport().close()


def test_cluster_status_without_a_cluster_or_its_database(two_nodes: list[DaemonFactory]):
    path = two_nodes[0].write_config()
    proc = cluster_status(path)
    assert proc.returncode == 2 and "no [cluster] database" in proc.stderr, proc
    path = two_nodes[0].write_config(cluster_toml("node-a", "postgresql://scriptsftp:s3cret@127.0.0.1:1/x"))
    proc = cluster_status(path)
    assert proc.returncode == 6, proc
    (line,) = proc.stderr.splitlines()
    assert line.startswith("scriptsftp: [cluster] database: cannot read postgresql://scriptsftp:***@127.0.0.1:1/x: ")
    assert "s3cret" not in proc.stderr and "Traceback" not in proc.stderr


def row(node: str, *, version: str = "1.0", config: str = "c" * 64, scripts: dict | None = None,
        age: float = 1.0) -> dict:
    return {"node": node, "version": version, "config_hash": config, "script_hashes": scripts or {},
            "started_at": 0.0, "heartbeat_age": age, "draining": False, "listeners": []}


def test_the_view_names_config_and_version_drift_among_the_nodes_up_only():
    from scriptsftp.server.ops.cluster_cli import format_view
    from scriptsftp.server.ops.node_registry import cluster_view

    view = cluster_view([row("a"), row("b", config="d" * 64, version="1.1", scripts={"x.py": "e" * 64}),
                         row("c", config="f" * 64, version="0.9", age=DOWN_AFTER + 0.1)])
    assert view["down"] == ["c"] and not view["ok"]
    assert view["drift"] == {"versions": {"1.0": ["a"], "1.1": ["b"]},
                             "config_hashes": {"c" * 64: ["a"], "d" * 64: ["b"]},
                             "scripts": {"x.py": {"a": None, "b": "e" * 64}}}
    lines = format_view(view)
    assert "drift: version 1.0 on a" in lines and "drift: version 1.1 on b" in lines
    assert f"drift: config {'d' * 12} on b" in lines
    assert f"drift: script x.py: a (not run), b {'e' * 12}" in lines
    assert any(x.startswith("down: c: no heartbeat for 10.1s") for x in lines)
    assert cluster_view([row("a"), row("b")])["ok"] is True
