"""``api.notify``: email and webhooks, delivered from a durable outbox.

A script's ``api.notify.email()`` / ``api.notify.webhook()`` only *queues* a
message: one row in the outbox's database, this node's SQLite file under
``state_dir``, or with ``[cluster] database`` the PostgreSQL table every node shares
(docs/architecture.md rule 10; docs/cluster.md, "Notifications").
The call returns at once; a :class:`Notifier` thread delivers, retrying with
exponential backoff (``[notify] retry_delay`` doubling up to an hour, at most
``[notify] max_attempts`` tries). A message queued before a daemon restart is
delivered after it: on start every pending message this node had is due at once.

Each message is delivered once as far as a sender can make it: a node claims it for
``[notify] lease`` seconds (the database's clock) and only that claim records its
outcome. A node killed between sending and recording makes a second delivery (by
another node, after the lease) unavoidable; every webhook carries the message's id in
``X-Scriptsftp-Delivery`` and every email a Message-ID made from it, the same on each
attempt, so the receiver can drop the duplicate.

No server-side request forgery: a webhook is addressed by *name*; the URL,
timeout and headers come from ``[notify.webhooks.NAME]`` in the config, never
from the script. Redirects are not followed.

Failures are logged (never with the SMTP password) and counted:
:meth:`Outbox.stats` gives ``pending`` / ``failed`` / ``delivered`` for the
admin API.
"""

from __future__ import annotations

import json
import logging
import re
import smtplib
import ssl
import threading
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any, Callable

from scriptsftp.server.contract.state import Cursor, SqlDatabase, StateStoreFactory

from .capabilities import CapabilityCall, CapabilityError

log = logging.getLogger("scriptsftp.notify")

MAX_RECIPIENTS = 20
MAX_SUBJECT_CHARS = 900
MAX_BODY_BYTES = 1024 * 1024
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_PENDING = 10_000
MAX_PER_CALL = 100          # notifications one handler call may queue
MAX_BACKOFF = 3600.0
#: messages one claim takes (a node delivers them one after the other)
CLAIM_BATCH = 10
#: seconds between tries while the outbox's database fails (doubling up to the second)
DB_RETRY = (1.0, 30.0)
KEEP_DELIVERED = 7 * 86400

_ADDRESS = re.compile(r"^[^@\s<>,;:\"()\[\]\\]+@[A-Za-z0-9.\-\[\]:]+$")

