"""Legacy SCP (``scp -O``, curl/libssh2 ``scp://``) over the Session.

The SSH layer refuses every exec request but ``scp …``, opens a Session with
protocol ``"scp"`` and calls :func:`run_scp` in a thread with the arguments
after ``scp``. This module only speaks the protocol (docs/architecture.md rule 1): every
file operation is a Session call, so SCP gets the same confinement,
permissions, filters, events, staging and log lines as SFTP.

The protocol, from the side of this server:

* sink (``scp -t [-r] [-p] [-d] PATH``, an upload): we send ``\\0``; the client
  sends ``T<mtime> 0 <atime> 0`` (with ``-p``), ``C<mode> <size> <name>`` then
  exactly ``size`` bytes then ``\\0``, ``D<mode> 0 <name>`` … ``E`` for
  directories (with ``-r``); we answer each record with ``\\0`` or an error.
* source (``scp -f [-r] [-p] PATH…``, a download): the same records, the other
  way round; the client answers each one.
* ``\\x01text\\n`` is an error about one file (the peer prints it and goes on
  with the next one), ``\\x02text\\n`` a fatal error (the peer prints it and
  stops). Like OpenSSH's own ``scp``, a file refused by the Session (permission,
  filter, script veto, quota, no such file) gets ``\\x01`` so that the other
  files of a ``-r`` or multi-file copy still go through; protocol violations
  and a refused ``-d`` target get ``\\x02``. Either way OpenSSH ``scp`` prints the
  text (a veto's reason) and exits with status 1.

Choices:

* Uploads are atomic: ``Session.open_write`` stages the bytes and
  ``WriteHandle.close`` publishes them. A client that stops mid-file (EOF,
  disconnect, idle timeout, an error byte instead of the final ``\\0``) gets the
  upload aborted: no partial file, the previous version intact. ``-p`` times and
  mode are set on the staged file before publish, so they arrive with it.
* A client that closes the channel right after the announced bytes without the
  final ``\\0`` (libssh2, hence curl, does this) has delivered the whole file:
  it is published.
* Names in ``C``/``D`` records must be one path component (no ``/``, not ``.``
  or ``..``, no NUL, valid UTF-8); anything else is a fatal protocol error, as
  in OpenSSH. Lines are capped at 4096 bytes, directories at 64 levels.
* Wildcards in download paths: there is no remote shell, so the server expands
  ``*``, ``?`` and ``[…]`` itself, in the last path component only (through
  ``Session.listdir``, so hidden and staging names never match), like a shell
  glob: sorted, and a leading ``.`` must be matched explicitly. A pattern that
  matches nothing is taken literally (as a shell does), which usually gives
  "no such file or directory". Brace expansion (``{a,b}``) is not supported.
  ``~`` and ``~/…`` mean the home; relative paths are relative to it.
* ``-d`` (target must be a directory; OpenSSH sends it when copying several
  files) is enforced; ``-v`` is accepted and ignored; other options are refused.
* Without ``-p`` a new file gets the client's mode masked with 022, and an
  overwritten file keeps its current mode (OpenSSH's behaviour); with ``-p``
  the client's mode (permission bits only, never setuid/setgid/sticky) and
  times are applied, to directories when their ``E`` record arrives.
"""

from __future__ import annotations

import fnmatch
import getopt
import logging
import socket
import stat as statmod
import time
from dataclasses import dataclass, field

from contextlib import contextmanager
from typing import Any, Iterator

import paramiko

from scriptsftp.server.frontends.ssh.paramiko_ext import send as paramiko_send
from scriptsftp.server.contract.errors import Failure, FsError, NotFound
from scriptsftp.server.contract.paths import join, split
from scriptsftp.server.contract.ports import Entry, ReadHandlePort, SessionPort, ThrottlePort, WriteHandlePort
from scriptsftp.server.frontends.ssh.channels import ChannelHost, SSHLimits
from scriptsftp.server.support.logs import BoundedLog

log = logging.getLogger("scriptsftp.scp")
#: a bug a client's command hits: its traceback once, then a line per 10 s with a count,
#: however many channels the client opens to hit it again
_unexpected = BoundedLog(logging.ERROR)

