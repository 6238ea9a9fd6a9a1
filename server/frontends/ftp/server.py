"""FTP and FTPS front end: pyftpdlib speaks the protocol, the Session does the work.

pyftpdlib (pinned to 2.2.*: we override its private end-of-transfer path) does
what it is good at: command framing, passive/active data channels, TLS on both
channels, one thread with its own I/O loop per connection
(``ThreadedFTPServer``), so a slow script or a slow client stalls only its own
connection. Everything else is ours, and none of it is policy (DESIGN.md rule 1):

* Every command that touches a file is one Session call; pyftpdlib's
  filesystem and authorizer are stubs that hold no host path and grant nothing
  themselves. Session errors become one reply line: ``550 <message>`` (a
  script's veto reason included), ``553`` for a refused name, ``452`` for a
  full disk, ``451`` for a local failure.
* The end of an upload publishes it *before* the reply: pyftpdlib would send
  ``226`` and only then call ``on_file_received``. Here the data channel's close
  finishes the Session's upload handle first (pre-publish scripts run, the
  staged file is renamed into place or discarded), so ``226`` means "published"
  and a veto arrives as ``550 <reason>`` in its place. A transfer that did not
  end cleanly (ABOR, reset, timeout, TLS data channel closed without
  ``close_notify``, control connection lost) is discarded, never published.
* Login goes through the LoginCore (same users, events and limits as SFTP);
  ``connect`` scripts run in the connection's own thread, not the acceptor's.
* ``AUTH TLS`` drops whatever the client pipelined in plaintext after it
  (pyftpdlib #315, the STARTTLS command-injection class, CVE-2011-1575).
* Active mode (PORT/EPRT) is off unless ``[ftp] active_mode = true``, and then
  only to the client's own address on an unprivileged port (no FTP bounce).

Resume and atomic uploads: ``REST n`` + ``STOR`` starts the hidden staging file
as a copy of the *published* file cut at ``n`` and appends what the client
sends; ``APPE`` likewise appends to a copy. Nothing partial is ever kept, so
after an interrupted upload the published size (0 for a new file) is where a
client resumes from.
"""

from __future__ import annotations

import calendar
import errno
import functools
import logging
import os
import posixpath
import random
import secrets
import select
import socket
import stat as statmod
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from pyftpdlib.handlers import FTPHandler, TLS_FTPHandler
from pyftpdlib.handlers.ftp.data import DTPHandler
from pyftpdlib.handlers.ftp.dispatchers import PassiveDTP
from pyftpdlib.handlers.ftp.producers import FileProducer
from pyftpdlib.handlers.ftps.data import TLS_DTPHandler
from pyftpdlib.handlers.ftps.ssl import SSLConnectionMixin
from pyftpdlib.exceptions import _FileReadWriteError, _GiveUpOnSendfile, _RetryError
from pyftpdlib.ioloop import _ERRNOS_DISCONNECTED, _ERRNOS_RETRY, IOLoop
from pyftpdlib.servers import ThreadedFTPServer

from scriptsftp.server.support.config import ConfigError
from scriptsftp.server.contract.errors import (
    AlreadyExists, Failure, FsError, InvalidPath, LimitExceeded, NoSpace, NotADirectory,
)
from scriptsftp.server.support.listen import listen_addresses
from scriptsftp.server.core.session import ReadHandle, Session, WriteHandle
from scriptsftp.server.core.storage import Entry

if TYPE_CHECKING:
    from scriptsftp.server.daemon import Daemon
    from scriptsftp.server.core.login import Connection, LoginCore

log = logging.getLogger("scriptsftp.ftp")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_STOU_TRIES = 10
SENDFILE_CHUNK = 16 * 1024 * 1024
MAX_COMMAND_BYTES = 2048  # as pyftpdlib, but answered once the line has ended


# --- replies -------------------------------------------------------------------------


def reply_text(text: str) -> str:
    """One printable line: a reason must not end the reply early or forge another."""
    return "".join(c if c.isprintable() else " " for c in text).strip() or "refused"


def reply_of(exc: FsError) -> str:
    """The FTP reply line for a Session error (RFC 959 codes)."""
    if isinstance(exc, InvalidPath):
        code = 553  # file name not allowed
    elif isinstance(exc, NoSpace):
        code = 452
    elif isinstance(exc, LimitExceeded):
        code = 450
    elif isinstance(exc, Failure):
        code = 451
    else:  # not found, permission, veto, exists, (not) a directory
        code = 550
    return f"{code} {reply_text(exc.message)}"


def _replies(method: Any) -> Any:
    """A command method whose Session errors become its reply line."""

    @functools.wraps(method)
    def command(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except FsError as exc:
            self.respond(reply_of(exc))

    return command


# --- listings ---------------------------------------------------------------------------


def _list_line(entry: Entry, owner: str, now: float) -> str:
    """One ``ls -l`` line, as FTP clients parse LIST output (English month names, UTC)."""
    st = entry.st
    t = time.gmtime(st.st_mtime)
    if now - st.st_mtime < 180 * 86400:
        when = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}"
    else:
        when = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d}  {t.tm_year}"
    return f"{statmod.filemode(st.st_mode)} {st.st_nlink or 1:3d} {owner:<8} {owner:<8} {st.st_size:>12} {when} {entry.name}\r\n"


def _mlsx_facts(entry: Entry, perms: frozenset[str], kind: str | None = None) -> str:
    """RFC 3659 facts; ``perm`` reflects what the Session would allow in that directory."""
    st = entry.st
    is_dir = statmod.S_ISDIR(st.st_mode)
    p = ""
    if is_dir:
        p += "e" + ("l" if "list" in perms else "")
        p += "c" if "upload" in perms else ""
        p += "m" if "mkdir" in perms else ""
        p += "p" if "rmdir" in perms else ""
    else:
        p += "r" if "download" in perms else ""
        p += "aw" if {"upload", "overwrite"} <= perms else ""
    p += "d" if ("rmdir" if is_dir else "delete") in perms else ""
    p += "f" if "rename" in perms else ""
    modify = time.strftime("%Y%m%d%H%M%S", time.gmtime(st.st_mtime))
    facts = f"type={kind or ('dir' if is_dir else 'file')};"
    if not is_dir:
        facts += f"size={st.st_size};"
    return facts + f"modify={modify};perm={p};unique={st.st_dev:x}g{st.st_ino:x};"


