"""Helpers shared by the admin API, audit, metrics and dashboard tests."""

from __future__ import annotations

import json
import textwrap
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import pytest

from conftest import Daemon, DaemonFactory, toml_str

TOKEN = "admin-token-7f3a9c"


@pytest.fixture(scope="session")
def token_hash() -> str:
    from scriptsftp.server.core.passwords import hash_password

    return hash_password(TOKEN)


def admin_toml(token_hash: str, *, scripts: str = "", bindings: str = "") -> str:
    """``extra`` for DaemonFactory.start: [scripts] keys, the [admin] table, then bindings."""
    return (f"{scripts}\n[admin]\nenabled = true\nlisten = \"127.0.0.1:0\"\ntoken_hash = {toml_str(token_hash)}\n\n"
            f"{bindings}")


def write_script(daemons: DaemonFactory, name: str, body: str) -> None:
    path = daemons.root / "scripts" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp~")
    tmp.write_text(textwrap.dedent(body))
    tmp.replace(path)


def binding(event: str, script: str, **kw: str) -> str:
    lines = ["[[bindings]]", f"event = {toml_str(event)}", f"script = {toml_str(script)}"]
    lines += [f"{k} = {v}" for k, v in kw.items()]
    return "\n".join(lines) + "\n"


def call(d: Daemon, method: str, path: str, *, token: str | None = TOKEN, data: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or text, headers) of one admin API request; never raises on HTTP errors."""
    req = urllib.request.Request(f"http://127.0.0.1:{d.ports['admin']}{path}", method=method,
                                 data=data if data is not None else (b"" if method == "POST" else None))
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, body, hdrs = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, body, hdrs = exc.code, exc.read(), dict(exc.headers)
    text = body.decode("utf-8", "replace")
    if hdrs.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(text), hdrs
    return status, text, hdrs


def get(d: Daemon, path: str, **kw: Any) -> Any:
    status, body, _ = call(d, "GET", path, **kw)
    assert status == 200, (status, body)
    return body


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy (for state reached asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0
