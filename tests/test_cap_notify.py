"""api.notify: email through a real SMTP server (aiosmtpd, STARTTLS + auth) and webhooks
to a real HTTP receiver (aiohttp), from the durable outbox (survives a daemon restart)."""

from __future__ import annotations

import asyncio
import datetime
import email
import ipaddress
import io
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from adminkit import admin_toml, get, token_hash  # noqa: F401 (token_hash is a fixture)
from conftest import DaemonFactory, close_client, paramiko_client, toml_str
from test_scripting import binding, write_script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload(d, path: str, data: bytes, key) -> None:
    client = paramiko_client(d, key=key)
    try:
        client.putfo(io.BytesIO(data), path, confirm=False)
    finally:
        close_client(client)


class Inbox:
    """Collects what the receivers got; wait() blocks on a condition, not a sleep."""

    def __init__(self) -> None:
        self.items: list = []
        self.cond = threading.Condition()

    def add(self, item) -> None:
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def wait(self, n: int = 1, timeout: float = 30.0) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout), f"got {len(self.items)} of {n}"
            return list(self.items)


class WebhookReceiver:
    """An aiohttp server in its own thread; answers ``status`` to each POST."""

    def __init__(self, port: int, status: int = 200) -> None:
        self.port, self.status = port, status
        self.inbox = Inbox()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = None

    async def _handle(self, request):
        from aiohttp import web

        body = await request.read()
        self.inbox.add({"path": request.path, "headers": dict(request.headers), "body": body})
        return web.Response(status=self.status, text="ok")

    async def _start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def start(self) -> "WebhookReceiver":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class SmtpSink:
    async def handle_DATA(self, server, session, envelope):
        self.inbox.add({"from": envelope.mail_from, "to": list(envelope.rcpt_tos),
                        "msg": email.message_from_bytes(envelope.original_content or envelope.content),
                        "tls": session.ssl is not None, "auth": session.authenticated})
        return "250 OK"

    def __init__(self) -> None:
        self.inbox = Inbox()


@pytest.fixture
def smtp():
    from aiosmtpd.controller import Controller

    sink = SmtpSink()
    port = free_port()
    c = Controller(sink, hostname="127.0.0.1", port=port)
    c.start()
    sink.port = port
    yield sink
    c.stop()


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "smtp.crt", tmp_path / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


NOTIFY_SCRIPT = """
def on_post_upload(event, api):
    api.notify.email("admin@example.com", "upload " + event.path, "user " + event.user + " size " + str(event.size))
    api.notify.webhook("ops", {"user": event.user, "path": event.path, "size": event.size})
    try:
        api.notify.webhook("http://169.254.169.254/latest/meta-data", {"x": 1})
    except PermissionError as e:
        api.log("ssrf refused", error=str(e))
    try:
        api.notify.email("admin@example.com", "evil\\r\\nBcc: victim@example.com", "x")
    except ValueError as e:
        api.log("header injection refused")
    try:
        api.notify.email("not an address", "s", "b")
    except ValueError as e:
        api.log("bad address refused")
"""


def notify_config(smtp_port: int, hook_port: int, **smtp_extra: str) -> str:
    lines = "\n".join(f"{k} = {v}" for k, v in smtp_extra.items())
    return f"""
[notify]
retry_delay = 300

[notify.smtp]
host = "127.0.0.1"
port = {smtp_port}
sender = "scriptsftp@example.com"
timeout = 10
{lines}

[notify.webhooks.ops]
url = "http://127.0.0.1:{hook_port}/hooks/ops"
timeout = 5
headers = {{ "Authorization" = "Bearer hook-token" }}
"""


