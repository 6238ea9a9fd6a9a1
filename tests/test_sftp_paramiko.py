"""The SFTP front end seen from paramiko, and from raw SFTP packets where a test needs the wire.

Covers what OpenSSH's sftp does not let a test control: handle limits, READ
length capping, the extensions (limits, statvfs, posix-rename, fsync,
expand-path) and their exact replies, and hostile packets.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time

import paramiko
import pytest
from paramiko.sftp import (
    CMD_ATTRS, CMD_CLOSE, CMD_DATA, CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_FSETSTAT, CMD_FSTAT, CMD_HANDLE, CMD_INIT,
    CMD_MKDIR, CMD_OPEN, CMD_OPENDIR, CMD_READ, CMD_READDIR, CMD_SETSTAT, CMD_STATUS, CMD_VERSION, CMD_WRITE,
    SFTP_BAD_MESSAGE, SFTP_FLAG_CREATE, SFTP_FLAG_READ, SFTP_FLAG_TRUNC, SFTP_FLAG_WRITE, SFTP_OK, SFTP_OP_UNSUPPORTED,
    int64,
)

from conftest import ALICE_PASSWORD, close_client, paramiko_client, user_toml

DEFAULT_MAX_PACKET = 262144
DEFAULT_MAX_READ = DEFAULT_MAX_PACKET - 1024


@pytest.fixture(scope="module")
def d(module_daemons, alice_key, password_hashes):
    daemon = module_daemons.start(users=user_toml("alice", keys=[alice_key], password_hash=password_hashes["alice"]))
    daemon.home("alice").mkdir(parents=True, exist_ok=True)
    return daemon


@pytest.fixture
def sftp(d, alice_key):
    c = paramiko_client(d, "alice", key=alice_key)
    yield c
    close_client(c)


class RawSFTP:
    """Just enough of the SFTP wire protocol to send what paramiko's client would not."""

    def __init__(self, transport: paramiko.Transport) -> None:
        self.chan = transport.open_session(timeout=10)
        self.chan.settimeout(10)
        self.chan.invoke_subsystem("sftp")
        self.next_id = 1

    def send(self, t: int, payload: bytes) -> None:
        self.chan.sendall(struct.pack(">IB", len(payload) + 1, t) + payload)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.chan.recv(n - len(buf))
            if not chunk:
                raise EOFError("channel closed")
            buf += chunk
        return buf

    def recv(self) -> tuple[int, bytes]:
        (size,) = struct.unpack(">I", self._recv_exact(4))
        data = self._recv_exact(size)
        return data[0], data[1:]

    def init(self) -> tuple[int, dict[str, str]]:
        self.send(CMD_INIT, struct.pack(">I", 3))
        t, data = self.recv()
        assert t == CMD_VERSION
        version, rest = struct.unpack(">I", data[:4])[0], data[4:]
        ext = {}
        while rest:
            name, rest = _take_string(rest)
            value, rest = _take_string(rest)
            ext[name.decode()] = value.decode()
        return version, ext

    def request(self, t: int, *fields: object) -> tuple[int, bytes]:
        rid = self.next_id
        self.next_id += 1
        payload = struct.pack(">I", rid)
        for f in fields:
            if isinstance(f, int64):
                payload += struct.pack(">Q", f)
            elif isinstance(f, int):
                payload += struct.pack(">I", f)
            else:
                b = f.encode() if isinstance(f, str) else f
                payload += struct.pack(">I", len(b)) + b
        self.send(t, payload)
        rt, data = self.recv()
        assert struct.unpack(">I", data[:4])[0] == rid
        return rt, data[4:]


