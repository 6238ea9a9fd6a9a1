"""Quotas in the core: counted at the rename and nowhere before it, checked at open and at
publish, exact under concurrent overwrites; daily transfer quotas; quota-threshold events.

A real Session and Publisher on a temporary home with a :class:`MemoryLedger`; every test
that changes files ends by comparing the ledger with a recount of the disk.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import pytest

from scriptsftp.server.contract.errors import Failure, PermissionDenied, QuotaExceeded, Vetoed
from scriptsftp.server.contract.events import QuotaThreshold
from scriptsftp.server.core.limits import Mount, Quota, Rates
from scriptsftp.server.core.publish import Publisher, UploadPolicy
from scriptsftp.server.core.quota import MemoryLedger, Quotas, recount, scope_of, utc_day
from scriptsftp.server.core.session import Account, Session
from scriptsftp.server.core.staging import StagingRecords
from scriptsftp.server.core.vfs import Access

from .conftest import RecordingDispatcher, open_staging, veto


class QuotaCore:
    def __init__(self, tmp_path: Path, quota: Quota, folder: Quota = Quota(), rates: Rates = Rates()) -> None:
        self.home = tmp_path / "home"
        (self.home / "shared").mkdir(parents=True)
        state = tmp_path / "state"
        state.mkdir()
        self.staging: StagingRecords = open_staging(state)
        self.dispatcher = RecordingDispatcher()
        self.ledger = MemoryLedger()
        self.quotas = Quotas(self.ledger, [50, 90])
        self.policy = UploadPolicy(state_dir=state)
        self.publisher = Publisher(self.dispatcher, self.staging, self.policy, quotas=self.quotas)
        self.account = Account(name="alice", home=self.home, access=Access.build({"/": ["*"]}, [], []),
                               quota=quota, rates=rates,
                               folders=(Mount(("shared",), "team", self.home / "shared", folder),))
        self.sessions: list[Session] = []

    def session(self) -> Session:
        s = Session(session_id=f"s{len(self.sessions)}", account=self.account, protocol="sftp",
                    remote_ip="127.0.0.1", dispatcher=self.dispatcher, staging=self.staging, uploads=self.policy,
                    publisher=self.publisher)
        s.refusals = lambda record, reason, kind: self.refused.append(kind)
        self.sessions.append(s)
        return s

    refused: list[str] = []

    def upload(self, path: str, data: bytes, session: Session | None = None) -> None:
        h = (session or self.session()).open_write(path)
        h.write(0, data)
        h.close()

    def assert_exact(self) -> None:
        """The ledger says what the disk holds, for the home and for the folder."""
        assert self.ledger.usage("user:alice") == recount(self.home, skip=[self.home / "shared"])
        assert self.ledger.usage("folder:team") == recount(self.home / "shared")

    def close(self) -> None:
        for s in self.sessions:
            s.close()
        self.publisher.close(1.0)
        self.staging.close()


@pytest.fixture
def q(tmp_path: Path) -> Iterator[QuotaCore]:
    c = QuotaCore(tmp_path, Quota(size=1000, files=5), Quota(size=300))
    c.refused = []
    yield c
    c.close()


def test_a_path_counts_against_the_deepest_mount_that_holds_it_else_the_home(q: QuotaCore) -> None:
    assert scope_of(q.account, ("shared", "a")).key == "folder:team"
    assert scope_of(q.account, ("shared",)).key == "folder:team"
    assert scope_of(q.account, ("sharedx", "a")).key == "user:alice"
    assert scope_of(q.account, ("a",)).quota == Quota(1000, 5)


def test_publish_counts_the_new_size_less_the_replaced_one_and_delete_subtracts(q: QuotaCore) -> None:
    s = q.session()
    q.upload("/a", b"x" * 100, s)
    assert q.ledger.usage("user:alice") == (100, 1)
    q.upload("/a", b"x" * 40, s)  # overwrite: -60 bytes, same file count
    assert q.ledger.usage("user:alice") == (40, 1)
    q.upload("/shared/b", b"y" * 70, s)
    assert q.ledger.usage("folder:team") == (70, 1)
    assert q.ledger.usage("user:alice") == (40, 1)
    s.rename("/a", "/c")  # within a scope: no change
    assert q.ledger.usage("user:alice") == (40, 1)
    q.upload("/d", b"z" * 10, s)
    s.rename("/d", "/c", overwrite=True)  # the replaced /c goes
    assert q.ledger.usage("user:alice") == (10, 1)
    s.remove("/c")
    s.remove("/shared/b")
    assert q.ledger.usage("user:alice") == (0, 0) and q.ledger.usage("folder:team") == (0, 0)
    q.assert_exact()


def test_a_rename_across_scopes_is_refused_and_counts_nothing(q: QuotaCore) -> None:
    s = q.session()
    q.upload("/a", b"x" * 10, s)
    with pytest.raises(PermissionDenied, match="folder boundary"):
        s.rename("/a", "/shared/a")
    assert (q.home / "a").exists()
    q.assert_exact()


def test_vetoed_aborted_and_failed_uploads_count_nothing(q: QuotaCore) -> None:
    s = q.session()
    q.upload("/keep", b"k" * 10, s)
    q.dispatcher.pre_hook = veto("no", "pre-publish")
    with pytest.raises(Vetoed):
        q.upload("/v", b"v" * 100, s)
    with pytest.raises(Vetoed):
        q.upload("/keep", b"v" * 100, s)
    q.dispatcher.pre_hook = veto("never", "nothing")
    h = s.open_write("/aborted")
    h.write(0, b"a" * 100)
    h.abort("client gone")
    assert q.ledger.usage("user:alice") == (10, 1)
    q.assert_exact()


def test_at_the_limit_an_upload_is_refused_before_any_script_or_byte(q: QuotaCore) -> None:
    s = q.session()
    q.upload("/big", b"x" * 1000, s)
    q.dispatcher.events.clear()
    with pytest.raises(QuotaExceeded, match="the limit is 1000 bytes"):
        s.open_write("/more")
    assert q.dispatcher.names() == []  # no pre-upload: refused before any script runs
    assert q.refused == ["quota"]  # recorded like every refusal (audit, counter)
    assert sorted(p.name for p in q.home.iterdir()) == ["big", "shared"]
    h = s.open_write("/big")  # overwriting frees what it replaces: allowed
    h.write(0, b"y" * 500)
    h.close()
    q.assert_exact()


def test_the_file_quota_refuses_a_new_file_but_not_an_overwrite(q: QuotaCore) -> None:
    s = q.session()
    for i in range(5):
        q.upload(f"/f{i}", b"1", s)
    with pytest.raises(QuotaExceeded, match="5 files"):
        s.open_write("/f5")
    q.upload("/f0", b"22", s)
    assert q.ledger.usage("user:alice") == (6, 5)
    q.assert_exact()


def test_a_write_past_the_quota_poisons_the_upload_and_keeps_the_old_version(q: QuotaCore) -> None:
    s = q.session()
    q.upload("/shared/doc", b"old" * 10, s)
    h = s.open_write("/shared/doc")
    h.write(0, b"n" * 300)  # exactly the folder's 300 bytes: the old 30 are replaced
    with pytest.raises(QuotaExceeded, match="folder team may hold 300 bytes"):
        h.write(300, b"n")
    with pytest.raises(QuotaExceeded):
        h.close()
    assert (q.home / "shared" / "doc").read_bytes() == b"old" * 10
    assert [p.name for p in (q.home / "shared").iterdir()] == ["doc"]  # nothing staged left
    assert q.refused == ["quota"]
    q.assert_exact()


def test_a_write_far_past_the_end_is_refused_before_it_makes_a_sparse_file(q: QuotaCore) -> None:
    s = q.session()
    h = s.open_write("/holes")
    with pytest.raises(QuotaExceeded):
        h.write(2**62, b"x")  # a hostile offset: no hole of exabytes is made, the upload is poisoned
    with pytest.raises(QuotaExceeded):
        h.write(0, b"x")
    h.abort("client gone")
    assert not (q.home / "holes").exists()
    q.assert_exact()


def test_a_truncate_past_the_quota_is_refused_too(q: QuotaCore) -> None:
    s = q.session()
    h = s.open_write("/sparse")
    with pytest.raises(QuotaExceeded):
        s.fsetstat(h, size=10**9)
    with pytest.raises(QuotaExceeded):
        h.close()
    q.assert_exact()


def test_uploads_that_each_fit_at_open_are_checked_together_at_publish(q: QuotaCore) -> None:
    s = q.session()
    first, second = s.open_write("/one"), s.open_write("/two")
    first.write(0, b"1" * 600)
    second.write(0, b"2" * 600)
    first.close()
    with pytest.raises(QuotaExceeded, match="needs 600 bytes more"):
        second.close()
    assert not (q.home / "two").exists()
    assert q.ledger.usage("user:alice") == (600, 1)
    q.assert_exact()


def test_concurrent_overwrites_of_one_path_stay_exact(tmp_path: Path) -> None:
    c = QuotaCore(tmp_path, Quota())
    sessions = [c.session() for _ in range(4)]

    def hammer(s: Session, n: int) -> None:
        for i in range(40):
            c.upload("/same", bytes([n]) * (1 + (i * 37 + n * 11) % 500), s)
            if i % 7 == n:
                try:
                    s.remove("/same")
                except Exception:
                    pass  # another thread's delete came first

    threads = [threading.Thread(target=hammer, args=(s, n)) for n, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c.assert_exact()
    c.close()


def test_crossing_a_threshold_raises_quota_threshold_once(q: QuotaCore) -> None:
    s = q.session()

    def crossed(kind: str) -> list[tuple]:
        return [(e.percent, e.used, e.limit, e.folder, e.user) for e in q.dispatcher.events
                if isinstance(e, QuotaThreshold) and e.kind == kind]

    q.upload("/a", b"x" * 400, s)
    assert crossed("size") == []
    q.upload("/b", b"x" * 150, s)  # 550 of 1000: crosses 50%
    q.upload("/c", b"x" * 10, s)  # still above 50%, under 90%: nothing new
    assert crossed("size") == [(50, 550, 1000, "", "alice")]
    assert crossed("files") == [(50, 3, 5, "", "alice")]  # the third file of 5
    q.upload("/shared/x", b"y" * 280, s)  # the folder: 280 of 300, past 50% and 90% at once
    assert crossed("size")[1:] == [(50, 280, 300, "team", "alice"), (90, 280, 300, "team", "alice")]
    s.remove("/c")
    q.upload("/c", b"x" * 10, s)  # down and up again: crossed again, that is a new crossing
    assert crossed("files") == [(50, 3, 5, "", "alice")] * 2


def test_the_daily_upload_quota_stops_an_upload_on_the_way_and_counts_every_byte(tmp_path: Path) -> None:
    c = QuotaCore(tmp_path, Quota(), rates=Rates(up_daily=1000))
    s = c.session()
    c.upload("/a", b"x" * 600, s)
    h = s.open_write("/b")
    h.write(0, b"x" * 400)
    with pytest.raises(QuotaExceeded, match="daily upload quota"):
        h.write(400, b"x")
    with pytest.raises(QuotaExceeded):
        h.close()
    assert not (c.home / "b").exists()
    assert c.ledger.transfer_usage("alice", utc_day()) == (1000, 0)  # the discarded bytes moved too
    with pytest.raises(QuotaExceeded, match="daily upload quota"):
        s.open_write("/c")
    c.close()


def test_the_daily_download_quota_gives_a_short_read_then_refuses(tmp_path: Path) -> None:
    c = QuotaCore(tmp_path, Quota(), rates=Rates(down_daily=100))
    (c.home / "f").write_bytes(b"d" * 150)
    (c.home / "small").write_bytes(b"s" * 10)
    s = c.session()
    h = s.open_read("/small")
    assert h.read(0, 1000) == b"s" * 10 and h.read(10, 1000) == b""  # EOF stays EOF
    h.close()
    h = s.open_read("/f")
    assert len(h.read(0, 1000)) == 90  # what is left of the day
    with pytest.raises(QuotaExceeded, match="daily download quota"):
        h.read(90, 1000)
    h.close()
    assert c.ledger.transfer_usage("alice", utc_day()) == (0, 100)
    with pytest.raises(QuotaExceeded):
        s.open_read("/small")
    c.close()


def test_recount_leaves_out_staging_names_and_symlinks(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"1234")
    (tmp_path / ".scriptsftp-part-abc").write_bytes(b"staged")
    (tmp_path / "link").symlink_to(tmp_path / "d" / "f")
    (tmp_path / "g").write_bytes(b"")
    assert recount(tmp_path) == (4, 2)
    assert recount(tmp_path, skip=[tmp_path / "d"]) == (0, 1)


def test_the_memory_ledger_never_goes_below_zero() -> None:
    ledger = MemoryLedger()
    assert ledger.add_usage("user:x", -5, -1) == (0, 0)
    assert ledger.add_transfer("x", "2026-01-01", 5, 0) == (5, 0)
    ledger.set_usage("user:x", 7, 2)
    assert ledger.usage("user:x") == (7, 2)


class BrokenLedger(MemoryLedger):
    """A database that went away."""

    def usage(self, scope: str) -> tuple[int, int]:
        raise ConnectionError("server closed the connection")

    def add_usage(self, scope: str, bytes_delta: int, files_delta: int) -> tuple[int, int]:
        raise ConnectionError("server closed the connection")


def test_a_ledger_that_cannot_answer_refuses_limited_uploads_but_never_fails_a_publish(tmp_path: Path) -> None:
    c = QuotaCore(tmp_path, Quota())
    c.quotas.ledger = c.ledger = BrokenLedger()
    s = c.session()
    c.upload("/free", b"x" * 10, s)  # no quota: no check; the count fails, the upload does not
    assert (c.home / "free").read_bytes() == b"x" * 10
    c.account = Account(name="alice", home=c.home, access=c.account.access, quota=Quota(size=100))
    with pytest.raises(Failure, match="quota cannot be checked now"):
        c.session().open_write("/limited")
    c.close()
