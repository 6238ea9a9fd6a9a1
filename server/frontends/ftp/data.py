"""The FTP data channel: transfers settled before their reply, stalls, resets.

* The end of an upload publishes it *before* the reply: pyftpdlib would send
  ``226`` and only then call ``on_file_received``. Here the data channel's close
  finishes the Session's upload handle first (pre-publish scripts run, the
  staged file is renamed into place or discarded), so ``226`` means "published"
  and a veto arrives as ``550 <reason>`` in its place. A transfer that did not
  end cleanly (ABOR, reset, timeout, TLS data channel closed without
  ``close_notify``, control connection lost, a size other than ``ALLO``
  announced) is discarded, never published.
* A transfer that moves no byte for ``[server] stall_timeout`` is aborted with a
  ``426``; the control connection stays open.

The file objects pyftpdlib reads from and writes into (:class:`Download`,
:class:`Upload`) wrap the session's read and write handles, typed on the
contract's handle ports (server/contract/ports.py), never the core's classes;
the pyftpdlib internals these rely on are in pyftpdlib_ext.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import time
from typing import Any

from scriptsftp.server.contract.errors import FsError, NoSpace
from scriptsftp.server.contract.ports import UNLIMITED, ReadHandlePort, ThrottlePort, WriteHandlePort
from scriptsftp.server.frontends.ftp.pyftpdlib_ext import (
    ControlChannel, DataChannel, TLS_DTPHandler, close_after_tls_error,
)
from scriptsftp.server.frontends.ftp.replies import reply_of

log = logging.getLogger("scriptsftp.ftp")


# --- what pyftpdlib's data channel reads from and writes into ----------------------------


class Download:
    """A file object over a session's read handle: positional reads; ``fileno`` lets
    pyftpdlib use sendfile() on plain binary transfers."""

    def __init__(self, handle: ReadHandlePort, offset: int, throttle: ThrottlePort = UNLIMITED) -> None:
        self.handle = handle
        self.name = handle.path
        self.pos = offset
        self.closed = False
        self.throttle = throttle  # the user's download bandwidth, shared with all their sessions

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
        """No sendfile() under a daily download quota: the kernel would send past it."""
        if self.handle.limit is not None:
            raise OSError(errno.EOPNOTSUPP, "the download quota is counted by read()")
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


class Upload:
    """A file object over a session's write handle. ``close()`` discards the upload:
    only :meth:`finish`, called when the data channel ended cleanly, publishes."""

    def __init__(self, handle: WriteHandlePort, offset: int, announced: int | None = None,
                 throttle: ThrottlePort = UNLIMITED) -> None:
        self.handle = handle
        self.name = handle.path
        self.pos = offset
        self.closed = False
        self.announced = announced  # the file size the client promised with ALLO, if it did
        self.throttle = throttle  # the user's upload bandwidth, shared with all their sessions

    def write(self, data: bytes | memoryview) -> None:
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


#: the longest one sleep of a connection's thread while its transfer waits for the user's bandwidth
BANDWIDTH_RECHECK = 0.25
#: the largest TLS record: what a paced TLS transfer still receives at once
TLS_RECORD = 16 * 1024

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


class DataConnection(DataChannel):
    """A data connection. At its end, settle the file first, then let pyftpdlib close and reply."""

    # Larger than pyftpdlib's 64 KiB: one trip round the I/O loop costs far more
    # than the bytes it moves (sendfile() chunk for downloads, recv() for uploads).
    ac_in_buffer_size = 1024 * 1024
    ac_out_buffer_size = 1024 * 1024

    def __init__(self, sock: socket.socket, cmd_channel: ControlChannel) -> None:
        # pyftpdlib's timer (``timeout``) gives up when no byte moved between two ticks, so
        # a stall would last up to twice the timeout: tick four times per stall_timeout and
        # measure the silence itself (handle_timeout). 0: no timer, no stall timeout.
        self._stall = float(getattr(cmd_channel, "stall_timeout", 0.0) or 0.0)
        self.timeout = max(self._stall / 4, 0.05) if self._stall else 0
        self._quiet_since = time.monotonic()
        self._moved = 0
        self._owed: float | None = None  # the bucket's mark for the bytes moved last (see may_move)
        super().__init__(sock, cmd_channel)
        if not self.connected:
            # Reset before we got to it: pyftpdlib drops it silently, leaving a
            # queued transfer (and its client) waiting for ever.
            cmd_channel.data_connection_lost()

    def upload_target(self) -> Upload | None:
        f = self.file_obj
        return f if isinstance(f, Upload) else None

    # --- the user's bandwidth (hooks of DataChannel) ----------------------------------------

    @property
    def throttle(self) -> ThrottlePort:
        """The bucket of the file's direction; a listing is not paced."""
        f = self.file_obj
        return f.throttle if isinstance(f, (Upload, Download)) else UNLIMITED

    def move_limit(self, size: int) -> int:
        """At most the bytes one take may move at the user's rate (throttle_chunk), but whole
        TLS records: a record left half-read in the TLS layer would wait for more input."""
        t = self.throttle
        if not t.rate:
            return size
        return min(size, max(t.chunk, TLS_RECORD if self._data_wrapper is not None or
                             not isinstance(self.socket, socket.socket) else 0))

    def moved(self, n: int) -> None:
        """``n`` bytes were received or sent: charged to the user's bucket. What it owes for
        them is waited for before the next bytes move (:meth:`may_move`)."""
        t = self.throttle
        if t.rate and n > 0:
            self._owed = t.charge(n)

    def may_move(self) -> bool:
        """Whether the next bytes may move now. While the user's bucket still owes for the
        last ones, this connection's thread sleeps (at most BANDWIDTH_RECHECK at a time,
        so ABOR, the stall timer and a changed rate are seen between two sleeps) and False
        sends it back round the I/O loop, which calls again: the socket stays ready."""
        mark = self._owed
        if mark is None:
            return True
        t = self.throttle
        wait = t.wait_for(mark)
        if wait > 0:
            time.sleep(min(wait, BANDWIDTH_RECHECK))
            wait = t.wait_for(mark)
            if wait > 0:
                return False
        self._owed = None
        return True

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
        if isinstance(f, (Upload, Download)) and not f.closed:
            f.close(reason)  # discarded with the reason; close() then finds it settled
        self.transfer_finished = False
        # no transfer command yet: nothing awaits a reply, and an unasked one would be read
        # as the answer to the client's next command
        self.set_reply(f"426 Transfer aborted: {reason}." if self.cmd is not None else None)
        self.close()

    def settle(self) -> None:
        f = self.file_obj
        if isinstance(f, (Upload, Download)) and not f.closed:
            self._settle(f)

    def _settle(self, f: Upload | Download) -> None:
        if isinstance(f, Download):
            if self.transfer_finished:
                f.finish(self.tot_bytes_sent, sendfile=self.used_sendfile)
            else:
                f.close("client stopped the download")
            return
        if self.transfer_finished and (self.reset or self.tls_clean_eof is False):
            self.transfer_finished = False
            why = "connection reset" if self.reset else "TLS data connection ended without close_notify"
            f.close(f"upload interrupted: {why}")
            self.set_reply(f"426 Upload discarded: {why}.")
            return
        if not self.transfer_finished:
            f.close("upload interrupted")
            return
        refusal = self._refuse_publish(f)
        if refusal is not None:
            self.transfer_finished = False
            f.close(f"upload discarded: {refusal}")
            self.set_reply(f"426 Upload discarded: {refusal}.")
            return
        try:
            f.finish()
        except FsError as exc:
            self.transfer_finished = False
            self.set_reply(reply_of(exc))
        except Exception:
            log.exception("publishing %s failed", f.name)
            self.transfer_finished = False
            self.set_reply("451 Upload failed: local error.")

    def _refuse_publish(self, f: Upload) -> str | None:
        """Why a data connection that ended cleanly still does not prove a complete upload."""
        ctrl = self.cmd_channel
        if ctrl is None or ctrl.is_closed or _peer_closed(ctrl.socket):
            return "the control connection was closed"
        return f.size_mismatch()

    def failed_write_reply(self) -> str | None:
        """The reply for the exception being handled when it is a failed write to the upload
        (452 for a full disk), instead of pyftpdlib's ``426 None; transfer aborted.``"""
        f = self.file_obj
        if not self.failed_file_write() or not isinstance(f, Upload) or f.handle.failed is None:
            return None
        return reply_of(f.handle.failed)

    def handle_error(self) -> None:
        reply = self.failed_write_reply()
        if reply is None:
            super().handle_error()
            return
        self.set_reply(reply)
        self.close()


class TLSDataConnection(TLS_DTPHandler, DataConnection):
    """TLS on top: pyftpdlib's SSL layer runs first, then ours (see the MRO)."""

    def handle_error(self) -> None:
        """pyftpdlib's SSL layer logs any error and closes without a reply: a full disk on a
        TLS-enabled daemon left the client waiting. A failed write gets its reply here too."""
        reply = self.failed_write_reply()
        if reply is None:
            super().handle_error()
            return
        self.set_reply(reply)
        close_after_tls_error(self)  # DataConnection.close: settle, then the reply
