"""The core's ports: what a front end may ask of the core, declared once.

A front end (SSH, FTP, HTTP/WebDAV) talks to the core through two doors and
nothing else: :class:`CorePort` for the connection and its login (connect
decision, credentials, login decision, a session, disconnect), and
:class:`SessionPort` for the file operations of a logged-in user. Two kinds of
object stand behind them, and mypy checks that both fit:

* in the core's process, ``LoginCore`` and ``Session`` (server/core/);
* in an SSH worker process, ``RemoteCore`` and ``RemoteSession``
  (server/frontends/ssh/remote_core.py), which forward each call over the
  connection's link to the core (core_link.py). The link's table of calls a
  worker may make by name is derived from :class:`SessionPort` (see
  :func:`port_methods`), so a method added here is either served over the link
  or excluded there on purpose, never forgotten.

The ports are generic in the objects an implementation hands out and takes
back: a core's connections (``C``) and sessions (``S``), a session's write
handles (``W``). Each implementation takes only its own (a LoginCore never
sees a RemoteConnection); a front end that does not care writes
``CorePort[Any, Any]``.

This module is part of the contract: it imports nothing from the core, the
front ends or a protocol library, so the core, the front ends, the worker side
and scripting/ can all import it.
"""

from __future__ import annotations

import inspect
import os
import stat as statmod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from scriptsftp.server.contract.credentials import Credentials
from scriptsftp.server.contract.dispatch import Decision
from scriptsftp.server.contract.errors import FsError


@dataclass(frozen=True, slots=True)
class Entry:
    """What a listing or a stat returns, protocol-neutral."""

    name: str
    st: os.stat_result
    link_target: str | None = None  # virtual, for symlinks when known

    @property
    def is_dir(self) -> bool:
        return statmod.S_ISDIR(self.st.st_mode)

    @property
    def is_link(self) -> bool:
        return statmod.S_ISLNK(self.st.st_mode)

    @property
    def size(self) -> int:
        return self.st.st_size


@dataclass(frozen=True, slots=True)
class TransferLimit:
    """How far one transfer may go before a quota stops it, fixed by the core when it opens
    the file and enforced by whichever process moves the bytes (an SSH worker moves them on
    its own copy of the descriptor, with no round trip per packet).

    ``end``: the largest size an upload may make its file (the space its scope has left,
    plus the size of the file it replaces); ``moved``: the bytes this transfer may move
    (what is left of the user's daily transfer quota). None: no such limit. The reasons
    are the client's messages when one is reached."""

    end: int | None = None
    moved: int | None = None
    end_reason: str = ""
    moved_reason: str = ""

    def stopped(self, reason: str) -> bool:
        """Whether a transfer ended for ``reason`` was stopped by one of these quotas (an SSH
        worker reports an upload it stopped by the reason it gave its client)."""
        return any(r and r in reason for r in (self.end_reason, self.moved_reason))

    def to_wire(self) -> list[object]:
        """For the worker link (JSON)."""
        return [self.end, self.moved, self.end_reason, self.moved_reason]

    @classmethod
    def from_wire(cls, value: object) -> "TransferLimit | None":
        if not isinstance(value, list) or len(value) != 4:
            return None
        end, moved, end_reason, moved_reason = value
        return cls(end if isinstance(end, int) else None, moved if isinstance(moved, int) else None,
                   str(end_reason), str(moved_reason))


class PublicKey(Protocol):
    """A client's public key as the core compares it (paramiko's PKey is one)."""

    def get_name(self) -> str: ...

    def asbytes(self) -> bytes: ...


@dataclass(frozen=True)
class KeyProof:
    """A client's signature of its public-key login request (RFC 4252 section 7), as the
    SSH worker received it, with the session id it signed.

    Why: an SSH worker is a privilege boundary. If the core took a worker's word that a
    client's signature was good, a worker taken over by an attacker could log in as anyone
    whose public key it knows. With the proof the core verifies the signature itself, and
    refuses a session id it has already seen on another connection, so such a worker can
    act only for the clients that really log in through it."""

    session_id: bytes
    service: str
    algorithm: str
    signature: bytes


