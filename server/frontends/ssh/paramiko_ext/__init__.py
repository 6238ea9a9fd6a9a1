"""Everything the SSH front end does to paramiko beyond its public surface, installed explicitly.

paramiko's public API cannot serve SFTP at our speed and with our login rules, so
these modules replace or override private parts of it, written against paramiko
5.1 (pinned ``paramiko==5.1.*`` in pyproject.toml):

* ``recv.py``: the server's packet reader (one buffer per connection, a packet size
  limit, copy-free decryption, the SFTP sink and before-wait hooks).
* ``send.py``: channel data out without per-packet copies, several packets per system call.
* ``speed.py``: the chunk-queue channel buffer (``ChunkPipe``) and its helpers.
* ``transport.py``: ``ServerTransport`` and the auth handler (kex, login decision,
  per-channel hooks, logging), ``send_disconnect``.
* ``sftp_attrs.py``: ``SFTPAttributes``' private flags and packing.

Importing any of them changes nothing in paramiko. :func:`install` applies the two
process-wide patches (the channel buffer class, the C constant-time MAC compare) and
refuses a paramiko outside the version range the patches were written for. The
composition root calls it: the daemon where SSH is set up (before SSH worker processes
fork), and each SSH worker process. The differential tests (tests/test_paramiko_recv.py,
test_paramiko_send.py, test_paramiko_speed.py) check the replacements against
paramiko's own code; a new paramiko minor means running them, then widening
``WRITTEN_FOR``.
"""

from __future__ import annotations

import hmac
import threading

import paramiko
import paramiko.channel
import paramiko.util

from scriptsftp.server.frontends.ssh.paramiko_ext.speed import ChunkPipe
from scriptsftp.server.contract.script_settings import ConfigError

#: the paramiko releases (major, minor) these patches were written and tested for
WRITTEN_FOR = ((5, 1),)

_installed = False
_lock = threading.Lock()


class UnsupportedParamiko(ConfigError):
    """The installed paramiko is not one the patches were written for: the daemon prints
    this and exits, instead of serving with patches that may no longer fit."""


def check_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedParamiko` unless ``version`` (default: the installed
    paramiko's) is in :data:`WRITTEN_FOR`."""
    found = paramiko.__version__ if version is None else version
    try:
        major_minor = tuple(int(part) for part in found.split(".")[:2])
    except ValueError:
        major_minor = ()
    if major_minor in WRITTEN_FOR:
        return
    wanted = ", ".join(f"{major}.{minor}.*" for major, minor in WRITTEN_FOR)
    raise UnsupportedParamiko([
        f"scriptsftp: paramiko {found} is installed, but the SSH front end's paramiko patches "
        f"(server/frontends/ssh/paramiko_ext) were written for paramiko {wanted}: "
        f"install paramiko=={wanted} (as pinned in pyproject.toml)"
    ])


def install() -> None:
    """Check the paramiko version, then apply the process-wide patches (once; idempotent).

    * ``paramiko.channel.BufferedPipe`` becomes :class:`speed.ChunkPipe`:
      ``Channel.__init__`` looks the name up in its module, so every channel made from
      now on buffers its input as a queue of chunks (the SFTP stream relies on it).
    * ``paramiko.util.constant_time_bytes_eq`` becomes ``hmac.compare_digest``: paramiko
      compares MACs with a pure-Python loop on every packet; the stdlib does it in C."""
    global _installed
    check_version()
    with _lock:
        if _installed:
            return
        paramiko.util.constant_time_bytes_eq = hmac.compare_digest  # type: ignore[assignment]
        paramiko.channel.BufferedPipe = ChunkPipe  # type: ignore[attr-defined]
        _installed = True


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return _installed


__all__ = ["UnsupportedParamiko", "WRITTEN_FOR", "check_version", "install", "installed"]
