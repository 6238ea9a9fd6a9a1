#!/usr/bin/env python3
"""SFTP benchmark: scriptsftp side by side with OpenSSH (and a bare paramiko server).

    python bench/sftp_bench.py [--runs 3] [--size-mb 256] [--only openssh,bare,scriptsftp]
                               [--tests single,parallel,latency,memory]

Starts, on 127.0.0.1 only:
  openssh     OpenSSH sshd (own temp config, host key, authorized_keys) with
              /usr/lib/openssh/sftp-server: the anchor.
  bare        bench/bare_paramiko_server.py: stock paramiko SFTPServer + TCP_NODELAY.
  scriptsftp  `scriptsftp run -c CONFIG.toml` with a generated config (see
              scriptsftp_config()); "not available (reason)" if it cannot start.

Measures, median of --runs runs (transfers) or of --latency-n samples (latency):
  single    one --size-mb file, upload and download, with `sftp -b` and with curl
  parallel  --par-n (20) concurrent --par-mb (16) MiB uploads and downloads, with
            sftp and with curl: aggregate MB/s = total bytes / (first start .. last end)
  latency   connect+auth+`ls` of a small dir: `sftp -b` process wall time, and a
            paramiko client in-process (connect, kex, auth, open SFTP, listdir, close)
  memory    server RSS/PSS fresh, idle after the transfers, and with 100 idle SFTP
            sessions (paramiko clients in this process); plus server CPU while idle

Every transfer is checked (size every run, sha256 in the first run). MB = 10^6 bytes.
Prints a table and appends one JSON line per (server, test) to bench/out/.
"""

from __future__ import annotations

import os
import sys

# Re-exec under the project venv when run with a Python that lacks paramiko.
try:
    import paramiko  # noqa: F401
except ImportError:
    _venv_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".venv", "bin", "python")
    if os.path.exists(_venv_py) and os.path.realpath(sys.executable) != os.path.realpath(_venv_py):
        os.execv(_venv_py, [_venv_py, *sys.argv])
    raise

import argparse
import atexit
import datetime as dt
import hashlib
import json
import platform
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import openssh  # noqa: E402  (bench/openssh.py)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT_DIR = HERE / "out"
VENV = REPO / ".venv"
SCRIPTSFTP_BIN = VENV / "bin" / "scriptsftp"
READY_RX = r"listening sftp on 127\.0\.0\.1:(\d+)"
MiB = 1024 * 1024
ALL_TARGETS = ("openssh", "bare", "scriptsftp")
ALL_TESTS = ("single", "parallel", "latency", "memory")
LABEL = {"openssh": "OpenSSH", "bare": "bare paramiko", "scriptsftp": "scriptsftp"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- scriptsftp config


def scriptsftp_config(state_dir: Path, home: Path, scripts_dir: Path, pubkey: str,
                      user: str = "bench") -> str:
    """The TOML the bench gives `scriptsftp run` (and bare_paramiko_server.py). One place to fix.

    log_level is "info" because the readiness line `listening sftp on ...` is an
    info record (daemon.py); at "warning" it would never appear. scriptsftp
    refuses to run as root unless allow_root = true.
    """
    q = json.dumps  # JSON strings are valid TOML basic strings
    allow_root = "allow_root = true\n" if os.geteuid() == 0 else ""
    return f"""\
[server]
state_dir = {q(str(state_dir))}
log_level = "info"
{allow_root}
[sftp]
listen = "127.0.0.1:0"

[scripts]
dir = {q(str(scripts_dir))}

[[users]]
name = {q(user)}
public_keys = [{q(pubkey)}]
home = {q(str(home))}
permissions = {{ "/" = ["*"] }}
"""


# --------------------------------------------------------------------------- process bookkeeping

_CLIENTS: set[subprocess.Popen] = set()   # live client processes (sftp, curl)
_CLIENTS_LOCK = threading.Lock()


def _kill_clients() -> None:
    with _CLIENTS_LOCK:
        procs = list(_CLIENTS)
    for p in procs:
        openssh.kill_tree(p, timeout=2)


def run_client(argv: list[str], timeout: float) -> float:
    """Run a client to completion; return its wall time. Raise on failure/timeout."""
    t0 = time.perf_counter()
    p = spawn(argv)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        openssh.kill_tree(p, timeout=2)
        raise RuntimeError(f"timeout after {timeout:.0f}s: {argv[0]}")
    finally:
        with _CLIENTS_LOCK:
            _CLIENTS.discard(p)
    dt_ = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} exit {p.returncode}: {openssh.tail(err.decode(errors='replace'))}")
    return dt_


def spawn(argv: list[str]) -> subprocess.Popen:
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    with _CLIENTS_LOCK:
        _CLIENTS.add(p)
    return p


