#!/usr/bin/env python3
"""Login time with 10 and with 10,000 users in the account database, SQLite and PostgreSQL.

    .venv/bin/python bench/login_accounts_bench.py [--logins 400] [--users 10,10000]
                                                   [--engines sqlite,postgresql] [--lookups 2000]

``--engines`` also takes ``cluster``: the accounts *and* the state stores ``[cluster]
database`` shares (the defender, the audit trail, the script store, the node registry) in one
PostgreSQL database, as a node of a cluster runs: ``--engines sqlite,cluster`` is issue 19's
login latency with PostgreSQL vs SQLite state. The report then adds each engine's p50 and p99
over SQLite's, measured in the same run.

Issue 18's bar: p99 login time with 10,000 users within 10% of 10 users (an account lookup
is one primary-key read, never a scan). For every engine x population it fills a fresh
account database (``AccountDb.import_``: one transaction) and starts a real `scriptsftp run`
on it (127.0.0.1 only, no ``[[users]]`` in the file: every account comes from the database;
PostgreSQL: a throwaway cluster from tests/pgkit.py, one database per daemon). All the daemons
run at once and the logins go round-robin over them in a shuffled order each round, so load
from elsewhere on the machine hits every column alike.

A login is one paramiko client: TCP connect, key exchange, authentication, close; measured
sequentially (latency, not throughput), as ``key`` (ed25519 publickey) and as ``password``
with ``[server] password_cache`` on: each sampled user logs in once before the clock runs, so
the timed logins take the cache's path and argon2 (~0.15 s of CPU each) does not drown the
lookup. The users logged in as are ``--sample`` (10) names spread over the whole population
(the first, the last, and evenly between), the same count in every column.

It also times ``AccountDb.get_user`` itself in-process (``--lookups`` calls over random
names of the population, interleaved with the logins likewise), the part of a login that
depends on the population at all.

Reported: p50/p99/mean per column and auth kind, the ratio p99(largest)/p99(smallest) per
engine and kind, get_user p50/p99 in microseconds. Appends one JSON line to
bench/out/login_accounts.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve() and VENV_PY.exists():
    os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])  # scriptsftp and paramiko live in the venv

import paramiko  # noqa: E402

PASSWORD = "bench-Secret-1"
sys.path.insert(0, str(ROOT / "tests"))
from pgkit import PgCluster, sweep_leftovers  # noqa: E402  (the tests' throwaway cluster: a temp dir, a free port)
from daemon_proc import start_daemon, stop_daemon  # noqa: E402  (bench/daemon_proc.py)


@dataclass
class SampleUser:
    name: str
    key: paramiko.PKey


@dataclass
class Column:
    """One daemon on one account database."""

    engine: str
    users: int
    root: Path
    dsn: str = ""
    sample: list[SampleUser] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    lines: list[str] = field(default_factory=list)
    times: dict[str, list[float]] = field(default_factory=lambda: {"key": [], "password": []})
    failures: dict[str, int] = field(default_factory=dict)
    lookup_us: list[float] = field(default_factory=list)
    db: Any = None  # the bench's own AccountDb on the column's database (get_user timings)
    names: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.engine} {self.users}"

    def write_config(self, args: argparse.Namespace) -> Path:
        cfg = self.root / "scriptsftp.toml"
        cfg.write_text(f"""
[server]
state_dir = "state"
allow_root = true
log_level = "info"
password_cache = 3600

[sftp]
listen = "127.0.0.1:0"
processes = {args.sftp_processes}

