"""What a channel handler (SFTP, SCP) knows of the SSH connection it runs on.

server.py owns each connection (paramiko's ``ServerInterface``, the transport, the
login) and builds one :class:`ChannelHost` per connection; it hands that object to
the SFTP subsystem handler (as its constructor argument) and to the SCP runner. So
sftp.py, sftp_stream.py and scp.py import nothing from server.py; server.py
imports the SFTP handler to register it and is handed the SCP runner by the
composition root: imports run downward (docs/architecture.md).

:class:`SSHLimits` are the ``[sftp]``/``[server]`` settings every SSH module reads;
:class:`ReplyPacing` is the one piece of state the SFTP streams of a process share.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from scriptsftp.server.contract.ports import SessionPort

log = logging.getLogger("scriptsftp.ssh")

CROWDED_WINDOW = 0.002  # another connection's requests answered this recently: the server is busy


@dataclass(frozen=True)
class SSHLimits:
    max_read: int = 261120
    max_handles: int = 256
    idle_timeout: float = 900.0
    login_grace: float = 30.0
    window_size: int = 64 * 2**20
    max_packet: int = 262144
    stall_timeout: float = 120.0  # [server] stall_timeout: an open file with no request for this long
    max_channels: int = 10  # [sftp] max_channels_per_connection
    max_queued: int = 16 * 2**20  # [sftp] max_queued_bytes

    def quiet_limit(self, transferring: bool) -> float:
        """Seconds a channel may stay silent before the server closes it (0: never): the
        idle timeout, or while a file is open the stall timeout, whichever is shorter."""
        stall = self.stall_timeout if transferring else 0.0
        return min((t for t in (self.idle_timeout, stall) if t), default=0.0)

    def timeout_reason(self, transferring: bool) -> str:
        """What the log, the aborted transfer and the client's disconnect say about it."""
        if transferring and self.stall_timeout and self.stall_timeout == self.quiet_limit(True):
            return f"stalled: no data for {self.stall_timeout:g} s"
        return "idle timeout"


class ReplyPacing:
    """Which SFTP stream of this process had requests answered by its transport thread
    last, and when: one per process (SSHConnections), shared by all its connections.

    A client that waits for its replies (libssh2 sends three WRITEs, then waits) is
    fastest when each reply leaves at once and it reads them while we write the next
    block; but each reply is a packet, a MAC and a system call that wakes it. With other
    connections competing for the interpreter, those are what limits throughput, so
    small replies are then held until the transport thread would wait for more input
    (20 parallel curl uploads: -15% server CPU; alone: 5% slower if held)."""

    __slots__ = ("_last", "_at")

    def __init__(self) -> None:
        self._last: object = None
        self._at = 0.0

    def crowded(self, stream: object) -> bool:
        """True when another stream's requests were answered within CROWDED_WINDOW; notes
        ``stream`` as answered now."""
        now = time.monotonic()
        crowded = self._last is not stream and now - self._at < CROWDED_WINDOW
        self._last, self._at = stream, now
        return crowded


class ChannelHost:
    """One SSH connection as its channel handlers see it: the limits, a Session per
    channel, the channel threads the connection waits for, and the process's reply pacing.

    ``end_connection(reason)`` is server.py's: it closes the connection (with that reason
    for the client) when the server closed its last channel."""

    def __init__(self, sid: str, limits: SSHLimits, pacing: ReplyPacing,
                 open_session: Callable[[str], SessionPort[Any]], end_connection: Callable[[str], None]) -> None:
        self.sid = sid
        self.limits = limits
        self.pacing = pacing
        self.open_session = open_session
        self._end_connection = end_connection
        # channel threads (SFTP handlers, SCP runs): the connection is over once they are
        self.workers: list[threading.Thread] = []
        self._last_used = time.monotonic()  # a channel opened or ended (see idle_for)

    def touch(self) -> None:
        """The connection was used (a login, a channel opened): its idle time counts from now."""
        self._last_used = time.monotonic()

    def add_worker(self, worker: threading.Thread) -> None:
        """A channel thread of this connection (finished ones are forgotten: a connection may
        run thousands of scp commands)."""
        self.workers = [w for w in self.workers if w.ident is None or w.is_alive()]
        self.workers.append(worker)

    def busy(self) -> bool:
        """A channel thread (SFTP, SCP) other than the caller is running. A channel that
        never started a subsystem or command does not count: it cannot hold a connection."""
        me = threading.current_thread()
        return any(w.is_alive() and w is not me for w in self.workers)

    def idle_for(self) -> float:
        """Seconds the connection has had no running channel (0 while one runs)."""
        return 0.0 if self.busy() else time.monotonic() - self._last_used

    def channel_ended(self, closed_for: str | None = None) -> None:
        """A channel thread is done. ``closed_for``: the server closed the channel (idle
        timeout, stalled transfer); if it was the connection's last, the connection goes
        too: a client that stopped talking must not hold its TCP connection, its worker
        slot and its login for another idle_timeout."""
        self._last_used = time.monotonic()
        if closed_for and not self.busy():
            self._end_connection(closed_for)

    def join_workers(self, timeout: float) -> None:
        """Wait for the channel threads to finish their cleanup (aborting unfinished uploads):
        until then the connection still uses the session, the staging records, the scripts."""
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.is_alive() and worker is not threading.current_thread():
                worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.warning("channel thread %s still running %.0fs after its connection ended",
                            worker.name, timeout, extra={"sid": self.sid})
                return
