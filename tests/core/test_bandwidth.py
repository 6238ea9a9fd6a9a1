"""The per-user token bucket (server/core/bandwidth.py): bytes owed, marks, rate changes,
deadlines, and one bucket per user shared by all their sessions.

Most tests run on a fake clock (charge/wait_for never sleep); the blocking ``take`` is
tested with real time and small numbers, so the tier stays fast.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import pytest

from scriptsftp.server.contract.dispatch import NullDispatcher
from scriptsftp.server.contract.errors import LimitExceeded
from scriptsftp.server.contract.ports import THROTTLE_CHUNK_MAX, THROTTLE_CHUNK_MIN, throttle_chunk
from scriptsftp.server.core.bandwidth import BURST_SECONDS, BandwidthLimits, TokenBucket, UserBandwidth
from scriptsftp.server.core.limits import Rates
from scriptsftp.server.core.session import Account, Session
from scriptsftp.server.core.vfs import Access

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unlimited_charges_nothing_and_never_waits():
    b = TokenBucket()
    assert b.rate == 0
    assert b.charge(10 * MiB) == 0.0
    assert b.wait_for(1e12) == 0.0
    started = time.monotonic()
    b.take(100 * MiB, deadline=time.monotonic())  # no limit: not even the deadline matters
    assert time.monotonic() - started < 0.05


def test_a_new_limited_bucket_holds_one_burst_then_paces_at_the_rate():
    clock = Clock()
    b = TokenBucket(MiB, clock=clock)
    burst = MiB * BURST_SECONDS
    assert b.wait_for(b.charge(int(burst))) == 0.0  # the burst moves at once
    mark = b.charge(MiB)
    assert b.wait_for(mark) == pytest.approx(1.0)  # then one second per MiB
    clock.now += 0.5
    assert b.wait_for(mark) == pytest.approx(0.5)
    clock.now += 0.5
    assert b.wait_for(mark) == 0.0


def test_takers_are_served_in_the_order_they_charged():
    clock = Clock()
    b = TokenBucket(1000, clock=clock)
    b.charge(250)  # the burst
    first = b.charge(1000)
    second = b.charge(1000)
    assert b.wait_for(first) == pytest.approx(1.0)
    assert b.wait_for(second) == pytest.approx(2.0)


def test_an_idle_bucket_saves_up_one_burst_at_most():
    clock = Clock()
    b = TokenBucket(1000, clock=clock)
    clock.now += 3600  # an hour idle
    assert b.wait_for(b.charge(250)) == 0.0
    assert b.wait_for(b.charge(1)) == pytest.approx(0.001)


def test_a_lower_rate_applies_to_the_bytes_still_owed():
    clock = Clock()
    b = TokenBucket(1000, clock=clock)
    b.charge(250)
    mark = b.charge(1000)
    clock.now += 0.5  # half paid at 1000/s
    b.set_rate(100)
    assert b.wait_for(mark) == pytest.approx(5.0)  # the other 500 bytes at 100/s


def test_a_higher_rate_shortens_the_wait_and_none_ends_it():
    clock = Clock()
    b = TokenBucket(100, clock=clock)
    b.charge(25)
    mark = b.charge(1000)
    assert b.wait_for(mark) == pytest.approx(10.0)
    b.set_rate(1000)
    assert b.wait_for(mark) == pytest.approx(1.0)
    b.set_rate(0)
    assert b.wait_for(mark) == 0.0
    assert b.charge(MiB) == 0.0


def test_a_bucket_limited_again_starts_full_and_old_marks_are_paid():
    clock = Clock()
    b = TokenBucket(1000, clock=clock)
    old = b.charge(5000)
    b.set_rate(0)
    b.set_rate(1000)
    assert b.wait_for(old) == 0.0
    assert b.wait_for(b.charge(250)) == 0.0  # a full burst
    assert b.wait_for(b.charge(1000)) == pytest.approx(1.0)


def test_take_blocks_for_what_is_owed():
    b = TokenBucket(100_000)
    b.take(int(100_000 * BURST_SECONDS), None)  # the burst
    started = time.monotonic()
    b.take(20_000, None)
    assert 0.17 <= time.monotonic() - started < 0.5


def test_take_gives_up_at_the_deadline_with_a_reason():
    b = TokenBucket(1000)
    b.take(250, None)
    started = time.monotonic()
    with pytest.raises(LimitExceeded, match="1000 bytes/s.*stall timeout"):
        b.take(10_000, time.monotonic() + 0.1)
    assert 0.08 <= time.monotonic() - started < 0.5


def test_a_rate_change_wakes_a_blocked_taker_at_once():
    b = TokenBucket(1000)
    b.take(250, None)
    done = threading.Event()

    def taker() -> None:
        b.take(100_000, None)  # 100 s at 1000/s
        done.set()

    t = threading.Thread(target=taker, daemon=True)
    t.start()
    assert not done.wait(0.1)
    b.set_rate(0)
    assert done.wait(1.0)
    t.join(1)


def test_concurrent_takers_share_the_rate():
    """Four threads, one bucket: together they move no faster than the rate."""
    rate = 400_000
    b = TokenBucket(rate)
    b.take(int(rate * BURST_SECONDS), None)
    per_thread, chunk = 40_000, 8_000

    def taker() -> None:
        for _ in range(per_thread // chunk):
            b.take(chunk, None)

    threads = [threading.Thread(target=taker) for _ in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    elapsed = time.monotonic() - started
    assert elapsed >= 4 * per_thread / rate * 0.9  # 0.4 s at least


def test_throttle_chunk_is_a_tenth_of_a_second_within_bounds():
    assert throttle_chunk(MiB) == MiB // 10
    assert throttle_chunk(1000) == THROTTLE_CHUNK_MIN
    assert throttle_chunk(1 << 40) == THROTTLE_CHUNK_MAX
    assert TokenBucket(MiB).chunk == MiB // 10


def test_user_bandwidth_takes_the_accounts_rates():
    bw = UserBandwidth(Rates(up=1000, down=2000, up_daily=5))
    assert (bw.up.rate, bw.down.rate, bw.limited) == (1000, 2000, True)
    bw.set(Rates())
    assert not bw.limited


def test_one_user_one_bucket_for_as_long_as_a_session_holds_it():
    limits = BandwidthLimits()
    a = limits.of("alice")
    assert limits.of("alice") is a
    assert limits.of("bob") is not a
    a.set(Rates(up=1000))
    assert limits.of("alice").up.rate == 1000
    del a
    gc.collect()
    assert limits.of("alice").up.rate == 0  # nobody held it: a fresh, unlimited one


def _session(tmp_path: Path, bandwidth: UserBandwidth, rates: Rates) -> Session:
    account = Account(name="alice", home=tmp_path, access=Access.build({"/": ["*"]}, [], []), rates=rates)
    return Session(session_id="s", account=account, protocol="sftp", remote_ip="127.0.0.1",
                   dispatcher=NullDispatcher(), bandwidth=bandwidth)


def test_a_sessions_account_sets_the_users_rates_and_a_new_account_changes_them(tmp_path: Path):
    """What a reload or a database change does to a live session (LoginCore sets
    ``session.account``) reaches the buckets every session of the user shares."""
    shared = UserBandwidth()
    s1 = _session(tmp_path, shared, Rates(up=1000, down=3000))
    s2 = _session(tmp_path, shared, Rates(up=1000, down=3000))
    assert s1.bandwidth is s2.bandwidth is shared
    assert (shared.up.rate, shared.down.rate) == (1000, 3000)
    s1.account = Account(name="alice", home=tmp_path, access=s1.account.access, rates=Rates(up=50))
    assert (s2.bandwidth.up.rate, s2.bandwidth.down.rate) == (50, 0)
