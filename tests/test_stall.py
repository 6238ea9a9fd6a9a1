"""Stalled transfers and idle SSH connections ([server] stall_timeout, [sftp] idle_timeout).

A client that stops sending an upload (or stops reading a download) mid-way must
not hold its staging file, its handle or its connection: after ``stall_timeout``
seconds without a byte the transfer is aborted, the upload discarded (the old
version stays byte for byte, no staging file or record is left) and the client
gets what its protocol allows. An SSH connection whose last channel the server
closed, or that has had no channel for ``idle_timeout``, is closed as well.

Every test waits for the server's own log line (with a deadline), never a fixed sleep.
"""

from __future__ import annotations

import ftplib
import os
import socket
import sqlite3
import time
from pathlib import Path

import paramiko
import pytest

from adminkit import admin_toml, get, token_hash, wait_for  # noqa: F401 (token_hash: a fixture)
from conftest import ALICE_PASSWORD, Daemon, paramiko_client
from httpkit import HTTP_EXTRA, basic

STALL = 1.5
STALL_LINE = r'reason="stalled: no data for 1\.5 s"'
OLD = os.urandom(100_000)


def _start(daemons, extra: str = "", *, processes: int = 2, idle: float = 30.0) -> Daemon:
    d = daemons.start(extra, server_extra=f"stall_timeout = {STALL}",
                      sftp_extra=f"processes = {processes}\nidle_timeout = {idle}")
    d.home("alice").mkdir(parents=True, exist_ok=True)
    (d.home("alice") / "f.bin").write_bytes(OLD)
    return d


def _staging_records(d: Daemon) -> int:
    with sqlite3.connect(d.state_dir / "staging.db") as con:
        return con.execute("SELECT COUNT(*) FROM staged").fetchone()[0]


def _assert_discarded(d: Daemon, name: str = "f.bin") -> None:
    """The old version intact, nothing staged left behind, on disk or in the database."""
    home = d.home("alice")
    assert (home / name).read_bytes() == OLD
    assert [p.name for p in home.rglob(".scriptsftp-part-*")] == []
    assert _staging_records(d) == 0