# --- what pyftpdlib's data channel reads from and writes into ----------------------------


class _Download:
    """A file object over a Session ReadHandle: positional reads; ``fileno`` lets
    pyftpdlib use sendfile() on plain binary transfers."""

    def __init__(self, handle: ReadHandle, offset: int) -> None:
        self.handle = handle
        self.name = handle.path
        self.pos = offset
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.handle.read(self.pos, n if n >= 0 else 1 << 20)
        except FsError as exc:
            raise OSError(5, exc.message) from None
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int) -> None:
        self.pos = pos

    def fileno(self) -> int:
        return self.handle.fd

    def finish(self, wire_bytes: int, sendfile: bool) -> None:
        self.closed = True
        if sendfile:  # the kernel sent the bytes: the handle never saw them
            self.handle.sent = wire_bytes
        self.handle.close()

    def close(self, reason: str = "transfer not completed") -> None:
        if not self.closed:
            self.closed = True
            self.handle.abort(reason)


class _Upload:
    """A file object over a Session WriteHandle. ``close()`` discards the upload:
    only :meth:`finish`, called when the data channel ended cleanly, publishes."""

    def __init__(self, handle: WriteHandle, offset: int, announced: int | None = None) -> None:
        self.handle = handle
        self.name = handle.path
        self.pos = offset
        self.closed = False
        self.announced = announced  # the file size the client promised with ALLO, if it did

    def write(self, data: bytes) -> None:
        try:
            self.handle.write(self.pos, data)
        except FsError as exc:
            raise OSError(28 if isinstance(exc, NoSpace) else 5, exc.message) from None
        self.pos += len(data)

    def finish(self) -> None:
        """Publish (pre-publish scripts run here); raises the Session's error on a veto."""
        self.closed = True
        self.handle.close()

    def close(self, reason: str = "transfer not completed") -> None:
        if not self.closed:
            self.closed = True
            if self.handle.failed is not None:
                reason = f"upload failed: {self.handle.failed.message}"
            self.handle.abort(reason)

    def size_mismatch(self) -> str | None:
        """Why a cleanly ended upload is not the file the client announced (ALLO), if it is not."""
        if self.announced is None or self.pos == self.announced:
            return None
        return f"received {self.pos} bytes, ALLO announced {self.announced}"


# How long a cleanly ended upload waits for the control connection to show that the
# client died: the two connections' FINs leave a killed client together but may be
# read apart. Live clients send nothing until the reply, so this is paid per upload.
CONTROL_EOF_GRACE = 0.02


def _peer_closed(sock: Any, wait: float = CONTROL_EOF_GRACE) -> bool:
    """True when the other end of a control connection has closed it (or does within ``wait``).

    A client killed mid-upload closes its data connection as cleanly as one that
    finished; the control connection, closed in the same instant, tells them apart."""
    raw = sock if isinstance(sock, socket.socket) else getattr(sock, "_socket", None)  # SSL.Connection's
    if raw is None:
        return False
    poller = select.poll()
    poller.register(raw.fileno(), select.POLLIN | select.POLLRDHUP)
    if not poller.poll(int(wait * 1000)):
        return False  # quiet: the client is waiting for our reply
    try:
        return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # reset


