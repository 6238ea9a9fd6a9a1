"""The cookbook examples that use api.fs, api.notify and api.run, end to end:
real daemon, real SFTP clients, aiosmtpd as the mail server, an aiohttp server
as the webhook receiver, clamd from Debian for the antivirus example.

Helpers (copying the shipped example, binding it with its own header
snippet) come from tests/test_cookbook.py.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import paramiko
import pytest

from conftest import IN_CI, Daemon, DaemonFactory, close_client, paramiko_client, sftp_batch
from test_cookbook import assert_absent, header_snippet, install, mkdirs, put, put_refused, to_toml


# --- receivers: SMTP (aiosmtpd) and webhooks (aiohttp), on one background loop ------------


@dataclass
class Received:
    """What the receivers got; tests wait on it (no sleeps)."""

    mails: list[email.message.EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    hooks: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, kind: str, item: Any) -> None:
        with self.cond:
            getattr(self, kind).append(item)
            self.cond.notify_all()

    def wait(self, what: Callable[["Received"], Any], timeout: float = 30.0, log: Daemon | None = None) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = what(self)
                if found:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("not received; mails: "
                                         + repr([m["Subject"] for m in self.mails]) + "; hooks: "
                                         + repr(self.hooks) + ("\n--- log:\n" + log.log_text()[-4000:] if log else ""))
                self.cond.wait(min(remaining, 0.5))

    def mail(self, subject_part: str, **kw: Any) -> email.message.EmailMessage:
        return self.wait(lambda r: next((m for m in r.mails if subject_part in m["Subject"]), None), **kw)

    def hook(self, name: str, pred: Callable[[Any], bool] = lambda p: True, **kw: Any) -> Any:
        return self.wait(lambda r: next((p for n, _, p in r.hooks if n == name and pred(p)), None), **kw)


class Receivers:
    def __init__(self) -> None:
        self.got = Received()
        self.loop = asyncio.new_event_loop()
        self.smtp_port = self.http_port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(30), "receivers did not start"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        from aiohttp import web
        from aiosmtpd.smtp import SMTP

        got = self.got

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
                got.add("envelopes", (envelope.mail_from, list(envelope.rcpt_tos)))
                got.add("mails", email.message_from_bytes(envelope.content, policy=email.policy.default))
                return "250 Message accepted"

        self.smtp = await self.loop.create_server(lambda: SMTP(Handler(), hostname="cookbook-test"),
                                                  "127.0.0.1", 0)
        self.smtp_port = self.smtp.sockets[0].getsockname()[1]

        async def hook(request: web.Request) -> web.Response:
            got.add("hooks", (request.match_info["name"], dict(request.headers), await request.json()))
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/hook/{name}", hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def stop() -> None:
            self.smtp.close()
            await self.runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def notify_patch(self, data: dict[str, Any]) -> None:
        """Point an example's [notify] tables at these receivers."""
        notify = data.get("notify", {})
        if "smtp" in notify:
            notify["smtp"].update(host="127.0.0.1", port=self.smtp_port)
        for name, hook in notify.get("webhooks", {}).items():
            hook["url"] = f"http://127.0.0.1:{self.http_port}/hook/{name}"
        if notify:
            notify.setdefault("retry_delay", 0.5)


@pytest.fixture(scope="module")
def receivers():
    r = Receivers()
    yield r
    r.close()


def merged_toml(*docs: dict[str, Any]) -> str:
    """Several examples' snippets as one config: bindings concatenated, tables
    merged; [scripts] keys come first (conftest puts this text inside [scripts])."""
    out: dict[str, Any] = {"bindings": []}
    scripts: dict[str, Any] = {}

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    for doc in docs:
        out["bindings"] += doc.pop("bindings", [])
        scripts.update(doc.pop("scripts", {}))
        merge(out, doc)
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in scripts.items()) + to_toml(out)


