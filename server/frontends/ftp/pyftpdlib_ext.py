"""pyftpdlib, as far as we go past its public surface: the one module that knows its insides.

pyftpdlib's sanctioned seams are its class attributes (``dtp_handler``,
``passive_dtp``, ``authorizer``, ``abstracted_fs`` on FTPHandler) and the
``on_*`` callbacks. They are not enough for what the FTP front end promises
(see docs/architecture.md): an upload must be published *before* the ``226``,
a reset must not look like the clean end of an upload, a stall must cost the
transfer and not the session. So the front end overrides private methods and
reads private attributes of ``DTPHandler``, ``FTPHandler`` and
``ThreadedFTPServer``. Every such name is used here, and only here:

* :class:`DataChannel` (a ``DTPHandler``): blocking ``sendfile()`` per loop
  trip, resets remembered instead of taken for an end of upload, ``recv_into``
  for plain binary uploads, a :meth:`DataChannel.settle` hook that runs before
  pyftpdlib closes the file and sends the reply it prepared, and the reply
  itself as :meth:`DataChannel.set_reply`.
* :class:`ControlChannel` (an ``FTPHandler``): the command line collection (one
  answer to an over-long or undecodable line), the idle timer moved to the
  connection's own thread, ``PASV``/``EPSV`` failures as a ``425``, the queued
  transfer and restart position as typed methods.
* :class:`ThreadedServer`: the stop flag and lock per server, not per class.

These were written for pyftpdlib 2.2.* (the pin in pyproject.toml).
:func:`install` checks the installed version and refuses any other, with a
line the daemon prints instead of a traceback; the FTP listener calls it
before it builds anything. Importing this module patches nothing: the
overrides live on subclasses that only the FTP front end uses, and the one
global setting (pyftpdlib's own logger) is made by :func:`install`.

The other ftp modules import pyftpdlib's classes from here, so that a new
pyftpdlib is read against one file. pyftpdlib has no type annotations: the
attributes and methods we use of it are declared, typed, on the classes below.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Protocol

import pyftpdlib
from OpenSSL import SSL
from pyftpdlib import exceptions as ftp_exceptions
from pyftpdlib import ioloop as ftp_ioloop
from pyftpdlib.handlers import DTPHandler, FTPHandler, TLS_DTPHandler, TLS_FTPHandler
from pyftpdlib.handlers.ftp.dispatchers import PassiveDTP
from pyftpdlib.handlers.ftp.producers import FileProducer
from pyftpdlib.handlers.ftps.ssl import SSLConnectionMixin
from pyftpdlib.ioloop import IOLoop
from pyftpdlib.servers import ThreadedFTPServer

__all__ = [
    "ControlChannel", "DataChannel", "FileProducer", "FTPHandler", "IOLoop", "PassiveDTP",
    "TLS_DTPHandler", "TLS_FTPHandler", "ThreadedServer", "UnsupportedPyftpdlib",
    "check_version", "close_after_tls_error", "install",
]

# pyftpdlib's private module-level names we use, read where they are used (not imported), so
# that another pyftpdlib fails in install() with a clear line rather than at import
_PRIVATE_NAMES = {
    ftp_exceptions: ("_FileReadWriteError", "_GiveUpOnSendfile", "_RetryError"),
    ftp_ioloop: ("_ERRNOS_DISCONNECTED", "_ERRNOS_RETRY"),
}

log = logging.getLogger("scriptsftp.ftp")

WRITTEN_FOR = "2.2"  # major.minor the patches below were written (and tested) against
SENDFILE_CHUNK = 16 * 1024 * 1024
MAX_COMMAND_BYTES = 2048  # as pyftpdlib, but answered once the line has ended


# --- the version check ----------------------------------------------------------------------


class UnsupportedPyftpdlib(ValueError):
    """The installed pyftpdlib is not the one these patches were written for.

    A ValueError, so ``scriptsftp run`` prints it as ``scriptsftp: cannot start: ...``."""


def installed_version() -> str:
    return str(getattr(pyftpdlib, "__ver__", "unknown"))


def check_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedPyftpdlib` unless ``version`` (default: the installed
    pyftpdlib's) is a 2.2.x release."""
    version = installed_version() if version is None else version
    if version.split(".")[:2] != WRITTEN_FOR.split("."):
        raise UnsupportedPyftpdlib(
            f"pyftpdlib {version} is installed, but the FTP front end patches pyftpdlib "
            f"{WRITTEN_FOR}.* internals (server/frontends/ftp/pyftpdlib_ext.py): "
            f"install pyftpdlib=={WRITTEN_FOR}.* or disable [ftp]")
    missing = [f"{module.__name__}.{name}" for module, names in _PRIVATE_NAMES.items()
               for name in names if not hasattr(module, name)]
    if missing:
        raise UnsupportedPyftpdlib(
            f"pyftpdlib {version} lacks {', '.join(missing)}, which the FTP front end uses "
            f"(server/frontends/ftp/pyftpdlib_ext.py)")


