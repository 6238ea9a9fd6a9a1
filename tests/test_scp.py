"""Legacy SCP (``scp -O``) end to end: real daemon, real OpenSSH ``scp``, curl (libssh2) and
raw paramiko exec channels speaking the protocol by hand (for what no polite client sends).

One daemon serves the whole module (each test works in its own directory) to keep it fast.
"""

from __future__ import annotations

import os
import stat
import subprocess
import uuid
from pathlib import Path

import paramiko
import pytest

from conftest import SSH_OPTS, DaemonFactory, Keys, require_tool


@pytest.fixture(scope="module")
def srv(tmp_path_factory, alice_key, bob_key, password_hashes, host_keys):
    factory = DaemonFactory(tmp_path_factory.mktemp("scp"), alice_key, bob_key, password_hashes, host_keys)
    d = factory.start()
    yield d
    factory.close()


@pytest.fixture
def work(srv) -> str:
    """A fresh directory in alice's home for one test; returns its virtual name."""
    name = "t-" + uuid.uuid4().hex[:8]
    (srv.home("alice") / name).mkdir(parents=True)
    return name


def scp(srv, key: Keys, *args: str, legacy: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    require_tool("scp")
    cmd = ["scp", *(["-O"] if legacy else []), "-i", str(key.private), "-P", str(srv.port), *SSH_OPTS, *args]
    return subprocess.run(cmd, text=True, capture_output=True, timeout=60, cwd=cwd)


def ok(proc: subprocess.CompletedProcess[str], srv) -> None:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}\n--- log:\n{srv.log_text()[-3000:]}"


def remote(user: str, path: str) -> str:
    return f"{user}@127.0.0.1:{path}"


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def raw_exec(srv, key: Keys, command: str, user: str = "alice") -> tuple[paramiko.Transport, paramiko.Channel]:
    t = paramiko.Transport(("127.0.0.1", srv.port))
    t.start_client(timeout=10)
    t.auth_publickey(user, paramiko.PKey.from_path(str(key.private)))
    ch = t.open_session(timeout=10)
    ch.settimeout(10)
    ch.exec_command(command)
    return t, ch


def recv_reply(ch: paramiko.Channel) -> bytes:
    """One SCP reply: b"\\0", or the \\x01/\\x02 line."""
    first = ch.recv(1)
    if first in (b"", b"\0"):
        return first
    out = first
    while not out.endswith(b"\n"):
        b = ch.recv(1)
        if not b:
            break
        out += b
    return out


# --- basic transfers -----------------------------------------------------------------


@pytest.mark.parametrize("legacy", [True, False], ids=["scp-O", "scp-sftp"])
def test_single_file_both_ways(srv, alice_key, work, tmp_path, legacy):
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(700_000) + b"end")
    ok(scp(srv, alice_key, str(src), remote("alice", f"/{work}/up.bin"), legacy=legacy), srv)
    assert (srv.home("alice") / work / "up.bin").read_bytes() == src.read_bytes()

    down = tmp_path / "down.bin"
    ok(scp(srv, alice_key, remote("alice", f"/{work}/up.bin"), str(down), legacy=legacy), srv)
    assert down.read_bytes() == src.read_bytes()


def test_empty_file_and_relative_paths(srv, alice_key, work, tmp_path):
    src = tmp_path / "empty"
    src.write_bytes(b"")
    ok(scp(srv, alice_key, str(src), remote("alice", f"{work}/e1")), srv)  # relative to the home
    ok(scp(srv, alice_key, str(src), remote("alice", f"~/{work}/e2")), srv)
    assert (srv.home("alice") / work / "e1").read_bytes() == b""
    assert (srv.home("alice") / work / "e2").read_bytes() == b""
    ok(scp(srv, alice_key, remote("alice", f"{work}/e1"), str(tmp_path / "back")), srv)
    assert (tmp_path / "back").read_bytes() == b""


