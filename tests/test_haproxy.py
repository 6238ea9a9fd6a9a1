"""Behind a load balancer: a real HAProxy (tests/haproxykit.py) in front of a real daemon.

The addresses prove which one the daemon uses. HAProxy listens on 127.0.0.2 and reaches the
daemon (on 127.0.0.1) from 127.0.0.1, the one trusted proxy. Clients connect to HAProxy from
127.0.0.3 (their bind address). alice may log in only from 127.0.0.3 (``allowed_ips``), so a
login through HAProxy succeeds only if the daemon took the client's address from the PROXY
header; the logs, the connect event and the defender's ban name 127.0.0.3 (or the attacker's
127.0.0.5), never the proxy's 127.0.0.1. A PROXY header sent straight to the daemon from
127.0.0.4, which is not trusted, is refused and scored.
"""

from __future__ import annotations

import ftplib
import io
import os
import re
import socket
import struct
import subprocess
import time

import paramiko
import pytest

from conftest import ALICE_PASSWORD, SSH_OPTS, Daemon, DaemonFactory, require_tool, toml_str
from haproxykit import HAProxy, Route, free_port, free_port_range

CLIENT = "127.0.0.3"
ATTACKER = "127.0.0.5"
UNTRUSTED = "127.0.0.4"
PROXY_BIND = "127.0.0.2"
PASSIVE = 4


def users(d: DaemonFactory) -> str:
    return f"""
[[users]]
name = "alice"
password_hash = {toml_str(d.hashes['alice'])}
public_keys = [{toml_str(d.alice_key.public_line)}]
home = "homes/alice"
permissions = {{ "/" = ["*"] }}
allowed_ips = ["{CLIENT}/32"]
"""


@pytest.fixture
def haproxy_path() -> str:
    """HAProxy lives in /usr/sbin, which a normal user's PATH may lack; missing, the test
    skips on a laptop and fails in CI (require_tool)."""
    return "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else require_tool("haproxy")


@pytest.fixture
def balanced(daemons: DaemonFactory, haproxy_path: str):
    """A daemon with SSH, FTP (passive range behind HAProxy too) and HTTP, and HAProxy in front:
    SSH with send-proxy (v1), FTP and its passive ports and HTTP with send-proxy-v2, and a
    second HTTP route in HTTP mode with X-Forwarded-For."""
    first = free_port_range(PASSIVE, hosts=("127.0.0.1", PROXY_BIND))
    d = daemons.start(f"""
[cluster]
trusted_proxies = ["127.0.0.1/32"]

[ftp]
enabled = true
listen = "127.0.0.1:0"
passive_ports = "{first}-{first + PASSIVE - 1}"
masquerade_address = "{PROXY_BIND}"

[http]
enabled = true
listen = "127.0.0.1:0"

[defender]
allow_list = ["127.0.0.1/32"]
threshold = 3
""", users=users(daemons))
    ports = {name: free_port(PROXY_BIND) for name in ("ssh", "ftp", "http", "http_xff")}
    h = HAProxy.start([
        Route("ssh", PROXY_BIND, ports["ssh"], ("127.0.0.1", d.ports["sftp"]), proxy="v1"),
        Route("ftp", PROXY_BIND, ports["ftp"], ("127.0.0.1", d.ports["ftp"]), proxy="v2"),
        Route("ftp_data", PROXY_BIND, f"{first}-{first + PASSIVE - 1}", ("127.0.0.1", 0), proxy="v2"),
        Route("http", PROXY_BIND, ports["http"], ("127.0.0.1", d.ports["http"]), proxy="v2"),
        Route("http_xff", PROXY_BIND, ports["http_xff"], ("127.0.0.1", d.ports["http"]), proxy="http"),
    ])
    try:
        yield d, h, ports
    finally:
        h.stop()


def sftp_via(port: int, source: str, key, commands: str) -> subprocess.CompletedProcess[str]:
    require_tool("sftp")
    return subprocess.run(
        ["sftp", "-b", "-", "-i", str(key.private), "-P", str(port), *SSH_OPTS, "-o", f"BindAddress={source}",
         f"alice@{PROXY_BIND}"], input=commands, text=True, capture_output=True, timeout=60)


