"""The core's end of one SSH connection that an SSH worker process serves.

With ``[sftp] processes`` above 1, paramiko (key exchange, ciphers, the SFTP and
SCP protocols, READ/WRITE data) runs in worker processes, so that SSH traffic
uses every core instead of one GIL. Everything that decides or remembers stays
here, in the one Session core (docs/architecture.md rule 2): logins, the defender, paths,
permissions, events and scripts, staging and publishing, session counts, the
admin API's session list. Each connection's worker asks over its own socket pair
(one thread here per connection, as an in-process connection has); a file opened
for transfer comes back as a descriptor, on which the worker reads and writes
without asking, and whose byte count it reports about once a second and at close.

The worker is not trusted more than it must be: it parses raw client bytes. It
gets no name it could use against another connection (sessions and handles are
numbered per link), the client address is the one the core accepted, requests
are JSON (framing.py), size-capped, and checked here.

What a worker may ask is the core's ports (server/contract/ports.py), not a
list kept by hand: each ``CorePort`` method is the request of the same name,
answered by the method ``_<name>`` here, and each ``SessionPort`` method is a
``call`` by name (:data:`SESSION_CALLS`) unless it hands out or takes a handle,
which has a request of its own (:data:`SESSION_OWN_REQUESTS`). Both tables are
derived at import; a port method with no way over the link fails the import
(and tests/core/test_ports.py), so adding one to a port means serving it here or
excluding it below with the reason.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
from typing import Any, Callable

import paramiko

from scriptsftp.server.contract import framing
from scriptsftp.server.frontends.ssh import key_proof
from scriptsftp.server.contract.errors import FsError
from scriptsftp.server.contract.ports import (
    BandwidthPort, ConnectionView, CorePort, DirHandlePort, Entry, HandlePort, ReadHandlePort, SessionPort,
    WriteHandlePort, keyword_options, port_methods,
)

log = logging.getLogger("scriptsftp.ssh")

MAX_REQUEST = 1 << 20  # a path, a password, a key blob: far less
MAX_READDIR = 1000  # entries per readdir answer, whatever the worker asks for
OPENDIR_PREFETCH = 100  # entries sent with the opendir answer (one SFTP READDIR batch)
MAX_PURCHASE = 16 << 20  # bytes of bandwidth a worker may buy at once, whatever it asks for

_SESSION_PORT = port_methods(SessionPort)

#: SessionPort methods a worker may not ``call`` by name: each hands out a handle (a
#: number here, a descriptor there) or takes one, or ends the session, and has a request
#: of its own (same name, or the one given) that checks what the generic call cannot
SESSION_OWN_REQUESTS: dict[str, str] = {
    "open_read": "open_read",      # answers a descriptor
    "open_write": "open_write",    # answers a descriptor
    "opendir": "opendir",          # the listing stays here; the worker reads it by number
    "fsetstat": "fsetstat",        # takes a handle number, not a handle
    "close": "close_session",      # by session number; the link's own bookkeeping
}

#: Session methods a worker may call by name, with the keyword arguments each takes
#: (the port method's options): every SessionPort method not excluded above
SESSION_CALLS: dict[str, frozenset[str]] = {
    name: keyword_options(signature) for name, signature in _SESSION_PORT.items()
    if name not in SESSION_OWN_REQUESTS
}
OPEN_WRITE_ARGS = keyword_options(_SESSION_PORT["open_write"])
FSETSTAT_ARGS = keyword_options(_SESSION_PORT["fsetstat"])

#: CorePort methods that are no request of their own: the link itself carries them
CORE_NOT_REQUESTS: dict[str, str] = {
    "disconnect": "the worker's last message, never answered (or the link closing)",
    "announce_login": "the core announces a login right after allowing it (finish_login)",
}
#: CorePort methods a worker asks by name (each answered by ``CoreLink._<name>``)
CORE_REQUESTS: tuple[str, ...] = tuple(name for name in port_methods(CorePort) if name not in CORE_NOT_REQUESTS)


def encode_entry(e: Entry) -> list:
    st = e.st
    return [e.name, [st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
                     st.st_atime, st.st_mtime, st.st_ctime], e.link_target]


def decode_entry(raw: list) -> Entry:
    name, st, link_target = raw
    return Entry(name, os.stat_result(st), link_target)


def _kwargs(raw: object, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(raw, dict) or not set(raw) <= allowed:
        raise TypeError(f"unexpected arguments {sorted(raw) if isinstance(raw, dict) else raw!r}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}  # times: JSON has no tuple


def _limit(handle: ReadHandlePort | WriteHandlePort) -> dict[str, object]:
    """The quotas a transfer runs under go with its descriptor: the worker moves the bytes,
    so the worker stops them (the core checks the upload again when it publishes)."""
    return {} if handle.limit is None else {"limit": handle.limit.to_wire()}


def _count(raw: object) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
        raise TypeError(f"byte count {raw!r}")
    return raw


class CoreLink:
    """Answers one connection's requests, in order, until the worker closes the link.

    ``kick(reason)`` ends the connection in its worker (admin kick, ban, removed user).
    A link that ends without a ``disconnect`` (the worker died) still aborts the
    connection's open uploads and disconnects it, as a dropped client would."""

    def __init__(self, core: CorePort[Any, Any], sock: socket.socket, remote: tuple[str, int], local_port: int,
                 kick: Callable[[str], None]) -> None:
        self.core = core
        self.sock = sock
        self.remote_ip = remote[0]
        self.local_port = local_port
        self.kick = kick
        self.conn: ConnectionView | None = None
        self.sessions: dict[int, SessionPort[Any]] = {}
        # open handles by number (one numbering for all three): which table a number is in
        # is what it may be used for
        self.reads: dict[int, ReadHandlePort] = {}
        self.writes: dict[int, WriteHandlePort] = {}
        self.listings: dict[int, DirHandlePort] = {}
        # the user's bandwidth buckets (every session of a connection is the same user's)
        self.bandwidth: BandwidthPort | None = None
        self._numbers = iter(range(1, 1 << 62))
        self._after_reply: Callable[[], None] | None = None
        # (user, method) pairs whose credentials the core has accepted on this link: the
        # worker's word that a client logged in is taken only for those
        self._proven: set[tuple[str, str]] = set()
        self._link_id = next(key_proof.LINK_IDS)  # never reused, unlike id(self)

    def serve(self) -> None:
        """The connect decision first, unasked (the worker's first question would be for
        it); then one answer per request. Round trips are what a worker waits for."""
        try:
            try:
                framing.send(self.sock, self._answer({"op": "connect", "args": []})[0])
            except OSError:
                return
            while True:
                try:
                    request, fds = framing.receive(self.sock, MAX_REQUEST, alternating=True)
                except (framing.LinkClosed, OSError):
                    return
                except ValueError as exc:
                    log.error("ssh worker sent a malformed request (%s): connection ended", exc)
                    return
                framing.close_fds(fds)  # a worker has nothing to hand us
                if isinstance(request, dict) and request.get("op") == "disconnect":
                    return  # not answered: the worker has closed its end already
                reply, fd = self._answer(request)
                try:
                    framing.send(self.sock, reply, [fd] if fd is not None else ())
                except OSError:
                    return
                if self._after_reply is not None:
                    after, self._after_reply = self._after_reply, None
                    try:
                        after()
                    except Exception:
                        log.exception("after a login", extra={"sid": self.conn.id if self.conn else ""})
        finally:
            self._end()

    def _answer(self, request: object) -> tuple[dict, int | None]:
        try:
            if not isinstance(request, dict) or not isinstance(request.get("args"), list):
                raise TypeError("not a request")
            op = request.get("op")
            handler = self._OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise TypeError(f"unknown request {op!r}")
            result = handler(self, *request["args"])
        except FsError as exc:
            return {"error": [type(exc).__name__, exc.message]}, None
        except Exception:
            log.exception("request from an ssh worker failed",
                          extra={"sid": self.conn.id if self.conn else ""})
            return {"error": ["Failure", "internal server error"]}, None
        if isinstance(result, tuple):  # (value, descriptor to pass)
            return {"ok": result[0]}, result[1]
        return {"ok": result}, None

    # --- the connection ---------------------------------------------------------

    def _connect(self) -> dict:
        if self.conn is not None:
            raise TypeError("connect twice")
        conn, decision = self.core.connect("sftp", self.remote_ip, self.local_port)
        conn.on_kick = self.kick
        self.conn = conn
        return {"id": conn.id, "allowed": decision.allowed, "reason": decision.reason}

    def _need_conn(self) -> ConnectionView:
        if self.conn is None:
            raise TypeError("no connection yet")
        return self.conn

    def _protocol_error(self, detail: str) -> None:
        self.core.protocol_error(self._need_conn(), str(detail)[:500])

    def _auth_methods(self, name: str) -> list[str]:
        return self.core.auth_methods(name)

    def _check_password(self, name: str, password: str) -> bool:
        if not isinstance(name, str) or not isinstance(password, str):
            return False
        ok = self.core.check_password(self._need_conn(), name, password)
        if ok:
            self._proven.add((name, "password"))
        return ok

    def _key_allowed(self, name: str, key_type: str, blob: str, wire_proof: object = None) -> bool:
        """Whether the key may log in as ``name``. Without a proof (the client asks before
        it signs) that is all; a login by key is taken from the worker only after a proof
        the core verified itself (key_proof.py)."""
        if not isinstance(name, str):
            return False
        try:
            key = paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))
        except Exception:
            return False
        if not self.core.key_allowed(name, key):
            return False
        if wire_proof is None:
            return True
        proof = key_proof.from_wire(wire_proof)
        if proof is None or not key_proof.signature_holds(name, key, proof):
            return False  # as paramiko answers a bad signature: the client may try another key
        if not key_proof.SESSION_IDS.claim(proof.session_id, self._link_id):
            log.warning("ssh worker sent a key signature already used on another connection: refused",
                        extra={"sid": self.conn.id if self.conn else ""})
            return False
        self._proven.add((name, "publickey"))
        return True

    def _finish_login(self, name: str, method: str) -> list:
        """On success, the ``login ok`` line, the metric and ``post-login`` follow the
        answer (as in-process: the client's USERAUTH_SUCCESS does not wait for them), and
        the worker's next request waits for them (``post-login`` ends before the session's
        first request)."""
        conn = self._need_conn()
        if (name, method) not in self._proven:
            raise TypeError(f"login of {name!r} by {method!r} claimed without credentials")
        decision = self.core.finish_login(conn, name, method, announce=False)
        if decision.allowed:
            self._after_reply = lambda: self.core.announce_login(conn, method)
        return [decision.allowed, decision.reason]

    # --- sessions and files ---------------------------------------------------------

    def _open_session(self, protocol: str) -> dict:
        if protocol not in ("sftp", "scp"):
            raise TypeError(f"protocol {protocol!r}")
        session = self.core.open_session(self._need_conn(), protocol)
        number = next(self._numbers)
        self.sessions[number] = session
        self.bandwidth = session.bandwidth
        return {"sid": number, "id": session.id, "user": session.user, "rates": self._rates()}

    def _rates(self) -> list[int]:
        """The user's bandwidth limits now, [up, down] bytes/s: a worker learns a changed one
        from the answer to its next progress report or token purchase."""
        bw = self.bandwidth
        return [bw.up.rate, bw.down.rate] if bw is not None else [0, 0]

    def _bandwidth(self, direction: object, n: object, mark: object) -> list:
        """A worker's purchase of ``n`` bytes of the user's bandwidth (``mark`` None), or its
        question how long the bytes it bought up to ``mark`` must still wait. Never waits
        here: the worker sleeps, so the link stays free for the connection's other calls.
        Answer: [mark, seconds to wait, up rate, down rate]."""
        bw = self.bandwidth
        if bw is None:
            raise TypeError("no session yet")
        if direction not in ("up", "down"):
            raise TypeError(f"bandwidth direction {direction!r}")
        throttle = bw.up if direction == "up" else bw.down
        if mark is None:
            mark = throttle.charge(min(_count(n), MAX_PURCHASE))
        elif not isinstance(mark, (int, float)) or isinstance(mark, bool):
            raise TypeError(f"bandwidth mark {mark!r}")
        return [mark, throttle.wait_for(float(mark)), *self._rates()]

    def _session(self, number: int) -> SessionPort[Any]:
        return self.sessions[number]  # KeyError: an internal error, answered as such

    def _call(self, number: int, method: str, args: list, kwargs: dict) -> Any:
        allowed = SESSION_CALLS.get(method)
        if allowed is None or not isinstance(args, list):
            raise TypeError(f"session call {method!r}")
        result = getattr(self._session(number), method)(*args, **_kwargs(kwargs, allowed))
        if isinstance(result, Entry):
            return encode_entry(result)
        if method == "listdir":
            return [encode_entry(e) for e in result]
        if method == "statvfs":
            return [list(result), result.f_fsid]  # f_fsid is not in the tuple part
        return result

    def _close_session(self, number: int) -> None:
        session = self.sessions.pop(number, None)
        if session is not None:
            session.close()

    def _opendir(self, number: int, path: str) -> dict:
        """A listing the worker reads in batches (``readdir``); it stays here, open, as a handle.
        The first batch comes with the answer: a small directory then costs the worker one
        round trip to open and list, not three."""
        handle = self._session(number).opendir(path)
        number = next(self._numbers)
        self.listings[number] = handle
        first = handle.read(OPENDIR_PREFETCH)
        return {"hid": number, "path": handle.path, "first": [encode_entry(e) for e in first]}

    def _readdir(self, hid: int, count: object) -> list:
        handle = self.listings[hid]  # KeyError for a file: an internal error, answered as such
        if not isinstance(count, int) or isinstance(count, bool):
            raise TypeError("a readdir count that is not a number")
        return [encode_entry(e) for e in handle.read(max(1, min(count, MAX_READDIR)))]

    def _open_read(self, number: int, path: str) -> tuple[dict, int]:
        handle = self._session(number).open_read(path)
        hid = next(self._numbers)
        self.reads[hid] = handle
        return {"hid": hid, "path": handle.path, **_limit(handle)}, handle.fd

    def _open_write(self, number: int, path: str, kwargs: dict) -> tuple[dict, int]:
        handle = self._session(number).open_write(path, **_kwargs(kwargs, OPEN_WRITE_ARGS))
        hid = next(self._numbers)
        self.writes[hid] = handle
        return {"hid": hid, "path": handle.path, **_limit(handle)}, handle.fd

    def _fsetstat(self, number: int, hid: int, kwargs: dict) -> None:
        handle = self.writes[hid]  # KeyError for a download: an internal error, answered as such
        self._session(number).fsetstat(handle, **_kwargs(kwargs, FSETSTAT_ARGS))

    def _counted(self, hid: int, count: object) -> HandlePort:
        """The handle ``hid``, no longer the link's, with the worker's final byte count."""
        if hid in self.writes:
            write = self.writes.pop(hid)
            write.written = _count(count)
            return write
        if hid in self.reads:
            read = self.reads.pop(hid)
            read.sent = _count(count)
            return read
        return self.listings.pop(hid)  # KeyError: an internal error, answered as such

    def _progress(self, hid: int, count: object) -> list[int]:
        """A running transfer's byte count (about once a second): the admin API lists it.
        The answer is the user's bandwidth limits now, so a transfer that began unlimited
        is paced within a second of a limit set meanwhile."""
        if hid in self.writes:
            self.writes[hid].written = _count(count)
        elif hid in self.reads:
            self.reads[hid].sent = _count(count)
        return self._rates()

    def _close_handle(self, hid: int, count: int) -> None:
        self._counted(hid, count).close()  # publishes an upload; a veto is the reply

    def _abort_handle(self, hid: int, reason: str, count: int) -> None:
        self._counted(hid, count).abort(str(reason)[:500])

    #: request name -> handler: the ports' requests (derived, see the module docstring),
    #: then the link's own (a session method by name, a listing's next batch, a handle's
    #: end, a running transfer's byte count, a purchase of the user's bandwidth)
    _OPS: dict[str, Callable[..., Any]] = {}


    def _end(self) -> None:
        """Whatever the worker left open is aborted (nothing half-published), then the
        connection is gone for the core: counts, defender slot, ``disconnect`` event."""
        handles: list[HandlePort] = [*self.reads.values(), *self.writes.values(), *self.listings.values()]
        self.reads, self.writes, self.listings = {}, {}, {}
        for handle in handles:
            try:
                handle.abort("connection closed before the transfer completed")
            except Exception:
                log.exception("abort of %s failed", handle.path)
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.on_kick = None
            self.core.disconnect(conn)  # closes its sessions
        self.sessions.clear()


CoreLink._OPS = {
    **{name: getattr(CoreLink, f"_{name}") for name in CORE_REQUESTS},
    **{request: getattr(CoreLink, f"_{request}") for request in SESSION_OWN_REQUESTS.values()},
    "call": CoreLink._call, "readdir": CoreLink._readdir,
    "close_handle": CoreLink._close_handle, "abort_handle": CoreLink._abort_handle,
    "progress": CoreLink._progress, "bandwidth": CoreLink._bandwidth,
}
