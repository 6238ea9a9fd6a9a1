"""The defender: automatic bans per source address, rate limits and connection caps.

Every test client comes from the loopback network, which the default allow-list
protects; so the attacker here binds its socket to another loopback address
(127.0.0.2 and up: Linux routes all of 127/8 to lo) while the legitimate user
stays on 127.0.0.1, allow-listed. That shows both halves: the attacker banned,
the user served.
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import pytest

from conftest import ALICE_PASSWORD, BIN, Daemon, DaemonFactory, close_client, paramiko_client
from test_scripting import binding, write_script


def defender_toml(**kw: object) -> str:
    lines = ["[defender]"]
    for k, v in kw.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, list):
            lines.append(f"{k} = [" + ", ".join(f'"{x}"' for x in v) + "]")
        else:
            lines.append(f"{k} = {v}")
    return "\n".join(lines) + "\n"


# The legitimate user keeps 127.0.0.1 (allow-listed); attackers use 127.0.0.2+.
LEGIT_ONLY = ["127.0.0.1/32"]


def sock_from(daemon: Daemon, source: str, port: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(20)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port or daemon.port))
    return s


def transport_from(daemon: Daemon, source: str) -> paramiko.Transport:
    t = paramiko.Transport(sock_from(daemon, source))
    t.start_client(timeout=20)
    return t


def fail_password(daemon: Daemon, source: str, user: str = "alice", tries: int = 1) -> None:
    """Wrong passwords from ``source`` on one connection."""
    t = transport_from(daemon, source)
    try:
        for _ in range(tries):
            with pytest.raises(paramiko.AuthenticationException):
                t.auth_password(user, "wrong-" + ALICE_PASSWORD)
    finally:
        t.close()


def refusal_text(daemon: Daemon, source: str, port: int | None = None) -> str:
    """Connect raw and return the reason of the server's SSH_MSG_DISCONNECT ('' if none)."""
    s = sock_from(daemon, source, port)
    try:
        s.sendall(b"SSH-2.0-probe\r\n")  # an admitted connection then gets the server's KEXINIT at once
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
            if b"\r\n" in data and len(data) > data.index(b"\r\n") + 2 + 20:
                break
    finally:
        s.close()
    if b"\r\n" not in data:
        return ""
    packet = data[data.index(b"\r\n") + 2:]
    if len(packet) < 10 or packet[5] != 1:
        return ""  # not a DISCONNECT (e.g. the server's KEXINIT: the connection was admitted)
    (n,) = struct.unpack(">I", packet[10:14])
    return packet[14:14 + n].decode()


def alice_can_download(daemon: Daemon) -> bool:
    client = paramiko_client(daemon, password=ALICE_PASSWORD)
    try:
        return client.open("hello.txt").read() == b"hello\n"
    finally:
        close_client(client)


def seed(d: Daemon) -> None:
    d.home("alice").mkdir(parents=True, exist_ok=True)
    (d.home("alice") / "hello.txt").write_text("hello\n")