def _take_string(data: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack(">I", data[:4])
    return data[4:4 + n], data[4 + n:]


def _status(t: int, data: bytes) -> tuple[int, str]:
    assert t == CMD_STATUS, t
    code = struct.unpack(">I", data[:4])[0]
    text, _ = _take_string(data[4:])
    return code, text.decode()


@pytest.fixture
def raw(d, alice_key):
    t = paramiko.Transport(("127.0.0.1", d.port))
    t.start_client(timeout=10)
    t.auth_publickey("alice", paramiko.PKey.from_path(str(alice_key.private)))
    r = RawSFTP(t)
    yield r
    t.close()


# --- handshake and extensions -------------------------------------------------------


def test_version_and_extensions(raw):
    version, ext = raw.init()
    assert version == 3
    assert ext == {
        "posix-rename@openssh.com": "1", "statvfs@openssh.com": "2", "fstatvfs@openssh.com": "2",
        "fsync@openssh.com": "1", "limits@openssh.com": "1", "expand-path@openssh.com": "1",
    }
    assert "hardlink@openssh.com" not in ext


def test_limits_reply_defaults(raw):
    raw.init()
    t, data = raw.request(CMD_EXTENDED, "limits@openssh.com")
    assert t == CMD_EXTENDED_REPLY
    max_packet, max_read, max_write, max_handles = struct.unpack(">4Q", data)
    assert (max_packet, max_read, max_write, max_handles) == (DEFAULT_MAX_PACKET, DEFAULT_MAX_READ,
                                                              DEFAULT_MAX_READ, 256)


def test_limits_reply_follows_config(daemons, alice_key):
    d = daemons.start(users=user_toml("alice", keys=[alice_key]), sftp_extra="max_packet = 65536\nmax_handles = 8")
    t = paramiko.Transport(("127.0.0.1", d.port))
    t.start_client(timeout=10)
    try:
        t.auth_publickey("alice", paramiko.PKey.from_path(str(alice_key.private)))
        raw = RawSFTP(t)
        raw.init()
        rt, data = raw.request(CMD_EXTENDED, "limits@openssh.com")
        assert rt == CMD_EXTENDED_REPLY
        assert struct.unpack(">4Q", data) == (65536, 65536 - 1024, 65536 - 1024, 8)
        # and the READ cap follows too
        (d.home("alice") / "f.bin").write_bytes(os.urandom(200_000))
        rt, data = raw.request(CMD_OPEN, "/f.bin", SFTP_FLAG_READ, 0)
        assert rt == CMD_HANDLE
        handle, _ = _take_string(data)
        rt, data = raw.request(CMD_READ, handle, int64(0), 10_000_000)
        assert rt == CMD_DATA
        chunk, _ = _take_string(data)
        assert len(chunk) == 65536 - 1024
    finally:
        t.close()


def test_statvfs_reply(raw, d):
    raw.init()
    t, data = raw.request(CMD_EXTENDED, "statvfs@openssh.com", "/")
    assert t == CMD_EXTENDED_REPLY
    bsize, frsize, blocks, bfree, bavail, files, ffree, favail, fsid, flag, namemax = struct.unpack(">11Q", data)
    st = os.statvfs(d.home("alice"))
    assert (bsize, frsize, blocks, files, namemax) == (st.f_bsize, st.f_frsize, st.f_blocks, st.f_files, st.f_namemax)
    assert bavail <= bfree <= blocks
    assert flag & 1 == st.f_flag & os.ST_RDONLY


def test_unknown_extension_and_hardlink_unsupported(raw, d):
    raw.init()
    (d.home("alice") / "hl-src").write_text("x")
    code, text = _status(*raw.request(CMD_EXTENDED, "hardlink@openssh.com", "/hl-src", "/hl-dst"))
    assert code == SFTP_OP_UNSUPPORTED
    assert "hardlink@openssh.com" in text
    assert not (d.home("alice") / "hl-dst").exists()
    code, _ = _status(*raw.request(CMD_EXTENDED, "no-such@example.com"))
    assert code == SFTP_OP_UNSUPPORTED
    code, _ = _status(*raw.request(99))  # an unknown packet type
    assert code == SFTP_OP_UNSUPPORTED


def test_expand_path(raw):
    raw.init()
    for asked, expected in (("~", "/"), ("~/docs/../x", "/x"), ("a/./b", "/a/b"), ("/../..", "/")):
        t, data = raw.request(CMD_EXTENDED, "expand-path@openssh.com", asked)
        assert t == 104  # SSH_FXP_NAME
        count = struct.unpack(">I", data[:4])[0]
        name, _ = _take_string(data[4:])
        assert (count, name.decode()) == (1, expected)


# --- reads ---------------------------------------------------------------------------


def test_read_length_is_capped(raw, d):
    raw.init()
    content = os.urandom(1_000_000)
    (d.home("alice") / "big.bin").write_bytes(content)
    t, data = raw.request(CMD_OPEN, "/big.bin", SFTP_FLAG_READ, 0)
    assert t == CMD_HANDLE
    handle, _ = _take_string(data)
    for offset in (0, 500_000):
        t, data = raw.request(CMD_READ, handle, int64(offset), 0xFFFFFFFF)
        assert t == CMD_DATA
        chunk, _ = _take_string(data)
        assert len(chunk) == DEFAULT_MAX_READ
        assert chunk == content[offset:offset + DEFAULT_MAX_READ]
    t, data = raw.request(CMD_READ, handle, int64(len(content) - 10), 0xFFFFFFFF)
    assert _take_string(data)[0] == content[-10:]
    t, data = raw.request(CMD_READ, handle, int64(len(content) + 5), 100)
    assert _status(t, data)[0] == 1  # SSH_FX_EOF
    assert _status(*raw.request(CMD_CLOSE, handle))[0] == SFTP_OK


def test_oversized_write_packet_closes_the_channel_and_aborts(raw, d):
    raw.init()
    home = d.home("alice")
    (home / "victim.bin").write_bytes(b"old version")
    t, data = raw.request(CMD_OPEN, "/victim.bin", SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC, 0)
    assert t == CMD_HANDLE
    handle, _ = _take_string(data)
    mark = len(d.lines)
    big = b"\0" * (2 * 1024 * 1024)
    payload = struct.pack(">I", 99) + struct.pack(">I", len(handle)) + handle + struct.pack(">Q", 0)
    payload += struct.pack(">I", len(big)) + big
    with pytest.raises((EOFError, OSError)):  # the server may hang up before the send even completes
        raw.send(CMD_WRITE, payload)
        raw.recv()
    d.wait_log(r"message of \d+ bytes refused", start=mark)
    d.wait_log(r"upload /victim\.bin aborted", start=mark)
    assert (home / "victim.bin").read_bytes() == b"old version"
    assert not [n for n in os.listdir(home) if n.startswith(".scriptsftp-part-")]


def test_garbage_handle_and_write_to_read_handle(sftp, raw, d):
    raw.init()
    code, text = _status(*raw.request(CMD_READ, b"nonsense", int64(0), 10))
    assert code == 5 and "invalid handle" in text  # SSH_FX_BAD_MESSAGE
    (d.home("alice") / "ro.txt").write_text("read only")
    t, data = raw.request(CMD_OPEN, "/ro.txt", SFTP_FLAG_READ, 0)
    handle, _ = _take_string(data)
    code, _ = _status(*raw.request(CMD_WRITE, handle, int64(0), b"overwrite"))
    assert code == 3  # SSH_FX_PERMISSION_DENIED
    assert (d.home("alice") / "ro.txt").read_text() == "read only"


def test_each_request_answers_for_the_kind_of_handle_it_names(raw, d):
    """Downloads, uploads and listings are kept apart (a table per kind in sftp.py): a request
    on the wrong kind is refused with its reply, on a name that is no handle BAD_MESSAGE."""
    raw.init()
    home = d.home("alice")
    (home / "kinds").mkdir(exist_ok=True)
    (home / "kinds" / "r.txt").write_text("read me")

    def handle_of(t: int, *fields: object) -> bytes:
        rt, data = raw.request(t, *fields)
        assert rt == CMD_HANDLE
        return _take_string(data)[0]

    download = handle_of(CMD_OPEN, "/kinds/r.txt", SFTP_FLAG_READ, 0)
    upload = handle_of(CMD_OPEN, "/kinds/w.txt", SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC, 0)
    listing = handle_of(CMD_OPENDIR, "/kinds")
    failure, denied, bad = 4, 3, 5
    assert _status(*raw.request(CMD_READ, listing, int64(0), 10)) == (failure, "is a directory")
    code, text = _status(*raw.request(CMD_READ, upload, int64(0), 10))  # not opened readable (w+)
    assert code == denied and "not open for reading" in text
    for h in (download, listing):
        assert _status(*raw.request(CMD_WRITE, h, int64(0), b"x")) == (denied, "handle not open for writing")
        assert _status(*raw.request(CMD_FSETSTAT, h, 0)) == (denied, "handle not open for writing")
    assert _status(*raw.request(CMD_READDIR, download)) == (failure, "not a directory handle")
    assert _status(*raw.request(CMD_FSTAT, listing)) == (failure, "not a file handle")
    assert _status(*raw.request(CMD_EXTENDED, "fsync@openssh.com", download))[0] == SFTP_OK  # nothing to sync
    assert raw.request(CMD_READ, download, int64(0), 10) == (CMD_DATA, struct.pack(">I", 7) + b"read me")
    assert raw.request(CMD_FSTAT, upload)[0] == CMD_ATTRS
    for t, fields in ((CMD_READ, (int64(0), 10)), (CMD_WRITE, (int64(0), b"x")), (CMD_READDIR, ()),
                      (CMD_FSTAT, ()), (CMD_FSETSTAT, (0,)), (CMD_CLOSE, ())):
        assert _status(*raw.request(t, b"h999", *fields)) == (bad, "invalid handle"), t
    for tag in ("fsync@openssh.com", "fstatvfs@openssh.com"):
        assert _status(*raw.request(CMD_EXTENDED, tag, b"h999")) == (bad, "invalid handle"), tag
    for h in (download, upload, listing):
        assert _status(*raw.request(CMD_CLOSE, h))[0] == SFTP_OK
        assert _status(*raw.request(CMD_CLOSE, h)) == (bad, "invalid handle")
    assert (home / "kinds" / "w.txt").read_bytes() == b""


# --- handles ------------------------------------------------------------------------


def test_max_open_handles(sftp, d):
    home = d.home("alice")
    (home / "many").mkdir()
    for i in range(4):
        (home / "many" / f"f{i}").write_bytes(b"%d" % i)
    files = []
    try:
        for i in range(256):
            files.append(sftp.open(f"many/f{i % 4}"))
        with pytest.raises(IOError) as info:
            sftp.open("many/f0")
        assert "too many open" in str(info.value)
        with pytest.raises(IOError):
            sftp.open("many/new", "w")  # a write handle counts the same
        with pytest.raises(IOError):
            sftp.listdir("many")  # and so does a directory handle
        assert not (home / "many" / "new").exists()
        files.pop().close()
        assert sftp.open("many/f1").read() == b"1"  # one freed: opening works again
    finally:
        for f in files:
            f.close()
    assert sorted(sftp.listdir("many")) == ["f0", "f1", "f2", "f3"]


def test_handles_are_per_connection(d, alice_key):
    (d.home("alice") / "h.txt").write_text("h")
    a = paramiko_client(d, "alice", key=alice_key)
    b = paramiko_client(d, "alice", key=alice_key)
    try:
        held = [a.open("h.txt") for _ in range(256)]
        assert b.open("h.txt").read() == b"h"
        for f in held:
            f.close()
    finally:
        close_client(a)
        close_client(b)


# --- namespace ----------------------------------------------------------------------


def test_posix_rename_replaces_plain_rename_refuses(sftp, d):
    home = d.home("alice")
    (home / "pr-src").write_text("new")
    (home / "pr-dst").write_text("old")
    with pytest.raises(IOError):
        sftp.rename("pr-src", "pr-dst")  # SFTPv3 RENAME: never over an existing file
    assert (home / "pr-dst").read_text() == "old" and (home / "pr-src").exists()
    sftp.posix_rename("pr-src", "pr-dst")
    assert (home / "pr-dst").read_text() == "new" and not (home / "pr-src").exists()
    sftp.rename("pr-dst", "pr-fresh")  # plain rename to a free name works
    assert (home / "pr-fresh").read_text() == "new"
    (home / "pr-dir").mkdir()
    (home / "pr-file").write_text("f")
    with pytest.raises(IOError):
        sftp.posix_rename("pr-file", "pr-dir")  # never replaces a directory
    assert (home / "pr-dir").is_dir()
    with pytest.raises(IOError):
        sftp.rename("pr-dir", "pr-dir/inside")


def test_symlink_readlink_round_trip(sftp, d):
    home = d.home("alice")
    (home / "rl" / "deep").mkdir(parents=True)
    (home / "rl" / "deep" / "t.txt").write_text("target")
    sftp.symlink("deep/t.txt", "rl/rel")
    sftp.symlink("/rl/deep/t.txt", "rl/abs")
    sftp.symlink("../rl/deep", "rl/dirlink")
    assert sftp.readlink("rl/rel") == "/rl/deep/t.txt"
    assert sftp.readlink("rl/abs") == "/rl/deep/t.txt"
    assert sftp.readlink("rl/dirlink") == "/rl/deep"
    assert sftp.open("rl/abs").read() == b"target"
    assert sftp.listdir("rl/dirlink") == ["t.txt"]
    assert stat.S_ISLNK(sftp.lstat("rl/rel").st_mode)
    assert stat.S_ISREG(sftp.stat("rl/rel").st_mode)
    # stored as the place in the home (absolute host path), so moving a link never
    # changes where it points: not in the server, not for programs outside it
    real_home = os.path.realpath(home)
    assert os.readlink(home / "rl" / "abs") == f"{real_home}/rl/deep/t.txt"
    assert os.readlink(home / "rl" / "dirlink") == f"{real_home}/rl/deep"
    sftp.rename("rl/rel", "moved")  # a relative "../.." link moved up would now point above the home
    assert sftp.readlink("moved") == "/rl/deep/t.txt"
    assert os.path.realpath(home / "moved") == f"{real_home}/rl/deep/t.txt"
    with pytest.raises(IOError):
        sftp.symlink("deep/t.txt", "rl/abs")  # the link name exists
    with pytest.raises(IOError):
        sftp.readlink("rl/deep/t.txt")  # not a link


def test_readdir_in_batches(sftp, d):
    home = d.home("alice")
    (home / "lots").mkdir()
    names = {f"n{i:04d}" for i in range(350)}
    for n in names:
        (home / "lots" / n).write_bytes(b"")
    assert set(sftp.listdir("lots")) == names


def test_setstat_rules(sftp, d):
    home = d.home("alice")
    (home / "ss.txt").write_text("0123456789")
    sftp.utime("ss.txt", (1_000_000_000, 1_200_000_000))
    assert int((home / "ss.txt").stat().st_mtime) == 1_200_000_000
    with pytest.raises(IOError) as info:
        sftp.truncate("ss.txt", 3)  # would make a half file visible
    assert info.value.errno == errno.EACCES
    with pytest.raises(IOError):
        sftp.chown("ss.txt", 1234, 1234)
    assert (home / "ss.txt").read_text() == "0123456789"
    assert (home / "ss.txt").stat().st_uid == os.getuid()


def test_open_modes(sftp, d):
    home = d.home("alice")
    with sftp.open("modes.txt", "wx") as f:
        f.write(b"first")
    with pytest.raises(IOError):
        sftp.open("modes.txt", "wx")
    with sftp.open("modes.txt", "a") as f:
        f.write(b"+more")
    assert (home / "modes.txt").read_bytes() == b"first+more"
    with sftp.open("modes.txt", "r+") as f:  # no truncate: random write into a copy of the file
        f.seek(1)
        f.write(b"I")
        assert (home / "modes.txt").read_bytes() == b"first+more"  # not yet published
    assert (home / "modes.txt").read_bytes() == b"fIrst+more"
    with sftp.open("modes.txt", "w") as f:
        f.write(b"w")
        f.flush()
        f.truncate(0)  # through the handle: fine, the upload is not visible yet
        f.seek(0)
        f.write(b"replaced")
    assert (home / "modes.txt").read_bytes() == b"replaced"


def test_fsync_and_fstat_on_upload(sftp, d):
    with sftp.open("sync.bin", "w") as f:
        f.write(b"x" * 1000)
        f.flush()
        t, _ = sftp._request(CMD_EXTENDED, "fsync@openssh.com", f.handle)
        assert t == CMD_STATUS  # OK, else _request raised
        assert f.stat().st_size == 1000
    assert (d.home("alice") / "sync.bin").stat().st_size == 1000


def test_password_session_works_like_key_session(d):
    c = paramiko_client(d, "alice", password=ALICE_PASSWORD)
    try:
        with c.open("pw.txt", "w") as f:
            f.write(b"via password")
        assert c.open("pw.txt").read() == b"via password"
    finally:
        close_client(c)


def test_large_transfer_round_trip(sftp, d, tmp_path):
    content = os.urandom(8 * 1024 * 1024 + 17)
    src = tmp_path / "big"
    src.write_bytes(content)
    sftp.put(str(src), "round.bin")
    assert (d.home("alice") / "round.bin").read_bytes() == content
    sftp.get("round.bin", str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == content


# --- hostile lengths and counts ---------------------------------------------------------------


EXTENDED = 0x80000000


@pytest.mark.parametrize("op", ["open", "setstat", "mkdir", "fsetstat"])
def test_a_huge_extended_attribute_count_is_a_bad_message_not_a_pinned_cpu(raw, d, op):
    """paramiko's own parser looped count = 0xFFFFFFFF times past the end of the packet
    (~40 minutes of CPU per request, before any permission check)."""
    raw.init()
    (d.home("alice") / "attr.txt").write_bytes(b"x")
    hostile = (EXTENDED, 0xFFFFFFFF)
    started = time.monotonic()
    if op == "open":
        t, data = raw.request(CMD_OPEN, "/attr-new.txt", SFTP_FLAG_WRITE | SFTP_FLAG_CREATE, *hostile)
    elif op == "setstat":
        t, data = raw.request(CMD_SETSTAT, "/attr.txt", *hostile)
    elif op == "mkdir":
        t, data = raw.request(CMD_MKDIR, "/attr-dir", *hostile)
    else:
        t, data = raw.request(CMD_OPEN, "/attr.txt", SFTP_FLAG_READ, 0)
        assert t == CMD_HANDLE
        handle, _ = _take_string(data)
        t, data = raw.request(CMD_FSETSTAT, handle, *hostile)
    assert _status(t, data) == (SFTP_BAD_MESSAGE, "malformed attributes")
    assert time.monotonic() - started < 5
    assert not (d.home("alice") / "attr-new.txt").exists() and not (d.home("alice") / "attr-dir").exists()
    # the connection still serves, and a well-formed extended attribute is read and ignored
    t, data = raw.request(CMD_MKDIR, f"/attr-ok-{op}", EXTENDED, 1, "name@example.com", "value")
    assert _status(t, data)[0] == SFTP_OK
    assert (d.home("alice") / f"attr-ok-{op}").is_dir()


@pytest.mark.parametrize("fields", [
    (0x00000001,),                 # SIZE announced, no bytes for it
    (0x00000008, 0),               # AMTIME with four of its eight bytes
    (EXTENDED, 1, "n"),            # one pair announced, the value missing
    (EXTENDED, 2, "n", "v"),       # two pairs announced, one sent
])
def test_truncated_attributes_are_a_bad_message(raw, d, fields):
    raw.init()
    t, data = raw.request(CMD_MKDIR, "/trunc-dir", *fields)
    assert _status(t, data) == (SFTP_BAD_MESSAGE, "malformed attributes")
    assert not (d.home("alice") / "trunc-dir").exists()


def test_chmod_never_follows_a_symlink_swapped_in_while_it_runs(sftp, d, tmp_path):
    """The attack: chmod /f in a loop while /f is replaced, again and again, by a symlink
    out of the home (a link planted on the host, or a relative one a client moved up).
    A check-then-chmod by name followed the link: a root-owned file outside every home
    became 0666 within seconds. Now the entry is pinned before it is checked."""
    import threading
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    outside.chmod(0o600)
    home = d.home("alice")
    f, link = home / "race-f", home / "race-link"
    f.write_text("mine\n")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.symlink(outside, link)
            os.replace(link, f)  # the link takes the name atomically
            tmp = home / "race-tmp"
            tmp.write_text("mine\n")
            os.replace(tmp, f)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    refused = changed = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                sftp.chmod("race-f", 0o666)
                changed += 1
            except IOError:
                refused += 1
    finally:
        stop.set()
        swapper.join()
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600
    assert changed and refused  # both sides of the race were hit


def test_chmod_on_a_pinned_entry_refuses_a_link_even_if_a_check_saw_a_file(tmp_path, monkeypatch):
    """Storage level: whatever an earlier stat said, the mode change acts on what is there."""
    from scriptsftp.server.contract.errors import InvalidPath
    from scriptsftp.server.core.storage import LocalStorage as Storage
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    outside.chmod(0o600)
    home = tmp_path / "home"
    home.mkdir()
    (home / "f").write_text("mine")
    regular = os.stat(home / "f")
    os.remove(home / "f")
    os.symlink(outside, home / "f")
    storage = Storage(home)
    monkeypatch.setattr(Storage, "stat", lambda self, r: regular)  # a stale check: "a regular file"
    with storage.resolve(("f",), follow=False) as r:
        with pytest.raises(InvalidPath):
            storage.chmod(r, 0o666)
    storage.close()
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600


def test_an_upload_opened_for_reading_too_reads_back_what_was_written(sftp, d):
    """``w+``/``r+``: clients verify what they wrote. Every READ used to answer "internal
    error" with a traceback in the log (54 KB of requests made 938 KB of log)."""
    (d.home("alice") / "rb.txt").write_bytes(b"old content")
    with sftp.open("rb.txt", "r+") as f:  # a copy of the file, then changed
        assert f.read(3) == b"old"
        f.seek(0)
        f.write(b"new")
        f.seek(0)
        assert f.read() == b"new content"
    with sftp.open("rb2.txt", "w+") as f:
        f.write(b"written here")
        f.seek(8)
        assert f.read() == b"here"
    assert (d.home("alice") / "rb2.txt").read_bytes() == b"written here"
    assert "Traceback" not in d.log_text()


def test_read_on_a_write_only_upload_is_refused_without_a_traceback(raw, d):
    raw.init()
    t, data = raw.request(CMD_OPEN, "/wo.bin", SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC, 0)
    assert t == CMD_HANDLE
    handle, _ = _take_string(data)
    for _ in range(20):
        t, data = raw.request(CMD_READ, handle, int64(0), 1024)
        assert _status(t, data) == (3, "/wo.bin: not open for reading")  # SSH_FX_PERMISSION_DENIED
    assert "Traceback" not in d.log_text()
