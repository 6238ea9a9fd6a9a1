"""Hostile SSH clients against per-client bounds (docs/architecture.md rules 11 and 12), through a real daemon.

One connection may open at most ``[sftp] max_channels_per_connection`` channels; each SSH
channel beyond a connection's first counts in the user's ``max_sessions`` (an account without
one is bound by ``[server] max_sessions_per_user``, over all its connections); one user holds at
most ``[server] max_handles_per_user`` files and listings over all their connections; an
OPENDIR reads its directory in batches instead of keeping the whole stat'ed listing per
handle; an SFTP channel whose client sends requests and reads no replies is closed once
``[sftp] max_queued_bytes`` of requests wait. Each time another user keeps working.
"""

from __future__ import annotations

import ftplib
import os
import struct
import threading
import time
from pathlib import Path

import paramiko
import pytest
from paramiko.sftp import (
    CMD_CLOSE, CMD_HANDLE, CMD_NAME, CMD_OPEN, CMD_OPENDIR, CMD_READ, CMD_READDIR, CMD_STATUS, CMD_WRITE,
    SFTP_EOF, SFTP_FAILURE, SFTP_FLAG_CREATE, SFTP_FLAG_READ, SFTP_FLAG_TRUNC, SFTP_FLAG_WRITE, int64,
)

from adminkit import admin_toml, get, token_hash  # noqa: F401  (fixture)
from conftest import ALICE_PASSWORD, close_client, paramiko_client, user_toml
from httpkit import HTTP_EXTRA, request
from test_defender import sock_from
from test_reload import reload
from test_sftp_paramiko import RawSFTP, _status, _take_string

PROCESSES = [pytest.param("", id="workers"), pytest.param("processes = 1", id="in-process")]


def _transport(d, user: str, key) -> paramiko.Transport:
    t = paramiko.Transport(("127.0.0.1", d.port))
    t.start_client(timeout=10)
    t.auth_publickey(user, paramiko.PKey.from_path(str(key.private)))
    return t


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the daemon and its SSH workers)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except FileNotFoundError:
            continue
    return total / 1024


def _bob_works(d, bob_key) -> None:
    """Another user logs in and lists and reads meanwhile."""
    c = paramiko_client(d, "bob", key=bob_key)
    try:
        c.listdir("/")
        with c.open("/inbox/probe.txt", "w") as f:
            f.write(b"still served")
        with c.open("/inbox/probe.txt") as f:
            assert f.read() == b"still served"
    finally:
        close_client(c)


def _homes(d) -> None:
    d.home("alice").mkdir(parents=True, exist_ok=True)
    (d.home("bob") / "inbox").mkdir(parents=True, exist_ok=True)


# --- channels per connection -------------------------------------------------------------

@pytest.mark.parametrize("processes", PROCESSES)
def test_channels_per_connection_capped(daemons, alice_key, bob_key, processes):
    d = daemons.start(sftp_extra=f"max_channels_per_connection = 3\n{processes}")
    _homes(d)
    t = _transport(d, "alice", alice_key)
    try:
        clients = [paramiko.SFTPClient.from_transport(t) for _ in range(3)]
        for c in clients:
            assert c.listdir("/") is not None
        with pytest.raises(paramiko.ChannelException) as refused:
            t.open_session(timeout=10)
        assert refused.value.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        d.wait_log(r"channel refused: 3 channels open")
        _bob_works(d, bob_key)
        assert t.is_active()  # the refusal costs the connection nothing
        clients.pop().close()  # a closed channel frees its place
        deadline = time.monotonic() + 5
        while True:
            try:
                extra = paramiko.SFTPClient.from_transport(t)
                break
            except paramiko.ChannelException:
                assert time.monotonic() < deadline, "a closed channel did not free its place"
                time.sleep(0.05)
        assert extra.listdir("/") is not None
    finally:
        t.close()


# --- max_sessions counts channels ----------------------------------------------------------

