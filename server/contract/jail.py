"""The kernel jail of worker processes (script workers and SSH workers).

docs/architecture.md rule 11: workers are a privilege boundary. Besides running as an
unprivileged account (chosen by the parent, see server/support/worker_accounts.py), a worker
calls :func:`apply` once, after it has imported what it needs and before it
reads anything untrusted. Two independent layers, each applied when the kernel
(and the Python binding) offers it, each reported, never fatal:

* **Landlock** (landlockpy): every file system right is handled, and only
  READ_FILE/READ_DIR is granted back, on the Python installation (stdlib,
  site-packages, the package's own directory, ``sys.path``) and the system
  library directories (late imports load extension modules and their shared
  libraries). Nothing else can be opened, and nothing anywhere can be written,
  created, removed, renamed, truncated or executed. TCP bind/connect are
  handled with no rule (ABI >= 4), and the domain is scoped (ABI >= 6): no
  connecting to abstract Unix sockets, no signals to processes outside it.
  Descriptors the worker already holds or is handed keep working: Landlock
  checks at open time.
* **seccomp** (pyseccomp over libseccomp): a deny-list, answering EPERM, of
  what a worker never does: create sockets (``socket``, ``socketpair``),
  ``connect``/``bind``/``listen``/``accept``, ``execve``, new processes
  (``fork``, ``vfork``, ``clone`` without CLONE_THREAD; ``clone3`` answers
  ENOSYS so that threads fall back to ``clone``), ``ptrace`` and reading other
  processes' memory, namespaces, mounts, modules, ``bpf``, ``perf_event_open``,
  ``userfaultfd``, ``io_uring`` (which could issue socket operations seccomp
  cannot see), keyrings, and the TIOCSTI ioctl (typing into a terminal).
  Everything else is allowed: a deny-list is weaker than an allow-list, and is
  documented as such (docs/sandbox.md).

It lives in the contract beside framing.py for the same reason: both kinds of
worker (scripting/worker_main.py and the SSH workers) apply it, and scripting/
may import nothing else from server/. It imports nothing of ours and nothing
heavy at import time.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import sysconfig
from typing import Any

#: Environment variable that makes a worker, right after its jail, try what an escaped
#: script would (open /etc/passwd, write a file, create a socket, fork) and report the outcome.
#: The probe only reports: honouring it gives nothing away. The tests set it.
TEST_ESCAPE_ENV = "SCRIPTSFTP_TEST_ESCAPE"

#: System library directories a late import may need to read (shared libraries).
_LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib")

_DENY_EPERM = (
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "execve", "execveat", "fork", "vfork",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "pidfd_open",
    "setns", "unshare", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "open_by_handle_at", "name_to_handle_at",
    "personality", "uselib", "lookup_dcookie",
)
_CLONE_THREAD = 0x00010000
_TIOCSTI = 0x5412


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good (all of real, effective and saved; no supplementary
    groups; the kernel clears every capability). Workers start as the daemon's account so
    that they can import from wherever the interpreter lives (pyenv under /root, say), and
    call this after their imports and before they read anything untrusted."""
    if os.getuid() == uid and os.geteuid() == uid and os.getgid() == gid:
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):  # pragma: no cover
        raise OSError("could not drop privileges")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError("privileges could be regained after dropping them")  # pragma: no cover