def test_email_and_webhook_are_delivered_and_ssrf_is_refused(daemons: DaemonFactory, smtp, alice_key, token_hash):
    hook = WebhookReceiver(free_port()).start()
    try:
        write_script(daemons, "notify.py", NOTIFY_SCRIPT)
        write_script(daemons, "nonotify.py", """
            def on_post_upload(event, api):
                try:
                    api.notify.webhook("ops", {})
                except PermissionError as e:
                    api.log("not granted", error=str(e))
        """)
        extra = (binding("post-upload", "notify.py", allow=["notify"], paths=["/inbox/*"])
                 + binding("post-upload", "nonotify.py", paths=["/other/*"])
                 + notify_config(smtp.port, hook.port))
        d = daemons.start(admin_toml(token_hash, bindings=extra))
        (d.home("alice") / "inbox").mkdir(parents=True)
        (d.home("alice") / "other").mkdir(parents=True)
        upload(d, "/inbox/r.csv", b"a,b\n1,2\n", alice_key)
        mail = smtp.inbox.wait(1)[0]
        assert mail["to"] == ["admin@example.com"] and mail["from"] == "scriptsftp@example.com"
        assert mail["msg"]["Subject"] == "upload /inbox/r.csv"
        assert mail["msg"].get_payload().strip() == "user alice size 8"
        # the ids a receiver drops duplicates by (docs/cluster.md, "Notifications")
        assert re.fullmatch(r"<scriptsftp-outbox\.\d+\.\d+@example\.com>", mail["msg"]["Message-ID"])
        post = hook.inbox.wait(1)[0]
        assert post["path"] == "/hooks/ops"
        assert json.loads(post["body"]) == {"user": "alice", "path": "/inbox/r.csv", "size": 8}
        assert post["headers"]["Authorization"] == "Bearer hook-token"
        assert post["headers"]["Content-Type"] == "application/json"
        assert post["headers"]["X-Scriptsftp-Script"] == "notify.py"
        assert post["headers"]["X-Scriptsftp-Delivery"].isdigit()
        m = d.wait_log(r"notify\.py: ssrf refused error=.*")
        assert "no webhook named 'http://169.254.169.254" in m.group(0) and "cannot give a URL" in m.group(0)
        d.wait_log(r"notify\.py: header injection refused")
        d.wait_log(r"notify\.py: bad address refused")
        d.wait_log(r"notify: webhook \d+ to ops delivered")
        d.wait_log(r"notify: email \d+ to admin@example.com delivered")
        # the admin API shows the outbox
        assert get(d, "/api/status")["outbox"] == {"pending": 0, "failed": 0, "delivered": 2}
        upload(d, "/other/x", b"x", alice_key)
        m = d.wait_log(r"nonotify\.py: not granted error=.*")
        assert "capability 'notify' is not granted" in m.group(0)
        time.sleep(0.5)  # nothing else may arrive: no SSRF post, no injected mail
        assert len(hook.inbox.items) == 1 and len(smtp.inbox.items) == 1
    finally:
        hook.stop()


def test_smtp_starttls_with_auth(daemons: DaemonFactory, alice_key, tmp_path):
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    cert, key = self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    secret = "Sm7p-pa55word!"

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"mailer" \
            and auth_data.password == secret.encode()
        return AuthResult(success=ok)

    sink = SmtpSink()
    port = free_port()
    c = Controller(sink, hostname="127.0.0.1", port=port, tls_context=ctx, require_starttls=True,
                   authenticator=authenticator, auth_required=True, auth_require_tls=True)
    c.start()
    try:
        write_script(daemons, "mail.py", """
            def on_post_upload(event, api):
                api.notify.email(["a@example.com", "b@example.com"], "tls " + event.path, "hello")
        """)
        smtp_cfg = dict(starttls="true", ca_file=toml_str(str(cert)), username='"mailer"',
                        password=toml_str(secret))
        extra = (binding("post-upload", "mail.py", allow=["notify"])
                 + notify_config(port, free_port(), **smtp_cfg))
        d = daemons.start(extra)
        upload(d, "/t.txt", b"t", alice_key)
        mail = sink.inbox.wait(1)[0]
        assert mail["tls"] and mail["auth"]
        assert mail["to"] == ["a@example.com", "b@example.com"]
        assert mail["msg"]["Subject"] == "tls /t.txt"
        d.wait_log(r"notify: email \d+ to a@example.com, b@example.com delivered")
        assert secret not in d.log_text()
    finally:
        c.stop()


