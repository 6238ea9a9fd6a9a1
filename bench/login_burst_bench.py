#!/usr/bin/env python3
"""A burst of concurrent password logins for one user: how many fail, how long they take.

    .venv/bin/python bench/login_burst_bench.py [--logins 200] [--processes 1] [--rounds 1]
                                                [--sftp-processes auto] [--password-cache 60]

Starts a fresh `scriptsftp run` (127.0.0.1 only, `[sftp] login_grace` 30 s, defender
defaults: 127.0.0.1 is allow-listed, so neither the per-address cap nor the rate limit
applies) with one user `bench` whose password is an argon2id hash. Then --logins
paramiko clients (threads; spread over --processes client processes when one client
process's GIL is the bottleneck) connect at once, each through the key exchange and
`auth_password`, and close. A login counts from its thread's start (all threads wait
on one barrier) to the answer.

Why: each argon2 verification costs ~0.15 s of CPU and 64 MiB and at most a few run at
once, so a burst whose every login ran argon2 queued for tens of seconds and missed the
30 s login grace. With the password cache and single flight (server/core/passwords.py) one
verification serves the whole burst.

Reported: failures (by kind), p50/p90/p99/max login time, wall time of the burst,
server CPU seconds (from /proc, the daemon and its SSH workers) and the daemon's
ERROR/WARNING lines. Appends one JSON line to bench/out/login_burst.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paramiko

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).with_name("scriptsftp")
PASSWORD = "bench-Secret-1"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defender_bench import Server as DefenderBenchServer  # noqa: E402  (one way to start and watch a daemon)


def write_config(tmp: Path, args: argparse.Namespace) -> Path:
    from scriptsftp.server.core.passwords import hash_password

    (tmp / "home").mkdir(parents=True, exist_ok=True)
    cfg = tmp / "scriptsftp.toml"
    cfg.write_text(f"""
[server]
state_dir = "state"
allow_root = true
log_level = "info"
password_cache = {args.password_cache}

[sftp]
listen = "127.0.0.1:0"
processes = {json.dumps(args.sftp_processes) if args.sftp_processes == "auto" else int(args.sftp_processes)}

[[users]]
name = "bench"
password_hash = "{hash_password(PASSWORD)}"
home = "home"
permissions = {{ "/" = ["*"] }}
""")
    return cfg


class Server(DefenderBenchServer):
    """defender_bench's daemon (its port and what it logged), counting the SSH workers' CPU too."""

    def cpu_seconds(self) -> float:
        """The daemon's CPU plus its SSH worker processes' (children of it)."""
        return sum(_cpu(pid) for pid in [self.proc.pid, *_children(self.proc.pid)])


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_login(port: int, barrier: threading.Barrier, out: list) -> None:
    """Wait for the others, then connect, authenticate by password, close."""
    barrier.wait()
    start = time.monotonic()
    t = None
    try:
        t = paramiko.Transport(("127.0.0.1", port))
        t.banner_timeout = t.auth_timeout = 120
        t.start_client(timeout=120)
        t.auth_password("bench", PASSWORD)
        out.append(("ok", time.monotonic() - start))
    except paramiko.AuthenticationException:
        out.append(("auth-failed", time.monotonic() - start))
    except (paramiko.SSHException, EOFError, OSError) as exc:
        out.append((f"error: {type(exc).__name__}: {exc}"[:120], time.monotonic() - start))
    finally:
        if t is not None:
            t.close()


def client_process(port: int, n: int, start_at: float, q: mp.Queue) -> None:
    """``n`` concurrent logins from this process, started together at ``start_at``."""
    out: list = []
    barrier = threading.Barrier(n, action=lambda: time.sleep(max(0.0, start_at - time.time())))
    threads = [threading.Thread(target=one_login, args=(port, barrier, out)) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    q.put(out)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def burst(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="loginburst-") as tmp:
        server = Server(write_config(Path(tmp), args))
        try:
            q: mp.Queue = mp.Queue()
            shares = [args.logins // args.processes + (i < args.logins % args.processes)
                      for i in range(args.processes)]
            start_at = time.time() + 1.0 + 0.2 * args.processes  # every client process ready by then
            procs = [mp.Process(target=client_process, args=(server.port, n, start_at, q)) for n in shares if n]
            for p in procs:
                p.start()
            cpu0 = server.cpu_seconds()
            results: list = []
            for _ in procs:
                results.extend(q.get(timeout=600))
            wall = max(d for _, d in results) if results else 0.0
            cpu = server.cpu_seconds() - cpu0
            for p in procs:
                p.join(30)
            time.sleep(0.5)  # let the daemon write its last lines (reporting only)
            noisy = [ln.strip() for ln in server.lines if re.search(r"\b(ERROR|WARNING)\b", ln)]
        finally:
            server.stop()
    ok = [d for kind, d in results if kind == "ok"]
    failures: dict[str, int] = {}
    for kind, _ in results:
        if kind != "ok":
            failures[kind] = failures.get(kind, 0) + 1
    return {
        "logins": args.logins, "client_processes": args.processes, "ok": len(ok),
        "failed": sum(failures.values()), "failures": failures,
        "p50_s": round(percentile(ok, 50), 2), "p90_s": round(percentile(ok, 90), 2),
        "p99_s": round(percentile(ok, 99), 2), "max_s": round(max(ok), 2) if ok else None,
        "mean_s": round(statistics.fmean(ok), 2) if ok else None,
        "wall_s": round(wall, 2), "server_cpu_s": round(cpu, 1),
        "daemon_error_warning_lines": len(noisy), "first_lines": noisy[:5],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logins", type=int, default=200)
    ap.add_argument("--processes", type=int, default=1, help="client processes the logins are spread over")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--sftp-processes", default="auto", help="[sftp] processes of the daemon")
    ap.add_argument("--password-cache", type=float, default=60.0, help="[server] password_cache")
    args = ap.parse_args()
    rows = []
    for r in range(args.rounds):
        row = burst(args)
        rows.append(row)
        print(f"round {r + 1}: {row['ok']}/{row['logins']} ok, failed {row['failed']} {row['failures'] or ''}  "
              f"p50 {row['p50_s']} s  p90 {row['p90_s']} s  p99 {row['p99_s']} s  max {row['max_s']} s  "
              f"wall {row['wall_s']} s  server CPU {row['server_cpu_s']} s  "
              f"daemon ERROR/WARNING lines {row['daemon_error_warning_lines']}", flush=True)
        for line in row["first_lines"]:
            print("   ", line[:200])
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    with open(out / "login_burst.jsonl", "a") as f:
        f.write(json.dumps({"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "cpus": os.cpu_count(), "args": vars(args), "rounds": rows}) + "\n")


if __name__ == "__main__":
    main()