# --------------------------------------------------------------------------- /proc helpers


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rfind(b")") + 2:].split()


def tree_cpu(pid: int) -> float:
    """CPU seconds of pid + live descendants, including reaped children (cutime/cstime)."""
    total = 0
    for p in openssh.process_tree(pid):
        try:
            r = _stat_fields(p)
        except OSError:
            continue
        total += sum(int(x) for x in r[11:15])
    return total / CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(pid: int) -> dict:
    tree = openssh.process_tree(pid)
    rss = pss = 0
    for p in tree:
        try:
            rss += _status_kb(p, "VmRSS")
            pss += _pss_kb(p)
        except OSError:
            pass
    return {"main_rss_mib": _status_kb(pid, "VmRSS") / 1024, "tree_rss_mib": rss / 1024,
            "tree_pss_mib": pss / 1024, "procs": len(tree), "threads": _status_kb(pid, "Threads")}


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    port: int = 0
    user: str = ""
    data_dir: Path = Path("/nonexistent")   # server-side directory where files land
    remote_prefix: str = "/"                # the same directory as the client names it
    proc: subprocess.Popen | None = None
    stop: object = None
    cpu: object = None                      # openssh.CpuGroup
    error: str = ""                         # set when not available
    info: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return LABEL[self.name]

    def remote(self, name: str) -> str:
        return self.remote_prefix.rstrip("/") + "/" + name

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_openssh(base: Path, pubkey: str, subsystem: str) -> Target:
    t = Target("openssh")
    t.data_dir = base / "openssh" / "data"
    t.data_dir.mkdir(parents=True)
    user = None
    if os.geteuid() == 0:
        base.chmod(0o755)                 # the bench user must reach its home and authorized_keys
        (base / "openssh").chmod(0o755)
        user = openssh.BenchUser(t.data_dir)
        os.chown(t.data_dir, user.uid, user.gid)
        t.user = user.name
    else:                                 # sshd as ourselves: only we can log in
        t.user = pwd.getpwuid(os.geteuid()).pw_name
    t.cpu = openssh.CpuGroup("openssh")
    sshd = openssh.Sshd(base / "openssh" / "etc", pubkey, wrap=t.cpu.wrap,
                        sftp_server=openssh.SFTP_SERVER if subsystem == "sftp-server" else "internal-sftp")

    def stop():
        sshd.stop()
        t.cpu.remove()
        if user:
            user.remove()
    t.stop = stop
    try:
        sshd.start()
    except BaseException:
        stop()
        raise
    t.port, t.proc = sshd.port, sshd.proc
    t.remote_prefix = str(t.data_dir)   # sftp-server sees the real filesystem
    sub = openssh.SFTP_SERVER if subsystem == "sftp-server" else "internal-sftp"
    t.info["server"] = f"sshd + {sub} ({openssh.openssh_version()}), user {t.user}"
    return t


def start_daemon(name: str, argv: list[str], base: Path, pubkey: str, timeout: float) -> Target:
    """Start a daemon that takes `-c CONFIG.toml` and prints `listening sftp on 127.0.0.1:PORT`."""
    t = Target(name, user="bench")
    root = base / name
    t.data_dir = root / "home"
    for d in (t.data_dir, root / "state", root / "scripts"):
        d.mkdir(parents=True)
    cfg = root / "config.toml"
    cfg.write_text(scriptsftp_config(root / "state", t.data_dir, root / "scripts", pubkey, t.user))
    log = root / "daemon.log"
    t.cpu = openssh.CpuGroup(name)
    try:
        with open(log, "wb") as logf:
            t.proc = subprocess.Popen(t.cpu.wrap([*argv, "-c", str(cfg)]), stdin=subprocess.DEVNULL,
                                      stdout=logf, stderr=subprocess.STDOUT, cwd=root,
                                      start_new_session=True)
    except BaseException:
        t.cpu.remove()
        raise
    proc, cpu = t.proc, t.cpu

    def stop():
        openssh.kill_tree(proc)
        cpu.remove()
    t.stop = stop
    try:
        m = openssh.wait_for_line(t.proc, log, READY_RX, timeout)
    except BaseException:
        t.stop()
        raise
    t.port = int(m.group(1))
    t.remote_prefix = "/"
    t.info["log"] = str(log)
    return t


def scriptsftp_argv(cmd: str | None) -> list[str]:
    if cmd:
        return cmd.split() + ["run"]
    if not SCRIPTSFTP_BIN.exists():
        raise RuntimeError(f"{SCRIPTSFTP_BIN} not found (package not installed in the venv yet?)")
    return [str(SCRIPTSFTP_BIN), "run"]