def _wait_closed(transport: paramiko.Transport, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while transport.is_active():
        assert time.monotonic() < deadline, "the server did not close the SSH connection"
        time.sleep(0.05)


def _ssh(d: Daemon) -> paramiko.Transport:
    transport = paramiko.Transport(("127.0.0.1", d.port))
    transport.start_client(timeout=10)
    transport.auth_password("alice", ALICE_PASSWORD)
    return transport


# --- SFTP and SCP, with SSH served in the daemon (1) and in worker processes (2) ------------


@pytest.mark.parametrize("processes", [1, 2])
def test_sftp_stalled_upload_is_discarded_and_connection_closed(daemons, processes):
    d = _start(daemons, processes=processes)
    client = paramiko_client(d, password=ALICE_PASSWORD)
    transport = client.get_channel().get_transport()
    try:
        f = client.open("/f.bin", "w")
        f.write(b"n" * 40_000)
        f.flush()  # the bytes are in the staging file; then the client says nothing more
        d.wait_log(r"upload /f\.bin aborted .*" + STALL_LINE, timeout=STALL + 10)
        _wait_closed(transport)
        _assert_discarded(d)
        d.wait_log(r"ssh connection closed: stalled")
    finally:
        transport.close()


def test_sftp_slow_write_that_keeps_moving_is_not_a_stall(daemons):
    """Bytes of one large WRITE trickling in, each slice within stall_timeout of the last,
    for longer than stall_timeout in all: the upload goes through."""
    import struct

    from paramiko.sftp import CMD_WRITE

    d = _start(daemons)
    client = paramiko_client(d, password=ALICE_PASSWORD)
    try:
        f = client.open("/slow.bin", "w")
        data = os.urandom(200_000)
        num = client.request_number
        client.request_number += 1
        client._expecting[num] = type(None)
        body = (struct.pack(">BII", CMD_WRITE, num, len(f.handle)) + f.handle
                + struct.pack(">QI", 0, len(data)) + data)
        packet = struct.pack(">I", len(body)) + body
        slices = [packet[i:i + len(packet) // 4 + 1] for i in range(0, len(packet), len(packet) // 4 + 1)]
        for piece in slices:  # 4 slices, STALL * 0.6 apart: STALL * 1.8 for the whole request
            client.sock.sendall(piece)
            time.sleep(STALL * 0.6)  # the client's pace, not a wait for the server
        client._read_response(num)  # the WRITE's status: OK
        f.close()
        assert (d.home("alice") / "slow.bin").read_bytes() == data
        assert "stalled" not in d.log_text()
    finally:
        client.get_channel().get_transport().close()


@pytest.mark.parametrize("processes", [1, 2])
def test_scp_stalled_upload_is_discarded(daemons, processes):
    d = _start(daemons, processes=processes)
    transport = _ssh(d)
    try:
        chan = transport.open_session()
        chan.exec_command("scp -t /f.bin")
        assert chan.recv(1) == b"\0"
        chan.sendall(b"C0644 100000 f.bin\n")
        assert chan.recv(1) == b"\0"
        chan.sendall(b"n" * 30_000)  # of 100000 announced
        d.wait_log(r"upload /f\.bin aborted .*" + STALL_LINE, timeout=STALL + 10)
        _wait_closed(transport)
        _assert_discarded(d)
    finally:
        transport.close()


def test_scp_stalled_download_is_aborted(daemons):
    """A client that stops reading: the server's sends wait for window, then give up."""
    d = _start(daemons)
    (d.home("alice") / "big.bin").write_bytes(os.urandom(8 << 20))  # far more than paramiko's window
    transport = _ssh(d)
    try:
        chan = transport.open_session()
        chan.exec_command("scp -f /big.bin")
        chan.sendall(b"\0")
        header = b""
        while not header.endswith(b"\n"):
            header += chan.recv(1)
        assert header.startswith(b"C0") and b"big.bin" in header
        chan.sendall(b"\0")  # ...and then reads nothing
        d.wait_log(r"download /big\.bin aborted .*" + STALL_LINE, timeout=STALL + 10)
        _wait_closed(transport)
    finally:
        transport.close()


# --- idle SSH connections ------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_ssh_connection_without_channel_is_closed_after_idle_timeout(daemons, processes):
    d = _start(daemons, processes=processes, idle=1.5)
    transport = _ssh(d)
    try:
        d.wait_log(r"ssh connection closed: no channel open for 1\.5s", timeout=10)
        _wait_closed(transport)
    finally:
        transport.close()


@pytest.mark.parametrize("processes", [1, 2])
def test_login_grace_still_ends_a_connection_that_never_logs_in(daemons, processes):
    """The wait for the login is an event now (it used to be a join of the transport)."""
    d = daemons.start(sftp_extra=f"processes = {processes}\nlogin_grace = 1.0")
    transport = paramiko.Transport(("127.0.0.1", d.port))
    try:
        transport.start_client(timeout=10)  # key exchange done, no authentication
        d.wait_log(r"login grace time \(1\.0s\) exceeded", timeout=10)
        _wait_closed(transport)
    finally:
        transport.close()


def test_ssh_connection_closed_with_its_last_idle_sftp_channel(daemons):
    d = _start(daemons, idle=1.5)
    client = paramiko_client(d, password=ALICE_PASSWORD)
    transport = client.get_channel().get_transport()
    try:
        assert client.listdir("/") == ["f.bin"]
        d.wait_log(r"sftp idle timeout: channel closed", timeout=10)
        _wait_closed(transport)
        d.wait_log(r"ssh connection closed: idle timeout")
    finally:
        transport.close()


# --- FTP -----------------------------------------------------------------------------------------

FTP_EXTRA = '[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = ""\n'


def test_ftp_stalled_upload_is_discarded_with_426(daemons):
    d = _start(daemons, FTP_EXTRA)
    c = ftplib.FTP()
    c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    try:
        c.login("alice", ALICE_PASSWORD)
        c.voidcmd("TYPE I")
        data = c.transfercmd("STOR /f.bin")
        data.sendall(b"n" * 50_000)  # then nothing, the data connection left open
        d.wait_log(r"upload /f\.bin aborted .*" + STALL_LINE, timeout=STALL + 10)
        with pytest.raises(ftplib.error_temp, match=r"426 .*stalled: no data for 1\.5 s"):
            c.voidresp()
        _assert_discarded(d)
        data.close()
        assert c.voidcmd("NOOP").startswith("200")  # the control connection stays usable
    finally:
        c.close()


def test_ftp_download_to_a_client_that_stops_reading_is_aborted(daemons):
    d = _start(daemons, FTP_EXTRA)
    (d.home("alice") / "big.bin").write_bytes(os.urandom(32 << 20))
    c = ftplib.FTP()
    c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    try:
        c.login("alice", ALICE_PASSWORD)
        c.voidcmd("TYPE I")
        data = c.transfercmd("RETR /big.bin")
        data.recv(1024)  # ...and nothing more
        d.wait_log(r"download /big\.bin aborted .*" + STALL_LINE, timeout=STALL + 10)
        with pytest.raises(ftplib.error_temp, match=r"426 .*stalled"):
            c.voidresp()
        data.close()
    finally:
        c.close()


# --- HTTP ----------------------------------------------------------------------------------------


def _http_socket(d: Daemon) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", d.ports["http"]), timeout=30)
    return s


def _closed_by_server(s: socket.socket) -> bool:
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_http_stalled_put_is_discarded_and_connection_closed(daemons):
    d = _start(daemons, HTTP_EXTRA)
    s = _http_socket(d)
    try:
        s.sendall(f"PUT /f.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {basic()}\r\n"
                  f"Content-Length: 100000\r\n\r\n".encode() + b"n" * 50_000)
        d.wait_log(r"upload /f\.bin aborted .*" + STALL_LINE, timeout=STALL + 10)
        assert _closed_by_server(s)  # EOF or reset, no answer: the body never completed
        _assert_discarded(d)
    finally:
        s.close()


def test_http_download_to_a_client_that_stops_reading_is_aborted(daemons):
    d = _start(daemons, HTTP_EXTRA)
    (d.home("alice") / "big.bin").write_bytes(os.urandom(32 << 20))
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", d.ports["http"]))
    try:
        s.sendall(f"GET /big.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {basic()}\r\n\r\n".encode())
        assert s.recv(12).startswith(b"HTTP/1.1 200")  # ...and nothing more is read
        d.wait_log(r"download /big\.bin aborted .*" + STALL_LINE, timeout=STALL + 10)
    finally:
        s.close()


# --- config --------------------------------------------------------------------------------------


def test_stall_timeout_is_validated(tmp_path: Path):
    from scriptsftp.server.support.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text('[server]\nstall_timeout = -1\n')
    with pytest.raises(ConfigError, match="stall_timeout"):
        load_config(path)
    path.write_text('[server]\nstall_timeout = 0\n')
    assert load_config(path).model.server.stall_timeout == 0


# --- live byte counts of SFTP transfers served by worker processes (/api/sessions) ---------------


def test_admin_sessions_show_live_bytes_of_a_worker_upload(daemons, token_hash):  # noqa: F811
    d = daemons.start(admin_toml(token_hash), sftp_extra="processes = 2")
    d.home("alice").mkdir(parents=True, exist_ok=True)
    client = paramiko_client(d, password=ALICE_PASSWORD)
    try:
        f = client.open("/live.bin", "w")
        f.write(b"a" * 100_000)
        f.flush()

        def running_bytes() -> int:
            for s in get(d, "/api/sessions"):
                for t in s["transfers"]:
                    if t["path"] == "/live.bin" and t["bytes"] > 0:
                        return t["bytes"]
            f.write(b"b" * 1000)  # the count travels with the bytes: keep some moving, paused between
            f.flush()
            return 0

        assert wait_for(running_bytes, timeout=15, what="a live byte count") >= 100_000
        f.close()
    finally:
        client.get_channel().get_transport().close()
