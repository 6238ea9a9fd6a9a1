"""GET /metrics: Prometheus text that moves with what the server does."""

from __future__ import annotations

import io
from types import SimpleNamespace

import paramiko
import pytest

from adminkit import admin_toml, binding, call, get, metric, token_hash, wait_for, write_script  # noqa: F401
from conftest import close_client, paramiko_client


def scrape(d) -> str:
    status, body, headers = call(d, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain"), (status, headers)
    return body


def test_metrics_change_after_an_sftp_transfer(daemons, token_hash, alice_key):
    write_script(daemons, "gate.py", """
        def on_pre_upload(event, api):
            if event.path.endswith(".exe"):
                api.veto("no executables")

        def on_pre_mkdir(event, api):
            raise RuntimeError("broken")
    """)
    d = daemons.start(admin_toml(token_hash, bindings=binding("pre-upload", "gate.py")
                                 + binding("pre-mkdir", "gate.py", on_error='"allow"')))
    before = scrape(d)
    assert metric(before, "scriptsftp_sessions", protocol="sftp") == 0
    assert metric(before, "scriptsftp_transfer_bytes_total", protocol="sftp", direction="upload") == 0

    client = paramiko_client(d, key=alice_key)
    try:
        client.putfo(io.BytesIO(b"u" * 5000), "/up.txt")
        client.getfo("/up.txt", io.BytesIO())
        with pytest.raises(PermissionError):
            client.putfo(io.BytesIO(b"x"), "/bad.exe")
        client.mkdir("/dir")
        during = scrape(d)
        assert metric(during, "scriptsftp_sessions", protocol="sftp") == 1
    finally:
        close_client(client)
    transport = paramiko.Transport(("127.0.0.1", d.port))
    try:
        transport.start_client(timeout=10)
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password("alice", "wrong")
    finally:
        transport.close()

    after = scrape(d)
    assert metric(after, "scriptsftp_transfer_bytes_total", protocol="sftp", direction="upload") == 5000
    assert metric(after, "scriptsftp_transfer_bytes_total", protocol="sftp", direction="download") == 5000
    assert metric(after, "scriptsftp_transfers_total", protocol="sftp", direction="upload", result="ok") == 1
    assert metric(after, "scriptsftp_transfers_total", protocol="sftp", direction="download", result="ok") == 1
    assert metric(after, "scriptsftp_auth_total", protocol="sftp", method="publickey", result="success") == 1
    assert metric(after, "scriptsftp_auth_total", protocol="sftp", method="password", result="failure") == 1
    assert metric(after, "scriptsftp_events_total", event="pre-upload", decision="allow") == 1
    assert metric(after, "scriptsftp_events_total", event="pre-upload", decision="veto") == 1
    assert metric(after, "scriptsftp_events_total", event="pre-mkdir", decision="allow") == 1
    assert metric(after, "scriptsftp_script_duration_seconds_count", script="gate.py") == 3
    assert metric(after, "scriptsftp_script_errors_total", script="gate.py", kind="exception") == 1
    assert metric(after, "scriptsftp_script_timeouts_total", script="gate.py") == 0
    assert metric(after, "scriptsftp_workers", state="alive") >= 1
    assert metric(after, "scriptsftp_worker_restarts_total") >= 0
    assert metric(after, "scriptsftp_bans") >= 0
    assert metric(after, "scriptsftp_notifications_pending") == 0
    assert metric(after, "scriptsftp_start_time_seconds") > 0
    wait_for(lambda: metric(scrape(d), "scriptsftp_sessions", protocol="sftp") == 0, what="session gauge back to 0")


def test_script_timeouts_and_worker_restarts_are_counted(daemons, token_hash, alice_key):
    write_script(daemons, "slow.py", """
        def on_pre_mkdir(event, api):
            while True:
                pass
    """)
    d = daemons.start(admin_toml(token_hash, scripts="cpu_time = 0.3\ntimeout = 2.0",
                                 bindings=binding("pre-mkdir", "slow.py")))
    client = paramiko_client(d, key=alice_key)
    try:
        with pytest.raises(PermissionError):
            client.mkdir("/never")
    finally:
        close_client(client)
    def restarted() -> str | None:
        text = scrape(d)
        return text if metric(text, "scriptsftp_worker_restarts_total") >= 1 else None

    text = wait_for(restarted, what="a worker restart")
    assert metric(text, "scriptsftp_script_timeouts_total", script="slow.py") == 1
    assert metric(text, "scriptsftp_events_total", event="pre-mkdir", decision="error") == 1


def test_collector_reads_outbox_and_defender_when_present_and_tolerates_absence():
    from prometheus_client import CollectorRegistry, generate_latest

    from scriptsftp.server.contract.scripting import NullEngine
    from scriptsftp.server.support.metrics import DaemonCollector

    conns = [SimpleNamespace(protocol="sftp"), SimpleNamespace(protocol="ftp"), SimpleNamespace(protocol="ftp")]
    core = SimpleNamespace(connections=lambda: conns)

    class EngineWithOutbox(NullEngine):
        """What the collector reads of an engine: its outbox's counts (or a failing database)."""

        def __init__(self, outbox) -> None:
            self.outbox = outbox

        def outbox_stats(self):
            return self.outbox.stats()

    def render(outbox=None, **attrs) -> str:
        reg = CollectorRegistry()
        engine = NullEngine() if outbox is None else EngineWithOutbox(outbox)
        reg.register(DaemonCollector(SimpleNamespace(core=core, started=1.0, engine=engine, **attrs)))
        return generate_latest(reg).decode()

    bare = render()
    assert metric(bare, "scriptsftp_sessions", protocol="ftp") == 2
    assert metric(bare, "scriptsftp_bans") == 0 and metric(bare, "scriptsftp_notifications_failed") == 0

    class Outbox:
        def stats(self):
            return {"pending": 3, "failed": 2, "delivered": 9}

    class Defender:
        def bans(self):
            return [{"ip": "203.0.113.5", "score": 20, "banned_until": 2e9, "reason": "x"}]

        def stats(self):
            return {"bans_total": 4, "active_bans": 1, "weird key!": 1, "text": "no"}

    full = render(outbox=Outbox(), defender=Defender())
    assert metric(full, "scriptsftp_notifications_pending") == 3
    assert metric(full, "scriptsftp_notifications_failed") == 2
    assert metric(full, "scriptsftp_bans") == 1
    assert metric(full, "scriptsftp_defender_bans_total") == 4 and "weird" not in full
    assert metric(full, "scriptsftp_defender_active_bans") == 1 and "# TYPE scriptsftp_defender_active_bans gauge" in full

    class Broken:
        def stats(self):
            raise RuntimeError("db locked")

        def bans(self):
            raise RuntimeError("db locked")

    assert metric(render(outbox=Broken(), defender=Broken()), "scriptsftp_bans") == 0
