"""Staging records with a lease per node (server/core/staging.py, staging_lease.py), on both
engines: what a surviving node may take over, and that two survivors never take the same.

Two ``StateStores`` stand for two nodes: on PostgreSQL each its own state_dir and one shared
database; on SQLite both on one state_dir (the file several processes of one server would
share). The daemons behind HAProxy, killed with SIGKILL, are in tests/test_cluster_kill.py."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from scriptsftp.server.contract.dispatch import NullDispatcher
from scriptsftp.server.contract.errors import Failure
from scriptsftp.server.contract.paths import STAGING_PREFIX
from scriptsftp.server.core.publish import Publisher, UploadPolicy
from scriptsftp.server.core.staging import CHECKING, UPLOADING, StagingRecords, discard_leftovers
from scriptsftp.server.core.staging_lease import LeaseKeeper
from scriptsftp.server.core.storage import LocalStorage
from scriptsftp.server.stores import StateStores

ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(params=ENGINES)
def nodes(request: pytest.FixtureRequest, tmp_path: Path):
    """node(name, lease) -> StagingRecords of that node, closed after the test."""
    dsn = ""
    if request.param == "postgresql":
        cluster = request.getfixturevalue("pg")
        dsn = cluster.new_database()
        request.addfinalizer(lambda: cluster.drop_database(dsn))
    opened: list[StagingRecords] = []

    def node(name: str, lease: float = 30.0) -> StagingRecords:
        state_dir = tmp_path / (name if dsn else "state")
        records = StagingRecords(StateStores(state_dir, database=dsn, node=name), lease=lease)
        opened.append(records)
        return records

    node.engine = request.param  # type: ignore[attr-defined]
    yield node
    for r in opened:
        r.close()


def event(path: str) -> dict:
    return {"name": "pre-publish", "session_id": "s1", "protocol": "sftp", "remote_ip": "127.0.0.1",
            "user": "alice", "path": path, "size": 3, "exists": True}


def wait_for(what, timeout: float = 20.0):
    """Poll ``what()`` until it is truthy (a lease runs out by the database's clock)."""
    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
    return value


def test_a_record_names_its_node_and_its_staging_file_says_so(nodes):
    a = nodes("node-a")
    name = a.staging_name(STAGING_PREFIX + "0123abcd")
    assert name == STAGING_PREFIX + "node-a-0123abcd"
    rid = a.add("alice", "/homes/alice", "/", name, "f.txt")
    [rec] = a.all()
    assert (rec.id, rec.node, rec.state, rec.staging_name) == (rid, "node-a", UPLOADING, name)
    a.checking(rid, event("/f.txt"))
    assert a.all()[0].state == CHECKING and a.all()[0].event == event("/f.txt")
    a.remove(rid)
    assert a.all() == []


def test_a_node_name_unfit_for_a_file_name_is_made_safe(tmp_path: Path):
    r = StagingRecords(StateStores(tmp_path, node="we/ird name"))
    try:
        assert r.staging_name(STAGING_PREFIX + "ff") == STAGING_PREFIX + "we_ird_name-ff"
    finally:
        r.close()


def test_a_live_lease_is_never_taken_and_an_expired_one_once(nodes):
    a = nodes("node-a", lease=1.0)
    b = nodes("node-b")
    up = a.add("alice", "/h", "/", STAGING_PREFIX + "node-a-1", "one")
    chk = a.add("alice", "/h", "/", STAGING_PREFIX + "node-a-2", "two")
    a.checking(chk, event("/two"))
    live = nodes("node-c").add("bob", "/h", "/", STAGING_PREFIX + "node-c-1", "three")  # lease 30 s
    taken: list = []  # node-a stopped renewing: its records run out after a second (each its own)
    wait_for(lambda: taken.extend(b.take_over()) or len(taken) == 2)
    taken.sort(key=lambda r: r.id)
    # each names the node it was taken from
    assert [(r.id, r.state, r.node) for r in taken] == [(up, UPLOADING, "node-a"), (chk, CHECKING, "node-a")]
    assert taken[1].event == event("/two")
    assert b.take_over() == []  # b renewed them by taking them; node-c's lease still runs
    owners = {r.id: r.node for r in b.all()}
    assert owners == {up: "node-b", chk: "node-b", live: "node-c"}
    # node-a comes back to life (it was frozen, not dead): its records are not its own any more
    with pytest.raises(Failure, match="taken over by another node"):
        a.checking(up, event("/one"))
    a.remove(chk)  # a no-op: node-b forgets it once settled
    assert {r.id for r in b.all()} == {up, chk, live}


def test_renewing_keeps_a_lease(nodes):
    a = nodes("node-a", lease=1.0)
    b = nodes("node-b")
    a.add("alice", "/h", "/", STAGING_PREFIX + "node-a-1", "one")
    deadline = time.monotonic() + 3.0  # three leases long, renewed every 0.2 s
    while time.monotonic() < deadline:
        assert a.renew() == 1
        assert b.take_over() == []
        time.sleep(0.2)


def test_two_survivors_never_take_the_same_record(nodes):
    dead = nodes("node-dead", lease=1.0)
    ids = {dead.add("alice", "/h", "/", f"{STAGING_PREFIX}node-dead-{i}", f"f{i}") for i in range(120)}
    survivors = [nodes("node-b"), nodes("node-c")]
    wait_for(lambda: time.sleep(1.1) or True)  # every lease ran out
    got: dict[str, list[int]] = {"node-b": [], "node-c": []}
    start = threading.Barrier(2)

    def run(s: StagingRecords) -> None:
        start.wait()
        while batch := s.take_over(limit=7):
            got[s.node].extend(r.id for r in batch)

    threads = [threading.Thread(target=run, args=(s,)) for s in survivors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not set(got["node-b"]) & set(got["node-c"])
    assert sorted(got["node-b"] + got["node-c"]) == sorted(ids)
    owners = {r.id: r.node for r in survivors[0].all()}
    assert all(owners[i] == ("node-b" if i in got["node-b"] else "node-c") for i in ids)


def test_a_restarted_node_gets_its_own_leftovers_not_anothers(nodes):
    a = nodes("node-a")
    mine = a.add("alice", "/h", "/", STAGING_PREFIX + "node-a-1", "one")
    other = nodes("node-b").add("bob", "/h", "/", STAGING_PREFIX + "node-b-1", "two")
    again = nodes("node-a")  # node-a's next run
    left = {r.id for r in again.leftovers()}
    if nodes.engine == "postgresql":
        assert left == {mine}  # node-b's upload is alive on node-b
    else:
        assert left == {mine, other}  # one state_dir, one server: every record is its leftover


def test_existing_sqlite_records_survive_the_migration(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / "staging.db") as con:  # as 0.1 wrote it: no state, no lease
        con.execute("CREATE TABLE staged (id INTEGER PRIMARY KEY, user TEXT, home TEXT, directory TEXT,"
                    " staging_name TEXT, final_name TEXT, created REAL)")
        con.execute("INSERT INTO staged VALUES (7, 'alice', '/h', '/', '.scriptsftp-part-ab', 'f', 1.0)")
    con.close()
    r = StagingRecords(StateStores(state, node="n1"))
    try:
        [rec] = r.leftovers()
        assert (rec.id, rec.user, rec.staging_name, rec.state, rec.node) == (7, "alice", ".scriptsftp-part-ab",
                                                                              UPLOADING, "n1")
        assert r.add("bob", "/h", "/", ".scriptsftp-part-n1-cd", "g") == 8
    finally:
        r.close()


def test_a_survivor_discards_an_upload_and_rechecks_a_check(nodes, tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "up.txt").write_bytes(b"old up\n")
    (home / "chk.txt").write_bytes(b"old chk\n")
    (home / f"{STAGING_PREFIX}node-a-1").write_bytes(b"half")
    (home / f"{STAGING_PREFIX}node-a-2").write_bytes(b"new chk\n")
    a = nodes("node-a", lease=1.0)
    a.add("alice", str(home), "/", STAGING_PREFIX + "node-a-1", "up.txt")
    a.checking(a.add("alice", str(home), "/", STAGING_PREFIX + "node-a-2", "chk.txt"), event("/chk.txt"))
    b = nodes("node-b", lease=5.0)
    publisher = Publisher(NullDispatcher(), b, UploadPolicy())
    keeper = LeaseKeeper(b, publisher, LocalStorage)
    try:
        assert keeper.tick() == (0, 0)  # node-a's leases still run
        settled = [0, 0]

        def tick() -> bool:
            d, r = keeper.tick()
            settled[0] += d
            settled[1] += r
            return settled[0] + settled[1] >= 2

        wait_for(tick)
        assert settled == [1, 1]
        publisher.close(20)
        wait_for(lambda: not publisher.busy())
        assert (home / "up.txt").read_bytes() == b"old up\n"  # the previous version, intact
        assert (home / "chk.txt").read_bytes() == b"new chk\n"  # checked (no binding vetoes) and published
        assert sorted(p.name for p in home.iterdir()) == ["chk.txt", "up.txt"]
        assert b.all() == []
    finally:
        publisher.close(1)


def test_discard_leftovers_removes_only_this_nodes_files(nodes, tmp_path: Path):
    if nodes.engine == "sqlite":
        pytest.skip("one state_dir: every record is this server's")
    home = tmp_path / "home"
    home.mkdir()
    for n in ("node-a-1", "node-b-1"):
        (home / f"{STAGING_PREFIX}{n}").write_bytes(b"x")
    nodes("node-a").add("alice", str(home), "/", STAGING_PREFIX + "node-a-1", "f")
    nodes("node-b").add("alice", str(home), "/", STAGING_PREFIX + "node-b-1", "g")
    assert discard_leftovers(nodes("node-a")) == 1
    assert [p.name for p in home.iterdir()] == [f"{STAGING_PREFIX}node-b-1"]


def test_with_on_restart_discard_a_survivor_discards_a_check_too(nodes, tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "chk.txt").write_bytes(b"old\n")
    (home / f"{STAGING_PREFIX}node-a-2").write_bytes(b"new\n")
    a = nodes("node-a", lease=1.0)
    a.checking(a.add("alice", str(home), "/", STAGING_PREFIX + "node-a-2", "chk.txt"), event("/chk.txt"))
    b = nodes("node-b", lease=5.0)
    publisher = Publisher(NullDispatcher(), b, UploadPolicy())
    keeper = LeaseKeeper(b, publisher, LocalStorage, recheck=False)
    try:
        settled: list = []
        wait_for(lambda: settled.append(keeper.tick()) or settled[-1] != (0, 0))
        assert settled[-1] == (1, 0)  # discarded, not rechecked
        assert sorted(p.name for p in home.iterdir()) == ["chk.txt"]
        assert (home / "chk.txt").read_bytes() == b"old\n"
        assert b.all() == []
    finally:
        publisher.close(1)
