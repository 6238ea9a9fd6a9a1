"""``scriptsftp script test``: run one script against a synthetic event, offline.

The script runs in the same sandboxed worker as in production, with a
throwaway state directory, so a sysadmin can see the decision and log lines
before deploying — without a server and without touching its state.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scriptsftp.server.contract import events as ev
from scriptsftp.server.contract.state import StateStoreFactory

from .registry import read_script
from .workers import CallRequest, CallResult, WorkerPool


@dataclass
class TestRun:
    event: dict[str, Any]
    result: CallResult
    store: dict[str, Any]


def build_event(name: str, **given: Any) -> ev.Event:
    """An event of kind ``name`` with the given fields (unknown fields are an error)."""
    cls = ev.EVENT_TYPES.get(name)
    if cls is None:
        raise ValueError(f"unknown event {name!r} (see `scriptsftp events`)")
    known = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in given.items() if v is not None}
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"event {name!r} has no field(s) {', '.join(sorted(unknown))}")
    fields.setdefault("session_id", "test")
    return cls(**fields)


def run_script(
    script: Path, event: ev.Event, *, function: str | None = None, capabilities: frozenset[str],
    file: Path | None = None, timeout: float = 5.0, cpu_time: float = 2.0, memory_mb: int = 256,
    state_dir: Path | None = None, stores: StateStoreFactory | None = None,
) -> TestRun:
    """Run ``script`` once on ``event`` in a throwaway pool; ``stores`` holds its ``api.store``
    (the caller's throwaway one: without it, ``api.store`` is not available)."""
    source = read_script(script, script.name)
    handler = function or "on_" + event.name.replace("-", "_")
    with tempfile.TemporaryDirectory(prefix="scriptsftp-test-") as tmp:
        pool = WorkerPool(1, memory_mb=memory_mb, state_dir=state_dir or Path(tmp), stores=stores)
        pool.start()
        try:
            compiled = pool.compile(source)
            if not compiled.ok:
                return TestRun(event.to_dict(), CallResult(
                    verdict="error", reason="; ".join(compiled.errors), logs=[], error_kind="compile",
                    error_line=None, duration=0.0), {})
            opener = (lambda: os.open(file, os.O_RDONLY)) if file is not None else None
            result = pool.call(CallRequest(
                script=source, function=handler, event=event.to_dict(), capabilities=capabilities,
                timeout=timeout, cpu_time=cpu_time, file=opener,
            ))
            store = {}
            if pool.store is not None:
                store = {k: pool.store.get(source.name, k)[1] for k in pool.store.keys(source.name)}
        finally:
            pool.close()
    return TestRun(event.to_dict(), result, store)