def test_upload_into_existing_dir_vs_new_name(srv, alice_key, work, tmp_path):
    home = srv.home("alice") / work
    (home / "dir").mkdir()
    src = tmp_path / "report.txt"
    src.write_text("quarterly numbers\n")
    ok(scp(srv, alice_key, str(src), remote("alice", f"/{work}/dir")), srv)
    assert (home / "dir" / "report.txt").read_text() == "quarterly numbers\n"
    ok(scp(srv, alice_key, str(src), remote("alice", f"/{work}/renamed.txt")), srv)
    assert (home / "renamed.txt").read_text() == "quarterly numbers\n"
    assert not (home / "report.txt").exists()

    # overwrite keeps the content right (atomic replace) and several files need a directory (-d)
    src.write_text("v2\n")
    ok(scp(srv, alice_key, str(src), remote("alice", f"/{work}/renamed.txt")), srv)
    assert (home / "renamed.txt").read_text() == "v2\n"
    other = tmp_path / "other.txt"
    other.write_text("o\n")
    proc = scp(srv, alice_key, str(src), str(other), remote("alice", f"/{work}/nodir"))
    assert proc.returncode != 0
    assert "not a directory" in proc.stderr
    assert not (home / "nodir").exists()
    ok(scp(srv, alice_key, str(src), str(other), remote("alice", f"/{work}/dir")), srv)
    assert (home / "dir" / "other.txt").read_text() == "o\n"


def _make_tree(root: Path) -> None:
    for i in range(20):
        sub = root / ("" if i < 5 else f"a{i % 3}") / ("" if i < 12 else "deep/er")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:02d}.dat").write_bytes(os.urandom(i * 1000 + 1))
    (root / "emptydir").mkdir()


def test_recursive_upload_and_download(srv, alice_key, work, tmp_path):
    src = tmp_path / "tree"
    _make_tree(src)
    assert len(tree(src)) == 20
    ok(scp(srv, alice_key, "-r", str(src), remote("alice", f"/{work}")), srv)
    up = srv.home("alice") / work / "tree"
    assert tree(up) == tree(src)
    assert (up / "emptydir").is_dir()

    # to a new name: the directory itself takes the name
    ok(scp(srv, alice_key, "-r", str(src), remote("alice", f"/{work}/copy")), srv)
    assert tree(srv.home("alice") / work / "copy") == tree(src)

    dest = tmp_path / "back"
    dest.mkdir()
    ok(scp(srv, alice_key, "-r", remote("alice", f"/{work}/tree"), str(dest)), srv)
    assert tree(dest / "tree") == tree(src)
    assert (dest / "tree" / "emptydir").is_dir()
    assert not list(up.rglob(".scriptsftp-part-*"))


def test_preserve_times_and_mode(srv, alice_key, work, tmp_path):
    src = tmp_path / "old.sh"
    src.write_text("#!/bin/sh\necho hi\n")
    src.chmod(0o751)
    os.utime(src, (1_500_000_000, 1_400_000_000))
    ok(scp(srv, alice_key, "-p", str(src), remote("alice", f"/{work}/old.sh")), srv)
    st = (srv.home("alice") / work / "old.sh").stat()
    assert int(st.st_mtime) == 1_400_000_000
    assert int(st.st_atime) == 1_500_000_000
    assert stat.S_IMODE(st.st_mode) == 0o751

    # without -p: a new file gets the mode masked with 022 and a fresh mtime
    ok(scp(srv, alice_key, str(src), remote("alice", f"/{work}/fresh.sh")), srv)
    st = (srv.home("alice") / work / "fresh.sh").stat()
    assert int(st.st_mtime) != 1_400_000_000
    assert stat.S_IMODE(st.st_mode) == 0o751 & ~0o022

    served = srv.home("alice") / work / "served.txt"
    served.write_text("from the server\n")
    served.chmod(0o640)
    os.utime(served, (1_300_000_000, 1_200_000_000))
    down = tmp_path / "served.txt"
    ok(scp(srv, alice_key, "-p", remote("alice", f"/{work}/served.txt"), str(down)), srv)
    assert down.read_text() == "from the server\n"
    assert int(down.stat().st_mtime) == 1_200_000_000
    assert stat.S_IMODE(down.stat().st_mode) == 0o640

    # -r -p: directory times survive their files being written
    d = tmp_path / "pdir"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x").write_text("x")
    os.utime(d / "sub" / "x", (1_100_000_000, 1_100_000_000))
    os.utime(d / "sub", (1_000_000_000, 1_000_000_000))
    ok(scp(srv, alice_key, "-r", "-p", str(d), remote("alice", f"/{work}/")), srv)
    assert int((srv.home("alice") / work / "pdir" / "sub").stat().st_mtime) == 1_000_000_000
    assert int((srv.home("alice") / work / "pdir" / "sub" / "x").stat().st_mtime) == 1_100_000_000


