"""Two daemons sharing one PostgreSQL outbox deliver webhooks to a real HTTP receiver that
counts them by ``X-Scriptsftp-Delivery`` (docs/cluster.md, "Notifications"):

- 200 webhooks queued by scripts on both nodes: each id received exactly once.
- One node SIGKILLed with a delivery in flight (the receiver never answers it): all 200 ids
  received; the only duplicates are the ones in flight on the killed node, with an id already
  seen; what the dead node had claimed is delivered by the survivor once its lease ran out.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import psycopg

from adminkit import admin_toml, get, token_hash  # noqa: F401 (a fixture)
from conftest import DaemonFactory, sftp_batch, toml_str
from test_cluster import cluster_toml, two_nodes  # noqa: F401 (a fixture)
from test_cluster_state import own_pg  # noqa: F401 (a fixture)
from test_cluster_outbox import CountingReceiver, wait_for
from test_scripting import binding, write_script

NOTIFY = """
def on_post_mkdir(event, api):
    api.notify.webhook("hook", {"path": event.path})
"""


def notify_toml(node: str, port: int, *, timeout: float, lease: float) -> str:
    return f"""
[notify]
lease = {lease}
retry_delay = 1

[notify.smtp]
timeout = 2

[notify.webhooks.hook]
url = "http://127.0.0.1:{port}/hook"
timeout = {timeout}
headers = {{ "X-Node" = {toml_str(node)} }}
"""


def start_nodes(two_nodes: list[DaemonFactory], pg_dsn: str, port: int, *, timeout: float, lease: float):
    nodes = []
    for name, factory in zip(("a", "b"), two_nodes):
        write_script(factory, "notify.py", NOTIFY)
        nodes.append(factory.start(binding("post-mkdir", "notify.py", allow=["notify"])
                                   + notify_toml(name, port, timeout=timeout, lease=lease)
                                   + cluster_toml(name, pg_dsn)))
    return nodes


def mkdirs(nodes, alice_key, per_node: int) -> None:
    """``per_node`` post-mkdir events on each node at once, one webhook queued by each."""
    failures: list[str] = []

    def client(i: int) -> None:
        proc = sftp_batch(nodes[i], "".join(f"mkdir /n{i}-{j}\n" for j in range(per_node)), alice_key, timeout=300)
        if proc.returncode != 0:
            failures.append(proc.stderr)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def rows(dsn: str, sql: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return list(conn.execute(sql).fetchall())


def test_200_webhooks_from_two_nodes_are_each_received_once(two_nodes: list[DaemonFactory], pg_dsn: str,
                                                             alice_key):
    hook = CountingReceiver().start()
    try:
        nodes = start_nodes(two_nodes, pg_dsn, hook.port, timeout=10, lease=30)
        t0 = time.monotonic()
        mkdirs(nodes, alice_key, 100)
        wait_for(lambda: rows(pg_dsn, "SELECT COUNT(*) FROM outbox WHERE status = 'delivered'")[0][0] == 200, 120,
                 "200 delivered")
        took = time.monotonic() - t0
        queued = {str(r[0]) for r in rows(pg_dsn, "SELECT id FROM outbox")}
        assert len(queued) == 200
        counts = Counter(hook.ids)  # every outcome is recorded: nothing more can come
        assert set(counts) == queued and set(counts.values()) == {1}, counts.most_common(3)
        senders = Counter(node for _, node, _ in hook.got)
        assert senders["a"] > 0 and senders["b"] > 0 and sum(senders.values()) == 200, senders
        print(f"200 webhooks queued and delivered in {took:.1f}s; sent by {dict(senders)}")
        for factory in two_nodes:  # the outbox is the shared one
            assert not (factory.root / "state" / "outbox.sqlite3").exists()
    finally:
        hook.stop()


def test_a_node_killed_mid_delivery_duplicates_only_what_it_had_in_flight(two_nodes: list[DaemonFactory],
                                                                          pg_dsn: str, alice_key):
    # node a's POSTs are never answered: its first delivery is in flight until it is killed. The
    # webhook timeout outlasts queueing the 200 messages, so no attempt of a's times out first.
    lease = 45.0
    hook = CountingReceiver(hold=frozenset({"a"})).start()
    try:
        a, b = start_nodes(two_nodes, pg_dsn, hook.port, timeout=lease - 5, lease=lease)
        mkdirs([a, b], alice_key, 100)
        wait_for(lambda: rows(pg_dsn, "SELECT COUNT(*) FROM outbox")[0][0] == 200, 60, "200 queued")
        wait_for(lambda: hook.held, 60, "a delivery of node a in flight")
        claimed = rows(pg_dsn, "SELECT id, lease_until FROM outbox WHERE claimed_by = 'a' AND status = 'pending'")
        in_flight = set(hook.held)
        a.kill()
        assert len(in_flight) == 1  # a delivers one message at a time
        assert in_flight <= {str(i) for i, _ in claimed}
        wait_for(lambda: rows(pg_dsn, "SELECT COUNT(*) FROM outbox WHERE status = 'delivered'")[0][0] == 200,
                 lease + 90, "200 delivered after node a's lease")
        queued = {str(r[0]) for r in rows(pg_dsn, "SELECT id FROM outbox")}
        counts = Counter(hook.ids)
        assert set(counts) == queued  # every message received
        duplicates = {mid for mid, n in counts.items() if n > 1}
        assert duplicates == in_flight and all(counts[m] == 2 for m in duplicates)  # the one in flight, twice
        first_seen = {}
        for mid, node, at in hook.got:
            first_seen.setdefault(mid, (node, at))
        assert all(first_seen[m][0] == "a" for m in duplicates)  # a receiver had seen the id before
        # what a had claimed: delivered by b, once a's lease had run out (the database's clock,
        # the same machine's as the receiver's)
        by_b = {mid: at for mid, node, at in hook.got if node == "b"}
        for mid, lease_until in claimed:
            assert str(mid) in by_b, (mid, claimed)
            assert by_b[str(mid)] >= lease_until - 0.5, (mid, by_b[str(mid)], lease_until)
        assert (rows(pg_dsn, "SELECT COUNT(*) FROM outbox WHERE claimed_by = 'a'")[0][0] == 0)
        b.wait_log(r"webhook \d+ to hook delivered \(attempt 1\)")
    finally:
        hook.stop()


def test_a_node_through_a_postgresql_outage_sends_nothing_twice(daemons: DaemonFactory, own_pg,  # noqa: F811
                                                                alice_key, token_hash: str):  # noqa: F811
    down = threading.Event()

    def first_stops_postgresql(mid: str) -> None:
        if not down.is_set():
            down.set()
            own_pg.stop_server()

    hook = CountingReceiver(first_stops_postgresql).start()
    try:
        write_script(daemons, "notify.py", NOTIFY)
        d = daemons.start(admin_toml(token_hash, bindings=binding("post-mkdir", "notify.py", allow=["notify"]))
                          + notify_toml("a", hook.port, timeout=10, lease=60) + cluster_toml("a", own_pg.dsn))
        sftp_batch(d, "mkdir /before\n", alice_key, check=True)
        wait_for(down.is_set, 60, "the first delivery")
        d.wait_log(r"outbox: the outcome of webhook \d+ is not written yet", timeout=60)
        assert get(d, "/api/status")["outbox"] is None  # answers through the outage
        sftp_batch(d, "mkdir /during\n", alice_key, check=True)  # the mkdir is done; its script's notify fails
        d.wait_log(r"webhook from notify\.py not queued: the outbox's database failed", timeout=60)
        d.wait_log(r"RuntimeError: the notification outbox is unavailable", timeout=30)
        own_pg.start_server()
        wait_for(lambda: get(d, "/api/status")["outbox"] == {"pending": 0, "failed": 0, "delivered": 1}, 90,
                 "the outcome written after the outage")
        n = 0

        def queued_after() -> bool:  # the first calls may still meet the pool reconnecting
            nonlocal n
            n += 1
            sftp_batch(d, f"mkdir /after{n}\n", alice_key, check=True)
            return any(r[0] == "pending" or r[0] == "delivered" for r in
                       rows(own_pg.dsn, "SELECT status FROM outbox WHERE body LIKE '%/after%'"))

        wait_for(queued_after, 60, "a message queued after the outage")
        wait_for(lambda: hook.count() == 2, 60, "the message queued after the outage delivered")
        counts = Counter(hook.ids)
        assert sorted(counts.values()) == [1, 1], counts  # the one answered during the outage: once
        assert rows(own_pg.dsn, "SELECT COUNT(*) FROM outbox")[0][0] == 2  # none from the outage
    finally:
        hook.stop()
