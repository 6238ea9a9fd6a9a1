"""The state stores a cluster shares through PostgreSQL (docs/cluster.md, "What is shared"): the
script store and the defender's scores and bans, each test on both engines where both apply.

Two ``StateStores`` on one database stand for two nodes (each its own pool, its own defender
thread), as two daemons on two machines would have them; the daemons themselves are in
tests/test_cluster.py. What a node does while PostgreSQL is down runs on a cluster of its
own, stopped and started by the test."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from scriptsftp.scripting.store import MIGRATIONS as STORE_MIGRATIONS
from scriptsftp.scripting.store import ScriptStore, StoreError, StoreUnavailable
from scriptsftp.server.ops.defender import BAN_REFRESH, Defender
from scriptsftp.server.stores import StateStores
from scriptsftp.server.stores.state import StateSchemaTooNew
from scriptsftp.server.support.config import DefenderSection

ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(params=ENGINES)
def nodes(request: pytest.FixtureRequest, tmp_path: Path):
    """A function node(name) -> StateStores: on SQLite, every node on one state_dir (several
    processes of one server); on PostgreSQL, each node its own state_dir and one new database."""
    dsn = ""
    if request.param == "postgresql":
        cluster = request.getfixturevalue("pg")
        dsn = cluster.new_database()
        request.addfinalizer(lambda: cluster.drop_database(dsn))

    def node(name: str) -> StateStores:
        state_dir = tmp_path / (name if dsn else "state")
        return StateStores(state_dir, database=dsn, node=name)

    node.engine = request.param  # type: ignore[attr-defined]
    return node


def settings(**kw) -> DefenderSection:
    base = dict(threshold=4, ban_time=60.0, allow_list=[])
    base.update(kw)
    return DefenderSection(**base)


# --- the script store -------------------------------------------------------------------------


def test_store_operations_on_both_engines(nodes):
    s = ScriptStore(nodes("a"), max_keys_per_script=3)
    try:
        assert s.get("x.py", "k") == (False, None)
        s.set("x.py", "k", {"a": [1, 2.5, None, "é"]})
        assert s.get("x.py", "k") == (True, {"a": [1, 2.5, None, "é"]})
        assert s.incr("x.py", "n") == 1 and s.incr("x.py", "n", 41) == 42 and s.incr("x.py", "n", -50) == -8
        assert s.get("other.py", "n") == (False, None)  # one namespace per script
        with pytest.raises(StoreError, match="does not hold an integer"):
            s.incr("x.py", "k")
        s.set("x.py", "f", 1.5)
        with pytest.raises(StoreError, match="does not hold an integer"):
            s.incr("x.py", "f")
        with pytest.raises(StoreError, match="store of this script is full"):
            s.incr("x.py", "new")
        with pytest.raises(StoreError, match="store of this script is full"):
            s.set("x.py", "new", 1)
        assert s.keys("x.py") == ["f", "k", "n"]
        assert s.delete("x.py", "f") and not s.delete("x.py", "f")
        s.set("x.py", "big", 2**63 - 2)
        assert s.incr("x.py", "big") == 2**63 - 1
        with pytest.raises(StoreError, match="does not fit in 64 bits"):
            s.incr("x.py", "big")
        assert s.get("x.py", "big") == (True, 2**63 - 1)  # a refused incr changed nothing
        s.set("x.py", "big", -(2**63))
        with pytest.raises(StoreError, match="does not fit in 64 bits"):
            s.incr("x.py", "big", -1)
        with pytest.raises(StoreError, match="must be an int"):
            s.incr("x.py", "n", 1.0)
    finally:
        s.close()


def test_incr_is_exact_across_nodes(nodes):
    """Two nodes, eight threads each, 2,000 increments of one key: 2,000 (and every value
    handed out once)."""
    stores = [ScriptStore(nodes("a")), ScriptStore(nodes("b"))]
    seen: list[int] = []
    lock = threading.Lock()

    def bump(store: ScriptStore) -> None:
        mine = [store.incr("count.py", "n") for _ in range(125)]
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=bump, args=(stores[i % 2],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert stores[0].get("count.py", "n") == (True, 2000)
        assert stores[1].get("count.py", "n") == (True, 2000)
        assert sorted(seen) == list(range(1, 2001))
    finally:
        for s in stores:
            s.close()


def test_key_quota_holds_across_nodes(nodes):
    """Two nodes adding new keys at once never take the script past its quota."""
    stores = [ScriptStore(nodes("a"), max_keys_per_script=50), ScriptStore(nodes("b"), max_keys_per_script=50)]
    refused = []

    def add(i: int) -> None:
        for j in range(40):
            try:
                stores[i].incr("q.py", f"k{i}-{j}")
            except StoreError:
                refused.append((i, j))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(stores[0].keys("q.py")) == 50 and len(refused) == 30
    finally:
        for s in stores:
            s.close()


def test_existing_sqlite_store_keeps_its_data(tmp_path: Path):
    """A script store written before the stores had versions opens with its keys, and is
    marked with its schema version; a schema newer than this scriptsftp's is refused."""
    path = tmp_path / "script-store.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE script_kv (ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, "
                      "updated REAL NOT NULL, PRIMARY KEY (ns, key)) WITHOUT ROWID;"
                      "INSERT INTO script_kv VALUES ('x.py', 'n', '41', 0);")
    old.commit()
    old.close()
    s = ScriptStore(StateStores(tmp_path))
    assert s.incr("x.py", "n") == 42
    s.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM state_schema WHERE store = 'script-store'").fetchone() == (1,)
    db.execute("UPDATE state_schema SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StateSchemaTooNew, match="newer than this scriptsftp's 1: upgrade scriptsftp"):
        StateStores(tmp_path).database("script-store", STORE_MIGRATIONS)


# --- the defender -----------------------------------------------------------------------------


def wait_for(cond, timeout: float) -> float:
    """Seconds until cond() held; fails after timeout."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"not within {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - t0


def test_a_ban_on_one_node_refuses_on_the_other_within_a_second(nodes):
    a, b = Defender(nodes("a"), settings()), Defender(nodes("b"), settings())
    try:
        assert b.admit("192.0.2.1") is None
        b.release("192.0.2.1")
        for _ in range(3):
            assert not a.record("192.0.2.1", "login_failed")
        assert a.record("192.0.2.1", "login_failed")
        assert a.is_banned("192.0.2.1")  # at once on the node that banned
        took = wait_for(lambda: b.is_banned("192.0.2.1"), 1.0)
        assert took <= BAN_REFRESH + 0.3
        refusal = b.admit("192.0.2.1")
        assert refusal is not None and refusal.kind == "banned"
        assert [x["ip"] for x in b.bans()] == ["192.0.2.1"]
        # lifted on b (scriptsftp unban on any node): a admits again within a second
        assert b.unban("192.0.2.1")
        wait_for(lambda: not a.is_banned("192.0.2.1"), 1.0)
    finally:
        a.close()
        b.close()


def test_scores_add_up_over_the_nodes(nodes):
    """An address spreading its failures over two nodes is banned at the same threshold,
    once (one ban row, ban #1), whichever node's failure crossed it."""
    a, b = Defender(nodes("a"), settings()), Defender(nodes("b"), settings())
    try:
        assert not a.record("192.0.2.7", "login_failed") and not b.record("192.0.2.7", "login_failed")
        assert not a.record("192.0.2.7", "login_failed")
        assert a.host_info("192.0.2.7").score == 3 == b.host_info("192.0.2.7").score
        assert b.record("192.0.2.7", "login_failed")
        (ban,) = a.bans()
        assert ban["ban_count"] == 1 and ban["score"] == 4
        assert not a.record("192.0.2.7", "login_failed")  # banned already: no second ban
    finally:
        a.close()
        b.close()


def test_concurrent_scores_make_one_ban(nodes):
    a, b = Defender(nodes("a"), settings(threshold=20)), Defender(nodes("b"), settings(threshold=20))
    banned = []

    def hit(d: Defender) -> None:
        for _ in range(30):
            if d.record("192.0.2.8", "login_failed"):
                banned.append(d)

    threads = [threading.Thread(target=hit, args=(d,)) for d in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(banned) == 1 and a.bans()[0]["ban_count"] == 1
    finally:
        a.close()
        b.close()


def test_password_locks_are_shared(nodes):
    s = settings(user_max_failures=3, user_lock_time=60.0)
    a, b = Defender(nodes("a"), s), Defender(nodes("b"), s)
    try:
        assert not a.record_user_failure("alice", "192.0.2.1") and not b.record_user_failure("alice", "192.0.2.2")
        assert a.record_user_failure("alice", "192.0.2.3")
        assert b.user_locked_until("alice", "192.0.2.4") > time.time()
        assert b.unban("user:alice") and not a.user_locked_until("alice", "192.0.2.4")
    finally:
        a.close()
        b.close()


# --- PostgreSQL down --------------------------------------------------------------------------


@pytest.fixture
def own_pg():
    """A cluster of this test's own, which it may stop (the session's is shared)."""
    from pgkit import PgCluster, PostgresMissing, find_bindir

    try:
        bindir = find_bindir()
    except PostgresMissing as exc:
        pytest.skip(str(exc))
    cluster = PgCluster.start(bindir)
    yield cluster
    cluster.stop()


def test_while_postgresql_is_down(own_pg, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """The script store fails each call with a clear error, within a few seconds; the
    defender keeps every ban it knew, bans on its own node what it scores meanwhile, and
    refuses nobody else; all of it comes back with the server."""
    node = StateStores(tmp_path / "a", database=own_pg.dsn, node="a")
    store = ScriptStore(node)
    d = Defender(node, settings(threshold=2, user_max_failures=2))
    try:
        assert store.incr("x.py", "n") == 1
        d.record("192.0.2.1", "login_failed")
        assert d.record("192.0.2.1", "login_failed")
        own_pg.stop_server()

        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="the script store is unavailable"):
            store.incr("x.py", "n")
        assert time.monotonic() - t0 < 10
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.get("x.py", "n")
        assert time.monotonic() - t0 < 4  # the next ones: no longer than the outage timeout

        time.sleep(BAN_REFRESH * 3)  # refreshes fail meanwhile
        assert d.is_banned("192.0.2.1")  # the ban known stays in force
        assert d.admit("192.0.2.50") is None  # nobody else is refused
        d.release("192.0.2.50")
        assert not d.record("192.0.2.2", "login_failed")
        assert d.record("192.0.2.2", "login_failed")  # banned on this node only
        assert d.is_banned("192.0.2.2")
        assert "on this node only" in caplog.text
        assert d.user_locked_until("alice", "192.0.2.3") == 0.0  # password locks: not enforced, logged
        assert "password locks not read" in caplog.text

        own_pg.start_server()
        wait_for(lambda: _works(store), 15)
        assert store.get("x.py", "n") == (True, 1)  # the failed incr did nothing
        time.sleep(BAN_REFRESH * 2)
        assert d.is_banned("192.0.2.1")
        assert d.is_banned("192.0.2.2")  # this node's own ban runs its course
    finally:
        store.close()
        d.close()


def _works(store: ScriptStore) -> bool:
    try:
        store.get("x.py", "n")
        return True
    except StoreUnavailable:
        time.sleep(0.2)
        return False


# --- the audit trail --------------------------------------------------------------------------


def _record(trail, i: int, **kw) -> None:
    from scriptsftp.server.ops.audit import new_event_id

    data = {"name": "post-mkdir", "time": time.time(), "session_id": f"s{i}", "protocol": "sftp",
            "remote_ip": "192.0.2.1", "user": "alice", "path": f"/in/{i}.csv", "target": "", "size": i}
    data.update(kw)
    trail.record_event(new_event_id(), data, "done")


def test_audit_from_two_nodes_is_one_trail_with_the_node_named(nodes):
    from scriptsftp.server.ops.audit import AuditTrail

    a, b = AuditTrail(nodes("node-a")), AuditTrail(nodes("node-b"))
    try:
        for i in range(3):
            _record(a, i)
            _record(b, 10 + i, user="bob", path=f"/out/[{i}].txt")
        assert a.flush(10) and b.flush(10)
        rows = b.query(limit=100)
        if nodes.engine == "postgresql":  # one trail: each node reads the other's
            assert sorted((r["node"], r["path"]) for r in rows) == sorted(
                [("node-a", f"/in/{i}.csv") for i in range(3)] + [("node-b", f"/out/[{i}].txt") for i in range(3)])
        else:  # one state_dir: one file, each row with the node that wrote it
            assert {r["node"] for r in rows} == {"node-a", "node-b"}
        assert [r["path"] for r in a.query(user="bob", limit=2)] == ["/out/[2].txt", "/out/[1].txt"]  # newest first
        # globs as SQLite's GLOB takes them, on both engines
        assert sorted(r["path"] for r in a.query(path="/in/*.csv")) == ["/in/0.csv", "/in/1.csv", "/in/2.csv"]
        assert [r["path"] for r in a.query(path="/in/[^01].csv")] == ["/in/2.csv"]
        assert [r["path"] for r in a.query(path="/out/[[]1].txt")] == ["/out/[1].txt"]
        assert [r["path"] for r in a.query(path="/in/?.cs?")] and not a.query(path="/in/*.CSV")
        assert a.query(path="/in/1.csv")[0]["size"] == 1
    finally:
        a.close()
        b.close()


def test_audit_waits_out_a_postgresql_outage(own_pg, tmp_path: Path):
    """Records made while the shared database is away are written once it is back."""
    from scriptsftp.server.ops.audit import AuditTrail

    trail = AuditTrail(StateStores(tmp_path, database=own_pg.dsn, node="a"))
    try:
        _record(trail, 1)
        assert trail.flush(10)
        own_pg.stop_server()
        _record(trail, 2)
        assert not trail.flush(2)  # waiting in the queue
        own_pg.start_server()
        assert trail.flush(30)
        assert sorted(r["path"] for r in trail.query()) == ["/in/1.csv", "/in/2.csv"]
        assert trail.dropped == 0
    finally:
        trail.close()