# --------------------------------------------------------------------------- clients


class Clients:
    def __init__(self, key: Path, timeout: float):
        self.key = key
        self.pub = Path(str(key) + ".pub")
        self.timeout = timeout
        self.pkey = paramiko.Ed25519Key(filename=str(key))

    def sftp(self, t: Target, batch: Path, port: int | None = None) -> list[str]:
        return ["sftp", "-q", "-F", "/dev/null", "-b", str(batch), "-i", str(self.key),
                "-P", str(port or t.port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                f"{t.user}@127.0.0.1"]

    def curl(self, t: Target, remote: str, upload: Path | None = None,
             download: Path | None = None, port: int | None = None) -> list[str]:
        argv = ["curl", "-sS", "--insecure", "--key", str(self.key), "--pubkey", str(self.pub),
                "-u", f"{t.user}:"]
        if upload is not None:
            argv += ["-T", str(upload)]
        if download is not None:
            argv += ["-o", str(download)]
        return argv + [f"sftp://127.0.0.1:{port or t.port}{remote}"]

    def paramiko_open(self, t: Target):
        sock = socket.create_connection(("127.0.0.1", t.port), timeout=15)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tr = paramiko.Transport(sock)
        try:
            tr.start_client(timeout=15)
            tr.auth_publickey(t.user, self.pkey)
            sftp = paramiko.SFTPClient.from_transport(tr)
        except Exception:
            tr.close()
            raise
        return tr, sftp


def negotiated(t: Target, cl: Clients, base: Path) -> dict:
    """Which cipher each client negotiates with this server (from the KEXINIT lists)."""
    out = {}
    try:
        banner, srv = openssh.server_kexinit("127.0.0.1", t.port)
        out["server_banner"] = banner
    except Exception as e:
        return {"error": f"server KEXINIT: {e}"}
    batch = base / "probe.batch"
    batch.write_text("ls\n")
    for client, fn in (("sftp", lambda p: cl.sftp(t, batch, port=p)),
                       ("curl", lambda p: cl.curl(t, "/", download=Path("/dev/null"), port=p))):
        try:
            _, offer, opening = openssh.client_kexinit(fn)
            _, answer = openssh.server_kexinit("127.0.0.1", t.port, opening=opening)
            out[client] = openssh.negotiate(offer, answer)
        except Exception as e:
            out[client] = {"error": str(e)}
    try:
        tr, sftp = cl.paramiko_open(t)
        T = paramiko.Transport
        kex = next((k for k in T._preferred_kex if k in srv["kex"]), "?")
        out["paramiko"] = {"cipher_c2s": tr.local_cipher, "mac_c2s": tr.local_mac,
                           "cipher_s2c": tr.remote_cipher, "mac_s2c": tr.remote_mac, "kex": kex}
        if tr.local_cipher.endswith(("gcm@openssh.com", "poly1305@openssh.com")):
            out["paramiko"]["mac_c2s"] = out["paramiko"]["mac_s2c"] = "<implicit>"
        sftp.close()
        tr.close()
    except Exception as e:
        out["paramiko"] = {"error": str(e)}
    return out


# --------------------------------------------------------------------------- measurements


@dataclass
class Fixture:
    src: Path            # --size-mb random file (client side)
    src_sha: str
    par: Path            # --par-mb random file (client side)
    par_sha: str
    dl_dir: Path         # client-side download dir


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def make_random(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MiB))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def verify(path: Path, size: int, sha: str | None) -> None:
    deadline = time.monotonic() + 2.0   # an async publish may lag the client's exit a little
    while True:
        try:
            got = path.stat().st_size
        except FileNotFoundError:
            got = None
        if got == size or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if got != size:
        raise RuntimeError(f"verify {path.name}: size {got} != {size}")
    if sha and sha256(path) != sha:
        raise RuntimeError(f"verify {path.name}: sha256 mismatch")


def unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


def prepare_target(t: Target, fx: Fixture) -> None:
    """Files the download tests read, placed directly in the server's directory."""
    shutil.copyfile(fx.src, t.data_dir / "down.bin")
    shutil.copyfile(fx.par, t.data_dir / "down_par.bin")
    small = t.data_dir / "small"
    small.mkdir(exist_ok=True)
    for i in range(10):
        (small / f"f{i}.txt").write_bytes(b"x" * (100 * i))