def test_outbox_survives_a_daemon_restart(daemons: DaemonFactory, smtp, alice_key):
    hook_port = free_port()
    write_script(daemons, "hook.py", """
        def on_post_upload(event, api):
            api.notify.webhook("ops", {"path": event.path})
    """)
    extra = binding("post-upload", "hook.py", allow=["notify"]) + notify_config(smtp.port, hook_port)
    d = daemons.start(extra)
    upload(d, "/late.txt", b"late", alice_key)  # the receiver is down
    d.wait_log(r"notify: webhook \d+ to ops attempt 1 failed, retrying in 300s")
    assert d.stop() == 0
    hook = WebhookReceiver(hook_port).start()
    try:
        d2 = daemons.start(config=d.config)
        d2.wait_log(r"outbox: 1 notification\(s\) pending from an earlier run")
        post = hook.inbox.wait(1)[0]
        assert json.loads(post["body"]) == {"path": "/late.txt"}
        d2.wait_log(r"notify: webhook \d+ to ops delivered \(attempt 2\)")
    finally:
        hook.stop()


def test_outbox_backoff_failure_and_stats(tmp_path):
    """The delivery thread itself: retries with backoff, then 'failed' (logged, counted)."""
    from scriptsftp.scripting.outbox import Notifier, Outbox
    from scriptsftp.server.stores import StateStores
    from scriptsftp.server.support.config import NotifySection, WebhookSection

    hook = WebhookReceiver(free_port(), status=500).start()
    ok = WebhookReceiver(free_port()).start()
    try:
        cfg = NotifySection(max_attempts=3, retry_delay=0.2, webhooks={
            "bad": WebhookSection(url=f"http://127.0.0.1:{hook.port}/x", timeout=5),
            "good": WebhookSection(url=f"http://127.0.0.1:{ok.port}/y", timeout=5)})
        box = Outbox(StateStores(tmp_path))
        n = Notifier(box, lambda: cfg, lambda p: Path(p))
        box.add("webhook", "bad", {"payload": {"n": 1}}, "s.py")
        box.add("webhook", "good", {"payload": {"n": 2}}, "s.py")
        t0 = time.monotonic()
        n.start()
        try:
            ok.inbox.wait(1)
            attempts = hook.inbox.wait(3)
            deadline = time.monotonic() + 20
            while box.stats()["failed"] != 1:
                assert time.monotonic() < deadline, box.stats()
                time.sleep(0.05)
        finally:
            n.stop()
        # backoff: 0.2 s then 0.4 s between the three attempts
        assert time.monotonic() - t0 >= 0.6
        assert len(attempts) == 3
        assert box.stats() == {"pending": 0, "failed": 1, "delivered": 1}
        failure = box.recent_failures()[0]
        assert failure["target"] == "bad" and failure["attempts"] == 3 and "HTTP 500" in failure["error"]
        box.close()
    finally:
        hook.stop()
        ok.stop()


def test_one_handler_call_cannot_flood_the_outbox(tmp_path):
    from scriptsftp.scripting.capabilities import CapabilityCall, CapabilityError
    from scriptsftp.scripting.outbox import MAX_PER_CALL, Notifier, NotifyCapability, Outbox
    from scriptsftp.server.stores import StateStores
    from scriptsftp.server.support.config import NotifySection, WebhookSection

    cfg = NotifySection(webhooks={"ops": WebhookSection(url="http://127.0.0.1:9/x")})
    box = Outbox(StateStores(tmp_path))
    cap = NotifyCapability(box, Notifier(box, lambda: cfg, Path), lambda: cfg)
    call = CapabilityCall(script="loop.py", function="f", event={}, granted=frozenset({"notify"}))
    for i in range(MAX_PER_CALL):
        cap(call, "webhook", ["ops", {"i": i}])
    with pytest.raises(CapabilityError) as exc:
        cap(call, "webhook", ["ops", {"i": "one too many"}])
    assert exc.value.etype == "OverflowError"
    # the next handler call has its own allowance
    cap(CapabilityCall(script="loop.py", function="f", event={}, granted=frozenset({"notify"})), "webhook",
        ["ops", {}])
    assert box.stats()["pending"] == MAX_PER_CALL + 1
    box.close()
