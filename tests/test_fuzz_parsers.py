"""Hostile clients: hypothesis feeds malformed input to every parser of a live daemon.

One daemon (SFTP/SCP, FTP, HTTP/WebDAV) serves the whole module. For each protocol a
hypothesis test sends malformed SFTP packets, SCP records, FTP command lines or HTTP and
WebDAV requests, and checks after every example that the daemon answered or closed the
connection within a few seconds; every few examples that an honest second client still
logs in and lists/downloads within ``HONEST_LIMIT``; and that nothing appeared outside
the home (a sentinel directory beside it stays empty). After each protocol's run the
daemon must be quiet again: its process tree's CPU time stops growing, its open fds and
RSS return near their baseline, and its log holds no traceback (docs/architecture.md rules 9, 11, 12).

Examples are derandomized (the same inputs on every run) and bounded so the module runs
in well under two minutes on two cores.
"""

from __future__ import annotations

import ftplib
import os
import socket
import struct
import time
from pathlib import Path

import paramiko
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import ALICE_PASSWORD, BOB_PASSWORD, Daemon, close_client, paramiko_client
from httpkit import basic

HONEST_LIMIT = 2.0     # seconds an honest login + list + download may take while fuzzing
ANSWER_LIMIT = 5.0     # seconds the daemon has to answer or close after a hostile input
HONEST_EVERY = 25      # examples between two honest-client checks
HONEST_DATA = b"honest bytes\n" * 100
CLK_TCK = os.sysconf("SC_CLK_TCK")

FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

U32_EDGES = [0, 1, 2, 3, 255, 256, 4096, 65535, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
U64_EDGES = [0, 1, 2**31 - 1, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
u32 = st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1))
u64 = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))
HOSTILE_NAMES = [
    "", ".", "..", "/", "//", "../..", "../../outside", "/../../..", "a/../../..", "..\\..\\x", "\x00",
    "a\x00b", "x" * 300, "y" * 5000, "/etc/passwd", "~root", "%2e%2e", "\xff\xfe", "a\nb", "a\r\nb",
    "*", "?", ".scriptsftp-part-x", "sentinel", "../sentinel/evil", "/fuzz/../../sentinel/x",
]
names = st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(max_size=40),
                  st.builds(lambda s: "/fuzz/" + s, st.text(max_size=20)))


# --- the daemon and the checks ---------------------------------------------------------


@pytest.fixture(scope="module")
def srv(module_daemons) -> Daemon:
    root = module_daemons.root
    d = module_daemons.start(
        '[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = ""\n'
        '[http]\nenabled = true\nlisten = "127.0.0.1:0"\n'
    )
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "fuzz").mkdir(exist_ok=True)
    (home / "honest.txt").write_bytes(HONEST_DATA)
    # the honest client is bob, whose home the fuzzing (as alice) cannot reach
    d.home("bob").mkdir(parents=True, exist_ok=True)
    (d.home("bob") / "honest.txt").write_bytes(HONEST_DATA)
    (root / "homes" / "sentinel").mkdir(parents=True, exist_ok=True)
    return d