def test_max_sessions_counts_ssh_channels(daemons, alice_key, bob_key, password_hashes):
    users = (user_toml("alice", keys=[alice_key], max_sessions="2")
             + user_toml("bob", keys=[bob_key], permissions='{ "/" = ["list", "download"], "/inbox" = ["*"] }'))
    d = daemons.start(users=users)
    _homes(d)
    t = _transport(d, "alice", alice_key)
    try:
        first = paramiko.SFTPClient.from_transport(t)
        second = paramiko.SFTPClient.from_transport(t)  # one connection, two sessions: at the limit
        assert first.listdir("/") == [] and second.listdir("/") == []
        with pytest.raises((paramiko.SSHException, EOFError, OSError)):  # closed at open or at the subsystem request
            paramiko.SFTPClient.from_transport(t)  # a third channel is a third session
        d.wait_log(r"sftp refused: too many sessions for this user \(limit 2\)")
        with pytest.raises(paramiko.AuthenticationException):
            _transport(d, "alice", alice_key)  # nor is a second connection let in meanwhile
        _bob_works(d, bob_key)
        second.close()
        deadline = time.monotonic() + 5
        while True:  # back to one session on the first connection: a second connection fits
            try:
                t2 = _transport(d, "alice", alice_key)
                break
            except paramiko.AuthenticationException:
                assert time.monotonic() < deadline, "a closed channel was not given back to max_sessions"
                time.sleep(0.1)
        t2.close()
    finally:
        t.close()


# --- sessions per user without max_sessions: the server's cap ----------------------------------

FTP_EXTRA = '[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = ""\n'


def _transport_from(d, source: str, user: str, key) -> paramiko.Transport:
    t = paramiko.Transport(sock_from(d, source))
    t.start_client(timeout=10)
    t.auth_publickey(user, paramiko.PKey.from_path(str(key.private)))
    return t


def _channel_refused(t: paramiko.Transport) -> None:
    """The next SFTP channel on ``t`` is closed at once (its session refused). Closed before
    paramiko sends its subsystem request, that is OSError ("Socket is closed") from the channel."""
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):
        paramiko.SFTPClient.from_transport(t)


def test_sessions_per_user_capped_by_the_server_over_connections_and_addresses(daemons, token_hash, alice_key,
                                                                                bob_key):  # noqa: F811
    """alice sets no max_sessions: her channels over connections from several addresses stop
    at [server] max_sessions_per_user, each refusal with its reason on every protocol, logged,
    audited and counted; bob, under the same cap, is not charged for alice's sessions."""
    d = daemons.start(FTP_EXTRA + HTTP_EXTRA + admin_toml(token_hash), server_extra="max_sessions_per_user = 4",
                      sftp_extra="max_channels_per_connection = 3")
    _homes(d)
    held = [_transport_from(d, "127.0.0.2", "alice", alice_key), _transport_from(d, "127.0.0.3", "alice", alice_key)]
    try:
        first = [paramiko.SFTPClient.from_transport(held[0]) for _ in range(3)]  # 3 sessions, 3 channels
        second = paramiko.SFTPClient.from_transport(held[1])  # the 4th session: at the cap
        assert all(c.listdir("/") == [] for c in [*first, second])
        _channel_refused(held[1])  # a 5th, though this connection has room for two more channels
        d.wait_log(r"sftp refused: too many sessions for this user \(limit 4\)")
        d.wait_log(r"user=alice .*\] session refused: too many sessions for this user \(limit 4\)")
        with pytest.raises(paramiko.AuthenticationException):  # nor a new connection, from anywhere
            _transport_from(d, "127.0.0.4", "alice", alice_key)
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", d.ports["ftp"], timeout=20)
        try:
            with pytest.raises(ftplib.error_perm) as refused:
                ftp.login("alice", ALICE_PASSWORD)
            assert str(refused.value) == "530 too many sessions for this user (limit 4)"
        finally:
            ftp.close()
        r = request(d, "GET", "/")
        assert r.status == 403 and b"too many sessions for this user (limit 4)" in r.body
        _bob_works(d, bob_key)  # bob's own sessions are his
        bob = [_transport(d, "bob", bob_key) for _ in range(2)]
        try:
            assert all(paramiko.SFTPClient.from_transport(t).listdir("/") for t in bob)
        finally:
            for t in bob:
                t.close()
        rows = get(d, "/api/events?user=alice&decision=denied")
        got = {(r["name"], r["protocol"], r["decided_by"]) for r in rows}
        assert {("session", "sftp", "limit"), ("login", "sftp", "policy"), ("login", "ftp", "policy"),
                ("login", "http", "policy")} <= got, got
        assert all(r["reason"] == "too many sessions for this user (limit 4)" for r in rows), rows
        assert 'scriptsftp_refusals_total{kind="limit",operation="session",protocol="sftp"} 1.0' in get(d, "/metrics")
        first.pop().close()  # a closed channel gives its place back, on any of her connections
        deadline = time.monotonic() + 5
        while True:
            try:
                extra = paramiko.SFTPClient.from_transport(held[1])
                break
            except (paramiko.SSHException, EOFError):
                assert time.monotonic() < deadline, "a closed channel was not given back"
                time.sleep(0.1)
        assert extra.listdir("/") == []
    finally:
        for t in held:
            t.close()


