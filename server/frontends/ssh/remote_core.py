"""The Session core as an SSH worker process sees it: the same ports, answered by the core.

The SSH, SFTP and SCP front ends run unchanged in a worker; :class:`RemoteCore`
is the ``CorePort`` and :class:`RemoteSession` the ``SessionPort`` they get
(server/contract/ports.py; mypy checks the fit at the end of this module, handles
included). Every call but the data path goes to the core over the
connection's link (core_link.py), one at a time (a connection's channels share
it). READ and WRITE use the descriptor the core opened, here, without a round
trip, through the same code as the core's own handles (support/fd_files.py: this
module may not import the core); the core learns the byte count at close, where it
publishes the upload, and meanwhile about once a second while bytes move (the admin
API's session list).
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from scriptsftp.server.contract import errors, framing
from scriptsftp.server.contract.dispatch import ALLOW, Decision
from scriptsftp.server.contract.errors import FsError
from scriptsftp.server.contract.ports import Entry, KeyProof, PublicKey, TransferLimit, throttle_chunk
from scriptsftp.server.frontends.ssh.core_link import OPENDIR_PREFETCH, decode_entry
from scriptsftp.server.support.fd_files import FdReader, FdWriter

MAX_REPLY = 256 << 20  # a listing of a very large directory
PROGRESS_INTERVAL = 1.0  # seconds between two byte counts of a running transfer sent to the core
RECHECK = 0.25  # seconds a transfer waiting for bandwidth sleeps before it asks the core again

_ERRORS: dict[str, type[FsError]] = {
    name: cls for name, cls in vars(errors).items() if isinstance(cls, type) and issubclass(cls, FsError)
}


class RemoteConnection:
    """What ssh.py reads of a Connection: its id and address; ``account`` is set once logged in."""

    def __init__(self, conn_id: str, protocol: str, remote_ip: str) -> None:
        self.id = conn_id
        self.protocol = protocol
        self.remote_ip = remote_ip
        self.user = ""
        self.account: object | None = None
        self.on_kick: Callable[[str], None] | None = None


class RemoteCore:
    """One connection's LoginCore, over its link. Not shared between connections."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn: RemoteConnection | None = None
        self.bandwidth = RemoteBandwidth(self)  # the user's; its rates come with the core's answers
        self._lock = threading.Lock()
        self._closed = False

    def call(self, op: str, *args: Any) -> tuple[Any, int | None]:
        """The core's answer and the descriptor that came with it; FsError as raised there."""
        return self._exchange({"op": op, "args": list(args)})

    def _exchange(self, request: dict | None) -> tuple[Any, int | None]:
        """Send ``request`` (None: nothing, the core speaks first) and read the answer.
        A link that is gone (the core closed it or is stopping) fails the operation."""
        with self._lock:
            if self._closed:
                raise errors.CoreGone("server is shutting down")
            try:
                if request is not None:
                    framing.send(self.sock, request)
                reply, fds = framing.receive(self.sock, MAX_REPLY, alternating=True)
            except (OSError, ValueError) as exc:
                self._closed = True
                raise errors.CoreGone("server is shutting down") from exc
        fd = fds[0] if fds else None
        framing.close_fds(fds[1:])
        if "error" in reply:
            if fd is not None:
                os.close(fd)
            kind, message = reply["error"]
            raise _ERRORS.get(kind, errors.Failure)(message)
        return reply["ok"], fd

    def value(self, op: str, *args: Any) -> Any:
        return self.call(op, *args)[0]

    def progress(self, hid: int, count: int) -> None:
        """A running transfer's byte count, for the core's session list. Best effort: skipped
        while another call of the connection holds the link (never waits behind it, since
        the caller may be the transport thread), and a failure is left to the next real call."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._closed:
                return
            framing.send(self.sock, {"op": "progress", "args": [hid, count]})
            reply, _ = framing.receive(self.sock, MAX_REPLY, alternating=True)
        except (OSError, ValueError):
            self._closed = True
            return
        finally:
            self._lock.release()
        self.bandwidth.update(reply.get("ok"))  # the user's limits now: one set meanwhile applies

    # --- LoginCore --------------------------------------------------------------

    def connect(self, protocol: str, remote_ip: str, local_port: int = 0) -> tuple[RemoteConnection, Decision]:
        answer = self._exchange(None)[0]  # the core's first message, unasked
        self.conn = RemoteConnection(answer["id"], protocol, remote_ip)
        return self.conn, ALLOW if answer["allowed"] else Decision(False, answer["reason"])

    def disconnect(self, conn: RemoteConnection) -> None:
        """Not answered: the core ends the connection (and would on a closed link alone)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                try:
                    framing.send(self.sock, {"op": "disconnect", "args": []})
                except OSError:
                    pass
            self.sock.close()

    def protocol_error(self, conn: RemoteConnection, detail: str) -> None:
        self.value("protocol_error", detail)

    def auth_methods(self, name: str) -> list[str]:
        return self.value("auth_methods", name)

    def check_password(self, conn: RemoteConnection, name: str, password: str) -> bool:
        return bool(self.value("check_password", name, password))

    def key_allowed(self, name: str, key: PublicKey, proof: KeyProof | None = None) -> bool:
        b64 = base64.b64encode
        wire = None if proof is None else [b64(proof.session_id).decode(), proof.service, proof.algorithm,
                                           b64(proof.signature).decode()]
        return bool(self.value("key_allowed", name, key.get_name(), b64(key.asbytes()).decode(), wire))

    def finish_login(self, conn: RemoteConnection, name: str, method: str, *, announce: bool = True) -> Decision:
        allowed, reason = self.value("finish_login", name, method)
        if not allowed:
            return Decision(False, reason)
        conn.user = name
        conn.account = True  # logged in; the account itself stays in the core
        if announce:
            self.announce_login(conn, method)
        return ALLOW

    def announce_login(self, conn: RemoteConnection, method: str) -> None:
        """Nothing to send: the core announces a login right after allowing it."""

    def open_session(self, conn: RemoteConnection, protocol: str | None = None) -> "RemoteSession":
        answer = self.value("open_session", protocol or conn.protocol)
        self.bandwidth.update(answer.get("rates"))
        return RemoteSession(self, answer["sid"], answer["id"], answer["user"], protocol or conn.protocol)


