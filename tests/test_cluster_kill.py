"""kill -9 of one node of two behind HAProxy, in the middle of 40 uploads (issue 19's bar).

Two daemons on one machine share a PostgreSQL database and one homes directory (the
shared filesystem of docs/cluster.md, "Staging on shared storage"), behind one HAProxy in
TCP mode with ``send-proxy-v2`` that balances SSH, FTP and HTTP over both (an FTP node's
passive range goes to that node). 40 clients (OpenSSH sftp, curl, lftp) each overwrite a
file whose previous version is known, retrying through HAProxy when a try fails. The
``pre-publish`` binding is slow (a ``sleep`` command) and records in the shared script
store the content hash of every version it let through. Once node A holds several uploads
in ``pre-publish``, it gets SIGKILL. Then:

- every upload meant to pass completed (on retry, through the survivor) and its file is the
  new version; every upload the check rejects left the previous version, byte for byte:
  no final file is ever a truncated or mixed one;
- nothing is published unchecked: every final file's hash is the old version's or one the
  check recorded as passed;
- the uploads node A held in ``pre-publish`` were checked again by node B (its log names
  each one) and published or discarded by that check's verdict;
- no staging file and no staging record is left anywhere.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from conftest import ALICE_PASSWORD, SSH_OPTS, DaemonFactory, require_tool, toml_str
from haproxykit import HAProxy, Route, free_port, free_port_range
from test_scripting import binding, write_script

from scriptsftp.scripting.store import ScriptStore
from scriptsftp.server.contract.paths import STAGING_PREFIX
from scriptsftp.server.stores import StateStores

PROXY_BIND = "127.0.0.2"
CLIENTS = 40
PASSIVE = 8
LEASE = 3.0
DEADLINE = 50.0  # seconds every client has to get its upload through

CHECK = """
import hashlib

def on_pre_publish(event, api):
    data = api.file.read()
    digest = hashlib.sha256(data).hexdigest()
    api.run("pause")  # a slow check: some uploads are in it when their node dies
    if b"REJECT" in data:
        api.store.set("vetoed:" + digest, event.path)
        api.veto("rejected content in " + event.path)
    api.store.set("passed:" + digest, event.path)
"""


class Balanced(Route):
    """A ``listen`` section over several servers: round robin, and a connection a dead server
    refuses is sent to another one (``option redispatch``)."""

    def __init__(self, name: str, port: int, servers: list[tuple[str, int]]) -> None:
        super().__init__(name, PROXY_BIND, port, servers[0], proxy="v2")
        self.servers = servers

    def section(self) -> str:
        lines = [f"listen {self.name}", f"    bind {self.bind_host}:{self.bind_port}", "    mode tcp",
                 "    balance roundrobin", "    retries 3", "    option redispatch 1"]
        lines += [f"    server n{i} {h}:{p} send-proxy-v2" for i, (h, p) in enumerate(self.servers)]
        return "\n".join(lines) + "\n"


def users(d: DaemonFactory, home: Path) -> str:
    return f"""
[[users]]
name = "alice"
password_hash = {toml_str(d.hashes['alice'])}
public_keys = [{toml_str(d.alice_key.public_line)}]
home = {toml_str(str(home))}
permissions = {{ "/" = ["*"] }}
"""


def node_toml(name: str, dsn: str, passive: int) -> str:
    return f"""workers = 4

[cluster]
node = "{name}"
database = {toml_str(dsn)}
trusted_proxies = ["127.0.0.1/32"]
staging_lease = {LEASE}

[ftp]
enabled = true
listen = "127.0.0.1:0"
passive_ports = "{passive}-{passive + PASSIVE - 1}"
masquerade_address = "{PROXY_BIND}"

[http]
enabled = true
listen = "127.0.0.1:0"

[defender]
allow_list = ["127.0.0.0/8"]