def tree_pids(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu(pid: int) -> float:
    total = 0
    for p in tree_pids(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Watch:
    """Baseline of the daemon's resources, and the checks after a fuzzing run."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.pid = d.proc.pid
        self.fds = fd_count(self.pid)
        self.rss = rss_mb(self.pid)
        self.examples = 0
        self.marks = 0
        self.outcomes: dict[str, int] = {}  # how examples ended: the fuzzing must reach the parsers
        self.outside = self._outside()

    def outcome(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    def _outside(self) -> set[str]:
        homes = self.d.root / "homes"
        return {str(p.relative_to(self.d.root)) for p in self.d.root.iterdir()} | \
               {str(p.relative_to(self.d.root)) for p in homes.iterdir()}

    def after_example(self, honest) -> None:
        assert self.d.proc.poll() is None, "daemon died:\n" + self.d.log_text()[-4000:]
        assert not any((self.d.root / "homes" / "sentinel").iterdir()), "something was created beside the home"
        self.examples += 1
        if self.examples % HONEST_EVERY == 0:
            honest(self.d)

    def settle(self, honest) -> None:
        honest(self.d)
        assert self._outside() == self.outside, "entries appeared outside the homes"
        assert not any((self.d.root / "homes" / "sentinel").iterdir())
        # connections the fuzzer closed are torn down by the daemon asynchronously: give it
        # a bounded moment, then the resources must be back near the baseline and stay quiet
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if fd_count(self.pid) <= self.fds + 20:
                break
            time.sleep(0.25)
        cpu0 = tree_cpu(self.pid)
        time.sleep(1.0)
        burnt = tree_cpu(self.pid) - cpu0
        assert burnt < 0.3, f"daemon still burning CPU after the fuzzing: {burnt:.2f} s in 1 s"
        fds = fd_count(self.pid)
        assert fds <= self.fds + 20, f"fd leak: {self.fds} at baseline, {fds} after"
        rss = rss_mb(self.pid)
        assert rss <= self.rss + 50, f"RSS grew from {self.rss:.0f} MB to {rss:.0f} MB"
        log = self.d.log_text()
        at = log.find("Traceback")
        assert at < 0, "traceback in the daemon's log:\n" + log[max(at - 600, 0):at + 3000]


def timed(label: str, fn) -> None:
    t0 = time.monotonic()
    fn()
    took = time.monotonic() - t0
    assert took < HONEST_LIMIT, f"honest {label} client took {took:.2f} s"


# --- SFTP --------------------------------------------------------------------------------

CMD_INIT, CMD_VERSION, CMD_OPEN, CMD_CLOSE, CMD_READ, CMD_WRITE = 1, 2, 3, 4, 5, 6
CMD_LSTAT, CMD_FSTAT, CMD_SETSTAT, CMD_FSETSTAT, CMD_OPENDIR, CMD_READDIR = 7, 8, 9, 10, 11, 12
CMD_REMOVE, CMD_MKDIR, CMD_RMDIR, CMD_REALPATH, CMD_STAT, CMD_RENAME = 13, 14, 15, 16, 17, 18
CMD_READLINK, CMD_SYMLINK, CMD_EXTENDED = 19, 20, 200
PROBE_ID = 0x7EADBEEF


def honest_sftp(d: Daemon, bob_key) -> None:
    def go():
        c = paramiko_client(d, "bob", key=bob_key)
        try:
            assert "honest.txt" in c.listdir("/")
            with c.open("/honest.txt") as f:
                assert f.read() == HONEST_DATA
        finally:
            close_client(c)
    timed("sftp", go)


class RawConn:
    """A logged-in SSH connection with one raw SFTP channel, a file and a listing open."""

    def __init__(self, d: Daemon, key) -> None:
        self.t = paramiko.Transport(("127.0.0.1", d.port))
        self.t.start_client(timeout=10)
        self.t.auth_publickey("alice", paramiko.PKey.from_path(str(key.private)))
        self.chan = self.t.open_session(timeout=10)
        self.chan.settimeout(ANSWER_LIMIT)
        self.chan.invoke_subsystem("sftp")
        self.send_frame(bytes([CMD_INIT]) + struct.pack(">I", 3))
        assert self.recv()[0] == CMD_VERSION
        self.file = self.handle(CMD_OPEN, s(b"/fuzz/f.bin") + struct.pack(">II", 0x1A, 0))  # rw|creat|trunc
        self.dir = self.handle(CMD_OPENDIR, s(b"/fuzz"))

    def handle(self, t: int, body: bytes) -> bytes:
        self.send_frame(bytes([t]) + struct.pack(">I", 1) + body)
        rt, data = self.recv()
        assert rt == 102, (rt, data)  # HANDLE
        return data[8:8 + struct.unpack(">I", data[4:8])[0]]

    def send_frame(self, body: bytes) -> None:
        self.chan.sendall(struct.pack(">I", len(body)) + body)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.chan.recv(min(n - len(buf), 1 << 16))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def recv(self) -> tuple[int, bytes]:
        (size,) = struct.unpack(">I", self._exact(4))
        data = self._exact(size)
        return data[0], data[1:]

    def probe(self) -> bool:
        """Send REALPATH "." and read replies until its answer: True, or False if the
        channel was closed. A timeout (no answer, no close) raises."""
        self.send_frame(bytes([CMD_REALPATH]) + struct.pack(">I", PROBE_ID) + s(b"."))
        deadline = time.monotonic() + ANSWER_LIMIT
        while time.monotonic() < deadline:
            try:
                t, data = self.recv()
            except (EOFError, OSError):
                return False
            if t in (101, 104) and data[:4] == struct.pack(">I", PROBE_ID):
                return True
        raise AssertionError("no answer to the probe: the channel hangs")

    def close(self) -> None:
        self.t.close()


def s(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def enc(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


@st.composite
def sftp_string(draw, content=None) -> bytes:
    """A string field: honest, or with a length that lies (0, short, huge, past the end)."""
    data = draw(content if content is not None else st.one_of(names.map(enc), st.binary(max_size=64)))
    if draw(st.integers(0, 4)) == 0:
        return struct.pack(">I", draw(u32)) + data
    return s(data)


@st.composite
def sftp_attrs(draw) -> bytes:
    flags = draw(st.one_of(st.sampled_from([0, 1, 2, 4, 8, 0x0F, 0x80000000, 0x8000000F, 2**32 - 1]), u32))
    out = struct.pack(">I", flags)
    if flags & 1:
        out += struct.pack(">Q", draw(u64))
    if flags & 2:
        out += struct.pack(">II", draw(u32), draw(u32))
    if flags & 4:
        out += struct.pack(">I", draw(u32))
    if flags & 8:
        out += struct.pack(">II", draw(u32), draw(u32))
    if flags & 0x80000000:
        count = draw(u32)
        out += struct.pack(">I", count)
        for _ in range(min(count, draw(st.integers(0, 3)))):
            out += draw(sftp_string()) + draw(sftp_string())
    if draw(st.booleans()):
        out = out[:draw(st.integers(0, len(out)))]  # cut anywhere
    return out


@st.composite
def sftp_request(draw, conn_handles: bool = True) -> tuple[str, bytes]:
    """("frame", body) or ("lie", raw bytes whose frame length lies)."""
    kind = draw(st.sampled_from(["random", "structured", "structured", "structured", "lie"]))
    rid = struct.pack(">I", draw(st.one_of(st.sampled_from([0, 1, 2**32 - 1]), u32)))
    if kind == "random":
        return "frame", bytes([draw(st.integers(0, 255))]) + draw(st.binary(max_size=300))
    if kind == "lie":
        claimed = draw(st.sampled_from([0, 1, 5, 2**18, 2**31 - 1, 2**32 - 1]))
        return "lie", struct.pack(">I", claimed) + draw(st.binary(max_size=64))
    handle = st.one_of(st.sampled_from([b"FILE", b"DIR"]), st.binary(max_size=300))
    path = sftp_string()
    t = draw(st.sampled_from([CMD_OPEN, CMD_CLOSE, CMD_READ, CMD_WRITE, CMD_LSTAT, CMD_FSTAT, CMD_SETSTAT,
                              CMD_FSETSTAT, CMD_OPENDIR, CMD_READDIR, CMD_REMOVE, CMD_MKDIR, CMD_RMDIR,
                              CMD_REALPATH, CMD_STAT, CMD_RENAME, CMD_READLINK, CMD_SYMLINK, CMD_EXTENDED,
                              CMD_INIT]))
    h = draw(sftp_string(handle))
    body = {
        CMD_OPEN: lambda: draw(path) + struct.pack(">I", draw(u32)) + draw(sftp_attrs()),
        CMD_CLOSE: lambda: h,
        CMD_READ: lambda: h + struct.pack(">QI", draw(u64), draw(u32)),
        CMD_WRITE: lambda: h + struct.pack(">Q", draw(u64)) + draw(sftp_string(st.binary(max_size=2048))),
        CMD_LSTAT: lambda: draw(path),
        CMD_FSTAT: lambda: h,
        CMD_SETSTAT: lambda: draw(path) + draw(sftp_attrs()),
        CMD_FSETSTAT: lambda: h + draw(sftp_attrs()),
        CMD_OPENDIR: lambda: draw(path),
        CMD_READDIR: lambda: h,
        CMD_REMOVE: lambda: draw(path),
        CMD_MKDIR: lambda: draw(path) + draw(sftp_attrs()),
        CMD_RMDIR: lambda: draw(path),
        CMD_REALPATH: lambda: draw(path),
        CMD_STAT: lambda: draw(path),
        CMD_RENAME: lambda: draw(path) + draw(path),
        CMD_READLINK: lambda: draw(path),
        CMD_SYMLINK: lambda: draw(path) + draw(path),
        CMD_EXTENDED: lambda: draw(sftp_string(st.sampled_from(
            [b"posix-rename@openssh.com", b"statvfs@openssh.com", b"fstatvfs@openssh.com", b"hardlink@openssh.com",
             b"fsync@openssh.com", b"limits@openssh.com", b"check-file", b"copy-data", b"lsetstat@openssh.com",
             b"expand-path@openssh.com", b"home-directory", b"users-groups-by-id@openssh.com", b"nope"])))
        + draw(st.binary(max_size=200)),
        CMD_INIT: lambda: b"",
    }[t]()
    if t == CMD_INIT:
        return "frame", bytes([t]) + struct.pack(">I", draw(u32))
    if draw(st.integers(0, 5)) == 0:
        body = body[:draw(st.integers(0, len(body)))]
    return "frame", bytes([t]) + rid + body


@pytest.fixture(scope="module")
def sftp_state(srv, alice_key):
    state = {"conn": None}
    yield state
    if state["conn"] is not None:
        state["conn"].close()


def test_fuzz_sftp(srv, alice_key, bob_key, sftp_state):
    watch = Watch(srv)

    @FUZZ
    @given(st.lists(sftp_request(), min_size=1, max_size=4))
    # the huge extended-count ATTRS (count 2^32-1, no pairs) on SETSTAT and on OPEN
    @example([("frame", bytes([CMD_SETSTAT]) + struct.pack(">I", 7) + s(b"/fuzz") + struct.pack(">II", 0x80000000, 2**32 - 1))])
    @example([("frame", bytes([CMD_OPEN]) + struct.pack(">I", 8) + s(b"/fuzz/x") + struct.pack(">III", 0x1A, 0x80000000, 2**31 - 1))])
    # a WRITE far past any sane file size, a READ of 4 GiB
    @example([("frame", bytes([CMD_WRITE]) + struct.pack(">I", 9) + s(b"FILE") + struct.pack(">Q", 2**64 - 1) + s(b"x"))])
    @example([("frame", bytes([CMD_READ]) + struct.pack(">I", 10) + s(b"FILE") + struct.pack(">QI", 0, 2**32 - 1))])
    @example([("frame", bytes([CMD_READ]) + struct.pack(">I", 11) + s(b"FILE") + struct.pack(">QI", 2**64 - 1, 4096))])
    @example([("lie", struct.pack(">I", 2**32 - 1) + b"\x03")])
    def run(reqs):
        conn = sftp_state["conn"]
        if conn is None:
            conn = sftp_state["conn"] = RawConn(srv, alice_key)
        alive = True
        for kind, raw in reqs:
            raw = raw.replace(s(b"FILE"), s(conn.file)).replace(s(b"DIR"), s(conn.dir))
            if kind == "lie":
                conn.chan.sendall(raw)
                alive = False  # the frame may swallow anything after it: drop this connection
                break
            conn.send_frame(raw)
        if alive:
            alive = conn.probe()
        else:
            # the daemon either closes at once (a length past max) or waits for the rest:
            # leaving must free everything (checked by settle)
            conn.chan.settimeout(0.2)
            try:
                conn.chan.recv(1 << 16)
            except (OSError, EOFError):
                pass
        if not alive:
            conn.close()
            sftp_state["conn"] = None
        watch.after_example(lambda d: honest_sftp(d, bob_key))

    run()
    if sftp_state["conn"] is not None:
        sftp_state["conn"].close()
        sftp_state["conn"] = None
    watch.settle(lambda d: honest_sftp(d, bob_key))


# --- SCP ---------------------------------------------------------------------------------


@st.composite
def scp_record(draw) -> bytes:
    kind = draw(st.sampled_from("CCDTEX?"))
    mode = draw(st.sampled_from(["0644", "0755", "7777", "0", "99999", "-1", "abcd", ""]))
    size = draw(st.one_of(st.sampled_from(["0", "1", "10", "-1", "4294967295", "18446744073709551616",
                                           "9" * 40, "0x10", "", "1e9", " 5"]), st.integers(0, 2**70).map(str)))
    name = draw(names)
    end = draw(st.sampled_from(["\n", "\n", "\n", "", "\r\n", "\x00\n"]))
    if kind == "C":
        rec = f"C{mode} {size} {name}{end}".encode("utf-8", "surrogateescape")
        n = int(size) if size.isdigit() and int(size) <= 512 else draw(st.integers(0, 64))
        rec += draw(st.binary(min_size=n, max_size=n))
        if draw(st.booleans()):
            rec += b"\0"
        return rec
    if kind == "D":
        return f"D{mode} 0 {name}{end}".encode("utf-8", "surrogateescape")
    if kind == "T":
        nums = [draw(st.one_of(st.sampled_from(["0", "-1", "9" * 30, "x"]), st.integers(0, 2**40).map(str)))
                for _ in range(4)]
        return f"T{' '.join(nums)}{end}".encode()
    if kind == "E":
        return b"E" + end.encode()
    return draw(st.binary(max_size=200))


def honest_scp(d: Daemon, bob_key) -> None:
    # an honest SCP client (`scp -f`) and the honest SFTP one
    def go():
        t = paramiko.Transport(("127.0.0.1", d.port))
        try:
            t.start_client(timeout=10)
            t.auth_publickey("bob", paramiko.PKey.from_path(str(bob_key.private)))
            ch = t.open_session(timeout=10)
            ch.settimeout(ANSWER_LIMIT)
            ch.exec_command("scp -f /honest.txt")
            ch.sendall(b"\0")
            header = b""
            while not header.endswith(b"\n"):
                header += ch.recv(1)
            assert header == f"C0644 {len(HONEST_DATA)} honest.txt\n".encode(), header
            ch.sendall(b"\0")
            body = b""
            while len(body) < len(HONEST_DATA) + 1:
                chunk = ch.recv(65536)
                assert chunk
                body += chunk
            assert body == HONEST_DATA + b"\0"
            ch.sendall(b"\0")
        finally:
            t.close()
    timed("scp", go)


def test_fuzz_scp(srv, alice_key, bob_key):
    watch = Watch(srv)
    holder: dict[str, paramiko.Transport | None] = {"t": None}

    def transport() -> paramiko.Transport:
        t = holder["t"]
        if t is None or not t.is_active():
            t = paramiko.Transport(("127.0.0.1", srv.port))
            t.start_client(timeout=10)
            t.auth_publickey("alice", paramiko.PKey.from_path(str(alice_key.private)))
            holder["t"] = t
        return t

    @FUZZ
    @given(st.sampled_from(["scp -t /fuzz", "scp -r -t /fuzz", "scp -d -t /fuzz", "scp -t /fuzz/new.bin",
                            "scp -r -t /", "scp -t ../..", "scp -t", "scp -p -t /fuzz"]),
           st.lists(scp_record(), min_size=1, max_size=5))
    @example("scp -t /fuzz", [b"C0644 18446744073709551616 big\n"])
    @example("scp -r -t /fuzz", [b"D0755 0 ..\n", b"C0644 1 x\nx\0"])
    @example("scp -t /fuzz", [b"C0644 5 ../../sentinel/evil\nabcde\0"])
    @example("scp -r -t /fuzz", [b"D0755 0 a\n" * 100])
    def run(command, records):
        try:
            ch = transport().open_session(timeout=10)
        except paramiko.ChannelException:
            holder["t"].close()
            ch = transport().open_session(timeout=10)
        try:
            ch.settimeout(ANSWER_LIMIT)
            ch.exec_command(command)
            for rec in records:
                try:
                    ch.sendall(rec)
                except OSError:
                    break
            ch.shutdown_write()
            # after the client's EOF the daemon must finish the channel: answers, then closes
            deadline = time.monotonic() + ANSWER_LIMIT
            while True:
                assert time.monotonic() < deadline, "scp channel still open after the client's EOF"
                try:
                    if not ch.recv(65536):
                        break
                except socket.timeout:
                    raise AssertionError("scp channel hangs after the client's EOF") from None
                except OSError:
                    break
            # the exit status (or the channel's end) follows the EOF
            assert ch.status_event.wait(ANSWER_LIMIT) or ch.closed
        finally:
            ch.close()
        watch.after_example(lambda d: honest_scp(d, bob_key))

    run()
    if holder["t"] is not None:
        holder["t"].close()
    watch.settle(lambda d: honest_scp(d, bob_key))


# --- FTP ---------------------------------------------------------------------------------


def honest_ftp(d: Daemon) -> None:
    def go():
        c = ftplib.FTP()
        c.connect("127.0.0.1", d.ports["ftp"], timeout=ANSWER_LIMIT)
        try:
            c.login("bob", BOB_PASSWORD)
            assert "honest.txt" in c.nlst()
            chunks: list[bytes] = []
            c.retrbinary("RETR honest.txt", chunks.append)
            assert b"".join(chunks) == HONEST_DATA
        finally:
            c.close()
    timed("ftp", go)


FTP_VERBS = ["USER", "PASS", "ACCT", "CWD", "CDUP", "SMNT", "REIN", "PORT", "PASV", "EPRT", "EPSV", "TYPE",
             "STRU", "MODE", "RETR", "STOR", "STOU", "APPE", "ALLO", "REST", "RNFR", "RNTO", "ABOR", "DELE",
             "RMD", "MKD", "PWD", "LIST", "NLST", "MLSD", "MLST", "SITE", "SYST", "STAT", "HELP", "NOOP",
             "FEAT", "OPTS", "AUTH", "PBSZ", "PROT", "CCC", "SIZE", "MDTM", "MFMT", "HASH", "XMKD", "XRMD",
             "XPWD", "XCUP", "XCWD", "LANG", "CLNT", "BOGUS", "", "\x00", "ÿÿ"]
HUGE = ["-1", "0", "99999999999999999999999999", "18446744073709551616", "4294967296", "1e309", "nan"]


@st.composite
def ftp_line(draw) -> bytes:
    verb = draw(st.one_of(st.sampled_from(FTP_VERBS), st.text(max_size=8)))
    if verb in ("REST", "ALLO", "SIZE", "MDTM"):
        arg = draw(st.one_of(st.sampled_from(HUGE), names))
    elif verb in ("PORT",):
        arg = ",".join(draw(st.lists(st.sampled_from(["127", "0", "1", "256", "-1", "65536", "99999999999", "x"]),
                                     min_size=0, max_size=8)))
    elif verb == "EPRT":
        arg = draw(st.sampled_from(["|1|127.0.0.1|99999999|", "|2|::1|1|", "||||", "|3|x|1|", "|1|10.0.0.1|21|"]))
    elif verb == "OPTS":
        arg = draw(st.sampled_from(["MLST " + ";" * 5000, "UTF8 ON", "MLST type;size;", "x"]))
    else:
        arg = draw(names)
    line = (verb + (" " + arg if arg or draw(st.booleans()) else "")).encode("utf-8", "surrogateescape")
    shape = draw(st.integers(0, 9))
    if shape == 0:
        line = line + b"A" * draw(st.sampled_from([3000, 70000]))       # long lines
    elif shape == 1:
        line = draw(st.binary(max_size=300))                            # binary garbage
    elif shape == 2:
        line = line + b"\r\nDELE ../../sentinel\r\nMKD /../sentinel/x"  # CR/LF injection
    elif shape == 3:
        line = line.replace(b" ", b"\r", 1)
    ending = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""]))
    return line + ending


class FtpConn:
    def __init__(self, d: Daemon, login: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", d.ports["ftp"]), timeout=ANSWER_LIMIT)
        self.d = d
        self.sent: list[bytes] = []  # what this connection was sent (the last lines), for a failure message
        self.buf = b""
        self.expect(b"220 ")
        if login:
            self.sock.sendall(b"USER alice\r\n")
            self.expect(b"331 ")
            self.sock.sendall(b"PASS " + ALICE_PASSWORD.encode() + b"\r\n")
            self.expect(b"230 ")

    def expect(self, marker: bytes) -> bool:
        """Read until a reply line containing ``marker``: True; or False on close."""
        deadline = time.monotonic() + ANSWER_LIMIT
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if marker in line:
                    self.buf = b"\r\n".join(lines[i + 1:])
                    return True
            self.buf = lines[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} reply within {ANSWER_LIMIT} s: the control connection hangs; "
                                     f"sent {[x[:100] for x in self.sent[-8:]]}, got {self.buf[-300:]!r}\n"
                                     + self.d.log_text()[-3000:])
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return False
            if not chunk:
                return False
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def test_fuzz_ftp(srv):
    watch = Watch(srv)
    conns: dict[bool, FtpConn | None] = {True: None, False: None}

    @FUZZ
    @given(st.booleans(), st.lists(ftp_line(), min_size=1, max_size=4))
    # an undecodable line once left its bytes in pyftpdlib's buffer: every later command got 501
    @example(True, [b"\x1d\xb9\n"])
    @example(False, [b"USER \xff\xfe\r\n"])
    @example(True, [b"REST 99999999999999999999999999\r\n", b"RETR honest.txt\r\n"])
    @example(True, [b"ALLO 18446744073709551616\r\n"])
    @example(True, [b"PORT 127,0,0,1,99999999999,1\r\n"])
    @example(False, [b"USER " + b"A" * 70000 + b"\r\n"])
    @example(True, [b"MKD ../../sentinel/x\r\n", b"RNFR honest.txt\r\n", b"RNTO /../../sentinel/y\r\n"])
    def run(login, lines):
        conn = conns[login]
        if conn is None:
            conn = conns[login] = FtpConn(srv, login)
        for line in lines:
            conn.sent.append(line)
            try:
                conn.sock.sendall(line)
            except OSError:
                break
        # whatever was half sent, end it, then send a verb no server knows, unique to this
        # example: its 500 (which quotes it) proves the connection still answers in order;
        # a close is the other acceptable end
        watch.marks += 1
        mark = b"ZQ%d" % watch.marks
        try:
            conn.sock.sendall(b"\r\n" + mark + b"\r\n")
            alive = conn.expect(b'"' + mark + b'"')
        except OSError:
            alive = False
        if not alive:
            conn.close()
            conns[login] = None
        watch.after_example(honest_ftp)

    run()
    for c in conns.values():
        if c is not None:
            c.close()
    watch.settle(honest_ftp)


# --- HTTP / WebDAV -----------------------------------------------------------------------


def honest_http(d: Daemon) -> None:
    import http.client

    def go():
        conn = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=ANSWER_LIMIT)
        try:
            conn.request("PROPFIND", "/", headers={"Authorization": basic("bob", BOB_PASSWORD), "Depth": "1"})
            r = conn.getresponse()
            assert r.status == 207 and b"honest.txt" in r.read()
            conn.request("GET", "/honest.txt", headers={"Authorization": basic("bob", BOB_PASSWORD)})
            r = conn.getresponse()
            assert r.status == 200 and r.read() == HONEST_DATA
        finally:
            conn.close()
    timed("http", go)


METHODS = ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "POST", "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE",
           "LOCK", "UNLOCK", "TRACE", "CONNECT", "PATCH", "SEARCH", "get", "G ET", "", "\x00", "X" * 300]
PATHS = ["/", "/honest.txt", "/fuzz/", "/fuzz/x", "/..", "/../..", "/%2e%2e/%2e%2e/sentinel", "/fuzz/%00",
         "/%2fetc%2fpasswd", "/fuzz/%", "/fuzz/%zz", "/%c0%ae%c0%ae/", "*", "http://127.0.0.1/x", "//x//y",
         "/fuzz/" + "a" * 5000, "/fuzz/%ff%fe", "/./././honest.txt", "/fuzz/..%2f..%2fsentinel%2fz", ""]
RANGES = ["bytes=0-0", "bytes=-1", "bytes=5-1", "bytes=0-18446744073709551616", "bytes=-99999999999999999999",
          "bytes=" + ",".join(["0-1"] * 500), "bytes=a-b", "items=0-1", "bytes=1-", "bytes=--1", "bytes=0-0,-0"]
DEPTHS = ["0", "1", "infinity", "-1", "99999999999999999999", "", "x"]
DESTS = ["http://127.0.0.1/fuzz/d", "/fuzz/d", "/../../sentinel/z", "http://evil.example/x", "",
         "http://127.0.0.1/%2e%2e/%2e%2e/sentinel/q", "\x00", "http://[::1"]


def deep_xml(n: int) -> bytes:
    return b"<?xml version='1.0'?>" + b"<a>" * n + b"</a>" * n


XML_BODIES = [
    b"", b"<", b"<?xml version='1.0'?><D:propfind xmlns:D='DAV:'><D:allprop/></D:propfind>",
    b"<D:propfind xmlns:D='DAV:'><D:prop><D:nope/></D:prop>", deep_xml(5000), deep_xml(100),
    b"<!DOCTYPE x [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>"
    b"<!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;'><!ENTITY d '&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;'>]><x>&d;&d;</x>",
    b"<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><D:propfind xmlns:D='DAV:'>&e;</D:propfind>",
    b"<?xml version='1.0'?><D:propertyupdate xmlns:D='DAV:'><D:set><D:prop><Z:x xmlns:Z='z'>"
    + b"v" * 70000 + b"</Z:x></D:prop></D:set></D:propertyupdate>",
    b"<?xml version='1.0'?><D:lockinfo xmlns:D='DAV:'><D:lockscope><D:exclusive/></D:lockscope>"
    b"<D:locktype><D:write/></D:locktype><D:owner>" + b"<x>" * 2000 + b"</D:owner></D:lockinfo>",
    b"\xff\xfe<\x00a\x00>\x00", b"<a xmlns:D='DAV:'><D:prop/></a>",
]


def sometimes(draw, hostile, sane):
    """Mostly a sane value (so requests reach the handlers), now and then a hostile one."""
    return draw(hostile) if draw(st.integers(0, 3)) == 0 else draw(sane)


@st.composite
def http_request(draw) -> bytes:
    method = sometimes(draw, st.one_of(st.sampled_from(METHODS), st.text(max_size=10)),
                       st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PROPFIND", "PROPPATCH",
                                        "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK"]))
    path = sometimes(draw, st.one_of(st.sampled_from(PATHS), st.builds(lambda t: "/fuzz/" + t, st.text(max_size=30))),
                     st.sampled_from(["/", "/honest.txt", "/fuzz/", "/fuzz/a.txt", "/fuzz/d/", "/../fuzz/x",
                                      "/fuzz/%2e%2e/%2e%2e/sentinel", "/fuzz/a%20b"]))
    version = sometimes(draw, st.sampled_from(["HTTP/1.0", "HTTP/9.9", "HTTP/1.1x", ""]), st.just("HTTP/1.1"))
    body = draw(st.one_of(st.sampled_from(XML_BODIES), st.binary(max_size=300)))
    headers: list[tuple[str, str]] = [("Host", "127.0.0.1")]
    auth = draw(st.sampled_from(["good", "good", "good", "none", "bad", "garbage"]))
    if auth == "good":
        headers.append(("Authorization", basic()))
    elif auth == "bad":
        headers.append(("Authorization", basic("alice", "wrong")))
    elif auth == "garbage":
        headers.append(("Authorization", draw(st.sampled_from(["Basic !!!", "Basic " + "A" * 10000, "Bearer x",
                                                               "Basic YWxpY2U=", "Basic " + "\x00"]))))
    for name, pool in (("Range", RANGES), ("Depth", DEPTHS), ("Destination", DESTS),
                       ("Overwrite", ["T", "F", "x"]), ("If", ["(<opaquelocktoken:x>)", "(", "<a> (Not <b>)"]),
                       ("Timeout", ["Second-99999999999999999", "Infinite", "x"])):
        if draw(st.integers(0, 3)) == 0:
            headers.append((name, draw(st.sampled_from(pool))))
    cl = sometimes(draw, st.sampled_from(["none", "short", "long", "huge", "negative", "garbage", "chunked"]),
                   st.just("honest"))
    length = {"honest": str(len(body)), "short": str(max(len(body) - 5, 0)), "long": str(len(body) + 1000),
              "huge": str(2**64), "negative": "-1", "garbage": "12abc"}.get(cl)
    if length is not None:
        headers.append(("Content-Length", length))
    if cl == "chunked":
        headers.append(("Transfer-Encoding", draw(st.sampled_from(["chunked", "gzip, chunked", "chunked, x"]))))
        body = draw(st.sampled_from([b"5\r\nhello\r\n0\r\n\r\n", b"ffffffffffffffff\r\nx", b"zz\r\n", b"0\r\n"]))
    if draw(st.integers(0, 5)) == 0:
        headers.append((draw(st.sampled_from(["X\r\nInjected", "Bad Header", "", "X-Long"])),
                        draw(st.sampled_from(["v", "a" * 20000, "\r\n\r\nGET / HTTP/1.1"]))))
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("utf-8", "surrogateescape") + body


def test_fuzz_http(srv):
    watch = Watch(srv)

    @FUZZ
    @given(http_request())
    @example(b"PROPFIND / HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic().encode()
             + b"\r\nContent-Length: " + str(len(deep_xml(5000))).encode() + b"\r\n\r\n" + deep_xml(5000))
    @example(b"GET /honest.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=" + b",".join([b"0-1"] * 500) + b"\r\n\r\n")
    @example(b"PUT /fuzz/lie HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551616\r\n\r\nabc")
    # a PUT body cut short by the client's EOF once logged aiohttp's "Connection lost" traceback
    @example(b"PUT /fuzz/cut HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic().encode()
             + b"\r\nContent-Length: 100\r\n\r\nabc")
    def run(raw):
        sock = socket.create_connection(("127.0.0.1", srv.ports["http"]), timeout=ANSWER_LIMIT)
        try:
            try:
                sock.sendall(raw)
            except OSError:
                pass
            # an answer, or a close; a request whose body is still awaited (a length that
            # lies) gets the client's EOF after a second and must then end too
            got, eof_sent = b"", False
            sock.settimeout(1.0)
            deadline = time.monotonic() + ANSWER_LIMIT + 1.0
            while not got.startswith(b"HTTP/1.") or b"\r\n" not in got:
                assert time.monotonic() < deadline, f"no answer and no close within {ANSWER_LIMIT} s"
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    if not eof_sent:
                        eof_sent = True
                        try:
                            sock.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                got += chunk
            assert got == b"" or got.startswith(b"HTTP/1."), got[:200]
            watch.outcome(got[9:12].decode() if got else "closed")
        finally:
            sock.close()
        watch.after_example(honest_http)

    run()
    # most examples must reach the handlers and get an answer, not just a closed door
    assert sum(n for k, n in watch.outcomes.items() if k != "closed") > 150, watch.outcomes
    watch.settle(honest_http)