def single(t: Target, cl: Clients, fx: Fixture, client: str, direction: str, check_sha: bool,
           base: Path) -> tuple[float, int]:
    size = fx.src.stat().st_size
    if direction == "up":
        name = f"up_{client}.bin"
        dest = t.data_dir / name
        unlink(dest)
        if client == "sftp":
            batch = base / f"{t.name}_up.batch"
            batch.write_text(f'put "{fx.src}" "{t.remote(name)}"\n')
            argv = cl.sftp(t, batch)
        else:
            argv = cl.curl(t, t.remote(name), upload=fx.src)
        secs = run_client(argv, cl.timeout)
        verify(dest, size, fx.src_sha if check_sha else None)
        unlink(dest)
    else:
        dest = fx.dl_dir / f"down_{t.name}_{client}.bin"
        unlink(dest)
        if client == "sftp":
            batch = base / f"{t.name}_down.batch"
            batch.write_text(f'get "{t.remote("down.bin")}" "{dest}"\n')
            argv = cl.sftp(t, batch)
        else:
            argv = cl.curl(t, t.remote("down.bin"), download=dest)
        secs = run_client(argv, cl.timeout)
        verify(dest, size, fx.src_sha if check_sha else None)
        unlink(dest)
    return secs, size


def parallel(t: Target, cl: Clients, fx: Fixture, client: str, direction: str, n: int,
             check_sha: bool, base: Path) -> tuple[float, int]:
    size = fx.par.stat().st_size
    argvs, dests = [], []
    for i in range(n):
        if direction == "up":
            name = f"par_{client}_{i}.bin"
            dest = t.data_dir / name
            if client == "sftp":
                batch = base / f"{t.name}_par_{i}.batch"
                batch.write_text(f'put "{fx.par}" "{t.remote(name)}"\n')
                argv = cl.sftp(t, batch)
            else:
                argv = cl.curl(t, t.remote(name), upload=fx.par)
        else:
            dest = fx.dl_dir / f"par_{t.name}_{client}_{i}.bin"
            if client == "sftp":
                batch = base / f"{t.name}_par_{i}.batch"
                batch.write_text(f'get "{t.remote("down_par.bin")}" "{dest}"\n')
                argv = cl.sftp(t, batch)
            else:
                argv = cl.curl(t, t.remote("down_par.bin"), download=dest)
        unlink(dest)
        argvs.append(argv)
        dests.append(dest)
    t0 = time.perf_counter()
    procs = [spawn(a) for a in argvs]
    errors = []
    deadline = t0 + cl.timeout
    try:
        for p in procs:
            try:
                _, err = p.communicate(timeout=max(0.1, deadline - time.perf_counter()))
                if p.returncode != 0:
                    errors.append(f"exit {p.returncode}: {openssh.tail(err.decode(errors='replace'), 1)}")
            except subprocess.TimeoutExpired:
                errors.append("timeout")
        secs = time.perf_counter() - t0
    finally:
        for p in procs:
            openssh.kill_tree(p, timeout=1)
            with _CLIENTS_LOCK:
                _CLIENTS.discard(p)
    if errors:
        raise RuntimeError(f"{len(errors)}/{n} clients failed: {errors[0]}")
    try:
        for d in dests:
            verify(d, size, fx.par_sha if check_sha else None)
    finally:
        for d in dests:
            unlink(d)
    return secs, size * n


def latency_sftp(t: Target, cl: Clients, n: int, base: Path) -> list[float]:
    batch = base / f"{t.name}_ls.batch"
    batch.write_text(f'ls "{t.remote("small")}"\n')
    argv = cl.sftp(t, batch)
    return [run_client(argv, 30) * 1000 for _ in range(n)]


def latency_paramiko(t: Target, cl: Clients, n: int) -> list[float]:
    out = []
    path = t.remote("small")
    for _ in range(n):
        t0 = time.perf_counter()
        tr, sftp = cl.paramiko_open(t)
        names = sftp.listdir(path)
        sftp.close()
        tr.close()
        out.append((time.perf_counter() - t0) * 1000)
        if len(names) != 10:
            raise RuntimeError(f"listdir returned {len(names)} entries, expected 10")
    return out


def memory_sessions(t: Target, cl: Clients, n: int, settle: float) -> dict:
    time.sleep(settle)   # let sessions of earlier tests wind down (sshd children exit)
    res = {"idle": memory(t.pid)}
    cpu0, w0 = server_cpu(t), time.perf_counter()
    time.sleep(settle)
    res["idle_cpu_pct"] = 100 * (server_cpu(t) - cpu0) / (time.perf_counter() - w0)
    sessions = []
    t0 = time.perf_counter()
    try:
        for _ in range(n):
            tr, sftp = cl.paramiko_open(t)
            sessions.append((tr, sftp))
            sftp.listdir(t.remote("small"))
        res["open_s"] = time.perf_counter() - t0
        time.sleep(settle)
        cpu0, w0 = server_cpu(t), time.perf_counter()
        time.sleep(settle)
        res["busy_idle_cpu_pct"] = 100 * (server_cpu(t) - cpu0) / (time.perf_counter() - w0)
        res["with_sessions"] = memory(t.pid)
    finally:
        for tr, sftp in sessions:
            try:
                sftp.close()
                tr.close()
            except Exception:
                pass
    idle, busy = res["idle"], res["with_sessions"]
    res["delta_rss_mib"] = busy["tree_rss_mib"] - idle["tree_rss_mib"]
    res["delta_pss_mib"] = busy["tree_pss_mib"] - idle["tree_pss_mib"]
    return res


