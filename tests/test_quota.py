"""Quotas through the real daemon and real clients (issue 18, item 6).

A quota exceeded refuses an upload on SFTP, SCP, FTP and HTTP with the reason: before any
byte when the home is full, on the way when the file does not fit; the previous version
stays. The ledger stays exact after a mix of uploads, overwrites, vetoes, aborts (killed
clients) and deletes over the four protocols: ``scriptsftp quota scan`` (which sets the
ledger from the disk and prints both) finds nothing to correct. Daily transfer quotas stop
an upload and a download on the way; quota-threshold reaches a script. The refusals and the
exact ledger run on both account engines (the ledger lives in the account database).
"""

from __future__ import annotations

import ftplib
import http.client
import io
import json
import random
import re
import socket
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from conftest import (
    ALICE_PASSWORD, BIN, BOB_PASSWORD, SSH_OPTS, accounts_toml, close_client, paramiko_client, require_tool, sftp_put, user_toml,
)
from httpkit import HTTP_EXTRA, basic, request

FTP_EXTRA = '\n[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = ""\n'

VETO_SCRIPT = """
def no_veto_marker(event, api):
    if b"VETO" in api.file.read(16):
        api.veto("VETO marker refused")

def threshold(event, api):
    api.log("THRESHOLD " + event.kind + " " + str(event.percent) + " " + str(event.used) + " "
            + str(event.limit) + " folder=" + event.folder)
"""

BINDINGS = """
[[bindings]]
event = "pre-publish"
script = "quota.py"
function = "no_veto_marker"
allow = ["read"]

[[bindings]]
event = "quota-threshold"
script = "quota.py"
function = "threshold"
"""