def test_download_wildcards_and_errors(srv, alice_key, work, tmp_path):
    home = srv.home("alice") / work
    for name in ("a.txt", "b.txt", "c.log", ".hidden.txt"):
        (home / name).write_text(name)
    (home / "sub").mkdir()
    dest = tmp_path / "w"
    dest.mkdir()
    ok(scp(srv, alice_key, remote("alice", f"/{work}/*.txt"), str(dest)), srv)
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "b.txt"]
    assert (dest / "a.txt").read_text() == "a.txt"

    proc = scp(srv, alice_key, remote("alice", f"/{work}/missing.bin"), str(dest))
    assert proc.returncode == 1
    assert "no such file" in proc.stderr
    proc = scp(srv, alice_key, remote("alice", f"/{work}/sub"), str(dest))
    assert proc.returncode == 1
    assert "not a regular file" in proc.stderr
    proc = scp(srv, alice_key, remote("alice", f"/{work}/*.none"), str(dest))
    assert proc.returncode == 1


# --- permissions and confinement ----------------------------------------------------------


def test_bob_read_only_except_inbox(srv, bob_key, tmp_path):
    (srv.home("bob") / "inbox").mkdir(parents=True, exist_ok=True)
    src = tmp_path / "bob.txt"
    src.write_text("from bob\n")
    proc = scp(srv, bob_key, str(src), remote("bob", "/bob.txt"))
    assert proc.returncode == 1
    assert "/bob.txt: permission denied (upload)" in proc.stderr
    assert not (srv.home("bob") / "bob.txt").exists()
    ok(scp(srv, bob_key, str(src), remote("bob", "/inbox/")), srv)
    assert (srv.home("bob") / "inbox" / "bob.txt").read_text() == "from bob\n"

    # -r into / : the directory is refused, nothing is created
    d = tmp_path / "bobdir"
    d.mkdir()
    (d / "f").write_text("f")
    proc = scp(srv, bob_key, "-r", str(d), remote("bob", "/"))
    assert proc.returncode == 1
    assert "permission denied (mkdir)" in proc.stderr
    assert not (srv.home("bob") / "bobdir").exists()


def test_path_traversal_in_target_stays_home(srv, alice_key, tmp_path):
    src = tmp_path / "evil"
    src.write_text("owned\n")
    proc = scp(srv, alice_key, str(src), remote("alice", "../../etc/x"))
    assert proc.returncode == 1
    assert "no such file" in proc.stderr
    root = srv.root.parent  # the daemon's whole tree: config, state, every home
    assert [p for p in root.rglob("x") if p.parent.name == "etc"] == []

    # with the directory existing *in the home*, ../.. lands there and nowhere else
    (srv.home("alice") / "etc").mkdir(exist_ok=True)
    ok(scp(srv, alice_key, str(src), remote("alice", "../../etc/x")), srv)
    assert (srv.home("alice") / "etc" / "x").read_text() == "owned\n"
    assert [p for p in root.rglob("x") if p.parent.name == "etc"] == [srv.home("alice") / "etc" / "x"]


@pytest.mark.parametrize("name", [b"../x", b"..", b"a/b", b"/abs", b".", b""])
def test_malicious_names_are_refused(srv, alice_key, work, name):
    t, ch = raw_exec(srv, alice_key, f"scp -t /{work}")
    try:
        assert recv_reply(ch) == b"\0"
        ch.sendall(b"C0644 5 " + name + b"\n")
        reply = recv_reply(ch)
        assert reply.startswith(b"\x02scp: protocol error"), reply
        assert ch.recv_exit_status() == 1
    finally:
        t.close()
    assert list((srv.home("alice") / work).iterdir()) == []
    assert not (srv.home("alice").parent / "x").exists()


def test_malicious_records_are_refused(srv, alice_key, work):
    cases = [
        b"C0644 -5 f\n", b"C0644 12x f\n", b"C9999 5 f\n", b"C0644 99999999999999999999 f\n",
        b"D0755 0 d\n",  # without -r
        b"E\n",  # nothing to end
        b"T1 0 1\n", b"T1 5000000 1 0\n", b"X whatever\n", b"\n", b"C" + b"7" * 5000 + b"\n",
    ]
    for record in cases:
        t, ch = raw_exec(srv, alice_key, f"scp -t /{work}")
        try:
            assert recv_reply(ch) == b"\0"
            ch.sendall(record)
            reply = recv_reply(ch)
            assert reply.startswith(b"\x02scp: "), (record[:40], reply)
            assert ch.recv_exit_status() == 1
        finally:
            t.close()
    assert list((srv.home("alice") / work).iterdir()) == []