CHUNK = 256 * 1024
MAX_LINE = 4096
MAX_DEPTH = 64
MAX_SIZE = 2**63 - 1
MAX_TIME = 2**40
MAX_MESSAGE = 1024
DEFAULT_IDLE_TIMEOUT = 900.0


class _Fatal(Exception):
    """A protocol violation or an unusable command: tell the client (``\\x02``) and stop."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Gone(Exception):
    """The client went away (EOF, closed channel, idle timeout): stop, send nothing more.

    ``clean`` when it left at a point where nothing was lost (after a whole file)."""

    def __init__(self, reason: str, clean: bool = False) -> None:
        super().__init__(reason)
        self.clean = clean


class _TimedOut(_Gone):
    """The server stopped waiting for the client (idle timeout, or a stalled transfer): the
    transfer is aborted with this reason and the channel closed."""


@dataclass
class _Options:
    sink: bool
    recursive: bool = False
    preserve: bool = False
    target_is_dir: bool = False
    paths: list[str] = field(default_factory=list)


def _parse_argv(argv: list[str]) -> _Options:
    try:
        opts, args = getopt.getopt(argv, "dfprtv")
    except getopt.GetoptError as exc:
        raise _Fatal(f"unsupported scp option: {exc.msg}") from None
    flags = {o for o, _ in opts}
    if ("-t" in flags) == ("-f" in flags):
        raise _Fatal("only 'scp -t' (upload) and 'scp -f' (download) are supported")
    options = _Options(sink="-t" in flags, recursive="-r" in flags, preserve="-p" in flags,
                       target_is_dir="-d" in flags, paths=args)
    if options.sink and len(args) != 1:
        raise _Fatal("ambiguous target")
    if not options.sink and not args:
        raise _Fatal("no file to send")
    return options


def _vpath(arg: str) -> str:
    """A command-line path as a virtual path: ``~`` is the home, relative paths start there."""
    if arg == "~" or arg.startswith("~/"):
        arg = "/" + arg[1:]
    return arg or "."


def _printable(text: str) -> str:
    """One line, no control characters, bounded: fit for a terminal or a log line."""
    return "".join(c if c.isprintable() else "?" for c in text[:MAX_MESSAGE])


def _clean(text: str) -> bytes:
    return _printable(text).encode("utf-8", "replace")


class _Peer:
    """The channel as a buffered record/data stream with the SCP reply conventions."""

    def __init__(self, channel: paramiko.Channel, limits: "SSHLimits | None" = None) -> None:
        self.channel = channel
        self.buf = bytearray()
        self.limits = limits or SSHLimits(idle_timeout=DEFAULT_IDLE_TIMEOUT, stall_timeout=0.0)
        self._transferring = False
        channel.settimeout(self.limits.quiet_limit(False) or None)

    @contextmanager
    def transferring(self) -> Iterator[None]:
        """While a file is open, a silent peer is a stalled transfer: the stall timeout
        applies (when shorter than the idle timeout) to every wait, either direction."""
        self._transferring = True
        self.channel.settimeout(self.limits.quiet_limit(True) or None)
        try:
            yield
        finally:
            self._transferring = False
            self.channel.settimeout(self.limits.quiet_limit(False) or None)

    def _timed_out(self) -> _TimedOut:
        return _TimedOut(self.limits.timeout_reason(self._transferring))

    def _fill(self) -> bool:
        try:
            data = self.channel.recv(CHUNK)
        except socket.timeout:
            raise self._timed_out() from None
        except OSError as exc:
            raise _Gone(str(exc)) from None
        if not data:
            return False
        self.buf += data
        return True

    def line(self) -> bytes | None:
        """The next record without its newline; None at a clean EOF."""
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > MAX_LINE:
                raise _Fatal("protocol error: record too long")
            start = len(self.buf)
            if not self._fill():
                if self.buf:
                    raise _Gone("connection closed in the middle of a record")
                return None

    def response(self) -> tuple[int | None, str]:
        """The peer's answer: (0, "") ok, (1, text) error, (2, text) fatal, (None, "") EOF."""
        if not self.buf and not self._fill():
            return None, ""
        code = self.buf[0]
        del self.buf[:1]
        if code == 0:
            return 0, ""
        line = self.line()
        if line is None:
            raise _Gone("connection closed in the middle of an error message")
        text = line.decode("utf-8", "replace")
        if code == 1:
            return 1, text
        if code == 2:
            return 2, text
        return 2, chr(code) + text  # anything else is garbage: treat as fatal, like OpenSSH

    def data(self, size: int):
        """Yield exactly ``size`` bytes in chunks; _Gone if the peer stops short."""
        remaining = size
        if self.buf and remaining:
            chunk = bytes(self.buf[:remaining])
            del self.buf[: len(chunk)]
            remaining -= len(chunk)
            yield chunk
        while remaining:
            try:
                chunk = self.channel.recv(min(CHUNK, remaining))
            except socket.timeout:
                raise self._timed_out() from None
            except OSError as exc:
                raise _Gone(str(exc)) from None
            if not chunk:
                raise _Gone(f"connection closed with {remaining} bytes of the file still to come")
            remaining -= len(chunk)
            yield chunk

    def send(self, data: bytes) -> None:
        try:
            paramiko_send.send_all(self.channel, data)
        except EOFError:
            raise _Gone("connection closed") from None
        except socket.timeout:
            raise self._timed_out() from None
        except OSError as exc:
            raise _Gone(str(exc)) from None

    def ok(self) -> None:
        self.send(b"\0")

    def error(self, message: str, fatal: bool = False) -> None:
        self.send((b"\x02" if fatal else b"\x01") + b"scp: " + _clean(message) + b"\n")


