"""Helpers shared by the admin API, audit, metrics and dashboard tests."""

from __future__ import annotations

import json
import textwrap
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import pytest

import openapi_check
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


def _raw(d: Daemon, method: str, path: str, token: str | None, data: bytes | None,
         headers: dict[str, str] | None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(f"http://127.0.0.1:{d.ports['admin']}{path}", method=method,
                                 data=data if data is not None else (b"" if method == "POST" else None))
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


_documents: dict[tuple[int, int], Any] = {}


def openapi(d: Daemon, token: str | None = TOKEN) -> Any:
    """The validator built from the daemon's own /api/openapi.json (fetched once per daemon)."""
    key = (d.proc.pid, d.ports["admin"])
    if key not in _documents:
        for candidate in dict.fromkeys((token, TOKEN, None)):
            status, body, _ = _raw(d, "GET", "/api/openapi.json", candidate, None, None)
            if status == 200:
                _documents[key] = openapi_check.load(json.loads(body))
                break
        else:
            raise AssertionError(f"the daemon serves no /api/openapi.json ({status}: {body[:200]!r})")
    return _documents[key]


def call(d: Daemon, method: str, path: str, *, token: str | None = TOKEN, data: bytes | None = None,
         headers: dict[str, str] | None = None, body: Any = None) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or text, headers) of one admin API request; never raises on HTTP errors.
    ``body``: sent as JSON. Every answer of the API is checked against the daemon's OpenAPI
    document (openapi_check.py): one it does not describe fails the test."""
    if body is not None:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    status, raw, hdrs = _raw(d, method, path, token, data, headers)
    if openapi_check.documented(path):
        openapi_check.check_response(openapi(d, token), f"http://127.0.0.1:{d.ports['admin']}", method, path,
                                     status, hdrs, raw)
    text = raw.decode("utf-8", "replace")
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