def test_ban_after_repeated_failures_sftp_and_user_still_served(daemons: DaemonFactory):
    d = daemons.start(defender_toml(allow_list=LEGIT_ONLY, threshold=5, score_unknown_user=2))
    seed(d)
    fail_password(d, "127.0.0.2", tries=2)  # score 2
    fail_password(d, "127.0.0.2", user="nobody")  # unknown user: +2 -> 4
    assert "banned 127.0.0.2" not in d.log_text()
    fail_password(d, "127.0.0.2")  # 5: banned
    d.wait_log(r"banned 127\.0\.0\.2 for 1800s \(ban #1\): score 5 >= 5")
    # refused at connect, with a reason the client can show, before any key exchange
    assert "is banned until" in refusal_text(d, "127.0.0.2")
    with pytest.raises(paramiko.SSHException):
        transport_from(d, "127.0.0.2")
    d.wait_log(r"\[ip=127\.0\.0\.2\] connect refused: address 127\.0\.0\.2 is banned until")
    # the ban is per address: alice on 127.0.0.1 goes on
    assert alice_can_download(d)
    # OpenSSH shows the reason too
    proc = subprocess.run(
        ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
         "-o", "BindAddress=127.0.0.2", "-p", str(d.port), "alice@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode != 0 and "is banned until" in proc.stderr, proc.stderr


def test_held_open_connection_is_cut_when_banned(daemons: DaemonFactory):
    """One connection trying password after password: once banned, no more hashing."""
    d = daemons.start(defender_toml(allow_list=LEGIT_ONLY, threshold=3))
    t = transport_from(d, "127.0.0.2")
    try:
        for _ in range(3):
            with pytest.raises(paramiko.AuthenticationException):
                t.auth_password("alice", "wrong")
        d.wait_log(r"banned 127\.0\.0\.2")
        with pytest.raises((paramiko.SSHException, EOFError, OSError)):
            t.auth_password("alice", ALICE_PASSWORD)  # even the right password: the address is banned
    finally:
        t.close()
    assert len(re.findall(r"login failed for 'alice'", d.log_text())) == 3


def test_ban_survives_restart_and_cli_unban(daemons: DaemonFactory):
    extra = defender_toml(allow_list=LEGIT_ONLY, threshold=2)
    d = daemons.start(extra)
    fail_password(d, "127.0.0.3", tries=2)
    d.wait_log(r"banned 127\.0\.0\.3")
    assert d.stop() == 0
    d2 = daemons.start(extra, config=d.config)
    assert "is banned until" in refusal_text(d2, "127.0.0.3")
    listed = subprocess.run([str(BIN), "bans", "-c", str(d2.config)], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and listed.stdout.startswith("127.0.0.3\tuntil "), listed
    # unban from the command line, against the daemon's live database: effective at once
    out = subprocess.run([str(BIN), "unban", "-c", str(d2.config), "127.0.0.3"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "unbanned" in out.stdout, out
    assert refusal_text(d2, "127.0.0.3") == ""  # admitted: the server sent its KEXINIT
    again = subprocess.run([str(BIN), "unban", "-c", str(d2.config), "127.0.0.3"], capture_output=True, text=True,
                           timeout=30)
    assert again.returncode == 1 and "was not banned" in again.stdout


def test_allow_list_is_never_banned(daemons: DaemonFactory):
    d = daemons.start(defender_toml(threshold=2))  # default allow-list: loopback
    seed(d)
    fail_password(d, "127.0.0.1", tries=3)
    fail_password(d, "127.0.0.2", user="nobody", tries=2)
    assert alice_can_download(d)
    assert refusal_text(d, "127.0.0.2") == ""
    assert "banned" not in d.log_text()


def test_protocol_errors_add_to_the_score(daemons: DaemonFactory):
    """Port scanners and probes never finish the SSH handshake."""
    d = daemons.start(defender_toml(allow_list=LEGIT_ONLY, threshold=3))
    for i in range(3):
        s = sock_from(d, "127.0.0.4")
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.close()
    d.wait_log(r"banned 127\.0\.0\.4 .*last: protocol_error \(ssh handshake failed")


def test_rate_limit_per_address(daemons: DaemonFactory):
    d = daemons.start(defender_toml(allow_list=LEGIT_ONLY, rate_per_ip=0.05, burst_per_ip=2,
                                    score_limit_exceeded=0))
    assert refusal_text(d, "127.0.0.5") == ""
    assert refusal_text(d, "127.0.0.5") == ""
    assert "too many new connections from 127.0.0.5 (limit 0.05/s, burst 2)" in refusal_text(d, "127.0.0.5")
    assert refusal_text(d, "127.0.0.6") == ""  # another address has its own bucket
    assert "banned" not in d.log_text()  # score_limit_exceeded = 0


def test_rate_limit_refusals_can_ban(daemons: DaemonFactory):
    d = daemons.start(defender_toml(allow_list=LEGIT_ONLY, rate_per_ip=0.05, burst_per_ip=1, threshold=6,
                                    score_limit_exceeded=3, score_protocol_error=0))
    assert refusal_text(d, "127.0.0.5") == ""
    for _ in range(2):
        assert "too many new connections" in refusal_text(d, "127.0.0.5")
    d.wait_log(r"banned 127\.0\.0\.5 .*last: limit_exceeded")
    assert "is banned until" in refusal_text(d, "127.0.0.5")


def _wait_count(d: Daemon, pattern: str, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, d.log_text())) < n:
        assert time.monotonic() < deadline, f"fewer than {n} lines matching {pattern!r}:\n{d.log_text()[-3000:]}"
        time.sleep(0.05)  # polling the log: the lines come from another process


def test_connection_caps(daemons: DaemonFactory):
    d = daemons.start(defender_toml(allow_list=LEGIT_ONLY, max_connections=3, max_connections_per_ip=1,
                                    score_limit_exceeded=0, score_protocol_error=0))
    held = [sock_from(d, "127.0.0.7")]
    _wait_count(d, r"connect 127\.0\.0\.7", 1)
    assert "too many connections from 127.0.0.7 (limit 1)" in refusal_text(d, "127.0.0.7")
    held.append(sock_from(d, "127.0.0.1"))  # allow-listed: no per-address limit
    held.append(sock_from(d, "127.0.0.1"))
    _wait_count(d, r"connect 127\.0\.0\.1", 2)
    assert "server busy: too many connections (limit 3)" in refusal_text(d, "127.0.0.8")
    for s in held:
        s.close()
    _wait_count(d, r"ssh handshake failed", 3)  # the held sockets' slots are given back
    assert refusal_text(d, "127.0.0.8") == ""


CONNECT_SCRIPT = """
def on_connect(event, api):
    api.log("connect seen", ip=event.remote_ip, score=event.defender_score, before=event.banned_before)
    if event.remote_ip == "127.0.0.9":
        api.veto("not from there")
"""


def test_connect_event_sees_the_score_and_vetoes_count(daemons: DaemonFactory):
    write_script(daemons, "door.py", CONNECT_SCRIPT)
    d = daemons.start(defender_toml(allow_list=LEGIT_ONLY, threshold=6, ban_time=1)
                      + binding("connect", "door.py"))
    fail_password(d, "127.0.0.2", tries=2)
    fail_password(d, "127.0.0.2", user="nobody")  # 1 + 1 + 2
    t = transport_from(d, "127.0.0.2")
    t.close()
    d.wait_log(r"connect seen.*ip=127\.0\.0\.2 score=4 before=False")
    # a vetoed connect scores 3: two of them ban the address, and the script no longer runs for it
    assert refusal_text(d, "127.0.0.9") == "not from there"
    assert refusal_text(d, "127.0.0.9") == "not from there"
    d.wait_log(r"banned 127\.0\.0\.9 .*last: connect_vetoed \(not from there\)")
    seen = len(re.findall(r"connect seen.*ip=127\.0\.0\.9", d.log_text()))
    assert "is banned until" in refusal_text(d, "127.0.0.9")
    assert len(re.findall(r"connect seen.*ip=127\.0\.0\.9", d.log_text())) == seen == 2
    # ban_time = 1 s: once it ended, the connect event says the address was banned before
    deadline = time.monotonic() + 30
    while "is banned until" in refusal_text(d, "127.0.0.9"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    d.wait_log(r"connect seen.*ip=127\.0\.0\.9 score=0 before=True")


def test_reload_applies_new_defender_settings(daemons: DaemonFactory):
    d = daemons.start(defender_toml(allow_list=["127.0.0.0/8"], threshold=2))
    fail_password(d, "127.0.0.2", tries=2)
    assert "banned" not in d.log_text()
    n = len(d.lines)
    daemons.write_config(defender_toml(allow_list=LEGIT_ONLY, threshold=2))
    d.signal(signal.SIGHUP)
    d.wait_log(r"configuration reloaded", start=n)
    fail_password(d, "127.0.0.2", tries=2)
    d.wait_log(r"banned 127\.0\.0\.2")


def test_ftp_failures_ban_across_protocols(daemons: DaemonFactory):
    import ftplib

    from scriptsftp.server.frontends.ftp import listener as ftp_module

    if not hasattr(ftp_module, "make_listener"):
        pytest.skip("the FTP front end has not landed yet")
    d = daemons.start(defender_toml(allow_list=LEGIT_ONLY, threshold=4) + '\n[ftp]\nenabled = true\n'
                      'listen = "127.0.0.1:0"\n')
    port = d.ports["ftp"]
    fail_password(d, "127.0.0.2", tries=2)  # 2 over SFTP
    for _ in range(2):  # 2 over FTP
        f = ftplib.FTP()
        f.connect("127.0.0.1", port, timeout=20, source_address=("127.0.0.2", 0))
        with pytest.raises(ftplib.error_perm):
            f.login("alice", "wrong")
        f.close()
    d.wait_log(r"banned 127\.0\.0\.2")
    with pytest.raises((ftplib.Error, OSError, EOFError)):
        f = ftplib.FTP()
        f.connect("127.0.0.1", port, timeout=20, source_address=("127.0.0.2", 0))
        f.login("alice", ALICE_PASSWORD)
    assert "is banned until" in refusal_text(d, "127.0.0.2")  # and on SFTP


def test_burst_of_failed_logins_is_absorbed(daemons: DaemonFactory):
    """300 failed password logins from 8 threads: the attacker is cut at connect after
    the threshold, so few passwords are ever hashed, and alice keeps downloading."""
    d = daemons.start(defender_toml(allow_list=LEGIT_ONLY, threshold=10, rate_per_ip=0,
                                    max_connections_per_ip=0))
    seed(d)
    (d.home("alice") / "big.bin").write_bytes(b"x" * (4 << 20))

    def attempt(_: int) -> str:
        try:
            t = transport_from(d, "127.0.0.2")
        except (paramiko.SSHException, EOFError, OSError):
            return "refused"
        try:
            t.auth_password("alice", "wrong")
            return "in?!"
        except paramiko.AuthenticationException:
            return "failed"
        except (paramiko.SSHException, EOFError, OSError):
            return "cut"
        finally:
            t.close()

    results: list[str] = []
    done = threading.Event()

    def attack() -> None:
        with ThreadPoolExecutor(8) as pool:
            results.extend(pool.map(attempt, range(300)))
        done.set()

    threading.Thread(target=attack, daemon=True).start()
    downloads = 0
    client = paramiko_client(d, password=ALICE_PASSWORD)
    try:
        while not done.is_set() or downloads < 3:
            with client.open("big.bin") as f:
                f.prefetch()
                assert len(f.read()) == 4 << 20
            downloads += 1
    finally:
        close_client(client)
    assert "in?!" not in results
    assert results.count("refused") >= 250, results
    hashed = len(re.findall(r"login failed for 'alice'", d.log_text()))
    assert hashed < 10 + 8 + 2, f"{hashed} passwords checked for a banned address"
    d.wait_log(r"banned 127\.0\.0\.2")


def test_defender_unit_ban_time_grows_and_is_capped(tmp_path: Path):
    from scriptsftp.server.support.config import DefenderSection
    from scriptsftp.server.ops.defender import Defender
    from scriptsftp.server.stores import StateStores

    now = [1000.0]
    settings = DefenderSection(threshold=2, ban_time=10.0, ban_time_multiplier=3.0, max_ban_time=50.0,
                               allow_list=["10.0.0.0/8"])
    d = Defender(StateStores(tmp_path), settings, clock=lambda: now[0])
    durations = []
    for _ in range(4):
        assert not d.record("192.0.2.1", "login_failed")
        assert d.record("192.0.2.1", "login_failed")
        (ban,) = d.bans()
        assert ban["ip"] == "192.0.2.1" and ban["score"] == 2
        durations.append(ban["banned_until"] - now[0])
        assert d.admit("192.0.2.1") is not None
        now[0] = ban["banned_until"] + 1
        assert d.bans() == [] and d.admit("192.0.2.1") is None
        d.release("192.0.2.1")
    assert durations == [10.0, 30.0, 50.0, 50.0]
    assert d.bans() == []
    # the repeat counter is forgotten after max_ban_time without a ban
    now[0] += 51
    d.record("192.0.2.1", "login_failed")
    d.record("192.0.2.1", "login_failed")
    assert d.bans()[0]["ban_count"] == 1
    assert d.unban("192.0.2.1") and not d.unban("192.0.2.1") and d.bans() == []
    # score window: points older than observation_window no longer count
    d.record("192.0.2.2", "login_failed")
    now[0] += settings.observation_window + 1
    assert not d.record("192.0.2.2", "login_failed")
    assert d.host_info("192.0.2.2").score == 1
    # allow-list, unban, stats
    assert not d.record("10.1.2.3", "unknown_user") and not d.record("10.1.2.3", "unknown_user")
    # one spelling per address: an IPv4 client on a dual-stack socket is the same address
    d.record("::ffff:192.0.2.9", "login_failed")
    assert d.record("192.0.2.9", "login_failed")
    assert d.admit("::ffff:192.0.2.9") is not None and d.unban("::ffff:192.0.2.9")
    stats = d.stats()
    assert stats["bans_total"] == 6 and stats["active_bans"] == 0 and stats["rejected_connections"] == 5
    d.close()
    # persisted: a new Defender on the same file sees the state
    d2 = Defender(StateStores(tmp_path), settings, clock=lambda: now[0])
    assert d2.host_info("192.0.2.2").score == 1
    d2.close()


def test_defender_unit_allow_list_follows_reload(tmp_path: Path):
    """The allow list remembers its answers per address: a reload must still change them."""
    from scriptsftp.server.support.config import DefenderSection
    from scriptsftp.server.ops.defender import Defender
    from scriptsftp.server.stores import StateStores

    d = Defender(StateStores(tmp_path), DefenderSection(allow_list=["10.0.0.0/8"]))
    for _ in range(2):  # the second round is answered from memory
        assert d.allowed_listed("10.1.2.3") and d.allowed_listed("::ffff:10.1.2.3")
        assert not d.allowed_listed("192.0.2.1") and not d.allowed_listed("not an address")
    d.configure(DefenderSection(allow_list=["192.0.2.0/24"]))
    assert not d.allowed_listed("10.1.2.3") and d.allowed_listed("192.0.2.1")
    d.close()


def test_config_errors_name_the_key(tmp_path: Path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[defender]\nthreshold = 0\nallow_list = ["10.0.0.300/8"]\nban_time = 100.0\n'
                   'max_ban_time = 10.0\nrate = 3\n')
    proc = subprocess.run([str(BIN), "check", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    err = proc.stderr
    assert f"{cfg}:2: defender.threshold:" in err
    assert f"{cfg}:3: defender.allow_list" in err and "not an IP address" in err
    assert f"{cfg}:6: defender.rate: unknown key" in err


def test_unban_through_the_admin_api(daemons: DaemonFactory):
    import json
    import urllib.request

    from scriptsftp.server.ops import admin as admin_module

    if not hasattr(admin_module, "make_listener"):
        pytest.skip("the admin API has not landed yet")
    d = daemons.start(defender_toml(allow_list=LEGIT_ONLY, threshold=2)
                      + '\n[admin]\nenabled = true\nlisten = "127.0.0.1:0"\n')
    base = f"http://127.0.0.1:{d.ports['admin']}"
    fail_password(d, "127.0.0.2", tries=2)
    d.wait_log(r"banned 127\.0\.0\.2")
    with urllib.request.urlopen(base + "/api/bans", timeout=20) as r:
        (ban,) = json.load(r)
    assert ban["ip"] == "127.0.0.2" and ban["ban_count"] == 1 and ban["banned_until"] > time.time()
    req = urllib.request.Request(base + "/api/bans/127.0.0.2", method="DELETE")
    with urllib.request.urlopen(req, timeout=20) as r:
        assert r.status == 200
    assert refusal_text(d, "127.0.0.2") == ""
    with urllib.request.urlopen(base + "/metrics", timeout=20) as r:
        metrics = r.read().decode()
    assert "scriptsftp_bans 0.0" in metrics


# --- many addresses against one account; IPv6 networks; HTTP's failure delay ------------


def test_defender_unit_ipv6_is_scored_and_banned_per_network(tmp_path: Path):
    """Rotating addresses inside one /64 (which one host usually holds) neither resets the
    score nor dodges the ban; another /64 is another host."""
    from scriptsftp.server.support.config import DefenderSection
    from scriptsftp.server.ops.defender import Defender
    from scriptsftp.server.stores import StateStores

    d = Defender(StateStores(tmp_path), DefenderSection(threshold=3, allow_list=[]))
    assert not d.record("2001:db8:1:2::1", "login_failed")
    assert not d.record("2001:db8:1:2:aaaa::2", "login_failed")
    assert d.record("2001:db8:1:2:ffff:ffff:ffff:ffff", "login_failed")
    assert d.bans()[0]["ip"] == "2001:db8:1:2::/64"
    assert d.admit("2001:db8:1:2::77") is not None  # a fresh address of the same network
    assert d.admit("2001:db8:1:3::1") is None  # the next /64
    d.release("2001:db8:1:3::1")
    assert d.unban("2001:db8:1:2::5") and d.admit("2001:db8:1:2::77") is None
    d.release("2001:db8:1:2::77")
    d.configure(DefenderSection(threshold=3, allow_list=[], ipv6_prefix=128))
    d.record("2001:db8:9::1", "login_failed")
    d.record("2001:db8:9::2", "login_failed")
    assert not d.record("2001:db8:9::3", "login_failed")  # per address now: nobody reached 3
    d.close()


def test_defender_unit_one_account_from_many_addresses_is_locked(tmp_path: Path):
    from scriptsftp.server.support.config import DefenderSection
    from scriptsftp.server.ops.defender import Defender
    from scriptsftp.server.stores import StateStores

    now = [1000.0]
    d = Defender(StateStores(tmp_path),
                 DefenderSection(user_max_failures=3, user_lock_time=60, allow_list=["10.0.0.0/8"]),
                 clock=lambda: now[0])
    assert not d.record_user_failure("alice", "192.0.2.1")
    assert not d.record_user_failure("alice", "198.51.100.7")
    assert not d.record_user_failure("alice", "10.1.1.1")  # allow-listed: does not count
    until = d.record_user_failure("alice", "203.0.113.9")
    assert until == 1060.0
    assert d.user_locked_until("alice", "192.0.2.200") == until
    assert d.user_locked_until("alice", "10.1.1.1") == 0.0  # never locked out from the allow list
    assert d.user_locked_until("bob", "192.0.2.200") == 0.0
    assert {"ip": "user:alice"}.items() <= d.bans()[0].items()
    now[0] = 1061.0
    assert d.user_locked_until("alice", "192.0.2.200") == 0.0  # expired
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        d.record_user_failure("alice", ip)
    assert d.unban("user:alice") and d.user_locked_until("alice", "192.0.2.1") == 0.0
    d.close()


def test_password_guessing_from_many_addresses_locks_the_account_not_its_keys(daemons: DaemonFactory, alice_key):
    write_script(daemons, "locked.py", """
        def on_user_locked(event, api):
            api.log("locked", user=event.user, failures=event.failures, ip=event.remote_ip)
    """)
    d = daemons.start(defender_toml(allow_list=LEGIT_ONLY, user_max_failures=4, user_lock_time=600, threshold=100)
                      + binding("user-locked", "locked.py"))
    seed(d)
    for i in range(4):  # one wrong password each from four addresses: no address is banned
        fail_password(d, f"127.0.0.{10 + i}")
    d.wait_log(r"locked\.py: locked user=alice failures=4 ip=127\.0\.0\.13")
    d.wait_log(r"password logins for 'alice' locked for 600s")
    t = transport_from(d, "127.0.0.20")
    try:  # the right password, from yet another address: refused like a wrong one
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_password("alice", ALICE_PASSWORD)
        # the key still works: the lock is on guessable secrets only
        t.auth_publickey("alice", paramiko.PKey.from_path(str(alice_key.private)))
        assert t.is_authenticated()
    finally:
        t.close()
    d.wait_log(r"login failed for 'alice' \(password\): password logins for this user are locked until")
    assert alice_can_download(d)  # 127.0.0.1 is allow-listed: never locked out
    out = subprocess.run([str(BIN), "bans", "-c", str(d.config)], capture_output=True, text=True)
    assert "user:alice" in out.stdout
    assert subprocess.run([str(BIN), "unban", "-c", str(d.config), "user:alice"]).returncode == 0
    t = transport_from(d, "127.0.0.20")
    try:
        t.auth_password("alice", ALICE_PASSWORD)
        assert t.is_authenticated()
    finally:
        t.close()


def test_failed_http_logins_do_not_hold_the_login_threads(daemons: DaemonFactory):
    """The failure delay used to sleep in one of 8 auth threads: a handful of bad logins a
    second kept a good login waiting for seconds. Measured against the delay, not the clock:
    the good login (its password cached by a first one, so it needs a thread and no argon2
    check) must be answered while every bad one is still waiting out its delay, whatever the
    machine's load; with the old bug it waited for the first delays to end."""
    from httpkit import request

    delay = 20.0
    path = daemons.write_config("[http]\nenabled = true\nlisten = \"127.0.0.1:0\"\n")
    path.write_text(path.read_text().replace("login_failure_delay = 0.05", f"login_failure_delay = {delay}"))
    d = daemons.start(config=path)
    seed(d)
    assert request(d, "GET", "/hello.txt").status == 200  # verified once: the password is cached
    with ThreadPoolExecutor(16) as pool:
        bad = [pool.submit(request, d, "GET", "/hello.txt", password="wrong") for _ in range(16)]  # 2x the threads
        d.wait_log(r"login failed for 'alice' \(password\): wrong password")
        t0 = time.monotonic()
        good = request(d, "GET", "/hello.txt")
        took = time.monotonic() - t0
        answered_bad = sum(f.done() for f in bad)
        assert good.status == 200 and good.body == b"hello\n"
        assert all(f.result().status == 401 for f in bad)
    assert answered_bad == 0, f"{answered_bad} failed login(s) had served their {delay}s delay before the good one"
    assert took < delay / 2, f"a good login waited {took:.1f}s behind failed ones"