def _check_name(raw: bytes) -> str:
    """A name from a C/D record: exactly one path component, or a fatal protocol error."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Fatal("protocol error: file name is not valid UTF-8") from None
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise _Fatal(f"protocol error: unexpected file name: {name!r}")
    return name


def _parse_cd(line: bytes) -> tuple[int, int, str]:
    """``C0644 123 name`` / ``D0755 0 name`` → (mode, size, name)."""
    try:
        mode_s, size_s, name = line[1:].split(b" ", 2)
    except ValueError:
        raise _Fatal("protocol error: malformed C/D record") from None
    if not (1 <= len(mode_s) <= 6) or any(c not in b"01234567" for c in mode_s):
        raise _Fatal("protocol error: bad file mode")
    mode = int(mode_s, 8)
    if mode > 0o7777:
        raise _Fatal("protocol error: bad file mode")
    if not (1 <= len(size_s) <= 19) or not size_s.isdigit():
        raise _Fatal("protocol error: bad file size")
    size = int(size_s)
    if size > MAX_SIZE:
        raise _Fatal("protocol error: bad file size")
    return mode, size, _check_name(name)


def _parse_t(line: bytes) -> tuple[float, float]:
    """``T<mtime> <usec> <atime> <usec>`` → (atime, mtime) as for os.utime."""
    fields = line[1:].split(b" ")
    try:
        if len(fields) != 4:
            raise ValueError
        mtime, musec, atime, ausec = (int(f) for f in fields)
    except ValueError:
        raise _Fatal("protocol error: malformed T record") from None
    if not (0 <= musec <= 999_999 and 0 <= ausec <= 999_999) or abs(mtime) > MAX_TIME or abs(atime) > MAX_TIME:
        raise _Fatal("protocol error: bad time in T record")
    return atime + ausec / 1e6, mtime + musec / 1e6


class _Transfer:
    def __init__(self, peer: _Peer, session: SessionPort[Any], options: _Options) -> None:
        self.peer = peer
        self.session = session
        self.options = options
        self.errors = 0
        bandwidth = session.bandwidth  # the user's buckets, shared with all their sessions
        self.up, self.down = bandwidth.up, bandwidth.down

    def pace(self, throttle: ThrottlePort, n: int) -> None:
        """Wait until the user's bucket lets ``n`` more bytes move (at most the stall timeout)."""
        if throttle.rate:
            stall = self.peer.limits.stall_timeout
            throttle.take(n, time.monotonic() + stall if stall else None)

    def fail(self, message: str) -> None:
        """A per-file error: counted, logged, sent as ``\\x01`` (the transfer goes on)."""
        self.errors += 1
        log.info("scp error: %s", _printable(message), extra={"sid": self.session.id})
        self.peer.error(message)


@dataclass
class _Dir:
    path: str
    mode: int
    times: tuple[float, float] | None