[accounts]
database = {json.dumps(self.dsn)}
""" + (f"""
[cluster]
node = "bench"
database = {json.dumps(self.dsn)}
""" if self.engine == "cluster" else ""))
        return cfg

    def start(self, cfg: Path) -> None:
        self.proc, self.port = start_daemon(cfg, self.root, self.label, self.lines)

    def stop(self) -> None:
        stop_daemon(self.proc)


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread over 0..n-1: the first, the last and evenly between."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def populate(col: Column, args: argparse.Namespace, password_hash: str) -> None:
    """A fresh database holding ``col.users`` users; keeps the sampled ones' private keys."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from scriptsftp.server.stores.accounts_db import AccountDb
    from scriptsftp.server.support.config import load_config

    sampled = set(sample_indices(col.users, args.sample))
    users: list[dict[str, Any]] = []
    for i in range(col.users):
        name = f"user{i:05d}"
        private = Ed25519PrivateKey.generate()
        public_line = private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + f" {name}"
        users.append({"name": name, "home": f"homes/{name}", "password_hash": password_hash,
                      "public_keys": [public_line], "permissions": {"/": ["*"]}})
        if i in sampled:
            (col.root / "homes" / name).mkdir(parents=True, exist_ok=True)
            col.sample.append(SampleUser(name, _paramiko_ed25519(private)))
    cfg = col.write_config(args)
    col.db = AccountDb.open(load_config(cfg))
    t0 = time.monotonic()
    col.db.import_({"format": "scriptsftp-accounts", "version": 1, "users": users, "groups": [], "folders": []},
                   actor="import")
    print(f"  {col.label}: {col.users} users imported in {time.monotonic() - t0:.1f} s", flush=True)
    col.names = [u["name"] for u in users]


def one_lookup(col: Column) -> None:
    """One AccountDb.get_user of a random name of the column's population, in-process."""
    assert col.db is not None
    name = random.choice(col.names)
    t = time.perf_counter()
    found = col.db.get_user(name)
    col.lookup_us.append((time.perf_counter() - t) * 1e6)
    assert found is not None, name


def _paramiko_ed25519(private: Any) -> paramiko.PKey:
    """paramiko reads ed25519 only from the OpenSSH private key format."""
    import io

    from cryptography.hazmat.primitives import serialization

    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem))


