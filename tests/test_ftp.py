"""FTP and FTPS front end against a real daemon: curl, Python ftplib, lftp, rclone.

One daemon per module serves plain FTP and explicit FTPS (``tls = "explicit"``
leaves AUTH TLS optional); implicit FTPS gets its own daemon. Scripts veto
uploads by name (pre-upload) and by content (pre-publish), so the reply that
replaces ``226`` is checked with clients that show it.
"""

from __future__ import annotations

import datetime
import ftplib
import io
import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import ALICE_PASSWORD, BOB_PASSWORD, require_tool, toml_str, user_toml, wait_staging_state

MARKER = b"EICAR-LIKE-MARKER-4d2f"
CAROL_PASSWORD = "carol-Secret-3"
DAVE_PASSWORD = "dave-Secret-4"

SCRIPT = """
import time

def on_pre_upload(event, api):
    if event.path.endswith(".exe"):
        api.veto("executables are not accepted: " + event.path)

def on_pre_publish(event, api):
    if event.path.startswith("/slow/"):
        end = time.time() + 2.5  # a slow check (time.sleep is not offered to scripts)
        while time.time() < end:
            pass
    if api.file.read().find(b"EICAR-LIKE-MARKER-4d2f") >= 0:
        api.veto("malware marker found in " + event.path)

def on_pre_delete(event, api):
    if event.path.startswith("/keep/"):
        api.veto("files in /keep stay")
"""

BINDINGS = """
[[bindings]]
event = "pre-upload"
script = "guard.py"

[[bindings]]
event = "pre-publish"
script = "guard.py"
allow = ["read"]
timeout = 10.0
cpu_time = 5.0

[[bindings]]
event = "pre-delete"
script = "guard.py"
"""


# --- certificate ------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cryptography, no openssl binary needed)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    d = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


def ftp_section(tls: str, cert: Path, key: Path, extra: str = "") -> str:
    files = f"certificate = {toml_str(str(cert))}\nprivate_key = {toml_str(str(key))}" if tls != "off" else ""
    return f"""
[ftp]
enabled = true
listen = "127.0.0.1:0"
passive_ports = "62000-62499"
tls = "{tls}"
{files}
{extra}
"""


def users_toml(password_hashes: dict[str, str], extra_hashes: dict[str, str]) -> str:
    return (
        user_toml("alice", password_hash=password_hashes["alice"])
        + user_toml("bob", password_hash=password_hashes["bob"],
                    permissions='{ "/" = ["list", "download"], "/inbox" = ["*"] }')
        + user_toml("carol", password_hash=extra_hashes["carol"], require_tls="true")
        + user_toml("dave", password_hash=extra_hashes["dave"], protocols='["sftp"]')
    )


@pytest.fixture(scope="session")
def extra_hashes() -> dict[str, str]:
    from scriptsftp.server.core.passwords import hash_password

    return {"carol": hash_password(CAROL_PASSWORD), "dave": hash_password(DAVE_PASSWORD)}


@pytest.fixture(scope="module")
def ftpd(module_daemons, tls_files, password_hashes, extra_hashes):
    (module_daemons.root / "scripts").mkdir(exist_ok=True)
    (module_daemons.root / "scripts" / "guard.py").write_text(SCRIPT)
    d = module_daemons.start(ftp_section("explicit", *tls_files) + BINDINGS,
                             users=users_toml(password_hashes, extra_hashes))
    assert "ftp" in d.ports, d.log_text()
    for u in ("alice", "bob", "carol"):
        d.home(u).mkdir(parents=True, exist_ok=True)
    (d.home("bob") / "inbox").mkdir(exist_ok=True)
    (d.home("bob") / "readme.txt").write_text("bob may read this\n")
    return d


def ftp(d, user: str = "alice", password: str = ALICE_PASSWORD) -> ftplib.FTP:
    c = ftplib.FTP()
    c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    c.login(user, password)
    return c


def ftps(d, user: str = "alice", password: str = ALICE_PASSWORD) -> ftplib.FTP_TLS:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c = ftplib.FTP_TLS(context=ctx)
    c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    c.login(user, password)  # sends AUTH TLS first
    c.prot_p()
    return c


def stor(c: ftplib.FTP, path: str, data: bytes) -> str:
    return c.storbinary(f"STOR {path}", io.BytesIO(data))


def retr(c: ftplib.FTP, path: str, rest: int | None = None) -> bytes:
    out = bytearray()
    c.retrbinary(f"RETR {path}", out.extend, rest=rest)
    return bytes(out)


def no_staging_left(home: Path) -> bool:
    return not [p for p in home.rglob(".scriptsftp-part-*")]


def curl(d, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    require_tool("curl")
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args],
                          capture_output=True, text=True, timeout=timeout + 5)


def url(d, path: str = "/", user: str = "alice", password: str = ALICE_PASSWORD, scheme: str = "ftp") -> str:
    return f"{scheme}://{user}:{password}@127.0.0.1:{d.ports['ftp']}{path}"


# --- ftplib: the command set -------------------------------------------------------------