class _Sink(_Transfer):
    """``scp -t``: the client uploads."""

    def run(self) -> None:
        target = self.session.realpath(_vpath(self.options.paths[0]))
        try:
            target_is_dir = self.session.stat(target).is_dir
        except NotFound:
            target_is_dir = False
        except FsError as exc:
            if self.options.target_is_dir:
                raise _Fatal(exc.message) from None
            target_is_dir = False
        if self.options.target_is_dir and not target_is_dir:
            raise _Fatal(f"{target}: not a directory")
        self.peer.ok()

        stack: list[_Dir] = []
        times: tuple[float, float] | None = None
        while True:
            line = self.peer.line()
            if line is None:
                return
            kind = line[:1]
            if kind in (b"\x01", b"\x02"):
                # the client could not read one of its files: it says so and goes on (\x01) or stops
                self.errors += 1
                log.info("scp client error: %s", _printable(line[1:].decode("utf-8", "replace")),
                         extra={"sid": self.session.id})
                if kind == b"\x02":
                    return
                continue
            if kind == b"E":
                if line != b"E" or not stack:
                    raise _Fatal("protocol error: unexpected E record")
                problem = self._leave(stack.pop())
                times = None
                if problem:
                    self.fail(problem)
                else:
                    self.peer.ok()
                continue
            if kind == b"T":
                times = _parse_t(line)
                self.peer.ok()
                continue
            if kind not in (b"C", b"D"):
                raise _Fatal("protocol error: expected a C, D, E or T record")
            mode, size, name = _parse_cd(line)
            if kind == b"D" and not self.options.recursive:
                raise _Fatal("protocol error: received a directory without -r")
            try:
                if stack:
                    path = join(split(name, stack[-1].path))
                elif target_is_dir:
                    path = join(split(name, target))
                else:
                    path = target
            except FsError as exc:  # a name the Session refuses (control characters, too long...)
                self.fail(exc.message)  # the client skips that file or directory
                times = None
                continue
            if kind == b"D":
                if len(stack) >= MAX_DEPTH:
                    raise _Fatal(f"{path}: directories nested too deep (limit {MAX_DEPTH})")
                if self._enter(path, mode):
                    stack.append(_Dir(path, mode, times))
                    self.peer.ok()
            else:
                self._receive(path, mode, size, times)
            times = None

    def _enter(self, path: str, mode: int) -> bool:
        """Use or create the directory of a D record; False (error sent) if impossible."""
        try:
            try:
                entry = self.session.stat(path)
            except NotFound:
                self.session.mkdir(path, ((mode & 0o777) | 0o700) & ~0o022)
                return True
            if not entry.is_dir:
                self.fail(f"{path}: not a directory")
                return False
            return True
        except FsError as exc:
            self.fail(exc.message)
            return False

    def _leave(self, d: _Dir) -> str | None:
        """Apply -p attributes to a finished directory; a message if that failed."""
        if not self.options.preserve and d.times is None:
            return None
        try:
            self.session.setstat(d.path, mode=d.mode & 0o777 if self.options.preserve else None, times=d.times)
        except FsError as exc:
            # the directory and its files are there; only the attributes failed (OpenSSH: an error line)
            return f"{d.path}: set times: {exc.message}"
        return None

    def _mode_for(self, path: str, mode: int) -> int:
        if self.options.preserve:
            return mode & 0o777
        try:
            entry = self.session.stat(path)
        except FsError:
            return mode & 0o777 & ~0o022
        if statmod.S_ISREG(entry.st.st_mode):
            return statmod.S_IMODE(entry.st.st_mode) & 0o777
        return mode & 0o777 & ~0o022

    def _receive(self, path: str, mode: int, size: int, times: tuple[float, float] | None) -> None:
        try:
            handle: WriteHandlePort = self.session.open_write(path, mode=self._mode_for(path, mode))
        except FsError as exc:
            self.fail(exc.message)  # the client skips this file's data
            return
        try:
            with self.peer.transferring():
                self._receive_into(handle, size, times)
        except _TimedOut as exc:
            handle.abort(str(exc))
            raise
        finally:
            handle.abort("connection closed before the transfer completed")  # no-op once closed

    def _receive_into(self, handle: WriteHandlePort, size: int, times: tuple[float, float] | None) -> None:
        self.peer.ok()
        offset = 0
        write_error: FsError | None = None
        for chunk in self.peer.data(size):
            if write_error is None:
                try:
                    self.pace(self.up, len(chunk))
                    handle.write(offset, chunk)
                except FsError as exc:
                    write_error = exc  # keep reading: the stream must stay in step
            offset += len(chunk)
        code, text = self.peer.response()
        if code in (1, 2):
            self.errors += 1
            handle.abort(f"the client reported an error: {text[:200]}")
            if code == 2:
                raise _Gone("the client stopped")
            self.peer.error(f"{handle.path}: upload discarded: the client could not send the whole file")
            return
        if write_error is not None:
            handle.abort(write_error.message)
            if code is None:
                raise _Gone("client closed the channel")
            self.fail(write_error.message)
            return
        attr_error: FsError | None = None
        if times is not None:  # a T record (scp -p); OpenSSH applies it whenever one came
            try:
                self.session.fsetstat(handle, mode=None, times=times)
            except FsError as exc:
                attr_error = exc
        try:
            handle.close()  # publish: a pre-publish veto lands here
        except FsError as exc:
            if code is None:
                self.errors += 1
                raise _Gone("client closed the channel") from None
            self.fail(exc.message)
            return
        if code is None:
            # libssh2 (curl) sends EOF instead of the final \0 after the bytes: the file is complete
            raise _Gone("client closed the channel after the file", clean=True)
        if attr_error is not None:
            self.fail(f"{handle.path}: set times: {attr_error.message}")
        else:
            self.peer.ok()


