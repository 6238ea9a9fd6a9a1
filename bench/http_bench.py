#!/usr/bin/env python3
"""HTTP benchmark: curl PUT and GET of one big file, and many parallel GETs, against scriptsftp.

    python bench/http_bench.py [--runs 3] [--size-mb 256] [--par-n 50] [--par-mb 16] [--tls]

Starts `scriptsftp run` on 127.0.0.1 with a generated config ([http] on port 0,
one user `bench` with a password, no scripts), data in a temp dir on /dev/shm
when it has room (the bench measures the server, not the disk), then measures:

  put       curl -T of a --size-mb file (streamed into the staged upload, published
            at the end): MB/s from curl's time_total, median of --runs
  get       curl download of the same file to /dev/null: MB/s, median of --runs
  parallel  --par-n curl processes at once, each downloading a --par-mb file over
            its own connection: aggregate MB/s = total bytes / wall time of the
            batch, and the number of failed or short transfers (must be 0)

Every transfer is checked (HTTP status, size; sha256 of the big file on the first
run). A warm-up request logs the user in first, so the argon2 password check
(~0.15 s, then remembered for [http] auth_cache seconds) is not billed to the
first run. MB = 10^6 bytes. Prints a table and appends a JSON line to bench/out/.
"""

from __future__ import annotations

import os
import sys

try:
    import aiohttp  # noqa: F401
except ImportError:  # re-exec under the project venv
    _venv_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".venv", "bin", "python")
    if os.path.exists(_venv_py) and os.path.realpath(sys.executable) != os.path.realpath(_venv_py):
        os.execv(_venv_py, [_venv_py, *sys.argv])
    raise

import argparse
import datetime as dt
import hashlib
import json
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT_DIR = HERE / "out"
SCRIPTSFTP_BIN = REPO / ".venv" / "bin" / "scriptsftp"
MiB = 1024 * 1024
PASSWORD = "bench-Password-1"


def tmp_root(size_bytes: int, choice: str | None) -> Path:
    if choice:
        return Path(choice)
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > size_bytes * 1.5:
        return shm
    return Path(tempfile.gettempdir())


def write_config(root: Path, tls: tuple[Path, Path] | None) -> Path:
    from scriptsftp.server.core.passwords import hash_password

    (root / "home").mkdir()
    (root / "scripts").mkdir()
    tls_lines = f'certificate = "{tls[0]}"\nprivate_key = "{tls[1]}"\n' if tls else ""
    cfg = root / "scriptsftp.toml"
    cfg.write_text(f"""
[server]
state_dir = "state"
log_level = "info"
allow_root = true

[sftp]
enabled = false

[http]
enabled = true
listen = "127.0.0.1:0"
{tls_lines}
[scripts]
dir = "scripts"

[[users]]
name = "bench"
password_hash = "{hash_password(PASSWORD)}"
home = "home"
permissions = {{ "/" = ["*"] }}
""")
    return cfg


