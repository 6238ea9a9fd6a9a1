"""``[scripts] nice``: script workers run below the daemon's CPU priority (real workers).

The kernel, not our code, decides who gets a contended CPU, so the tests look at what it
sees: the workers' nice values and sessions (autogroups), and the
CPU a spinning script gets against a busy process of the test's own priority when both are
pinned to one CPU; and, end to end, how long an honest SFTP upload takes on a daemon pinned to
one CPU while CPU-bound pre-publish scripts spin on that CPU (SCRIPTSFTP_TEST_NICE=0 shows the
test fails without the feature).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonFactory, close_client, paramiko_client, sftp_put
from test_scripting import binding, write_script

from scriptsftp.scripting.capabilities import CapabilityCall
from scriptsftp.scripting.commands import run_command
from scriptsftp.scripting.workers import CallRequest, CallResult, ScriptSource, WorkerPool
from scriptsftp.server.contract.events import PreUpload
from scriptsftp.server.stores import StateStores

SPIN = """
def on_pre_upload(event, api):
    api.store.get('started')
    while True:
        pass
"""


def request(text: str, *, timeout: float = 5.0, cpu_time: float = 2.0,
            caps: frozenset[str] = frozenset()) -> CallRequest:
    event = PreUpload(path="/a.txt", size=3, user="alice", protocol="sftp", remote_ip="10.0.0.1",
                      session_id="s1").to_dict()
    return CallRequest(ScriptSource("nice.py", text, hashlib.sha256(text.encode()).hexdigest()),
                       "on_pre_upload", event, caps, timeout, cpu_time)


def niceness(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def autogroup(pid: int) -> str | None:
    """The process's autogroup ("/autogroup-N nice K"); None without autogroup support."""
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().strip()
    except OSError:
        return None


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def make_pool(tmp_path: Path, nice: int, workers: int = 2) -> WorkerPool:
    state = tmp_path / f"state-{nice}"
    return WorkerPool(workers, memory_mb=64, state_dir=state, stores=StateStores(state), nice=nice,
                      login_reserve=0)   # no login bindings: no full-priority worker


def started_signal(p: WorkerPool) -> threading.Event:
    """Set when a script calls api.store.get('started'): the script is running."""
    started = threading.Event()
    original = p.capabilities.handler("store")

    def hook(call: CapabilityCall, op: str, args: list):
        if op == "get" and args == ["started"]:
            started.set()
        return original(call, op, args)

    p.capabilities.register("store", hook)
    return started


def test_workers_run_the_configured_steps_below_the_daemon(tmp_path: Path) -> None:
    own = niceness(0)
    with make_pool(tmp_path, 7) as p:
        pids = p.worker_pids()
        assert len(pids) == 2
        for pid in pids:
            assert niceness(pid) == min(19, own + 7)
            # a process group of its own, in our session: with autogroups, in our group too,
            # where its nice value ranks it below us (a session of its own would not)
            assert os.getpgid(pid) == pid and os.getsid(pid) == os.getsid(0)
            assert autogroup(pid) == autogroup(os.getpid())
        # a reload's new value reaches the workers started from then on, not the running ones
        p.set_nice(3)
        result = p.call(request("def on_pre_upload(event, api):\n    while True:\n        pass\n",
                                timeout=60, cpu_time=0.2))
        assert result.error_kind == "cpu"   # that worker is killed and replaced
        deadline = time.monotonic() + 60
        while len(set(p.worker_pids()) - set(pids)) < 1 or len(p.worker_pids()) < 2:
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.05)
        (new,) = set(p.worker_pids()) - set(pids)
        (kept,) = set(p.worker_pids()) & set(pids)
        assert niceness(new) == min(19, own + 3)
        assert niceness(kept) == min(19, own + 7)
        with pytest.raises(ValueError):
            p.set_nice(20)
        with pytest.raises(ValueError):
            p.set_nice(-1)


def test_nice_0_leaves_workers_at_the_daemons_priority(tmp_path: Path) -> None:
    own = niceness(0)
    with make_pool(tmp_path, 0) as p:
        for pid in p.worker_pids():
            assert niceness(pid) == own