def snippet(name: str, inbox: str | None = None, **overrides: Any) -> dict[str, Any]:
    """An example's header snippet, its "/inbox" globs moved to ``inbox``."""
    data = header_snippet(name)
    for b in data.get("bindings", []):
        if inbox is not None and "paths" in b:
            b["paths"] = [inbox + "/" + p.split("/", 2)[2] for p in b["paths"]]
        b.update(overrides)
    return data


# --- clamd from Debian's clamav-daemon, with a test signature only ---------------------------

VIRUS_MARKER = b"COOKBOOK-TEST-VIRUS-MARKER-7f3a"
CLAMD = shutil.which("clamd") or ("/usr/sbin/clamd" if os.path.exists("/usr/sbin/clamd") else None)


class Clamd:
    """clamd with a LocalSocket in a short tmp dir (sun_path is 108 bytes) and a
    database holding only a custom signature for VIRUS_MARKER."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cb-clamd-"))
        (self.dir / "db").mkdir()
        (self.dir / "db" / "cookbook.ndb").write_text(f"Cookbook.Test.Marker:0:*:{VIRUS_MARKER.hex()}\n")
        self.conf = self.dir / "clamd.conf"
        self.conf.write_text(f"LocalSocket {self.dir}/clamd.sock\nDatabaseDirectory {self.dir}/db\n"
                             f"Foreground yes\nLogFile {self.dir}/clamd.log\nTemporaryDirectory {self.dir}\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([CLAMD, f"--config-file={self.conf}"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ping = ["clamdscan", f"--config-file={self.conf}", "--ping", "1"]
        deadline = time.monotonic() + 60
        while subprocess.run(ping, capture_output=True).returncode != 0:
            assert self.proc.poll() is None, (self.dir / "clamd.log").read_text()
            assert time.monotonic() < deadline, "clamd did not answer within 60 s"
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def clamd_conf():
    c = Clamd()
    yield c
    c.close()


@pytest.fixture(scope="module")
def clamd(clamd_conf: Clamd) -> Clamd:
    if CLAMD is None or shutil.which("clamdscan") is None:
        if IN_CI:
            pytest.fail("clamd/clamdscan are not installed (apt install clamav-daemon)")
        pytest.skip("clamd/clamdscan are not installed (apt install clamav-daemon)")
    clamd_conf.start()
    return clamd_conf


# --- one daemon for the fs / notify / run examples (each test has its own folder) ------------


@pytest.fixture(scope="module")
def cap_daemon(module_daemons: DaemonFactory, receivers: "Receivers", clamd_conf: Clamd) -> Daemon:
    names = ["checksum_sidecar.py", "manifest_order.py", "route_archive.py", "notify_upload.py",
             "antivirus_clamav.py", "brute_force_alert.py"]
    install(module_daemons, *names)
    docs = [
        snippet("checksum_sidecar.py", "/sums"),
        snippet("manifest_order.py", "/batches"),
        snippet("route_archive.py", "/routed"),
        snippet("notify_upload.py", "/notify"),
        snippet("antivirus_clamav.py", paths=["/scan/**"]),
        snippet("brute_force_alert.py"),
    ]
    for doc in docs:
        receivers.notify_patch(doc)
    docs[2]["scripts"]["fs_admin_root"] = "archive-root"
    argv = docs[4]["commands"]["clamscan"]["argv"]
    argv.insert(1, f"--config-file={clamd_conf.conf}")
    d = module_daemons.start(merged_toml(*docs))
    mkdirs(d, "alice", "/sums", "/batches/b1", "/batches/b2", "/routed/invoices", "/notify", "/scan")
    return d


@pytest.fixture
def alice(cap_daemon: Daemon, alice_key):
    sftp = paramiko_client(cap_daemon, key=alice_key)
    yield sftp
    close_client(sftp)


# 2. checksum_sidecar.py --------------------------------------------------------------------


def test_checksum_sidecar(cap_daemon: Daemon, alice):
    d = cap_daemon
    data = b"id,amount\n1,12.50\n" * 100
    digest = hashlib.sha256(data).hexdigest()
    put_refused(alice, "/sums/data.csv", data, r"upload data\.csv\.sha256 \(its SHA-256\) before data\.csv")
    assert_absent(d, "alice", "/sums/data.csv", alice)
    put_refused(alice, "/sums/data.csv.sha256", b"not a checksum\n",
                r"data\.csv\.sha256 must start with the file's SHA-256 \(64 hex digits\), "
                r"as written by: sha256sum data\.csv")
    put(alice, "/sums/data.csv.sha256", f"{digest}  data.csv\n".encode())
    put(alice, "/sums/data.csv", data)
    assert (d.home() / "sums/data.csv").read_bytes() == data
    d.wait_log(rf"checksum_sidecar\.py: checksum verified path=/sums/data\.csv sha256={digest}", timeout=30)
    # damaged on the way: refused, and the good version stays
    put_refused(alice, "/sums/data.csv", data[:-5],
                rf"data\.csv is damaged or incomplete: its SHA-256 is {hashlib.sha256(data[:-5]).hexdigest()}, "
                rf"but data\.csv\.sha256 says {digest}; please upload it again")
    assert (d.home() / "sums/data.csv").read_bytes() == data
    # a bare digest (no file name) is fine too
    put(alice, "/sums/b.bin.sha256", hashlib.sha256(b"b").hexdigest().upper().encode())
    put(alice, "/sums/b.bin", b"b")


# 6. manifest_order.py ----------------------------------------------------------------------


def test_manifest_order(cap_daemon: Daemon, alice, alice_key, tmp_path: Path):
    d = cap_daemon
    put_refused(alice, "/batches/b1/batch.done", b"", r"upload manifest\.json before batch\.done")
    manifest = {"files": ["orders.csv", {"name": "lines.csv", "size": 10}, "notes.txt"]}
    put(alice, "/batches/b1/manifest.json", json.dumps(manifest).encode())
    put(alice, "/batches/b1/orders.csv", b"1,2\n")
    put(alice, "/batches/b1/lines.csv", b"short")
    put_refused(alice, "/batches/b1/batch.done", b"",
                r"batch\.done refused: 2 of 3 files in manifest\.json are not complete yet: "
                r"lines\.csv \(size 5, expected 10\), notes\.txt")
    assert_absent(d, "alice", "/batches/b1/batch.done", alice)
    # OpenSSH's sftp is refused too (it shows "Permission denied")
    done = tmp_path / "batch.done"
    done.write_bytes(b"")
    assert sftp_batch(d, f"put {done} /batches/b1/batch.done\n", alice_key).returncode != 0
    assert_absent(d, "alice", "/batches/b1/batch.done")
    put(alice, "/batches/b1/lines.csv", b"0123456789")
    put(alice, "/batches/b1/notes.txt", b"n")
    put(alice, "/batches/b1/batch.done", b"")
    assert (d.home() / "batches/b1/batch.done").exists()
    d.wait_log(r"manifest_order\.py: batch complete folder=/batches/b1 files=3", timeout=30)
    # a manifest that is not what the script expects
    put(alice, "/batches/b2/manifest.json", b"[1, 2]")
    put_refused(alice, "/batches/b2/batch.done", b"", r'manifest\.json is not valid: expected \{"files"')
    put(alice, "/batches/b2/manifest.json", b'{"files": ["../b1/orders.csv"]}')
    put_refused(alice, "/batches/b2/batch.done", b"", r"manifest\.json lists an invalid entry: \.\./b1/orders\.csv")


# 9. route_archive.py -----------------------------------------------------------------------


def test_route_archive(cap_daemon: Daemon, alice, receivers: "Receivers"):
    d = cap_daemon
    put(alice, "/routed/invoices/INV-1.pdf", b"%PDF-1.7 invoice one")
    put(alice, "/routed/invoices/notes.txt", b"not an invoice")       # not matched by the binding
    m = d.wait_log(r"route_archive\.py: archived path=/routed/invoices/INV-1\.pdf "
                   r"to=(/archive/alice/\d{4}/\d\d/INV-1\.pdf)", timeout=30)
    archived = d.root / "archive-root" / m.group(1).lstrip("/")
    assert archived.read_bytes() == b"%PDF-1.7 invoice one"
    assert_absent(d, "alice", "/routed/invoices/INV-1.pdf")
    assert sorted(alice.listdir("/routed/invoices")) == ["notes.txt"]
    mail = receivers.got.mail("[sftp] new invoice from alice: INV-1.pdf", log=d)
    assert mail["To"] == "accounting@example.com"
    assert f"It is archived as {m.group(1)}." in mail.get_content()
    # the same name again does not overwrite the archived one
    put(alice, "/routed/invoices/INV-1.pdf", b"%PDF-1.7 invoice one, again")
    m2 = d.wait_log(r"route_archive\.py: archived path=/routed/invoices/INV-1\.pdf to=(\S+/INV-1-1\.pdf)",
                    timeout=30)
    assert (d.root / "archive-root" / m2.group(1).lstrip("/")).read_bytes() == b"%PDF-1.7 invoice one, again"
    assert archived.read_bytes() == b"%PDF-1.7 invoice one"
    # the user cannot reach the archive: it is outside the home
    assert "archive" not in alice.listdir("/")


def test_route_archive_for_an_upload_only_partner(daemons: DaemonFactory, receivers: "Receivers", alice_key):
    """The recipe as shipped works for a partner who may only upload into /inbox/invoices (no
    download, no delete): its binding is granted own_file, so the move is the server's."""
    from conftest import user_toml

    install(daemons, "route_archive.py")
    doc = snippet("route_archive.py")
    receivers.notify_patch(doc)
    doc["scripts"]["fs_admin_root"] = "archive-root"
    users = user_toml("drop", keys=[alice_key], permissions='{ "/" = ["list"], "/inbox/invoices" = ["list", "upload"] }')
    d = daemons.start(merged_toml(doc), users=users)
    mkdirs(d, "drop", "/inbox/invoices")
    sftp = paramiko_client(d, "drop", key=alice_key)
    try:
        put(sftp, "/inbox/invoices/INV-9.pdf", b"%PDF-1.7 invoice nine")
        m = d.wait_log(r"route_archive\.py: archived path=/inbox/invoices/INV-9\.pdf "
                       r"to=(/archive/drop/\d{4}/\d\d/INV-9\.pdf)", timeout=30)
        assert (d.root / "archive-root" / m.group(1).lstrip("/")).read_bytes() == b"%PDF-1.7 invoice nine"
        assert sftp.listdir("/inbox/invoices") == []
        with pytest.raises(IOError):  # the partner's own rights are unchanged: no delete
            sftp.putfo(io.BytesIO(b"x"), "/inbox/invoices/notes.txt")
            sftp.remove("/inbox/invoices/notes.txt")
        receivers.got.mail("[sftp] new invoice from drop: INV-9.pdf", log=d)
    finally:
        close_client(sftp)