class ConnectionView(Protocol):
    """What a front end reads of the connection the core registered for its client.

    ``on_kick`` is the front end's: the core calls it to end the connection (admin
    kick, ban, removed user)."""

    @property
    def id(self) -> str: ...

    @property
    def protocol(self) -> str: ...

    @property
    def remote_ip(self) -> str: ...

    @property
    def user(self) -> str: ...  # "" until logged in

    @property
    def account(self) -> object | None: ...  # set once logged in (the core's; a worker sees True)

    on_kick: Callable[[str], None] | None


class LocalConnectionView(ConnectionView, Protocol):
    """What a front end in the core's own process (FTP, HTTP) also reads and writes of its
    connection: the local port a reconnect is registered on, and whether TLS secures it
    (FTP sets ``tls`` before each login step; the core logs it and ``require_tls`` asks it)."""

    tls: bool

    @property
    def local_port(self) -> int: ...


# --- handles ------------------------------------------------------------------------------


class HandlePort(Protocol):
    """An open file or listing of a session; ``close`` finishes it, ``abort`` discards it."""

    path: str
    started: float

    def close(self) -> None: ...

    def abort(self, reason: str) -> None: ...


class ReadHandlePort(HandlePort, Protocol):
    """A download. ``fd`` is readable by the front end's process (sendfile)."""

    fd: int
    sent: int
    limit: TransferLimit | None  # the daily download quota left (None: unlimited); no sendfile past it

    def read(self, offset: int, length: int) -> bytes: ...

    def read_into(self, offset: int, buf: memoryview) -> int: ...

    def fstat(self) -> os.stat_result: ...

    def size(self) -> int: ...


class WriteHandlePort(HandlePort, Protocol):
    """An upload; ``close`` publishes it (a pre-publish veto raises there). ``write`` takes
    any buffer (SFTP hands it a view of the request, FTP of its receive buffer: no copy);
    ``read_into`` reads the upload back (SFTP ``w+``), PermissionDenied unless opened readable.

    ``failed`` is the first write error, which poisons the upload (``close`` discards
    it), so a front end can answer with it (FTP's 452)."""

    fd: int
    written: int
    limit: TransferLimit | None  # quotas: how large the file may grow, how many bytes may come

    @property
    def failed(self) -> FsError | None: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def expect(self, size: int) -> None: ...  # the size the client announced: QuotaExceeded now, not half way

    def read(self, offset: int, length: int) -> bytes: ...

    def read_into(self, offset: int, buf: memoryview) -> int: ...

    def truncate(self, size: int) -> None: ...

    def fsync(self) -> None: ...

    def fstat(self) -> os.stat_result: ...

    def size(self) -> int: ...


class CopyingWriteHandle(WriteHandlePort, Protocol):
    """An upload that can also be filled from a descriptor in the kernel, holes kept
    (``api.fs.copy``, WebDAV COPY). The core's uploads are; an SSH worker's need not be."""

    def copy_from(self, src: int, *, deadline: float | None = None) -> None: ...


class LocalWriteHandle(CopyingWriteHandle, Protocol):
    """An upload as a front end in the core's own process (HTTP) sees it: it can be filled
    in the kernel, and ``existed`` says whether it replaces a file (HTTP's 204 rather than
    201). An SSH worker's uploads need neither."""

    @property
    def existed(self) -> bool: ...


class DirHandlePort(HandlePort, Protocol):
    """A listing read in batches: ``read(count)`` gives up to count entries, [] at the end."""

    def read(self, count: int) -> list[Entry]: ...


# --- bandwidth ----------------------------------------------------------------------------


#: the most bytes a throttled transfer moves per take, and the least: a tenth of a second's
#: worth of its rate in between, so that no single take waits long at any rate
THROTTLE_CHUNK_MAX = 256 * 1024
THROTTLE_CHUNK_MIN = 4 * 1024


