#!/usr/bin/env python3
"""FTP throughput: scriptsftp against vsftpd (the anchor) and bare pyftpdlib, in one run.

    .venv/bin/python bench/ftp_bench.py                 # 256 MiB, 3 runs, ~2 min
    .venv/bin/python bench/ftp_bench.py --size-mb 64 --runs 1

Each server gets a free loopback port and a temp data dir (on /dev/shm when it
has room: the bench measures servers, not the disk). The client is curl:
``curl -T FILE ftp://...`` for the upload, ``curl -o /dev/null ftp://...`` for
the download. Two figures, MB = 10^6 bytes, each the median of ``--runs`` runs
(servers interleaved inside each run so drift hits them alike):

- **transfer**: bytes / (``time_total`` - ``time_pretransfer``): the data
  connection's work, from the transfer command to the final reply (which, for
  scriptsftp uploads, comes after publishing);
- **session**: curl's ``%{speed_upload}``/``%{speed_download}``, bytes / the whole
  session, login included. vsftpd logs in anonymously for free here, while
  scriptsftp verifies an argon2id hash (~0.15-0.25 s of CPU on purpose), so this
  figure compares password hashing as much as FTP serving.

The bars apply to the transfer figure.

Bars (issue "FTP/FTPS and HTTP/WebDAV front ends"): scriptsftp upload at least
0.9x vsftpd's, download at least 1.0x. vsftpd is installed with apt-get when
missing and we are root. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
USER, PASSWORD = "bench", "bench-Pass-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(3) == b"220":
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never greeted")


class Server:
    name = ""
    proc: subprocess.Popen | None = None
    port = 0
    path = "/"  # where uploads go, as the FTP path prefix
    user, password = USER, PASSWORD

    def url(self, name: str) -> str:
        return f"ftp://{self.user}:{self.password}@127.0.0.1:{self.port}{self.path}{name}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Vsftpd(Server):
    """vsftpd 3 with an anonymous, writable /pub (no system user or PAM needed)."""

    name = "vsftpd"

    def __init__(self, tmp: Path) -> None:
        exe = shutil.which("vsftpd") or "/usr/sbin/vsftpd"
        if not os.path.exists(exe):
            if os.geteuid() == 0:
                subprocess.run(["apt-get", "install", "-y", "-q", "vsftpd"], check=True,
                               stdout=subprocess.DEVNULL)
            else:
                raise RuntimeError("vsftpd is not installed (apt-get install vsftpd)")
        root = tmp / "vsftpd-root"
        (root / "pub").mkdir(parents=True)
        os.chmod(root, 0o755)  # vsftpd refuses a chroot root the session can write to
        shutil.chown(root / "pub", "ftp", "ftp")
        Path("/var/run/vsftpd/empty").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = tmp / "vsftpd.conf"
        conf.write_text(f"""listen=YES
listen_ipv6=NO
listen_address=127.0.0.1
listen_port={self.port}
background=NO
anonymous_enable=YES
no_anon_password=YES
anon_root={root}
write_enable=YES
anon_upload_enable=YES
anon_other_write_enable=YES
anon_umask=022
local_enable=NO
seccomp_sandbox=NO
pasv_enable=YES
pasv_min_port={free_port()}
pasv_max_port=65000
xferlog_enable=NO
""")
        self.proc = subprocess.Popen([exe, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        self.user, self.password, self.path = "anonymous", "x", "/pub/"


class BarePyftpdlib(Server):
    """pyftpdlib's own command-line server: one async loop, sendfile, no scripts."""

    name = "bare pyftpdlib"

    def __init__(self, tmp: Path) -> None:
        d = tmp / "pyftpdlib"
        d.mkdir()
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(VENV_PY), "-m", "pyftpdlib", "-i", "127.0.0.1", "-p", str(self.port), "-w", "-d", str(d),
             "-u", USER, "-P", PASSWORD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)


