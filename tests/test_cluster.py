"""Two daemons on one machine sharing one PostgreSQL database (``[cluster] database``), each
with its own state_dir and node name: what they share (docs/cluster.md, "What is shared").

- 1,000 events spread over both nodes, each an ``api.store.incr`` of one key: exactly 1,000.
- A client banned on node A is refused by node B within a second; ``scriptsftp unban`` on
  B's config lifts it on A.
- One audit trail: ``scriptsftp events`` on one node shows both nodes' events, each with its node.
- A node whose shared database cannot be reached does not start (one line, no password).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from adminkit import TOKEN, admin_toml, token_hash  # noqa: F401 (a fixture)
from conftest import BIN, DaemonFactory, sftp_batch, toml_str
from test_defender import LEGIT_ONLY, defender_toml, fail_password, refusal_text, transport_from
from test_scripting import binding, write_script

from scriptsftp.scripting.store import ScriptStore
from scriptsftp.server.stores import StateStores


@pytest.fixture
def two_nodes(tmp_path: Path, alice_key, bob_key, password_hashes, host_keys):
    """Two DaemonFactory, one per node, each its own root (config, state_dir, homes)."""
    factories = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        factories.append(DaemonFactory(tmp_path / name, alice_key, bob_key, password_hashes, host_keys))
    yield factories
    for f in factories:
        f.close()


def cluster_toml(node: str, dsn: str) -> str:
    return f"\n[cluster]\nnode = {toml_str(node)}\ndatabase = {toml_str(dsn)}\n"


COUNT = """
def on_post_mkdir(event, api):
    api.store.incr("n")
"""


def test_incr_from_1000_events_over_two_nodes_is_exact(two_nodes: list[DaemonFactory], pg_dsn: str, alice_key,
                                                       tmp_path: Path):
    nodes = []
    for name, factory in zip(("node-a", "node-b"), two_nodes):
        write_script(factory, "count.py", COUNT)
        nodes.append(factory.start(binding("post-mkdir", "count.py", allow=["store"]) + cluster_toml(name, pg_dsn)))
    # four clients at once, two on each node, 250 directories each: 1,000 post-mkdir events
    failures: list[str] = []

    def client(i: int) -> None:
        d = nodes[i % 2]
        proc = sftp_batch(d, "".join(f"mkdir /c{i}-{j}\n" for j in range(250)), alice_key, timeout=300)
        if proc.returncode != 0:
            failures.append(proc.stderr)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    for d in nodes:
        assert "script-error" not in d.log_text() and "count.py" not in d.log_text(), d.log_text()[-3000:]
    store = ScriptStore(StateStores(tmp_path / "reader", database=pg_dsn))
    try:
        assert store.get("count.py", "n") == (True, 1000)
    finally:
        store.close()
    for factory in two_nodes:  # the store is the shared one: no file of it in a node's state_dir
        assert not (factory.root / "state" / "script-store.sqlite3").exists()


def test_a_client_banned_on_one_node_is_refused_by_the_other_within_a_second(two_nodes: list[DaemonFactory],
                                                                            pg_dsn: str):
    # the probes (refusal_text) end their handshakes early: not scored here
    extra = defender_toml(allow_list=LEGIT_ONLY, threshold=2, score_protocol_error=0)
    a = two_nodes[0].start(extra + cluster_toml("node-a", pg_dsn))
    b = two_nodes[1].start(extra + cluster_toml("node-b", pg_dsn))
    assert "is banned until" not in refusal_text(b, "127.0.0.2")
    fail_password(a, "127.0.0.2")
    t = transport_from(a, "127.0.0.2")
    try:
        t0 = time.monotonic()  # before the failure that bans: the second counts from before the ban
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_password("alice", "wrong")
    finally:
        t.close()
    while "is banned until" not in refusal_text(b, "127.0.0.2"):
        assert time.monotonic() - t0 < 5, "node B never refused the address node A banned"
        time.sleep(0.02)
    took = time.monotonic() - t0
    assert took < 1.0, f"node B refused {took:.2f}s after node A's ban"
    a.wait_log(r"banned 127\.0\.0\.2 for 1800s \(ban #1\)")
    assert "banned 127.0.0.2" not in b.log_text()  # one ban, made by A
    # listed and lifted from node B's config: node A admits the address again within a second
    out = subprocess.run([str(BIN), "bans", "-c", str(b.config)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("127.0.0.2\t"), out
    out = subprocess.run([str(BIN), "unban", "-c", str(b.config), "127.0.0.2"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "unbanned" in out.stdout, out
    t0 = time.monotonic()
    while "is banned until" in refusal_text(a, "127.0.0.2"):
        assert time.monotonic() - t0 < 1.0, "node A still refuses a second after the unban"
        time.sleep(0.05)


def test_events_of_both_nodes_in_one_trail(two_nodes: list[DaemonFactory], pg_dsn: str, alice_key,
                                           token_hash: str):
    nodes = []
    for name, factory in zip(("node-a", "node-b"), two_nodes):
        write_script(factory, "count.py", COUNT)
        nodes.append(factory.start(admin_toml(token_hash, bindings=binding("post-mkdir", "count.py", allow=["store"]))
                                   + cluster_toml(name, pg_dsn)))
    sftp_batch(nodes[0], "mkdir /made-on-a\n", alice_key, check=True)
    sftp_batch(nodes[1], "mkdir /made-on-b\n", alice_key, check=True)
    b = nodes[1]
    cfg = b.config.with_name("cli.toml")  # the CLI reaches the port node B bound
    cfg.write_text(b.config.read_text().replace('listen = "127.0.0.1:0"\ntoken_hash',
                                                f'listen = "127.0.0.1:{b.ports["admin"]}"\ntoken_hash'))
    env = {**os.environ, "SCRIPTSFTP_ADMIN_TOKEN": TOKEN}
    deadline = time.monotonic() + 10
    while True:  # node A's writer commits its batch on its own time
        proc = subprocess.run([str(BIN), "events", "--event", "post-mkdir", "-c", str(cfg)], capture_output=True,
                              text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        if "/made-on-a" in proc.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    lines = [x for x in proc.stdout.splitlines() if " post-mkdir user=" in x]
    assert any("/made-on-a done" in x and x.endswith("node=node-a") for x in lines), proc.stdout
    assert any("/made-on-b done" in x and x.endswith("node=node-b") for x in lines), proc.stdout
    for factory in two_nodes:  # the trail is the shared one
        assert not (factory.root / "state" / "audit.sqlite3").exists()


def test_a_node_whose_database_cannot_be_reached_does_not_start(two_nodes: list[DaemonFactory]):
    path = two_nodes[0].write_config(cluster_toml("node-a", "postgresql://scriptsftp:s3cret@127.0.0.1:1/x"))
    proc = subprocess.run([str(BIN), "run", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    (line,) = [x for x in proc.stderr.splitlines() if "database" in x]  # one line (the SSH workers log theirs)
    assert "[cluster] database: cannot open postgresql://scriptsftp:***@127.0.0.1:1/x: " in line
    assert "Connection refused" in line
    assert "s3cret" not in proc.stderr and "Traceback" not in proc.stderr