class _DTP(DTPHandler):
    """A data connection. At its end, settle the file first, then let pyftpdlib close and reply.

    pyftpdlib's ``DTPHandler.close`` closes the socket, closes the file and sends
    the reply prepared in ``_resp``. Settling the file before it (publishing an
    upload, or discarding it) lets the reply carry the verdict."""

    _tls_clean_eof: bool | None = None
    # Larger than pyftpdlib's 64 KiB: one trip round the I/O loop costs far more
    # than the bytes it moves (sendfile() chunk for downloads, recv() for uploads).
    ac_in_buffer_size = 1024 * 1024
    ac_out_buffer_size = 1024 * 1024

    _reset = False
    _sndtimeo_set = False

    def __init__(self, sock: socket.socket, cmd_channel: Any) -> None:
        # pyftpdlib's timer (``timeout``) gives up when no byte moved between two ticks, so
        # a stall would last up to twice the timeout: tick four times per stall_timeout and
        # measure the silence itself (handle_timeout). 0: no timer, no stall timeout.
        self._stall = float(getattr(cmd_channel, "stall_timeout", 0.0) or 0.0)
        self.timeout = max(self._stall / 4, 0.05) if self._stall else 0
        self._quiet_since = time.monotonic()
        self._moved = 0
        super().__init__(sock, cmd_channel)
        if not self.connected:
            # Reset before we got to it: pyftpdlib drops it silently, leaving a
            # queued transfer (and its client) waiting for ever.
            cmd_channel.data_connection_lost()

    def handle_timeout(self) -> None:
        """A transfer that moved no byte for ``[server] stall_timeout`` is aborted (an upload
        discarded) and answered ``426`` on the control connection, which stays open:
        pyftpdlib's own answer is ``421`` and the end of the whole session."""
        moved = self.get_transmitted_bytes()
        now = time.monotonic()
        if moved != self._moved:
            self._moved, self._quiet_since = moved, now
        elif now - self._quiet_since >= self._stall:
            self._abort_stalled(f"stalled: no data for {self._stall:g} s")

    def _abort_stalled(self, reason: str) -> None:
        f = self.file_obj
        if isinstance(f, (_Upload, _Download)) and not f.closed:
            f.close(reason)  # discarded with the reason; close() then finds it settled
        self.transfer_finished = False
        # no transfer command yet: nothing awaits a reply, and an unasked one would be read
        # as the answer to the client's next command
        self._resp = (f"426 Transfer aborted: {reason}.", log.debug) if self.cmd is not None else ()
        self.close()

    def initiate_sendfile(self) -> None:
        """Downloads: one *blocking* sendfile() of up to 16 MiB per trip round the
        I/O loop (as vsftpd does), so the kernel paces the transfer instead of a
        Python loop waking per buffer. SO_SNDTIMEO bounds the block: a stalled
        client costs this connection's thread at most a second per call, then
        the loop (ABOR, timeouts) runs again. Errors as pyftpdlib handles them."""
        sock = self.socket
        if not self._sndtimeo_set:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 1, 0))
            self._sndtimeo_set = True
        sock.setblocking(True)
        try:
            sent = os.sendfile(self._fileno, self._filefd, self._offset, SENDFILE_CHUNK)
        except OSError as err:
            if err.errno in _ERRNOS_RETRY or err.errno == errno.EBUSY:
                return
            if err.errno in _ERRNOS_DISCONNECTED:
                self.handle_close()
                return
            if self.tot_bytes_sent == 0:
                raise _GiveUpOnSendfile from err
            raise
        finally:
            if not self._closed:
                sock.setblocking(False)
        if sent == 0:  # end of file
            self.discard_buffers()
            self.handle_close()
        else:
            self._offset += sent
            self.tot_bytes_sent += sent

    def _read(self, read: Any) -> Any:
        """AsyncChat.recv's error handling around ``read()``, except that a reset is
        remembered: pyftpdlib treats it like the client's clean end of an upload,
        which would publish a truncated file. Returns None at the end of the stream.
        (On a TLS channel the socket is an SSL.Connection: its errors are pyOpenSSL's,
        handled one level up, and a reset shows as a missing close_notify.)"""
        try:
            got = read()
        except OSError as err:
            if err.errno in _ERRNOS_RETRY:
                raise _RetryError from err
            if err.errno not in _ERRNOS_DISCONNECTED:
                raise
            self._reset = True
            got = None
        if not got:
            self.handle_close()
            return None
        return got

    def recv(self, buffer_size: int) -> bytes:
        return self._read(lambda: self.socket.recv(buffer_size)) or b""

    _buf: bytearray | None = None

    def handle_read(self) -> None:
        """Binary uploads on a plain socket: recv_into one reused buffer and write
        from it, instead of a new bytes object per read (pyftpdlib's way)."""
        f = self.file_obj
        if self._data_wrapper is not None or not isinstance(f, _Upload) or not isinstance(self.socket, socket.socket):
            super().handle_read()
            return
        if self._buf is None:
            self._buf = bytearray(self.ac_in_buffer_size)
        buf = self._buf
        try:
            n = self._read(lambda: self.socket.recv_into(buf))
        except _RetryError:
            return
        except OSError:
            self.handle_error()
            return
        if n is None:
            return
        self.tot_bytes_received += n
        try:
            f.write(memoryview(self._buf)[:n])
        except OSError as err:
            raise _FileReadWriteError(err) from err

    handle_read_event = handle_read

    def handle_close(self) -> None:
        if self.receive and not self._closed and isinstance(self.socket, socket.socket):
            # the I/O loop calls handle_close() straight on EPOLLERR/EPOLLHUP: a pending
            # reset is then only visible here
            try:
                if self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in _ERRNOS_DISCONNECTED:
                    self._reset = True
            except OSError:
                pass
        if self.receive and not self._closed and isinstance(self.socket, SSL.Connection):
            # A TLS upload is complete only if the client said so (close_notify);
            # a bare TCP close may be a truncation (RFC 4217 section 10).
            self._tls_clean_eof = bool(self.socket.get_shutdown() & SSL.RECEIVED_SHUTDOWN)
        super().handle_close()

    def close(self) -> None:
        f = self.file_obj
        if not self._closed and isinstance(f, (_Upload, _Download)) and not f.closed:
            self._settle(f)
        super().close()

    def _settle(self, f: _Upload | _Download) -> None:
        if isinstance(f, _Download):
            if self.transfer_finished:
                f.finish(self.tot_bytes_sent, sendfile=self._filefd is not None)
            else:
                f.close("client stopped the download")
            return
        if self.transfer_finished and (self._reset or self._tls_clean_eof is False):
            self.transfer_finished = False
            why = "connection reset" if self._reset else "TLS data connection ended without close_notify"
            f.close(f"upload interrupted: {why}")
            self._resp = (f"426 Upload discarded: {why}.", log.debug)
            return
        if not self.transfer_finished:
            f.close("upload interrupted")
            return
        refusal = self._refuse_publish(f)
        if refusal is not None:
            self.transfer_finished = False
            f.close(f"upload discarded: {refusal}")
            self._resp = (f"426 Upload discarded: {refusal}.", log.debug)
            return
        try:
            f.finish()
        except FsError as exc:
            self.transfer_finished = False
            self._resp = (reply_of(exc), log.debug)
        except Exception:
            log.exception("publishing %s failed", f.name)
            self.transfer_finished = False
            self._resp = ("451 Upload failed: local error.", log.debug)


    def _refuse_publish(self, f: _Upload) -> str | None:
        """Why a data connection that ended cleanly still does not prove a complete upload."""
        ctrl = self.cmd_channel
        if ctrl is None or getattr(ctrl, "_closed", False) or _peer_closed(ctrl.socket):
            return "the control connection was closed"
        return f.size_mismatch()

    def _failed_write_reply(self) -> str | None:
        """The reply for the exception being handled when it is a failed write to the upload
        (452 for a full disk), instead of pyftpdlib's ``426 None; transfer aborted.``"""
        exc = sys.exc_info()[1]
        f = self.file_obj
        if not isinstance(exc, _FileReadWriteError) or not isinstance(f, _Upload) or f.handle.failed is None:
            return None
        return reply_of(f.handle.failed)

    def handle_error(self) -> None:
        reply = self._failed_write_reply()
        if reply is None:
            super().handle_error()
            return
        self._resp = (reply, log.debug)
        self.close()


class _TLSDTP(TLS_DTPHandler, _DTP):
    """TLS on top: pyftpdlib's SSL layer runs first, then ours (see the MRO)."""

    def handle_error(self) -> None:
        """pyftpdlib's SSL layer logs any error and closes without a reply: a full disk on a
        TLS-enabled daemon left the client waiting. A failed write gets its reply here too,
        closed as the SSL layer closes on errors (no TLS shutdown with the client mid-send)."""
        reply = self._failed_write_reply()
        if reply is None:
            super().handle_error()
            return
        self._error = True
        self._resp = (reply, log.debug)
        super(SSLConnectionMixin, self).close()  # _DTP.close: settle, then the reply


