"""Per-user handle budget and batched listings, in the core (no daemon).

The daemon-level tests (tests/test_hostile_channels.py) show the bounds hold against real
clients; these pin the core's rules: a budget shared by a user's sessions, a refused open that
leaves nothing behind, a listing read in batches that skips staging files and ends cleanly.
"""

from __future__ import annotations

import os

import pytest

from scriptsftp.server.contract.errors import LimitExceeded
from scriptsftp.server.core.session import HandleBudget, Session


def _sibling(core, budget: HandleBudget) -> Session:
    """Another session of the same user (another connection or protocol) on the same budget."""
    s = core.session
    return Session(session_id="s2", account=s.account, protocol="ftp", remote_ip="127.0.0.1",
                   dispatcher=s.dispatcher, staging=s.staging, uploads=s.uploads, publisher=s.publisher,
                   budget=budget)


def test_budget_is_shared_by_a_users_sessions(core):
    budget = HandleBudget("alice", lambda: 3)
    core.session.budget = budget
    other = _sibling(core, budget)
    try:
        a = core.session.open_read("/over.bin")
        b = core.session.opendir("/")
        c = other.open_write("/new.bin")
        with pytest.raises(LimitExceeded, match=r"too many open files \(limit 3 per user\)"):
            other.open_read("/over.bin")
        with pytest.raises(LimitExceeded):
            core.session.opendir("/")
        assert len(budget) == 3
        b.close()
        d = other.open_read("/over.bin")  # a closed handle gives its place back
        for h in (a, c, d):
            h.close()
        assert len(budget) == 0
    finally:
        other.close()
    assert core.part_files() == []


def test_a_listing_is_read_in_batches_without_staging_files(core):
    for i in range(250):
        (core.home / f"f{i:03d}").write_bytes(b"")
    (core.home / ".scriptsftp-part-0123456789abcdef").write_bytes(b"")  # an upload in progress
    listing = core.session.opendir("/")
    batches = []
    while True:
        batch = listing.read(100)
        if not batch:
            break
        batches.append(batch)
    listing.close()
    names = [e.name for b in batches for e in b]
    assert [len(b) for b in batches] == [100, 100, 51]
    assert sorted(names) == sorted([f"f{i:03d}" for i in range(250)] + ["over.bin"])
    with pytest.raises(Exception):
        listing.read(100)  # closed: its descriptor is gone


def test_closing_the_session_closes_its_listings(core):
    listing = core.session.opendir("/")
    fd = listing.fd
    core.session.close()
    assert listing.done
    with pytest.raises(OSError):
        os.fstat(fd)