def _share(tmp_path: Path, nice: int) -> float:
    """CPU a spinning script gets per CPU a busy process of the test's own priority gets,
    both pinned to one CPU, over about two seconds."""
    cpu = min(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, {cpu})
        with make_pool(tmp_path, nice, workers=1) as p:
            started = started_signal(p)
            worker = p.worker_pids()[0]
            os.sched_setaffinity(worker, {cpu})
            results: list[CallResult] = []
            caller = threading.Thread(target=lambda: results.append(
                p.call(request(SPIN, timeout=60, cpu_time=30, caps=frozenset({"store"})))))
            caller.start()
            assert started.wait(30), "the spinning script never started"
            w0, b0 = cpu_ticks(worker), cpu_ticks(busy.pid)
            time.sleep(2.0)   # the measuring window, not a wait for anything
            w1, b1 = cpu_ticks(worker), cpu_ticks(busy.pid)
            p.close()   # kills the spinning worker; the call ends as a crash
            caller.join(30)
        return (w1 - w0) / max(1, b1 - b0)
    finally:
        busy.kill()
        busy.wait()


def test_a_spinning_script_yields_the_cpu_to_a_busy_daemon_process(tmp_path: Path) -> None:
    niced = _share(tmp_path, 10)
    same = _share(tmp_path, 0)
    # weights 110 : 1024 at nice 10 (about 0.11), 1 : 1 at nice 0
    assert niced < 0.35, f"a nice-10 script got {niced:.2f} CPU per CPU of a nice-0 process"
    assert same > 0.6, f"a nice-0 script got only {same:.2f} (the measurement is off)"


# --- api.run: commands are started by the daemon, and lowered like the workers ---------------

#: Waits (spinning, bounded by the command's timeout) until its nice value differs from the
#: daemon's ($0), then prints it: the parent lowers it just after the start.
PRIO = ["sh", "-c", 'while [ "$(cut -d" " -f19 /proc/$$/stat)" = "$0" ]; do :; done; '
        'cut -d" " -f19 /proc/$$/stat']


def test_a_command_runs_the_configured_steps_below_its_starter() -> None:
    own = niceness(0)
    result = run_command("prio", PRIO + [str(own)], timeout=20, max_output=100, nice=4)
    assert result["code"] == 0 and int(result["stdout"]) == min(19, own + 4)


def test_with_nice_0_a_command_keeps_its_starters_priority() -> None:
    own = niceness(0)
    result = run_command("prio", ["sh", "-c", 'cut -d" " -f19 /proc/$$/stat'], timeout=20,
                         max_output=100, nice=0)
    assert result["code"] == 0 and int(result["stdout"]) == own


# --- end to end: a real daemon on one CPU, CPU-bound scripts and an honest upload ------------

HOG = """
def on_pre_publish(event, api):
    while True:
        pass
"""
HONEST_BYTES = 32 * 1024 * 1024
ATTACKERS = 4


