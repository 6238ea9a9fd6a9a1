"""The FTP front end's pyftpdlib patches start only on the pyftpdlib they were written for.

pyftpdlib_ext overrides private methods and reads private attributes of
pyftpdlib 2.2.*; on any other version ``install()`` (called by the FTP listener
before it builds anything) refuses with one line that ``scriptsftp run`` prints,
never a traceback. Importing the module patches nothing.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pyftpdlib
import pytest
from pyftpdlib import exceptions as ftp_exceptions
from pyftpdlib.handlers import DTPHandler, FTPHandler

from scriptsftp.server.frontends.ftp import pyftpdlib_ext
from scriptsftp.server.frontends.ftp.pyftpdlib_ext import UnsupportedPyftpdlib, check_version, install


def test_the_installed_pyftpdlib_is_the_one_the_patches_were_written_for():
    assert pyftpdlib.__ver__.startswith("2.2.")
    install()
    install()  # idempotent
    assert logging.getLogger("pyftpdlib").level == logging.WARNING


@pytest.mark.parametrize("version", ["2.2.0", "2.2.9", "2.2.10"])
def test_any_2_2_release_is_accepted(version: str):
    check_version(version)


@pytest.mark.parametrize("version", ["2.3.0", "2.1.1", "1.5.10", "3.0.0", "2.20.0", "unknown"])
def test_another_pyftpdlib_is_refused_with_one_clear_line(monkeypatch: pytest.MonkeyPatch, version: str):
    monkeypatch.setattr(pyftpdlib, "__ver__", version)
    with pytest.raises(UnsupportedPyftpdlib) as refused:
        install()
    message = str(refused.value)
    assert "\n" not in message
    assert f"pyftpdlib {version} is installed" in message
    assert "pyftpdlib==2.2.*" in message
    assert isinstance(refused.value, ValueError)  # what `scriptsftp run` prints as "cannot start"


def test_a_2_2_release_without_a_private_name_we_use_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delattr(ftp_exceptions, "_RetryError")
    with pytest.raises(UnsupportedPyftpdlib, match=r"lacks pyftpdlib\.exceptions\._RetryError"):
        install()


def test_importing_the_patches_changes_nothing_in_pyftpdlib():
    """The overrides live on our subclasses; pyftpdlib's own classes are untouched."""
    assert DTPHandler.close.__module__ == "pyftpdlib.handlers.ftp.data"
    assert FTPHandler.collect_incoming_data.__module__ == "pyftpdlib.handlers.ftp.control"
    assert pyftpdlib_ext.DataChannel.close is not DTPHandler.close


def test_the_ftp_listener_checks_before_it_builds_anything(monkeypatch: pytest.MonkeyPatch):
    from scriptsftp.server.frontends.ftp import listener

    monkeypatch.setattr(pyftpdlib, "__ver__", "2.3.0")
    with pytest.raises(UnsupportedPyftpdlib):
        listener.make_listener(object(), object(), object(), object())  # type: ignore[arg-type]  # never reached


def test_scriptsftp_run_prints_the_refusal_without_a_traceback(tmp_path: Path):
    from conftest import toml_str

    from scriptsftp.server.core.passwords import hash_password

    (tmp_path / "homes" / "alice").mkdir(parents=True)
    cfg = tmp_path / "scriptsftp.toml"
    cfg.write_text(
        '[server]\nstate_dir = "state"\n\n[sftp]\nenabled = false\n\n'
        '[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\n\n'
        f'[[users]]\nname = "alice"\nhome = "homes/alice"\npassword_hash = {toml_str(hash_password("alice-Secret-1"))}\n'
        'permissions = { "/" = ["*"] }\n')
    run = ("import sys, pyftpdlib; pyftpdlib.__ver__ = '2.3.0'; "
           "from scriptsftp.server.cli import main; sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", run, "run", "-c", str(cfg), "--allow-root"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "scriptsftp: cannot start: pyftpdlib 2.3.0 is installed" in done.stderr