def curl_via(port: int, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    require_tool("curl")
    return subprocess.run(["curl", "-sS", "--interface", source, "-u", f"alice:{ALICE_PASSWORD}",
                           "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60)


def test_sftp_through_haproxy_send_proxy_v1(balanced, alice_key, tmp_path):
    d, h, ports = balanced
    src = tmp_path / "up.txt"
    src.write_text("through the balancer\n")
    proc = sftp_via(ports["ssh"], CLIENT, alice_key, f"put {src} /up.txt\nls\n")
    assert proc.returncode == 0, proc.stderr + d.log_text()[-3000:]
    assert (d.home() / "up.txt").read_text() == "through the balancer\n"
    d.wait_log(rf"user=alice proto=sftp ip={CLIENT}\] login ok \(publickey\)")
    d.wait_log(rf"connect {CLIENT}\b")
    assert not re.search(r"ip=127\.0\.0\.1\] (login ok|upload)", d.log_text())
    # through the same proxy from an address not in allowed_ips: refused (the proxy's own
    # 127.0.0.1 is not in it either, so the login above used the header's address)
    denied = sftp_via(ports["ssh"], "127.0.0.6", alice_key, "ls\n")
    assert denied.returncode != 0
    d.wait_log(r"ip=127\.0\.0\.6\] login failed for 'alice'")


def test_http_through_haproxy_v2_and_x_forwarded_for(balanced, tmp_path):
    d, h, ports = balanced
    (d.home()).mkdir(parents=True, exist_ok=True)
    (d.home() / "hello.txt").write_text("hello\n")
    r = curl_via(ports["http"], CLIENT, f"http://{PROXY_BIND}:{ports['http']}/hello.txt")
    assert r.stdout.endswith("\n200") and r.stdout.startswith("hello"), r.stdout + r.stderr + d.log_text()[-3000:]
    # HAProxy in HTTP mode appends the client's address to X-Forwarded-For; whatever the client
    # wrote on the left is not believed
    r = curl_via(ports["http_xff"], CLIENT, "-H", "X-Forwarded-For: 10.9.9.9",
                 f"http://{PROXY_BIND}:{ports['http_xff']}/hello.txt")
    assert r.stdout.endswith("\n200"), r.stdout + r.stderr + d.log_text()[-3000:]
    r = curl_via(ports["http_xff"], "127.0.0.6", f"http://{PROXY_BIND}:{ports['http_xff']}/hello.txt")
    assert r.stdout.endswith("\n403"), r.stdout  # 127.0.0.6 is not in alice's allowed_ips
    text = d.log_text()
    assert re.search(rf"proto=http ip={CLIENT}\] login ok", text) and "10.9.9.9" not in text
    assert not re.search(r"ip=127\.0\.0\.1\] login ok", text)


def test_ftp_through_haproxy_passive_data_carries_its_own_header(balanced):
    d, h, ports = balanced
    c = ftplib.FTP(source_address=(CLIENT, 0), timeout=30)
    c.connect(PROXY_BIND, ports["ftp"])
    c.login("alice", ALICE_PASSWORD)
    c.set_pasv(True)
    c.storbinary("STOR /f.bin", io.BytesIO(b"x" * 100_000))
    host, port = ftplib.parse227(c.sendcmd("PASV"))
    assert host == PROXY_BIND  # the masquerade address: the balancer's
    out = io.BytesIO()
    c.retrbinary("RETR /f.bin", out.write)
    assert out.getvalue() == b"x" * 100_000
    names = c.nlst("/")
    assert "f.bin" in names
    c.quit()
    assert (d.home() / "f.bin").stat().st_size == 100_000
    d.wait_log(rf"connect {CLIENT}\b")
    assert "Rejected data connection" not in d.log_text()


def test_proxy_header_from_untrusted_address_is_refused_and_scored(balanced):
    d, h, ports = balanced
    v1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 22\r\n"
    v2 = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + socket.inet_aton("203.0.113.9") + socket.inet_aton("127.0.0.1")
          + struct.pack("!HH", 5555, 22))
    for port, header, hello in ((d.ports["sftp"], v1, b"SSH-2.0-x\r\n"), (d.ports["http"], v2, b"GET / HTTP/1.1\r\n\r\n"),
                                (d.ports["ftp"], v1, b"")):
        s = socket.socket()
        s.settimeout(15)
        s.bind((UNTRUSTED, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(header + hello)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except OSError:
            pass
        s.close()
        assert b"200 OK" not in got and b"230" not in got
    d.wait_log(rf"banned {UNTRUSTED} .*PROXY protocol header from an address not in", timeout=20)
    text = d.log_text()  # each front end refused it, once
    for rx in (r"ssh handshake failed: .*PROXY protocol header", r"HTTP connection closed: PROXY protocol header",
               r"FTP connection closed: PROXY protocol header"):
        assert len(re.findall(rf"ip={UNTRUSTED}\] {rx}", text)) == 1, (rx, text[-3000:])
    assert "203.0.113.9" not in d.log_text()


def test_proxy_v2_header_from_untrusted_address_on_ssh_and_ftp(balanced):
    d, h, ports = balanced
    v2 = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + socket.inet_aton("203.0.113.9")
          + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 5555, 22))
    for port in (d.ports["sftp"], d.ports["ftp"]):
        s = socket.socket()
        s.settimeout(15)
        s.bind(("127.0.0.7", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(v2 + b"SSH-2.0-x\r\n")
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
        s.close()
    d.wait_log(r"ip=127\.0\.0\.7\] ssh handshake failed: .*PROXY protocol header")
    d.wait_log(r"ip=127\.0\.0\.7\] FTP connection closed: PROXY protocol header")
    assert "203.0.113.9" not in d.log_text()


def test_defender_bans_the_real_client_not_the_proxy(balanced, alice_key):
    d, h, ports = balanced
    for _ in range(3):
        t = paramiko.Transport(_sock_from(ATTACKER, PROXY_BIND, ports["ssh"]))
        try:
            t.start_client(timeout=20)
            with pytest.raises(paramiko.AuthenticationException):
                t.auth_password("alice", "wrong")
        finally:
            t.close()
    d.wait_log(rf"banned {ATTACKER} ")
    assert "banned 127.0.0.1" not in d.log_text()
    # the real client behind the same proxy goes on
    proc = sftp_via(ports["ssh"], CLIENT, alice_key, "ls\n")
    assert proc.returncode == 0, proc.stderr
    # and the banned one is refused through it
    proc = sftp_via(ports["ssh"], ATTACKER, alice_key, "ls\n")
    assert proc.returncode != 0


def _sock_from(source: str, host: str, port: int) -> socket.socket:
    s = socket.socket()
    s.settimeout(20)
    s.bind((source, 0))
    s.connect((host, port))
    return s


def test_trusted_proxy_without_header_is_closed(balanced):
    """From a trusted address the header is required on SSH and FTP (HAProxy's accept-proxy):
    a balancer that forgot send-proxy would make every client look like itself."""
    d, h, ports = balanced
    s = socket.create_connection(("127.0.0.1", d.ports["sftp"]), timeout=15)
    s.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    started = time.monotonic()
    try:
        data = s.recv(100)
    except OSError:
        data = b""
    s.close()
    assert not data.startswith(b"SSH-"), data
    assert time.monotonic() - started < 10
    d.wait_log(r"connection from trusted proxy 127\.0\.0\.1 closed: no PROXY header")


def test_sftp_through_haproxy_in_a_single_process(daemons: DaemonFactory, haproxy_path: str, alice_key, tmp_path):
    """``[sftp] processes = 1``: the header is read by the connection's own thread in the daemon
    (the worker pool reads it in the core before handing the connection over)."""
    d = daemons.start('[cluster]\ntrusted_proxies = ["127.0.0.1/32"]\n', users=users(daemons),
                      sftp_extra="processes = 1")
    port = free_port(PROXY_BIND)
    h = HAProxy.start([Route("ssh", PROXY_BIND, port, ("127.0.0.1", d.port), proxy="v2")])
    try:
        proc = sftp_via(port, CLIENT, alice_key, "ls\n")
        assert proc.returncode == 0, proc.stderr + d.log_text()[-3000:]
        d.wait_log(rf"user=alice proto=sftp ip={CLIENT}\] login ok \(publickey\)")
        assert sftp_via(port, "127.0.0.6", alice_key, "ls\n").returncode != 0
    finally:
        h.stop()