class _Source(_Transfer):
    """``scp -f``: the client downloads."""

    def run(self) -> None:
        code, _ = self.peer.response()
        if code != 0:
            return
        for arg in self.options.paths:
            try:
                paths = self._expand(_vpath(arg))
            except FsError as exc:
                self.fail(exc.message)
                continue
            for path in paths:
                self._send_path(path, None, 0)

    def _expand(self, vpath: str) -> list[str]:
        """Shell-like wildcards in the last component (there is no remote shell to do it)."""
        path = self.session.realpath(vpath)
        if path == "/":
            return [path]
        parent, _, pattern = path.rpartition("/")
        parent = parent or "/"
        if not any(c in pattern for c in "*?["):
            return [path]
        try:
            entries = self.session.listdir(parent)
        except NotFound:
            return [path]
        names = sorted(
            e.name for e in entries
            if fnmatch.fnmatchcase(e.name, pattern) and (pattern.startswith(".") or not e.name.startswith("."))
        )
        out = []
        for n in names:
            try:
                out.append(join(split(n, parent)))
            except FsError:
                continue  # a name no client may use (control characters): never matched
        return out or [path]  # like a shell: an unmatched pattern stays literal

    def _name(self, path: str) -> str:
        return path.rsplit("/", 1)[-1] or self.session.user

    def _send_path(self, path: str, entry: Entry | None, depth: int) -> None:
        try:
            if entry is None or entry.is_link:
                entry = self.session.stat(path)  # follows symlinks, inside the home
        except FsError as exc:
            self.fail(exc.message)
            return
        if entry.is_dir:
            if not self.options.recursive:
                self.fail(f"{path}: not a regular file")
                return
            self._send_dir(path, entry, depth)
        elif statmod.S_ISREG(entry.st.st_mode):
            self._send_file(path)
        else:
            self.fail(f"{path}: not a regular file")

    def _send_times(self, st) -> bool:
        self.peer.send(b"T%d 0 %d 0\n" % (int(st.st_mtime), int(st.st_atime)))
        return self._answered()

    def _answered(self) -> bool:
        """Read the client's answer to a record: True if ok; False if it refused (it goes on)."""
        code, text = self.peer.response()
        if code == 0:
            return True
        if code is None:
            raise _Gone("client closed the channel")
        self.errors += 1
        log.info("scp client error: %s", _printable(text), extra={"sid": self.session.id})
        if code == 2:
            raise _Gone("the client stopped")
        return False

    def _send_dir(self, path: str, entry: Entry, depth: int) -> None:
        if depth >= MAX_DEPTH:
            self.fail(f"{path}: directories nested too deep (limit {MAX_DEPTH})")
            return
        try:
            entries = self.session.listdir(path)
        except FsError as exc:
            self.fail(exc.message)
            return
        if self.options.preserve and not self._send_times(entry.st):
            return
        name = self._name(path).encode("utf-8", "surrogateescape")
        self.peer.send(b"D%04o 0 %s\n" % (statmod.S_IMODE(entry.st.st_mode) & 0o777, name))
        if not self._answered():
            return
        for child in sorted(entries, key=lambda e: e.name):
            if any(ord(c) < 0x20 or c == "\x7f" for c in child.name):
                self.fail(f"{path.rstrip('/')}/{child.name}: name with control characters skipped")
                continue
            self._send_path(join(split(child.name, path)), child, depth + 1)
        self.peer.send(b"E\n")
        self._answered()

    def _send_file(self, path: str) -> None:
        try:
            handle = self.session.open_read(path)  # pre-download veto lands here
        except FsError as exc:
            self.fail(exc.message)
            return
        try:
            with self.peer.transferring():
                self._send_from(handle)
        except _TimedOut as exc:
            handle.abort(str(exc))
            raise
        finally:
            handle.abort("connection closed before the transfer completed")  # no-op once closed

    def _send_from(self, handle: ReadHandlePort) -> None:
        st = handle.fstat()
        size = st.st_size
        if self.options.preserve and not self._send_times(st):
            return
        name = self._name(handle.path).encode("utf-8", "surrogateescape")
        self.peer.send(b"C%04o %d %s\n" % (statmod.S_IMODE(st.st_mode) & 0o777, size, name))
        if not self._answered():
            handle.abort("refused by the client")
            return
        offset = 0
        read_error: FsError | None = None
        while offset < size:
            n = min(self.down.chunk if self.down.rate else CHUNK, size - offset)
            data = b""
            if read_error is None:
                try:
                    self.pace(self.down, n)
                    data = handle.read(offset, n)
                except FsError as exc:
                    read_error = exc
                else:
                    if not data:
                        read_error = Failure(f"{handle.path}: file shrank while being sent")
            if read_error is not None:
                data = bytes(n)  # the client expects `size` bytes: pad, then say it failed
            self.peer.send(data)
            offset += len(data)
        if read_error is not None:
            handle.abort(read_error.message)
            self.fail(read_error.message)
            self._answered()
            return
        self.peer.ok()
        code, text = self.peer.response()
        if code in (0, None):
            handle.close()  # the client has every byte (libssh2 may just close instead of answering)
            if code is None:
                raise _Gone("client closed the channel after the file", clean=True)
            return
        self.errors += 1
        handle.abort(f"the client could not store the file: {text[:200]}")
        if code == 2:
            raise _Gone("the client stopped")