def test_names_the_session_refuses_are_per_file_errors(srv, alice_key, work):
    """Control characters or a staging name: that file fails (\\x01), the stream goes on."""
    t, ch = raw_exec(srv, alice_key, f"scp -r -t /{work}")
    try:
        assert recv_reply(ch) == b"\0"
        for record in (b"C0644 3 bad\x1bname\n", b"C0644 3 .scriptsftp-part-0123\n", b"D0755 0 dir\x07\n"):
            ch.sendall(record)
            assert recv_reply(ch).startswith(b"\x01scp: "), record
        ch.sendall(b"C0644 3 good\n")
        assert recv_reply(ch) == b"\0"
        ch.sendall(b"abc\0")
        assert recv_reply(ch) == b"\0"
        ch.shutdown_write()
        assert ch.recv_exit_status() == 1
    finally:
        t.close()
    assert sorted(p.name for p in (srv.home("alice") / work).iterdir()) == ["good"]


def test_unknown_options_and_commands(srv, alice_key):
    for command in ("scp -x -t /", "scp /", "scp -t -f /", "scp -t a b", "scp -f", "scp -t 'a\x01b'"):
        t, ch = raw_exec(srv, alice_key, command)
        try:
            reply = recv_reply(ch)
            assert reply.startswith(b"\x02scp: "), (command, reply)
            assert ch.recv_exit_status() == 1
        finally:
            t.close()


# --- atomicity -----------------------------------------------------------------------


def test_disconnect_mid_file_leaves_old_version(srv, alice_key, work):
    home = srv.home("alice") / work
    (home / "doc.txt").write_bytes(b"old version\n")
    start = len(srv.log_text().splitlines())
    t, ch = raw_exec(srv, alice_key, f"scp -t /{work}/doc.txt")
    assert recv_reply(ch) == b"\0"
    ch.sendall(b"C0644 100000 doc.txt\n")
    assert recv_reply(ch) == b"\0"
    ch.sendall(b"N" * 50_000)
    # the server has taken (some of) the bytes: a staging file exists beside the target
    t.close()
    srv.wait_log(rf"upload /{work}/doc.txt aborted", start=start)
    assert (home / "doc.txt").read_bytes() == b"old version\n"
    assert sorted(p.name for p in home.iterdir()) == ["doc.txt"], srv.log_text()[-3000:]


def test_client_error_after_data_discards_upload(srv, alice_key, work):
    """A source that could not read its whole file says so (\\x01) instead of \\0: nothing is published."""
    home = srv.home("alice") / work
    (home / "doc.txt").write_bytes(b"old\n")
    t, ch = raw_exec(srv, alice_key, f"scp -t /{work}")
    try:
        assert recv_reply(ch) == b"\0"
        ch.sendall(b"C0644 4 doc.txt\n")
        assert recv_reply(ch) == b"\0"
        ch.sendall(b"new!" + b"\x01scp: doc.txt: Input/output error\n")
        assert recv_reply(ch).startswith(b"\x01scp: /" + work.encode() + b"/doc.txt: upload discarded")
        # the stream stays usable: the next file goes through
        ch.sendall(b"C0600 3 two\n")
        assert recv_reply(ch) == b"\0"
        ch.sendall(b"abc\0")
        assert recv_reply(ch) == b"\0"
        ch.shutdown_write()
        assert ch.recv_exit_status() == 1
    finally:
        t.close()
    assert (home / "doc.txt").read_bytes() == b"old\n"
    assert (home / "two").read_bytes() == b"abc"
    assert sorted(p.name for p in home.iterdir()) == ["doc.txt", "two"]


# --- curl (libssh2) ----------------------------------------------------------------


def test_curl_scp_upload_and_download(srv, alice_key, work, tmp_path):
    curl = require_tool("curl")
    src = tmp_path / "curl.bin"
    src.write_bytes(os.urandom(300_000))
    pub = tmp_path / "alice.pub"
    pub.write_text(alice_key.public_line + "\n")
    base = ["--silent", "--show-error", "-k", "--key", str(alice_key.private), "--pubkey", str(pub), "-u", "alice:"]
    url = f"scp://127.0.0.1:{srv.port}/{work}/curl.bin"
    up = subprocess.run([curl, *base, "-T", str(src), url], capture_output=True, text=True, timeout=60)
    ok(up, srv)
    assert (srv.home("alice") / work / "curl.bin").read_bytes() == src.read_bytes()
    down = tmp_path / "curl-down.bin"
    got = subprocess.run([curl, *base, "-o", str(down), url], capture_output=True, text=True, timeout=60)
    ok(got, srv)
    assert down.read_bytes() == src.read_bytes()