def one_login(col: Column, user: SampleUser, kind: str) -> float | None:
    """Seconds from connect to the server's answer to authentication; None if it failed."""
    start = time.perf_counter()
    transport = None
    try:
        transport = paramiko.Transport(("127.0.0.1", col.port))
        transport.start_client(timeout=30)
        if kind == "key":
            transport.auth_publickey(user.name, user.key)
        else:
            transport.auth_password(user.name, PASSWORD)
        return time.perf_counter() - start
    except (paramiko.SSHException, EOFError, OSError) as exc:
        what = f"{kind}: {type(exc).__name__}: {exc}"[:120]
        col.failures[what] = col.failures.get(what, 0) + 1
        return None
    finally:
        if transport is not None:
            transport.close()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from scriptsftp.server.core.passwords import hash_password

    password_hash = hash_password(PASSWORD)
    populations = sorted(int(n) for n in args.users.split(","))
    engines = args.engines.split(",")
    on_postgresql = "postgresql" in engines or "cluster" in engines
    if on_postgresql:
        sweep_leftovers()  # clusters of killed runs (this bench's or the tests')
    cluster = PgCluster.start() if on_postgresql else None
    columns: list[Column] = []
    with tempfile.TemporaryDirectory(prefix="login-accounts-") as tmp:
        try:
            for engine in engines:
                for n in populations:
                    col = Column(engine, n, Path(tmp) / f"{engine}-{n}")
                    col.root.mkdir()
                    if engine in ("postgresql", "cluster"):
                        assert cluster is not None
                        col.dsn = cluster.new_database("bench")
                    populate(col, args, password_hash)
                    columns.append(col)
            for col in columns:
                col.start(col.root / "scriptsftp.toml")
            # warm up: every sampled user once per kind (the password cache fills), not timed
            for col in columns:
                for user in col.sample:
                    for kind in ("key", "password"):
                        if one_login(col, user, kind) is None:
                            raise SystemExit(f"{col.label}: warm-up login of {user.name} by {kind} failed: "
                                             f"{col.failures}\n" + "".join(col.lines[-20:]))
            lookups_per_round = max(1, args.lookups // args.logins)
            t0 = time.monotonic()
            for r in range(args.logins):
                order = [(col, kind) for col in columns for kind in ("key", "password")]
                random.shuffle(order)
                for col, kind in order:
                    elapsed = one_login(col, col.sample[r % len(col.sample)], kind)
                    if elapsed is not None:
                        col.times[kind].append(elapsed)
                for col in random.sample(columns, len(columns)):
                    for _ in range(lookups_per_round):
                        one_lookup(col)
                if (r + 1) % max(1, args.logins // 10) == 0:
                    print(f"  round {r + 1}/{args.logins} ({time.monotonic() - t0:.0f} s)", flush=True)
        finally:
            for col in columns:
                col.stop()
                if col.db is not None:
                    col.db.close()
            if cluster is not None:
                cluster.stop()
    return report(columns, populations)


def report(columns: list[Column], populations: list[int]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    print(f"\n{'column':<18}{'auth':<10}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}"
          f"{'get_user p50 us':>17}{'p99 us':>9}")
    for col in columns:
        for kind, times in col.times.items():
            row = {"engine": col.engine, "users": col.users, "auth": kind, "logins": len(times),
                   "p50_ms": round(percentile(times, 50) * 1e3, 2), "p99_ms": round(percentile(times, 99) * 1e3, 2),
                   "mean_ms": round(statistics.fmean(times) * 1e3, 2) if times else None,
                   "get_user_p50_us": round(percentile(col.lookup_us, 50), 1),
                   "get_user_p99_us": round(percentile(col.lookup_us, 99), 1),
                   "failures": col.failures}
            rows.append(row)
            print(f"{col.label:<18}{kind:<10}{row['logins']:>6}{row['p50_ms']:>9}{row['p99_ms']:>9}"
                  f"{row['mean_ms']:>9}{row['get_user_p50_us']:>17}{row['get_user_p99_us']:>9}")
            if col.failures:
                print(f"    failures: {col.failures}")
    ratios: dict[str, float] = {}
    small, large = populations[0], populations[-1]
    for engine in dict.fromkeys(c.engine for c in columns):
        for kind in ("key", "password"):
            p99 = {r["users"]: r["p99_ms"] for r in rows if r["engine"] == engine and r["auth"] == kind}
            ratios[f"{engine} {kind}"] = round(p99[large] / p99[small], 3)
    print(f"\np99 with {large} users / p99 with {small} users (issue 18's bar: <= 1.10)")
    for what, ratio in ratios.items():
        print(f"  {what:<22}{ratio:>7}  {'ok' if ratio <= 1.10 else 'OVER'}")
    over_sqlite: dict[str, dict[str, float]] = {}
    if "sqlite" in {c.engine for c in columns}:
        print(f"\neach engine over SQLite, {small} users (same run)")
        for engine in dict.fromkeys(c.engine for c in columns if c.engine != "sqlite"):
            for kind in ("key", "password"):
                base = next(r for r in rows if r["engine"] == "sqlite" and r["users"] == small and r["auth"] == kind)
                this = next(r for r in rows if r["engine"] == engine and r["users"] == small and r["auth"] == kind)
                over_sqlite[f"{engine} {kind}"] = {q: round(this[q] / base[q], 3) for q in ("p50_ms", "p99_ms")}
                print(f"  {engine + ' ' + kind:<22}p50 x{over_sqlite[f'{engine} {kind}']['p50_ms']:<7}"
                      f"p99 x{over_sqlite[f'{engine} {kind}']['p99_ms']}")
    return {"rows": rows, "p99_ratio": ratios, "over_sqlite": over_sqlite}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logins", type=int, default=400, help="timed logins per column and auth kind")
    ap.add_argument("--users", default="10,10000", help="populations to compare, comma-separated")
    ap.add_argument("--engines", default="sqlite,postgresql",
                    help="sqlite, postgresql (accounts only), cluster (accounts and [cluster] database)")
    ap.add_argument("--sample", type=int, default=10, help="distinct users logged in as, per column")
    ap.add_argument("--lookups", type=int, default=2000, help="in-process AccountDb.get_user calls timed per column")
    ap.add_argument("--sftp-processes", type=int, default=1,
                    help="[sftp] processes (1: the login path without a worker hop, the least noisy)")
    args = ap.parse_args()
    result = run(args)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    with open(out / "login_accounts.jsonl", "a") as f:
        f.write(json.dumps({"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "cpus": os.cpu_count(), "args": vars(args), **result}) + "\n")


if __name__ == "__main__":
    main()