class RemoteSession:
    """A Session in the core; the methods the SFTP and SCP front ends use."""

    def __init__(self, core: RemoteCore, number: int, session_id: str, user: str, protocol: str) -> None:
        self.core = core
        self.number = number
        self.id = session_id
        self.user = user
        self.protocol = protocol
        self._closed = False

    @property
    def bandwidth(self) -> "RemoteBandwidth":
        return self.core.bandwidth

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.core.value("call", self.number, method, list(args), kwargs)

    def realpath(self, vpath: str) -> str:
        return self._call("realpath", vpath)

    def stat(self, vpath: str, follow: bool = True) -> Entry:
        return decode_entry(self._call("stat", vpath, follow=follow))

    def listdir(self, vpath: str) -> list[Entry]:
        return [decode_entry(e) for e in self._call("listdir", vpath)]

    def readlink(self, vpath: str) -> str:
        return self._call("readlink", vpath)

    def statvfs(self, vpath: str = "/") -> os.statvfs_result:
        fields, fsid = self._call("statvfs", vpath)
        return os.statvfs_result(fields, {"f_fsid": fsid})

    def mkdir(self, vpath: str, mode: int = 0o755) -> None:
        self._call("mkdir", vpath, mode=mode)

    def rmdir(self, vpath: str) -> None:
        self._call("rmdir", vpath)

    def remove(self, vpath: str) -> None:
        self._call("remove", vpath)

    def rename(self, src_vpath: str, dst_vpath: str, *, overwrite: bool = False) -> None:
        self._call("rename", src_vpath, dst_vpath, overwrite=overwrite)

    def setstat(self, vpath: str, *, mode: int | None = None, times: tuple[float, float] | None = None,
                size: int | None = None) -> None:
        self._call("setstat", vpath, mode=mode, times=times, size=size)

    def symlink(self, target_vpath: str, link_vpath: str) -> None:
        self._call("symlink", target_vpath, link_vpath)

    def open_read(self, vpath: str) -> "RemoteReadHandle":
        answer, fd = self.core.call("open_read", self.number, vpath)
        handle = RemoteReadHandle(self, answer["hid"], answer["path"], _fd(fd))
        handle.limit = TransferLimit.from_wire(answer.get("limit"))
        return handle

    def opendir(self, vpath: str) -> "RemoteDirHandle":
        answer = self.core.value("opendir", self.number, vpath)
        first = [decode_entry(e) for e in answer.get("first", [])]
        return RemoteDirHandle(self, answer["hid"], answer["path"], first)

    def open_write(self, vpath: str, *, truncate: bool = True, append: bool = False, exclusive: bool = False,
                   create: bool = True, readable: bool = False, mode: int = 0o644) -> "RemoteWriteHandle":
        kwargs = {"truncate": truncate, "append": append, "exclusive": exclusive, "create": create,
                  "readable": readable, "mode": mode}
        answer, fd = self.core.call("open_write", self.number, vpath, kwargs)
        handle = RemoteWriteHandle(self, answer["hid"], answer["path"], _fd(fd))
        handle.limit = TransferLimit.from_wire(answer.get("limit"))
        return handle

    def fsetstat(self, handle: "RemoteWriteHandle", *, mode: int | None = None,
                 times: tuple[float, float] | None = None, size: int | None = None) -> None:
        self.core.value("fsetstat", self.number, handle.hid, {"mode": mode, "times": times, "size": size})

    def close(self) -> None:
        if self._closed:  # (paramiko may end an SFTP subsystem twice)
            return
        self._closed = True
        try:
            self.core.value("close_session", self.number)
        except FsError:
            pass