class _PassiveDTP(PassiveDTP):
    """pyftpdlib's passive data listener, made safe for a thread per connection.

    pyftpdlib binds a random port of ``passive_ports`` with SO_REUSEADDR, then listens.
    Linux lets two such sockets bind one port while neither listens yet, so two
    connection threads (or another program) can take the same port at once; the
    second listen() then fails with EADDRINUSE, which pyftpdlib does not expect: the
    control connection was dropped without a reply (rclone reported "EOF"). Here the
    loser binds another port of the range and listens again; the range exhausted,
    the kernel picks the port, as pyftpdlib does when every port of the range is busy."""

    def listen(self, num: int) -> None:
        taken = self.socket.getsockname()[1]
        untried = [p for p in (self.cmd_channel.passive_ports or ()) if p != taken]
        random.shuffle(untried)
        while True:
            try:
                super().listen(num)
                return
            except OSError as err:
                if err.errno != errno.EADDRINUSE or taken == 0:  # 0: the kernel chose it
                    self.close()  # half-built: nothing of it may stay in the I/O loop
                    raise
            taken = self._bind_another(untried)

    def _bind_another(self, untried: list[int]) -> int:
        """A new socket bound to the next free port of ``untried``; 0 once it is empty (the
        kernel's choice)."""
        host, family = self.socket.getsockname()[0], self.socket.family
        while True:
            port = untried.pop() if untried else 0
            self.socket.close()
            self.del_channel()
            self.socket = None
            self.create_socket(family, socket.SOCK_STREAM)
            self.set_reuse_addr()
            try:
                self.bind((host, port))
                return port
            except OSError as err:
                if err.errno != errno.EADDRINUSE or port == 0:
                    self.close()
                    raise


# --- stubs standing in for pyftpdlib's filesystem and authorizer ---------------------


class _VirtualFS:
    """Only what pyftpdlib's command parsing needs: a cwd and lexical path joining.

    Paths stay virtual; the Session confines and checks them. No method here
    touches the disk, and any pyftpdlib code path we did not override that tries
    fails with AttributeError (the connection is closed) rather than reaching a
    host path."""

    def __init__(self, cmd_channel: Any) -> None:
        self.cmd_channel = cmd_channel
        self.root = "/"
        self.cwd = "/"

    def ftpnorm(self, ftppath: str) -> str:
        return posixpath.normpath("/" + posixpath.join(self.cwd, ftppath).lstrip("/"))

    ftp2fs = ftpnorm

    def fs2ftp(self, fspath: str) -> str:
        return fspath

    def validpath(self, path: str) -> bool:
        return True


class _NoAuthorizer:
    """pyftpdlib asks its authorizer before each command; the Session decides instead."""

    def has_perm(self, username: str, perm: str, path: str | None = None) -> bool:
        return True

    def get_perms(self, username: str) -> str:
        return "elradfmwMT"

    def get_msg_quit(self, username: str) -> str:
        return "Goodbye."

    def impersonate_user(self, username: str, password: str) -> None:
        pass

    def terminate_impersonation(self, username: str) -> None:
        pass


# --- the control connection -----------------------------------------------------------------

_FS_COMMANDS_NOT_OFFERED = ("REIN", "SMNT")
_TRANSFER_COMMANDS = frozenset({"RETR", "STOR", "APPE", "STOU", "LIST", "NLST", "MLSD"})


