"""The notification outbox a cluster shares through PostgreSQL (docs/cluster.md, "Notifications"):
claims, leases and outcomes on both engines, and the outbox surviving a PostgreSQL outage.

Two ``Outbox`` on one database stand for two nodes (on SQLite, two processes of one server on
one state_dir); two real daemons delivering 200 webhooks, one of them killed mid-delivery, and a
daemon through a PostgreSQL outage are in tests/test_cluster_notify.py."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from test_cap_notify import free_port
from test_cluster_state import nodes, own_pg  # noqa: F401 (fixtures)

from scriptsftp.scripting.outbox import DELIVERY_HEADER, MIGRATIONS, Notifier, Outbox, message_id
from scriptsftp.server.stores import StateStores
from scriptsftp.server.stores.state import StateSchemaTooNew
from scriptsftp.server.support.config import NotifySection, WebhookSection


def wait_for(cond: Callable[[], Any], timeout: float, what: str = "") -> Any:
    """cond()'s first true value; fails after timeout (generous: the machine is shared)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


def queue(box: Outbox, n: int) -> list[int]:
    return [box.add("webhook", "hook", {"payload": {"i": i}}, "s.py") for i in range(n)]


# --- claims and leases ------------------------------------------------------------------------


def test_nodes_claiming_at_once_take_each_message_once(nodes):
    """Four deliverers over two nodes claim and record until the queue is empty: every one of
    200 messages is claimed exactly once, and recorded delivered exactly once."""
    a, b = Outbox(nodes("a")), Outbox(nodes("b"))
    try:
        ids = queue(a, 100) + queue(b, 100)
        assert len(set(ids)) == 200
        taken: list[int] = []
        lock = threading.Lock()
        errors: list[BaseException] = []

        def deliverer(box: Outbox) -> None:
            try:
                while batch := box.claim(lease=60, limit=7):
                    for m in batch:
                        assert box.delivered(m), m
                    with lock:
                        taken.extend(m["id"] for m in batch)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=deliverer, args=(box,)) for box in (a, b, a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert sorted(taken) == sorted(ids)  # each once: no message claimed twice, none left
        assert a.stats() == b.stats() == {"pending": 0, "failed": 0, "delivered": 200}
        assert a.next_due() is None
    finally:
        a.close()
        b.close()


def test_an_expired_lease_is_claimed_again_and_only_the_latest_claim_records(nodes):
    a, b = Outbox(nodes("a")), Outbox(nodes("b"))
    try:
        queue(a, 3)
        mine = a.claim(lease=4, limit=2)  # long enough for b's claims below, even on a loaded machine
        assert [m["claim"] for m in mine] == [1, 1]
        rest = b.claim(lease=60, limit=10)
        assert [m["id"] for m in rest] == [mine[-1]["id"] + 1]  # a's two are leased: b gets the third only
        assert b.claim(lease=60) == []
        due = b.next_due()
        assert due is not None and due <= 4  # a's lease ends first (the database's clock)
        # a dies with its two claimed; after the lease, b claims them
        again = wait_for(lambda: b.claim(lease=60, limit=10), 15, "a's messages after its lease")
        assert sorted(m["id"] for m in again) == sorted(m["id"] for m in mine)
        assert all(m["claim"] == 2 for m in again)
        assert not a.delivered(mine[0])  # a came back late: its outcome is not recorded
        assert not a.retry(mine[1], "late", 1)
        assert b.delivered(again[0]) and b.failed(again[1], "HTTP 500")
        assert not b.delivered(again[0])  # recorded once
        assert b.delivered(rest[0])
        assert a.stats() == {"pending": 0, "failed": 1, "delivered": 2}
        (failure,) = a.recent_failures()
        assert failure["attempts"] == 1 and failure["error"] == "HTTP 500"
    finally:
        a.close()
        b.close()


def test_a_lease_ran_out_unclaimed_still_records_and_a_retry_waits(nodes):
    """A delivery that outlasted its lease, nobody having claimed the message since, records
    its outcome (delivering again would only make a duplicate). A retry is due after its delay."""
    a, b = Outbox(nodes("a")), Outbox(nodes("b"))
    try:
        queue(a, 1)
        (m,) = a.claim(lease=1)
        time.sleep(1.2)  # the lease must have run out: what this test is about
        assert a.retry(m, "timed out", 4.0)
        assert b.claim(lease=60) == []  # waiting out its retry delay
        due = b.next_due()
        assert due is not None and 0 < due <= 4.0  # the retry's delay (a's lease is over)
        (again,) = wait_for(lambda: b.claim(lease=60), 15, "the retry")
        assert again["attempts"] == 1 and again["claim"] == 2
    finally:
        a.close()
        b.close()


def test_released_claims_and_a_restart_make_messages_due_at_once(nodes):
    a, b = Outbox(nodes("a")), Outbox(nodes("b"))
    try:
        queue(a, 4)
        first = a.claim(lease=300, limit=2)
        a.release(first[1:])  # given back, not started
        assert [m["id"] for m in b.claim(lease=300, limit=1)] == [first[1]["id"]]
        # a restarts: what a had claimed is due at once, and b's claim stays b's in a cluster
        restarted = Outbox(nodes("a"))
        try:
            n = restarted.make_all_due()
            assert n == (1 if nodes.engine == "postgresql" else 4)  # SQLite: every pending one
            ids = sorted(m["id"] for m in restarted.claim(lease=300, limit=10))
            expected = [first[0]["id"], first[1]["id"] + 1, first[1]["id"] + 2]
            if nodes.engine == "sqlite":  # one node: every pending message is due at start
                expected = sorted(expected + [first[1]["id"]])
            assert ids == expected
        finally:
            restarted.close()
    finally:
        a.close()
        b.close()


def test_existing_sqlite_outbox_keeps_its_rows(tmp_path: Path):
    """An outbox written before the stores had versions opens with its messages, pending ones
    due at start (also one an old run had claimed), and is marked with its schema version."""
    path = tmp_path / "outbox.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, target TEXT NOT NULL,
            body TEXT NOT NULL, script TEXT NOT NULL, created REAL NOT NULL, status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, last_error TEXT NOT NULL DEFAULT '',
            done_at REAL);
        CREATE INDEX outbox_due ON outbox (status, next_at);
        INSERT INTO outbox (kind, target, body, script, created, status, attempts, next_at, done_at)
            VALUES ('webhook', 'ops', '{"payload": {"n": 1}}', 'old.py', 1000, 'pending', 2, 9e12, NULL),
                   ('webhook', 'ops', '{"payload": {"n": 2}}', 'old.py', 1000, 'delivered', 1, 0, 4e12);
    """)
    old.commit()
    old.close()
    box = Outbox(StateStores(tmp_path))
    try:
        assert box.stats() == {"pending": 1, "failed": 0, "delivered": 1}
        assert box.claim(lease=60) == []  # the old run's claim (next_at far off) ...
        assert box.make_all_due() == 1  # ... ends at start
        (m,) = box.claim(lease=60)
        assert m["body"] == {"payload": {"n": 1}} and m["attempts"] == 2 and m["script"] == "old.py"
        assert box.delivered(m)
        assert box.add("email", "x@example.com", {"to": ["x@example.com"]}, "new.py") == 3
    finally:
        box.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM state_schema WHERE store = 'outbox'").fetchone() == (2,)
    db.execute("UPDATE state_schema SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StateSchemaTooNew, match="newer than this scriptsftp's 2: upgrade scriptsftp"):
        StateStores(tmp_path).database("outbox", MIGRATIONS)


def test_the_lease_must_outlast_every_delivery():
    NotifySection(lease=11, smtp={"timeout": 5},
                  webhooks={"a": WebhookSection(url="http://127.0.0.1:9/", timeout=10)})
    with pytest.raises(ValueError, match=r"lease \(10s\) must be longer than the slowest delivery's timeout \(10s\)"):
        NotifySection(lease=10, smtp={"timeout": 5},
                      webhooks={"a": WebhookSection(url="http://127.0.0.1:9/", timeout=10)})
    with pytest.raises(ValueError, match=r"timeout \(30s\)"):  # the SMTP timeout's default
        NotifySection(lease=20)


def test_message_id_is_stable_and_from_the_senders_domain():
    assert message_id(42, 1700000000.1234, "ops@example.com") == "<scriptsftp-outbox.42.1700000000123@example.com>"
    assert message_id(42, 1700000000.1234, "x") == "<scriptsftp-outbox.42.1700000000123@localhost>"


class FlakySmtp:
    """An SMTP server (aiosmtpd) that refuses the first message with a temporary error."""

    def __init__(self) -> None:
        self.port = free_port()
        self.messages: list[tuple[int, Any]] = []  # (the answer's code, the message)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import email

        code = 451 if not self.messages else 250
        self.messages.append((code, email.message_from_bytes(envelope.original_content or envelope.content)))
        return "451 try again later" if code == 451 else "250 OK"


def test_every_attempt_of_an_email_carries_the_same_message_id(nodes):
    from aiosmtpd.controller import Controller

    sink = FlakySmtp()
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    box = Outbox(nodes("a"))
    cfg = NotifySection(retry_delay=0.2, smtp={"port": sink.port, "sender": "ops@example.com", "timeout": 10})
    notifier = Notifier(box, lambda: cfg, Path)
    try:
        mid = box.add("email", "x@example.com", {"to": ["x@example.com"], "subject": "s", "body": "b",
                                                 "script": "s.py"}, "s.py")
        notifier.start()
        wait_for(lambda: box.stats()["delivered"] == 1, 60, "the email, on its second attempt")
        assert [code for code, _ in sink.messages] == [451, 250]
        first, second = (m["Message-ID"] for _, m in sink.messages)
        assert first == second and first.startswith(f"<scriptsftp-outbox.{mid}.") and first.endswith("@example.com>")
    finally:
        notifier.stop()
        box.close()
        controller.stop()


# --- PostgreSQL down ---------------------------------------------------------------------------


class CountingReceiver:
    """An aiohttp server in its own thread recording each webhook POST as (delivery id, the
    sending node's ``X-Node`` header, arrival time). ``before_answer(id)`` (blocking, run off
    the loop) is called before each answer; a POST from a node in ``hold`` is never answered
    (until :meth:`stop`): a delivery in flight."""

    def __init__(self, before_answer: Callable[[str], None] | None = None, hold: frozenset[str] = frozenset()) -> None:
        self.port = free_port()
        self.before_answer = before_answer
        self.hold = hold
        self.got: list[tuple[str, str, float]] = []
        self.held: list[str] = []
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: Any = None
        self._release: asyncio.Event | None = None

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        await request.read()
        mid, node = request.headers[DELIVERY_HEADER], request.headers.get("X-Node", "")
        with self._lock:
            self.got.append((mid, node, time.time()))
            if node in self.hold:
                self.held.append(mid)
        if node in self.hold:
            assert self._release is not None
            await self._release.wait()
        if self.before_answer is not None:
            await self.loop.run_in_executor(None, self.before_answer, mid)
        return web.Response(text="ok")

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return [g[0] for g in self.got]

    def count(self) -> int:
        with self._lock:
            return len(self.got)

    def start(self) -> "CountingReceiver":
        from aiohttp import web

        async def start() -> None:
            self._release = asyncio.Event()
            app = web.Application()
            app.router.add_post("/{tail:.*}", self._handle)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        assert self._release is not None
        self.loop.call_soon_threadsafe(self._release.set)
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_postgresql_down_loses_no_message_and_delivers_none_twice(own_pg, tmp_path: Path,  # noqa: F811
                                                                  caplog: pytest.LogCaptureFixture):
    """PostgreSQL stops while the first of 10 queued webhooks is being answered: the outcomes
    of what is delivered meanwhile are kept and written once it is back (so nothing is sent
    twice), queueing fails with a clear error meanwhile, and nothing queued is lost."""
    down = threading.Event()

    def first_stops_postgresql(mid: str) -> None:
        if not down.is_set():
            down.set()
            own_pg.stop_server()

    hook = CountingReceiver(first_stops_postgresql).start()
    box = Outbox(StateStores(tmp_path / "a", database=own_pg.dsn, node="a"))
    cfg = NotifySection(lease=120, retry_delay=0.2,
                        webhooks={"hook": WebhookSection(url=f"http://127.0.0.1:{hook.port}/h", timeout=10)})
    notifier = Notifier(box, lambda: cfg, Path)
    try:
        ids = queue(box, 10)
        notifier.start()
        wait_for(down.is_set, 60, "the first delivery")
        wait_for(lambda: hook.count() == 10, 60, "the whole claimed batch delivered while the database is away")
        with pytest.raises(box.errors):
            box.add("webhook", "hook", {"payload": {}}, "s.py")
        wait_for(lambda: "is not written yet" in caplog.text, 30, "the kept outcome")
        own_pg.start_server()

        def stats() -> dict[str, int] | None:
            try:
                return box.stats()
            except box.errors:
                return None

        wait_for(lambda: (stats() or {}).get("delivered") == 10, 90, "the outcomes written after the outage")
        assert stats() == {"pending": 0, "failed": 0, "delivered": 10}
        assert sorted(hook.ids) == sorted(str(i) for i in ids)  # each exactly once
        later = box.add("webhook", "hook", {"payload": {}}, "s.py")
        notifier.wake()
        wait_for(lambda: str(later) in hook.ids, 60, "a message queued after the outage")
    finally:
        notifier.stop()
        box.close()
        hook.stop()
