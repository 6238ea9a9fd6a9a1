"""An SSH worker process: ``python -m scriptsftp.server.frontends.ssh.worker_process FD``.

Started by the core (worker_pool.py) with one end of a socket pair as FD. The
core sends, over it: the setup (host key files, limits, log format), then for
each connection the client's socket and the connection's link to the core
(core_link.py); later kicks, ``close_all`` and ``stop``. The worker runs the
usual SSH, SFTP and SCP code on each connection, with a RemoteCore in place of
the LoginCore. It exits once told to stop and its connections are over, or at
once (closing them) when the core goes away.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from scriptsftp.server.contract import framing

from scriptsftp.server.support import logs

from scriptsftp.server.support import memory

log = logging.getLogger("scriptsftp.ssh")

MAX_COMMAND = 1 << 20


def main(argv: list[str] | None = None) -> int:
    """A replacement worker, started as a new program: the setup comes as the first message."""
    args = sys.argv[1:] if argv is None else argv
    control = socket.socket(fileno=int(args[0]))
    setup, _ = framing.receive(control, MAX_COMMAND)
    memory.limit_arenas()
    logs.setup(setup["log_format"], setup["log_level"])
    return serve(control, setup)


def serve(control: socket.socket, setup: dict) -> int:
    """Serve what the core hands over on ``control`` until told to stop (or the core is gone)."""
    # The core decides when to stop (and drains transfers first); a Ctrl-C or a SIGTERM
    # sent to the whole process group must not drop this worker's connections meanwhile.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    from scriptsftp.server.contract import jail

    from scriptsftp.server.frontends.ssh import paramiko_ext
    from scriptsftp.server.support.keys import host_key_from_text
    from scriptsftp.server.frontends.ssh.remote_core import RemoteCore
    from scriptsftp.server.frontends.ssh.scp import run_scp
    from scriptsftp.server.frontends.ssh.server import SSHConnections, SSHLimits

    paramiko_ext.install()  # a forked worker has it from the daemon already; a new program not yet
    # host keys come as text from the core: this process's account cannot read the files
    keys = [host_key_from_text(text) for text in setup["host_keys"]]
    setup = {k: v for k, v in setup.items() if k != "host_keys"}
    connections = SSHConnections(keys, SSHLimits(**setup["limits"]), scp_runner=run_scp)
    # The kernel jail, while this process has one thread and before any client byte is read:
    # no new opens but read-only Python/library dirs, no new sockets or processes. Client
    # sockets and file descriptors come from the core over ``control`` (server/contract/jail.py).
    # as the unprivileged account from here on, if one is configured
    report = jail.apply(setup.get("deny_under") or (), setup.get("account"))
    missing = [k for k in ("landlock", "seccomp") if not str(report.get(k)).startswith("on")]
    (log.warning if missing or "escape" in report else log.info)(
        "ssh worker pid %d jail: %s", os.getpid(), jail.describe(report))
    cores: dict[int, RemoteCore] = {}
    lock = threading.Lock()
    stop_requested = threading.Event()

    def serve_one(key: int, client: socket.socket, link: socket.socket, addr: tuple) -> None:
        core = RemoteCore(link)
        with lock:
            cores[key] = core
        try:
            connections.serve(client, addr, core)
        except Exception:
            log.exception("ssh connection failed")
        finally:
            link.close()
            with lock:
                cores.pop(key, None)
                last = not cores
            if last and stop_requested.is_set():
                os._exit(0)

    def kick(key: int, reason: str) -> None:
        with lock:
            core = cores.get(key)
        conn = core.conn if core is not None else None
        if conn is not None and conn.on_kick is not None:
            conn.on_kick(reason)

    while True:
        try:
            message, fds = framing.receive(control, MAX_COMMAND)
        except (framing.LinkClosed, OSError, ValueError):
            break  # the core is gone: nothing can be served without it
        kind = message.get("kind")
        if kind == "conn" and len(fds) == 2:
            client = socket.socket(fileno=fds[0])
            link = socket.socket(fileno=fds[1])
            threading.Thread(target=serve_one, args=(message["key"], client, link, tuple(message["addr"])),
                             name=f"ssh-{message['addr'][0]}", daemon=True).start()
            continue
        framing.close_fds(fds)
        if kind == "kick":
            threading.Thread(target=kick, args=(message["key"], message["reason"]), daemon=True).start()
        elif kind == "logs":
            logs.setup(message["log_format"], message["log_level"])
        elif kind == "close_all":
            connections.close_all(message["reason"])
        elif kind == "stop":
            stop_requested.set()
            with lock:
                if not cores:
                    break
    connections.stopping.set()
    connections.close_all("server shutting down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
