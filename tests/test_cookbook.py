"""The cookbook (scripts-examples/), end to end: each example is copied as
shipped into a real daemon's scripts dir, bound with the TOML snippet from its
own header comment, and driven by real SFTP clients.

This module covers the examples that need only veto / api.file / api.store;
tests/test_cookbook_capabilities.py covers those using api.fs, api.notify and
api.run.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import paramiko
import pytest
from paramiko.sftp import CMD_CLOSE

from conftest import (ALICE_PASSWORD, BIN, Daemon, DaemonFactory, close_client, paramiko_client, sftp_batch,
                      toml_str, user_toml)

EXAMPLES = Path(__file__).resolve().parent.parent / "scripts-examples"


# --- helpers shared with test_cookbook_capabilities.py ------------------------------------


def header_snippet(name: str) -> dict[str, Any]:
    """The TOML snippet of an example's header comment ("# Bind it ..."), parsed."""
    lines = (EXAMPLES / name).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Bind it"))
    body = []
    for line in lines[start + 1:]:
        if line == "#":
            body.append("")
        elif line.startswith("#   "):
            body.append(line[4:])
        else:
            break
    return tomllib.loads("\n".join(body))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_str(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Serialise parsed TOML back (tables, arrays of tables, scalars)."""
    out = []
    scalars = {k: v for k, v in data.items()
               if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))}
    if prefix and scalars:
        out.append(f"[{prefix}]")
    out += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for k, v in data.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.append(to_toml(v, name))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"[[{name}]]")
                out += [f"{ik} = {_toml_value(iv)}" for ik, iv in item.items()]
    return "\n".join(out) + "\n"


def example_toml(name: str, patch: Callable[[dict[str, Any]], None] | None = None, **binding_overrides: Any) -> str:
    """The example's header snippet as config text, with ``binding_overrides``
    applied to each of its bindings and ``patch`` to the whole document."""
    data = header_snippet(name)
    for b in data.get("bindings", []):
        assert b["script"] == name, f"{name}: its snippet binds {b['script']}"
        b.update(binding_overrides)
    if patch is not None:
        patch(data)
    return to_toml(data)


def install(daemons: DaemonFactory, *names: str) -> None:
    """Copy examples, as shipped, into the daemon's scripts dir."""
    scripts = daemons.root / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(EXAMPLES / name, scripts / name)


def put(sftp: paramiko.SFTPClient, path: str, data: bytes) -> None:
    """Upload ``data``; a refusal raises with the server's status message,
    whether it comes at OPEN (pre-upload) or at CLOSE (pre-publish)."""
    f = sftp.open(path, "w")
    try:
        f.write(data)
        f.flush()
    except BaseException:
        f.close()
        raise
    f._closed = True
    sftp._request(CMD_CLOSE, f.handle)  # paramiko's f.close() swallows the CLOSE status


def put_refused(sftp: paramiko.SFTPClient, path: str, data: bytes, reason: str) -> None:
    """Upload that must be refused with ``reason`` (a regex) in the SFTP status message."""
    with pytest.raises(PermissionError, match=reason):
        put(sftp, path, data)


def assert_absent(d: Daemon, user: str, vpath: str, sftp: paramiko.SFTPClient | None = None) -> None:
    """A refused file never appears under its name (nor as a leftover staging file)."""
    local = d.home(user) / vpath.lstrip("/")
    assert not local.exists(), f"{vpath} was published"
    parent = local.parent
    if parent.exists():
        leftovers = [p.name for p in parent.iterdir() if p.name.startswith(".scriptsftp")]
        assert leftovers == [], leftovers
    if sftp is not None:
        directory, _, base = vpath.rpartition("/")
        assert base not in sftp.listdir(directory or "/")


def mkdirs(d: Daemon, user: str, *dirs: str) -> None:
    for sub in dirs:
        (d.home(user) / sub.lstrip("/")).mkdir(parents=True, exist_ok=True)


# --- one daemon for the upload/download checks (each test uses its own directory) ---------

FILE_EXAMPLES = {
    # example -> directory its binding is given in this module's daemon
    "reject_executables.py": "/exe",
}


@pytest.fixture(scope="module")
def files_daemon(module_daemons: DaemonFactory) -> Daemon:
    install(module_daemons, *FILE_EXAMPLES)
    extra = "".join(example_toml(name, paths=[f"{directory}/**"]) for name, directory in FILE_EXAMPLES.items())
    d = module_daemons.start(extra)
    mkdirs(d, "alice", *FILE_EXAMPLES.values())
    return d


@pytest.fixture
def alice(files_daemon: Daemon, alice_key):
    sftp = paramiko_client(files_daemon, key=alice_key)
    yield sftp
    close_client(sftp)


# 1. reject_executables.py ----------------------------------------------------------------


def test_reject_executables_by_content(files_daemon: Daemon, alice: paramiko.SFTPClient):
    d = files_daemon
    put(alice, "/exe/report.pdf", b"%PDF-1.7\n" + b"x" * 2000)
    assert (d.home() / "exe/report.pdf").read_bytes().startswith(b"%PDF")
    # a Windows program renamed to .pdf
    put_refused(alice, "/exe/invoice.pdf", b"MZ\x90\x00" + b"\0" * 3000,
                r"/exe/invoice\.pdf looks like a Windows program \(EXE/DLL\); executables are not accepted here")
    assert_absent(d, "alice", "/exe/invoice.pdf", alice)
    put_refused(alice, "/exe/run.txt", b"\x7fELF\x02\x01\x01" + b"\0" * 100, r"Linux/Unix program \(ELF\)")
    put_refused(alice, "/exe/setup.txt", b"#!/bin/sh\nrm -rf /\n", r"interpreter line")
    assert_absent(d, "alice", "/exe/run.txt")
    d.wait_log(r"reject_executables\.py vetoed pre-publish /exe/invoice\.pdf")


def test_reject_executables_with_openssh_sftp(files_daemon: Daemon, alice_key, tmp_path: Path):
    bad = tmp_path / "tool.dat"
    bad.write_bytes(b"MZ" + os.urandom(5000))
    proc = sftp_batch(files_daemon, f"put {bad} /exe/tool.dat\n", alice_key)
    assert proc.returncode != 0  # OpenSSH's sftp prints only "Permission denied"
    assert_absent(files_daemon, "alice", "/exe/tool.dat")