def throttle_chunk(rate: int) -> int:
    """How many bytes a transfer limited to ``rate`` bytes/s should move per take (a read,
    a send, an SSH worker's purchase of tokens): a tenth of a second's worth, between
    :data:`THROTTLE_CHUNK_MIN` and :data:`THROTTLE_CHUNK_MAX`. Both sides of the SSH worker
    link agree on it, which is why it is here."""
    return max(THROTTLE_CHUNK_MIN, min(rate // 10, THROTTLE_CHUNK_MAX))


class ThrottlePort(Protocol):
    """One user's bandwidth in one direction, shared by all their sessions on every protocol
    (one token bucket per user and direction; ``bandwidth_up``/``bandwidth_down``).

    ``rate`` is bytes/s now, 0 for no limit: a front end reads it per chunk and pays nothing
    more while it is 0. A limited transfer either blocks (``take``: SFTP and SCP, which
    have a thread per channel) or charges what it moved and waits without a thread
    (``charge`` then ``wait_for`` until it answers 0: FTP's I/O loop, HTTP's event loop).
    A change of the rate (reload, account database) reaches waiters at once."""

    @property
    def rate(self) -> int: ...

    @property
    def chunk(self) -> int: ...  # throttle_chunk(rate): bytes to move per take

    def take(self, n: int, deadline: float | None) -> None: ...  # LimitExceeded past the deadline

    def charge(self, n: int) -> float: ...  # a mark: wait_for(mark) is 0 once the n bytes may move

    def wait_for(self, mark: float) -> float: ...  # seconds still to wait at the current rate


class _Unlimited:
    """A ThrottlePort that never limits: what a front end holds before a session gives it the
    user's buckets."""

    rate = 0
    chunk = THROTTLE_CHUNK_MAX

    def take(self, n: int, deadline: float | None) -> None:
        return None

    def charge(self, n: int) -> float:
        return 0.0

    def wait_for(self, mark: float) -> float:
        return 0.0


UNLIMITED: ThrottlePort = _Unlimited()


class BandwidthPort(Protocol):
    """A session's user's two buckets: ``up`` (uploads), ``down`` (downloads)."""

    @property
    def up(self) -> ThrottlePort: ...

    @property
    def down(self) -> ThrottlePort: ...


# --- the session and the core ---------------------------------------------------------------------

C = TypeVar("C", bound=ConnectionView)
W = TypeVar("W", bound=WriteHandlePort)
S = TypeVar("S", bound="SessionPort[Any]", covariant=True)


class SessionPort(Protocol[W]):
    """The file operations of one logged-in user, each one call (the one door to files).

    Paths are virtual (inside the user's home). Errors are the contract's FsError
    family; the front end turns them into its protocol's replies."""

    @property
    def id(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def protocol(self) -> str: ...

    @property
    def bandwidth(self) -> BandwidthPort: ...  # the user's, shared with all their sessions

    def realpath(self, vpath: str) -> str: ...

    def stat(self, vpath: str, follow: bool = True) -> Entry: ...

    def listdir(self, vpath: str) -> list[Entry]: ...

    def opendir(self, vpath: str) -> DirHandlePort: ...

    def readlink(self, vpath: str) -> str: ...

    def statvfs(self, vpath: str = "/") -> os.statvfs_result: ...

    def open_read(self, vpath: str) -> ReadHandlePort: ...

    def open_write(self, vpath: str, *, truncate: bool = True, append: bool = False, exclusive: bool = False,
                   create: bool = True, readable: bool = False, mode: int = 0o644) -> W: ...

    def mkdir(self, vpath: str, mode: int = 0o755) -> None: ...

    def rmdir(self, vpath: str) -> None: ...

    def remove(self, vpath: str) -> None: ...

    def rename(self, src_vpath: str, dst_vpath: str, *, overwrite: bool = False) -> None: ...

    def setstat(self, vpath: str, *, mode: int | None = None, times: tuple[float, float] | None = None,
                size: int | None = None) -> None: ...

    def fsetstat(self, handle: W, *, mode: int | None = None, times: tuple[float, float] | None = None,
                 size: int | None = None) -> None: ...

    def symlink(self, target_vpath: str, link_vpath: str) -> None: ...

    def close(self) -> None: ...


class AccessView(Protocol):
    """A user's permissions as a front end shows them (FTP's MLSx ``perm`` fact)."""

    def permissions_at(self, directory: tuple[str, ...]) -> frozenset[str]: ...


class AccountView(Protocol):
    """What a front end in the core's process reads of the logged-in account: whether
    its data must be protected (FTP's PROT P), its permissions, its home (the key
    WebDAV's locks are held under, shared by every session of that home)."""

    @property
    def home(self) -> Path: ...

    @property
    def require_tls(self) -> bool: ...

    @property
    def access(self) -> AccessView: ...


class LocalSessionPort(SessionPort[W], Protocol[W]):
    """A session as the front ends in the core's own process (FTP, HTTP) see it: the
    :class:`SessionPort` and its account. The SSH workers' sessions have no account
    (it stays in the core), so this is not part of :class:`SessionPort`."""

    @property
    def account(self) -> AccountView: ...

    def check_removable(self, vpath: str) -> None:
        """Raise what :meth:`rmdir` would refuse whatever the directory holds (the home, a
        virtual folder's mount point or a directory holding one): a tree delete asks first,
        so it never empties what it could not remove."""
        ...


class CorePort(Protocol[C, S]):
    """A connection's way through the core, as every front end sees it.

    SSH proves credentials itself in parts (which methods, this password, this key)
    and then asks for the decision; FTP and HTTP do the same calls in one go (see
    :class:`LocalCorePort`). A decision that refuses carries the reason the client
    is told."""

    def connect(self, protocol: str, remote_ip: str, local_port: int = 0) -> tuple[C, Decision]: ...

    def disconnect(self, conn: C) -> None: ...

    def protocol_error(self, conn: C, detail: str) -> None: ...

    def auth_methods(self, name: str) -> list[str]: ...

    def check_password(self, conn: C, name: str, password: str) -> bool: ...

    def key_allowed(self, name: str, key: PublicKey, proof: KeyProof | None = None) -> bool: ...

    def finish_login(self, conn: C, name: str, method: str, *, announce: bool = True) -> Decision: ...

    def announce_login(self, conn: C, method: str) -> None: ...

    def open_session(self, conn: C, protocol: str | None = None) -> S: ...


class LocalCorePort(CorePort[C, S], Protocol[C, S]):
    """What the front ends served in the core's own process (FTP, HTTP) ask besides:
    the one login call (prove, decide, open the session, announce; a refusal is a
    ``LoginRefused`` carrying the failure delay as ``wait``, which the caller waits,
    so an event loop need not sleep), FTP's TLS question before a password is sent, a
    password check that leaves the failure delay to the caller (HTTP, a known session
    whose password changed), and the pre-auth timeout, read live (a reload changes it)."""

    @property
    def preauth_timeout(self) -> float: ...

    def login(self, conn: C, credentials: Credentials) -> S: ...

    def check_tls(self, conn: C, name: str) -> None: ...

    def check_password_nowait(self, conn: C, name: str, password: str) -> tuple[bool, float]: ...


def port_methods(port: type) -> dict[str, inspect.Signature]:
    """The methods a Protocol declares (its own and inherited, not Protocol's machinery),
    by name, with their signatures: what an RPC table is derived from."""
    out: dict[str, inspect.Signature] = {}
    for klass in reversed(port.__mro__):
        if klass is object or klass is Protocol or not getattr(klass, "_is_protocol", False):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and inspect.isfunction(value):
                out[name] = inspect.signature(value)
    return out


def keyword_options(signature: inspect.Signature) -> frozenset[str]:
    """The parameters of a port method a caller may pass by name: those with a default
    (options); required ones travel by position."""
    return frozenset(p.name for p in signature.parameters.values()
                     if p.default is not inspect.Parameter.empty)


__all__ = [
    "AccessView", "AccountView", "BandwidthPort", "ConnectionView", "CopyingWriteHandle", "CorePort",
    "DirHandlePort", "Entry", "HandlePort", "keyword_options", "LocalConnectionView", "LocalCorePort",
    "KeyProof", "LocalSessionPort", "LocalWriteHandle", "port_methods", "PublicKey", "ReadHandlePort", "SessionPort",
    "throttle_chunk", "THROTTLE_CHUNK_MAX", "THROTTLE_CHUNK_MIN", "ThrottlePort", "UNLIMITED",
    "WriteHandlePort",
]
