#!/usr/bin/env python3
"""Aggregate upload throughput of two nodes against one: N OpenSSH sftp clients at once.

    .venv/bin/python bench/cluster_throughput_bench.py [--clients 8] [--size-mb 16] [--files 2]
                                                       [--rounds 3] [--sftp-processes 1]

Two real `scriptsftp run` daemons share one PostgreSQL database (``[cluster] database``: the
defender, the audit trail, the node registry; a throwaway cluster from tests/pgkit.py) and one
data directory (every user's home is under one shared directory, as on NFS in production), each
with its own config and state_dir, as docs/cluster.md describes. Each round runs the same
``--clients`` OpenSSH ``sftp -b`` clients twice, in an order that alternates from round to
round: all on node A (``one``), then split evenly over A and B (``two``). Each client uploads
``--files`` files of ``--size-mb`` MiB (``put``), as its own user. Reported: aggregate MB/s
(bytes uploaded by all clients / wall time from the first start to the last exit) per setup and
round, and the ratio two/one of each round (the figure to read on a shared machine: both setups
of one round see the same load). Every uploaded file's size is checked afterwards.

Everything runs on this one machine: the clients' ssh processes, both daemons and PostgreSQL
share its cores, so on a small machine the ratio says how much a second node's process adds
when CPU is the bound, not what two machines would give. Appends one JSON line to
bench/out/cluster_throughput.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve() and VENV_PY.exists():
    os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])  # scriptsftp lives in the venv

sys.path.insert(0, str(ROOT / "tests"))
from daemon_proc import start_daemon, stop_daemon  # noqa: E402  (bench/daemon_proc.py)
from pgkit import PgCluster, sweep_leftovers  # noqa: E402

SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "BatchMode=yes"]


class Node:
    """One daemon: its own root (config, state_dir), the shared homes."""

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.lines: list[str] = []

    def start(self, config: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "scriptsftp.toml").write_text(config)
        self.proc, self.port = start_daemon(self.root / "scriptsftp.toml", self.root, self.name, self.lines)

    def stop(self) -> None:
        stop_daemon(self.proc)


def config(node: str, dsn: str, homes: Path, users: list[tuple[str, str]], processes: int) -> str:
    accounts = "".join(f"""
[[users]]
name = "{name}"
public_keys = ["{key}"]
home = "{homes / name}"
permissions = {{ "/" = ["*"] }}
""" for name, key in users)
    return f"""
[server]
state_dir = "state"
allow_root = true
log_level = "info"

[sftp]
listen = "127.0.0.1:0"
processes = {processes}

[cluster]
node = "{node}"
database = "{dsn}"
{accounts}"""


def run_clients(ports: list[int], keys: list[Path], users: list[str], batch: Path, timeout: float) -> float:
    """Start every client at once (client i on ports[i % len(ports)]); seconds until the last exits."""
    t0 = time.monotonic()
    procs = [subprocess.Popen(["sftp", *SSH_OPTS, "-b", str(batch), "-i", str(keys[i]), "-P",
                               str(ports[i % len(ports)]), f"{users[i]}@127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(len(users))]
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise SystemExit(f"an sftp client failed ({p.returncode}): {err.decode(errors='replace')[-500:]}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--size-mb", type=int, default=16)
    ap.add_argument("--files", type=int, default=2, help="files each client uploads per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sftp-processes", type=int, default=1, help="[sftp] processes of each node")
    args = ap.parse_args()
    if not shutil.which("sftp"):
        raise SystemExit("needs OpenSSH's sftp client")
    sweep_leftovers()
    cluster = PgCluster.start()
    nodes: list[Node] = []
    results: list[dict[str, float]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="cluster-throughput-") as tmp:
            base = Path(tmp)
            dsn = cluster.new_database("bench")
            homes = base / "shared" / "homes"
            users, keys, lines = [], [], []
            for i in range(args.clients):
                name = f"u{i:02d}"
                key = base / "keys" / name
                key.parent.mkdir(exist_ok=True)
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
                (homes / name).mkdir(parents=True)
                users.append(name)
                keys.append(key)
                lines.append((name, key.with_suffix(".pub").read_text().strip()))
            payload = base / "payload.bin"
            with open(payload, "wb") as f:
                for _ in range(args.size_mb):
                    f.write(os.urandom(1 << 20))
            batch = base / "batch"
            batch.write_text("".join(f"put {payload} /f{j}.bin\n" for j in range(args.files)))
            for name in ("node-a", "node-b"):
                node = Node(base / name, name)
                node.start(config(name, dsn, homes, lines, args.sftp_processes))
                nodes.append(node)
            a, b = nodes
            total = args.clients * args.files * args.size_mb * (1 << 20)
            timeout = 600.0
            run_clients([a.port], keys, users, batch, timeout)  # warm-up (not counted)
            print(f"{args.clients} clients x {args.files} x {args.size_mb} MiB per run; load before: "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
            for r in range(args.rounds):
                setups = [("one", [a.port]), ("two", [a.port, b.port])]
                if r % 2:
                    setups.reverse()
                row: dict[str, float] = {}
                for label, ports in setups:
                    seconds = run_clients(ports, keys, users, batch, timeout)
                    row[label] = total / seconds / 1e6
                    for name in users:
                        for j in range(args.files):
                            size = (homes / name / f"f{j}.bin").stat().st_size
                            assert size == args.size_mb << 20, (name, j, size)
                row["ratio"] = row["two"] / row["one"]
                row["load"] = os.getloadavg()[0]
                results.append(row)
                print(f"round {r + 1}: one node {row['one']:.1f} MB/s, two nodes {row['two']:.1f} MB/s, "
                      f"two/one {row['ratio']:.2f} (load {row['load']:.1f})", flush=True)
    finally:
        for node in nodes:
            node.stop()
        cluster.stop()
    med = {k: statistics.median(r[k] for r in results) for k in ("one", "two", "ratio")}
    print(f"median: one node {med['one']:.1f} MB/s, two nodes {med['two']:.1f} MB/s, two/one {med['ratio']:.2f}")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    with open(out / "cluster_throughput.jsonl", "a") as f:
        f.write(json.dumps({"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "cpus": os.cpu_count(), "args": vars(args), "rounds": results, "median": med}) + "\n")


if __name__ == "__main__":
    main()
