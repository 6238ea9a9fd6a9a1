"""What sharing state through PostgreSQL costs per event: the script store and the connect gate,
SQLite in state_dir (one node) against PostgreSQL (``[cluster] database``).

    .venv/bin/python bench/cluster_state_bench.py [--dsn postgresql://…] [--calls 2000]

Without ``--dsn`` it starts a throwaway PostgreSQL cluster on loopback (tests/pgkit.py, as the
tests do) and removes it afterwards: a server on the same machine, so network latency is a
loopback round trip; add your network's round trip per statement for a remote server.

Measures, on each engine:
  * a script event with ``api.store.incr`` against the same event doing nothing, through real
    worker processes (the difference is the store's cost per event, RPC included);
  * ``ScriptStore.incr`` alone in the daemon (median, p99) and from 8 threads (calls/s);
  * the connection check (``Defender.admit`` + ``release``: what every new connection pays);
  * scoring a failed login (``Defender.record``: one transaction).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from scriptsftp.scripting.store import ScriptStore  # noqa: E402
from scriptsftp.scripting.workers import CallRequest, ScriptSource, WorkerPool  # noqa: E402
from scriptsftp.server.contract.events import PreUpload  # noqa: E402
from scriptsftp.server.ops.defender import Defender  # noqa: E402
from scriptsftp.server.stores import StateStores  # noqa: E402
from scriptsftp.server.support.config import DefenderSection  # noqa: E402

NOOP = "def on_pre_upload(event, api):\n    pass\n"
INCR = "def on_pre_upload(event, api):\n    api.store.incr('uploads')\n"


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def timed(fn: Callable[[], object], calls: int, warm: int = 100) -> tuple[float, float]:
    """(median, p99) in microseconds."""
    for _ in range(warm):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples), percentile(samples, 99)


def rate(fn: Callable[[], object], threads: int, calls: int) -> float:
    per = calls // threads
    barrier = threading.Barrier(threads + 1)

    def run() -> None:
        barrier.wait()
        for _ in range(per):
            fn()

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return per * threads / (time.perf_counter() - t0)


def bench_engine(label: str, stores: StateStores, state: Path, calls: int) -> dict[str, str]:
    out: dict[str, str] = {}
    # through worker processes: an event with api.store.incr against a no-op one
    event = PreUpload(path="/inbox/r.csv", size=1, user="alice", protocol="sftp", remote_ip="127.0.0.1",
                      session_id="s1").to_dict()
    pool = WorkerPool(2, memory_mb=256, state_dir=state, stores=stores, max_calls_per_worker=10**9)
    pool.start()
    try:
        def req(text: str, name: str, caps: frozenset[str]) -> CallRequest:
            return CallRequest(ScriptSource(name, text, hashlib.sha256(text.encode()).hexdigest()),
                               "on_pre_upload", event, caps, 5.0, 2.0)
        noop, incr = req(NOOP, "noop.py", frozenset()), req(INCR, "incr.py", frozenset({"store"}))
        n_med, n_p99 = timed(lambda: pool.call(noop), calls)
        i_med, i_p99 = timed(lambda: pool.call(incr), calls)
        out["event no-op"] = f"median {n_med:7.0f} µs  p99 {n_p99:7.0f} µs"
        out["event store.incr"] = f"median {i_med:7.0f} µs  p99 {i_p99:7.0f} µs  (+{i_med - n_med:.0f} µs per event)"
    finally:
        pool.close()
    # the store alone, in the daemon
    store = ScriptStore(stores)
    try:
        med, p99 = timed(lambda: store.incr("bench.py", "n"), calls)
        out["ScriptStore.incr"] = f"median {med:7.0f} µs  p99 {p99:7.0f} µs"
        out["ScriptStore.incr 8 threads"] = f"{rate(lambda: store.incr('bench.py', 'n'), 8, calls * 2):,.0f} calls/s"
        med, p99 = timed(lambda: store.get("bench.py", "n"), calls)
        out["ScriptStore.get"] = f"median {med:7.0f} µs  p99 {p99:7.0f} µs"
    finally:
        store.close()
    # the defender
    d = Defender(stores, DefenderSection(allow_list=[], threshold=10**9, rate_per_ip=0, max_connections_per_ip=0))
    try:
        d.record("198.51.100.1", "login_failed")  # one ban-free host with a score: a real row to look up

        def check() -> None:
            if d.admit("198.51.100.1") is None:
                d.release("198.51.100.1")

        med, p99 = timed(check, calls * 5)
        out["connection check (admit+release)"] = f"median {med:7.1f} µs  p99 {p99:7.1f} µs"
        ips = [f"198.51.{i // 250}.{i % 250 + 1}" for i in range(calls)]
        it = iter(ips * 2)
        med, p99 = timed(lambda: d.record(next(it), "login_failed"), calls, warm=0)
        out["failed login scored (record)"] = f"median {med:7.0f} µs  p99 {p99:7.0f} µs"
    finally:
        d.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", default="", help="a PostgreSQL database to use (default: a throwaway cluster)")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    cluster = None
    dsn = args.dsn
    if not dsn:
        from pgkit import PgCluster

        cluster = PgCluster.start()
        dsn = cluster.new_database("bench")
    try:
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            results["SQLite"] = bench_engine("SQLite", StateStores(Path(tmp) / "s"), Path(tmp) / "s", args.calls)
            results["PostgreSQL"] = bench_engine("PostgreSQL", StateStores(Path(tmp) / "p", database=dsn, node="bench"),
                                                 Path(tmp) / "p", args.calls)
        for engine, rows in results.items():
            print(f"== {engine}")
            for k, v in rows.items():
                print(f"  {k:34s} {v}")
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
