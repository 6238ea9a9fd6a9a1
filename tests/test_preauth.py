"""Connections that never log in: ``[server] preauth_timeout`` and ``[defender] max_preauth_connections``.

A flood of idle TCP connections (no request, no handshake) used to hold the
global ``max_connections`` for minutes and lock every protocol out. Here, through
a real daemon and raw sockets: idle sockets to the HTTP, FTP and SSH ports are
closed by the server after the timeout (FTP with a 421 first), at most the cap
of them are held at once (the oldest is closed to make room), a user still logs
in and works over SFTP and HTTP meanwhile, and the counts return to zero.
"""

from __future__ import annotations

import socket
import time

import pytest

from adminkit import admin_toml, get, metric, token_hash, wait_for  # noqa: F401  (fixture)
from conftest import ALICE_PASSWORD, paramiko_client
from httpkit import HTTP_EXTRA, request

TIMEOUT = 2.0
CAP = 20


def _config(token_hash: str) -> str:
    return (HTTP_EXTRA + '\n[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = ""\n'
            f"\n[defender]\nmax_preauth_connections = {CAP}\nmax_connections = {CAP + 20}\n"
            + admin_toml(token_hash))


@pytest.fixture
def daemon_preauth(daemons, token_hash):  # noqa: F811
    return daemons.start(_config(token_hash), server_extra=f"preauth_timeout = {TIMEOUT}")