#: the outbox's schema (stores/state.py applies it); append only. 1 is the table as it was
#: before the stores had versions (an existing SQLite outbox keeps its rows); 2 adds the
#: claim: which node delivers a message, until when (the database's clock), and a count of
#: claims that tells one claim of a message from the next.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, ["""CREATE TABLE IF NOT EXISTS outbox (
        id         {id},
        kind       TEXT NOT NULL,
        target     TEXT NOT NULL,
        body       TEXT NOT NULL,
        script     TEXT NOT NULL,
        created    DOUBLE PRECISION NOT NULL,
        status     TEXT NOT NULL,
        attempts   INTEGER NOT NULL DEFAULT 0,
        next_at    DOUBLE PRECISION NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        done_at    DOUBLE PRECISION
    )""",
         "CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_at)"]),
    (2, ["ALTER TABLE outbox ADD COLUMN claimed_by TEXT NOT NULL DEFAULT ''",
         "ALTER TABLE outbox ADD COLUMN lease_until DOUBLE PRECISION NOT NULL DEFAULT 0",
         "ALTER TABLE outbox ADD COLUMN claims INTEGER NOT NULL DEFAULT 0"]),
]

#: the outbox's own dialect words: the database's clock in Unix seconds (leases and due times
#: are compared on one clock, never a node's), and the row lock that lets nodes claim at once
_WORDS = {
    "sqlite": {"now": "((julianday('now') - 2440587.5) * 86400.0)", "skip_locked": ""},
    "postgresql": {"now": "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)",
                   "skip_locked": "FOR UPDATE SKIP LOCKED"},
}


class Outbox:
    """The durable queue of notifications. Thread-safe.

    Its database comes from the state-store factory: this node's SQLite file, or with
    ``[cluster] database`` the PostgreSQL table every node shares. A deliverer *claims*
    due messages (:meth:`claim`): on PostgreSQL ``SELECT … FOR UPDATE SKIP LOCKED``, so
    nodes claiming at once take different messages; on SQLite the claim is one
    ``BEGIN IMMEDIATE`` transaction (several processes may share the file). A claim is a
    lease on the database's clock: a message whose lease ran out (its node died in the
    middle) is claimed again by any node. The outcome is recorded only by the latest
    claim (``claimed_by`` and ``claims`` unchanged since), so a node that comes back late
    cannot overwrite what another node recorded."""

    def __init__(self, stores: StateStoreFactory) -> None:
        self.node = stores.node
        self._db: SqlDatabase = stores.database("outbox", MIGRATIONS)
        self.shared = self._db.dialect.name == "postgresql"
        self.errors = self._db.errors
        words = {**self._db.dialect.words, **_WORDS[self._db.dialect.name]}
        self._sql: Callable[[str], str] = lambda sql: sql.format(**words)

    def close(self) -> None:
        self._db.close()

    def _run(self, write: bool, fn: Callable[[Cursor], Any]) -> Any:
        db = self._db
        with (db.transaction() if write else db.read()) as cur:
            return fn(cur)

    def add(self, kind: str, target: str, body: dict[str, Any], script: str) -> int:
        """Queue one message, due now; :class:`OverflowError` past :data:`MAX_PENDING`."""
        text = json.dumps(body, ensure_ascii=False)

        def add(cur: Cursor) -> int:
            (pending,) = cur.execute("SELECT COUNT(*) FROM outbox WHERE status = 'pending'").fetchone() or (0,)
            if pending >= MAX_PENDING:
                raise OverflowError(f"the notification outbox is full ({MAX_PENDING} pending messages)")
            row = cur.execute(self._sql(
                "INSERT INTO outbox (kind, target, body, script, created, status, next_at) "
                "VALUES (?, ?, ?, ?, {now}, 'pending', {now}) RETURNING id"),
                (kind, target, text, script, )).fetchone()
            assert row is not None  # an INSERT … RETURNING returns its row
            return int(row[0])

        return int(self._run(True, add))

    def make_all_due(self) -> int:
        """At start: what this node had claimed when it stopped or died is due now, and on one
        node (SQLite) every pending message is (a retry's wait is not kept over a restart).
        In a cluster the other nodes' messages keep their times: they are theirs, or
        waiting for a retry."""
        def due(cur: Cursor) -> int:
            sql = "UPDATE outbox SET next_at = {now}, lease_until = 0 WHERE status = 'pending'"
            if self.shared:
                n = cur.execute(self._sql(sql + " AND claimed_by = ?"), (self.node,)).rowcount
            else:
                n = cur.execute(self._sql(sql)).rowcount
            cur.execute(self._sql("DELETE FROM outbox WHERE status = 'delivered' AND done_at < {now} - ?"),
                        (KEEP_DELIVERED,))
            return n

        return int(self._run(True, due))

    def next_due(self) -> float | None:
        """Seconds until the next pending message may be claimed (<= 0: now), or None."""
        def wait(cur: Cursor) -> float | None:
            row = cur.execute(self._sql("SELECT MIN({greatest}(next_at, lease_until)) - {now} FROM outbox "
                                        "WHERE status = 'pending'")).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        result: float | None = self._run(False, wait)
        return result

    def claim(self, lease: float, limit: int = 20) -> list[dict[str, Any]]:
        """Take up to *limit* due messages for *lease* seconds of the database's clock; each
        dict's ``claim`` (with this node's name) is what :meth:`delivered`, :meth:`retry`
        and :meth:`failed` must show to record an outcome."""
        def take(cur: Cursor) -> list[tuple[Any, ...]]:
            rows = cur.execute(self._sql(
                "SELECT id, kind, target, body, script, attempts, created, claims FROM outbox "
                "WHERE status = 'pending' AND next_at <= {now} AND lease_until <= {now} "
                "ORDER BY next_at, id LIMIT ? {skip_locked}"), (limit,)).fetchall()
            for r in rows:
                cur.execute(self._sql("UPDATE outbox SET claimed_by = ?, lease_until = {now} + ?, "
                                      "claims = claims + 1 WHERE id = ?"), (self.node, lease, r[0]))
            return rows

        rows: list[tuple[Any, ...]] = self._run(True, take)
        return [{"id": int(r[0]), "kind": r[1], "target": r[2], "body": json.loads(r[3]), "script": r[4],
                 "attempts": int(r[5]), "created": float(r[6]), "claim": int(r[7]) + 1} for r in rows]

    def _record(self, msg: dict[str, Any], assignments: str, params: tuple[Any, ...]) -> bool:
        """One outcome, written only if *msg*'s claim is still the latest: True if it was."""
        sql = self._sql(f"UPDATE outbox SET {assignments}, attempts = attempts + 1, lease_until = 0 "
                        "WHERE id = ? AND status = 'pending' AND claimed_by = ? AND claims = ?")
        n = self._run(True, lambda cur: cur.execute(sql, (*params, msg["id"], self.node, msg["claim"])).rowcount)
        return bool(n)

    def delivered(self, msg: dict[str, Any]) -> bool:
        return self._record(msg, "status = 'delivered', last_error = '', done_at = {now}", ())

    def retry(self, msg: dict[str, Any], error: str, delay: float) -> bool:
        """Due again *delay* seconds from now (the database's clock)."""
        return self._record(msg, "last_error = ?, next_at = {now} + ?", (error[:1000], delay))

    def failed(self, msg: dict[str, Any], error: str) -> bool:
        return self._record(msg, "status = 'failed', last_error = ?, done_at = {now}", (error[:1000],))

    def release(self, msgs: list[dict[str, Any]]) -> None:
        """Give back claims not started (stopping, or the lease too short for the next
        delivery): any node may take them at once instead of after the lease."""
        def give(cur: Cursor) -> None:
            for m in msgs:
                cur.execute("UPDATE outbox SET lease_until = 0 WHERE id = ? AND status = 'pending' "
                            "AND claimed_by = ? AND claims = ?", (m["id"], self.node, m["claim"]))

        if msgs:
            self._run(True, give)

    def stats(self) -> dict[str, int]:
        """Counts by status: ``pending``, ``failed``, ``delivered`` (for the admin API); in a
        cluster, the whole cluster's."""
        out = {"pending": 0, "failed": 0, "delivered": 0}
        rows = self._run(False, lambda cur: cur.execute("SELECT status, COUNT(*) FROM outbox "
                                                        "GROUP BY status").fetchall())
        for status, n in rows:
            out[status] = int(n)
        return out

    def recent_failures(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self._run(False, lambda cur: cur.execute(
            "SELECT id, kind, target, script, attempts, last_error, done_at FROM outbox "
            "WHERE status = 'failed' ORDER BY done_at DESC LIMIT ?", (limit,)).fetchall())
        return [dict(zip(("id", "kind", "target", "script", "attempts", "error", "time"), r)) for r in rows]


#: the header every webhook POST carries: the message's id, the same on every attempt and node
DELIVERY_HEADER = "X-Scriptsftp-Delivery"


def message_id(mid: int, created: float, sender: str) -> str:
    """An email's Message-ID, the same on every attempt and from every node, so that a
    receiver (or its MTA) can drop a duplicate: from the message's id and queueing time
    (ids start again in a new outbox database) and the sender's domain."""
    domain = sender.rpartition("@")[2] if "@" in sender else "localhost"
    return f"<scriptsftp-outbox.{mid}.{int(created * 1000)}@{domain}>"


class DeliveryError(Exception):
    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # never follow: the URL is the config's
        return None


class Notifier:
    """Delivers the outbox from one thread. ``notify_cfg`` returns the current
    ``[notify]`` section (a reload applies to the next attempt).

    It claims :data:`CLAIM_BATCH` messages at a time for ``[notify] lease`` seconds and
    delivers them one after the other; one whose delivery could outlast what is left of
    the lease (its timeout) is given back with the rest, not started. An outcome that
    cannot be written (the database is away) is kept and written once it is back, before
    anything new is claimed: a delivered message is not delivered again for want of its
    record, unless its lease runs out first and another node takes it."""

    def __init__(self, outbox: Outbox, notify_cfg: Callable[[], Any], resolve: Callable[[str], Path]) -> None:
        self.outbox = outbox
        self.cfg = notify_cfg
        self.resolve = resolve
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opener = urllib.request.build_opener(_NoRedirect)
        #: outcomes not written yet: (what, message, arguments)
        self._unrecorded: list[tuple[str, dict[str, Any], tuple[Any, ...]]] = []
        self._db_failures = 0

    def start(self) -> None:
        try:
            n = self.outbox.make_all_due()
        except self.outbox.errors as exc:  # this node's old claims end with their lease instead
            log.warning("outbox: cannot make pending notifications due: %s", exc)
            n = 0
        if n:
            log.info("outbox: %d notification(s) pending from an earlier run", n)
        self._thread = threading.Thread(target=self._loop, name="notify-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()  # before the claim: the lease is at least this long from here
            try:
                self._record_unrecorded()
                batch = self.outbox.claim(self.cfg().lease, CLAIM_BATCH)
            except self.outbox.errors as exc:
                self._database_failed("cannot read the queue", exc)
                continue
            self._db_failures = 0
            if batch:
                self._deliver_batch(batch, started)
                continue
            try:
                due = self.outbox.next_due()
            except self.outbox.errors:
                due = None
            # in a cluster, poll more often: a message queued by a node that died before claiming it
            poll = 10.0 if self.outbox.shared else 60.0
            self._wake.wait(poll if due is None else min(poll, max(0.0, due)))
            self._wake.clear()

    def _database_failed(self, what: str, exc: BaseException) -> None:
        """Logged at the first failure, then every tenth; waits 1 s, doubling up to 30 s."""
        self._db_failures += 1
        if self._db_failures % 10 == 1:
            log.error("outbox: %s: %s (trying again)", what, exc)
        first, most = DB_RETRY
        self._stop.wait(min(most, first * 2 ** (self._db_failures - 1)))

    def _deliver_batch(self, batch: list[dict[str, Any]], started: float) -> None:
        for i, msg in enumerate(batch):
            cfg = self.cfg()
            if self._stop.is_set() or time.monotonic() - started + self._timeout(cfg, msg) >= cfg.lease:
                try:
                    self.outbox.release(batch[i:])
                except self.outbox.errors as exc:  # their leases run out instead
                    log.warning("outbox: cannot give back %d claimed message(s): %s", len(batch) - i, exc)
                return
            self._deliver(cfg, msg)

    @staticmethod
    def _timeout(cfg: Any, msg: dict[str, Any]) -> float:
        """The longest a delivery of *msg* should take (its connection's timeout)."""
        if msg["kind"] == "webhook":
            hook = cfg.webhooks.get(msg["target"])
            return float(hook.timeout) if hook is not None else 0.0
        return float(cfg.smtp.timeout)

    def _record(self, what: str, msg: dict[str, Any], *args: Any) -> None:
        """Write an outcome; kept for later if the database fails."""
        try:
            self._write(what, msg, args)
        except self.outbox.errors as exc:
            log.warning("outbox: the outcome of %s %d is not written yet: %s", msg["kind"], msg["id"], exc)
            self._unrecorded.append((what, msg, args))

    def _record_unrecorded(self) -> None:
        while self._unrecorded:
            what, msg, args = self._unrecorded[0]
            self._write(what, msg, args)
            self._unrecorded.pop(0)

    def _write(self, what: str, msg: dict[str, Any], args: tuple[Any, ...]) -> None:
        if what == "delivered":
            done = self.outbox.delivered(msg)
        elif what == "retry":
            done = self.outbox.retry(msg, *args)
        else:
            done = self.outbox.failed(msg, *args)
        if not done:
            log.warning("outbox: %s %d: its lease ran out and another node claimed it; this node's outcome "
                        "(%s) is not recorded", msg["kind"], msg["id"], what)

    def _deliver(self, cfg: Any, msg: dict[str, Any]) -> None:
        mid, kind, target = msg["id"], msg["kind"], msg["target"]
        try:
            if kind == "email":
                self._send_email(cfg, msg["body"], msg)
            elif kind == "webhook":
                self._post_webhook(cfg, target, msg["body"], msg["script"], mid)
            else:
                raise DeliveryError(f"unknown kind {kind!r}", permanent=True)
        except DeliveryError as exc:
            self._failure(cfg, msg, str(exc), exc.permanent)
            return
        except Exception as exc:  # noqa: BLE001 - any delivery problem is a failed attempt
            self._failure(cfg, msg, f"{type(exc).__name__}: {exc}", False)
            return
        self._record("delivered", msg)
        log.info("%s %d to %s delivered (attempt %d)", kind, mid, target, msg["attempts"] + 1,
                 extra={"script": msg["script"]})

    def _failure(self, cfg: Any, msg: dict[str, Any], error: str, permanent: bool) -> None:
        attempts = msg["attempts"] + 1
        what = f"{msg['kind']} {msg['id']} to {msg['target']}"
        if permanent or attempts >= cfg.max_attempts:
            self._record("failed", msg, error)
            log.error("%s failed for good after %d attempt(s): %s", what, attempts, error,
                      extra={"script": msg["script"]})
            return
        delay = min(MAX_BACKOFF, cfg.retry_delay * 2 ** (attempts - 1))
        self._record("retry", msg, error, delay)
        log.warning("%s attempt %d failed, retrying in %.0fs: %s", what, attempts, delay, error,
                    extra={"script": msg["script"]})

    def _send_email(self, cfg: Any, body: dict[str, Any], msg: dict[str, Any]) -> None:
        smtp = cfg.smtp
        m = EmailMessage()
        m["From"] = smtp.sender
        m["To"] = ", ".join(body["to"])
        m["Subject"] = body["subject"]
        m["Date"] = formatdate(localtime=True)
        m["Message-ID"] = message_id(msg["id"], msg["created"], smtp.sender)
        m["X-Scriptsftp-Script"] = body.get("script", "")
        m.set_content(body["body"])
        context = None
        if smtp.starttls:
            context = ssl.create_default_context(cafile=str(self.resolve(smtp.ca_file)) if smtp.ca_file else None)
        with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout) as s:
            s.ehlo()
            if context is not None:
                s.starttls(context=context)
                s.ehlo()
            if smtp.username:
                s.login(smtp.username, smtp.password)
            s.send_message(m, from_addr=smtp.sender, to_addrs=list(body["to"]))

    def _post_webhook(self, cfg: Any, name: str, body: dict[str, Any], script: str, mid: int) -> None:
        hook = cfg.webhooks.get(name)
        if hook is None:
            raise DeliveryError(f"webhook {name!r} is no longer configured", permanent=True)
        data = json.dumps(body["payload"], ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "User-Agent": "scriptsftp", "X-Scriptsftp-Script": script}
        headers.update(hook.headers)
        headers[DELIVERY_HEADER] = str(mid)  # the receiver's key to drop a duplicate: never the config's
        req = urllib.request.Request(hook.url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=hook.timeout) as resp:
                resp.read(65536)
                status = resp.status
        except urllib.error.HTTPError as exc:
            raise DeliveryError(f"HTTP {exc.code} from webhook {name!r}") from None
        except urllib.error.URLError as exc:
            raise DeliveryError(f"webhook {name!r} unreachable: {exc.reason}") from None
        if not 200 <= status < 300:
            raise DeliveryError(f"HTTP {status} from webhook {name!r}")


class NotifyCapability:
    """Parent-side handler of ``api.notify``: validates and queues, never delivers."""

    def __init__(self, outbox: Outbox, notifier: Notifier, notify_cfg: Callable[[], Any]) -> None:
        self.outbox = outbox
        self.notifier = notifier
        self.cfg = notify_cfg

    def __call__(self, call: CapabilityCall, op: str, args: list) -> Any:
        if op == "email" and len(args) == 3:
            return self._email(call, *args)
        if op == "webhook" and len(args) == 2:
            return self._webhook(call, *args)
        raise CapabilityError(f"api.notify has no operation {op!r} taking {len(args)} argument(s) "
                              "(email(to, subject, body), webhook(name, payload))", "TypeError")

    def _queue(self, call: CapabilityCall, kind: str, target: str, body: dict[str, Any]) -> int:
        sent = call.extra.get("notify_queued", 0)
        if sent >= MAX_PER_CALL:
            raise CapabilityError(f"at most {MAX_PER_CALL} notifications per handler call", "OverflowError")
        call.extra["notify_queued"] = sent + 1
        try:
            mid = self.outbox.add(kind, target, body, call.script)
        except OverflowError as exc:
            log.error("%s from %s refused: %s", kind, call.script, exc)
            raise CapabilityError(str(exc), "OverflowError") from None
        except self.outbox.errors as exc:
            log.error("%s from %s not queued: the outbox's database failed: %s", kind, call.script, exc,
                      extra={"script": call.script})
            raise CapabilityError("the notification outbox is unavailable: its database cannot be reached "
                                  "or failed; nothing was queued", "RuntimeError") from None
        self.notifier.wake()
        log.info("%s %d to %s queued", kind, mid, target, extra={"script": call.script})
        return mid

    def _email(self, call: CapabilityCall, to: Any, subject: Any, body: Any) -> int:
        recipients = [to] if type(to) is str else to
        if type(recipients) is not list or not recipients or not all(type(r) is str for r in recipients):
            raise CapabilityError("api.notify.email(to, subject, body): to must be an address or a list of "
                                  "addresses", "TypeError")
        if len(recipients) > MAX_RECIPIENTS:
            raise CapabilityError(f"api.notify.email(): at most {MAX_RECIPIENTS} recipients", "ValueError")
        for r in recipients:
            if len(r) > 254 or not _ADDRESS.match(r):
                raise CapabilityError(f"api.notify.email(): {r[:80]!r} is not an email address", "ValueError")
        if type(subject) is not str or type(body) is not str:
            raise CapabilityError("api.notify.email(to, subject, body): subject and body must be str", "TypeError")
        if len(subject) > MAX_SUBJECT_CHARS or any(c in subject for c in "\r\n\x00"):
            raise CapabilityError(f"api.notify.email(): the subject must be one line of at most "
                                  f"{MAX_SUBJECT_CHARS} characters", "ValueError")
        if len(body.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES or "\x00" in body:
            raise CapabilityError(f"api.notify.email(): the body must be text of at most {MAX_BODY_BYTES} bytes",
                                  "ValueError")
        return self._queue(call, "email", ", ".join(recipients),
                           {"to": recipients, "subject": subject, "body": body, "script": call.script})

    def _webhook(self, call: CapabilityCall, name: Any, payload: Any) -> int:
        if type(name) is not str:
            raise CapabilityError("api.notify.webhook(name, payload): name must be a str", "TypeError")
        hooks = self.cfg().webhooks
        if name not in hooks:
            known = ", ".join(sorted(hooks)) or "none"
            log.warning("%s asked for unknown webhook %r (refused)", call.script, name[:200],
                        extra={"script": call.script})
            raise CapabilityError(f"no webhook named {name[:80]!r} in [notify.webhooks] (configured: {known}); "
                                  "scripts name a webhook, they cannot give a URL", "PermissionError")
        try:
            size = len(json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        except (TypeError, ValueError, RecursionError):
            raise CapabilityError("api.notify.webhook(): payload must be JSON data", "TypeError") from None
        if size > MAX_PAYLOAD_BYTES:
            raise CapabilityError(f"api.notify.webhook(): payload larger than {MAX_PAYLOAD_BYTES} bytes of JSON",
                                  "ValueError")
        return self._queue(call, "webhook", name, {"payload": payload})