# --------------------------------------------------------------------------- the run


@dataclass
class Result:
    target: str
    test: str
    unit: str
    samples: list = field(default_factory=list)
    cpu: list = field(default_factory=list)   # server CPU seconds per sample
    nbytes: int = 0
    error: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def value(self):
        return statistics.median(self.samples) if self.samples else None


def mbps(nbytes: int, secs: float) -> float:
    return nbytes / secs / 1e6


def server_cpu(t: Target) -> float:
    """CPU seconds used so far by the server and all it forked (cgroup; else /proc, see CpuGroup)."""
    if t.cpu is not None and t.cpu.path is not None:
        return t.cpu.seconds()
    return tree_cpu(t.pid)


def measure_cpu(t: Target, fn):
    """Run fn(); return (its result, server CPU seconds). Waits briefly for server-side teardown."""
    c0 = server_cpu(t)
    r = fn()
    time.sleep(0.15)
    return r, server_cpu(t) - c0


TRANSFER_TESTS = [
    # (test id, group, client, direction, parallel)
    ("sftp_up", "single", "sftp", "up", False),
    ("sftp_down", "single", "sftp", "down", False),
    ("curl_up", "single", "curl", "up", False),
    ("curl_down", "single", "curl", "down", False),
    ("par_sftp_up", "parallel", "sftp", "up", True),
    ("par_sftp_down", "parallel", "sftp", "down", True),
    ("par_curl_up", "parallel", "curl", "up", True),
    ("par_curl_down", "parallel", "curl", "down", True),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="SFTP benchmark: scriptsftp vs OpenSSH vs bare paramiko")
    ap.add_argument("--runs", type=int, default=3, help="runs per transfer test (median)")
    ap.add_argument("--size-mb", type=int, default=256, help="single-file size, MiB")
    ap.add_argument("--par-n", type=int, default=20, help="parallel clients")
    ap.add_argument("--par-mb", type=int, default=16, help="file size per parallel client, MiB")
    ap.add_argument("--latency-n", type=int, default=20, help="sequential sessions for latency")
    ap.add_argument("--sessions", type=int, default=100, help="idle sessions for the memory test")
    ap.add_argument("--only", default=",".join(ALL_TARGETS),
                    help="comma list of servers: openssh,bare,scriptsftp")
    ap.add_argument("--tests", default=",".join(ALL_TESTS), help="comma list: " + ",".join(ALL_TESTS))
    ap.add_argument("--timeout", type=float, default=120, help="seconds per transfer (or parallel batch)")
    ap.add_argument("--tmp", default=None, help="base dir for data (default /dev/shm if big enough, else /tmp)")
    ap.add_argument("--scriptsftp-cmd", default=os.environ.get("SCRIPTSFTP_CMD"),
                    help="command that accepts `run -c CFG` (default .venv/bin/scriptsftp)")
    ap.add_argument("--start-timeout", type=float, default=60)
    ap.add_argument("--openssh-sftp", choices=("sftp-server", "internal-sftp"), default="sftp-server",
                    help="OpenSSH SFTP subsystem (default: the classic sftp-server binary)")
    ap.add_argument("--no-json", action="store_true", help="do not write bench/out/*.jsonl")
    args = ap.parse_args(argv)

    wanted = [x.strip() for x in args.only.split(",") if x.strip()]
    tests = [x.strip() for x in args.tests.split(",") if x.strip()]
    for x in wanted:
        if x not in ALL_TARGETS:
            ap.error(f"--only: unknown server {x!r}")
    for x in tests:
        if x not in ALL_TESTS:
            ap.error(f"--tests: unknown test {x!r}")

    # Ctrl-C / SIGTERM / SIGHUP: unwind through the finally blocks below
    def _sig(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _sig)
    signal.signal(signal.SIGHUP, _sig)

    openssh.ensure_tools()

    size = args.size_mb * MiB
    need = size * (2 + 2 * len(wanted)) + args.par_mb * MiB * (1 + 2 * args.par_n + len(wanted)) + 64 * MiB
    if args.tmp:
        tmp_root = args.tmp
    else:
        shm_ok = os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > need * 1.2
        tmp_root = "/dev/shm" if shm_ok else tempfile.gettempdir()
    base = Path(tempfile.mkdtemp(prefix="scriptsftp-bench-", dir=tmp_root))
    started: list[Target] = []

    def cleanup():
        _kill_clients()
        for t in started:
            if t.stop:
                try:
                    t.stop()
                except Exception as e:
                    print(f"[bench] stopping {t.name}: {e}", file=sys.stderr)
                t.stop = None
        shutil.rmtree(base, ignore_errors=True)
    atexit.register(cleanup)

    try:
        return _run(args, wanted, tests, base, tmp_root, started)
    except KeyboardInterrupt:
        print("\n[bench] interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        cleanup()


def _run(args, wanted, tests, base: Path, tmp_root: str, started: list[Target]) -> int:
    date = dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")
    args.load_start = load()
    args.rev = git_rev()
    args.data_on = f"tmpfs ({tmp_root})" if tmp_root == "/dev/shm" else tmp_root
    print(f"[bench] data under {base} ({args.data_on})")
    key = base / "client_ed25519"
    pubkey = openssh.keygen_ed25519(key, "bench")
    cl = Clients(key, args.timeout)

    # fixtures
    (base / "client").mkdir()
    dl = base / "client" / "dl"
    dl.mkdir()
    t0 = time.perf_counter()
    src = base / "client" / "src.bin"
    par = base / "client" / "par.bin"
    fx = Fixture(src, make_random(src, args.size_mb * MiB), par, make_random(par, args.par_mb * MiB), dl)
    print(f"[bench] random fixtures {args.size_mb} MiB + {args.par_mb} MiB in {time.perf_counter() - t0:.1f}s")

    # servers
    targets: dict[str, Target] = {}
    unavailable: dict[str, str] = {}
    for name in wanted:
        try:
            if name == "openssh":
                t = start_openssh(base, pubkey, args.openssh_sftp)
            elif name == "bare":
                t = start_daemon("bare", [sys.executable, str(HERE / "bare_paramiko_server.py"), "run"],
                                 base, pubkey, args.start_timeout)
                t.info["server"] = f"bare_paramiko_server.py (paramiko {paramiko.__version__})"
            else:
                argv = scriptsftp_argv(args.scriptsftp_cmd)
                t = start_daemon("scriptsftp", argv, base, pubkey, args.start_timeout)
                t.info["server"] = f"{' '.join(argv)} (installed copy; repo HEAD {args.rev})"
            started.append(t)
            t.info["cpu_acct"] = f"cgroup {t.cpu.kind}" if t.cpu and t.cpu.path else "/proc (approx.)"
            t.info["fresh"] = memory(t.pid)
            prepare_target(t, fx)
            t.info["negotiated"] = negotiated(t, cl, base)
            targets[name] = t
            print(f"[bench] {t.label}: port {t.port}, pid {t.pid}; " + cipher_summary(t.info["negotiated"]))
        except Exception as e:
            unavailable[name] = str(e)
            print(f"[bench] {LABEL[name]}: not available ({e})")

    results: dict[tuple[str, str], Result] = {}

    def res(tn, test, unit) -> Result:
        return results.setdefault((tn, test), Result(tn, test, unit))

    # transfers: interleave servers inside each run so drift hits all alike
    transfer = [x for x in TRANSFER_TESTS if x[1] in tests]
    for run in range(args.runs if transfer else 0):
        for test, _grp, client, direction, is_par in transfer:
            for tn, t in targets.items():
                r = res(tn, test, "MB/s")
                if r.error:
                    continue
                try:
                    if is_par:
                        (secs, nbytes), cpu = measure_cpu(t, lambda: parallel(
                            t, cl, fx, client, direction, args.par_n, run == 0, base))
                    else:
                        (secs, nbytes), cpu = measure_cpu(t, lambda: single(
                            t, cl, fx, client, direction, run == 0, base))
                except Exception as e:
                    r.error = str(e)
                    print(f"  run {run + 1} {test:14s} {t.label:14s} FAILED: {e}")
                    continue
                r.samples.append(mbps(nbytes, secs))
                r.cpu.append(cpu)
                r.nbytes = nbytes
                print(f"  run {run + 1} {test:14s} {t.label:14s} {mbps(nbytes, secs):8.1f} MB/s"
                      f"  ({secs:.2f}s, server CPU {cpu:.2f}s)", flush=True)

    if "latency" in tests:
        for tn, t in targets.items():
            for test, fn in (("lat_sftp_ls", lambda: latency_sftp(t, cl, args.latency_n, base)),
                             ("lat_paramiko_ls", lambda: latency_paramiko(t, cl, args.latency_n))):
                r = res(tn, test, "ms")
                try:
                    r.samples = fn()
                    print(f"  {test:20s} {t.label:14s} median {r.value:7.1f} ms"
                          f"  (min {min(r.samples):.1f}, max {max(r.samples):.1f})", flush=True)
                except Exception as e:
                    r.error = str(e)
                    print(f"  {test:20s} {t.label:14s} FAILED: {e}")

    if "memory" in tests:
        for tn, t in targets.items():
            try:
                m = memory_sessions(t, cl, args.sessions, settle=1.0)
            except Exception as e:
                for test in ("mem_fresh", "mem_idle", "mem_fresh_pss", "mem_idle_pss", "mem_sessions", "mem_delta",
                             "mem_per_session"):
                    res(tn, test, "MiB").error = str(e)
                print(f"  memory {t.label}: FAILED: {e}")
                continue
            fresh = t.info["fresh"]
            res(tn, "mem_fresh", "MiB").samples = [fresh["tree_rss_mib"]]
            res(tn, "mem_idle", "MiB").samples = [m["idle"]["tree_rss_mib"]]
            # several processes count their shared code once each in RSS; PSS shares it out
            res(tn, "mem_fresh_pss", "MiB").samples = [fresh["tree_pss_mib"]]
            res(tn, "mem_idle_pss", "MiB").samples = [m["idle"]["tree_pss_mib"]]
            res(tn, "mem_sessions", "MiB").samples = [m["with_sessions"]["tree_rss_mib"]]
            res(tn, "mem_delta", "MiB").samples = [m["delta_rss_mib"]]
            res(tn, "mem_delta_pss", "MiB").samples = [m["delta_pss_mib"]]
            res(tn, "mem_per_session", "KiB").samples = [m["delta_pss_mib"] * 1024 / args.sessions]
            res(tn, "idle_cpu_sessions", "%").samples = [m["busy_idle_cpu_pct"]]
            for test in ("mem_fresh", "mem_idle", "mem_sessions", "mem_delta"):
                res(tn, test, "MiB").extra = {"fresh": fresh, **m}
            print(f"  memory {t.label:14s} fresh {fresh['tree_rss_mib']:.1f} MiB, idle "
                  f"{m['idle']['tree_rss_mib']:.1f} MiB, {args.sessions} sessions "
                  f"{m['with_sessions']['tree_rss_mib']:.1f} MiB RSS (+{m['delta_rss_mib']:.1f} RSS, "
                  f"+{m['delta_pss_mib']:.1f} PSS; {m['with_sessions']['procs']} procs, "
                  f"{m['with_sessions']['threads']} threads in main); opened in {m['open_s']:.1f}s; "
                  f"server CPU idle with sessions {m['busy_idle_cpu_pct']:.1f}%", flush=True)

    print_table(args, targets, unavailable, results)
    if not args.no_json:
        write_json(args, date, base, targets, unavailable, results)
    return 0 if targets else 1


# --------------------------------------------------------------------------- reporting


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def git_rev() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def cipher_summary(neg: dict) -> str:
    parts = []
    for c in ("sftp", "curl", "paramiko"):
        v = neg.get(c, {})
        parts.append(f"{c}: {openssh.describe(v) if 'cipher_c2s' in v else v.get('error', '?')}")
    return "; ".join(parts)


ROWS = [
    ("sftp_up", f"sftp put {{size}} MiB", "MB/s", True),
    ("sftp_down", f"sftp get {{size}} MiB", "MB/s", True),
    ("curl_up", f"curl upload {{size}} MiB", "MB/s", True),
    ("curl_down", f"curl download {{size}} MiB", "MB/s", True),
    ("par_sftp_up", "sftp {n}x{pm} MiB up", "MB/s", True),
    ("par_sftp_down", "sftp {n}x{pm} MiB down", "MB/s", True),
    ("par_curl_up", "curl {n}x{pm} MiB up", "MB/s", True),
    ("par_curl_down", "curl {n}x{pm} MiB down", "MB/s", True),
    ("lat_sftp_ls", "sftp -b ls session", "ms", False),
    ("lat_paramiko_ls", "paramiko conn+auth+ls", "ms", False),
    ("mem_fresh", "RSS fresh", "MiB", False),
    ("mem_idle", "RSS idle after tests", "MiB", False),
    ("mem_fresh_pss", "PSS fresh", "MiB", False),
    ("mem_idle_pss", "PSS idle after tests", "MiB", False),
    ("mem_sessions", "RSS {s} sessions", "MiB", False),
    ("mem_delta", "RSS delta {s} sessions", "MiB", False),
    ("mem_delta_pss", "PSS delta {s} sessions", "MiB", False),
    ("mem_per_session", "PSS per session", "KiB", False),
    ("idle_cpu_sessions", "CPU, {s} idle sessions", "%", False),
]


def print_table(args, targets, unavailable, results) -> None:
    names = [n for n in ALL_TARGETS if n in targets]
    fmt_kw = dict(size=args.size_mb, n=args.par_n, pm=args.par_mb, s=args.sessions)
    ratios = [(n, "openssh") for n in ("scriptsftp", "bare") if n in names and "openssh" in names]
    head = ["test", "unit"] + [LABEL[n] for n in names] + [f"{LABEL[a]}/OpenSSH" for a, _ in ratios]
    rows = []
    for test, title, unit, _hib in ROWS:
        if not any((n, test) in results for n in names):
            continue
        row = [title.format(**fmt_kw), unit]
        for n in names:
            r = results.get((n, test))
            row.append("-" if r is None else ("FAIL" if r.error else fmt(r.value)))
        for a, b in ratios:
            ra, rb = results.get((a, test)), results.get((b, test))
            if ra and rb and ra.value and rb.value and not ra.error and not rb.error:
                row.append(f"{ra.value / rb.value:.2f}")
            else:
                row.append("-")
        rows.append(row)
    # CPU per GiB for transfers
    cpu_rows = []
    for test, title, unit, _ in ROWS[:8]:
        row = [title.format(**fmt_kw), "cpu-s/GiB"]
        have = False
        for n in names:
            r = results.get((n, test))
            if r and r.cpu and not r.error:
                row.append(f"{statistics.median(r.cpu) / (r.nbytes / 2**30):.2f}")
                have = True
            else:
                row.append("-")
        row += ["" for _ in ratios]
        if have:
            cpu_rows.append(row)

    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, *cpu_rows)] if rows else []
    print()
    print(f"SFTP benchmark: median of {args.runs} runs (transfers), {args.latency_n} sessions (latency); "
          "MB = 10^6 B; 127.0.0.1; data on " + args.data_on)
    print(f"  load average at start {args.load_start}, at end {load()} (other work on the machine skews figures)")
    for n in names:
        t = targets[n]
        print(f"  {t.label}: {t.info.get('server', '')}; CPU via {t.info.get('cpu_acct')}")
        print(f"    negotiated: {cipher_summary(t.info.get('negotiated', {}))}")
    for n, why in unavailable.items():
        print(f"  {LABEL[n]}: not available ({why})")
    if not rows:
        return
    line = lambda r: "  ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
    print()
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    if ratios:
        print("(ratio > 1: the Python server's figure is higher; better for MB/s, worse for ms, MiB, %)")
    if cpu_rows:
        print()
        print("server CPU per GiB moved (all server processes; lower is better):")
        for r in cpu_rows:
            print(line(r))
    errs = [(k, r.error) for k, r in results.items() if r.error]
    if errs:
        print()
        for (n, test), e in errs:
            print(f"  FAIL {LABEL[n]} {test}: {e}")


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def write_json(args, date, base, targets, unavailable, results) -> None:
    OUT_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = OUT_DIR / f"sftp-{stamp}.jsonl"
    host = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "cpu": _cpu_model(), "paramiko": paramiko.__version__, "openssh": openssh.openssh_version(),
            "curl": _curl_version(), "tmp": str(base.parent),
            "load_start": args.load_start, "load_end": load()}
    common = {"date": date, "bench": "sftp", "git": args.rev, "runs": args.runs, "size_mb": args.size_mb,
              "par_n": args.par_n, "par_mb": args.par_mb, "host": host}
    with open(path, "w") as f:
        for (n, test), r in results.items():
            t = targets[n]
            client = "curl" if "curl" in test else "paramiko" if "paramiko" in test or test.startswith(("mem", "idle")) else "sftp"
            rec = {**common, "server": n, "server_desc": t.info.get("server"),
                   "cpu_acct": t.info.get("cpu_acct"), "test": test, "unit": r.unit,
                   "value": r.value, "samples": r.samples, "client": client,
                   "negotiated": t.info.get("negotiated", {}).get(client)}
            if r.cpu:
                rec["server_cpu_s"] = r.cpu
                rec["bytes"] = r.nbytes
            if r.error:
                rec["error"] = r.error
            if r.extra:
                rec["detail"] = r.extra
            f.write(json.dumps(rec) + "\n")
        for n, why in unavailable.items():
            f.write(json.dumps({**common, "server": n, "test": "start", "error": why}) + "\n")
    print(f"\n[bench] wrote {path.relative_to(REPO)}")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _curl_version() -> str:
    r = subprocess.run(["curl", "-V"], capture_output=True, text=True)
    return r.stdout.splitlines()[0] if r.stdout else "?"


if __name__ == "__main__":
    sys.exit(main())
