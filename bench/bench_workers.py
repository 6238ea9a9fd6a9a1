"""Script worker pool overhead: per-call latency and throughput.

    .venv/bin/python bench/bench_workers.py [--calls 5000] [--workers 2] [--threads 4]

Measures, through real worker processes:
  * per-call latency of a no-op handler, one caller (median, p90, p99, max);
  * the same for a typical handler (imports json/re, checks the path, logs a line);
  * a handler using the store capability (one RPC round trip + SQLite write);
  * throughput of the no-op handler from N threads through W workers.
Targets (docs/sandbox.md): no-op median < 1 ms, p99 < 5 ms; >= 2,000 calls/s
through 2 workers from 4 threads.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import threading
import time
from pathlib import Path

from scriptsftp.server.stores import StateStores
from scriptsftp.scripting.workers import CallRequest, ScriptSource, WorkerPool
from scriptsftp.server.contract.events import PreUpload

NOOP = "def on_pre_upload(event, api):\n    pass\n"
TYPICAL = """
import json, re
BLOCKED = re.compile(r'\\.(exe|bat|cmd|scr)$', re.I)
def on_pre_upload(event, api):
    if BLOCKED.search(event.path):
        api.veto('executables are not accepted')
    api.log('checked', path=event.path, user=event.user, meta=json.dumps({'size': event.size}))
"""
STORE = "def on_pre_upload(event, api):\n    api.store.incr('uploads:' + event.user)\n"


def source(text: str, name: str) -> ScriptSource:
    return ScriptSource(name, text, hashlib.sha256(text.encode()).hexdigest())


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def latency(pool: WorkerPool, req: CallRequest, calls: int) -> dict[str, float]:
    for _ in range(200):
        pool.call(req)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        result = pool.call(req)
        samples.append((time.perf_counter() - t0) * 1000)
        assert result.verdict == "allow", result
    return {"median": statistics.median(samples), "p90": percentile(samples, 90),
            "p99": percentile(samples, 99), "max": max(samples)}


def throughput(pool: WorkerPool, req: CallRequest, threads: int, calls: int) -> float:
    per_thread = calls // threads
    barrier = threading.Barrier(threads + 1)
    failures: list[object] = []

    def run() -> None:
        barrier.wait()
        for _ in range(per_thread):
            r = pool.call(req)
            if r.verdict != "allow":
                failures.append(r)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - t0
    assert not failures, failures[:3]
    return per_thread * threads / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    event = PreUpload(path="/inbox/report.csv", size=1234, user="alice", protocol="sftp",
                      remote_ip="127.0.0.1", session_id="s1").to_dict()
    with tempfile.TemporaryDirectory() as state:
        t0 = time.perf_counter()
        pool = WorkerPool(args.workers, memory_mb=256, state_dir=Path(state), stores=StateStores(Path(state)),
                          max_calls_per_worker=10**9)
        pool.start()
        print(f"start {args.workers} workers: {(time.perf_counter() - t0) * 1000:.0f} ms")
        try:
            def req(text: str, name: str, caps: frozenset[str] = frozenset()) -> CallRequest:
                return CallRequest(source(text, name), "on_pre_upload", event, caps, 5.0, 2.0)

            for label, r in (("no-op", req(NOOP, "noop.py")),
                             ("typical", req(TYPICAL, "typical.py")),
                             ("store.incr", req(STORE, "store.py", frozenset({"store"})))):
                lat = latency(pool, r, args.calls if label == "no-op" else args.calls // 5)
                print(f"latency {label:11s} median {lat['median']:.3f} ms  p90 {lat['p90']:.3f} ms  "
                      f"p99 {lat['p99']:.3f} ms  max {lat['max']:.2f} ms")
            rate = throughput(pool, req(NOOP, "noop.py"), args.threads, args.calls * 2)
            print(f"throughput no-op: {rate:,.0f} calls/s ({args.workers} workers, "
                  f"{args.threads} threads)")
            rate = throughput(pool, req(TYPICAL, "typical.py"), args.threads, args.calls)
            print(f"throughput typical: {rate:,.0f} calls/s ({args.workers} workers, "
                  f"{args.threads} threads)")
            print(f"health: {pool.health()}")
        finally:
            pool.close()


if __name__ == "__main__":
    main()
