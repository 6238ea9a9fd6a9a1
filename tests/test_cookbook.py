"""The cookbook (scripts-examples/), end to end: each example is copied as
shipped into a real daemon's scripts dir, bound with the TOML snippet from its
own header comment, and driven by real SFTP clients.

This module covers the examples that need only veto / api.file / api.store;
tests/test_cookbook_capabilities.py covers those using api.fs, api.notify and
api.run.
"""

from __future__ import annotations

import datetime
import io
import os
import shutil
import socket
import struct
import subprocess
import tomllib
import zipfile
from pathlib import Path
from typing import Any, Callable

import paramiko
import pytest

from conftest import (ALICE_PASSWORD, BIN, Daemon, DaemonFactory, close_client, paramiko_client, sftp_batch,
                      sftp_put, toml_str, user_toml)

EXAMPLES = Path(__file__).resolve().parent.parent / "scripts-examples"


# --- helpers shared with test_cookbook_capabilities.py ------------------------------------


def header_snippet(name: str) -> dict[str, Any]:
    """The TOML snippet of an example's header comment ("# Bind it ..."), parsed."""
    lines = (EXAMPLES / name).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Bind it"))
    body = []
    for line in lines[start + 1:]:
        if line == "#":
            body.append("")
        elif line.startswith("#   "):
            body.append(line[4:])
        else:
            break
    return tomllib.loads("\n".join(body))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_str(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Serialise parsed TOML back (tables, arrays of tables, scalars)."""
    out = []
    scalars = {k: v for k, v in data.items()
               if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))}
    if prefix and scalars:
        out.append(f"[{prefix}]")
    out += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for k, v in data.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.append(to_toml(v, name))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"[[{name}]]")
                out += [f"{ik} = {_toml_value(iv)}" for ik, iv in item.items()]
    return "\n".join(out) + "\n"


def example_toml(name: str, patch: Callable[[dict[str, Any]], None] | None = None, *, inbox: str | None = None,
                 **binding_overrides: Any) -> str:
    """The example's header snippet as config text: ``inbox`` replaces the
    first directory of its path globs ("/inbox/**/*.csv" -> "/csv/**/*.csv"),
    or gives it paths = [inbox/**] if it has none; ``binding_overrides`` are
    applied to each of its bindings and ``patch`` to the whole document."""
    data = header_snippet(name)
    for b in data.get("bindings", []):
        assert b["script"] == name, f"{name}: its snippet binds {b['script']}"
        if inbox is not None:
            b["paths"] = [inbox + "/" + p.split("/", 2)[2] for p in b["paths"]] if "paths" in b \
                else [inbox + "/**"]
        b.update(binding_overrides)
    if patch is not None:
        patch(data)
    return to_toml(data)


def install(daemons: DaemonFactory, *names: str) -> None:
    """Copy examples, as shipped, into the daemon's scripts dir."""
    scripts = daemons.root / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(EXAMPLES / name, scripts / name)


# Upload ``data``; a refusal raises with the server's status message, whether it
# comes at OPEN (pre-upload) or at CLOSE (pre-publish, which paramiko's close() hides).
put = sftp_put


def put_refused(sftp: paramiko.SFTPClient, path: str, data: bytes, reason: str) -> None:
    """Upload that must be refused with ``reason`` (a regex) in the SFTP status message."""
    with pytest.raises(PermissionError, match=reason):
        put(sftp, path, data)


def assert_absent(d: Daemon, user: str, vpath: str, sftp: paramiko.SFTPClient | None = None) -> None:
    """A refused file never appears under its name (nor as a leftover staging file)."""
    local = d.home(user) / vpath.lstrip("/")
    assert not local.exists(), f"{vpath} was published"
    parent = local.parent
    if parent.exists():
        leftovers = [p.name for p in parent.iterdir() if p.name.startswith(".scriptsftp")]
        assert leftovers == [], leftovers
    if sftp is not None:
        directory, _, base = vpath.rpartition("/")
        assert base not in sftp.listdir(directory or "/")


def mkdirs(d: Daemon, user: str, *dirs: str) -> None:
    for sub in dirs:
        (d.home(user) / sub.lstrip("/")).mkdir(parents=True, exist_ok=True)


# --- one daemon for the upload/download checks (each test uses its own directory) ---------

FILE_EXAMPLES = {
    # example -> directory its binding is given in this module's daemon
    "reject_executables.py": "/exe",
    "csv_schema.py": "/csv",
    "zip_guard.py": "/zip",
    "download_once.py": "/dl",
    "daily_quota.py": "/quota",
}


@pytest.fixture(scope="module")
def files_daemon(module_daemons: DaemonFactory) -> Daemon:
    install(module_daemons, *FILE_EXAMPLES)
    extra = "".join(example_toml(name, inbox=directory) for name, directory in FILE_EXAMPLES.items())
    d = module_daemons.start(extra)
    mkdirs(d, "alice", *FILE_EXAMPLES.values())
    return d


@pytest.fixture
def alice(files_daemon: Daemon, alice_key):
    sftp = paramiko_client(files_daemon, key=alice_key)
    yield sftp
    close_client(sftp)


# 1. reject_executables.py ----------------------------------------------------------------


def test_reject_executables_by_content(files_daemon: Daemon, alice: paramiko.SFTPClient):
    d = files_daemon
    put(alice, "/exe/report.pdf", b"%PDF-1.7\n" + b"x" * 2000)
    assert (d.home() / "exe/report.pdf").read_bytes().startswith(b"%PDF")
    # a Windows program renamed to .pdf
    put_refused(alice, "/exe/invoice.pdf", b"MZ\x90\x00" + b"\0" * 3000,
                r"/exe/invoice\.pdf looks like a Windows program \(EXE/DLL\); executables are not accepted here")
    assert_absent(d, "alice", "/exe/invoice.pdf", alice)
    put_refused(alice, "/exe/run.txt", b"\x7fELF\x02\x01\x01" + b"\0" * 100, r"Linux/Unix program \(ELF\)")
    put_refused(alice, "/exe/setup.txt", b"#!/bin/sh\nrm -rf /\n", r"interpreter line")
    assert_absent(d, "alice", "/exe/run.txt")
    d.wait_log(r"reject_executables\.py vetoed pre-publish /exe/invoice\.pdf", timeout=30)


def test_reject_executables_with_openssh_sftp(files_daemon: Daemon, alice_key, tmp_path: Path):
    bad = tmp_path / "tool.dat"
    bad.write_bytes(b"MZ" + os.urandom(5000))
    proc = sftp_batch(files_daemon, f"put {bad} /exe/tool.dat\n", alice_key)
    assert proc.returncode != 0  # OpenSSH's sftp prints only "Permission denied"
    assert_absent(files_daemon, "alice", "/exe/tool.dat")


# 3. csv_schema.py --------------------------------------------------------------------------

GOOD_CSV = (b"\xef\xbb\xbforder_id,date,customer,amount,currency\r\n"
            b"1001,2024-01-31,ACME Corp,12.50,EUR\r\n"
            b'1002,2024-02-29,"Smith, Jones & Co",7,USD\r\n')


def test_csv_schema_accepts_good_rows_and_names_the_first_bad_line(files_daemon: Daemon, alice):
    d = files_daemon
    put(alice, "/csv/orders.csv", GOOD_CSV)
    assert (d.home() / "csv/orders.csv").read_bytes() == GOOD_CSV
    d.wait_log(r"csv_schema\.py: csv accepted path=/csv/orders\.csv rows=2", timeout=30)

    bad = GOOD_CSV + b"1003,2024-03-01,ACME Corp,9.99,EUR\r\n1004,2024-03-02,ACME Corp,12,50,EUR\r\n"
    put_refused(alice, "/csv/march.csv", bad, r"march\.csv line 5: 6 fields, expected 5")
    assert_absent(d, "alice", "/csv/march.csv", alice)
    put_refused(alice, "/csv/april.csv", GOOD_CSV + b"1005,2024-04-31,ACME Corp,1.00,EUR\r\n",
                r"april\.csv line 4, column date: '2024-04-31' is not a date \(YYYY-MM-DD\)")
    put_refused(alice, "/csv/may.csv", b"id,date\n1,2024-05-01\n",
                r"may\.csv line 1: the header must be order_id,date,customer,amount,currency \(found id,date\)")
    put_refused(alice, "/csv/empty.csv", b"", r"empty\.csv is empty")
    # replacing a good file with a bad one keeps the good one
    put_refused(alice, "/csv/orders.csv", GOOD_CSV + b"x,2024-01-01,A,1,EUR\n",
                r"orders\.csv line 4, column order_id: 'x' is not a whole number")
    assert (d.home() / "csv/orders.csv").read_bytes() == GOOD_CSV
    for name in ("april", "may", "empty"):
        assert_absent(d, "alice", f"/csv/{name}.csv")
    # the binding's glob: other files in the folder are not checked
    put(alice, "/csv/readme.txt", b"not a csv")


# 4. zip_guard.py ---------------------------------------------------------------------------


def make_zip(entries: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def _eocd(data: bytes) -> int:
    return data.rfind(b"PK\x05\x06")


def as_zip64(data: bytes) -> bytes:
    """The same archive with a ZIP64 end-of-archive record (as big archives have)."""
    at = _eocd(data)
    count, cd_size, cd_offset = struct.unpack_from("<HII", data, at + 10)
    rec = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size, cd_offset)
    loc = struct.pack("<4sIQI", b"PK\x06\x07", 0, at, 1)
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:at] + rec + loc + eocd


def encrypted(data: bytes) -> bytes:
    """Set the 'encrypted' flag on the (first) entry, in both headers."""
    b = bytearray(data)
    b[6] |= 1                                   # local header flags
    b[b.find(b"PK\x01\x02") + 8] |= 1           # central directory flags
    return bytes(b)


def overlapping(data: bytes) -> bytes:
    """Two index entries pointing at one local entry (Fifield's overlapping bomb)."""
    at = _eocd(data)
    count, cd_size, cd_offset = struct.unpack_from("<HII", data, at + 10)
    cd = data[cd_offset:cd_offset + cd_size]
    eocd = bytearray(data[at:])
    struct.pack_into("<HHII", eocd, 8, count * 2, count * 2, cd_size * 2, cd_offset)
    return data[:cd_offset] + cd + cd + bytes(eocd)


def test_zip_guard(files_daemon: Daemon, alice):
    d = files_daemon
    good = make_zip([("reports/jan.csv", b"a,b\n1,2\n" * 50), ("readme.txt", b"hello")])
    put(alice, "/zip/reports.zip", good)
    put(alice, "/zip/big-index.zip", as_zip64(good))
    put(alice, "/zip/stored.zip", make_zip([("x.bin", os.urandom(4000))], zipfile.ZIP_STORED))
    assert (d.home() / "zip/reports.zip").read_bytes() == good
    d.wait_log(r"zip_guard\.py: zip checked path=/zip/big-index\.zip entries=2", timeout=30)

    cases = [
        ("truncated.zip", good[:-40], r"truncated\.zip refused: it is not a ZIP archive or it is truncated"),
        ("renamed.zip", b"%PDF-1.4 not a zip at all" * 10, r"renamed\.zip refused: it is not a ZIP archive"),
        ("secret.zip", encrypted(make_zip([("pay.csv", b"1,2\n")], zipfile.ZIP_STORED)),
         r"secret\.zip refused: 'pay\.csv' is encrypted \(password-protected archives are not accepted\)"),
        ("slip.zip", make_zip([("ok.txt", b"ok"), ("../../.ssh/authorized_keys", b"ssh-ed25519 AAAA")]),
         r"slip\.zip refused: entry '\.\./\.\./\.ssh/authorized_keys' has a '\.\.' component"),
        ("abs.zip", make_zip([("/etc/cron.d/x", b"* * * * * root id")]),
         r"abs\.zip refused: entry '/etc/cron\.d/x' has an absolute path"),
        ("bomb.zip", make_zip([("zeros.bin", b"\0" * 5_000_000)]),
         r"bomb\.zip refused: it would expand to 5000000 bytes from \d+ \(more than 100 times its size"),
        ("overlap.zip", overlapping(make_zip([("a.txt", b"a" * 100)])),
         r"overlap\.zip refused: entries share their data at offset 0"),
    ]
    for name, data, reason in cases:
        put_refused(alice, f"/zip/{name}", data, reason)
        assert_absent(d, "alice", f"/zip/{name}")
    assert sorted(alice.listdir("/zip")) == ["big-index.zip", "reports.zip", "stored.zip"]


# 7. download_once.py -----------------------------------------------------------------------


def test_download_once(files_daemon: Daemon, alice, alice_key, tmp_path: Path):
    d = files_daemon
    (d.home() / "dl/key.txt").write_bytes(b"one-time secret")
    put(alice, "/dl/other.txt", b"another file")
    assert alice.open("/dl/key.txt").read() == b"one-time secret"
    d.wait_log(r"download_once\.py: downloaded once path=/dl/key\.txt bytes=15", timeout=30)
    with pytest.raises(PermissionError, match=r"/dl/key\.txt may be downloaded only once; you downloaded it on "
                                              r"\d{4}-\d\d-\d\d at \d\d:\d\d UTC\. Ask the sender to send it again\."):
        alice.open("/dl/key.txt").read()
    # with OpenSSH's sftp too (it shows only "Permission denied"), nothing is written locally
    target = tmp_path / "key.txt"
    proc = sftp_batch(d, f"get /dl/key.txt {target}\n", alice_key)
    assert proc.returncode != 0 and not target.exists()
    # other files are not affected
    assert alice.open("/dl/other.txt").read() == b"another file"
    # a new version may be downloaded once more
    put(alice, "/dl/key.txt", b"second secret")
    assert alice.open("/dl/key.txt").read() == b"second secret"
    with pytest.raises(PermissionError, match="may be downloaded only once"):
        alice.open("/dl/key.txt").read()


# 8. daily_quota.py -------------------------------------------------------------------------


def seed_store(d: Daemon, script: str, key: str, value: Any) -> None:
    """Set a key in a script's store (as earlier uploads today would have)."""
    from scriptsftp.scripting.store import ScriptStore
    from scriptsftp.server.stores import StateStores

    store = ScriptStore(StateStores(d.state_dir))
    try:
        store.set(script, key, value)
    finally:
        store.close()


def test_daily_quota(files_daemon: Daemon, alice):
    d = files_daemon
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    seed_store(d, "daily_quota.py", f"alice:{today}", 999_000_000)     # alice ("*"): 1 GB a day
    put(alice, "/quota/a.bin", b"a" * 600_000)
    d.wait_log(r"daily_quota\.py: quota used=999600000 limit=1000000000", timeout=30)
    put_refused(alice, "/quota/b.bin", b"b" * 600_000,
                r"daily upload quota exceeded: 999\.60 MB of 1\.00 GB used today, 400\.00 kB left, "
                r"this file is 600\.00 kB; the quota resets at 00:00 UTC")
    assert_absent(d, "alice", "/quota/b.bin", alice)
    put(alice, "/quota/c.bin", b"c" * 400_000)                        # exactly what was left
    # quota used up: refused at open, before any byte is sent
    with pytest.raises(PermissionError, match=r"daily upload quota exceeded: 1\.00 GB of 1\.00 GB used today, "
                                              r"0 bytes left; the quota resets"):
        alice.open("/quota/d.bin", "w")
    assert_absent(d, "alice", "/quota/d.bin")
    assert sorted(alice.listdir("/quota")) == ["a.bin", "c.bin"]


# 11. access_rules.py -----------------------------------------------------------------------


def raw_connect(d: Daemon, source_ip: str) -> bytes:
    """Open a TCP connection from ``source_ip`` and return what the server sends
    first (its version line; followed by a DISCONNECT with the reason when refused)."""
    s = socket.create_connection(("127.0.0.1", d.port), timeout=20, source_address=(source_ip, 0))
    try:
        data = b""
        while b"\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        s.close()


def refusal_text(d: Daemon, source_ip: str) -> bytes:
    s = socket.create_connection(("127.0.0.1", d.port), timeout=20, source_address=(source_ip, 0))
    try:
        s.sendall(b"SSH-2.0-cookbook-test\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data
    finally:
        s.close()


def test_access_rules_users_hours_and_connection_rate(daemons: DaemonFactory, alice_key, bob_key, password_hashes,
                                                       monkeypatch, tmp_path):
    # a time zone in which it is now 02:xx: outside business hours on any day
    utc = datetime.datetime.now(datetime.timezone.utc)
    monkeypatch.setenv("TZ", f"XXX+{(utc.hour - 2) % 24}")
    install(daemons, "access_rules.py")
    users = (daemons.default_users()
             + user_toml("partner-acme", password_hash=password_hashes["alice"])
             + user_toml("ops-anna", keys=[bob_key]))
    d = daemons.start(example_toml("access_rules.py"), users=users)

    # pre-login: partners only in business hours, whatever their password
    transport = paramiko.Transport(("127.0.0.1", d.port))
    try:
        transport.start_client(timeout=20)
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password("partner-acme", ALICE_PASSWORD)
    finally:
        transport.close()
    d.wait_log(r"login failed for 'partner-acme' \(password\): partner-acme may log in Monday to Friday "
               r"from 08:00 to 18:00 \(server time is now \w+day 0[12]:\d\d\)", timeout=30)
    # ops-* only from their networks (OpenSSH prints the reason)
    proc = sftp_batch(d, "ls /\n", bob_key, user="ops-anna")
    assert proc.returncode != 0
    assert "ops-anna may log in only from 10.0.0.0/8, 192.168.0.0/16 (not from 127.0.0.1)" in proc.stderr
    # users without a rule: as usual
    assert sftp_batch(d, "ls /\n", alice_key).returncode == 0

    # connect: at most 30 connections a minute from one address
    for _ in range(30):
        assert raw_connect(d, "127.0.0.2").startswith(b"SSH-2.0-")
    refused = refusal_text(d, "127.0.0.2")
    assert b"too many connections from 127.0.0.2: at most 30 a minute, try again later" in refused
    # other addresses are not affected
    assert sftp_batch(d, "ls /\n", alice_key).returncode == 0


def script_test(example: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), "script", "test", str(EXAMPLES / example), *args], capture_output=True,
                          text=True, timeout=60)


def test_access_rules_with_script_test_command():
    """`scriptsftp script test` runs the shipped example in the sandbox, no server needed."""
    blocked = script_test("access_rules.py", "--event", "connect", "--remote-ip", "203.0.113.9")
    assert blocked.returncode == 1, blocked.stdout + blocked.stderr
    assert "decision: veto: connections from 203.0.113.9 are not accepted" in blocked.stdout
    ops = script_test("access_rules.py", "--event", "pre-login", "--user", "ops-anna", "--remote-ip", "172.16.0.5")
    assert ops.returncode == 1, ops.stdout + ops.stderr
    assert ("decision: veto: ops-anna may log in only from 10.0.0.0/8, 192.168.0.0/16 (not from 172.16.0.5)"
            in ops.stdout)


def test_csv_schema_with_script_test_command(tmp_path: Path):
    good, bad = tmp_path / "orders.csv", tmp_path / "bad.csv"
    good.write_bytes(GOOD_CSV)
    bad.write_bytes(GOOD_CSV + b"1003,2024-13-01,ACME,1.00,EUR\n")
    allowed = script_test("csv_schema.py", "--event", "pre-publish", "--path", "/inbox/orders.csv", "--file", str(good))
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "log:      csv accepted path=/inbox/orders.csv rows=2" in allowed.stdout
    assert "decision: allow" in allowed.stdout
    vetoed = script_test("csv_schema.py", "--event", "pre-publish", "--path", "/inbox/bad.csv", "--file", str(bad))
    assert vetoed.returncode == 1, vetoed.stdout + vetoed.stderr
    assert "decision: veto: bad.csv line 4, column date: '2024-13-01' is not a date (YYYY-MM-DD)" in vetoed.stdout