def test_ftplib_command_set(ftpd):
    home = ftpd.home("alice")
    c = ftp(ftpd)
    try:
        assert c.sendcmd("SYST").startswith("215 UNIX")
        assert c.sendcmd("NOOP").startswith("200")
        feat = c.sendcmd("FEAT")
        for f in ("UTF8", "MLST", "SIZE", "MDTM", "MFMT", "REST STREAM", "EPSV", "AUTH TLS"):
            assert f in feat, feat
        assert c.sendcmd("OPTS UTF8 ON").startswith("200")
        assert c.pwd() == "/"
        assert c.mkd("cmds").endswith("cmds")
        c.cwd("cmds")
        assert c.pwd() == "/cmds"
        assert stor(c, "a.txt", b"hello ftp\n").startswith("226")
        assert (home / "cmds" / "a.txt").read_bytes() == b"hello ftp\n"
        assert retr(c, "a.txt") == b"hello ftp\n"
        assert c.size("a.txt") == 10
        assert re.fullmatch(r"213 \d{14}", c.sendcmd("MDTM a.txt"))
        assert c.sendcmd("MFMT 20200102030405 a.txt").startswith("213")
        assert (home / "cmds" / "a.txt").stat().st_mtime == datetime.datetime(
            2020, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc).timestamp()
        assert c.sendcmd("MDTM a.txt") == "213 20200102030405"
        # listings
        assert c.nlst() == ["a.txt"]
        lines: list[str] = []
        c.retrlines("LIST", lines.append)
        assert len(lines) == 1 and lines[0].startswith("-rw") and lines[0].endswith(" a.txt"), lines
        facts = dict(c.mlsd())
        assert facts["a.txt"]["type"] == "file" and facts["a.txt"]["size"] == "10"
        assert facts["a.txt"]["modify"] == "20200102030405"
        assert "r" in facts["a.txt"]["perm"] and "d" in facts["a.txt"]["perm"]
        mlst = c.sendcmd("MLST a.txt")
        assert "type=file;size=10;" in mlst and "/cmds/a.txt" in mlst
        # append, resume, unique names
        c.storbinary("APPE a.txt", io.BytesIO(b"more\n"))
        assert (home / "cmds" / "a.txt").read_bytes() == b"hello ftp\nmore\n"
        c.storbinary("STOR a.txt", io.BytesIO(b"ftp\nMORE\n"), rest=6)
        assert (home / "cmds" / "a.txt").read_bytes() == b"hello ftp\nMORE\n"
        assert retr(c, "a.txt", rest=10) == b"MORE\n"
        c.voidcmd("TYPE I")
        conn, _ = c.ntransfercmd("STOU")
        conn.sendall(b"unique\n")
        conn.close()
        final = c.voidresp()
        assert final.startswith("226")
        uniques = [p for p in (home / "cmds").iterdir() if p.name.startswith("upload.")]
        assert len(uniques) == 1 and uniques[0].read_bytes() == b"unique\n", uniques
        # rename, delete, rmdir
        c.rename("a.txt", "b.txt")
        assert not (home / "cmds" / "a.txt").exists() and (home / "cmds" / "b.txt").exists()
        c.delete("b.txt")
        c.delete(uniques[0].name)
        c.sendcmd("CDUP")
        assert c.pwd() == "/"
        c.rmd("cmds")
        assert not (home / "cmds").exists()
        assert c.sendcmd("STAT").startswith("211")
    finally:
        c.quit()
    assert no_staging_left(home)


def test_errors_are_reply_lines(ftpd):
    c = ftp(ftpd)
    try:
        with pytest.raises(ftplib.error_perm, match=r"^550 .*no such file"):
            retr(c, "/nope.txt")
        with pytest.raises(ftplib.error_perm, match=r"^550 "):
            c.cwd("/nope")
        with pytest.raises(ftplib.error_perm, match=r"^550 "):
            c.rmd("/nope")
        with pytest.raises(ftplib.error_perm, match=r"^503 "):
            c.sendcmd("RNTO x")
        with pytest.raises(ftplib.error_perm, match=r"^550 .*not retrievable"):
            c.size("/")
        with pytest.raises(ftplib.error_perm, match=r"^501 "):
            c.sendcmd("MFMT 2020 x")
        with pytest.raises(ftplib.error_perm, match=r"^55[03] "):
            stor(c, "/.scriptsftp-part-x", b"x")
        with pytest.raises(ftplib.error_perm, match=r"^553 "):
            stor(c, "/" + "n" * 300, b"x")  # staging names are not for clients
        with pytest.raises(ftplib.error_perm, match=r"^500 "):
            c.sendcmd("REIN")
        with pytest.raises(ftplib.error_perm, match=r"^503 "):
            c.sendcmd("USER bob")  # no switching user on a logged-in connection
    finally:
        c.quit()


def test_bob_permissions(ftpd):
    c = ftp(ftpd, "bob", BOB_PASSWORD)
    try:
        assert retr(c, "/readme.txt") == b"bob may read this\n"
        with pytest.raises(ftplib.error_perm, match=r"^550 .*permission denied"):
            stor(c, "/x.txt", b"x")
        with pytest.raises(ftplib.error_perm, match=r"^550 .*permission denied"):
            c.delete("/readme.txt")
        with pytest.raises(ftplib.error_perm, match=r"^550 .*permission denied"):
            c.mkd("/newdir")
        stor(c, "/inbox/ok.txt", b"ok")
        assert (ftpd.home("bob") / "inbox" / "ok.txt").read_bytes() == b"ok"
        facts = dict(c.mlsd("/"))
        assert facts["readme.txt"]["perm"] == "r"
    finally:
        c.quit()
    assert not (ftpd.home("bob") / "x.txt").exists()


# --- scripts: vetoes and the pre-publish verdict ------------------------------------------


def test_pre_publish_veto_replaces_226_with_the_reason(ftpd):
    home = ftpd.home("alice")
    (home / "report.txt").write_bytes(b"version 1\n")
    c = ftp(ftpd)
    try:
        with pytest.raises(ftplib.error_perm, match=r"^550 malware marker found in /report\.txt$"):
            stor(c, "/report.txt", b"x" * 100_000 + MARKER)
        assert (home / "report.txt").read_bytes() == b"version 1\n"  # the old version survives
        with pytest.raises(ftplib.error_perm, match=r"^550 malware marker found in /new\.txt$"):
            stor(c, "/new.txt", MARKER)
        assert not (home / "new.txt").exists()
        assert stor(c, "/clean.txt", b"clean\n").startswith("226")
        assert (home / "clean.txt").read_bytes() == b"clean\n"
        # the connection is still usable after a veto
        assert c.sendcmd("NOOP").startswith("200")
    finally:
        c.quit()
    assert no_staging_left(home)
    ftpd.wait_log(r"upload /new\.txt rejected")


def test_pre_upload_and_delete_vetoes_show_the_reason(ftpd):
    home = ftpd.home("alice")
    (home / "keep").mkdir(exist_ok=True)
    (home / "keep" / "k.txt").write_text("k")
    c = ftps(ftpd)
    try:
        with pytest.raises(ftplib.error_perm, match=r"^550 executables are not accepted: /tool\.exe$"):
            stor(c, "/tool.exe", b"MZ")
        with pytest.raises(ftplib.error_perm, match=r"^550 files in /keep stay$"):
            c.delete("/keep/k.txt")
        # over TLS too, the pre-publish verdict replaces 226
        with pytest.raises(ftplib.error_perm, match=r"^550 malware marker found in /tls\.txt$"):
            stor(c, "/tls.txt", MARKER)
    finally:
        c.quit()
    assert not (home / "tool.exe").exists() and not (home / "tls.txt").exists()
    assert (home / "keep" / "k.txt").exists()