# 10. notify_upload.py ----------------------------------------------------------------------


def test_notify_upload_email_and_webhook(cap_daemon: Daemon, alice, receivers: "Receivers"):
    d = cap_daemon
    data = os.urandom(300_000)
    digest = hashlib.sha256(data).hexdigest()
    put(alice, "/notify/report.bin", data)
    hook = receivers.got.hook("uploads", lambda p: p.get("path") == "/notify/report.bin", log=d)
    assert hook["sha256"] == digest and hook["size"] == 300_000 and hook["user"] == "alice"
    assert hook["event"] == "upload" and hook["protocol"] == "sftp" and hook["remote_ip"] == "127.0.0.1"
    assert hook["time"].endswith("Z")
    mail = receivers.got.mail("[sftp] alice uploaded /notify/report.bin", log=d)
    assert mail["To"] == "sftp-admin@example.com"
    body = mail.get_content()
    assert f"SHA-256:  {digest}" in body and "Size:     300000 bytes" in body
    # uploads elsewhere are not announced
    put(alice, "/sums/unrelated.txt.sha256", hashlib.sha256(b"u").hexdigest().encode())
    put(alice, "/notify/second.txt", b"2")
    receivers.got.hook("uploads", lambda p: p.get("path") == "/notify/second.txt", log=d)
    assert not any(p.get("path", "").startswith("/sums") for _, _, p in receivers.got.hooks)


