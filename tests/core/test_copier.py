"""The bounded copier (server/core/copier.py): large copies leave the request's thread.

Real files and descriptors; only the copy function is swapped for one that blocks on an
event, to hold the pool full for as long as a case needs, never for a time.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from scriptsftp.server.contract.errors import LimitExceeded
from scriptsftp.server.core.copier import Copier
from scriptsftp.server.core.storage import copy_fd

MiB = 1 << 20


def _dense(path: Path, size: int) -> int:
    """A file of real data (no holes), opened for reading."""
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    return os.open(path, os.O_RDONLY)


def _target(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)


class Held:
    """A copy function that records its thread and waits until released."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.release = threading.Event()
        self.threads: list[str] = []
        self.stopped: list[bool] = []

    def __call__(self, src: int, dst: int, *, deadline: float | None = None,
                 stop: threading.Event | None = None) -> None:
        self.threads.append(threading.current_thread().name)
        self.started.release()
        while not self.release.wait(0.01):
            if stop is not None and stop.is_set():
                self.stopped.append(True)
                raise TimeoutError("stopped")
        copy_fd(src, dst, deadline=deadline, stop=stop)


def test_a_large_copy_runs_on_a_copier_thread_and_is_exact(tmp_path: Path) -> None:
    src = _dense(tmp_path / "big", 12 * MiB)
    dst = _target(tmp_path / "copy")
    seen: list[str] = []

    def recording(s: int, d: int, *, deadline: float | None = None, stop: threading.Event | None = None) -> None:
        seen.append(threading.current_thread().name)
        copy_fd(s, d, deadline=deadline, stop=stop)

    c = Copier(threads=1, waiting=0, inline_below=8 * MiB, copy=recording)
    try:
        c.copy(src, dst)
        assert seen and seen[0].startswith("copier") and seen[0] != threading.current_thread().name
        assert (tmp_path / "copy").read_bytes() == (tmp_path / "big").read_bytes()
        assert c.handed_off == 1
        # the copier closed its own descriptors, not ours: both still usable
        os.fstat(src), os.fstat(dst)
    finally:
        os.close(src), os.close(dst)


def test_a_small_copy_stays_inline(tmp_path: Path) -> None:
    src = _dense(tmp_path / "small", 1 * MiB)
    dst = _target(tmp_path / "copy")
    held = Held()
    held.release.set()
    c = Copier(threads=1, waiting=0, inline_below=8 * MiB, copy=held)
    try:
        c.copy(src, dst)
        assert held.threads == [threading.current_thread().name]
        assert c.handed_off == 0
    finally:
        os.close(src), os.close(dst)


def test_a_full_copier_refuses_at_once_and_takes_copies_again_once_free(tmp_path: Path) -> None:
    src = _dense(tmp_path / "big", 2 * MiB)
    dsts = [_target(tmp_path / f"copy{i}") for i in range(4)]
    held = Held()
    c = Copier(threads=1, waiting=1, inline_below=MiB, copy=held)
    errors: list[BaseException] = []

    def run(dst: int) -> None:
        try:
            c.copy(src, dst)
        except BaseException as exc:  # noqa: BLE001  (checked below)
            errors.append(exc)

    first = threading.Thread(target=run, args=(dsts[0],))
    second = threading.Thread(target=run, args=(dsts[1],))
    try:
        first.start()
        assert held.started.acquire(timeout=30), "the first copy never started"
        second.start()  # queued behind it: the one waiting place
        deadline = time.monotonic() + 30
        while c.handed_off < 2:
            assert time.monotonic() < deadline, "the second copy was never queued"
            time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(LimitExceeded, match="busy"):
            c.copy(src, dsts[2])  # refused at once, not queued on this thread
        assert time.monotonic() - t0 < 5
        assert c.refused == 1
        held.release.set()
        first.join(30), second.join(30)
        assert not errors
        c.copy(src, dsts[3])  # the slots came back
        for i in (0, 1, 3):
            assert (tmp_path / f"copy{i}").read_bytes() == (tmp_path / "big").read_bytes()
    finally:
        held.release.set()
        first.join(30), second.join(30)
        os.close(src)
        for d in dsts:
            os.close(d)


def test_past_its_deadline_the_waiter_leaves_and_the_copy_stops(tmp_path: Path) -> None:
    src = _dense(tmp_path / "big", 2 * MiB)
    dst = _target(tmp_path / "copy")
    held = Held()
    c = Copier(threads=1, waiting=0, inline_below=MiB, copy=held)
    try:
        with pytest.raises(TimeoutError):
            c.copy(src, dst, deadline=time.monotonic() + 0.2)
        os.close(dst)  # the request discards its upload at once: the copier has its own fds
        deadline = time.monotonic() + 30
        while not held.stopped:
            assert time.monotonic() < deadline, "the abandoned copy never stopped"
            time.sleep(0.01)
        held2 = Held()
        held2.release.set()
        c._copy = held2  # the slot is free again: a new copy is taken
        dst2 = _target(tmp_path / "copy2")
        c.copy(src, dst2)
        os.close(dst2)
        assert (tmp_path / "copy2").read_bytes() == (tmp_path / "big").read_bytes()
    finally:
        held.release.set()
        os.close(src)


def test_copy_fd_stops_when_told(tmp_path: Path) -> None:
    src = _dense(tmp_path / "big", 2 * MiB)
    dst = _target(tmp_path / "copy")
    stop = threading.Event()
    stop.set()
    try:
        with pytest.raises(TimeoutError):
            copy_fd(src, dst, stop=stop)
    finally:
        os.close(src), os.close(dst)