def _descendants(root: int) -> list[int]:
    """Every live process under *root* (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.extend(children.get(pid, []))
        todo.extend(children.get(pid, []))
    return out


def _script_workers(daemon_pid: int) -> list[int]:
    found = []
    for pid in _descendants(daemon_pid):
        try:
            if b"scripting.worker_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def _honest_upload_seconds(d: Any, key: Any, name: str) -> float:
    """Wall-clock seconds of one SFTP upload (connection and login excluded), best of two."""
    client = paramiko_client(d, key=key)
    data = os.urandom(HONEST_BYTES)
    try:
        best = float("inf")
        for i in range(2):
            t0 = time.monotonic()
            sftp_put(client, f"/{name}-{i}.bin", data)
            best = min(best, time.monotonic() - t0)
        return best
    finally:
        close_client(client)


def _attack_ratio(daemons: DaemonFactory, alice_key: Any, bob_key: Any, nice: int) -> tuple[float, float]:
    """(honest upload seconds under attack, without attack) on a daemon pinned to one CPU."""
    write_script(daemons, "hog.py", HOG)
    config = (f"nice = {nice}\nworkers = {ATTACKERS}\n"
              + binding("pre-publish", "hog.py", paths=["/inbox/*"], timeout=120, cpu_time=2))
    cpu = max(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})   # this thread only: the daemon it starts inherits it
    try:
        d = daemons.start(config)
    finally:
        os.sched_setaffinity(0, mine)
    assert os.sched_getaffinity(d.proc.pid) == {cpu}
    (d.home("bob") / "inbox").mkdir(parents=True, exist_ok=True)
    d.home("alice").mkdir(parents=True, exist_ok=True)
    quiet = _honest_upload_seconds(d, alice_key, f"quiet-{nice}")

    stop = threading.Event()
    errors: list[BaseException] = []

    def attack(n: int) -> None:
        try:
            client = paramiko_client(d, "bob", key=bob_key)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            return
        try:
            i = 0
            while not stop.is_set():
                try:
                    sftp_put(client, f"/inbox/a{n}-{i}.bin", b"x" * 1024)
                except OSError:
                    pass   # vetoed or failed: the script was killed at its CPU limit
                i += 1
        except BaseException:  # noqa: BLE001 - the daemon stopped under us at the end
            pass
        finally:
            try:
                close_client(client)
            except BaseException:  # noqa: BLE001
                pass

    threads = [threading.Thread(target=attack, args=(n,), daemon=True) for n in range(ATTACKERS)]
    for t in threads:
        t.start()
    try:
        # wait until every worker spins: each has used some CPU since the attack began
        base = {pid: cpu_ticks(pid) for pid in _script_workers(d.proc.pid)}
        deadline = time.monotonic() + 60
        while True:
            busy = [pid for pid in _script_workers(d.proc.pid)
                    if pid in base and cpu_ticks(pid) - base[pid] >= 10]
            if len(busy) >= ATTACKERS:
                break
            assert not errors, errors
            assert time.monotonic() < deadline, "the attackers' scripts never all ran"
            time.sleep(0.05)
        loaded = _honest_upload_seconds(d, alice_key, f"loaded-{nice}")
    finally:
        stop.set()
        d.stop()
        for t in threads:
            t.join(60)
    return loaded, quiet


def test_an_honest_upload_keeps_its_pace_while_scripts_spin_on_its_cpu(
        daemons: DaemonFactory, alice_key: Any, bob_key: Any) -> None:
    nice = int(os.environ.get("SCRIPTSFTP_TEST_NICE", "10"))   # 0: shows the test can fail
    loaded, quiet = _attack_ratio(daemons, alice_key, bob_key, nice)
    print(f"nice={nice}: honest {HONEST_BYTES >> 20} MiB upload {loaded:.2f} s under attack, "
          f"{quiet:.2f} s without ({loaded / quiet:.1f}x)")
    # with nice = 0 the four spinning scripts take most of that CPU (measured 2.8x to 3.5x:
    # this assertion fails); at nice 10 they weigh 4 x 110 against the upload's 1024 (1.1-1.3x)
    assert loaded < 1.8 * quiet + 0.25, f"{loaded:.2f} s under attack vs {quiet:.2f} s without"


# --- the login_reserve workers keep full priority --------------------------------------------

def login_request(text: str, **kw: Any) -> CallRequest:
    req = request(text, **kw)
    return CallRequest(req.script, "on_pre_upload", {**req.event, "name": "pre-login"},
                       req.capabilities, req.timeout, req.cpu_time)


def _spinning(pid: int, ticks: int = 5) -> bool:
    """Whether *pid* uses CPU: waits (bounded) until it has used *ticks* more."""
    start, deadline = cpu_ticks(pid), time.monotonic() + 30
    while time.monotonic() < deadline:
        if cpu_ticks(pid) - start >= ticks:
            return True
        time.sleep(0.02)
    return False


def test_logins_run_on_full_priority_workers_and_other_calls_never_do(tmp_path: Path) -> None:
    own = niceness(0)
    state = tmp_path / "state"
    with WorkerPool(3, memory_mb=64, state_dir=state, stores=StateStores(state), nice=10,
                    login_reserve=1) as p:
        def classes() -> tuple[list[int], list[int]]:
            pids = p.worker_pids()
            return ([pid for pid in pids if niceness(pid) == own],
                    [pid for pid in pids if niceness(pid) == min(19, own + 10)])

        full, lowered = classes()
        assert len(full) == 1 and len(lowered) == 2
        started = started_signal(p)
        spin = frozenset({"store"})
        # two spinning uploads take the two lowered workers, never the login worker...
        threads = [threading.Thread(target=p.call, args=(request(SPIN, timeout=60, cpu_time=60, caps=spin),))
                   for _ in range(2)]
        for t in threads:
            t.start()
        assert started.wait(30)
        assert all(_spinning(pid) for pid in lowered)
        # ...and a third waits rather than take it, while a login gets it at once
        waiting = p.call(request("def on_pre_upload(event, api):\n    pass\n", timeout=0.5))
        assert waiting.error_kind == "timeout", waiting
        login = p.call(login_request("def on_pre_upload(event, api):\n    pass\n", timeout=30))
        assert login.verdict == "allow", login
        # a login killed at its CPU limit is replaced by a full-priority worker again
        killed = p.call(login_request("def on_pre_upload(event, api):\n    while True:\n        pass\n",
                                      timeout=60, cpu_time=0.2))
        assert killed.error_kind == "cpu", killed
        deadline = time.monotonic() + 60
        while full[0] in p.worker_pids() or len(p.worker_pids()) < 3:
            assert time.monotonic() < deadline, "the login worker was not replaced"
            time.sleep(0.05)
        new_full, new_lowered = classes()
        assert len(new_full) == 1 and new_full != full and sorted(new_lowered) == sorted(lowered)
        p.close()   # ends the spinning calls
        for t in threads:
            t.join(30)