def test_curl_shows_the_veto_reason(ftpd, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(MARKER)
    proc = curl(ftpd, "-T", str(bad), url(ftpd, "/curl-bad.bin"))
    assert proc.returncode != 0
    assert "550" in proc.stderr or "malware" in proc.stderr, proc.stderr
    assert not (ftpd.home("alice") / "curl-bad.bin").exists()
    # the reply line itself, as curl -v prints it
    proc = curl(ftpd, "-v", "-T", str(bad), url(ftpd, "/curl-bad.bin"))
    assert "< 550 malware marker found in /curl-bad.bin" in proc.stderr, proc.stderr


def test_slow_script_on_one_connection_does_not_stall_others(ftpd):
    """A pre-publish script sleeping 2.5 s holds only its own connection."""
    (ftpd.home("alice") / "slow").mkdir(exist_ok=True)
    slow = ftp(ftpd)
    fast = ftp(ftpd)
    result: dict[str, object] = {}

    def upload() -> None:
        t0 = time.monotonic()
        result["reply"] = stor(slow, "/slow/s.txt", b"slow")
        result["secs"] = time.monotonic() - t0

    try:
        t = threading.Thread(target=upload)
        t.start()
        deadline = time.monotonic() + 10
        while not list((ftpd.home("alice") / "slow").glob(".scriptsftp-part-*")) and time.monotonic() < deadline:
            time.sleep(0.02)  # the upload has started: its script runs next, for 2.5 s
        latencies = []
        for _ in range(5):
            t0 = time.monotonic()
            fast.nlst("/")
            latencies.append(time.monotonic() - t0)
        # a fresh connection and login meanwhile, too
        t0 = time.monotonic()
        ftp(ftpd).quit()
        latencies.append(time.monotonic() - t0)
        overlapped = t.is_alive()
        t.join(30)
        assert overlapped, "the fast operations did not run while the script was busy"
        assert str(result["reply"]).startswith("226")
        assert result["secs"] >= 2.5
        assert max(latencies) < 2.0, latencies
    finally:
        slow.quit()
        fast.quit()


# --- TLS ----------------------------------------------------------------------------------------


def test_ftplib_ftp_tls_round_trip(ftpd):
    c = ftps(ftpd)
    try:
        data = os.urandom(3 * 2**20)
        assert stor(c, "/tls-data.bin", data).startswith("226")
        assert retr(c, "/tls-data.bin") == data
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        c.quit()


def test_tls_older_than_1_2_is_refused(ftpd):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    c = ftplib.FTP_TLS(context=ctx)
    c.connect("127.0.0.1", ftpd.ports["ftp"], timeout=10)
    with pytest.raises((ssl.SSLError, OSError, EOFError)):
        c.auth()
    c.close()


def test_user_requiring_tls(ftpd):
    c = ftplib.FTP()
    c.connect("127.0.0.1", ftpd.ports["ftp"], timeout=10)
    with pytest.raises(ftplib.error_perm, match=r"^530 TLS is required for this user"):
        c.login("carol", CAROL_PASSWORD)
    c.close()
    # with TLS on the control channel, but data in clear: refused at PASV
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    c = ftplib.FTP_TLS(context=ctx)
    c.connect("127.0.0.1", ftpd.ports["ftp"], timeout=10)
    c.login("carol", CAROL_PASSWORD)
    with pytest.raises(ftplib.error_perm, match=r"^521 "):
        c.nlst()
    c.prot_p()
    assert stor(c, "/c.txt", b"carol").startswith("226")
    c.quit()
    proc = curl(ftpd, "-T", os.devnull, url(ftpd, "/c2.txt", "carol", CAROL_PASSWORD))
    assert proc.returncode != 0
    proc = curl(ftpd, "--ssl-reqd", "-k", "-o", "-", url(ftpd, "/c.txt", "carol", CAROL_PASSWORD))
    assert proc.returncode == 0 and proc.stdout == "carol", proc.stderr


def test_auth_tls_drops_commands_pipelined_in_clear(ftpd):
    """pyftpdlib #315: 'AUTH TLS' and 'USER alice' in one plaintext packet must not
    run USER as if it had come over TLS."""
    raw = socket.create_connection(("127.0.0.1", ftpd.ports["ftp"]), timeout=10)
    f = raw.makefile("rb")
    assert f.readline().startswith(b"220")
    raw.sendall(b"AUTH TLS\r\nUSER alice\r\n")
    assert f.readline().startswith(b"234")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    tf = tls.makefile("rb")
    tls.sendall(f"PASS {ALICE_PASSWORD}\r\n".encode())
    line = tf.readline()
    assert line.startswith(b"503"), line  # USER never happened
    tls.close()
    ftpd.wait_log(r"discarded \d+ bytes pipelined in plaintext after AUTH TLS")


# --- login, protocol switch, data connections ----------------------------------------------------


def test_wrong_password_and_protocol_switch(ftpd):
    c = ftplib.FTP()
    c.connect("127.0.0.1", ftpd.ports["ftp"], timeout=10)
    with pytest.raises(ftplib.error_perm, match=r"^530 "):
        c.login("alice", "Wr0ng-pass-91c")
    with pytest.raises(ftplib.error_perm, match=r"^530 "):
        c.login("nobody", "Wr0ng-pass-91c")
    c.close()
    c = ftplib.FTP()
    c.connect("127.0.0.1", ftpd.ports["ftp"], timeout=10)
    with pytest.raises(ftplib.error_perm, match=r"^530 protocol ftp not allowed"):
        c.login("dave", DAVE_PASSWORD)
    c.close()
    ftpd.wait_log(r"login failed for 'nobody'")
    assert "Wr0ng-pass-91c" not in ftpd.log_text()  # passwords are never logged


def test_three_failures_disconnect(ftpd):
    c = ftplib.FTP()
    c.connect("127.0.0.1", ftpd.ports["ftp"], timeout=10)
    for _ in range(2):
        with pytest.raises(ftplib.error_perm):
            c.login("alice", "bad")
    c.sendcmd("USER alice")
    c.putcmd("PASS bad")
    assert c.getline().startswith("530")
    assert c.getline().startswith("421")
    c.close()


def test_passive_ports_and_no_active_mode(ftpd):
    c = ftp(ftpd)
    try:
        reply = c.sendcmd("PASV")
        nums = [int(x) for x in re.search(r"\((.*)\)", reply).group(1).split(",")]
        assert 62000 <= nums[4] * 256 + nums[5] <= 62499
        with pytest.raises(ftplib.error_perm, match=r"^502 Active mode"):
            c.sendcmd("PORT 127,0,0,1,200,10")
        with pytest.raises(ftplib.error_perm, match=r"^502 Active mode"):
            c.sendcmd("EPRT |1|10.1.2.3|2000|")
    finally:
        c.close()


def test_active_mode_when_enabled_refuses_third_party_and_masquerade(daemons, tls_files):
    d = daemons.start(ftp_section("off", *tls_files, extra='active_mode = true\nmasquerade_address = "203.0.113.10"'))
    d.home("alice").mkdir(parents=True, exist_ok=True)
    (d.home("alice") / "f.txt").write_text("active\n")
    c = ftp(d)
    try:
        with pytest.raises(ftplib.error_perm, match=r"^501 Rejected data connection to foreign address"):
            c.sendcmd("PORT 10,1,2,3,200,10")  # FTP bounce
        with pytest.raises(ftplib.error_perm, match=r"^501 "):
            c.sendcmd("PORT 127,0,0,1,0,21")  # privileged port
        c.set_pasv(False)
        assert retr(c, "/f.txt") == b"active\n"
        # behind NAT, PASV announces the public address (nothing connects to it here)
        assert "(203,0,113,10," in c.sendcmd("PASV")
    finally:
        c.quit()


def test_aborted_upload_is_discarded(ftpd):
    home = ftpd.home("alice")
    (home / "abort.txt").write_bytes(b"old\n")
    c = ftp(ftpd)
    try:
        c.voidcmd("TYPE I")
        conn = c.transfercmd("STOR abort.txt")
        conn.sendall(b"new partial data" * 1000)
        # a reset, not a clean close: the upload is incomplete
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        reply = c.getline()
        assert reply[:3] in ("426", "451"), reply
        assert c.sendcmd("NOOP").startswith("200")
        # ABOR while a download is running
        (home / "big.bin").write_bytes(os.urandom(32 * 2**20))
        conn = c.transfercmd("RETR big.bin")
        conn.recv(1024)
        c.abort()
        conn.close()
    finally:
        c.close()
    ftpd.wait_log(r"upload /abort\.txt aborted")
    assert (home / "abort.txt").read_bytes() == b"old\n"
    assert no_staging_left(home)


def test_disconnect_mid_upload_publishes_nothing(ftpd):
    home = ftpd.home("alice")
    c = ftp(ftpd)
    c.voidcmd("TYPE I")
    conn = c.transfercmd("STOR gone.txt")
    conn.sendall(b"x" * 100_000)
    c.close()  # the control connection goes away mid-transfer
    ftpd.wait_log(r"upload /gone\.txt aborted")
    conn.close()
    assert not (home / "gone.txt").exists()
    assert no_staging_left(home)


def _wait_for_staged_bytes(home: Path, at_least: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sizes = [p.stat().st_size for p in home.glob(".scriptsftp-part-*")]
        if sizes and max(sizes) >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"no staged upload of {at_least} bytes within {timeout} s")


@pytest.mark.parametrize("tls", [False, True], ids=["ftp", "ftps"])
def test_a_killed_client_never_publishes_its_partial_upload(ftpd, tmp_path, tls):
    """kill -9 of curl mid-STOR closes the data connection as cleanly as a finished upload;
    the control connection, closed in the same instant, says it was not (8 of 8 trials
    published the partial file over the good one before)."""
    require_tool("curl")
    home = ftpd.home("alice")
    old = os.urandom(1 << 20)
    name = f"killed-{'ftps' if tls else 'ftp'}.bin"
    (home / name).write_bytes(old)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(64 << 20))
    args = ["curl", "-sS", "--limit-rate", "8M", "-T", str(src), url(ftpd, "/" + name)]
    if tls:
        args[1:1] = ["--ssl-reqd", "-k"]
    client = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_staged_bytes(home, 4 << 20)
    finally:
        client.kill()
        client.wait()
    ftpd.wait_log(rf"upload /{re.escape(name)} aborted")
    assert (home / name).read_bytes() == old
    assert no_staging_left(home)


