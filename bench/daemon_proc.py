"""A `scriptsftp run` child for the benches that start their own daemons: started on a
config, ready once it logged "ready", its SFTP port read from its log (it listens on
port 0), stopped with SIGTERM (SIGKILL after 30 s). Imported as ``daemon_proc`` by a bench
run as ``python bench/x.py`` (bench/ is then on sys.path), after it re-executed itself in
the project's venv, so ``scriptsftp`` sits beside ``sys.executable``."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

BIN = Path(sys.executable).with_name("scriptsftp")


def start_daemon(cfg: Path, cwd: Path, label: str, lines: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``scriptsftp run -c cfg`` in ``cwd``; returns the process and its SFTP port once
    it is ready. Its log lines are appended to ``lines`` as they come; a daemon that is not
    ready within 120 s ends the bench with its last 30 lines."""
    proc = subprocess.Popen([str(BIN), "run", "-c", str(cfg)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    ready = threading.Event()
    port = 0

    def read() -> None:
        nonlocal port
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            m = re.search(r"listening sftp on \S+:(\d+)", line)
            if m and not port:
                port = int(m[1])
            if re.search(r"scriptsftp \S+ ready", line):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(120) or not port:
        raise SystemExit(f"{label}: scriptsftp did not start:\n" + "".join(lines[-30:]))
    return proc, port


def stop_daemon(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
