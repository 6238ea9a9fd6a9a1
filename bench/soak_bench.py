#!/usr/bin/env python3
"""Soak: do 20 hostile clients hurt 5 honest ones? (docs/architecture.md rule 12)

    .venv/bin/python bench/soak_bench.py [--seconds 600] [--baseline-seconds 60] [--honest 5]
                                         [--hostile 20] [--size-mb 8] [--recovery 30]
                                         [--scripts-nice N]

Starts one `scriptsftp run` (SFTP, FTP, HTTP on 127.0.0.1; `[defender] allow_list =
["127.0.0.1/32"]`, so the honest clients on 127.0.0.1 are never banned or rate limited while
the hostile ones, bound to 127.0.1.x .. 127.0.4.x, may be). Then:

  baseline  --baseline-seconds: the --honest paramiko SFTP clients alone, each in a loop:
            connect + password login (timed), upload a --size-mb file, download it back
            (checked), disconnect.
  attack    --seconds: the same honest loop, plus --hostile threads each cycling through
            the attacks: idle TCP connections to every port; bad-password SSH logins from
            rotating source addresses; the SFTP SETSTAT with an extended-attribute count of
            2^32-1; many channels on one connection; OPENDIR floods; uploads that stall
            mid-way; malformed and slow HTTP requests; FTP connections that never log in;
            chmod/utime raced against a rename that swaps a planted link to a file outside
            the home in and out; uploads that trigger a CPU-bound pre-publish script; a
            sparse 64 GiB file reopened r+; `auth none` user probes; READ on a write-only
            handle; upload names that a post-upload script hands to api.run as an option.
  recovery  the attackers stop; the daemon's RSS and fds are sampled until they are back
            near the baseline (fds within +20, RSS within +50 MB), for at most --recovery s.

Every honest login also runs a `pre-login` script (a no-op), so it needs a script worker
while the attacker's slow pre-publish checks hold them ([scripts] login_reserve).

Reports: honest throughput during the attack / baseline, honest login p50/p99 (baseline and
attack), the daemon's RSS and fd count (its main process, and the whole process tree) at
baseline, peak and --recovery s after the attackers stopped, with the tree's PSS (shared
pages split among their sharers: what the tree really holds) and each process's RSS and
PSS at baseline and after recovery, what the attackers did, and
whether the file outside the home that the chmod race aims at kept its mode and mtime.
Every loop is bounded in count and time, and every target is on 127.0.0.0/8. Appends one
JSON line to bench/out/soak.jsonl. Never run as a test.
"""

from __future__ import annotations

import os
import sys

try:
    import paramiko
except ImportError:
    _venv_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".venv", "bin", "python")
    if os.path.exists(_venv_py) and os.path.realpath(sys.executable) != os.path.realpath(_venv_py):
        os.execv(_venv_py, [_venv_py, *sys.argv])
    raise

import argparse
import collections
import datetime as dt
import io
import multiprocessing as mp
import json
import random
import re
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).with_name("scriptsftp")
OUT = ROOT / "bench" / "out"
HONEST_PASSWORD = "honest-Secret-1"
MALLORY_PASSWORD = "mallory-Secret-2"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
HOLD = 20.0          # longest an attacker holds one socket or stall (seconds)
OP_TIMEOUT = 10.0    # socket timeout of every attacker and honest operation


def loopback(host: str) -> str:
    assert host.startswith("127."), host  # only 127.0.0.0/8 is ever a target or a source
    return host


# --------------------------------------------------------------------------- the daemon


