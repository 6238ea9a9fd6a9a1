#!/usr/bin/env python3
"""Hot reload latency: from a script saved on disk to the new version deciding.

    python bench/reload_bench.py [--n 10]

Starts scriptsftp with a pre-upload script that vetoes with "v<N>", then
--n times: saves version N+1 (the way editors do: write a temp file, rename
it over the script) and uploads over one open paramiko SFTP session until the
veto reason says "v<N+1>". Reports the median and max of save-to-active time.
Bar (issue 3): under 1 s.
"""

from __future__ import annotations

import os
import sys

try:
    import paramiko
except ImportError:
    _venv_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".venv", "bin", "python")
    if os.path.exists(_venv_py) and os.path.realpath(sys.executable) != os.path.realpath(_venv_py):
        os.execv(_venv_py, [_venv_py, *sys.argv])
    raise

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import openssh  # noqa: E402
from sftp_bench import scriptsftp_argv, scriptsftp_config  # noqa: E402

SCRIPT = 'def on_pre_upload(event, api):\n    api.veto("v{n}")\n'
BINDING = '\n[[bindings]]\nevent = "pre-upload"\nscript = "v.py"\n'


def save(path: Path, n: int) -> None:
    tmp = path.with_name(".v.py.swp")
    tmp.write_text(SCRIPT.format(n=n))
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="scriptsftp-reload-bench-"))
    proc = None
    try:
        pubkey = openssh.keygen_ed25519(base / "key")
        home, scripts, state = base / "home", base / "scripts", base / "state"
        for p in (home, scripts, state):
            p.mkdir()
        script = scripts / "v.py"
        save(script, 0)
        (base / "c.toml").write_text(scriptsftp_config(state, home, scripts, pubkey) + BINDING)
        log = base / "daemon.log"
        proc = subprocess.Popen([*scriptsftp_argv(None), "-c", str(base / "c.toml")], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
        port = int(openssh.wait_for_line(proc, log, r"listening sftp on [\d.]+:(\d+)", 30).group(1))
        openssh.wait_for_line(proc, log, r"ready", 30)
        t = paramiko.Transport(("127.0.0.1", port))
        t.connect(username="bench", pkey=paramiko.Ed25519Key.from_private_key_file(str(base / "key")))
        sftp = paramiko.SFTPClient.from_transport(t)
        lat = []
        for n in range(1, args.n + 1):
            t0 = time.perf_counter()
            save(script, n)
            while True:
                try:
                    sftp.open("/x", "w").close()
                    raise RuntimeError("upload allowed: the script never vetoed")
                except PermissionError as exc:
                    if f"v{n}" in str(exc):
                        break
                if time.perf_counter() - t0 > 10:
                    raise RuntimeError(f"v{n} not active after 10 s")
                time.sleep(0.005)
            lat.append(time.perf_counter() - t0)
        t.close()
        print(f"hot reload, save to active ({args.n} saves by rename): median {statistics.median(lat) * 1000:.0f} ms,"
              f" max {max(lat) * 1000:.0f} ms (bar: < 1000 ms); load average {os.getloadavg()[0]:.2f}")
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