[commands.pause]
argv = ["/bin/sleep", "1"]
""" + binding("pre-publish", "check.py", allow=["read", "store", "run"], timeout=30)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def staged_rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as con:
        return con.execute("SELECT node, state, final_name FROM staged").fetchall()


@pytest.fixture
def cluster(tmp_path: Path, pg_dsn: str, alice_key, bob_key, password_hashes, host_keys):
    for tool in ("sftp", "curl", "lftp"):
        require_tool(tool)
    shared = tmp_path / "shared" / "alice"  # the homes both nodes mount
    shared.mkdir(parents=True)
    factories, nodes = [], []
    first = free_port_range(2 * PASSIVE, hosts=("127.0.0.1", PROXY_BIND))
    try:
        for i, name in enumerate(("node-a", "node-b")):
            (tmp_path / name).mkdir()
            f = DaemonFactory(tmp_path / name, alice_key, bob_key, password_hashes, host_keys)
            factories.append(f)
            write_script(f, "check.py", CHECK)
            nodes.append(f.start(node_toml(name, pg_dsn, first + i * PASSIVE), users=users(f, shared), wait=False))
        for d in nodes:  # both start at once; generous: two daemons starting on a loaded machine
            d.wait_log(r"scriptsftp \S+ ready", timeout=120)
            for proto, port in re.findall(r"listening (\w+) on \S+:(\d+)", d.log_text()):
                d.ports.setdefault(proto, int(port))
        ports = {p: free_port(PROXY_BIND) for p in ("ssh", "ftp", "http")}
        routes: list[Route] = [
            Balanced("ssh", ports["ssh"], [("127.0.0.1", d.ports["sftp"]) for d in nodes]),
            Balanced("ftp", ports["ftp"], [("127.0.0.1", d.ports["ftp"]) for d in nodes]),
            Balanced("http", ports["http"], [("127.0.0.1", d.ports["http"]) for d in nodes]),
        ]
        for i in range(2):  # each node's passive range reaches that node only
            lo = first + i * PASSIVE
            routes.append(Route(f"ftp_data_{i}", PROXY_BIND, f"{lo}-{lo + PASSIVE - 1}", ("127.0.0.1", 0),
                                proxy="v2"))
        h = HAProxy.start(routes)
        try:
            yield nodes, ports, shared, h
        finally:
            h.stop()
    finally:
        for f in factories:
            f.close()


def upload_once(kind: str, src: Path, target: str, ports: dict[str, int], key) -> subprocess.CompletedProcess[str]:
    if kind == "sftp":
        cmd = ["sftp", "-b", "-", "-i", str(key.private), "-P", str(ports["ssh"]), *SSH_OPTS,
               f"alice@{PROXY_BIND}"]
        return subprocess.run(cmd, input=f"put {src} {target}\n", text=True, capture_output=True, timeout=40)
    if kind == "curl":
        cmd = ["curl", "-sS", "-f", "--max-time", "30", "-u", f"alice:{ALICE_PASSWORD}", "-T", str(src),
               f"http://{PROXY_BIND}:{ports['http']}{target}"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=40)
    script = (f"set ftp:ssl-allow false; set net:max-retries 1; set net:timeout 15; set cmd:fail-exit true; "
              f"open -u alice,{ALICE_PASSWORD} -p {ports['ftp']} {PROXY_BIND}; put {src} -o {target}; bye")
    return subprocess.run(["lftp", "-c", script], capture_output=True, text=True, timeout=40)


def test_kill_9_of_one_node_mid_upload_loses_nothing_and_publishes_nothing_unchecked(cluster, pg_dsn: str,
                                                                                      alice_key, tmp_path: Path):
    (a, b), ports, home, h = cluster
    kinds = ("sftp", "curl", "lftp")
    old, new, rejected = {}, {}, set()
    for i in range(CLIENTS):
        old[i] = f"old version of f{i}\n".encode() * 1000
        rejected_here = i % 8 == 7  # five uploads the check refuses
        body = f"new version of f{i} {'REJECT' if rejected_here else 'fine'}\n".encode()
        new[i] = body * (4000 + 97 * i)  # 150-400 KB: some are still arriving at the kill
        if rejected_here:
            rejected.add(i)
        (home / f"f{i}").write_bytes(old[i])
        (tmp_path / f"src{i}").write_bytes(new[i])
    done: dict[int, bool] = {}
    errors: dict[int, list[str]] = {i: [] for i in range(CLIENTS)}
    t0 = time.monotonic()

    def client(i: int) -> None:
        tries = 2 if i in rejected else 50
        for _ in range(tries):
            if time.monotonic() - t0 > DEADLINE:
                break
            proc = upload_once(kinds[i % 3], tmp_path / f"src{i}", f"/f{i}", ports, alice_key)
            if proc.returncode == 0:
                done[i] = True
                return
            errors[i].append(proc.stderr[-300:])
            time.sleep(0.3)  # a pause between tries, as a client's retry would
        done[i] = False

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    # the kill: once node A holds uploads in pre-publish (their records say "check")
    deadline = time.monotonic() + 40
    while sum(1 for n, s, _ in staged_rows(pg_dsn) if n == "node-a" and s == "check") < 3:
        assert time.monotonic() < deadline, "node A never held three uploads in pre-publish"
        time.sleep(0.05)
    a.proc.kill()  # SIGKILL: no cleanup of any kind
    a.proc.wait(10)
    # node A's uploads at its death (B takes them over a lease later): arriving or in pre-publish
    states = {f: s for n, s, f in staged_rows(pg_dsn) if n == "node-a"}
    at_kill = set(states)
    for t in threads:
        t.join(DEADLINE + 60)
    assert not any(t.is_alive() for t in threads)
    took = time.monotonic() - t0

    # every upload meant to pass completed, on retry through the survivor where needed
    failed = {i: errors[i][-2:] for i in range(CLIENTS) if i not in rejected and not done.get(i)}
    assert not failed, f"{failed}\n--- node B ---\n{b.log_text()[-4000:]}"
    assert not re.search(r"check\.py:\d+", a.log_text() + b.log_text()), "the check script failed"
    # the survivor settles node A's leftovers: no record, no staging file left
    deadline = time.monotonic() + 30
    while staged_rows(pg_dsn) or any(p.name.startswith(STAGING_PREFIX) for p in home.iterdir()):
        assert time.monotonic() < deadline, (staged_rows(pg_dsn), sorted(p.name for p in home.iterdir()),
                                             b.log_text()[-3000:])
        time.sleep(0.1)

    store = ScriptStore(StateStores(tmp_path / "reader", database=pg_dsn))
    try:
        for i in range(CLIENTS):
            final = (home / f"f{i}").read_bytes()
            assert sha(final) in (sha(old[i]), sha(new[i])), f"f{i} is neither version ({len(final)} bytes)"
            if i in rejected:
                assert final == old[i], f"f{i} was vetoed but replaced"
                assert store.get("check.py", "passed:" + sha(new[i])) == (False, None)
            else:
                assert final == new[i], f"f{i} did not get its new version"
                # nothing unchecked: the check recorded this very content as passed
                assert store.get("check.py", "passed:" + sha(new[i])) == (True, f"/f{i}")
    finally:
        store.close()

    # the uploads node A held in pre-publish were checked again on node B, by its verdict
    text = b.log_text()
    rechecked = re.findall(r"checking again upload /(f\d+) of node node-a, which stopped mid-check", text)
    assert rechecked, f"node B rechecked nothing of node A's {sorted(at_kill)}\n{text[-3000:]}"
    assert set(rechecked) <= at_kill
    assert set(rechecked) == {f for f, s in states.items() if s == "check"}
    for name in (f for f, s in states.items() if s == "upload"):  # arriving: discarded, never published
        b.wait_log(rf"discarded upload /{name} of node node-a, which stopped mid-transfer", timeout=20)
    for name in rechecked:
        i = int(name[1:])
        if i in rejected:
            b.wait_log(rf"publish /{name} vetoed on recheck after its node stopped", timeout=20)
        else:
            b.wait_log(rf"publish /{name} ok \(checked in", timeout=20)
    print(f"\n{CLIENTS} uploads, node A killed with {len(at_kill)} of its own in flight "
          f"({len(rechecked)} in pre-publish, rechecked on B); all settled in {took:.1f}s")