def _fd(fd: int | None) -> int:
    if fd is None:
        raise errors.Failure("the server did not open the file")
    return fd


class RemoteThrottle:
    """The user's bucket in one direction (a ``ThrottlePort``), which lives in the core, as
    a worker's transfers spend it: bytes are bought from the core a chunk at a time
    (``throttle_chunk`` of the rate, 4-256 KiB) and spent here, so a limited transfer costs
    one round trip per chunk and an unlimited one none at all (``rate`` is 0: the front end
    does not call). The core never waits for a purchase: it answers how long the bytes must
    wait, and this thread sleeps, asking again every :data:`RECHECK` seconds so that a rate
    changed meanwhile applies. ``rate`` is the last one the core told (every purchase, every
    progress report, every session opened)."""

    def __init__(self, core: RemoteCore, direction: str) -> None:
        self.core = core
        self.direction = direction
        self.rate = 0
        self._bought = 0  # bytes paid for and not yet moved, shared by the connection's transfers
        self._lock = threading.Lock()

    @property
    def chunk(self) -> int:
        return throttle_chunk(self.rate)

    def charge(self, n: int) -> float:
        return float(self._ask(n, None)[0])

    def wait_for(self, mark: float) -> float:
        return float(self._ask(0, mark)[1])

    def _ask(self, n: int, mark: float | None) -> tuple[float, float]:
        answer = self.core.value("bandwidth", self.direction, n, mark)
        self.core.bandwidth.update(answer[2:])
        return answer[0], answer[1]

    def take(self, n: int, deadline: float | None) -> None:
        with self._lock:
            if self._bought >= n:
                self._bought -= n
                return
            need, self._bought = n - self._bought, 0
        buy = max(need, self.chunk)
        mark, wait = self._ask(buy, None)
        while wait > 0:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise errors.LimitExceeded(
                    f"bandwidth limit of {self.rate} bytes/s: the transfer could not move {n} bytes "
                    "within the stall timeout")
            time.sleep(min(wait, RECHECK, deadline - now if deadline is not None else RECHECK))
            wait = self.wait_for(mark)
        with self._lock:
            self._bought += buy - need


class RemoteBandwidth:
    """The connection's user's two buckets (a ``BandwidthPort``) as the worker sees them."""

    def __init__(self, core: RemoteCore) -> None:
        self.up = RemoteThrottle(core, "up")
        self.down = RemoteThrottle(core, "down")

    def update(self, rates: object) -> None:
        """The limits the core sent ([up, down] bytes/s); anything else is ignored."""
        if isinstance(rates, list) and len(rates) == 2 and all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rates):
            self.up.rate, self.down.rate = rates