class _SessionCommands:
    """FTP commands as Session calls. Mixed into FTPHandler or TLS_FTPHandler."""

    # set per listener by make_listener
    core: "LoginCore"
    listener: "FTPListener"
    active_mode = False
    implicit_tls = False
    stall_timeout = 120.0  # [server] stall_timeout, read by the data channel (_DTP)

    # pyftpdlib settings
    authorizer = _NoAuthorizer()
    banner = "scriptsftp FTP server ready."
    permit_foreign_addresses = False  # no FTP bounce (RFC 2577)
    permit_privileged_ports = False
    unicode_errors = "strict"  # an undecodable name gets 501, never a U+FFFD look-alike
    max_login_attempts = 3
    proto_cmds = {k: v for k, v in FTPHandler.proto_cmds.items() if k not in _FS_COMMANDS_NOT_OFFERED}

    conn: "Connection | None" = None
    session: Session | None = None
    _greet_in_thread = False
    _ended = False
    _preauth_timer: Any = None

    # --- lifetime -----------------------------------------------------------------

    def handle(self) -> None:
        """Called in the acceptor thread: the greeting waits for the connection's own thread."""
        self._greet_in_thread = True

    def add_channel(self, map: Any = None, events: Any = None) -> None:
        super().add_channel(map, events)  # type: ignore[misc]
        if self._greet_in_thread:  # registered with the connection thread's own I/O loop
            self._greet_in_thread = False
            try:
                # pyftpdlib armed the idle timer on the acceptor's loop: move it to ours,
                # so that it fires in this connection's thread
                if self._idler is not None and not self._idler.cancelled:  # type: ignore[attr-defined]
                    self._idler.cancel()  # type: ignore[attr-defined]
                if self.timeout:  # type: ignore[attr-defined]
                    self._idler = self.ioloop.call_later(  # type: ignore[attr-defined]
                        self.timeout, self.handle_timeout, _errback=self.handle_error)  # type: ignore[attr-defined]
                self._preauth_timer = self.ioloop.call_later(  # type: ignore[attr-defined]
                    self.core.preauth_timeout, self._preauth_expired, _errback=self.handle_error)  # type: ignore[attr-defined]
                self._greet()
            except Exception:
                self.handle_error()  # type: ignore[attr-defined]

    def _greet(self) -> None:
        self.listener._track(self)
        sock = self.socket  # type: ignore[attr-defined]
        self.conn, decision = self.core.connect("ftp", self.remote_ip, sock.getsockname()[1])  # type: ignore[attr-defined]
        self.conn.on_kick = self.kick
        if not decision.allowed:
            self.respond("421 " + reply_text(decision.reason or "connection refused by a server script"))  # type: ignore[attr-defined]
            self.close_when_done()  # type: ignore[attr-defined]
            return
        if self.implicit_tls:
            self._pbsz = self._prot = True  # implicit FTPS: everything is protected
            self.secure_connection(self.ssl_context)  # type: ignore[attr-defined]
            return  # the 220 follows the handshake
        self.respond(f"220 {self.banner}")  # type: ignore[attr-defined]

    def _preauth_expired(self) -> None:
        """``[server] preauth_timeout``: a control connection that has not logged in by now is
        closed with a 421, so idle sockets cannot hold connection slots (pyftpdlib's own
        ``timeout`` only counts silence, and a client may trickle commands forever)."""
        if self._closed or self.authenticated:  # type: ignore[attr-defined]
            return
        timeout = self.core.preauth_timeout
        log.info("closing FTP connection not logged in after %gs", timeout,
                 extra={"sid": self.conn.id if self.conn else "", "ip": self.remote_ip})  # type: ignore[attr-defined]
        self.respond(f"421 Login timeout ({timeout:g}s): closing control connection.")  # type: ignore[attr-defined]
        self.close_when_done()  # type: ignore[attr-defined]

    def handle_failed_ssl_handshake(self) -> None:
        if self.conn is not None:  # scanners and probes: the defender counts them
            self.core.protocol_error(self.conn, "TLS handshake failed")
        super().handle_failed_ssl_handshake()  # type: ignore[misc]

    def handle_ssl_established(self) -> None:
        if self.implicit_tls and not self.authenticated and not self.username:  # type: ignore[attr-defined]
            self.respond(f"220 {self.banner}")  # type: ignore[attr-defined]

    def close(self) -> None:
        super().close()  # type: ignore[misc]  (closes the data channel first: an open upload is discarded)
        if self._ended:
            return
        self._ended = True
        if self._preauth_timer is not None and not self._preauth_timer.cancelled:
            self._preauth_timer.cancel()
        self.listener._untrack(self)
        if self.conn is not None:
            try:
                self.core.disconnect(self.conn)
            except Exception:
                log.exception("disconnect failed")

    def kick(self, reason: str) -> None:
        """Close from another thread (reload removed the user, shutdown): runs on our own loop."""
        def go() -> None:
            if not self._closed:  # type: ignore[attr-defined]
                self.respond("421 " + reply_text(reason))  # type: ignore[attr-defined]
                self.close_when_done()  # type: ignore[attr-defined]
        try:
            self.ioloop.call_later(0, go, _errback=self.handle_error)  # type: ignore[attr-defined]
        except Exception:
            pass

    # --- command gate ----------------------------------------------------------------

    _overlong = False

    def collect_incoming_data(self, data: bytes) -> None:
        """pyftpdlib answers an over-long line as soon as it passes 2048 bytes and then
        runs its tail as a command: two replies for one line, and the client's replies
        drift off by one. Discard the whole line instead and answer once, at its end."""
        if self._overlong:
            return
        self._in_buffer.append(data)
        self._in_buffer_len += len(data)
        if self._in_buffer_len > MAX_COMMAND_BYTES:
            self._in_buffer, self._in_buffer_len, self._overlong = [], 0, True

    def found_terminator(self) -> None:
        if self._overlong:
            self._overlong = False
            self.respond("500 Command too long.")  # type: ignore[attr-defined]
            return
        try:
            b"".join(self._in_buffer).decode(self.encoding, self.unicode_errors)  # type: ignore[attr-defined]
        except UnicodeDecodeError:
            # pyftpdlib answers 501 but leaves the line in its buffer: every later command is
            # glued behind it and refused the same way, and the connection never recovers
            self._in_buffer, self._in_buffer_len = [], 0
            self.respond("501 Can't decode command.")  # type: ignore[attr-defined]
            return
        super().found_terminator()  # type: ignore[misc]

    def _tls_on(self) -> bool:
        return isinstance(getattr(self, "socket", None), SSL.Connection)

    def _make_epasv(self, extmode: bool = False) -> None:
        """A passive port that cannot be opened (descriptors exhausted, say) is a 425
        reply; pyftpdlib would let the OSError end the control connection."""
        try:
            super()._make_epasv(extmode)  # type: ignore[misc]
        except OSError as exc:
            self.respond(f"425 Can't open data connection: {exc.strerror or exc}.")  # type: ignore[attr-defined]

    def process_command(self, cmd: str, *args: Any, **kwargs: Any) -> None:
        if cmd in _TRANSFER_COMMANDS and self.data_channel is not None \
                and self.data_channel.file_obj is not None:  # type: ignore[attr-defined]
            # pyftpdlib would swap the running transfer's file for the new one
            self.respond("425 Another transfer is in progress on this connection.")  # type: ignore[attr-defined]
            return
        acct = self.session.account if self.session is not None else None
        if acct is not None and acct.require_tls and cmd in ("PASV", "EPSV", "PORT", "EPRT") \
                and not getattr(self, "_prot", False):
            self.respond("521 Data connections must be protected for this user: send PBSZ 0 and PROT P first.")  # type: ignore[attr-defined]
            return
        super().process_command(cmd, *args, **kwargs)  # type: ignore[misc]

    def ftp_AUTH(self, line: str) -> None:
        secured_before = self._tls_on()
        super().ftp_AUTH(line)  # type: ignore[misc]
        if not secured_before and getattr(self, "_ssl_requested", False):
            # Bytes the client sent after AUTH in the same plaintext packet must not
            # run as if they had come over TLS (pyftpdlib #315).
            pending = len(self.ac_in_buffer) + self._in_buffer_len  # type: ignore[attr-defined]
            self.ac_in_buffer = b""  # type: ignore[attr-defined]
            self._in_buffer = []
            self._in_buffer_len = 0
            if pending:
                log.warning("discarded %d bytes pipelined in plaintext after AUTH TLS", pending,
                            extra={"sid": self.conn.id if self.conn else "", "ip": self.remote_ip})  # type: ignore[attr-defined]

    def ftp_PORT(self, line: str) -> None:
        if self._active_refused():
            return
        super().ftp_PORT(line)  # type: ignore[misc]

    def ftp_EPRT(self, line: str) -> None:
        if self._active_refused():
            return
        super().ftp_EPRT(line)  # type: ignore[misc]

    def _active_refused(self) -> bool:
        if self.active_mode:
            return False
        self.respond("502 Active mode (PORT/EPRT) is disabled on this server: use passive mode (PASV/EPSV).")  # type: ignore[attr-defined]
        return True

    # --- login -------------------------------------------------------------------------

    def _tls_refusal(self, name: str) -> str | None:
        rec = self.core.users.get(name)
        if rec is None or not rec.account.require_tls or self._tls_on():
            return None
        if not hasattr(self, "ssl_context") or self.ssl_context is None:  # type: ignore[attr-defined]
            return "530 TLS is required for this user, and this server offers no FTPS."
        return "530 TLS is required for this user: use FTPS (AUTH TLS before USER, or implicit FTPS)."

    def ftp_USER(self, line: str) -> None:
        if self.authenticated:  # type: ignore[attr-defined]
            self.respond("503 Already logged in: reconnect to log in as another user.")  # type: ignore[attr-defined]
            return
        refusal = self._tls_refusal(line)
        if refusal:  # before the password travels in clear text
            self.respond(refusal)  # type: ignore[attr-defined]
            return
        self.username = line
        self.respond("331 Username ok, send password.")  # type: ignore[attr-defined]

    def ftp_PASS(self, line: str) -> None:
        if self.authenticated:  # type: ignore[attr-defined]
            self.respond("503 User already authenticated.")  # type: ignore[attr-defined]
            return
        name = self.username
        if not name:
            self.respond("503 Login with USER first.")  # type: ignore[attr-defined]
            return
        self.username = ""
        assert self.conn is not None
        self.conn.tls = self._tls_on()
        refusal = self._tls_refusal(name)
        if refusal:
            self.respond(refusal)  # type: ignore[attr-defined]
            return
        if not self.core.check_password(self.conn, name, line):  # logs, raises login-failed, delays
            self._login_failed("530 Authentication failed.")
            return
        decision = self.core.finish_login(self.conn, name, "password")
        if not decision.allowed:
            self._login_failed("530 " + reply_text(decision.reason))
            return
        try:
            self.session = self.core.open_session(self.conn, "ftp")
        except FsError as exc:
            self._login_failed("530 " + reply_text(exc.message))
            return
        self.username = name
        self.authenticated = True
        if self._preauth_timer is not None and not self._preauth_timer.cancelled:
            self._preauth_timer.cancel()
        self.fs = _VirtualFS(self)
        self.respond("230 Login successful.")  # type: ignore[attr-defined]

    def _login_failed(self, reply: str) -> None:
        self.attempted_logins += 1  # type: ignore[attr-defined]
        self.respond(reply)  # type: ignore[attr-defined]
        if self.attempted_logins >= self.max_login_attempts:  # type: ignore[attr-defined]
            self.respond("421 Too many failed logins: goodbye.")  # type: ignore[attr-defined]
            self.close_when_done()  # type: ignore[attr-defined]

    # --- directories and names --------------------------------------------------------

    def _s(self) -> Session:
        assert self.session is not None
        return self.session

    @_replies
    def ftp_CWD(self, path: str) -> None:
        entry = self._s().stat(path)
        if not entry.is_dir:
            raise NotADirectory(f"{path}: not a directory")
        self.fs.cwd = self._s().realpath(path)  # type: ignore[attr-defined]
        self.respond(f'250 "{self.fs.cwd}" is the current directory.')  # type: ignore[attr-defined]

    @_replies
    def ftp_MKD(self, path: str) -> None:
        self._s().mkdir(path)
        self.respond('257 "%s" directory created.' % path.replace('"', '""'))  # type: ignore[attr-defined]

    @_replies
    def ftp_RMD(self, path: str) -> None:
        self._s().rmdir(path)
        self.respond("250 Directory removed.")  # type: ignore[attr-defined]

    @_replies
    def ftp_DELE(self, path: str) -> None:
        self._s().remove(path)
        self.respond("250 File removed.")  # type: ignore[attr-defined]

    @_replies
    def ftp_RNFR(self, path: str) -> None:
        if path == "/":
            self.respond("550 Cannot rename the home directory.")  # type: ignore[attr-defined]
            return
        self._s().stat(path, follow=False)
        self._rnfr = path
        self.respond("350 Ready for destination name.")  # type: ignore[attr-defined]

    @_replies
    def ftp_RNTO(self, path: str) -> None:
        src, self._rnfr = self._rnfr, None
        if not src:
            self.respond("503 Bad sequence of commands: use RNFR first.")  # type: ignore[attr-defined]
            return
        # FTP servers rename over an existing file (rename(2)); the Session
        # then also requires the overwrite permission there.
        self._s().rename(src, path, overwrite=True)
        self.respond("250 Renaming ok.")  # type: ignore[attr-defined]

    @_replies
    def ftp_SIZE(self, path: str) -> None:
        entry = self._s().stat(path)
        if entry.is_dir:
            self.respond(f"550 {reply_text(path)} is not retrievable.")  # type: ignore[attr-defined]
        else:
            self.respond(f"213 {entry.size}")  # type: ignore[attr-defined]

    @_replies
    def ftp_MDTM(self, path: str) -> None:
        entry = self._s().stat(path)
        if entry.is_dir:
            self.respond(f"550 {reply_text(path)} is not retrievable.")  # type: ignore[attr-defined]
        else:
            self.respond("213 " + time.strftime("%Y%m%d%H%M%S", time.gmtime(entry.st.st_mtime)))  # type: ignore[attr-defined]

    @_replies
    def ftp_MFMT(self, path: str, timeval: str) -> None:
        try:
            when = calendar.timegm(time.strptime(timeval[:14], "%Y%m%d%H%M%S"))
        except ValueError:
            self.respond("501 Invalid time format: expected YYYYMMDDHHMMSS.")  # type: ignore[attr-defined]
            return
        entry = self._s().stat(path)
        self._s().setstat(path, times=(entry.st.st_atime, float(when)))
        self.respond(f"213 Modify={timeval[:14]}; {path}.")  # type: ignore[attr-defined]

    @_replies
    def ftp_SITE_CHMOD(self, path: str, mode: str) -> None:
        try:
            bits = int(mode, 8)
            if not 0 <= bits <= 0o7777:
                raise ValueError
        except ValueError:
            self.respond("501 Invalid SITE CHMOD format.")  # type: ignore[attr-defined]
            return
        self._s().setstat(path, mode=bits)
        self.respond("200 SITE CHMOD successful.")  # type: ignore[attr-defined]

    # --- listings -------------------------------------------------------------------

    def _entries(self, path: str) -> tuple[str, list[Entry], bool]:
        """(directory, entries, is_dir) for LIST/NLST/STAT; symlinks shown as what they reach."""
        s = self._s()
        try:
            entries = s.listdir(path)
        except NotADirectory:
            return posixpath.dirname(path), [s.stat(path)], False
        shown = []
        for e in entries:
            if e.is_link:
                try:
                    e = Entry(e.name, s.stat(posixpath.join(path, e.name)).st)
                except FsError:
                    pass  # dangling, or pointing outside the home: listed as the link it is
            shown.append(e)
        return path, shown, True

    def _list_lines(self, path: str) -> str:
        _, entries, _ = self._entries(path)
        now = time.time()
        owner = self._s().user
        return "".join(_list_line(e, owner, now) for e in entries)

    @_replies
    def ftp_LIST(self, path: str) -> None:
        data = self._list_lines(path)
        self.push_dtp_data(data.encode("utf-8", "surrogateescape"), isproducer=False, cmd="LIST")  # type: ignore[attr-defined]

    @_replies
    def ftp_NLST(self, path: str) -> None:
        _, entries, is_dir = self._entries(path)
        names = "".join((e.name if is_dir else posixpath.join(posixpath.dirname(path), e.name)) + "\r\n"
                        for e in entries)
        self.push_dtp_data(names.encode("utf-8", "surrogateescape"), isproducer=False, cmd="NLST")  # type: ignore[attr-defined]

    @_replies
    def ftp_MLSD(self, path: str) -> None:
        s = self._s()
        directory, entries, is_dir = self._entries(path)
        if not is_dir:
            self.respond(f"501 {reply_text(path)} is not a directory.")  # type: ignore[attr-defined]
            return
        perms = s.account.access.permissions_at(tuple(p for p in directory.split("/") if p))
        data = "".join(f"{_mlsx_facts(e, perms)} {e.name}\r\n" for e in entries)
        self.push_dtp_data(data.encode("utf-8", "surrogateescape"), isproducer=False, cmd="MLSD")  # type: ignore[attr-defined]

    @_replies
    def ftp_MLST(self, path: str) -> None:
        s = self._s()
        entry = s.stat(path)
        parent = tuple(p for p in path.split("/") if p)
        perms = s.account.access.permissions_at(parent if entry.is_dir else parent[:-1])
        self.push(f'250-Listing "{path}":\r\n')  # type: ignore[attr-defined]
        self.push(f" {_mlsx_facts(entry, perms, 'cdir' if path == '/' else None)} {path}\r\n")  # type: ignore[attr-defined]
        self.respond("250 End MLST.")  # type: ignore[attr-defined]

    @_replies
    def ftp_STAT(self, path: str) -> None:
        if not path:
            super().ftp_STAT(path)  # type: ignore[misc]
            return
        data = self._list_lines(path)
        self.push(f'213-Status of "{path}":\r\n')  # type: ignore[attr-defined]
        self.push(data)  # type: ignore[attr-defined]
        self.respond("213 End of status.")  # type: ignore[attr-defined]

    # --- transfers ------------------------------------------------------------------

    _announced: int | None = None

    def ftp_ALLO(self, line: str) -> None:
        """``ALLO size``: the size of the next upload. One that ends cleanly with another
        size is discarded: the only check plain FTP offers against a client that dies
        between two writes while its control connection looks alive (docs/ftp.md)."""
        words = line.split()
        if not words or not words[0].isdigit() or len(words[0]) > 19:
            self.respond("501 Syntax: ALLO <SP> size-in-bytes.")  # type: ignore[attr-defined]
            return
        self._announced = int(words[0])
        self.respond(f"200 The next upload must be {self._announced} bytes; another size is discarded.")  # type: ignore[attr-defined]

    def _take_announced(self) -> int | None:
        """ALLO covers the next upload command only, whether it succeeds or not."""
        announced, self._announced = self._announced, None
        return announced

    @_replies
    def ftp_RETR(self, path: str) -> None:
        rest, self._restart_position = self._restart_position, 0
        handle = self._s().open_read(path)
        size = handle.size()
        if rest > size:
            handle.abort("REST position beyond the end of the file")
            self.respond(f"554 REST position ({rest}) > file size ({size}).")  # type: ignore[attr-defined]
            return
        f = _Download(handle, rest)
        self.push_dtp_data(FileProducer(f, self._current_type), isproducer=True, file=f, cmd="RETR")  # type: ignore[attr-defined]

    @_replies
    def ftp_STOR(self, path: str, mode: str = "w") -> None:
        rest, self._restart_position = self._restart_position, 0
        announced = self._take_announced()
        append = "a" in mode
        handle = self._s().open_write(path, truncate=not (rest or append), append=append)
        offset = 0
        if append or rest:
            size = handle.size()
            if rest > size:
                handle.abort("REST position beyond the end of the file")
                self.respond(f"554 REST position ({rest}) > file size ({size}).")  # type: ignore[attr-defined]
                return
            offset = size if append else rest
            if not append:
                try:
                    handle.truncate(rest)
                except FsError:
                    handle.abort("could not cut the copy at the REST position")
                    raise
        self._receive(_Upload(handle, offset, announced), "APPE" if append else "STOR")

    @_replies
    def ftp_STOU(self, line: str) -> None:
        announced = self._take_announced()
        if self._restart_position:
            self.respond("450 Can't STOU while REST request is pending.")  # type: ignore[attr-defined]
            return
        if line:
            directory, prefix = posixpath.split(self.fs.ftp2fs(line))  # type: ignore[attr-defined]
        else:
            directory, prefix = self.fs.cwd, "upload"  # type: ignore[attr-defined]
        for _ in range(_STOU_TRIES):
            name = f"{prefix}.{secrets.token_hex(4)}"
            try:
                handle = self._s().open_write(posixpath.join(directory, name), exclusive=True)
                break
            except AlreadyExists:
                continue
        else:
            self.respond("450 No usable unique file name found.")  # type: ignore[attr-defined]
            return
        self._receive(_Upload(handle, 0, announced), "STOU", f"FILE: {name}")

    def _receive(self, f: _Upload, cmd: str, text: str = "") -> None:
        if self.data_channel is not None:  # type: ignore[attr-defined]
            self.respond("125 " + (text or "Data connection already open. Transfer starting."))  # type: ignore[attr-defined]
            self.data_channel.file_obj = f  # type: ignore[attr-defined]
            self.data_channel.enable_receiving(self._current_type, cmd)  # type: ignore[attr-defined]
        else:
            self.respond("150 " + (text or "File status okay. About to open data connection."))  # type: ignore[attr-defined]
            self._in_dtp_queue = (f, cmd)

    def data_connection_lost(self) -> None:
        """The data connection died before the transfer began: end the queued one."""
        queued_in, queued_out = self._in_dtp_queue, self._out_dtp_queue
        self._in_dtp_queue = self._out_dtp_queue = None
        f = queued_in[0] if queued_in else queued_out[2] if queued_out else None
        if f is not None:
            f.close("data connection lost before the transfer started")
        if queued_in or queued_out:
            self.respond("426 Data connection lost before the transfer started.")  # type: ignore[attr-defined]

    def flush_account(self) -> None:
        # pyftpdlib forgets a queued upload here without closing it; discard it properly
        queued = self._in_dtp_queue
        super().flush_account()  # type: ignore[misc]
        if queued is not None and queued[0] is not None:
            queued[0].close()