def write_config(tmp: Path, scripts_nice: int | None = None) -> Path:
    from scriptsftp.server.core.passwords import hash_password

    for d in ("honest", "mallory/many", "mallory/slow", "mallory/run", "mallory/race", "scripts"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    for i in range(2000):  # a directory worth listing for the OPENDIR flood
        (tmp / "mallory" / "many" / f"f{i:05d}").write_bytes(b"x")
    outside = tmp / "outside.txt"  # what the chmod race aims at: its mode and mtime must stay
    outside.write_bytes(b"not mallory's\n")
    os.chmod(outside, 0o600)
    os.utime(outside, (1_000_000_000, 1_000_000_000))
    for n in range(64):  # one planted link per attacker (a link an admin or a restore left there)
        os.symlink(outside, tmp / "mallory" / "race" / f"link{n}")
    (tmp / "scripts" / "soak.py").write_text(SOAK_SCRIPT)
    allow_root = "allow_root = true" if os.geteuid() == 0 else ""
    nice_line = "" if scripts_nice is None else f"nice = {scripts_nice}"
    cfg = tmp / "scriptsftp.toml"
    cfg.write_text(f"""
[server]
state_dir = "state"
log_level = "info"
{allow_root}

[sftp]
listen = "127.0.0.1:0"

[ftp]
enabled = true
listen = "127.0.0.1:0"
passive_ports = ""

[http]
enabled = true
listen = "127.0.0.1:0"

[defender]
allow_list = ["127.0.0.1/32"]

[scripts]
dir = "scripts"
{nice_line}

[commands.count]
argv = ["/bin/echo", "{{0}}"]
timeout = 5

[[bindings]]
event = "pre-login"
script = "soak.py"

[[bindings]]
event = "pre-publish"
script = "soak.py"
users = ["mallory"]
paths = ["/slow/*"]
cpu_time = 1.0

[[bindings]]
event = "post-upload"
script = "soak.py"
users = ["mallory"]
paths = ["/run/*"]
allow = ["run"]

[[users]]
name = "honest"
password_hash = "{hash_password(HONEST_PASSWORD)}"
home = "honest"
permissions = {{ "/" = ["*"] }}

[[users]]
name = "mallory"
password_hash = "{hash_password(MALLORY_PASSWORD)}"
home = "mallory"
permissions = {{ "/" = ["*"] }}
""")
    return cfg


SOAK_SCRIPT = """
def on_pre_login(event, api):
    return None  # every login, honest ones too, needs a script worker


def on_pre_publish(event, api):
    # the attacker's slow check: CPU-bound until its cpu_time (1 s) stops it
    n = 0
    while True:
        n += 1


def on_post_upload(event, api):
    # the upload's name as an argument: "--file=..." must be refused, never passed
    name = event.path.split("/")[-1]
    try:
        api.run("count", name)
    except ValueError as e:
        api.log("run refused", error=str(e)[:80])
"""


def outside_state(tmp: Path) -> dict:
    st = os.stat(tmp / "outside.txt")
    return {"mode": oct(st.st_mode & 0o7777), "mtime": st.st_mtime}


class Daemon:
    def __init__(self, cfg: Path) -> None:
        self.log = open(cfg.parent / "daemon.log", "wb")
        self.proc = subprocess.Popen([str(BIN), "run", "-c", str(cfg)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cfg.parent)
        self.ports: dict[str, int] = {}
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.tracebacks = 0
        self.counts: collections.Counter[str] = collections.Counter()
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                self.log.write(raw)
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                m = re.search(r"listening (\w+) on \S+:(\d+)", line)
                if m:
                    self.ports.setdefault(m[1], int(m[2]))
                if "Traceback" in line:
                    self.tracebacks += 1
                for key in ("banned", "login failed", "refused", "evict", "too many", "run refused",
                            "CPU limit", "vetoed"):
                    if key in line:
                        self.counts[key] += 1
                if " ready" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60):
            raise SystemExit("scriptsftp did not start:\n" + "".join(self.lines))

    def pids(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for e in os.listdir("/proc"):
            if e.isdigit():
                try:
                    stat = Path(f"/proc/{e}/stat").read_bytes()
                except OSError:
                    continue
                children.setdefault(int(stat[stat.rindex(b")") + 2:].split()[1]), []).append(int(e))
        out, todo = [], [self.proc.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(children.get(p, []))
        return out

    def sample(self) -> dict:
        main = self.proc.pid
        rss_tree = fds_tree = pss_tree = procs = 0
        cpu = 0.0
        rss_main = fds_main = 0
        for p in self.pids():
            try:
                rss = _rss_kb(p)
                fds = len(os.listdir(f"/proc/{p}/fd"))
                stat = Path(f"/proc/{p}/stat").read_bytes()
            except OSError:
                continue
            f = stat[stat.rindex(b")") + 2:].split()
            cpu += (int(f[11]) + int(f[12])) / CLK_TCK
            rss_tree += rss
            pss_tree += _pss_kb(p)
            fds_tree += fds
            procs += 1
            if p == main:
                rss_main, fds_main = rss, fds
        return {"t": time.monotonic(), "rss_main_mb": rss_main / 1024, "rss_tree_mb": rss_tree / 1024,
                "pss_tree_mb": pss_tree / 1024, "fds_main": fds_main, "fds_tree": fds_tree,
                "processes": procs, "cpu": cpu}

    def breakdown(self) -> list[dict]:
        """Each process of the tree: what it is, its RSS and PSS (where memory stays)."""
        rows = []
        for p in self.pids():
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
                stat = Path(f"/proc/{p}/stat").read_bytes()
                rss, pss = _rss_kb(p), _pss_kb(p)
            except OSError:
                continue
            rows.append({"pid": p, "ppid": int(stat[stat.rindex(b")") + 2:].split()[1]), "cmd": cmd,
                         "rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1)})
        parents = {r["ppid"] for r in rows}
        for r in rows:
            cmd = r.pop("cmd")
            r["kind"] = ("daemon" if r["pid"] == self.proc.pid else "script worker" if b"worker_main" in cmd
                         else "ssh worker (a new program)" if b"worker_process" in cmd
                         else "ssh worker template" if r["pid"] in parents
                         else "ssh worker (forked)")
        return rows

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages split among their sharers, so the tree's sum is
    what it really holds (the sum of RSS counts the daemon's code once per worker)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- honest clients


class Honest:
    """One honest client: login, upload --size-mb, download it back, logout; in a loop."""

    def __init__(self, n: int, port: int, size: int, stop: threading.Event) -> None:
        self.n, self.port, self.stop = n, port, stop
        self.data = os.urandom(size)
        self.done: list[tuple[float, int]] = []     # (end time, bytes) per finished transfer
        self.logins: list[tuple[float, float]] = []  # (time, seconds) per login
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            t = None
            try:
                t0 = time.monotonic()
                sock = socket.create_connection((loopback("127.0.0.1"), self.port), timeout=OP_TIMEOUT)
                t = paramiko.Transport(sock)
                t.start_client(timeout=OP_TIMEOUT)
                t.auth_password("honest", HONEST_PASSWORD)
                self.logins.append((time.monotonic(), time.monotonic() - t0))
                sftp = paramiko.SFTPClient.from_transport(t)
                sftp.get_channel().settimeout(60)
                name = f"/h{self.n}.bin"
                sftp.putfo(io.BytesIO(self.data), name, confirm=True)
                self.done.append((time.monotonic(), len(self.data)))
                if self.stop.is_set():
                    break
                buf = io.BytesIO()
                sftp.getfo(name, buf)
                if buf.getvalue() != self.data:
                    raise AssertionError("download differs from upload")
                self.done.append((time.monotonic(), len(self.data)))
            except Exception as exc:  # counted and reported, never hidden
                self.errors.append(f"{time.monotonic():.1f} {type(exc).__name__}: {exc}")
                time.sleep(0.5)
            finally:
                if t is not None:
                    t.close()

    def mbps(self, start: float, end: float) -> float:
        return sum(b for (t, b) in self.done if start <= t < end) / 1e6 / max(end - start, 1e-9)


# --------------------------------------------------------------------------- hostile clients


class Hostile:
    """One attacker thread: cycles through the attacks until stopped. Every socket it opens
    has a timeout, every hold is at most HOLD s, and it opens at most ``budget`` sockets."""

    ATTACKS = ("idle", "badpass", "hugeattrs", "channels", "opendir", "stall", "http", "ftp_nologin",
               "chmod_race", "slow_script", "sparse", "auth_none", "read_write_only", "run_inject")

    def __init__(self, n: int, ports: dict[str, int], stop: threading.Event, deadline: float) -> None:
        self.n, self.ports, self.stop, self.deadline = n, ports, stop, deadline
        self.rng = random.Random(n)
        self.counts: collections.Counter[str] = collections.Counter()
        self.budget = 20000

    # source addresses: bad-password attempts rotate over 127.0.1.1..254 (they get banned);
    # the other attacks use their own 127.0.2+n.x range
    def src(self, kind: str) -> str:
        if kind == "badpass":
            return f"127.0.1.{self.rng.randint(1, 254)}"
        return f"127.0.{2 + self.n % 3}.{self.rng.randint(1, 254)}"

    def over(self) -> bool:
        return self.stop.is_set() or time.monotonic() > self.deadline or self.budget <= 0

    def hold(self, seconds: float) -> None:
        self.stop.wait(min(seconds, HOLD, max(self.deadline - time.monotonic(), 0)))

    def connect(self, kind: str, proto: str) -> socket.socket:
        self.budget -= 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(OP_TIMEOUT)
        try:
            s.bind((loopback(self.src(kind)), 0))
            s.connect((loopback("127.0.0.1"), self.ports[proto]))
        except BaseException:
            s.close()
            raise
        return s

    def mallory(self, kind: str) -> paramiko.Transport:
        t = paramiko.Transport(self.connect(kind, "sftp"))
        try:
            t.start_client(timeout=OP_TIMEOUT)
            t.auth_password("mallory", MALLORY_PASSWORD)
        except BaseException:
            t.close()
            raise
        return t

    def run(self) -> None:
        i = self.n
        while not self.over():
            kind = self.ATTACKS[i % len(self.ATTACKS)]
            i += 1
            try:
                getattr(self, "a_" + kind)()
                self.counts[kind] += 1
            except Exception as exc:
                self.counts[f"{kind} ended: {type(exc).__name__}"] += 1
                self.hold(0.2)

    def a_idle(self) -> None:
        socks = []
        try:
            for _ in range(3):
                for proto in ("sftp", "ftp", "http"):
                    try:
                        socks.append(self.connect("idle", proto))
                    except OSError:
                        pass
            self.hold(self.rng.uniform(5, HOLD))
        finally:
            for s in socks:
                s.close()

    def a_badpass(self) -> None:
        for _ in range(5):
            if self.over():
                return
            t = None
            try:
                t = paramiko.Transport(self.connect("badpass", "sftp"))
                t.start_client(timeout=OP_TIMEOUT)
                # never mallory: user_max_failures would lock its password and end the other attacks
                t.auth_password(self.rng.choice(["root", "admin", "nobody", "honest"]), "wrong-password")
            except (paramiko.SSHException, OSError, EOFError):
                pass
            finally:
                if t is not None:
                    t.close()

    def a_hugeattrs(self) -> None:
        t = self.mallory("hugeattrs")
        try:
            ch = t.open_session(timeout=OP_TIMEOUT)
            ch.settimeout(OP_TIMEOUT)
            ch.invoke_subsystem("sftp")
            ch.sendall(struct.pack(">IBI", 5, 1, 3))
            ch.recv(4096)
            body = struct.pack(">BI", 9, 7) + struct.pack(">I", 1) + b"/" + struct.pack(">II", 0x80000000, 2**32 - 1)
            ch.sendall(struct.pack(">I", len(body)) + body)
            ch.recv(4096)
        finally:
            t.close()

    def a_channels(self) -> None:
        t = self.mallory("channels")
        try:
            for _ in range(50):
                if self.over():
                    break
                try:
                    ch = t.open_session(timeout=OP_TIMEOUT)
                    ch.invoke_subsystem("sftp")
                except (paramiko.SSHException, EOFError, OSError):
                    pass
            self.hold(self.rng.uniform(2, 8))
        finally:
            t.close()

    def a_opendir(self) -> None:
        t = self.mallory("opendir")
        try:
            sftp = paramiko.SFTPClient.from_transport(t)
            sftp.get_channel().settimeout(OP_TIMEOUT)
            for _ in range(300):  # past max_handles (256): the rest are refused
                if self.over():
                    break
                try:
                    h = sftp._request(paramiko.sftp.CMD_OPENDIR, "/many")[1].get_binary()
                    sftp._request(paramiko.sftp.CMD_READDIR, h)
                except (OSError, paramiko.SSHException, EOFError):
                    break
            self.hold(self.rng.uniform(1, 5))
        finally:
            t.close()

    def a_stall(self) -> None:
        t = self.mallory("stall")
        try:
            sftp = paramiko.SFTPClient.from_transport(t)
            f = sftp.open(f"/stall{self.n}.bin", "w")
            f.write(os.urandom(256 * 1024))
            f.flush()
            self.hold(HOLD)  # then leave without CLOSE: the upload must be discarded
        finally:
            t.close()

    HTTP_JUNK = [
        b"GARBAGE\r\n\r\n",
        b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PROPFIND / HTTP/1.1\r\nHost: x\r\nDepth: infinity\r\nContent-Length: 99999\r\n\r\n<a>",
        b"GET / HTTP/1.1\r\nHost: x\r\nRange: bytes=" + b",".join([b"0-1"] * 400) + b"\r\n\r\n",
        b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551616\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + b"A" * 8000 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),
        b"LOCK / HTTP/1.1\r\nHost: x\r\nContent-Length: 30000\r\n\r\n" + b"<a>" * 10000,
    ]

    def a_http(self) -> None:
        for _ in range(5):
            if self.over():
                return
            s = self.connect("http", "http")
            try:
                s.sendall(self.rng.choice(self.HTTP_JUNK))
                s.recv(4096)
            except OSError:
                pass
            finally:
                s.close()
        s = self.connect("http", "http")  # and a slow one: half a request head, held
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            self.hold(self.rng.uniform(5, HOLD))
        finally:
            s.close()

    def sftp(self, kind: str) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
        t = self.mallory(kind)
        try:
            sftp = paramiko.SFTPClient.from_transport(t)
            sftp.get_channel().settimeout(OP_TIMEOUT)
        except BaseException:
            t.close()
            raise
        return t, sftp

    def a_chmod_race(self) -> None:
        """(item 2) One channel swaps the planted link to outside.txt with a file of its own
        by renames while another chmods and touches the name: outside.txt must not change."""
        t, sftp = self.sftp("chmod_race")
        other = paramiko.SFTPClient.from_transport(t)
        other.get_channel().settimeout(OP_TIMEOUT)
        link, mine, slot = f"/race/link{self.n}", f"/race/mine{self.n}", f"/race/slot{self.n}"
        stop = threading.Event()

        def swapper() -> None:
            while not stop.is_set():
                for a in (link, mine):
                    try:
                        sftp.posix_rename(a, slot)
                        sftp.posix_rename(slot, a)
                    except OSError:
                        pass

        try:
            with sftp.open(mine, "w") as f:
                f.write(b"mine")
            th = threading.Thread(target=swapper, daemon=True)
            th.start()
            for _ in range(100):
                if self.over():
                    break
                for target in (slot, link):
                    try:
                        other.chmod(target, 0o777)
                        other.utime(target, (0, 0))
                    except OSError:
                        self.counts["chmod_race refused"] += 1
            stop.set()
            th.join(OP_TIMEOUT)
        finally:
            stop.set()
            t.close()

    def a_slow_script(self) -> None:
        """(item 4) Uploads that each cost a script worker a second of CPU (pre-publish)."""
        t, sftp = self.sftp("slow_script")
        try:
            for i in range(3):
                if self.over():
                    break
                try:
                    with sftp.open(f"/slow/s{self.n}-{i}.bin", "w") as f:
                        f.write(b"x" * 1024)
                except OSError:
                    self.counts["slow_script vetoed"] += 1  # the script's error denies the upload
        finally:
            t.close()

    def a_sparse(self) -> None:
        """(item 5) One byte at 64 GiB, published, then reopened r+ (a copy of the file)."""
        t, sftp = self.sftp("sparse")
        name = f"/sparse{self.n}.bin"
        try:
            with sftp.open(name, "w") as f:
                f.seek(64 << 30)
                f.write(b"x")
            with sftp.open(name, "r+") as f:
                f.seek(0)
                f.write(b"y")
            sftp.remove(name)
        finally:
            t.close()

    def a_auth_none(self) -> None:
        """(item 7) `auth none` probes for user names, then leave."""
        for name in ("root", "honest", "admin", f"user{self.rng.randint(0, 999)}"):
            if self.over():
                return
            t = paramiko.Transport(self.connect("auth_none", "sftp"))
            try:
                t.start_client(timeout=OP_TIMEOUT)
                t.auth_none(name)
            except paramiko.BadAuthenticationType:
                pass
            except (paramiko.SSHException, OSError, EOFError):
                pass
            finally:
                t.close()

    def a_read_write_only(self) -> None:
        """(item 8) READ requests on a write-only upload handle: refused, no traceback."""
        t, sftp = self.sftp("read_write_only")
        try:
            f = sftp.open(f"/wo{self.n}.bin", "w")
            f.write(b"written")
            f.flush()
            for _ in range(20):
                try:
                    sftp._request(paramiko.sftp.CMD_READ, f.handle, paramiko.sftp.int64(0), 4096)
                    self.counts["read_write_only ANSWERED"] += 1  # must never happen
                except OSError:
                    pass
            f.close()
        finally:
            t.close()

    def a_run_inject(self) -> None:
        """(item 10) Upload names a post-upload script hands to api.run: options refused."""
        t, sftp = self.sftp("run_inject")
        try:
            for name in ("--file=outside.txt", "-n", "--help", "plain"):
                with sftp.open(f"/run/{name}", "w") as f:
                    f.write(b"x")
        finally:
            t.close()

    def a_ftp_nologin(self) -> None:
        socks = []
        try:
            for _ in range(3):
                s = self.connect("ftp_nologin", "ftp")
                socks.append(s)
                try:
                    s.recv(1024)
                    s.sendall(b"USER mallory\r\n")
                except OSError:
                    pass
            self.hold(self.rng.uniform(5, HOLD))
        finally:
            for s in socks:
                s.close()


def hostile_process(count: int, ports: dict[str, int], stop, deadline: float, out) -> None:
    """The attackers, in a process of their own: in the bench's process their threads would
    take the GIL from the honest clients and the bench would measure itself."""
    hostile = [Hostile(i, ports, stop, deadline) for i in range(count)]
    threads = [threading.Thread(target=h.run, daemon=True) for h in hostile]
    for th in threads:
        th.start()
    for th in threads:
        th.join(max(deadline - time.monotonic(), 0) + OP_TIMEOUT * 3 + HOLD)
    counts: collections.Counter[str] = collections.Counter()
    for h in hostile:
        counts.update(h.counts)
    out.put((dict(counts), sum(th.is_alive() for th in threads)))


# --------------------------------------------------------------------------- the run


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--baseline-seconds", type=float, default=60)
    ap.add_argument("--honest", type=int, default=5)
    ap.add_argument("--hostile", type=int, default=20)
    ap.add_argument("--size-mb", type=int, default=8)
    ap.add_argument("--recovery", type=float, default=30)
    ap.add_argument("--scripts-nice", type=int, default=None, help="[scripts] nice (default: the config's, 10)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    d = Daemon(write_config(tmp, args.scripts_nice))
    outside_before = outside_state(tmp)
    samples: list[tuple[str, dict]] = []
    phase = ["baseline"]
    mon_stop = threading.Event()

    def monitor() -> None:
        while not mon_stop.wait(1.0):
            samples.append((phase[0], d.sample()))

    threading.Thread(target=monitor, daemon=True).start()
    honest_stop = threading.Event()
    honest = [Honest(i, d.ports["sftp"], args.size_mb * MiB, honest_stop) for i in range(args.honest)]
    hthreads = [threading.Thread(target=h.run, daemon=True) for h in honest]
    try:
        print(f"scriptsftp pid {d.proc.pid}, ports {d.ports}, dir {tmp}", flush=True)
        t_base0 = time.monotonic()
        for th in hthreads:
            th.start()
        time.sleep(args.baseline_seconds)
        t_base1 = time.monotonic()
        base_sample = d.sample()
        base_breakdown = d.breakdown()
        print(f"baseline done: {sum(h.mbps(t_base0, t_base1) for h in honest):.1f} MB/s", flush=True)

        phase[0] = "attack"
        ctx = mp.get_context("spawn")
        att_stop, att_out = ctx.Event(), ctx.Queue()
        deadline = time.monotonic() + args.seconds  # CLOCK_MONOTONIC: the same in the child
        attackers = ctx.Process(target=hostile_process, args=(args.hostile, d.ports, att_stop, deadline, att_out))
        t_att0 = time.monotonic()
        attackers.start()
        while time.monotonic() < deadline:
            time.sleep(min(30, max(deadline - time.monotonic(), 0)))
            s = d.sample()
            print(f"  attack t+{time.monotonic() - t_att0:.0f}s: honest "
                  f"{sum(h.mbps(time.monotonic() - 30, time.monotonic()) for h in honest):.1f} MB/s, "
                  f"rss {s['rss_main_mb']:.0f}/{s['rss_tree_mb']:.0f} MB, pss tree {s['pss_tree_mb']:.0f} MB, "
                  f"fds {s['fds_main']}/{s['fds_tree']}, {s['processes']} processes",
                  flush=True)
        att_stop.set()
        t_att1 = time.monotonic()
        try:
            attack_counts, stragglers = att_out.get(timeout=OP_TIMEOUT * 3 + HOLD + 30)
        except Exception:
            attack_counts, stragglers = {"result": "lost"}, -1
        attackers.join(30)
        if attackers.is_alive():
            attackers.kill()

        phase[0] = "recovery"
        t_rec0 = time.monotonic()
        recovered_after = None
        while time.monotonic() - t_rec0 < args.recovery:
            s = d.sample()
            if recovered_after is None and s["fds_main"] <= base_sample["fds_main"] + 20 \
                    and s["rss_main_mb"] <= base_sample["rss_main_mb"] + 50:
                recovered_after = time.monotonic() - t_att1
            time.sleep(1.0)
        rec_sample = d.sample()
        rec_breakdown = d.breakdown()
        honest_stop.set()
        for th in hthreads:
            th.join(120)
    finally:
        mon_stop.set()
        d.stop()

    base_logins = [s for h in honest for (t, s) in h.logins if t_base0 <= t < t_base1]
    att_logins = [s for h in honest for (t, s) in h.logins if t_att0 <= t < t_att1]
    base_mbps = sum(h.mbps(t_base0, t_base1) for h in honest)
    att_mbps = sum(h.mbps(t_att0, t_att1) for h in honest)
    att_samples = [s for (p, s) in samples if p == "attack"]
    peak = {k: max((s[k] for s in att_samples), default=0)
            for k in ("rss_main_mb", "rss_tree_mb", "pss_tree_mb", "fds_main", "fds_tree", "processes")}
    attacks = attack_counts
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip(),
        "args": vars(args), "cpus": os.cpu_count(), "load": os.getloadavg(),
        "honest_mbps_baseline": round(base_mbps, 2), "honest_mbps_attack": round(att_mbps, 2),
        "throughput_ratio": round(att_mbps / base_mbps, 3) if base_mbps else None,
        "login_s_baseline": {"n": len(base_logins), "p50": pct(base_logins, 50), "p99": pct(base_logins, 99)},
        "login_s_attack": {"n": len(att_logins), "p50": pct(att_logins, 50), "p99": pct(att_logins, 99),
                           "max": max(att_logins, default=float("nan"))},
        "honest_errors": [e for h in honest for e in h.errors][:20],
        "honest_error_count": sum(len(h.errors) for h in honest),
        "baseline": {k: round(v, 1) for k, v in base_sample.items() if k not in ("t", "cpu")},
        "peak": {k: round(v, 1) for k, v in peak.items()},
        "after_recovery": {k: round(v, 1) for k, v in rec_sample.items() if k not in ("t", "cpu")},
        "processes_baseline": base_breakdown, "processes_after_recovery": rec_breakdown,
        "recovered_within_s": None if recovered_after is None else round(recovered_after, 1),
        "attacker_stragglers": stragglers,
        "attacks": dict(sorted(attacks.items())),
        "daemon_log_counts": dict(d.counts), "daemon_tracebacks": d.tracebacks,
        "outside_file_unchanged": outside_state(tmp) == outside_before,
        "run_refused_in_log": d.counts["run refused"],
    }
    OUT.mkdir(exist_ok=True)
    with open(OUT / "soak.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\nhonest throughput under attack: {att_mbps:.1f} MB/s vs {base_mbps:.1f} MB/s alone "
          f"({100 * att_mbps / base_mbps if base_mbps else float('nan'):.0f}%)")
    print(f"honest login p50/p99: baseline {result['login_s_baseline']['p50']:.3f}/{result['login_s_baseline']['p99']:.3f} s, "
          f"attack {result['login_s_attack']['p50']:.3f}/{result['login_s_attack']['p99']:.3f} s")
    print(f"daemon log: {tmp / 'daemon.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