class _ReportsToCore:
    """Close and abort of a transfer served here: this copy of the descriptor is closed,
    then the core, which holds its own, is told the byte count (and publishes an upload)."""

    hid: int
    fd: int
    session: RemoteSession
    _finish: Callable[[], bool]  # FdFile's
    _next_report = 0.0

    def _count(self) -> int:
        raise NotImplementedError

    def _moved(self) -> None:
        """After each read or write: the count goes to the core at most once a second
        (a clock read per packet, a round trip per second; never one per packet)."""
        now = time.monotonic()
        if now >= self._next_report:
            self._next_report = now + PROGRESS_INTERVAL
            self.session.core.progress(self.hid, self._count())

    def close(self) -> None:
        if self._finish():
            os.close(self.fd)
            self.session.core.value("close_handle", self.hid, self._count())  # a veto raises here

    def abort(self, reason: str) -> None:
        if self._finish():
            os.close(self.fd)
            try:
                self.session.core.value("abort_handle", self.hid, reason, self._count())
            except FsError:
                pass  # the link is gone: the core aborts what the connection left open


class RemoteReadHandle(_ReportsToCore, FdReader):
    """A download: ``read``/``read_into`` here, on the descriptor code the core's ReadHandle
    runs too (support/fd_files.py)."""

    def __init__(self, session: RemoteSession, hid: int, path: str, fd: int) -> None:
        FdReader.__init__(self, path, fd)
        self.session = session
        self.hid = hid
        self._next_report = time.monotonic() + PROGRESS_INTERVAL

    def _count(self) -> int:
        return self.sent

    def read(self, offset: int, length: int) -> bytes:
        data = FdReader.read(self, offset, length)
        self._moved()
        return data

    def read_into(self, offset: int, buf: memoryview) -> int:
        n = FdReader.read_into(self, offset, buf)
        self._moved()
        return n


class RemoteWriteHandle(_ReportsToCore, FdWriter):
    """An upload: ``write``/``truncate``/``fsync`` here, on the descriptor code the core's
    WriteHandle runs too (support/fd_files.py); a pre-publish veto at close comes back as
    the Vetoed it raised in the core."""

    def __init__(self, session: RemoteSession, hid: int, path: str, fd: int) -> None:
        FdWriter.__init__(self, path, fd)
        self.session = session
        self.hid = hid
        self._next_report = time.monotonic() + PROGRESS_INTERVAL

    def _count(self) -> int:
        return self.written

    def close(self) -> None:
        self._refuse_if_poisoned()  # a write here failed: the core discards, the client gets the error
        _ReportsToCore.close(self)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        FdWriter.write(self, offset, data)
        self._moved()


class RemoteDirHandle:
    """A listing open in the core (its descriptor stays there): each ``read`` is one batch
    fetched over the link, so neither process ever holds the whole directory."""

    def __init__(self, session: RemoteSession, hid: int, path: str, first: list[Entry] | None = None) -> None:
        self.session = session
        self.hid = hid
        self.path = path
        self.started = time.monotonic()
        self.done = False
        self.count = 0
        self._buffered = list(first or [])  # the batch the opendir answer brought
        # fewer than a full batch came with it: that was the whole listing, no readdir needed
        self._ended = first is not None and len(first) < OPENDIR_PREFETCH

    def read(self, count: int) -> list[Entry]:
        if self.done:
            raise errors.Failure(f"{self.path}: listing closed")
        entries, self._buffered = self._buffered[:count], self._buffered[count:]
        if len(entries) < count and not self._ended:
            more = [decode_entry(e) for e in self.session.core.value("readdir", self.hid, count - len(entries))]
            self._ended = not more
            entries += more
        self.count += len(entries)
        return entries

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.session.core.value("close_handle", self.hid, 0)

    def abort(self, reason: str) -> None:
        if not self.done:
            self.done = True
            try:
                self.session.core.value("abort_handle", self.hid, reason, 0)
            except FsError:
                pass  # the link is gone: the core closes what the connection left open


if TYPE_CHECKING:  # the worker's stand-ins fit the core's ports (server/contract/ports.py)
    from scriptsftp.server.contract.ports import (
        BandwidthPort, CorePort, DirHandlePort, ReadHandlePort, SessionPort, ThrottlePort, WriteHandlePort,
    )

    def _core(core: RemoteCore) -> CorePort[RemoteConnection, RemoteSession]:
        return core

    def _session(session: RemoteSession) -> SessionPort[RemoteWriteHandle]:
        return session

    def _handles(read: RemoteReadHandle, write: RemoteWriteHandle, listing: RemoteDirHandle) -> tuple[
            ReadHandlePort, WriteHandlePort, DirHandlePort]:
        return read, write, listing

    def _bandwidth(bandwidth: RemoteBandwidth, throttle: RemoteThrottle) -> tuple[BandwidthPort, ThrottlePort]:
        return bandwidth, throttle