# --- script vetoes reach the scp user ------------------------------------------------------

VETO = '''
def on_pre_upload(event, api):
    if event.path.endswith(".exe"):
        api.veto("executables are not accepted: " + event.path)

def on_pre_publish(event, api):
    if api.file.read(2) == b"MZ":
        api.veto("Windows executable inside " + event.path)

def on_pre_download(event, api):
    if "/secret" in event.path:
        api.veto("secret stays here")
'''


def test_script_vetoes_are_printed_by_scp(daemons, alice_key, tmp_path):
    (daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
    (daemons.root / "scripts" / "veto.py").write_text(VETO)
    extra = "".join(
        f'[[bindings]]\nevent = "{e}"\nscript = "veto.py"\nprotocols = ["scp"]\n'
        + ('allow = ["read"]\n' if e == "pre-publish" else "")
        for e in ("pre-upload", "pre-publish", "pre-download")
    )
    d = daemons.start(extra)
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "in").mkdir()
    (home / "in" / "data.bin").write_bytes(b"old version")

    # pre-upload: refused before any byte flows
    exe = tmp_path / "tool.exe"
    exe.write_bytes(b"MZ" + b"\0" * 5000)
    proc = scp(d, alice_key, str(exe), remote("alice", "/in/"))
    assert proc.returncode == 1
    assert "executables are not accepted: /in/tool.exe" in proc.stderr
    assert not (home / "in" / "tool.exe").exists()

    # pre-publish: the bytes arrived, the script read them and said no; the old version stays
    disguised = tmp_path / "data.bin"
    disguised.write_bytes(b"MZ" + b"\0" * 300_000)
    proc = scp(d, alice_key, str(disguised), remote("alice", "/in/data.bin"))
    assert proc.returncode == 1
    assert "Windows executable inside /in/data.bin" in proc.stderr
    assert (home / "in" / "data.bin").read_bytes() == b"old version"

    # -r: a vetoed file fails, the others of the same copy still go through
    tree_dir = tmp_path / "mixed"
    tree_dir.mkdir()
    (tree_dir / "a.txt").write_text("a")
    (tree_dir / "b.exe").write_text("b")
    (tree_dir / "c.txt").write_text("c")
    proc = scp(d, alice_key, "-r", str(tree_dir), remote("alice", "/in/"))
    assert proc.returncode == 1
    assert "executables are not accepted: /in/mixed/b.exe" in proc.stderr
    assert sorted(p.name for p in (home / "in" / "mixed").iterdir()) == ["a.txt", "c.txt"]

    # pre-download
    (home / "secret.txt").write_text("s3cret")
    (home / "open.txt").write_text("open")
    dest = tmp_path / "dl"
    dest.mkdir()
    proc = scp(d, alice_key, remote("alice", "/secret.txt"), remote("alice", "/open.txt"), str(dest))
    assert proc.returncode == 1
    assert "secret stays here" in proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["open.txt"]
    assert [p.name for p in home.rglob(".scriptsftp-part-*")] == []


def test_an_unexpected_error_is_one_bounded_log_line_not_a_traceback_per_channel(monkeypatch, caplog):
    """Issue 15 item 8, the class: a bug an scp command hits is logged with its traceback
    once, then one line per 10 s with a count, however many channels a client opens."""
    import logging
    from types import SimpleNamespace

    from scriptsftp.server.frontends.ssh import scp as scp_module
    from scriptsftp.server.support.logs import BoundedLog

    monkeypatch.setattr(scp_module, "_unexpected", BoundedLog(logging.ERROR))

    def bug(argv):
        raise RuntimeError("a bug")

    monkeypatch.setattr(scp_module, "_parse_argv", bug)
    ended = []

    class Channel:
        def settimeout(self, t): pass
        def send_exit_status(self, status): ended.append(status)
        def close(self): pass

    session = SimpleNamespace(id="s1", close=lambda: None)
    host = SimpleNamespace(limits=None, channel_ended=lambda why: None)
    caplog.set_level(logging.INFO, logger="scriptsftp.scp")
    for _ in range(30):
        scp_module.run_scp(Channel(), session, ["scp", "-t", "x"], host)
    assert ended == [1] * 30  # each command still ends, with a failure status
    failed = [r for r in caplog.records if r.getMessage().startswith("scp failed")]
    assert len(failed) == 1 and failed[0].exc_info is not None
