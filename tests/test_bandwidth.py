"""Bandwidth limits per user (``bandwidth_up``/``bandwidth_down``), through a real daemon and
real clients: one bucket per user and direction, over all their sessions and protocols.

alice is limited to RATE bytes/s each way; bob has no limit. Every transfer below is timed
from a barrier passed once all clients are connected and logged in (no handshake in the
figure). What a shared bucket guarantees, and what the assertions allow for:

* together, alice's concurrent transfers of TOTAL bytes take at least
  ``(TOTAL - burst - one chunk per transfer) / RATE`` (the burst is a quarter second of the
  rate, a chunk a tenth: server/core/bandwidth.py); per-session buckets would take half;
* and not much more: at most ``1.5 * TOTAL / RATE + 3 s`` (a loaded test machine);
* bob, at the same time, moves 8 MiB in well under the 8 s the limit would cost him.

``[sftp] processes = 2`` (conftest): SSH connections are served by two worker processes,
which buy their bytes from the core's bucket; one test shows two of alice's connections
served by different workers sharing it.
"""

from __future__ import annotations

import ftplib
import http.client
import io
import os
import re
import signal
import subprocess
import threading
import time
from typing import Callable

import paramiko
import pytest

from conftest import (
    ALICE_PASSWORD, BOB_PASSWORD, SSH_OPTS, close_client, paramiko_client, require_tool, user_toml,
)
from httpkit import HTTP_EXTRA, basic
from test_ftp import tls_files  # noqa: F401 (a fixture: a self-signed certificate for FTPS)

RATE = 1 << 20  # bytes/s
MiB = 1 << 20
BURST = 0.25 * RATE
CHUNK = RATE // 10
FTP_EXTRA = '\n[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = "62700-62799"\n'


def users(factory, *, up: int = RATE, down: int = RATE) -> str:
    """alice limited (up, down bytes/s; 0: none), bob free; both may do everything in their homes."""
    alice = user_toml("alice", keys=[factory.alice_key], password_hash=factory.hashes["alice"],
                      bandwidth_up=str(up), bandwidth_down=str(down))
    bob = user_toml("bob", keys=[factory.bob_key], password_hash=factory.hashes["bob"])
    return alice + bob


@pytest.fixture
def d(daemons):
    daemon = daemons.start(FTP_EXTRA + "\n" + HTTP_EXTRA, users=users(daemons))
    for name in ("alice", "bob"):
        daemon.home(name).mkdir(parents=True, exist_ok=True)
    return daemon


# --- clients, connected before the clock starts ------------------------------------------------