def run_scp(channel: paramiko.Channel, session: SessionPort[Any], argv: list[str], host: ChannelHost) -> None:
    """Serve one ``scp -t``/``scp -f`` exec request; always ends the session and the channel."""
    status = 1
    transfer: _Transfer | None = None
    closed_for: str | None = None  # the server gave up waiting (idle, stall)
    peer = _Peer(channel, host.limits)
    try:
        try:
            options = _parse_argv(argv)
            log.info("scp %s %s", "upload to" if options.sink else "download of",
                     _printable(" ".join(options.paths)), extra={"sid": session.id})
            transfer = (_Sink if options.sink else _Source)(peer, session, options)
            transfer.run()
            status = 1 if transfer.errors else 0
        except (_Fatal, FsError) as exc:
            log.info("scp stopped: %s", _printable(exc.message), extra={"sid": session.id})
            try:
                peer.error(exc.message, fatal=True)
            except _Gone:
                pass
        except _Gone as exc:
            log.info("scp ended: %s", exc, extra={"sid": session.id})
            status = 0 if exc.clean and transfer is not None and not transfer.errors else 1
            closed_for = str(exc) if isinstance(exc, _TimedOut) else None
    except Exception:
        _unexpected.log(log, "scp failed", extra={"sid": session.id}, exc_info=True)
        try:
            peer.error("internal server error", fatal=True)
        except Exception:
            pass
    finally:
        session.close()  # aborts any upload still open: nothing half-published
        try:
            channel.send_exit_status(status)
        except Exception:
            pass
        try:
            channel.close()
        except (OSError, EOFError):
            pass  # the client's connection went away first: nothing left to close on the wire
        host.channel_ended(closed_for)  # the connection ends too if this was its last channel
