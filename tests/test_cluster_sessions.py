"""Sessions and per-user limits across the nodes of a cluster (docs/cluster.md "Sessions and
per-user limits"): two real daemons sharing one real PostgreSQL database.

- Each node's sessions appear, with their node, in the list of either node (API and CLI);
  a kick sent to node A's admin API ends a session node B holds, and its client sees it closed.
- A user's ``max_sessions`` counts their sessions on every node: two on A refuse a third on B
  (a login, and an SSH channel beyond a connection's first), which gets in once one ends.
- Two nodes racing for a user's last slot admit exactly one login, round after round.
- A node killed with SIGKILL holds its users' slots only until its heartbeat expires.
- A quota counted in the shared account database holds across nodes.
- While PostgreSQL is down a node counts its logins alone; its rows follow once it is back.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from adminkit import TOKEN, admin_toml, call, get, token_hash, wait_for  # noqa: F401 (a fixture)
from conftest import BIN, Daemon, DaemonFactory, accounts_toml
from test_cluster import cluster_toml, two_nodes  # noqa: F401 (a fixture)
from test_cluster_state import own_pg  # noqa: F401 (a fixture)

from scriptsftp.server.stores.cluster_sessions import EXPIRY


def _users(factory: DaemonFactory, max_sessions: int) -> str:
    return factory.default_users().replace('home = "homes/alice"',
                                           f'home = "homes/alice"\nmax_sessions = {max_sessions}', 1)


def _start(two_nodes: list[DaemonFactory], pg_dsn: str, token_hash: str, *, max_sessions: int = 0,
           extra: str = "") -> list[Daemon]:
    nodes = []
    for name, factory in zip(("node-a", "node-b"), two_nodes):
        users = _users(factory, max_sessions) if max_sessions else None
        nodes.append(factory.start(admin_toml(token_hash) + cluster_toml(name, pg_dsn) + extra, users=users))
    return nodes


def _login(d: Daemon, factory: DaemonFactory, user: str = "alice") -> paramiko.Transport:
    t = paramiko.Transport(("127.0.0.1", d.port))
    try:
        t.start_client(timeout=20)
        t.auth_publickey(user, paramiko.PKey.from_path(str((factory.alice_key if user == "alice"
                                                            else factory.bob_key).private)))
    except BaseException:
        t.close()
        raise
    return t


def _refused(d: Daemon, factory: DaemonFactory) -> bool:
    """Whether a login of alice on ``d`` is refused (closing it if it got in)."""
    try:
        t = _login(d, factory)
    except paramiko.AuthenticationException:
        return True
    t.close()
    return False


def _alice_rows(d: Daemon) -> list[dict]:
    return [s for s in get(d, "/api/sessions") if s["user"] == "alice"]


def _cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = d.config.with_name("cli.toml")  # the CLI reaches the port the node bound
    cfg.write_text(d.config.read_text().replace('listen = "127.0.0.1:0"\ntoken_hash',
                                                f'listen = "127.0.0.1:{d.ports["admin"]}"\ntoken_hash'))
    return subprocess.run([str(BIN), *args, "-c", str(cfg)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SCRIPTSFTP_ADMIN_TOKEN": TOKEN})


def test_both_nodes_sessions_in_one_list_and_a_kick_from_a_ends_a_session_on_b(
        two_nodes: list[DaemonFactory], pg_dsn: str, token_hash: str):
    a, b = _start(two_nodes, pg_dsn, token_hash)
    on_a, on_b = _login(a, two_nodes[0], "alice"), _login(b, two_nodes[1], "bob")
    try:
        sftp_b = paramiko.SFTPClient.from_transport(on_b)
        assert sftp_b.listdir("/") is not None
        for d in (a, b):  # either node lists both, each with its node
            wait_for(lambda d=d: {(r["user"], r["node"]) for r in get(d, "/api/sessions") if r["user"]}
                     == {("alice", "node-a"), ("bob", "node-b")}, what="both nodes' sessions in one list")
        proc = _cli(b, "sessions")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert any("node-a" in x and " alice " in x for x in lines), proc.stdout
        assert any("node-b" in x and " bob " in x for x in lines), proc.stdout

        (bob,) = [r for r in get(a, "/api/sessions") if r["user"] == "bob"]
        t0 = time.monotonic()
        status, body, _ = call(a, "DELETE", f"/api/sessions/{bob['id']}")
        assert status == 200 and body == {"kicked": bob["id"], "user": "bob", "node": "node-b", "pending": False}, body
        deadline = t0 + 10
        while on_b.is_active():  # the client sees its connection closed
            assert time.monotonic() < deadline, "node B never closed the session node A kicked"
            time.sleep(0.02)
        took = time.monotonic() - t0
        print(f"remote kick: the client saw its connection closed {took:.2f}s after the request")
        assert took < 1.5, f"the kick took {took:.2f}s to end the session on the other node"
        with pytest.raises((EOFError, OSError, paramiko.SSHException)):
            sftp_b.listdir("/")
        b.wait_log(r"session closed by an administrator on another node")
        assert on_a.is_active()  # the other session is left alone
        assert [r["node"] for r in get(a, "/api/sessions") if r["user"] == "alice"] == ["node-a"]
        wait_for(lambda: all(r["user"] != "bob" for r in get(a, "/api/sessions")), what="bob gone from A's list")
        # an unknown id is still a 404, on a cluster too, whatever it holds
        for sid in ("0123456789ab", "x'%3B%20DROP%20TABLE%20cluster_sessions%3B--", "%25", "a" * 300):
            status, body, _ = call(a, "DELETE", f"/api/sessions/{sid}")
            assert status == 404, (sid, body)
        # the CLI on B kicks alice's session on A
        (alice,) = [r for r in get(b, "/api/sessions") if r["user"] == "alice"]
        proc = _cli(b, "kick", alice["id"])
        assert proc.returncode == 0 and proc.stdout.strip() == f"closed session {alice['id']} of alice on node-a", proc
        wait_for(lambda: not on_a.is_active(), what="node A to close alice's session")
    finally:
        on_a.close()
        on_b.close()


def test_max_sessions_counts_the_sessions_of_every_node(two_nodes: list[DaemonFactory], pg_dsn: str,
                                                       token_hash: str):
    a, b = _start(two_nodes, pg_dsn, token_hash, max_sessions=2)
    held = [_login(a, two_nodes[0]) for _ in range(2)]
    try:
        assert _refused(b, two_nodes[1]), "node B admitted a third session of a user limited to 2"
        b.wait_log(r"login failed for 'alice' .*too many sessions for this user \(limit 2\)")
        held.pop().close()  # one ends on A: B admits the next login (once A has seen the disconnect)
        deadline = time.monotonic() + 20
        while True:
            try:
                on_b = _login(b, two_nodes[1])
                break
            except paramiko.AuthenticationException:
                assert time.monotonic() < deadline, "node B still refuses after one of A's sessions ended"
                time.sleep(0.1)
        held.append(on_b)
        # one connection on each node: a second SSH channel on B's is a third session
        first = paramiko.SFTPClient.from_transport(on_b)
        assert first.listdir("/") is not None
        with pytest.raises((paramiko.SSHException, EOFError, OSError)):
            paramiko.SFTPClient.from_transport(on_b)
        b.wait_log(r"session refused: too many sessions for this user \(limit 2\)")
        assert _refused(a, two_nodes[0])
        assert first.listdir("/") is not None  # the refusals cost the open session nothing
    finally:
        for t in held:
            t.close()


def test_two_nodes_racing_for_the_last_slot_admit_exactly_one(two_nodes: list[DaemonFactory], pg_dsn: str,
                                                             token_hash: str):
    a, b = _start(two_nodes, pg_dsn, token_hash, max_sessions=1)
    for round_ in range(6):
        transports = []
        for d in (a, b):  # handshakes first: the race is between the two login decisions
            t = paramiko.Transport(("127.0.0.1", d.port))
            t.start_client(timeout=20)
            transports.append(t)
        barrier = threading.Barrier(2)
        admitted: list[bool] = [False, False]

        def login(i: int) -> None:
            barrier.wait(timeout=30)
            try:
                transports[i].auth_publickey("alice", paramiko.PKey.from_path(str(two_nodes[i].alice_key.private)))
                admitted[i] = True
            except paramiko.AuthenticationException:
                pass

        threads = [threading.Thread(target=login, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        try:
            assert admitted.count(True) == 1, f"round {round_}: admitted {admitted}"
        finally:
            for t in transports:
                t.close()
        wait_for(lambda: not _alice_rows(a) and not _alice_rows(b), what="the slot freed on both nodes")


def test_a_killed_nodes_sessions_stop_counting_once_its_heartbeat_expires(
        two_nodes: list[DaemonFactory], pg_dsn: str, token_hash: str):
    a, b = _start(two_nodes, pg_dsn, token_hash, max_sessions=1)
    held = _login(b, two_nodes[1])
    try:
        wait_for(lambda: [r for r in _alice_rows(a) if r["node"] == "node-b"], what="B's session on A's list")
        b.kill()  # SIGKILL: no goodbye, its row stays
        killed = time.monotonic()
        assert _refused(a, two_nodes[0]), "A admitted alice at once: a dead node's session must count until it expires"
        deadline = killed + EXPIRY + 30
        while _refused(a, two_nodes[0]):
            assert time.monotonic() < deadline, "the dead node's session still counts"
            time.sleep(0.2)
        took = time.monotonic() - killed
        # its last beat came at most a beat and a poll before the kill
        assert took > EXPIRY - 2.5, f"admitted {took:.1f}s after the kill, before the heartbeat expired"
        assert not [r for r in get(a, "/api/sessions") if r["node"] == "node-b"]  # nor listed any more
    finally:
        held.close()


def test_a_quota_holds_across_nodes(two_nodes: list[DaemonFactory], pg_dsn: str, token_hash: str):
    """The ledger is the account database's (here PostgreSQL, both nodes'): what one node
    published counts on the other, and a delete on one makes room on the other."""
    nodes = []
    for name, factory in zip(("node-a", "node-b"), two_nodes):
        users = factory.default_users().replace('home = "homes/alice"', 'home = "homes/alice"\nquota_size = 10000', 1)
        nodes.append(factory.start(admin_toml(token_hash) + cluster_toml(name, pg_dsn) + accounts_toml(pg_dsn),
                                   users=users))
    a, b = nodes
    ta, tb = _login(a, two_nodes[0]), _login(b, two_nodes[1])
    try:
        sa, sb = paramiko.SFTPClient.from_transport(ta), paramiko.SFTPClient.from_transport(tb)
        with sa.open("/six.bin", "wb") as f:
            f.write(b"a" * 6000)
        with pytest.raises(IOError, match="quota exceeded"):  # 6,000 of 10,000 used, counted by A
            with sb.open("/six.bin", "wb") as f:
                f.write(b"b" * 6000)
        assert not (b.home("alice") / "six.bin").exists()
        with sb.open("/four.bin", "wb") as f:  # what is left fits
            f.write(b"b" * 4000)
        with pytest.raises(IOError, match="quota exceeded"):  # full: A refuses too
            with sa.open("/one.bin", "wb") as f:
                f.write(b"a")
        sa.remove("/six.bin")  # A frees 6,000: B may use them
        with sb.open("/five.bin", "wb") as f:
            f.write(b"b" * 5000)
    finally:
        ta.close()
        tb.close()


def test_while_postgresql_is_down_logins_are_counted_on_the_node_and_written_when_it_is_back(own_pg):
    """The node's side alone, against a PostgreSQL of the test's own that it stops: a login
    during the outage is not refused for it (None: the caller's local count decides) nor held
    for long; once the server is back the node's rows are as its connections are, and another
    node counts them."""
    from scriptsftp.server.core.connections import Connection
    from scriptsftp.server.stores.cluster_sessions import BEAT, ClusterSessions

    def conn(sid: str) -> Connection:
        return Connection(sid, "sftp", "127.0.0.1")

    a = ClusterSessions(own_pg.dsn, "a", lambda: [])
    b = ClusterSessions(own_pg.dsn, "b", lambda: [])
    a.start()
    b.start()
    try:
        first, second = conn("a-first"), conn("a-second")
        assert a.claim(first, "alice", 1) is True
        assert b.claim(conn("b-one"), "alice", 1) is False  # a's session counts on b
        own_pg.stop_server()
        try:
            t0 = time.monotonic()
            while a.claim(second, "bob", 1) is not None:  # until a notices
                assert time.monotonic() - t0 < 30, "the outage was never noticed"
                a.release(second)
            assert a.down
            a.release(first)  # alice's session ends while the database is away
            t1 = time.monotonic()
            assert a.claim(conn("a-third"), "carol", 1) is None and time.monotonic() - t1 < 0.5  # no wait now
        finally:
            own_pg.start_server()
        wait_for(lambda: not a.down, timeout=30 + BEAT, what="node a to see the database back")
        # bob's login during the outage now counts on b; alice's ended one no longer does
        wait_for(lambda: b.claim(conn("b-bob"), "bob", 1) is False, timeout=30, what="bob's row written")
        assert b.claim(conn("b-alice"), "alice", 1) is True
    finally:
        b.close()
        a.close()