def install() -> None:
    """Check the installed pyftpdlib and make the one global setting. Idempotent."""
    check_version()
    # pyftpdlib logs every command at INFO; our Session and LoginCore log what matters.
    logging.getLogger("pyftpdlib").setLevel(logging.WARNING)


# --- the data channel ------------------------------------------------------------------------


class UploadTarget(Protocol):
    """What :meth:`DataChannel.handle_read` writes a plain binary upload into."""

    def write(self, data: bytes | memoryview) -> None: ...


class DataChannel(DTPHandler):
    """pyftpdlib's data connection with our data-path patches.

    pyftpdlib's ``DTPHandler.close`` closes the socket, closes the file and sends
    the reply prepared in ``_resp``. :meth:`settle` runs before it, so that the
    reply can carry the verdict on the file (published, vetoed, discarded)."""

    # pyftpdlib's attributes we use (it declares no types)
    cmd_channel: ControlChannel
    file_obj: Any
    receive: bool
    transfer_finished: bool
    tot_bytes_sent: int
    tot_bytes_received: int
    cmd: str | None
    timeout: float
    socket: Any
    connected: bool
    ac_in_buffer_size: int
    # its private state we read and write
    _closed: bool
    _resp: tuple[()] | tuple[str, Callable[..., None]]
    _fileno: int
    _filefd: int | None
    _offset: int
    _data_wrapper: Callable[[bytes], bytes] | None
    _error: bool
    if TYPE_CHECKING:
        def __init__(self, sock: socket.socket, cmd_channel: ControlChannel) -> None: ...
        def get_transmitted_bytes(self) -> int: ...
        def handle_error(self) -> None: ...
        def enable_receiving(self, type: str, cmd: str) -> None: ...
        def discard_buffers(self) -> None: ...

    # ours
    reset = False  # the client reset the connection: not the end of an upload
    tls_clean_eof: bool | None = None  # a TLS upload ended with the client's close_notify
    _sndtimeo_set = False
    _buf: bytearray | None = None

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def used_sendfile(self) -> bool:
        """The kernel sent the bytes (sendfile()), past the file object."""
        return self._filefd is not None

    def set_reply(self, line: str | None) -> None:
        """The reply :meth:`close` sends on the control connection; None: none at all."""
        self._resp = (line, log.debug) if line else ()

    def failed_file_write(self) -> bool:
        """True while handling pyftpdlib's wrapper for a failed write into the file."""
        return isinstance(sys.exc_info()[1], ftp_exceptions._FileReadWriteError)

    def settle(self) -> None:
        """Called once, before the socket and the file are closed and the reply is sent."""

    def upload_target(self) -> UploadTarget | None:
        """The file a plain binary upload is written into from one reused buffer (None:
        pyftpdlib's way, a new bytes object per read)."""
        return None

    # pacing (the user's bandwidth): asked before bytes move, told after, on every data path
    # below (our receive, pyftpdlib's receive and send, sendfile); unpaced by default

    def may_move(self) -> bool:
        """False: not now; the I/O loop will call again."""
        return True

    def move_limit(self, size: int) -> int:
        """The most bytes to receive or send in one call."""
        return size

    def moved(self, n: int) -> None:
        """``n`` bytes were received or sent."""

    def send(self, data: bytes | memoryview) -> int:
        """pyftpdlib's send (downloads without sendfile: TLS, ASCII), paced."""
        if not self.may_move():
            return 0
        sent: int = super().send(data[:self.move_limit(len(data))])
        self.moved(sent)
        return sent

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
        filefd = self._filefd
        assert filefd is not None  # pyftpdlib sends with sendfile() only from a file
        if not self.may_move():
            return
        sock.setblocking(True)
        try:
            sent = os.sendfile(self._fileno, filefd, self._offset, self.move_limit(SENDFILE_CHUNK))
        except OSError as err:
            if err.errno in ftp_ioloop._ERRNOS_RETRY or err.errno == errno.EBUSY:
                return
            if err.errno in ftp_ioloop._ERRNOS_DISCONNECTED:
                self.handle_close()
                return
            if self.tot_bytes_sent == 0:
                raise ftp_exceptions._GiveUpOnSendfile from err
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
            self.moved(sent)

    def _read(self, read: Callable[[], Any]) -> Any:
        """AsyncChat.recv's error handling around ``read()``, except that a reset is
        remembered: pyftpdlib treats it like the client's clean end of an upload,
        which would publish a truncated file. Returns None at the end of the stream.
        (On a TLS channel the socket is an SSL.Connection: its errors are pyOpenSSL's,
        handled one level up, and a reset shows as a missing close_notify.)"""
        try:
            got = read()
        except OSError as err:
            if err.errno in ftp_ioloop._ERRNOS_RETRY:
                raise ftp_exceptions._RetryError from err
            if err.errno not in ftp_ioloop._ERRNOS_DISCONNECTED:
                raise
            self.reset = True
            got = None
        if not got:
            self.handle_close()
            return None
        return got

    def recv(self, buffer_size: int) -> bytes:
        """pyftpdlib's receive (uploads in ASCII or over TLS), paced like ours."""
        size = self.move_limit(buffer_size)
        data: bytes = self._read(lambda: self.socket.recv(size)) or b""
        self.moved(len(data))
        return data

    def handle_read(self) -> None:
        """Binary uploads on a plain socket: recv_into one reused buffer and write
        from it, instead of a new bytes object per read (pyftpdlib's way)."""
        if not self.may_move():
            return
        f = self.upload_target()
        if self._data_wrapper is not None or f is None or not isinstance(self.socket, socket.socket):
            super().handle_read()
            return
        if self._buf is None:
            self._buf = bytearray(self.ac_in_buffer_size)
        buf = self._buf
        size = self.move_limit(len(buf))
        try:
            n = self._read(lambda: self.socket.recv_into(buf, size))
        except ftp_exceptions._RetryError:
            return
        except OSError:
            self.handle_error()
            return
        if n is None:
            return
        self.tot_bytes_received += n
        self.moved(n)
        try:
            f.write(memoryview(buf)[:n])
        except OSError as err:
            raise ftp_exceptions._FileReadWriteError(err) from err

    handle_read_event = handle_read

    def handle_close(self) -> None:
        if self.receive and not self._closed and isinstance(self.socket, socket.socket):
            # the I/O loop calls handle_close() straight on EPOLLERR/EPOLLHUP: a pending
            # reset is then only visible here
            try:
                if self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in ftp_ioloop._ERRNOS_DISCONNECTED:
                    self.reset = True
            except OSError:
                pass
        if self.receive and not self._closed and isinstance(self.socket, SSL.Connection):
            # A TLS upload is complete only if the client said so (close_notify);
            # a bare TCP close may be a truncation (RFC 4217 section 10).
            self.tls_clean_eof = bool(self.socket.get_shutdown() & SSL.RECEIVED_SHUTDOWN)
        super().handle_close()

    def close(self) -> None:
        if not self._closed:
            self.settle()
        super().close()