class Server:
    def __init__(self, cfg: Path) -> None:
        self.proc = subprocess.Popen([str(SCRIPTSFTP_BIN), "run", "-c", str(cfg)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cfg.parent)
        self.lines: list[str] = []
        self.port = 0
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                self.lines.append(line)
                m = re.search(r"listening http on 127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                if " ready" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60) or not self.port:
            self.stop()
            raise SystemExit("scriptsftp did not start:\n" + "\n".join(self.lines[-30:]))

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def curl(url: str, *args: str, cacert: Path | None) -> tuple[int, float, int]:
    """(http status, curl time_total seconds, bytes transferred)."""
    extra = ["--cacert", str(cacert)] if cacert else []
    proc = subprocess.run(["curl", "-sS", "-u", f"bench:{PASSWORD}", *extra, "-w",
                           "%{http_code} %{time_total} %{size_download} %{size_upload}", *args, url],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return 0, 0.0, 0
    code, total, down, up = proc.stdout.split()[-4:]
    return int(code), float(total), int(float(down)) + int(float(up))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--par-n", type=int, default=50)
    ap.add_argument("--par-mb", type=int, default=16)
    ap.add_argument("--tls", action="store_true", help="serve https with a throwaway self-signed certificate")
    ap.add_argument("--tmp", help="directory for the temp data (default: /dev/shm when it has room)")
    args = ap.parse_args()
    if not shutil.which("curl"):
        raise SystemExit("curl is needed (apt-get install curl)")
    size = args.size_mb * MiB
    root = Path(tempfile.mkdtemp(prefix="http-bench-", dir=tmp_root(size * 3 + args.par_mb * MiB, args.tmp)))
    server = None
    try:
        tls = None
        if args.tls:
            cert, key = root / "cert.pem", root / "key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                            "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                            "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
            tls = (cert, key)
        server = Server(write_config(root, tls))
        scheme = "https" if tls else "http"
        base = f"{scheme}://127.0.0.1:{server.port}"
        cacert = tls[0] if tls else None
        src = root / "big.bin"
        with open(src, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(MiB))
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        code, _, _ = curl(f"{base}/", "-o", "/dev/null", cacert=cacert)  # warm-up: login once
        assert code == 200, f"warm-up failed: {code}"

        puts, gets = [], []
        for run in range(args.runs):
            code, secs, n = curl(f"{base}/big.bin", "-T", str(src), "-o", "/dev/null", cacert=cacert)
            assert code in (201, 204) and n == size, f"PUT failed: {code} {n}"
            puts.append(size / secs / 1e6)
            stored = root / "home" / "big.bin"
            assert stored.stat().st_size == size
            if run == 0:
                assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest, "uploaded bytes differ"
                out = root / "down.bin"
                code, secs, n = curl(f"{base}/big.bin", "-o", str(out), cacert=cacert)
                assert code == 200 and hashlib.sha256(out.read_bytes()).hexdigest() == digest, "download differs"
                out.unlink()
            code, secs, n = curl(f"{base}/big.bin", "-o", "/dev/null", cacert=cacert)
            assert code == 200 and n == size, f"GET failed: {code} {n}"
            gets.append(size / secs / 1e6)

        par_size = args.par_mb * MiB
        with open(root / "home" / "par.bin", "wb") as f:
            f.write(os.urandom(par_size))
        results: list[tuple[int, float, int]] = [(0, 0.0, 0)] * args.par_n
        peak_rss = [server.rss_mb()]

        def one(i: int) -> None:
            results[i] = curl(f"{base}/par.bin", "-o", "/dev/null", cacert=cacert)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.par_n)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak_rss.append(server.rss_mb())
            time.sleep(0.05)
        wall = time.monotonic() - t0
        errors = sum(1 for code, _, n in results if code != 200 or n != par_size)
        par_rate = args.par_n * par_size / wall / 1e6

        row = {
            "bench": "http", "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cpus": os.cpu_count(), "tls": bool(tls), "size_mb": args.size_mb,
            "runs": args.runs, "put_mb_s": round(statistics.median(puts), 1),
            "get_mb_s": round(statistics.median(gets), 1), "put_all": [round(x, 1) for x in puts],
            "get_all": [round(x, 1) for x in gets], "par_n": args.par_n, "par_mb": args.par_mb,
            "par_mb_s": round(par_rate, 1), "par_wall_s": round(wall, 2), "par_errors": errors,
            "server_peak_rss_mb": round(max(peak_rss), 1),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }
        print(f"scriptsftp HTTP{'S' if tls else ''} on 127.0.0.1, {os.cpu_count()} CPUs, data in {root.parent}, "
              f"load average {row['loadavg_1m']} (other work on the machine skews the figures)")
        print(f"  PUT  {args.size_mb} MiB (curl -T)       median {row['put_mb_s']:8.1f} MB/s   runs {row['put_all']}")
        print(f"  GET  {args.size_mb} MiB (curl)          median {row['get_mb_s']:8.1f} MB/s   runs {row['get_all']}")
        print(f"  GET  {args.par_n} x {args.par_mb} MiB in parallel  {par_rate:8.1f} MB/s aggregate, "
              f"{wall:.2f} s, errors: {errors}, server peak RSS {row['server_peak_rss_mb']} MB")
        OUT_DIR.mkdir(exist_ok=True)
        out = OUT_DIR / f"http-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.jsonl"
        out.write_text(json.dumps(row) + "\n")
        print(f"  -> {out.relative_to(REPO)}")
        if errors:
            raise SystemExit(1)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
