"""paramiko_ext patches paramiko only when install() is called, and only the paramiko it was written for."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import paramiko
import pytest

from scriptsftp.server.frontends.ssh import paramiko_ext
from scriptsftp.server.contract.script_settings import ConfigError


def test_install_refuses_a_paramiko_it_was_not_written_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paramiko, "__version__", "5.2.0")
    with pytest.raises(paramiko_ext.UnsupportedParamiko) as caught:
        paramiko_ext.install()
    assert isinstance(caught.value, ConfigError)  # printed by the CLI as lines, not a traceback
    (line,) = caught.value.problems
    assert "paramiko 5.2.0 is installed" in line and "5.1.*" in line and "paramiko_ext" in line


@pytest.mark.parametrize("version", ["4.0.0", "6.1.0", "5.10.1", "garbage", ""])
def test_check_version_refuses(version: str) -> None:
    with pytest.raises(paramiko_ext.UnsupportedParamiko):
        paramiko_ext.check_version(version)


@pytest.mark.parametrize("version", ["5.1.0", "5.1.7", "5.1.0rc1"])
def test_check_version_accepts_the_pinned_minor(version: str) -> None:
    paramiko_ext.check_version(version)


def test_importing_patches_nothing_install_patches_once() -> None:
    """A fresh interpreter: every SSH module imported, paramiko untouched; install() twice
    patches it once."""
    code = textwrap.dedent("""
        import hmac
        import paramiko.channel, paramiko.util
        from paramiko.buffered_pipe import BufferedPipe
        compare = paramiko.util.constant_time_bytes_eq
        from scriptsftp.server.frontends.ssh import server, sftp, scp, worker_pool, worker_process
        from scriptsftp.server.frontends.ssh import paramiko_ext
        from scriptsftp.server.frontends.ssh.paramiko_ext import recv, send, speed, transport
        from scriptsftp.server import daemon
        assert paramiko.channel.BufferedPipe is BufferedPipe
        assert paramiko.util.constant_time_bytes_eq is compare
        assert not paramiko_ext.installed()
        paramiko_ext.install()
        paramiko_ext.install()
        assert paramiko.channel.BufferedPipe is speed.ChunkPipe
        assert paramiko.util.constant_time_bytes_eq is hmac.compare_digest
        assert paramiko_ext.installed()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_daemon_says_which_paramiko_it_needs(daemons) -> None:  # type: ignore[no-untyped-def]
    """``scriptsftp run`` with another paramiko minor: one line naming both versions, exit 2."""
    path = daemons.write_config()
    code = textwrap.dedent(f"""
        import sys
        import paramiko
        paramiko.__version__ = "5.2.0"
        from scriptsftp.server.cli import main
        sys.argv = ["scriptsftp", "run", "-c", {str(path)!r}]
        main()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=daemons.root)
    assert out.returncode == 2, out.stderr
    assert "paramiko 5.2.0 is installed" in out.stderr and "5.1.*" in out.stderr
    assert "Traceback" not in out.stderr
