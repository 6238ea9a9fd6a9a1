"""``api.notify``: email and webhooks, delivered from a durable outbox.

A script's ``api.notify.email()`` / ``api.notify.webhook()`` only *queues* a
message: one row in an SQLite database under ``state_dir`` (docs/architecture.md rule
10: behind the small :class:`Outbox` interface, so it can move to PostgreSQL).
The call returns at once; a :class:`Notifier` thread delivers, retrying with
exponential backoff (``[notify] retry_delay`` doubling up to an hour, at most
``[notify] max_attempts`` tries). A message queued before a daemon restart is
delivered after it: on start every pending message is due at once.

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
import sqlite3
import ssl
import threading
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Callable

from scriptsftp.server.contract.state import StateStoreFactory

from .capabilities import CapabilityCall, CapabilityError

log = logging.getLogger("scriptsftp.notify")

MAX_RECIPIENTS = 20
MAX_SUBJECT_CHARS = 900
MAX_BODY_BYTES = 1024 * 1024
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_PENDING = 10_000
MAX_PER_CALL = 100          # notifications one handler call may queue
MAX_BACKOFF = 3600.0
#: Seconds a claimed message stays invisible to other deliverers (another process, later).
LEASE = 300.0
KEEP_DELIVERED = 7 * 86400

_ADDRESS = re.compile(r"^[^@\s<>,;:\"()\[\]\\]+@[A-Za-z0-9.\-\[\]:]+$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,          -- 'email' | 'webhook'
    target     TEXT NOT NULL,          -- recipients (email) or webhook name
    body       TEXT NOT NULL,          -- JSON
    script     TEXT NOT NULL,
    created    REAL NOT NULL,
    status     TEXT NOT NULL,          -- 'pending' | 'delivered' | 'failed'
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_at    REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    done_at    REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_at);
"""