class _PlainHandler(_SessionCommands, FTPHandler):
    dtp_handler = _DTP
    passive_dtp = _PassiveDTP


class _TLSHandler(_SessionCommands, TLS_FTPHandler):
    dtp_handler = _TLSDTP
    passive_dtp = _PassiveDTP
    proto_cmds = {k: v for k, v in TLS_FTPHandler.proto_cmds.items() if k not in _FS_COMMANDS_NOT_OFFERED}


# --- the listener ---------------------------------------------------------------------------


class _Server(ThreadedFTPServer):
    """One listening socket; a thread with its own I/O loop per connection."""

    def __init__(self, sock: socket.socket, handler: type, listener: "FTPListener") -> None:
        # ThreadedFTPServer keeps its stop flag and lock on the class: one per server instead
        self._exit = threading.Event()
        self._lock = threading.Lock()
        self.listener = listener
        super().__init__(sock, handler, ioloop=IOLoop(), backlog=128)

    def handle_accept(self) -> None:
        if self.listener.stopping.is_set():
            self.del_channel()  # the socket is shut down: stop watching it
            return
        super().handle_accept()


class FTPListener:
    """FTP or FTPS on one or more addresses (the daemon's Listener protocol)."""

    name = "ftp"

    def __init__(self, addresses: list[tuple[str, int]], handler: type) -> None:
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._handlers: set[Any] = set()
        handler.listener = self
        self.servers: list[_Server] = []
        for host, port in addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            self.servers.append(_Server(s, handler, self))

    @property
    def bound(self) -> list[str]:
        return [f"{host}:{port}" for host, port in (s.socket.getsockname()[:2] for s in self.servers)]

    def start(self) -> None:
        for s in self.servers:
            threading.Thread(target=self._serve, args=(s,), name="ftp-accept", daemon=True).start()

    def _serve(self, server: _Server) -> None:
        try:
            server.serve_forever(timeout=1.0, blocking=True, handle_exit=False)
        except Exception:
            if not self.stopping.is_set():
                log.exception("FTP acceptor stopped")

    def _track(self, handler: Any) -> None:
        with self._lock:
            self._handlers.add(handler)

    def _untrack(self, handler: Any) -> None:
        with self._lock:
            self._handlers.discard(handler)

    def stop_accepting(self) -> None:
        self.stopping.set()
        for s in self.servers:
            try:
                s.socket.shutdown(socket.SHUT_RDWR)  # Linux: new connections are refused at once
            except OSError:
                pass

    def active(self) -> int:
        with self._lock:
            return len(self._handlers)

    def close_all(self, reason: str) -> None:
        with self._lock:
            handlers = list(self._handlers)
        for h in handlers:
            h.kick(reason)
        deadline = time.monotonic() + 3
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        for s in self.servers:
            s._exit.set()  # connection threads leave their loops; their channels close