def test_allo_announces_the_size_and_a_short_upload_is_discarded(ftpd):
    home = ftpd.home("alice")
    (home / "allo.bin").write_bytes(b"old\n")
    c = ftp(ftpd)
    try:
        assert c.sendcmd("ALLO 1000").startswith("200")
        with pytest.raises(ftplib.error_temp, match=r"426 Upload discarded: received 500 bytes, ALLO announced 1000"):
            stor(c, "allo.bin", b"x" * 500)
        assert (home / "allo.bin").read_bytes() == b"old\n"
        # the announcement covers one upload: the next STOR needs none
        assert stor(c, "other.bin", b"y" * 10).startswith("226")
        assert c.sendcmd("ALLO 500").startswith("200")
        assert stor(c, "allo.bin", b"z" * 500).startswith("226")
        assert (home / "allo.bin").read_bytes() == b"z" * 500
        with pytest.raises(ftplib.error_perm, match="501"):
            c.sendcmd("ALLO lots")
    finally:
        c.close()
    assert no_staging_left(home)


# --- curl ------------------------------------------------------------------------------------------


def test_curl_plain_explicit_and_listing(ftpd, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(2 * 2**20 + 7))
    out = tmp_path / "out.bin"
    assert curl(ftpd, "--ftp-create-dirs", "-T", str(src), url(ftpd, "/curl/deep/src.bin")).returncode == 0
    assert (ftpd.home("alice") / "curl" / "deep" / "src.bin").read_bytes() == src.read_bytes()
    assert curl(ftpd, "-o", str(out), url(ftpd, "/curl/deep/src.bin")).returncode == 0
    assert out.read_bytes() == src.read_bytes()
    # explicit FTPS, TLS required on both channels
    p = curl(ftpd, "--ssl-reqd", "-k", "-T", str(src), url(ftpd, "/curl/tls.bin"))
    assert p.returncode == 0, p.stderr
    p = curl(ftpd, "--ssl-reqd", "-k", "-o", str(out), url(ftpd, "/curl/tls.bin"))
    assert p.returncode == 0 and out.read_bytes() == src.read_bytes(), p.stderr
    # resume a download
    out.write_bytes(src.read_bytes()[:1000])
    assert curl(ftpd, "-C", "-", "-o", str(out), url(ftpd, "/curl/tls.bin")).returncode == 0
    assert out.read_bytes() == src.read_bytes()
    # listing, names only, quote commands
    p = curl(ftpd, url(ftpd, "/curl/"))
    assert re.search(r"^d.* deep$", p.stdout, re.M) and re.search(r"^-.* tls\.bin$", p.stdout, re.M), p.stdout
    assert sorted(curl(ftpd, "-l", url(ftpd, "/curl/")).stdout.split()) == ["deep", "tls.bin"]
    p = curl(ftpd, "-Q", "RNFR /curl/tls.bin", "-Q", "RNTO /curl/moved.bin", "-Q", "DELE /curl/moved.bin",
             url(ftpd, "/"))
    assert p.returncode == 0, p.stderr
    assert not (ftpd.home("alice") / "curl" / "moved.bin").exists()


