"""Claims on cron minutes (scripting/schedule_claims.py), on both engines: SQLite in one
node's state_dir, and the PostgreSQL database two nodes share. Two ScheduleClaims with
different node names stand for two nodes; the database's clock decides the leases."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from scriptsftp.scripting.schedule import VIRTUAL_EPOCH, binding_keys, virtual_now
from scriptsftp.scripting.schedule_claims import Claim, ScheduleClaims
from scriptsftp.server.stores import StateStores


@pytest.fixture(params=["sqlite", "postgresql"])
def two_claimers(request: pytest.FixtureRequest, tmp_path: Path):
    """A factory of ScheduleClaims for node names "a", "b", …, on one database per test."""
    url = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else ""
    made: list[ScheduleClaims] = []

    def make(node: str, *, lease: float = 30.0, catch_up: float = 600.0) -> ScheduleClaims:
        c = ScheduleClaims(StateStores(tmp_path / "state", database=url, node=node), lease=lease, catch_up=catch_up)
        made.append(c)
        return c

    make.url = url  # type: ignore[attr-defined]
    yield make
    for c in made:
        c.close()


def wait_for(what, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_each_minute_goes_to_exactly_one_of_many_racing_claimers(two_claimers, tmp_path: Path):
    claimers = [two_claimers(n) for n in ("a", "b", "a", "b")]  # two connections per node
    minutes = [f"2000-01-01T00:{m:02d}" for m in range(40)]
    won: list[tuple[str, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(len(claimers))

    def race(c: ScheduleClaims) -> None:
        start.wait()
        for m in minutes:
            if c.claim("job.py:on_schedule [* * * * *] users=*", m):
                with lock:
                    won.append((c.node, m))

    threads = [threading.Thread(target=race, args=(c,)) for c in claimers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(m for _, m in won) == minutes  # every minute once: none lost, none twice
    # another binding's same minute is a claim of its own
    assert claimers[0].claim("other.py:on_schedule [* * * * *] users=*", minutes[0])
    if not two_claimers.url:  # one node: the claims are in its state_dir
        assert (tmp_path / "state" / "schedule.sqlite3").exists()
    else:
        assert not (tmp_path / "state" / "schedule.sqlite3").exists()


def test_an_unfinished_claim_is_taken_over_once_its_lease_expired(two_claimers):
    a = two_claimers("a", lease=1.0)
    b = two_claimers("b", lease=30.0)
    c = two_claimers("c", lease=30.0)
    key, minute = "job.py:on_schedule [* * * * *] users=*", "2000-01-01T00:07"
    assert a.claim(key, minute)
    assert not b.claim(key, minute)
    assert b.take_over([key]) == []  # the lease still holds
    taken = wait_for(lambda: b.take_over([key]))
    assert taken == [Claim(key, minute)]
    assert c.take_over([key]) == []  # b holds it now, with its own 30 s lease
    assert b.state(key, minute) == ("b", "claimed")
    a.done(Claim(key, minute))  # the node that lost it cannot close it for the new holder
    assert b.state(key, minute) == ("b", "claimed")
    b.done(Claim(key, minute))
    assert b.state(key, minute) == ("b", "done")


def test_a_done_minute_is_never_taken_over_and_renewal_keeps_a_claim(two_claimers):
    a = two_claimers("a", lease=1.0)
    b = two_claimers("b")
    key = "job.py:on_schedule [*/5 * * * *] users=alice"
    assert a.claim(key, "2000-01-01T00:05") and a.claim(key, "2000-01-01T00:10")
    a.done(Claim(key, "2000-01-01T00:05"))
    # a renews the one still running for 3 lease lengths: b never gets it
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        a.renew([Claim(key, "2000-01-01T00:10")])
        assert b.take_over([key]) == []
        time.sleep(0.2)
    # a stops renewing (dead): b gets the running one, never the done one
    assert wait_for(lambda: b.take_over([key])) == [Claim(key, "2000-01-01T00:10")]
    assert b.state(key, "2000-01-01T00:05") == ("a", "done")


def test_takeover_only_of_known_bindings_within_the_catch_up_window(two_claimers):
    a = two_claimers("a", lease=0.2)
    late = two_claimers("b", catch_up=5.0)
    key = "job.py:on_schedule [* * * * *] users=*"
    assert a.claim(key, "2000-01-01T00:01")
    time.sleep(0.5)  # lease expired: a node without that binding does not take it
    assert late.take_over(["unrelated.py:on_schedule [* * * * *] users=*"]) == []
    time.sleep(5.0)  # now older than catch_up: nobody runs it any more
    assert late.take_over([key]) == []
    assert late.state(key, "2000-01-01T00:01") == ("a", "claimed")
    assert a.claim(key, "2000-01-01T00:02")  # a later one, still within the window, is taken over
    assert wait_for(lambda: late.take_over([key]), timeout=4.0) == [Claim(key, "2000-01-01T00:02")]


def test_a_released_claim_is_taken_over_at_once_and_old_rows_are_pruned(two_claimers):
    a = two_claimers("a")
    b = two_claimers("b")
    key = "job.py:on_schedule [* * * * *] users=*"
    assert a.claim(key, "2000-01-01T00:03")
    a.release(Claim(key, "2000-01-01T00:03"))
    assert b.take_over([key]) == [Claim(key, "2000-01-01T00:03")]
    assert a.prune() == 0  # a fresh row is kept
    assert b.state(key, "2000-01-01T00:03") == ("b", "claimed")


def test_every_process_computes_the_same_virtual_minute_and_stable_binding_keys():
    # two processes reading the same wall time agree, whenever each started
    assert virtual_now(0.25, 1_800_000_000.0) == virtual_now(0.25, 1_800_000_000.0)
    assert virtual_now(0.25, 1_800_000_000.25) - virtual_now(0.25, 1_800_000_000.0) == (
        virtual_now(0.25, 1.25) - virtual_now(0.25, 1.0))
    now = virtual_now(0.05)
    assert VIRTUAL_EPOCH <= now < VIRTUAL_EPOCH.replace(year=2400)

    def b(script: str, cron: str, users: list[str], function: str = "") -> SimpleNamespace:
        return SimpleNamespace(spec=SimpleNamespace(script=script, handler=function or "on_schedule", cron=cron,
                                                    users=users))

    one = [b("a.py", "* * * * *", ["*"]), b("a.py", "*/5 * * * *", ["*"]), b("a.py", "* * * * *", ["*"])]
    other_order = [b("z.py", "0 * * * *", ["bob"]), one[1], one[0], one[2]]
    keys = binding_keys(one)
    assert list(keys) == ["a.py:on_schedule [* * * * *] users=*", "a.py:on_schedule [*/5 * * * *] users=*",
                          "a.py:on_schedule [* * * * *] users=*#2"]
    # a node with another binding first, or the list in another order, names them alike
    assert set(keys) <= set(binding_keys(other_order))
