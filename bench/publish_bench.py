#!/usr/bin/env python3
"""Cost of scripts on uploads: 256 MiB SFTP upload with no-op and sha256-hashing scripts vs none.

    python bench/publish_bench.py [--size-mb 256] [--runs 3]

Starts two scriptsftp daemons on 127.0.0.1 side by side (same build, same
config) that differ only in one binding:

  plain    no scripts
  noop     no-op pre-upload and post-upload scripts (issue 3 bar: >= 0.95 of plain)
  hashed   pre-publish binding (sync) whose script does api.file.hash("sha256")
           (issue 4 bar: >= 0.8 of plain)

  nofsync  no scripts, ``[uploads] fsync = false``: what durable publish costs
           (fsync of the file before the rename and of the directory after)

and uploads the same random file to each with OpenSSH `sftp -b` (put), --runs
times, alternating; then --small-files files of 64 KiB in one `sftp -b` session
to plain and nofsync, where fsync costs most. The daemons' files live under
--dir (default /var/tmp: a real disk, since fsync on tmpfs costs nothing). Upload time is client wall time, which includes the check
(in sync mode the CLOSE reply waits for it). The bar (issue 4): hashed/plain
throughput >= 0.8. MB = 10^6 bytes. Also prints the daemons' peak RSS.
"""

from __future__ import annotations

import os
import sys

try:
    import paramiko  # noqa: F401  (the venv has everything the daemon needs)
except ImportError:
    _venv_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".venv", "bin", "python")
    if os.path.exists(_venv_py) and os.path.realpath(sys.executable) != os.path.realpath(_venv_py):
        os.execv(_venv_py, [_venv_py, *sys.argv])
    raise

import argparse
import hashlib
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import openssh  # noqa: E402
from sftp_bench import scriptsftp_argv, scriptsftp_config  # noqa: E402

HASH_SCRIPT = '''
def on_pre_publish(event, api):
    api.log("sha256", digest=api.file.hash("sha256"))
'''
NOOP_SCRIPT = '''
def on_pre_upload(event, api):
    pass

def on_post_upload(event, api):
    pass
'''
NOOP_BINDINGS = '''
[[bindings]]
event = "pre-upload"
script = "noop.py"

[[bindings]]
event = "post-upload"
script = "noop.py"
'''
BINDING = '''
[[bindings]]
event = "pre-publish"
script = "hash.py"
allow = ["read"]
timeout = 300
cpu_time = 120
'''


def start(name: str, base: Path, pubkey: str, scripts_kind: str) -> tuple[subprocess.Popen, int, Path, Path]:
    root = base / name
    home, scripts, state = root / "home", root / "scripts", root / "state"
    for p in (home, scripts, state):
        p.mkdir(parents=True)
    cfg = scriptsftp_config(state, home, scripts, pubkey)
    if scripts_kind == "hashed":
        (scripts / "hash.py").write_text(HASH_SCRIPT)
        cfg += BINDING
    elif scripts_kind == "noop":
        (scripts / "noop.py").write_text(NOOP_SCRIPT)
        cfg += NOOP_BINDINGS
    elif scripts_kind == "nofsync":
        cfg += "\n[uploads]\nfsync = false\n"
    (root / "scriptsftp.toml").write_text(cfg)
    log = root / "daemon.log"
    proc = subprocess.Popen([*scriptsftp_argv(None), "-c", str(root / "scriptsftp.toml")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    m = openssh.wait_for_line(proc, log, r"listening sftp on [\d.]+:(\d+)", 30)
    openssh.wait_for_line(proc, log, r"ready", 30)
    return proc, int(m.group(1)), home, log


def upload(port: int, key: Path, src: Path, commands: str | None = None) -> float:
    argv = ["sftp", "-b", "-", "-i", str(key), "-P", str(port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
            "bench@127.0.0.1"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, input=commands or f"put {src} up.bin\n", text=True, capture_output=True,
                          timeout=600)
    secs = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"sftp failed: {proc.stderr.strip()}")
    return secs


def small_files(args: argparse.Namespace, base: Path, daemons: dict) -> None:
    """Many small uploads in one session: fsync's cost is per file, so it shows here."""
    src = base / "small"
    src.mkdir()
    for i in range(args.small_files):
        (src / f"f{i:04d}.bin").write_bytes(os.urandom(64 << 10))
    commands = "".join(f"put {src}/f{i:04d}.bin\n" for i in range(args.small_files))
    times: dict[str, list[float]] = {"plain": [], "nofsync": []}
    for _ in range(args.runs):
        for name in times:
            times[name].append(upload(daemons[name][1], base / "key", src, commands))
    per_file = {n: statistics.median(t) / args.small_files * 1000 for n, t in times.items()}
    print(f"{args.small_files} files of 64 KiB in one sftp session, median of {args.runs} runs")
    for n, ms in per_file.items():
        print(f"  {n:7s} {ms:6.2f} ms per file   runs {', '.join(f'{t:.2f}s' for t in times[n])}")
    print(f"  fsync costs {per_file['plain'] - per_file['nofsync']:.2f} ms per file")


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256, help="MiB to upload")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small-files", type=int, default=200, help="64 KiB files per small-file run")
    ap.add_argument("--dir", default="/var/tmp", help="where the daemons' homes live (a real disk)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="scriptsftp-publish-bench-", dir=args.dir))
    procs = []
    try:
        pubkey = openssh.keygen_ed25519(base / "key")
        src = base / "src.bin"
        with open(src, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        daemons = {}
        for name in ("plain", "noop", "hashed", "nofsync"):
            proc, port, home, log = start(name, base, pubkey, name)
            procs.append(proc)
            daemons[name] = (proc, port, home, log)
        times: dict[str, list[float]] = {name: [] for name in daemons}
        for _ in range(args.runs):
            for name, (_, port, home, _) in daemons.items():
                times[name].append(upload(port, base / "key", src))
                if (home / "up.bin").stat().st_size != src.stat().st_size:
                    raise RuntimeError(f"{name}: wrong size after upload")
        if digest not in daemons["hashed"][3].read_text():
            raise RuntimeError("the hashing script did not log the right sha256")
        size = args.size_mb * (1 << 20)
        rate = {n: size / statistics.median(t) / 1e6 for n, t in times.items()}
        print(f"SFTP upload, OpenSSH sftp put of {args.size_mb} MiB, median of {args.runs} runs")
        for n in daemons:
            print(f"  {n:7s} {rate[n]:8.1f} MB/s   runs {', '.join(f'{t:.2f}s' for t in times[n])}"
                  f"   daemon peak RSS {peak_rss_mb(daemons[n][0].pid):.0f} MB")
        print(f"  ratio noop/plain:   {rate['noop'] / rate['plain']:.2f} (bar: >= 0.95)")
        print(f"  ratio hashed/plain: {rate['hashed'] / rate['plain']:.2f} (bar: >= 0.80)")
        print(f"  ratio plain (fsync) / nofsync: {rate['plain'] / rate['nofsync']:.2f}")
        small_files(args, base, daemons)
        print(f"  load average: {os.getloadavg()[0]:.2f}")
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