def test_curl_implicit_ftps(daemons, tls_files, tmp_path):
    d = daemons.start(ftp_section("implicit", *tls_files))
    d.home("alice").mkdir(parents=True, exist_ok=True)
    src = tmp_path / "i.bin"
    src.write_bytes(os.urandom(300_000))
    p = curl(d, "-k", "-T", str(src), url(d, "/i.bin", scheme="ftps"))
    assert p.returncode == 0, p.stderr
    assert (d.home("alice") / "i.bin").read_bytes() == src.read_bytes()
    p = curl(d, "-k", "-o", str(tmp_path / "back.bin"), url(d, "/i.bin", scheme="ftps"))
    assert p.returncode == 0 and (tmp_path / "back.bin").read_bytes() == src.read_bytes(), p.stderr
    # plain FTP on an implicit port gets no greeting in clear
    p = curl(d, "--max-time", "5", url(d, "/"), timeout=10)
    assert p.returncode != 0


# --- lftp and rclone ----------------------------------------------------------------------------------


def make_tree(root: Path, n: int = 200) -> None:
    for i in range(n):
        sub = root / f"d{i % 7}" / f"s{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:03d}.txt").write_bytes(f"file {i}\n".encode() * (i + 1))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("tls", [False, True], ids=["ftp", "ftps"])
