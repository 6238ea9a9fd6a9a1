"""Log setup: one line per event worth knowing, as text or JSON, to stderr.

Context (session id, user, protocol, client address, operation fields) travels
in ``extra=`` so the JSON form carries it as fields and the text form as
``key=value`` pairs. Nothing here ever sees a password: the login core does not
pass secrets to the logger.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


#: context shown in the line's [head]; op, path and result are already in the message
_HEAD = ("sid", "user", "proto", "ip")
_NOT_IN_TAIL = _STANDARD | set(_HEAD) | {"op", "path", "result"}


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: [sid=.. user=.. proto=.. ip=..] message key=value ...``

    Several lines per connection are written on the connection's own path (connect,
    login, each operation), so the formatter stays lean: one pass over the record,
    and the timestamp text is reused within the same second."""

    _ts: tuple[int, str] = (-1, "")  # (second, its text): one attribute, so threads never mix them

    def _timestamp(self, created: float) -> str:
        second = int(created)
        cached = self._ts
        if cached[0] == second:
            return cached[1]
        text = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(created))  # with the offset: +0000 under UTC
        self._ts = (second, text)
        return text

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        # empty ones (no user yet) are left out
        head = " ".join([f"{k}={fields[k]}" for k in _HEAD if fields.get(k)])
        tail = " ".join([f"{k}={_quote(v)}" for k, v in fields.items()
                         if k not in _NOT_IN_TAIL and not k.startswith("_")])
        line = f"{self._timestamp(record.created)} {record.levelname:<7} {record.name.removeprefix('scriptsftp.')}: "
        line += (f"[{head}] " if head else "") + record.getMessage() + (f" {tail}" if tail else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        out: dict[str, object] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": fields.get("_json_msg") or record.getMessage(),
        }
        out.update(_context(record))
        if fields.get("_json_fields"):  # a script's api.log fields: keys of their own, not text in msg
            out["fields"] = fields["_json_fields"]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _quote(v: object) -> str:
    s = str(v)
    return json.dumps(s) if (not s or any(c in s for c in " \"=\n")) else s


def setup(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("paramiko").setLevel(logging.WARNING if level != "debug" else logging.INFO)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedHttpFilter) for f in server_log.filters):
        server_log.addFilter(MalformedHttpFilter())


class MalformedHttpFilter(logging.Filter):
    """aiohttp logs a malformed request (a header line too long, too many headers, garbage)
    as an ERROR with a traceback: any client, logged in or not, could fill the log with
    them. Such a record becomes one bounded INFO line without the traceback; the client
    already got its 400. Any other exception aiohttp logs (a handler's bug, answered 500,
    "Error handling request") is bounded too: the first with its traceback, then one line
    per 10 s with a count, however many requests a client sends that hit it."""

    def __init__(self) -> None:
        super().__init__()
        self._bounded = BoundedLog(logging.INFO)
        self._unexpected = BoundedLog(logging.ERROR)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        http = logging.getLogger("scriptsftp.http")
        if type(exc).__module__ != "aiohttp.http_exceptions":
            self._unexpected.log(http, "HTTP request failed: %s", record.getMessage()[:200], exc_info=record.exc_info)
            return False
        first = str(getattr(exc, "message", "") or exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        self._bounded.log(http, "malformed HTTP request refused (400): %s", first)
        return False


class BoundedLog:
    """At most one line every ``every`` seconds, with the count of those held back: a burst
    of connections ending the same way (a flood of idle sockets, a core going away under
    many logins) must not become a burst of log lines."""

    def __init__(self, level: int = logging.WARNING, every: float = 10.0) -> None:
        self.level = level
        self.every = every
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._held = 0

    def log(self, logger: logging.Logger, msg: str, *args: object, extra: dict[str, object] | None = None,
            exc_info: Any = False) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.every:
                self._held += 1
                return
            held, self._held, self._last = self._held, 0, now
        more = f" ({held} more since the last report)" if held else ""
        logger.log(self.level, msg + more, *args, extra=extra, exc_info=exc_info)

