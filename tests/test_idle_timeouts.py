"""Logged-in connections that go quiet: ``[ftp]``, ``[http]`` and ``[admin]`` ``idle_timeout``.

Short values through a real daemon: a logged-in FTP control connection that sends
nothing gets ``421 Control connection timed out.`` and is closed, while one that keeps
sending NOOPs outlives the timeout; a kept-alive HTTP connection and a kept-alive admin
connection are closed after their own timeouts. ``[server] preauth_timeout`` is left at
30 s, so only the idle timeouts can close these connections within the bounds asserted.
"""

from __future__ import annotations

import ftplib
import socket
import time

import pytest

from adminkit import TOKEN, admin_toml, token_hash  # noqa: F401  (fixture)
from conftest import ALICE_PASSWORD
from httpkit import basic

FTP_IDLE, HTTP_IDLE, ADMIN_IDLE = 2.0, 1.5, 1.5
PREAUTH = 30.0
CLOSED_WITHIN = 20.0  # seconds past the timeout, on a loaded machine; preauth would take 30


@pytest.fixture(scope="module")
def d(module_daemons, token_hash):  # noqa: F811
    extra = (f'[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = ""\nidle_timeout = {FTP_IDLE}\n'
             f'\n[http]\nenabled = true\nlisten = "127.0.0.1:0"\nidle_timeout = {HTTP_IDLE}\n'
             + admin_toml(token_hash).replace("[admin]\n", f"[admin]\nidle_timeout = {ADMIN_IDLE}\n"))
    daemon = module_daemons.start(extra, server_extra=f"preauth_timeout = {PREAUTH}")
    daemon.home("alice").mkdir(parents=True, exist_ok=True)
    (daemon.home("alice") / "small.txt").write_bytes(b"small\n")
    return daemon


def _closed_after(s: socket.socket, since: float) -> tuple[float, bytes]:
    """Seconds from ``since`` until the server closed ``s``, and what it sent meanwhile."""
    got = b""
    deadline = since + PREAUTH - 1
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"still open after {PREAUTH - 1:g}s; got {got!r}"
        s.settimeout(remaining)
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return time.monotonic() - since, got
        got += chunk


def _keep_alive_request(port: int, head: str) -> tuple[socket.socket, float]:
    """One HTTP/1.1 request on a raw socket, its whole response read; the socket stays open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head.encode())
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(4096)
    head_bytes, _, body = got.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 200"), head_bytes
    length = int([line.split(b":", 1)[1] for line in head_bytes.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")][0])
    while len(body) < length:
        body += s.recv(4096)
    return s, time.monotonic()


def test_a_quiet_logged_in_ftp_connection_is_closed_with_421(d):
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    ftp.login("alice", ALICE_PASSWORD)
    quiet_since = time.monotonic()  # the timer restarts when the server reads a command:
    assert ftp.voidcmd("NOOP").startswith("200")  # this one, read after quiet_since
    try:
        took, said = _closed_after(ftp.sock, quiet_since)
    finally:
        ftp.close()
    assert b"421 Control connection timed out." in said
    assert FTP_IDLE * 0.9 <= took < FTP_IDLE + CLOSED_WITHIN


def test_an_ftp_connection_that_keeps_talking_outlives_the_idle_timeout(d):
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    try:
        ftp.login("alice", ALICE_PASSWORD)
        start = time.monotonic()
        while time.monotonic() - start < FTP_IDLE * 2:
            assert ftp.voidcmd("NOOP").startswith("200")
            time.sleep(FTP_IDLE / 10)
        assert ftp.pwd() == "/"
    finally:
        ftp.close()


def test_a_kept_alive_http_connection_is_closed_after_its_idle_timeout(d):
    s, answered = _keep_alive_request(
        d.ports["http"], f"GET /small.txt HTTP/1.1\r\nHost: x\r\nAuthorization: {basic()}\r\n\r\n")
    try:
        took, said = _closed_after(s, answered)
    finally:
        s.close()
    assert said == b""
    assert HTTP_IDLE * 0.9 <= took < HTTP_IDLE + CLOSED_WITHIN


def test_a_kept_alive_admin_connection_is_closed_after_its_idle_timeout(d):
    s, answered = _keep_alive_request(
        d.ports["admin"], f"GET /api/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
    try:
        took, said = _closed_after(s, answered)
    finally:
        s.close()
    assert said == b""
    assert ADMIN_IDLE * 0.9 <= took < ADMIN_IDLE + CLOSED_WITHIN