def test_lftp_mirror_up_and_down(ftpd, tmp_path, tls):
    lftp = require_tool("lftp")
    local = tmp_path / "up"
    make_tree(local)
    remote = f"/mirror-{'tls' if tls else 'plain'}"
    settings = ("set ftp:ssl-force true; set ftp:ssl-protect-data true; set ssl:verify-certificate no; "
                if tls else "set ftp:ssl-allow false; ")
    script = (f"{settings}set net:max-retries 1; set net:timeout 20; "
              f"open -u alice,{ALICE_PASSWORD} -p {ftpd.ports['ftp']} 127.0.0.1; "
              f"mkdir -p {remote}; mirror -R --parallel=2 {local} {remote}; "
              f"mirror {remote} {tmp_path / 'down'}; bye")
    p = subprocess.run([lftp, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    expected = tree(local)
    assert len(expected) == 200
    assert tree(ftpd.home("alice") / remote.strip("/")) == expected
    assert tree(tmp_path / "down") == expected
    assert no_staging_left(ftpd.home("alice"))


def test_lftp_reports_pre_publish_veto(ftpd, tmp_path):
    lftp = require_tool("lftp")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(MARKER)
    script = (f"set ftp:ssl-allow false; set net:max-retries 1; "
              f"open -u alice,{ALICE_PASSWORD} -p {ftpd.ports['ftp']} 127.0.0.1; put {bad} -o /lftp-bad.txt; bye")
    p = subprocess.run([lftp, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "malware marker found" in p.stderr, p.stderr
    assert not (ftpd.home("alice") / "lftp-bad.txt").exists()


def test_rclone_ftp_backend(ftpd, tmp_path):
    rclone = require_tool("rclone")
    obscured = subprocess.run([rclone, "obscure", ALICE_PASSWORD], capture_output=True, text=True,
                              check=True).stdout.strip()
    remote = f":ftp,host=127.0.0.1,port={ftpd.ports['ftp']},user=alice,pass={obscured}:"
    env = dict(os.environ, RCLONE_CONFIG="/dev/null")
    local = tmp_path / "rc"
    make_tree(local, 40)

    def rc(*args: str) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([rclone, *args, "-vv", "--low-level-retries", "1", "--retries", "1"],
                           capture_output=True, text=True, timeout=180, env=env)
        p.stderr += "\n--- server log:\n" + ftpd.log_text()[-6000:]  # why, when it fails
        return p

    p = rc("copy", str(local), remote + "rc")
    assert p.returncode == 0, p.stderr
    assert tree(ftpd.home("alice") / "rc") == tree(local)
    p = rc("ls", remote + "rc")
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 40, p.stdout + p.stderr
    p = rc("check", str(local), remote + "rc")
    assert p.returncode == 0, p.stderr
    p = rc("delete", remote + "rc")
    assert p.returncode == 0, p.stderr
    assert not [x for x in (ftpd.home("alice") / "rc").rglob("*") if x.is_file()]
    # explicit FTPS with rclone too
    p = rc("copy", str(local / "d0"), f"{remote[:-1]},explicit_tls=true,no_check_certificate=true:rc-tls")
    assert p.returncode == 0, p.stderr
    assert tree(ftpd.home("alice") / "rc-tls") == tree(local / "d0")


# --- traversal -----------------------------------------------------------------------------------------


TRAVERSAL = [
    "../../outside/secret.txt",
    "/../../outside/secret.txt",
    "%2e%2e/%2e%2e/outside/secret.txt",
    "%2e%2e%2f%2e%2e%2foutside%2fsecret.txt",
    "..\\..\\outside\\secret.txt",
    "/..\\..\\outside\\secret.txt",
    "....//....//outside/secret.txt",
    "..%00/secret.txt",
    "../outside/secret.txt\x00.jpg",
    "/" + "a" * 300,
    "/" + "/".join(["x" * 200] * 30),
]


def test_traversal_corpus(ftpd):
    outside = ftpd.root / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_bytes(b"SECRET-OUTSIDE\n")
    before = sorted(p.name for p in ftpd.root.iterdir())
    c = ftp(ftpd)
    try:
        for path in TRAVERSAL:  # reads first: none may reach the secret
            for cmd in ("RETR", "SIZE", "CWD", "DELE", "MLST", "MDTM", "RNFR"):
                with pytest.raises((ftplib.error_perm, ftplib.error_temp)) as exc:
                    if cmd == "RETR":
                        assert b"SECRET" not in retr(c, path)
                    else:
                        assert "SECRET" not in c.sendcmd(f"{cmd} {path}")
                # 500: pyftpdlib's 2048-byte command line cap
                assert str(exc.value)[:3] in ("500", "550", "553", "501", "450", "451"), (cmd, path, exc.value)
        for path in TRAVERSAL:  # then writes: whatever they create stays inside the home
            for attempt in (lambda: stor(c, path, b"planted"), lambda: c.sendcmd(f"MKD {path}")):
                try:
                    attempt()
                except (ftplib.error_perm, ftplib.error_temp):
                    pass
        assert c.pwd() == "/"
    finally:
        c.close()
    assert (outside / "secret.txt").read_bytes() == b"SECRET-OUTSIDE\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert sorted(p.name for p in ftpd.root.iterdir()) == before


# --- async pre-publish over FTP ---------------------------------------------------------------------

# Holds the verdict for {hold} s of wall clock (scripts cannot sleep), then rejects a marker.
HOLD_SCRIPT = """
import time

def on_pre_publish(event, api):
    end = time.time() + {hold}
    while time.time() < end:
        pass
    if b"VIRUS" in api.file.read(65536):
        api.veto("infected: " + event.path)
"""


def test_async_pre_publish_answers_226_at_once_and_hides_the_file(daemons, tls_files):
    (daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
    (daemons.root / "scripts" / "check.py").write_text(HOLD_SCRIPT.format(hold=3.0))
    d = daemons.start(ftp_section("off", *tls_files) + """
[[bindings]]
event = "pre-publish"
script = "check.py"
mode = "async"
allow = ["read"]
timeout = 30.0
cpu_time = 20.0
""")
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "old.txt").write_bytes(b"previous\n")
    c = ftp(d)
    try:
        mark = len(d.lines)
        t0 = time.monotonic()
        assert stor(c, "/bad.txt", b"VIRUS inside").startswith("226")
        assert stor(c, "/old.txt", b"VIRUS again").startswith("226")
        assert time.monotonic() - t0 < 3.0, "226 waited for the verdict"
        # during the check: SIZE answers the uploaded size, download/rename/delete do not see it
        assert c.size("/bad.txt") == len(b"VIRUS inside")
        with pytest.raises(ftplib.error_perm, match=r"^550 "):
            retr(c, "/bad.txt")
        with pytest.raises(ftplib.error_perm, match=r"^550 "):
            c.delete("/bad.txt")
        with pytest.raises(ftplib.error_perm, match=r"^550 "):
            c.rename("/bad.txt", "/moved.txt")
        assert not (home / "bad.txt").exists()
        assert (home / "old.txt").read_bytes() == b"previous\n"
        d.wait_log(r"publish /bad\.txt vetoed \(async\): infected: /bad\.txt", timeout=60, start=mark)
        d.wait_log(r"publish /old\.txt vetoed \(async\)", timeout=60, start=mark)
        with pytest.raises(ftplib.error_perm, match=r"^550 "):
            c.size("/bad.txt")
        assert retr(c, "/old.txt") == b"previous\n"
        # a clean one appears once checked
        stor(c, "/good.txt", b"fine\n")
        d.wait_log(r"upload /good\.txt ok|publish /good\.txt (ok|published)", timeout=60, start=mark)
    finally:
        c.quit()
    deadline = time.monotonic() + 30
    while not (home / "good.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (home / "good.txt").read_bytes() == b"fine\n"
    assert no_staging_left(home)


# --- the same operations raise the same events over SFTP and FTP ---------------------------------------

RECORD_SCRIPT = """
def record(event, api):
    api.log("EV " + repr(event))

def veto_marker(event, api):
    if b"VETO-ME" in api.file.read(65536):
        api.veto("no VETO-ME here")
"""

FILE_EVENTS = ("pre-upload", "pre-publish", "post-upload", "upload-failed", "pre-download", "post-download",
               "pre-delete", "post-delete", "pre-rename", "post-rename", "pre-mkdir", "post-mkdir",
               "pre-rmdir", "post-rmdir")


def test_same_operations_raise_identical_events_over_sftp_and_ftp(daemons, tls_files, alice_key):
    from conftest import close_client, paramiko_client, sftp_event_walk

    (daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
    (daemons.root / "scripts" / "rec.py").write_text(RECORD_SCRIPT)
    binds = "".join(f'\n[[bindings]]\nevent = "{e}"\nscript = "rec.py"\nfunction = "record"\n' for e in FILE_EVENTS)
    binds += '\n[[bindings]]\nevent = "pre-publish"\nscript = "rec.py"\nfunction = "veto_marker"\nallow = ["read"]\n'
    d = daemons.start(ftp_section("off", *tls_files) + binds)
    d.home("alice").mkdir(parents=True, exist_ok=True)

    def sftp_ops() -> None:
        c = paramiko_client(d, key=alice_key)
        try:
            sftp_event_walk(c)
        finally:
            close_client(c)

    def ftp_ops() -> None:
        c = ftp(d)
        try:
            c.mkd("/w")
            stor(c, "/w/a.txt", b"0123456789")
            assert retr(c, "/w/a.txt") == b"0123456789"
            c.rename("/w/a.txt", "/w/b.txt")
            with pytest.raises(ftplib.error_perm, match="no VETO-ME here"):
                stor(c, "/w/b.txt", b"VETO-ME")
            c.delete("/w/b.txt")
            c.rmd("/w")
        finally:
            c.quit()

    recorded = {}
    for proto, ops in (("sftp", sftp_ops), ("ftp", ftp_ops)):
        mark = len(d.lines)
        ops()
        d.wait_log(r"EV event\(.*'post-rmdir'", start=mark)
        with d._cond:
            lines = d.lines[mark:]
        events = []
        for line in lines:
            m = re.search(r"EV (event\(.*\))", line)
            if m:
                assert f"protocol='{proto}'" in m.group(1), m.group(1)
                # what may differ: when, which connection, and the protocol itself
                events.append(re.sub(r"(time|session_id|remote_ip|protocol|duration)=[^,)]*(, )?", "", m.group(1)))
        recorded[proto] = events
    assert len(recorded["sftp"]) >= 14
    assert sorted(recorded["sftp"]) == sorted(recorded["ftp"])


def _passive_listener_bound_to(port: int, passive_ports: list[int]):
    """scriptsftp's passive data listener, bound (not yet listening) as pyftpdlib leaves it."""
    from types import SimpleNamespace

    from pyftpdlib.ioloop import Acceptor, IOLoop

    from scriptsftp.server.frontends.ftp.listener import PassiveDataListener as _PassiveDTP

    dtp = _PassiveDTP.__new__(_PassiveDTP)
    Acceptor.__init__(dtp, ioloop=IOLoop())
    dtp.cmd_channel = SimpleNamespace(passive_ports=passive_ports)
    dtp.create_socket(socket.AF_INET, socket.SOCK_STREAM)
    dtp.set_reuse_addr()
    dtp.bind(("127.0.0.1", port))
    return dtp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_passive_port_taken_between_bind_and_listen_costs_another_port_not_the_connection():
    """pyftpdlib binds a passive port with SO_REUSEADDR, then listens. Linux lets a second
    socket bind that port until one of them listens, so another connection's thread (each
    FTP connection has its own) could take it in between; the listen() that lost failed
    with EADDRINUSE and pyftpdlib dropped the control connection without a reply (rclone
    in CI: "Couldn't delete: EOF"). Here the other thread is a socket of ours that wins."""
    for with_spare in (True, False):
        port, spare = _free_port(), _free_port()
        rival = socket.socket()
        rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rival.bind(("127.0.0.1", port))
        dtp = _passive_listener_bound_to(port, [port, spare] if with_spare else [port])  # both bound
        try:
            rival.listen(5)  # the other thread listens first
            dtp.listen(5)  # not EADDRINUSE: another port of the range, else one the kernel picks
            got = dtp.socket.getsockname()[1]
            assert got == spare if with_spare else got not in (port, 0), (got, port, spare)
            with socket.create_connection(("127.0.0.1", got), timeout=5):
                pass  # it listens there
        finally:
            dtp.close()
            dtp.ioloop.close()
            rival.close()


# --- daemon lifecycle with FTP connections ---------------------------------------------------------------


def test_sigterm_lets_an_ftp_upload_finish_then_closes_idle_ones_with_421(daemons, tls_files):
    import signal

    d = daemons.start(ftp_section("off", *tls_files))
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    idle = ftp(d)
    busy = ftp(d)
    busy.voidcmd("TYPE I")
    conn = busy.transfercmd("STOR big.bin")
    chunks = [os.urandom(256 * 1024) for _ in range(8)]
    for c in chunks[:4]:
        conn.sendall(c)
    d.signal(signal.SIGTERM)
    d.wait_log(r"stopping: no new connections")
    with pytest.raises(OSError):  # no new connections
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", d.ports["ftp"]), timeout=5) as s:
                s.settimeout(2)
                assert s.recv(100) == b""
    for c in chunks[4:]:
        conn.sendall(c)
    conn.close()
    assert busy.voidresp().startswith("226")
    assert (home / "big.bin").read_bytes() == b"".join(chunks)
    # the idle connection is told why it is closed
    idle.sock.settimeout(20)
    assert idle.getline().startswith("421 server shutting down")
    assert d.proc.wait(20) == 0
    d.wait_log(r"daemon: stopped")
    assert "Traceback" not in d.log_text()


def test_sighup_removing_a_user_closes_their_ftp_connection(daemons, tls_files, password_hashes):
    import signal

    users = user_toml("alice", password_hash=password_hashes["alice"]) + \
        user_toml("bob", password_hash=password_hashes["bob"])
    d = daemons.start(ftp_section("off", *tls_files), users=users)
    for u in ("alice", "bob"):
        d.home(u).mkdir(parents=True, exist_ok=True)
    bob = ftp(d, "bob", BOB_PASSWORD)
    alice = ftp(d)
    try:
        bob.voidcmd("TYPE I")
        conn = bob.transfercmd("STOR unfinished.txt")
        conn.sendall(b"half")
        daemons.write_config(ftp_section("off", *tls_files),
                             users=user_toml("alice", password_hash=password_hashes["alice"]))
        mark = len(d.lines)
        d.signal(signal.SIGHUP)
        d.wait_log(r"closing session of removed or disabled user bob", start=mark)
        d.wait_log(r"upload /unfinished\.txt aborted", start=mark)
        bob.sock.settimeout(10)
        assert bob.getline().startswith("421 your account was removed or disabled")
        conn.close()
        assert not (d.home("bob") / "unfinished.txt").exists()
        assert alice.nlst("/") == []  # others untouched
    finally:
        alice.close()
        bob.close()


def test_second_transfer_during_an_upload_is_refused(ftpd):
    home = ftpd.home("alice")
    c = ftp(ftpd)
    try:
        c.voidcmd("TYPE I")
        conn = c.transfercmd("STOR first.bin")
        conn.sendall(b"a" * 100_000)
        with pytest.raises(ftplib.error_temp, match=r"^425 Another transfer"):
            c.sendcmd("STOR second.bin")
        conn.sendall(b"b" * 100_000)
        conn.close()
        assert c.voidresp().startswith("226")
    finally:
        c.quit()
    assert (home / "first.bin").read_bytes() == b"a" * 100_000 + b"b" * 100_000
    assert not (home / "second.bin").exists()


# --- crash safety: a daemon killed while an FTP upload is being checked -------------------------------


@pytest.mark.parametrize("content, published", [(b"clean data\n", True), (b"VIRUS data\n", False)])
def test_daemon_killed_mid_check_of_an_ftp_upload_checks_it_again(daemons, tls_files, content, published):
    import sqlite3

    scripts = daemons.root / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    (scripts / "hold.py").write_text(HOLD_SCRIPT.format(hold=30.0))
    d = daemons.start(ftp_section("off", *tls_files) + """
[[bindings]]
event = "pre-publish"
script = "hold.py"
allow = ["read"]
timeout = 60.0
cpu_time = 40.0
""")
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    c = ftp(d)
    outcome: list[object] = []

    def upload() -> None:
        try:
            outcome.append(stor(c, "/held.txt", content))
        except BaseException as exc:  # the daemon dies under the client
            outcome.append(exc)

    t = threading.Thread(target=upload, daemon=True)
    t.start()
    wait_staging_state(d, "check")
    d.kill()
    t.join(10)
    c.close()
    assert outcome and not isinstance(outcome[0], str), "no 226 from a daemon that died before the verdict"
    assert not (home / "held.txt").exists()
    (scripts / "hold.py").write_text(HOLD_SCRIPT.format(hold=0.0))
    d2 = daemons.start(config=d.config)
    d2.wait_log(r"checking again 1 upload\(s\)")
    if published:
        d2.wait_log(r"publish /held\.txt ok", timeout=60)
        assert (home / "held.txt").read_bytes() == content
    else:
        d2.wait_log(r"publish /held\.txt vetoed on recheck after restart: infected", timeout=60)
        assert not (home / "held.txt").exists()
    assert no_staging_left(home)


def test_a_stalled_client_does_not_stall_others(ftpd):
    """One client opens an upload and sends nothing; another lists and downloads meanwhile."""
    (ftpd.home("alice") / "quick.txt").write_bytes(b"quick\n")
    stalled = ftp(ftpd)
    other = ftp(ftpd)
    try:
        stalled.voidcmd("TYPE I")
        conn = stalled.transfercmd("STOR stalled.bin")  # and then nothing
        times = []
        for _ in range(5):
            t0 = time.monotonic()
            assert retr(other, "/quick.txt") == b"quick\n"
            other.nlst("/")
            times.append(time.monotonic() - t0)
        assert max(times) < 2.0, times
        conn.close()
        assert stalled.voidresp().startswith("226")  # a clean close: an empty upload
    finally:
        stalled.quit()
        other.quit()


def _rss_peak_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))


def test_one_gib_ftp_upload_hashed_in_pre_publish_keeps_the_daemon_small(daemons, tls_files, tmp_path):
    scripts = daemons.root / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    (scripts / "hash.py").write_text('''
def on_pre_publish(event, api):
    api.log("sha256", digest=api.file.hash("sha256"))
''')
    d = daemons.start(ftp_section("off", *tls_files) + """
[[bindings]]
event = "pre-publish"
script = "hash.py"
allow = ["read"]
timeout = 120.0
cpu_time = 60.0
""")
    d.home("alice").mkdir(parents=True, exist_ok=True)
    big = tmp_path / "big.bin"
    chunk = os.urandom(2**20)
    digest = __import__("hashlib").sha256()
    with big.open("wb") as f:
        for i in range(1024):
            block = chunk[:-4] + i.to_bytes(4, "big")
            f.write(block)
            digest.update(block)
    p = curl(d, "-T", str(big), url(d, "/big.bin"), timeout=300)
    assert p.returncode == 0, p.stderr
    d.wait_log(r"sha256 .*" + digest.hexdigest(), timeout=60)
    assert (d.home("alice") / "big.bin").stat().st_size == 2**30
    rss = _rss_peak_kb(d.proc.pid)
    assert rss < 150 * 1024, f"daemon peak RSS {rss} kB"


def test_site_chmod_and_mfmt_never_follow_a_symlink_swapped_in_while_they_run(ftpd, tmp_path):
    """Issue 15 item 2 through another protocol: SITE CHMOD and MFMT on /f in a loop while
    /f is replaced, again and again, by a symlink to a file outside every home (the daemon
    runs as root here). The mode and times of the outside file never change."""
    import stat as statmod

    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    outside.chmod(0o600)
    os.utime(outside, (1_000_000_000, 1_000_000_000))
    home = ftpd.home("alice")
    f, link, tmp = home / "race-f", home / "race-link", home / "race-tmp"
    f.write_text("mine\n")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.symlink(outside, link)
            os.replace(link, f)  # the link takes the name atomically
            tmp.write_text("mine\n")
            os.replace(tmp, f)

    swapper = threading.Thread(target=swap, daemon=True)
    c = ftp(ftpd)
    swapper.start()
    done = refused = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for cmd in ("SITE CHMOD 666 race-f", "MFMT 20200102030405 race-f"):
                try:
                    c.sendcmd(cmd)
                    done += 1
                except (ftplib.error_perm, ftplib.error_temp):  # 550 a link out; 451 it changed mid-walk
                    refused += 1
    finally:
        stop.set()
        swapper.join()
        c.quit()
        for p in (f, link, tmp):  # the module's daemon serves other tests: leave alice's home as it was
            if p.is_symlink() or p.exists():
                p.unlink()
    assert statmod.S_IMODE(outside.stat().st_mode) == 0o600
    assert outside.stat().st_mtime == 1_000_000_000
    assert done and refused  # both sides of the race were hit


def test_ftps_lines_say_tls_and_plain_ftp_lines_do_not(ftpd):
    """FTPS and plain FTP both logged proto=ftp with nothing to tell them apart (issue 16 item 11)."""
    mark = len(ftpd.lines)
    secure = ftps(ftpd)
    assert stor(secure, "/tls-line.txt", b"over tls").startswith("226")
    secure.quit()
    plain = ftp(ftpd)
    assert stor(plain, "/plain-line.txt", b"in clear").startswith("226")
    plain.quit()
    for name, tls in (("tls-line", True), ("plain-line", False)):
        line = ftpd.wait_log(rf"proto=ftp .*upload /{name}\.txt ok", start=mark).string
        assert ("tls=true" in line) == tls, line
    logins = [x for x in ftpd.lines[mark:] if "login ok" in x and "proto=ftp" in x]
    assert any("tls=true" in x for x in logins) and any("tls=true" not in x for x in logins), logins