class Scriptsftp(Server):
    """The real daemon, FTP front end only, no bindings."""

    name = "scriptsftp"

    def __init__(self, tmp: Path, extra: str = "") -> None:
        d = tmp / "scriptsftp"
        (d / "home").mkdir(parents=True)
        (d / "scripts").mkdir()
        pw_hash = subprocess.run([str(VENV_PY.with_name("scriptsftp")), "hash-password", "--stdin"],
                                 input=PASSWORD, capture_output=True, text=True, check=True).stdout.strip()
        cfg = d / "scriptsftp.toml"
        cfg.write_text(f"""
[server]
state_dir = "state"
log_level = "info"
allow_root = {"true" if os.geteuid() == 0 else "false"}

[sftp]
enabled = false

[ftp]
enabled = true
listen = "127.0.0.1:0"
passive_ports = ""

[scripts]
dir = "scripts"
{extra}
[[users]]
name = "{USER}"
password_hash = "{pw_hash}"
home = "home"
permissions = {{ "/" = ["*"] }}
""")
        self.log = d / "daemon.log"
        self.proc = subprocess.Popen([str(VENV_PY.with_name("scriptsftp")), "run", "-c", str(cfg)],
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = re.search(r"listening ftp on 127\.0\.0\.1:(\d+)", self.log.read_text())
            if m and "ready" in self.log.read_text():
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("scriptsftp did not start:\n" + self.log.read_text()[-2000:])


def curl_speeds(args: list[str], what: str, size: int) -> tuple[float, float]:
    """(transfer MB/s, session MB/s) of one curl run."""
    p = subprocess.run(["curl", "-sS", "--max-time", "600", "-w",
                        f"\n%{{{what}}} %{{time_pretransfer}} %{{time_total}}", *args],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"curl failed ({p.returncode}): {p.stderr.strip()}")
    speed, pre, total = (float(x) for x in p.stdout.strip().splitlines()[-1].split())
    return size / max(total - pre, 1e-6) / 1e6, speed / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tmp", default="")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare pyftpdlib column")
    args = ap.parse_args()
    if shutil.which("curl") is None:
        print("curl is needed", file=sys.stderr)
        return 2
    base = args.tmp or ("/dev/shm" if shutil.disk_usage("/dev/shm").free > 4 * args.size_mb * 2**20 else None)
    tmp = Path(tempfile.mkdtemp(prefix="ftp-bench-", dir=base))
    os.chmod(tmp, 0o755)
    payload = tmp / "payload.bin"
    with payload.open("wb") as f:
        for _ in range(args.size_mb):
            f.write(os.urandom(2**20))
    servers: list[Server] = []
    try:
        for cls in ([Vsftpd, Scriptsftp] if args.no_bare else [Vsftpd, BarePyftpdlib, Scriptsftp]):
            try:
                servers.append(cls(tmp))
            except Exception as exc:  # a missing column must not hide the others
                print(f"{cls.name}: not available ({exc})", file=sys.stderr)
        size = payload.stat().st_size
        results: dict[str, dict[str, list[float]]] = {
            s.name: {"up": [], "down": [], "up_session": [], "down_session": []} for s in servers}
        for run in range(args.runs):
            for s in servers:
                r = results[s.name]
                t, w = curl_speeds(["-T", str(payload), s.url("payload.bin")], "speed_upload", size)
                r["up"].append(t)
                r["up_session"].append(w)
                t, w = curl_speeds(["-o", "/dev/null", s.url("payload.bin")], "speed_download", size)
                r["down"].append(t)
                r["down_session"].append(w)
        load = os.getloadavg()[0]
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    print(f"\nFTP, curl, {args.size_mb} MiB, median of {args.runs} run(s), MB/s (10^6 B/s); "
          f"load average at the end: {load:.2f} on {os.cpu_count()} cores\n")
    print(f"| {'server':<16} | {'upload':>8} | {'download':>9} | {'upload (session)':>16} | {'download (session)':>18} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 11}|{'-' * 18}|{'-' * 20}|")
    for n, m in med.items():
        print(f"| {n:<16} | {m['up']:>8.0f} | {m['down']:>9.0f} | {m['up_session']:>16.0f} | "
              f"{m['down_session']:>18.0f} |")
    out = {"size_mb": args.size_mb, "runs": args.runs, "load": load, "results": results, "median": med}
    if "vsftpd" in med and "scriptsftp" in med:
        up = med["scriptsftp"]["up"] / med["vsftpd"]["up"]
        down = med["scriptsftp"]["down"] / med["vsftpd"]["down"]
        out.update(ratio_up=up, ratio_down=down)
        print(f"\nscriptsftp / vsftpd: upload {up:.2f} (bar 0.90) {'ok' if up >= 0.9 else 'BELOW'}, "
              f"download {down:.2f} (bar 1.00) {'ok' if down >= 1.0 else 'BELOW'}")
    outdir = HERE / "out"
    outdir.mkdir(exist_ok=True)
    with (outdir / f"ftp-{time.strftime('%Y%m%d-%H%M%S')}.jsonl").open("a") as f:
        f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