def start(daemons, alice_limits: str, extra: str = ""):
    (daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
    (daemons.root / "scripts" / "quota.py").write_text(VETO_SCRIPT)
    users = daemons.default_users().replace('home = "homes/alice"', 'home = "homes/alice"\n' + alice_limits, 1)
    d = daemons.start(BINDINGS + FTP_EXTRA + HTTP_EXTRA + extra, users=users)
    d.home("alice").mkdir(parents=True, exist_ok=True)
    return d


def quota_scan(d, *args: str) -> list[dict]:
    out = subprocess.run([str(BIN), "quota", "scan", "-c", str(d.config), "--json", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def ftp_login(d) -> ftplib.FTP:
    c = ftplib.FTP()
    c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    c.login("alice", ALICE_PASSWORD)
    return c


def no_staging_left(home: Path, timeout: float = 20.0) -> None:
    """Aborted uploads are discarded once the server notices the client gone: wait for it."""
    deadline = time.monotonic() + timeout
    while any(".scriptsftp-part-" in p.name for p in home.rglob("*")):
        assert time.monotonic() < deadline, [p for p in home.rglob("*") if ".scriptsftp-part-" in p.name]
        time.sleep(0.05)


def wait_lines(d, pattern: str, count: int, timeout: float = 30.0) -> None:
    """Block until ``count`` log lines match ``pattern``."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    with d._cond:
        while sum(1 for line in d.lines if rx.search(line)) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"fewer than {count} lines match {pattern!r}"
            d._cond.wait(min(remaining, 0.5))


# --- refusals on every protocol -------------------------------------------------------------


def test_quota_exceeded_refuses_an_upload_on_every_protocol_with_the_reason(daemons, alice_key, accounts_database):
    require_tool("scp")
    d = start(daemons, "quota_size = 10000\nquota_files = 100", accounts_toml(accounts_database))
    home = d.home("alice")
    c = paramiko_client(d, key=alice_key)
    try:
        sftp_put(c, "/old.txt", b"o" * 100)
        # on the way: the file does not fit; paramiko sees the failure with the server's message
        with pytest.raises(IOError, match="quota exceeded: your home may hold 9.8 KiB"):
            sftp_put(c, "/big.bin", b"x" * 20000)
        with pytest.raises(IOError, match="quota exceeded"):
            sftp_put(c, "/old.txt", b"x" * 20000)
        assert (home / "old.txt").read_bytes() == b"o" * 100  # the old version stays
        assert not (home / "big.bin").exists()
        sftp_put(c, "/fill.bin", b"f" * 9900)  # exactly full now
        with pytest.raises(IOError, match="quota exceeded: your home holds 9.8 KiB, the limit is 9.8 KiB"):
            sftp_put(c, "/one-more.txt", b"y")  # refused at open, before any byte
    finally:
        close_client(c)

    # OpenSSH sftp (9.2) prints only the status of a refused OPEN, not its message
    local = d.root / "local.bin"
    local.write_bytes(b"z" * 50)
    proc = subprocess.run(["sftp", "-b", "-", "-i", str(alice_key.private), "-P", str(d.port), *SSH_OPTS,
                           "alice@127.0.0.1"], input=f"put {local} /sftp.bin\n", text=True, capture_output=True,
                          timeout=60)
    assert proc.returncode != 0
    assert 'dest open "/sftp.bin": Failure' in proc.stderr, proc.stderr

    # OpenSSH scp (the SCP protocol): the error line carries the reason
    proc = subprocess.run(["scp", "-O", "-i", str(alice_key.private), "-P", str(d.port), *SSH_OPTS,
                           str(local), "alice@127.0.0.1:/scp.bin"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "quota exceeded: your home holds 9.8 KiB" in proc.stderr, proc.stderr

    # FTP: 552, "exceeded storage allocation"
    f = ftp_login(d)
    try:
        with pytest.raises(ftplib.error_perm, match=r"^552 /ftp\.bin: quota exceeded"):
            f.storbinary("STOR /ftp.bin", io.BytesIO(b"f" * 50))
    finally:
        f.close()

    # HTTP: 507 with the reason in the body
    r = request(d, "PUT", "/http.bin", b"h" * 50)
    assert r.status == 507 and "quota exceeded: your home holds 9.8 KiB" in r.text, (r.status, r.text)

    assert sorted(p.name for p in home.iterdir()) == ["fill.bin", "old.txt"]
    d.wait_log(r"proto=ftp .*upload /ftp\.bin denied .*kind=quota")
    d.wait_log(r"proto=http .*upload /http\.bin denied .*kind=quota")
    d.wait_log(r"proto=sftp .*upload /big\.bin denied .*kind=quota")  # stopped on the way, in the worker
    [scan] = quota_scan(d, "alice")
    assert scan["before"] == scan["after"] == {"bytes": 10000, "files": 2}


def test_a_file_that_does_not_fit_is_stopped_on_the_way_on_ftp_and_http(daemons):
    d = start(daemons, "quota_size = 100000")
    home = d.home("alice")
    (home / "keep.bin").write_bytes(b"k" * 10)
    quota_scan(d, "alice")
    f = ftp_login(d)
    try:
        with pytest.raises(ftplib.error_perm, match=r"^552 .*quota exceeded: your home may hold 97.7 KiB"):
            f.storbinary("STOR /keep.bin", io.BytesIO(b"x" * 300000))
        f.voidcmd("NOOP")  # the control connection goes on
    finally:
        f.close()
    # HTTP with a Content-Length past the quota: 507 before the body is sent (Expect: 100-continue)
    conn = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=30)
    try:
        conn.putrequest("PUT", "/keep.bin")
        conn.putheader("Authorization", basic())
        conn.putheader("Content-Length", "300000")
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == 507 and b"quota exceeded" in r.read()
    finally:
        conn.close()
    assert (home / "keep.bin").read_bytes() == b"k" * 10
    no_staging_left(home)


# --- the counters stay exact ----------------------------------------------------------------


def _payload(rng: random.Random, veto: bool) -> bytes:
    body = rng.randbytes(rng.randint(0, 3000))
    return (b"VETO" if veto else b"DATA") + body


class Mix:
    """Mixed operations on one protocol against a model of what the home should hold."""

    def __init__(self, rng: random.Random, names: list[str]) -> None:
        self.rng = rng
        self.names = names
        self.vetoes = self.aborts = self.deletes = self.uploads = 0

    def pick(self) -> tuple[str, str]:
        roll = self.rng.random()
        name = self.rng.choice(self.names)
        if roll < 0.12:
            return "veto", name
        if roll < 0.18:
            return "abort", name
        if roll < 0.35:
            return "delete", name
        return "upload", name


def sftp_mix(d, key, rng: random.Random, count: int) -> int:
    mix = Mix(rng, [f"/s/{i}" for i in range(12)])
    c = paramiko_client(d, key=key)
    try:
        c.mkdir("/s")
        for _ in range(count):
            op, name = mix.pick()
            mix.aborts += op == "abort"
            if op == "upload":
                sftp_put(c, name, _payload(rng, False))
            elif op == "veto":
                with pytest.raises(IOError, match="VETO marker"):
                    sftp_put(c, name, _payload(rng, True))
            elif op == "delete":
                try:
                    c.remove(name)
                except FileNotFoundError:
                    pass
            else:  # a client killed mid-upload: its transport torn down with the file open
                other = paramiko_client(d, key=key)
                fh = other.open(name, "wb")
                fh.write(_payload(rng, False) * 3)
                fh.flush()
                other.get_channel().get_transport().sock.close()
                other.get_channel().get_transport().close()
    finally:
        close_client(c)
    return mix.aborts


def scp_mix(d, key, rng: random.Random, count: int, local: Path) -> None:
    local.mkdir()
    for i in range(count):
        src = local / f"c{i % 4}"
        veto = rng.random() < 0.2
        src.write_bytes(_payload(rng, veto))
        proc = subprocess.run(["scp", "-O", "-i", str(key.private), "-P", str(d.port), *SSH_OPTS, str(src),
                               f"alice@127.0.0.1:/c{i % 4}"], capture_output=True, text=True, timeout=60)
        assert (proc.returncode != 0) == veto, proc.stderr


def ftp_mix(d, rng: random.Random, count: int) -> int:
    mix = Mix(rng, [f"/f/{i}" for i in range(12)])
    c = ftp_login(d)
    try:
        c.mkd("/f")
        for _ in range(count):
            op, name = mix.pick()
            mix.aborts += op == "abort"
            if op == "upload":
                c.storbinary(f"STOR {name}", io.BytesIO(_payload(rng, False)))
            elif op == "veto":
                with pytest.raises(ftplib.error_perm, match="VETO marker"):
                    c.storbinary(f"STOR {name}", io.BytesIO(_payload(rng, True)))
            elif op == "delete":
                try:
                    c.delete(name)
                except ftplib.error_perm:
                    pass
            else:  # the data connection reset half way: the upload is discarded
                conn = c.transfercmd(f"STOR {name}")
                conn.sendall(_payload(rng, False))
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()
                try:
                    c.voidresp()
                except ftplib.Error:
                    pass
    finally:
        c.close()
    return mix.aborts


def http_mix(d, rng: random.Random, count: int) -> int:
    mix = Mix(rng, [f"/h/{i}" for i in range(12)])
    conn = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=30)

    def req(method: str, path: str, body: bytes | None = None) -> int:
        conn.request(method, path, body=body, headers={"Authorization": basic()})
        r = conn.getresponse()
        r.read()
        return r.status

    try:
        assert req("MKCOL", "/h") == 201
        for _ in range(count):
            op, name = mix.pick()
            mix.aborts += op == "abort"
            if op == "upload":
                assert req("PUT", name, _payload(rng, False)) in (201, 204)
            elif op == "veto":
                assert req("PUT", name, _payload(rng, True)) == 403
            elif op == "delete":
                assert req("DELETE", name) in (204, 404)
            else:  # the client goes away in the middle of its body
                s = socket.create_connection(("127.0.0.1", d.ports["http"]))
                s.sendall(f"PUT {name} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic()}\r\n"
                          f"Content-Length: 100000\r\n\r\n".encode() + b"DATA" * 100)
                s.close()
    finally:
        conn.close()
    return mix.aborts


def test_the_ledger_stays_exact_after_a_thousand_mixed_operations(daemons, alice_key, tmp_path, accounts_database):
    require_tool("scp")
    d = start(daemons, "quota_size = 1000000000\nquota_files = 100000", accounts_toml(accounts_database))
    rng = random.Random(18)
    aborts = sftp_mix(d, alice_key, rng, 450) + ftp_mix(d, rng, 210) + http_mix(d, rng, 320)
    scp_mix(d, alice_key, rng, 20, tmp_path / "scp")
    home = d.home("alice")
    # every abort noticed by the server (a log line each: an event, not a sleep), none published
    wait_lines(d, r"\] upload /\w/\d+ aborted", aborts)
    no_staging_left(home)
    # every abort was noticed and discarded (none published), then the recount finds the ledger right
    [scan] = quota_scan(d, "alice")
    assert scan["before"] == scan["after"], scan
    assert scan["after"]["files"] > 10


# --- daily transfer quotas, thresholds ------------------------------------------------------


def test_the_daily_transfer_quotas_stop_an_upload_and_a_download_on_the_way(daemons, alice_key):
    d = start(daemons, "transfer_up_daily = 60000\ntransfer_down_daily = 50000")
    home = d.home("alice")
    (home / "big.bin").write_bytes(b"d" * 80000)
    c = paramiko_client(d, key=alice_key)
    try:
        got = io.BytesIO()
        with pytest.raises(IOError, match="daily download quota of 48.8 KiB reached"):
            c.getfo("/big.bin", got)
        with pytest.raises(IOError, match="daily download quota"):
            c.getfo("/big.bin", io.BytesIO())  # refused at open now
        sftp_put(c, "/up1.bin", b"u" * 40000)
        with pytest.raises(IOError, match="daily upload quota of 58.6 KiB reached"):
            sftp_put(c, "/up2.bin", b"u" * 40000)
    finally:
        close_client(c)
    assert not (home / "up2.bin").exists()
    # the refused write moved nothing (a whole SFTP write past the quota is refused): 20000 bytes left
    f = ftp_login(d)
    try:
        f.storbinary("STOR /up3.bin", io.BytesIO(b"x" * 15000))
        with pytest.raises(ftplib.error_perm, match=r"^552 .*daily upload quota of 58.6 KiB reached"):
            f.storbinary("STOR /up4.bin", io.BytesIO(b"x" * 15000))
        with pytest.raises(ftplib.error_perm, match=r"^552 /big\.bin: daily download quota"):
            f.retrbinary("RETR /big.bin", lambda b: None)  # the day's downloads are used up
    finally:
        f.close()
    r = request(d, "GET", "/big.bin")
    assert r.status == 507 and "daily download quota of 48.8 KiB reached" in r.text
    # both SFTP downloads are refusals on record: the one stopped on the way, the one refused at open
    wait_lines(d, r"proto=sftp .*\] download /big\.bin denied .*kind=quota", 2)
    assert sorted(p.name for p in home.iterdir()) == ["big.bin", "up1.bin", "up3.bin"]


def test_crossing_a_threshold_raises_the_event_for_scripts(daemons, alice_key):
    d = start(daemons, "quota_size = 1000", '\n[accounts]\nquota_thresholds = [50, 90]\n')
    c = paramiko_client(d, key=alice_key)
    try:
        sftp_put(c, "/a", b"a" * 400)
        sftp_put(c, "/b", b"b" * 200)  # 600 of 1000
    finally:
        close_client(c)
    d.wait_log(r"THRESHOLD size 50 600 1000 folder=")
    assert "THRESHOLD size 90" not in d.log_text()


def test_a_folder_quota_is_shared_by_every_user_who_mounts_it(daemons, alice_key, bob_key, password_hashes):
    (daemons.root / "folders" / "team").mkdir(parents=True)
    (daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
    (daemons.root / "scripts" / "quota.py").write_text(VETO_SCRIPT)
    users = (user_toml("alice", keys=[alice_key], password_hash=password_hashes["alice"],
                       folders='{ "/shared" = "team" }')
             + user_toml("bob", keys=[bob_key], password_hash=password_hashes["bob"],
                         folders='{ "/team" = "team" }'))
    folder = ('\n[[folders]]\nname = "team"\npath = "folders/team"\nquota_size = 1000\nquota_files = 10\n'
              'permissions = { "/" = ["*"] }\n')
    d = daemons.start(BINDINGS + HTTP_EXTRA + folder, users=users)
    a = paramiko_client(d, key=alice_key)
    try:
        sftp_put(a, "/shared/a.bin", b"a" * 600)
        sftp_put(a, "/mine.bin", b"m" * 5000)  # the home has no quota; the folder's is not touched
    finally:
        close_client(a)
    # bob mounts the same folder elsewhere: alice's bytes count against him too
    r = request(d, "PUT", "/team/b.bin", b"b" * 500, user="bob", password=BOB_PASSWORD)
    assert r.status == 507 and "quota exceeded: folder team may hold 1000 bytes" in r.text, r.text
    assert request(d, "PUT", "/team/b.bin", b"b" * 400, user="bob", password=BOB_PASSWORD).status == 201
    d.wait_log(r"user=bob .*THRESHOLD size 95 1000 1000 folder=team")  # 60% -> 100%: 80 and 95 crossed
    d.wait_log(r"user=bob .*THRESHOLD size 80 1000 1000 folder=team")
    r = request(d, "PUT", "/team/c.bin", b"c", user="bob", password=BOB_PASSWORD)
    assert r.status == 507 and "folder team holds 1000 bytes" in r.text
    scans = {s["scope"]: s for s in quota_scan(d)}
    assert scans["folder:team"]["before"] == scans["folder:team"]["after"] == {"bytes": 1000, "files": 2}
    assert scans["user:alice"]["after"] == {"bytes": 5000, "files": 1}  # the folder is not in her home's count
    assert scans["user:alice"]["before"] == scans["user:alice"]["after"]