def _idle(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _until_closed(s: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (recv gives b'')."""
    got = b""
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"still open at the deadline; got {got!r}"
        s.settimeout(remaining)
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def _metrics(d) -> str:
    return get(d, "/metrics")


def test_idle_sockets_are_closed_and_never_lock_out_a_user(daemon_preauth):
    d = daemon_preauth
    opened = time.monotonic()
    idle = {"http": [_idle(d.ports["http"]) for _ in range(12)],
            "ftp": [_idle(d.ports["ftp"]) for _ in range(12)],
            "sftp": [_idle(d.ports["sftp"]) for _ in range(6)]}  # 30 idle, over the cap of 20
    wait_for(lambda: metric(_metrics(d), "scriptsftp_preauth_evicted_total") >= 10, timeout=10,
             what="the oldest idle connections closed to make room")
    assert metric(_metrics(d), "scriptsftp_preauth_connections") <= CAP

    # (a) a user connects and works meanwhile, over SFTP and over HTTP
    sftp = paramiko_client(d, password=ALICE_PASSWORD)
    try:
        with sftp.open("/during-flood.txt", "wb") as f:
            f.write(b"still served\n")
        assert "during-flood.txt" in sftp.listdir("/")
        r = request(d, "GET", "/during-flood.txt")
        assert (r.status, r.body) == (200, b"still served\n")

        # (b) every idle socket is closed by the server: FTP after a 421, HTTP and SSH
        # without an answer a client could mistake for success
        deadline = opened + TIMEOUT + 20
        for s in idle["ftp"]:
            got = _until_closed(s, deadline)
            assert got.startswith(b"220 ") and b"\r\n421 " in got, got
        for s in idle["http"]:
            assert _until_closed(s, deadline) == b""
        for s in idle["sftp"]:
            assert _until_closed(s, deadline).startswith(b"SSH-2.0-scriptsftp")
        # the logged-in session outlived them all
        assert sftp.stat("/during-flood.txt").st_size == 13
    finally:
        sftp.get_channel().get_transport().close()
        for s in (s for group in idle.values() for s in group):
            s.close()

    # (c) nothing is counted any more
    wait_for(lambda: metric(_metrics(d), "scriptsftp_preauth_connections") == 0
             and metric(_metrics(d), "scriptsftp_defender_open_connections") == 0,
             what="pre-auth and open connection counts back to zero")
    text = d.log_text()
    assert "closing FTP connection not logged in after 2s" in text
    assert "closing HTTP connection not logged in after 2s" in text
    assert "login grace time (2.0s) exceeded" in text or "ssh handshake failed" in text
    assert "Traceback" not in text


def test_an_idle_keepalive_connection_after_a_refused_request_is_closed_too(daemon_preauth):
    """An HTTP client that sent a request (answered 401) but never logs in is still pre-auth."""
    d = daemon_preauth
    s = _idle(d.ports["http"])
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        got = _until_closed(s, time.monotonic() + TIMEOUT + 20)
        assert got.startswith(b"HTTP/1.1 401 "), got
    finally:
        s.close()
    wait_for(lambda: metric(_metrics(d), "scriptsftp_preauth_connections") == 0, what="pre-auth count at zero")


def test_a_logged_in_ftp_session_is_not_cut_by_the_preauth_timeout(daemon_preauth):
    import ftplib

    d = daemon_preauth
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", d.ports["ftp"], timeout=10)
    try:
        ftp.login("alice", ALICE_PASSWORD)
        mark = len(d.lines)
        # past the timeout: a later command still works (an event: the log of another
        # connection's timeout, not a fixed sleep)
        late = _idle(d.ports["ftp"])
        try:
            assert b"421 " in _until_closed(late, time.monotonic() + TIMEOUT + 20)
        finally:
            late.close()
        d.wait_log(r"closing FTP connection not logged in", start=mark)
        assert ftp.pwd() == "/"
    finally:
        ftp.close()


def test_login_grace_defaults_to_preauth_timeout(daemons):
    from scriptsftp.server.support.config import load_config

    path = daemons.write_config(server_extra="preauth_timeout = 3")
    assert load_config(path).model.sftp.login_grace is None  # unset: the daemon uses preauth_timeout
    d = daemons.start(config=path)
    s = _idle(d.port)
    started = time.monotonic()
    try:
        assert _until_closed(s, started + 30).startswith(b"SSH-2.0-")
    finally:
        s.close()
    assert 2.5 <= time.monotonic() - started < 15


# --- the cap in the login core ------------------------------------------------------------


def _core(tmp_path, cap: int):
    from scriptsftp.server.support.config import DefenderSection
    from scriptsftp.server.ops.defender import Defender
    from scriptsftp.server.stores import StateStores
    from scriptsftp.server.contract.dispatch import NullDispatcher
    from scriptsftp.server.core.accounts import TomlAccountSource
    from scriptsftp.server.core.login import LoginCore
    from scriptsftp.server.core.session import UploadPolicy

    defender = Defender(StateStores(tmp_path), DefenderSection(max_preauth_connections=cap))
    return LoginCore(TomlAccountSource(), NullDispatcher(), staging=None, uploads=UploadPolicy(atomic=False), failure_delay=0,
                     defender=defender), defender


def test_at_the_cap_the_longest_waiting_connection_makes_room(tmp_path):
    import threading

    core, defender = _core(tmp_path, cap=3)
    kicked: dict[str, threading.Event] = {}
    conns = []
    for _ in range(3):
        conn, decision = core.connect("ftp", "192.0.2.9")
        assert decision.allowed
        kicked[conn.id] = threading.Event()
        conn.on_kick = lambda reason, e=kicked[conn.id]: e.set()
        conns.append(conn)
    newest, decision = core.connect("http", "192.0.2.10")
    assert decision.allowed
    assert kicked[conns[0].id].wait(5)  # the oldest was told to go
    assert not any(kicked[c.id].is_set() for c in conns[1:])
    assert core.preauth_count() == 3 and core.preauth_evicted == 1
    core.disconnect(conns[0])  # its front end closes it: the defender's slot comes back
    assert defender.stats()["open_connections"] == 3
    for c in [*conns[1:], newest]:
        core.disconnect(c)
    assert core.preauth_count() == 0 and defender.stats()["open_connections"] == 0
    defender.close()


def test_a_full_cap_with_nothing_to_close_refuses_and_gives_the_slot_back(tmp_path):
    core, defender = _core(tmp_path, cap=2)
    for _ in range(2):
        core.connect("sftp", "192.0.2.9")  # no front end has set on_kick yet: nothing can be closed
    conn, decision = core.connect("sftp", "192.0.2.9")
    assert not decision.allowed and "too many connections not logged in (limit 2)" in decision.reason
    core.disconnect(conn)  # what a front end does with a refused one: nothing to undo
    assert defender.stats()["open_connections"] == 2 and core.preauth_count() == 2
    defender.close()


def test_a_logged_in_connection_no_longer_counts(tmp_path, password_hashes):
    from scriptsftp.server.core.accounts import TomlAccountSource, UserRecord
    from scriptsftp.server.core.session import Account
    from scriptsftp.server.core.vfs import Access

    core, defender = _core(tmp_path, cap=1)
    account = Account(name="alice", home=tmp_path, access=Access.build({}, [], []), protocols=frozenset({"ftp"}))
    core.accounts = TomlAccountSource({"alice": UserRecord(account=account, password_hash=password_hashes["alice"],
                                                           keys=[], disabled=False)})
    conn, _ = core.connect("ftp", "192.0.2.9")
    assert core.check_password(conn, "alice", ALICE_PASSWORD)
    assert core.finish_login(conn, "alice", "password").allowed
    assert core.preauth_count() == 0 and not conn.preauth
    other, decision = core.connect("ftp", "192.0.2.9")  # the one slot is free again
    assert decision.allowed and core.preauth_count() == 1
    for c in (conn, other):
        core.disconnect(c)
    defender.close()


def test_an_idle_admin_connection_is_closed_too(daemon_preauth):
    """The admin listener kept a connection that sent nothing for over 200 s (aiohttp has
    no deadline before the first request). A silent one is closed after preauth_timeout;
    one that sends requests is served."""
    d = daemon_preauth
    silent = _idle(d.ports["admin"])
    half = _idle(d.ports["admin"])
    half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a request head never finished
    try:
        deadline = time.monotonic() + TIMEOUT + 5
        assert _until_closed(silent, deadline) == b""
        assert _until_closed(half, deadline) == b""
    finally:
        silent.close()
        half.close()
    assert get(d, "/healthz")
    d.wait_log(r"closing an admin connection that sent no request in time")