# 5. antivirus_clamav.py --------------------------------------------------------------------


def test_antivirus_clamav(cap_daemon: Daemon, alice, clamd: Clamd):
    d = cap_daemon
    put(alice, "/scan/clean.pdf", b"%PDF-1.7 nothing to see " * 100)
    d.wait_log(r"antivirus_clamav\.py: clean path=/scan/clean\.pdf", timeout=30)
    put_refused(alice, "/scan/invoice.pdf", b"%PDF-1.7 " + VIRUS_MARKER + b" trailer" * 50,
                r"/scan/invoice\.pdf was refused: the virus scanner found Cookbook\.Test\.Marker\.UNOFFICIAL")
    assert_absent(d, "alice", "/scan/invoice.pdf", alice)
    assert (d.home() / "scan/clean.pdf").exists()


def test_antivirus_fails_closed_when_clamd_is_down(cap_daemon: Daemon, alice, clamd: Clamd):
    d = cap_daemon
    clamd.close()          # last test of the module using clamd
    put_refused(alice, "/scan/later.pdf", b"%PDF-1.7 fine",
                r"/scan/later\.pdf could not be scanned for viruses; please try again later")
    assert_absent(d, "alice", "/scan/later.pdf")
    d.wait_log(r"antivirus_clamav\.py: scan failed path=/scan/later\.pdf code=2", timeout=30)


