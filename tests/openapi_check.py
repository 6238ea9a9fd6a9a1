"""Validate admin API answers against the daemon's own /api/openapi.json.

adminkit.call() runs every answer it receives from the admin listener (any /api path,
/healthz, /metrics) through :func:`check_response`, so every admin test checks the document
as a side effect: an answer whose status, content type, headers or body the document does
not describe fails the test that received it.

openapi-core does the validating (path templates, status codes, media types, headers and
bodies with JSON Schema 2020-12, as OpenAPI 3.1 uses it), and openapi-spec-validator (its
dependency) checks the document itself when it is first loaded: both are maintained
implementations of the specification, where a hand-written checker would only check what
its author thought of.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict

_lock = threading.Lock()
_loaded: dict[str, OpenAPI] = {}  # by the document's text: one parse per distinct document


def load(document: dict[str, Any]) -> OpenAPI:
    """The validator for a document (checked against the OpenAPI specification once)."""
    key = json.dumps(document, sort_keys=True)
    with _lock:
        api = _loaded.get(key)
        if api is None:
            api = _loaded[key] = OpenAPI.from_dict(document)  # validates the document itself
        return api


@dataclass
class _Request:
    host_url: str
    path: str
    method: str
    body: bytes | None
    content_type: str
    parameters: RequestParameters = field(default_factory=RequestParameters)


@dataclass
class _Response:
    status_code: int
    data: bytes | None
    content_type: str
    headers: Headers


def documented(path: str) -> bool:
    """Whether an answer for this request path is one the document must describe."""
    path = urllib.parse.urlsplit(path).path
    return path.startswith("/api/") or path in ("/healthz", "/metrics")


def check_response(api: OpenAPI, base: str, method: str, path: str, status: int, headers: dict[str, str],
                   body: bytes) -> None:
    """Raise AssertionError naming the request and every problem when the answer does not fit."""
    parts = urllib.parse.urlsplit(path)
    # a "." or ".." segment is a name the server got as sent (a hostile user name); the
    # validator would resolve it as a relative URL, so it is matched in encoded form
    segments = ["%2E" * len(x) if x in (".", "..") else x for x in parts.path.split("/")]
    request = _Request(host_url=base, path="/".join(segments), method=method.lower(), body=None,
                       content_type="application/json",
                       parameters=RequestParameters(query=ImmutableMultiDict(urllib.parse.parse_qsl(parts.query))))
    hdrs = Headers(list(headers.items()))
    response = _Response(status, body, hdrs.get("Content-Type", "").lower(), hdrs)
    errors = list(api.iter_response_errors(request, response))
    if errors:
        detail = "; ".join(_describe(e) for e in errors)
        raise AssertionError(f"{method} {path} -> {status} does not fit /api/openapi.json: {detail}\n"
                             f"body: {body[:500]!r}")


def _describe(exc: BaseException) -> str:
    parts = [f"{type(exc).__name__}: {exc}"]
    for sub in getattr(exc, "schema_errors", ()) or ():
        parts.append(f"  at {'/'.join(map(str, getattr(sub, 'absolute_path', [])))}: {getattr(sub, 'message', sub)}")
    cause = exc.__cause__
    if cause is not None:
        parts.append(_describe(cause))
    return "\n".join(parts)