def read_paths(deny_under: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Directories a jailed worker may read: the Python installation and system libraries.
    A candidate that contains (or is) one of ``deny_under`` (e.g. state_dir) is left out."""
    candidates: list[str] = []
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if paths.get(key):
            candidates.append(paths[key])
    here = os.path.dirname(os.path.abspath(__file__))           # .../scriptsftp/scripting
    candidates.append(os.path.dirname(os.path.dirname(here)))    # the dir holding scriptsftp/
    candidates.extend(p for p in sys.path if p)
    candidates.extend(_LIB_DIRS)
    denied = [os.path.realpath(d) for d in deny_under if d]
    out: list[str] = []
    for c in candidates:
        real = os.path.realpath(c)
        if real == "/" or not os.path.isdir(real) or real in out:
            continue
        if any(d == real or d.startswith(real.rstrip("/") + "/") for d in denied):
            continue
        out.append(real)
    return out


def _landlock_ruleset(paths: list[str]) -> tuple[Any, str]:
    """(ruleset ready to enforce, "") or (None, "off (why)"). Built before the account
    drop: adding a rule opens the directory, which the worker account may not be able to."""
    try:
        import landlockpy
        from landlockpy import AccessFS, AccessNet, Ruleset, Scope
    except ImportError as e:
        return None, f"off (the landlockpy module is missing: {e})"
    try:
        abi = landlockpy.abi_version()
    except Exception as e:  # noqa: BLE001
        return None, f"off ({type(e).__name__}: {e})"
    if abi < 1:
        return None, "off (the kernel does not offer Landlock)"
    rs = None
    try:
        rs = Ruleset(handled_net=AccessNet.BIND_TCP | AccessNet.CONNECT_TCP
                     | AccessNet.BIND_UDP | AccessNet.CONNECT_SEND_UDP,
                     scoped=Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL)
        for p in paths:
            rs.allow_path(p, AccessFS.READ_FILE | AccessFS.READ_DIR)
    except Exception as e:  # noqa: BLE001
        if rs is not None:
            rs.close()
        return None, f"off (could not build the ruleset: {type(e).__name__}: {e})"
    net = "tcp denied" if rs.handled_net else "network not handled (ABI < 4)"
    scope = "scoped" if rs.scoped else "not scoped (ABI < 6)"
    return rs, f"on (ABI {abi}; read-only: {len(paths)} dirs; {net}; {scope})"


def _landlock_enforce(rs: Any, description: str) -> str:
    try:
        rs.restrict()
    except Exception as e:  # noqa: BLE001
        return f"off (could not enforce: {type(e).__name__}: {e})"
    finally:
        rs.close()
    return description


def _seccomp() -> str:
    try:
        import pyseccomp as sc
    except (ImportError, OSError, RuntimeError) as e:  # OSError: libseccomp.so.2 is missing
        return f"off (pyseccomp/libseccomp unavailable: {e})"
    try:
        f = sc.SyscallFilter(sc.ALLOW)
        skipped = []
        for name in _DENY_EPERM:
            try:
                f.add_rule(sc.ERRNO(errno.EPERM), name)
            except (ValueError, OSError, RuntimeError):
                skipped.append(name)   # unknown to this libseccomp/arch
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, 0))
        f.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.EQ, _TIOCSTI))
        f.load()
    except Exception as e:  # noqa: BLE001
        return f"off (could not load the filter: {type(e).__name__}: {e})"
    extra = f"; not known here: {', '.join(skipped)}" if skipped else ""
    return f"on ({len(_DENY_EPERM) - len(skipped) + 3} rules{extra})"


def preload() -> None:
    """Import the bindings (and load libseccomp) before anything is restricted; read the
    local time zone (glibc reads /etc/localtime once, on first use)."""
    import time
    time.localtime()
    for mod in ("landlockpy", "pyseccomp"):
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - reported by apply()
            pass


def apply(deny_under: list[str] | tuple[str, ...] = (), account: tuple[int, int] | None = None) -> dict[str, Any]:
    """Jail the calling process (call it while it has one thread): first drop to ``account``
    (uid, gid) if given (raises OSError if that fails), then Landlock and seccomp, each
    when available (never raises for those).
    Returns ``{"landlock": "on (...)"|"off (why)", "seccomp": ..., "uid": N}``."""
    if not sys.platform.startswith("linux"):
        if account is not None:
            drop_privileges(int(account[0]), int(account[1]))
        return {"landlock": "off (not Linux)", "seccomp": "off (not Linux)", "uid": os.getuid()}
    preload()
    # before the drop: sysconfig imports lazily, and rules open their directories
    ruleset, landlock = _landlock_ruleset(read_paths(deny_under))
    try:
        if account is not None:
            drop_privileges(int(account[0]), int(account[1]))
    except BaseException:
        if ruleset is not None:
            ruleset.close()
        raise
    if ruleset is not None:
        landlock = _landlock_enforce(ruleset, landlock)
    result: dict[str, Any] = {"landlock": landlock, "seccomp": _seccomp(), "uid": os.getuid()}
    if os.environ.get(TEST_ESCAPE_ENV) == "1":
        result["escape"] = escape_probe()
    return result


def escape_probe() -> dict[str, str]:
    """What an escaped script would try first; each outcome as 'allowed' or the error."""
    out: dict[str, str] = {}

    def attempt(key: str, fn: Any) -> None:
        try:
            fn()
            out[key] = "allowed"
        except OSError as e:
            out[key] = f"{type(e).__name__}: [Errno {e.errno}] {errno.errorcode.get(e.errno or 0, '')}"

    def read_passwd() -> None:
        with open("/etc/passwd", "rb") as f:
            f.read(1)

    def write_tmp() -> None:
        fd = os.open(f"/tmp/scriptsftp-escape-{os.getpid()}", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        os.unlink(f"/tmp/scriptsftp-escape-{os.getpid()}")

    def new_socket() -> None:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()

    def unix_socket() -> None:
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    attempt("open", read_passwd)
    attempt("write", write_tmp)
    attempt("socket", new_socket)
    attempt("unix_socket", unix_socket)
    attempt("fork", fork)
    return out


def describe(report: dict[str, Any]) -> str:
    """One log line's worth of a jail report."""
    text = f"uid {report.get('uid')}; landlock {report.get('landlock')}; seccomp {report.get('seccomp')}"
    if "escape" in report:
        text += "; escape probe: " + ", ".join(f"{k}={v}" for k, v in report["escape"].items())
    return text