# 12. brute_force_alert.py ------------------------------------------------------------------


def failed_password_login(d: Daemon, user: str, password: str) -> None:
    transport = paramiko.Transport(("127.0.0.1", d.port))
    try:
        transport.start_client(timeout=20)
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password(user, password)
    finally:
        transport.close()


def test_brute_force_alert(cap_daemon: Daemon, receivers: Receivers):
    d = cap_daemon
    for i in range(1, 5):
        failed_password_login(d, "alice", f"guess-{i}")
        d.wait_log(rf"brute_force_alert\.py: failed login counted user=alice failures={i}\b", timeout=30)
    assert not any("failed logins" in m["Subject"] for m in receivers.got.mails)    # 4 failures: no alert yet
    failed_password_login(d, "alice", "guess-5")
    mail = receivers.got.mail("[sftp] 5 failed logins for alice in 10 minutes", log=d)
    assert mail["To"] == "sftp-admin@example.com"
    body = mail.get_content()
    assert "5 wrong passwords were given for the user alice within 10 minutes, the last one over sftp." in body
    assert "From: 127.0.0.1" in body
    hook = receivers.got.hook("ops", lambda p: p.get("alert") == "brute-force", log=d)
    assert hook == {"alert": "brute-force", "user": "alice", "failures": 5, "window_minutes": 10,
                    "addresses": ["127.0.0.1"]}
    # the 6th failure of the same burst sends nothing more
    failed_password_login(d, "alice", "guess-6")
    d.wait_log(r"brute_force_alert\.py: failed login counted user=alice failures=6\b", timeout=30)
    d.wait_log(r"brute_force_alert\.py: brute-force alert sent user=alice failures=5", timeout=30)
    assert "alert sent user=alice failures=6" not in d.log_text()
    assert len([m for m in receivers.got.mails if "failed logins for alice" in m["Subject"]]) == 1
