"""Large whole-file copies through a live daemon run on the copier, and others stay served.

A WebDAV COPY and an SFTP ``r+`` reopen of a 24 MiB dense file (above the copier's
``INLINE_BELOW``, so both go through server/core/copier.py's threads), while a second
client keeps listing and reading: each of its requests is answered within a bound far
below what a stuck protocol thread would cost, both copies are byte-exact, and the log
has no traceback.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import close_client, paramiko_client
from httpkit import HTTP_EXTRA, request

MiB = 1 << 20
SIZE = 24 * MiB
ANSWER_WITHIN = 10.0  # seconds, on a shared machine at load 20+; a request stuck behind a copy has no bound


@pytest.fixture
def d(daemons):
    daemon = daemons.start(HTTP_EXTRA)
    home = daemon.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    daemon.home("bob").mkdir(parents=True, exist_ok=True)
    block = os.urandom(MiB)
    with (home / "big.bin").open("wb") as f:
        for _ in range(SIZE // MiB):
            f.write(block)
    (home / "small.txt").write_bytes(b"small\n")
    return daemon


def _keep_asking(d, bob_key, stop: threading.Event, latencies: list[float], errors: list[str]) -> None:
    """The second client: bob over SFTP, alice's small file over HTTP, until told to stop."""
    sftp = paramiko_client(d, "bob", key=bob_key)
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            sftp.listdir("/")
            r = request(d, "GET", "/small.txt", timeout=30)
            latencies.append(time.monotonic() - t0)
            if (r.status, r.body) != (200, b"small\n"):
                errors.append(f"GET answered {r.status}")
    except Exception as exc:  # noqa: BLE001  (reported by the test)
        errors.append(repr(exc))
    finally:
        close_client(sftp)


def test_large_copies_leave_other_clients_served(d, alice_key, bob_key):
    original = (d.home("alice") / "big.bin").read_bytes()
    stop, latencies, errors = threading.Event(), [], []
    other = threading.Thread(target=_keep_asking, args=(d, bob_key, stop, latencies, errors))
    other.start()
    try:
        deadline = time.monotonic() + 30
        while not latencies and not errors:
            assert time.monotonic() < deadline, "the second client never got an answer"
            time.sleep(0.01)

        r = request(d, "COPY", "/big.bin", headers={"Destination": "/copy.bin"}, timeout=120)
        assert r.status == 201, r.body

        sftp = paramiko_client(d, "alice", key=alice_key)
        try:
            with sftp.open("/big.bin", "r+") as f:  # a staged copy of the published file first
                f.seek(SIZE - 1)
                f.write(b"!")
        finally:
            close_client(sftp)

        n = len(latencies)
        deadline = time.monotonic() + 30
        while len(latencies) < n + 1 and not errors:  # one more round after the copies
            assert time.monotonic() < deadline, "the second client stopped getting answers"
            time.sleep(0.01)
    finally:
        stop.set()
        other.join(60)

    assert not errors, errors
    assert max(latencies) < ANSWER_WITHIN, latencies
    assert (d.home("alice") / "copy.bin").read_bytes() == original
    assert (d.home("alice") / "big.bin").read_bytes() == original[:-1] + b"!"
    assert "Traceback" not in d.log_text()
