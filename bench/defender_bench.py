#!/usr/bin/env python3
"""Does a password-guessing burst slow down other users? With and without the defender.

    .venv/bin/python bench/defender_bench.py [--attempts 1000] [--threads 16] [--seconds 20] [--size-mb 32]
                                             [--rounds 3]

For each of three phases a fresh `scriptsftp run` is started (127.0.0.1 only):

  baseline     no attack: one paramiko client downloads a --size-mb file over and
               over for --seconds; MB/s is bytes / time.
  defender     the same download on 127.0.0.1 (allow-listed) while a separate
               attacker process, bound to 127.0.0.2, fires --attempts failed
               password logins from --threads threads ([defender] defaults).
  no-defender  the same with `[defender] enabled = false` and no rate limit or caps.

Reported per phase: download MB/s, server CPU seconds used during the window
(from /proc), attempts the attacker completed within the window and how they
ended (failed = a password was checked, refused = cut at connect), and how many
passwords the server actually verified (its "login failed" lines).
`login_failure_delay` is the default 1 s, as in production.
Phases run interleaved, --rounds times (the machine may be shared: interleaving
spreads other load over all phases); the table shows medians, and each round.
Prints a table and appends one JSON line to bench/out/defender.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).with_name("scriptsftp")
PASSWORD = "bench-Secret-1"


def write_config(tmp: Path, defender: bool, size_mb: int) -> Path:
    from scriptsftp.server.core.passwords import hash_password

    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "big.bin", "wb") as f:
        f.write(os.urandom(1 << 20) * size_mb)
    section = ('[defender]\nallow_list = ["127.0.0.1/32"]\n' if defender else
               "[defender]\nenabled = false\nrate_per_ip = 0.0\nmax_connections = 0\nmax_connections_per_ip = 0\n")
    cfg = tmp / "scriptsftp.toml"
    cfg.write_text(f"""
[server]
state_dir = "state"
allow_root = true
log_level = "info"

[sftp]
listen = "127.0.0.1:0"

{section}
[[users]]
name = "bench"
password_hash = "{hash_password(PASSWORD)}"
home = "home"
permissions = {{ "/" = ["*"] }}
""")
    return cfg


class Server:
    def __init__(self, cfg: Path) -> None:
        self.proc = subprocess.Popen([str(BIN), "run", "-c", str(cfg)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cfg.parent)
        self.lines: list[str] = []
        self.port = 0
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                m = re.search(r"listening sftp on \S+:(\d+)", line)
                if m:
                    self.port = int(m[1])
                if " ready" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60):
            raise SystemExit("scriptsftp did not start:\n" + "".join(self.lines[-30:]))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def attacker(port: int, attempts: int, threads: int, deadline: float, out: mp.Queue) -> None:
    """Separate process: failed password logins from 127.0.0.2 until done or deadline."""
    def one(_: int) -> str:
        if time.time() > deadline:
            return "not-sent"
        s = socket.socket()
        s.settimeout(30)
        try:
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", port))
            t = paramiko.Transport(s)
            t.start_client(timeout=30)
        except (paramiko.SSHException, EOFError, OSError):
            s.close()
            return "refused"
        try:
            t.auth_password("bench", "wrong-password")
            return "success?!"
        except paramiko.AuthenticationException:
            return "failed"
        except (paramiko.SSHException, EOFError, OSError):
            return "cut"
        finally:
            t.close()

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, range(attempts)))
    out.put({k: results.count(k) for k in set(results)})


def download_loop(port: int, seconds: float) -> tuple[float, int]:
    t = paramiko.Transport(("127.0.0.1", port))
    t.start_client(timeout=30)
    t.auth_password("bench", PASSWORD)
    sftp = paramiko.SFTPClient.from_transport(t)
    total = 0
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            with sftp.open("big.bin") as f:
                f.prefetch()
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    total += len(chunk)
        elapsed = time.monotonic() - start
    finally:
        t.close()
    return total / elapsed / 1e6, total


def phase(name: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="defbench-") as tmp:
        cfg = write_config(Path(tmp), defender=(name != "no-defender"), size_mb=args.size_mb)
        server = Server(cfg)
        try:
            q: mp.Queue = mp.Queue()
            proc = None
            if name != "baseline":
                proc = mp.Process(target=attacker, args=(server.port, args.attempts, args.threads,
                                                          time.time() + args.seconds, q))
                proc.start()
                time.sleep(0.5)  # let the burst begin
            cpu0 = server.cpu_seconds()
            mbps, _ = download_loop(server.port, args.seconds)
            cpu = server.cpu_seconds() - cpu0
            outcome: dict = {}
            if proc is not None:
                proc.join(120)
                if proc.is_alive():
                    proc.terminate()
                outcome = q.get(timeout=5) if not q.empty() else {}
            verified = sum(1 for line in server.lines if "login failed for 'bench'" in line)
            banned = any("banned 127.0.0.2" in line for line in server.lines)
        finally:
            server.stop()
    return {"phase": name, "download_MBps": round(mbps, 1), "server_cpu_s": round(cpu, 1),
            "attack": outcome, "passwords_verified": verified, "attacker_banned": banned}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attempts", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--size-mb", type=int, default=32)
    ap.add_argument("--phases", default="baseline,defender,no-defender")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for i in range(args.rounds):
        for p in args.phases.split(","):
            r = phase(p, args)
            r["round"] = i + 1
            rows.append(r)
            print(f"round {i + 1} {p:<12} {r['download_MBps']:>7} MB/s  server CPU {r['server_cpu_s']} s  "
                  f"verified {r['passwords_verified']}  banned {r['attacker_banned']}  {r['attack']}", flush=True)
    print(f"\nmedian of {args.rounds} rounds")
    print(f"{'phase':<12} {'MB/s':>7} {'srv CPU s':>9} {'verified':>8}")
    for p in args.phases.split(","):
        mine = [r for r in rows if r["phase"] == p]
        med = lambda k: statistics.median(r[k] for r in mine)  # noqa: E731
        print(f"{p:<12} {med('download_MBps'):>7} {med('server_cpu_s'):>9} {med('passwords_verified'):>8}")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    with open(out / "defender.jsonl", "a") as f:
        f.write(json.dumps({"time": dt.datetime.now(dt.timezone.utc).isoformat(), "cpus": os.cpu_count(),
                            "args": vars(args), "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