class Outbox:
    """The durable queue of notifications. Thread-safe; several processes may
    share the file (claims are leases taken in ``BEGIN IMMEDIATE``)."""

    def __init__(self, stores: StateStoreFactory) -> None:
        self._lock = threading.Lock()
        self._db = stores.connect("outbox")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, kind: str, target: str, body: dict[str, Any], script: str) -> int:
        now = time.time()
        with self._lock:
            (pending,) = self._db.execute("SELECT COUNT(*) FROM outbox WHERE status = 'pending'").fetchone()
            if pending >= MAX_PENDING:
                raise OverflowError(f"the notification outbox is full ({MAX_PENDING} pending messages)")
            cur = self._db.execute(
                "INSERT INTO outbox (kind, target, body, script, created, status, next_at) "
                "VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                (kind, target, json.dumps(body, ensure_ascii=False), script, now, now))
            return int(cur.lastrowid or 0)  # an INSERT always sets it

    def make_all_due(self) -> int:
        """At start: every pending message (also ones claimed by a run that died) is due now."""
        with self._lock:
            cur = self._db.execute("UPDATE outbox SET next_at = ? WHERE status = 'pending'", (time.time(),))
            self._db.execute("DELETE FROM outbox WHERE status = 'delivered' AND done_at < ?",
                             (time.time() - KEEP_DELIVERED,))
            return cur.rowcount

    def next_due(self) -> float | None:
        with self._lock:
            (t,) = self._db.execute("SELECT MIN(next_at) FROM outbox WHERE status = 'pending'").fetchone()
        return t

    def claim(self, limit: int = 20) -> list[dict[str, Any]]:
        """Take up to *limit* due messages (leased for :data:`LEASE` seconds)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT id, kind, target, body, script, attempts FROM outbox "
                    "WHERE status = 'pending' AND next_at <= ? ORDER BY next_at, id LIMIT ?",
                    (now, limit)).fetchall()
                self._db.executemany("UPDATE outbox SET next_at = ? WHERE id = ?",
                                     [(now + LEASE, r[0]) for r in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [{"id": r[0], "kind": r[1], "target": r[2], "body": json.loads(r[3]), "script": r[4],
                 "attempts": r[5]} for r in rows]

    def delivered(self, msg_id: int) -> None:
        with self._lock:
            self._db.execute("UPDATE outbox SET status = 'delivered', attempts = attempts + 1, last_error = '', "
                             "done_at = ? WHERE id = ?", (time.time(), msg_id))

    def retry(self, msg_id: int, error: str, at: float) -> None:
        with self._lock:
            self._db.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_at = ? WHERE id = ?",
                             (error[:1000], at, msg_id))

    def failed(self, msg_id: int, error: str) -> None:
        with self._lock:
            self._db.execute("UPDATE outbox SET status = 'failed', attempts = attempts + 1, last_error = ?, "
                             "done_at = ? WHERE id = ?", (error[:1000], time.time(), msg_id))

    def stats(self) -> dict[str, int]:
        """Counts by status: ``pending``, ``failed``, ``delivered`` (for the admin API)."""
        out = {"pending": 0, "failed": 0, "delivered": 0}
        with self._lock:
            for status, n in self._db.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status"):
                out[status] = n
        return out

    def recent_failures(self, limit: int = 20) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, target, script, attempts, last_error, done_at FROM outbox "
                "WHERE status = 'failed' ORDER BY done_at DESC LIMIT ?", (limit,)).fetchall()
        return [dict(zip(("id", "kind", "target", "script", "attempts", "error", "time"), r)) for r in rows]


class DeliveryError(Exception):
    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # never follow: the URL is the config's
        return None


class Notifier:
    """Delivers the outbox from one thread. ``notify_cfg`` returns the current
    ``[notify]`` section (a reload applies to the next attempt)."""

    def __init__(self, outbox: Outbox, notify_cfg: Callable[[], Any], resolve: Callable[[str], Path]) -> None:
        self.outbox = outbox
        self.cfg = notify_cfg
        self.resolve = resolve
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opener = urllib.request.build_opener(_NoRedirect)

    def start(self) -> None:
        n = self.outbox.make_all_due()
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
            try:
                batch = self.outbox.claim()
            except sqlite3.Error as exc:
                log.error("outbox: cannot read the queue: %s", exc)
                batch = []
            for msg in batch:
                if self._stop.is_set():
                    return  # its lease ends; the next start makes it due again
                self._deliver(msg)
            if batch:
                continue
            try:
                due = self.outbox.next_due()
            except sqlite3.Error:
                due = None
            wait = 60.0 if due is None else min(60.0, max(0.0, due - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

    def _deliver(self, msg: dict[str, Any]) -> None:
        cfg = self.cfg()
        mid, kind, target = msg["id"], msg["kind"], msg["target"]
        try:
            if kind == "email":
                self._send_email(cfg, msg["body"], mid)
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
        self.outbox.delivered(mid)
        log.info("%s %d to %s delivered (attempt %d)", kind, mid, target, msg["attempts"] + 1,
                 extra={"script": msg["script"]})

    def _failure(self, cfg: Any, msg: dict[str, Any], error: str, permanent: bool) -> None:
        attempts = msg["attempts"] + 1
        what = f"{msg['kind']} {msg['id']} to {msg['target']}"
        if permanent or attempts >= cfg.max_attempts:
            self.outbox.failed(msg["id"], error)
            log.error("%s failed for good after %d attempt(s): %s", what, attempts, error,
                      extra={"script": msg["script"]})
            return
        delay = min(MAX_BACKOFF, cfg.retry_delay * 2 ** (attempts - 1))
        self.outbox.retry(msg["id"], error, time.time() + delay)
        log.warning("%s attempt %d failed, retrying in %.0fs: %s", what, attempts, delay, error,
                    extra={"script": msg["script"]})

    def _send_email(self, cfg: Any, body: dict[str, Any], mid: int) -> None:
        smtp = cfg.smtp
        m = EmailMessage()
        m["From"] = smtp.sender
        m["To"] = ", ".join(body["to"])
        m["Subject"] = body["subject"]
        m["Date"] = formatdate(localtime=True)
        m["Message-ID"] = make_msgid(idstring=f"outbox{mid}")
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
        headers = {"Content-Type": "application/json", "User-Agent": "scriptsftp",
                   "X-Scriptsftp-Script": script, "X-Scriptsftp-Delivery": str(mid)}
        headers.update(hook.headers)
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