class Timed:
    """Transfers run in threads, each started once every one is ready (connected, logged in)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, Callable[[], None]]] = []
        self.took: dict[str, float] = {}
        self.errors: list[BaseException] = []

    def add(self, name: str, job: Callable[[], None]) -> None:
        self.jobs.append((name, job))

    def run(self, timeout: float = 60) -> float:
        """Run every job; the seconds from the start until the last one of ``names`` ended."""
        gate = threading.Barrier(len(self.jobs) + 1)
        ends: dict[str, float] = {}

        def runner(name: str, job: Callable[[], None]) -> None:
            gate.wait()
            try:
                job()
            except BaseException as exc:  # reported by the main thread
                self.errors.append(exc)
            ends[name] = time.monotonic()

        threads = [threading.Thread(target=runner, args=job, daemon=True) for job in self.jobs]
        for t in threads:
            t.start()
        gate.wait()
        started = time.monotonic()
        for t in threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in threads), "a transfer did not finish"
        if self.errors:
            raise self.errors[0]
        self.took = {name: end - started for name, end in ends.items()}
        return max(self.took.values())


def sftp(d, user: str = "alice"):
    return paramiko_client(d, user, password=ALICE_PASSWORD if user == "alice" else BOB_PASSWORD)


def ftp(d, user: str = "alice") -> ftplib.FTP:
    c = ftplib.FTP()
    c.connect("127.0.0.1", d.ports["ftp"], timeout=60)
    c.login(user, ALICE_PASSWORD if user == "alice" else BOB_PASSWORD)
    return c


def http_conn(d) -> http.client.HTTPConnection:
    """A keep-alive connection already logged in (its first request opened the session)."""
    c = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=60)
    c.request("GET", "/?format=json", headers={"Authorization": basic()})
    r = c.getresponse()
    r.read()
    assert r.status == 200
    return c


def http_put(c: http.client.HTTPConnection, path: str, data: bytes) -> None:
    c.request("PUT", path, body=data, headers={"Authorization": basic()})
    r = c.getresponse()
    r.read()
    assert r.status in (201, 204), r.status


def http_get(c: http.client.HTTPConnection, path: str) -> bytes:
    c.request("GET", path, headers={"Authorization": basic()})
    r = c.getresponse()
    body = r.read()
    assert r.status == 200, r.status
    return body


def assert_shared(elapsed: float, total: int, transfers: int) -> None:
    floor = (total - BURST - transfers * CHUNK) / RATE
    print(f"{transfers} transfers, {total} bytes at {RATE} bytes/s: {elapsed:.2f}s (ideal {total / RATE:.2f}s)")
    assert elapsed >= floor, f"{total} bytes in {elapsed:.2f}s: faster than {RATE} bytes/s allows (>= {floor:.2f}s)"
    ceiling = 1.5 * total / RATE + 3
    assert elapsed <= ceiling, f"{total} bytes in {elapsed:.2f}s: far slower than {RATE} bytes/s (<= {ceiling:.2f}s)"


def assert_free(seconds: float, size: int) -> None:
    assert seconds < size / RATE / 2, f"bob's {size} bytes took {seconds:.2f}s: slowed by alice's limit"


# --- uploads -----------------------------------------------------------------------------------


def test_sftp_and_ftp_uploads_of_one_user_share_one_bucket_and_another_user_is_not_slowed(d):
    a, b = os.urandom(3 * MiB // 2), os.urandom(3 * MiB // 2)
    free = os.urandom(8 * MiB)
    s, f, other = sftp(d), ftp(d), sftp(d, "bob")
    try:
        t = Timed()
        t.add("sftp", lambda: s.putfo(io.BytesIO(a), "a.bin"))
        t.add("ftp", lambda: f.storbinary("STOR b.bin", io.BytesIO(b)))
        t.add("bob", lambda: other.putfo(io.BytesIO(free), "free.bin"))
        t.run()
    finally:
        close_client(s), f.quit(), close_client(other)
    assert_shared(max(t.took["sftp"], t.took["ftp"]), len(a) + len(b), 2)
    assert_free(t.took["bob"], len(free))
    assert (d.home() / "a.bin").read_bytes() == a and (d.home() / "b.bin").read_bytes() == b
    assert (d.home("bob") / "free.bin").read_bytes() == free


def worker_pids(d) -> list[int]:
    return [int(p) for p in re.findall(r"ssh worker \d+ started \(pid (\d+)\)", d.log_text())]


def open_by(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def test_two_sftp_connections_in_different_ssh_workers_and_an_http_put_share_one_bucket(d):
    pids = worker_pids(d)
    assert len(pids) == 2
    for sub in ("w1", "w2"):
        (d.home() / sub).mkdir()
    one, two, web = sftp(d), sftp(d), http_conn(d)
    data = [os.urandom(MiB) for _ in range(3)]
    holders: dict[str, set[int]] = {"w1": set(), "w2": set()}
    try:
        t = Timed()
        t.add("one", lambda: one.putfo(io.BytesIO(data[0]), "w1/a.bin"))
        t.add("two", lambda: two.putfo(io.BytesIO(data[1]), "w2/b.bin"))
        t.add("http", lambda: http_put(web, "/c.bin", data[2]))

        def watch() -> None:  # which worker writes which upload (its staging file, open there)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not all(holders.values()):
                for pid in pids:
                    for path in open_by(pid):
                        for sub in holders:
                            if f"/{sub}/.scriptsftp-part-" in path:
                                holders[sub].add(pid)
                time.sleep(0.02)

        t.add("watch", watch)
        t.run()
    finally:
        close_client(one), close_client(two), web.close()
    assert holders["w1"] and holders["w2"] and holders["w1"] != holders["w2"], holders
    assert_shared(max(t.took["one"], t.took["two"], t.took["http"]), 3 * MiB, 3)
    assert (d.home() / "w1" / "a.bin").read_bytes() == data[0]
    assert (d.home() / "c.bin").read_bytes() == data[2]


def test_in_process_ssh_connections_share_one_bucket(daemons):
    """``[sftp] processes = 1``: SFTP served in the daemon's own process, on the core's bucket."""
    d = daemons.start(users=users(daemons), sftp_extra="processes = 1")
    d.home().mkdir(parents=True, exist_ok=True)
    one, two = sftp(d), sftp(d)
    data = [os.urandom(3 * MiB // 2) for _ in range(2)]
    try:
        t = Timed()
        t.add("one", lambda: one.putfo(io.BytesIO(data[0]), "a.bin"))
        t.add("two", lambda: two.putfo(io.BytesIO(data[1]), "b.bin"))
        elapsed = t.run()
    finally:
        close_client(one), close_client(two)
    assert "ssh worker" not in d.log_text()
    assert_shared(elapsed, 3 * MiB, 2)
    assert (d.home() / "b.bin").read_bytes() == data[1]


def test_scp_upload_is_paced(d, alice_key, tmp_path):
    """OpenSSH scp in its legacy protocol (``-O``): the handshake is inside this figure,
    which can only make it longer."""
    require_tool("scp")
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(3 * MiB))
    started = time.monotonic()
    subprocess.run(["scp", "-O", "-i", str(alice_key.private), "-P", str(d.port), *SSH_OPTS, str(src),
                    "alice@127.0.0.1:up.bin"], check=True, capture_output=True, timeout=60)
    assert time.monotonic() - started >= (3 * MiB - BURST - CHUNK) / RATE
    assert (d.home() / "up.bin").read_bytes() == src.read_bytes()


# --- downloads ---------------------------------------------------------------------------------


def test_sftp_ftp_and_http_downloads_of_one_user_share_one_bucket(d):
    files = {name: os.urandom(MiB) for name in ("a.bin", "b.bin", "c.bin")}
    for name, data in files.items():
        (d.home() / name).write_bytes(data)
    (d.home("bob") / "free.bin").write_bytes(os.urandom(8 * MiB))
    s, f, web, other = sftp(d), ftp(d), http_conn(d), sftp(d, "bob")
    got: dict[str, bytes] = {}
    try:
        t = Timed()

        def by_sftp() -> None:
            buf = io.BytesIO()
            s.getfo("a.bin", buf)
            got["a.bin"] = buf.getvalue()

        def by_ftp() -> None:
            buf = bytearray()
            f.retrbinary("RETR b.bin", buf.extend)
            got["b.bin"] = bytes(buf)

        def by_http() -> None:
            got["c.bin"] = http_get(web, "/c.bin")

        t.add("sftp", by_sftp)
        t.add("ftp", by_ftp)
        t.add("http", by_http)
        t.add("bob", lambda: other.getfo("free.bin", io.BytesIO()))
        t.run()
    finally:
        close_client(s), f.quit(), web.close(), close_client(other)
    assert got == files
    assert_shared(max(t.took["sftp"], t.took["ftp"], t.took["http"]), 3 * MiB, 3)
    assert_free(t.took["bob"], 8 * MiB)


def test_scp_download_is_paced(d, alice_key, tmp_path):
    require_tool("scp")
    data = os.urandom(3 * MiB)
    (d.home() / "down.bin").write_bytes(data)
    started = time.monotonic()
    subprocess.run(["scp", "-O", "-i", str(alice_key.private), "-P", str(d.port), *SSH_OPTS,
                    "alice@127.0.0.1:down.bin", str(tmp_path / "down.bin")], check=True, capture_output=True,
                   timeout=60)
    assert time.monotonic() - started >= (3 * MiB - BURST - CHUNK) / RATE
    assert (tmp_path / "down.bin").read_bytes() == data


# --- a changed limit applies to running transfers ------------------------------------------------


SLOW = 64 * 1024  # bytes/s: an 8 MiB file would take two minutes


def reload_users(d, daemons, **rates: int) -> None:
    """Rewrite the users with new rates and SIGHUP; returns once the daemon says it applied them."""
    text = d.config.read_text()
    start = text.index("\n[[users]]")
    d.config.write_text(text[:start] + users(daemons, **rates))
    mark = len(d.lines)
    d.signal(signal.SIGHUP)
    d.wait_log(r"configuration reloaded", start=mark)


@pytest.mark.parametrize("protocol", ["sftp", "ftp", "http"])
def test_a_limit_lifted_by_reload_frees_running_downloads_within_a_second(daemons, protocol):
    d = daemons.start(FTP_EXTRA + "\n" + HTTP_EXTRA, users=users(daemons, up=0, down=SLOW))
    d.home().mkdir(parents=True, exist_ok=True)
    data = os.urandom(8 * MiB)
    (d.home() / "big.bin").write_bytes(data)
    got = bytearray()
    client = sftp(d) if protocol == "sftp" else ftp(d) if protocol == "ftp" else http_conn(d)

    def download() -> None:
        if protocol == "sftp":
            with client.open("big.bin", "rb") as f:
                while chunk := f.read(32768):
                    got.extend(chunk)
        elif protocol == "ftp":
            client.retrbinary("RETR big.bin", got.extend)
        else:
            client.request("GET", "/big.bin", headers={"Authorization": basic()})
            r = client.getresponse()
            assert r.status == 200
            while chunk := r.read(32768):
                got.extend(chunk)

    t = threading.Thread(target=download, daemon=True)
    started = time.monotonic()
    t.start()
    try:
        deadline = started + 10
        while len(got) < 64 * 1024 and time.monotonic() < deadline:  # it runs, slowly
            time.sleep(0.05)
        assert 0 < len(got) < MiB
        reload_users(d, daemons, up=0, down=0)
        lifted = time.monotonic()
        t.join(30)
        assert not t.is_alive()
        # 8 MiB at 64 KiB/s is two minutes; lifted, the rest comes at full speed: the
        # second it may take to apply, and the transfer itself on a loaded machine
        assert time.monotonic() - lifted < 6, f"{len(got)} bytes {time.monotonic() - lifted:.1f}s after the reload"
        assert bytes(got) == data
    finally:
        if protocol == "sftp":
            close_client(client)
        elif protocol == "ftp":
            client.quit()
        else:
            client.close()


def test_a_limit_set_by_reload_slows_a_running_upload_within_a_second(daemons):
    """An unlimited SFTP upload (served by an SSH worker, which learns of limits from the
    core's answers to its progress reports) is paced once a limit is set mid-transfer."""
    d = daemons.start(users=users(daemons, up=0, down=0))
    d.home().mkdir(parents=True, exist_ok=True)
    client = sftp(d)
    sent = 0
    stop = threading.Event()
    rate_after: list[float] = []

    def upload() -> None:
        nonlocal sent
        with client.open("stream.bin", "wb") as f:
            block = os.urandom(32 * 1024)
            while not stop.is_set():
                f.write(block)
                sent += len(block)

    t = threading.Thread(target=upload, daemon=True)
    t.start()
    try:
        time.sleep(0.5)
        assert sent > 256 * 1024  # unlimited: fast
        reload_users(d, daemons, up=SLOW, down=0)
        time.sleep(1.5)  # the limit reaches the worker within a second
        before, t0 = sent, time.monotonic()
        time.sleep(2)
        rate_after.append((sent - before) / (time.monotonic() - t0))
    finally:
        stop.set()
        t.join(30)
        close_client(client)
    assert rate_after[0] < 3 * SLOW, f"{rate_after[0]:.0f} bytes/s after a limit of {SLOW}"



def test_a_limit_lifted_in_the_account_database_frees_a_running_download(daemons, alice_key):
    """The account database (no reload): the watcher hands the changed account to the open
    session, whose running download (in an SSH worker) is freed within a second."""
    from scriptsftp.server.stores.accounts_db import AccountDb
    from scriptsftp.server.stores.sql import SqliteDatabase
    from scriptsftp.server.support.config import User

    d = daemons.start()
    home = d.root / "homes" / "carol"
    home.mkdir(parents=True)
    data = os.urandom(8 * MiB)
    (home / "big.bin").write_bytes(data)
    db = AccountDb(SqliteDatabase(d.root / "state" / "accounts.sqlite3"))
    try:
        db.add_user(User.model_validate({"name": "carol", "home": str(home), "public_keys": [alice_key.public_line],
                                         "permissions": {"/": ["*"]}, "bandwidth_down": SLOW}, strict=False), "test")
        client = paramiko_client(d, "carol", key=alice_key)
        got = bytearray()

        def download() -> None:
            with client.open("big.bin", "rb") as f:
                while chunk := f.read(32768):
                    got.extend(chunk)

        t = threading.Thread(target=download, daemon=True)
        t.start()
        try:
            deadline = time.monotonic() + 10
            while len(got) < 64 * 1024 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert 0 < len(got) < MiB
            stored = db.get_user("carol")
            assert stored is not None
            db.update_user(stored.user.model_copy(update={"bandwidth_down": 0}), "test")
            lifted = time.monotonic()
            t.join(30)
            assert not t.is_alive()
            assert time.monotonic() - lifted < 6, f"{len(got)} bytes {time.monotonic() - lifted:.1f}s after the change"
            assert bytes(got) == data
        finally:
            close_client(client)
    finally:
        db.close()


# --- edges ---------------------------------------------------------------------------------------


def test_an_sftp_write_that_cannot_move_within_the_stall_timeout_ends_the_channel_and_publishes_nothing(daemons):
    """4 KiB/s and a 2 s stall timeout: a 64 KiB WRITE would wait 15 s. The channel closes as
    for a stalled transfer (its last one: paramiko reports the connection dropped); the log
    names the bandwidth limit."""
    d = daemons.start(users=users(daemons, up=4096, down=0), server_extra="stall_timeout = 2")
    d.home().mkdir(parents=True, exist_ok=True)
    client = sftp(d)
    started = time.monotonic()
    try:
        with pytest.raises(paramiko.SSHException, match="connection dropped"):
            with client.open("slow.bin", "wb") as f:
                f.write(os.urandom(64 * 1024))
                f.flush()
    finally:
        close_client(client)
    assert time.monotonic() - started < 10
    d.wait_log(r"bandwidth limit of 4096 bytes/s: the transfer could not move \d+ bytes within the stall timeout")
    d.wait_log(r"upload /slow.bin aborted")
    assert sorted(p.name for p in d.home().iterdir()) == []  # nothing published, no staging file left


def test_a_killed_client_stops_spending_the_users_bandwidth(d):
    """An SFTP client killed mid-upload (its requests still queued at the server) costs the
    user's next transfer no more than a moment: the queued writes are not paced for nobody."""
    client = sftp(d)
    transport = client.get_channel().get_transport()

    def upload() -> None:
        try:
            client.putfo(io.BytesIO(os.urandom(8 * MiB)), "killed.bin")
        except Exception:
            pass  # its connection is cut under it

    t = threading.Thread(target=upload, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not list(d.home().glob(".scriptsftp-part-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    transport.sock.shutdown(2)  # the client is gone, its pipelined WRITEs still in the server's queue
    transport.close()
    d.wait_log(r"upload /killed.bin aborted", timeout=15)
    t.join(10)
    data = os.urandom(MiB)
    other = sftp(d)
    try:
        t2 = Timed()
        t2.add("next", lambda: other.putfo(io.BytesIO(data), "next.bin"))
        elapsed = t2.run()
    finally:
        close_client(other)
    assert (MiB - BURST - CHUNK) / RATE <= elapsed < 3 * MiB / RATE, f"the next upload took {elapsed:.2f}s"
    assert (d.home() / "next.bin").read_bytes() == data
    assert not (d.home() / "killed.bin").exists()


def test_ftps_transfers_are_paced_too(daemons, tls_files):
    """FTP over TLS (PROT P): no sendfile, pyftpdlib's own send and receive, whole TLS records."""
    from test_ftp import ftp_section, ftps

    d = daemons.start(ftp_section("explicit", *tls_files) + "\n", users=users(daemons))
    d.home().mkdir(parents=True, exist_ok=True)
    data = os.urandom(2 * MiB)
    c = ftps(d)
    try:
        t = Timed()
        t.add("up", lambda: c.storbinary("STOR tls.bin", io.BytesIO(data)))
        assert_shared(t.run(), len(data), 1)
        got = bytearray()
        t = Timed()
        t.add("down", lambda: c.retrbinary("RETR tls.bin", got.extend))
        assert_shared(t.run(), len(data), 1)
    finally:
        c.quit()
    assert bytes(got) == data and (d.home() / "tls.bin").read_bytes() == data