# --- wiring -------------------------------------------------------------------------------------


def passive_range(value: str) -> list[int] | None:
    """``"60000-60099"`` → the ports; ``""`` → None (any free port)."""
    if not value:
        return None
    low, _, high = value.partition("-")
    return list(range(int(low), int(high or low) + 1))


def tls_context(certificate: str, private_key: str) -> SSL.Context:
    """TLS 1.2 or later, no compression, no renegotiation."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
    ctx.use_certificate_chain_file(certificate)
    ctx.use_privatekey_file(private_key)
    ctx.check_privatekey()
    # data connections may resume the control connection's TLS session
    ctx.set_session_id(b"scriptsftp-ftp")
    return ctx


def make_listener(daemon: "Daemon") -> FTPListener:

    cfg = daemon.cfg
    m = cfg.model.ftp
    # pyftpdlib logs every command at INFO; our Session and LoginCore log what matters.
    logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
    attrs: dict[str, Any] = {
        "core": daemon.core,
        "passive_ports": passive_range(m.passive_ports),
        "masquerade_address": m.masquerade_address or None,
        "active_mode": m.active_mode,
        "stall_timeout": cfg.model.server.stall_timeout,
    }
    base: type = _PlainHandler
    if m.tls != "off":
        try:
            ctx = tls_context(str(cfg.resolve(m.certificate)), str(cfg.resolve(m.private_key)))
        except (SSL.Error, OSError) as exc:
            raise ConfigError([f"{cfg.where(('ftp', 'certificate'))}: cannot load certificate/key: {exc}"]) from None
        base = _TLSHandler
        attrs.update(ssl_context=ctx, implicit_tls=m.tls == "implicit")
    handler = type("FTPHandler", (base,), attrs)
    return FTPListener(listen_addresses(m.listen), handler)