def test_an_accounts_max_sessions_overrides_the_servers_cap(daemons, alice_key, bob_key):
    """alice's own max_sessions (5) lets her past the server's cap (2), bob without one stops at
    it; a reload applies a new cap to the next channel."""
    users = user_toml("alice", keys=[alice_key], max_sessions="5") + user_toml("bob", keys=[bob_key])
    d = daemons.start(users=users, server_extra="max_sessions_per_user = 2")
    _homes(d)
    a, b = _transport(d, "alice", alice_key), _transport(d, "bob", bob_key)
    try:
        alice = [paramiko.SFTPClient.from_transport(a) for _ in range(5)]
        assert all(c.listdir("/") == [] for c in alice)
        _channel_refused(a)
        d.wait_log(r"user=alice .*\] session refused: too many sessions for this user \(limit 5\)")
        bob = [paramiko.SFTPClient.from_transport(b) for _ in range(2)]
        assert all(c.listdir("/") == ["inbox"] for c in bob)
        _channel_refused(b)
        d.wait_log(r"user=bob .*\] session refused: too many sessions for this user \(limit 2\)")
        daemons.write_config(users=users, server_extra="max_sessions_per_user = 3")
        reload(d, r"\[server\] max_sessions_per_user changed: applied")
        assert paramiko.SFTPClient.from_transport(b).listdir("/") == ["inbox"]  # the new cap, no restart
        _channel_refused(b)
        d.wait_log(r"user=bob .*\] session refused: too many sessions for this user \(limit 3\)")
    finally:
        a.close()
        b.close()


# --- handles per user, across connections --------------------------------------------------

def _open(raw: RawSFTP, path: str, flags: int) -> tuple[int, bytes]:
    t, data = raw.request(CMD_OPEN, path, flags, 0)
    if t == CMD_HANDLE:
        return t, _take_string(data)[0]
    return t, data


@pytest.mark.parametrize("processes", PROCESSES)
def test_handles_per_user_across_connections(daemons, alice_key, bob_key, processes):
    d = daemons.start(server_extra="max_handles_per_user = 5", sftp_extra=processes)
    _homes(d)
    for i in range(6):
        (d.home("alice") / f"f{i}").write_bytes(b"x" * 10)
    t1, t2 = _transport(d, "alice", alice_key), _transport(d, "alice", alice_key)
    try:
        a, b = RawSFTP(t1), RawSFTP(t2)
        a.init()
        b.init()
        held = [_open(a, f"/f{i}", SFTP_FLAG_READ)[1] for i in range(3)]
        held += [_open(b, "/f3", SFTP_FLAG_READ)[1], _open(b, "/up", SFTP_FLAG_WRITE | SFTP_FLAG_CREATE)[1]]
        t, data = _open(b, "/f5", SFTP_FLAG_READ)
        assert _status(t, data) == (SFTP_FAILURE, "too many open files (limit 5 per user)")
        t, data = a.request(CMD_OPENDIR, "/")  # a listing is a handle too
        assert _status(t, data) == (SFTP_FAILURE, "too many open files (limit 5 per user)")
        _bob_works(d, bob_key)  # another user's handles are not alice's
        assert _status(*a.request(CMD_CLOSE, held[0]))[0] == 0
        t, _ = _open(b, "/f5", SFTP_FLAG_READ)
        assert t == CMD_HANDLE
        assert not (d.home("alice") / "up").exists()
    finally:
        t1.close()
        t2.close()


# --- listings are read in batches ------------------------------------------------------

def _names(data: bytes) -> list[str]:
    """The file names of an SSH_FXP_NAME reply (request id already stripped)."""
    (count,), rest = struct.unpack(">I", data[:4]), data[4:]
    names = []
    for _ in range(count):
        name, rest = _take_string(rest)
        _, rest = _take_string(rest)  # long name
        (flags,), rest = struct.unpack(">I", rest[:4]), rest[4:]
        for flag, size in ((1, 8), (2, 8), (4, 4), (8, 8)):
            if flags & flag:
                rest = rest[size:]
        assert not flags & 0x80000000
        names.append(name.decode())
    return names