def close_after_tls_error(channel: DataChannel) -> None:
    """Close a TLS data channel as pyftpdlib's SSL layer closes on errors (no TLS
    shutdown with a client that is mid-send), but through our :meth:`DataChannel.close`
    (settle, then the reply), which the SSL layer's own close would skip."""
    channel._error = True
    super(SSLConnectionMixin, channel).close()


# --- the control channel ----------------------------------------------------------------------


class ControlChannel(FTPHandler):
    """pyftpdlib's control connection with our patches to its line collection, idle
    timer and passive mode, and typed access to the state we read."""

    # pyftpdlib's attributes we use (it declares no types)
    remote_ip: str
    username: str
    authenticated: bool
    attempted_logins: int
    max_login_attempts: int
    encoding: str
    unicode_errors: str
    banner: str
    timeout: float
    passive_ports: list[int] | None
    data_channel: DataChannel | None
    fs: Any
    socket: Any
    ioloop: Any
    ssl_context: Any
    # its private state we read and write
    _closed: bool
    _current_type: str
    _restart_position: int
    _in_dtp_queue: tuple[Any, str] | None
    _out_dtp_queue: tuple[Any, bool, Any, str | None] | None
    _in_buffer: list[bytes]
    _in_buffer_len: int
    ac_in_buffer: bytes
    _idler: Any
    _pbsz: bool
    _prot: bool
    if TYPE_CHECKING:
        def respond(self, resp: str, logfun: Callable[..., None] = ...) -> None: ...
        def push(self, data: str) -> None: ...
        def close_when_done(self) -> None: ...
        def handle_error(self) -> None: ...
        def handle_timeout(self) -> None: ...
        def push_dtp_data(self, data: Any, isproducer: bool = False, file: Any = None,
                          cmd: str | None = None) -> None: ...
        def secure_connection(self, ssl_context: Any) -> None: ...

    _overlong = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def transfer_type(self) -> str:
        """``TYPE``: "a" (ASCII) or "i" (binary)."""
        return self._current_type

    @property
    def restart_position(self) -> int:
        """The offset of a pending ``REST``."""
        return self._restart_position

    def take_restart_position(self) -> int:
        """``REST`` covers the next transfer command only."""
        rest, self._restart_position = self._restart_position, 0
        return rest

    def queue_upload(self, f: Any, cmd: str) -> None:
        """The upload starts when the data connection is up."""
        self._in_dtp_queue = (f, cmd)

    def data_connection_lost(self) -> None:
        """The data connection died before the transfer began: end the queued one."""
        queued_in, queued_out = self._in_dtp_queue, self._out_dtp_queue
        self._in_dtp_queue = self._out_dtp_queue = None
        f = queued_in[0] if queued_in else queued_out[2] if queued_out else None
        if f is not None:
            f.close("data connection lost before the transfer started")
        if queued_in or queued_out:
            self.respond("426 Data connection lost before the transfer started.")

    @property
    def tls_requested(self) -> bool:
        """``AUTH TLS`` was accepted (the handshake follows)."""
        return bool(getattr(self, "_ssl_requested", False))

    @property
    def data_protected(self) -> bool:
        """``PROT P``: data connections are TLS."""
        return getattr(self, "_prot", False)

    def protect_everything(self) -> None:
        """Implicit FTPS: the data connections are protected without PBSZ/PROT."""
        self._pbsz = self._prot = True

    def drop_pending_input(self) -> int:
        """Forget whatever the client sent that has not run yet; returns how many bytes."""
        pending = len(self.ac_in_buffer) + self._in_buffer_len
        self.ac_in_buffer = b""
        self._in_buffer = []
        self._in_buffer_len = 0
        return pending

    def move_idle_timer_here(self) -> None:
        """pyftpdlib armed the idle timer on the acceptor's loop: move it to this
        connection's loop, so that it fires in this connection's thread."""
        if self._idler is not None and not self._idler.cancelled:
            self._idler.cancel()
        if self.timeout:
            self._idler = self.ioloop.call_later(self.timeout, self.handle_timeout, _errback=self.handle_error)

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
            self.respond("500 Command too long.")
            return
        try:
            b"".join(self._in_buffer).decode(self.encoding, self.unicode_errors)
        except UnicodeDecodeError:
            # pyftpdlib answers 501 but leaves the line in its buffer: every later command is
            # glued behind it and refused the same way, and the connection never recovers
            self._in_buffer, self._in_buffer_len = [], 0
            self.respond("501 Can't decode command.")
            return
        super().found_terminator()

    def _make_epasv(self, extmode: bool = False) -> None:
        """A passive port that cannot be opened (descriptors exhausted, say) is a 425
        reply; pyftpdlib would let the OSError end the control connection."""
        try:
            super()._make_epasv(extmode)
        except OSError as exc:
            self.respond(f"425 Can't open data connection: {exc.strerror or exc}.")

    def flush_account(self) -> None:
        # pyftpdlib forgets a queued upload here without closing it; discard it properly
        queued = self._in_dtp_queue
        super().flush_account()
        if queued is not None and queued[0] is not None:
            queued[0].close()


# --- the server ----------------------------------------------------------------------------------


class ThreadedServer(ThreadedFTPServer):
    """One listening socket; a thread with its own I/O loop per connection.

    ThreadedFTPServer keeps its stop flag and lock on the class: here one per server."""

    socket: Any
    if TYPE_CHECKING:
        def serve_forever(self, timeout: float | None = None, blocking: bool = True,
                          handle_exit: bool = True) -> None: ...
        def del_channel(self) -> None: ...

    def __init__(self, sock: socket.socket, handler: type, backlog: int = 128) -> None:
        self._exit = threading.Event()
        self._lock = threading.Lock()
        super().__init__(sock, handler, ioloop=IOLoop(), backlog=backlog)

    def stop_connection_threads(self) -> None:
        """Connection threads leave their loops; their channels close."""
        self._exit.set()