@pytest.mark.parametrize("processes", PROCESSES)
def test_many_listings_of_a_large_directory_stay_small(daemons, alice_key, bob_key, processes):
    d = daemons.start(sftp_extra=processes)
    _homes(d)
    big = d.home("alice") / "big"
    big.mkdir()
    expected = {f"entry-{i:05d}-with-a-longer-name.dat" for i in range(20000)}
    for name in expected:
        os.close(os.open(big / name, os.O_CREAT | os.O_WRONLY, 0o644))
    t = _transport(d, "alice", alice_key)
    try:
        raw = RawSFTP(t)
        raw.init()
        time.sleep(0.5)
        before = _tree_rss_mb(d.proc.pid)
        handles = []
        for _ in range(50):
            rt, data = raw.request(CMD_OPENDIR, "/big")
            assert rt == CMD_HANDLE
            handles.append(_take_string(data)[0])
        seen: list[list[str]] = [[] for _ in handles]
        for i, h in enumerate(handles):  # every listing started: one batch each
            rt, data = raw.request(CMD_READDIR, h)
            assert rt == CMD_NAME
            seen[i] += _names(data)
        grown = _tree_rss_mb(d.proc.pid) - before
        assert grown < 100, f"50 open listings of 20,000 entries grew the daemon by {grown:.0f} MB"
        _bob_works(d, bob_key)
        open_ = {0: seen[0], 17: seen[17], 49: seen[49]}  # read to the end, interleaved
        while open_:
            for i in list(open_):
                rt, data = raw.request(CMD_READDIR, handles[i])
                if rt == CMD_STATUS:
                    assert _status(rt, data)[0] == SFTP_EOF
                    del open_[i]
                    continue
                open_[i] += _names(data)
        for i in (0, 17, 49):  # each entry exactly once
            assert len(seen[i]) == len(set(seen[i])) == len(expected)
            assert set(seen[i]) == expected
        for h in handles:
            assert _status(*raw.request(CMD_CLOSE, h))[0] == 0
        d.wait_log(r"list /big ok .*entries=20000")
    finally:
        t.close()


# --- a channel that queues requests and reads no replies ------------------------------

def _stalled_writer(d, key, errors: list) -> paramiko.Transport:
    """A channel with a 32 KiB receive window: a 256 KiB READ reply cannot reach it, and it
    then sends ~50 MB of WRITE requests without ever reading a reply."""
    t = _transport(d, "alice", key)
    chan = t.open_session(window_size=32768, timeout=10)
    chan.settimeout(30)
    chan.invoke_subsystem("sftp")
    raw = RawSFTP.__new__(RawSFTP)
    raw.chan, raw.next_id = chan, 1
    raw.init()
    _, src = _open(raw, "/source", SFTP_FLAG_READ)
    _, dst = _open(raw, f"/sink-{id(t)}", SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC)
    block = os.urandom(200000)

    def flood() -> None:
        try:
            raw.send(CMD_READ, struct.pack(">II", 1000, len(src)) + src + struct.pack(">QI", 0, 262000))
            for i in range(250):  # 50 MB
                raw.send(CMD_WRITE, struct.pack(">II", 2000 + i, len(dst)) + dst
                         + struct.pack(">QI", i * len(block), len(block)) + block)
        except Exception as exc:  # closed by the server: what the bound does
            errors.append(exc)

    th = threading.Thread(target=flood, daemon=True)
    th.start()
    t.flood = th  # type: ignore[attr-defined]
    return t


@pytest.mark.parametrize("processes", PROCESSES)
def test_stalled_channels_keep_memory_bounded(daemons, alice_key, bob_key, processes):
    d = daemons.start(sftp_extra=f'max_queued_bytes = {4 * 2**20}\n{processes}')
    _homes(d)
    (d.home("alice") / "source").write_bytes(os.urandom(1 << 20))
    time.sleep(0.3)
    before = _tree_rss_mb(d.proc.pid)
    errors: list = []
    stalled = [_stalled_writer(d, alice_key, errors) for _ in range(4)]
    try:
        for t in stalled:
            t.flood.join(60)  # type: ignore[attr-defined]
        grown = _tree_rss_mb(d.proc.pid) - before
        _bob_works(d, bob_key)
        assert grown < 100, f"4 stalled channels with 50 MB of requests each grew the daemon by {grown:.0f} MB"
        assert len(errors) == 4, "the stalled channels were not closed"
        d.wait_log(r"sftp channel closed: more than 4194304 bytes of requests queued")
        d.wait_log(r"upload /sink-\d+ aborted .*too many requests waiting")
        assert not [p for p in d.home("alice").iterdir() if p.name.startswith("sink-")]
    finally:
        for t in stalled:
            t.close()
