"""The schedule event: cron bindings fire on the minute, with their granted capabilities.

``[scripts] schedule_tick`` (a test knob) makes one scheduler minute last a fraction
of a second, so these tests do not wait for the wall clock."""

from __future__ import annotations

import re
import subprocess
import textwrap

from conftest import BIN, DaemonFactory
from test_scripting import binding, write_script

TICK = 'schedule_tick = 0.25\n'


def test_cron_bindings_fire_on_matching_minutes_with_their_capabilities(daemons: DaemonFactory):
    write_script(daemons, "every.py", """
        import datetime

        def on_schedule(event, api):
            minute = datetime.datetime.fromtimestamp(event.scheduled).minute
            api.log("tick", cron=event.cron, minute=minute, user=event.user or "-")

        def five(event, api):
            minute = datetime.datetime.fromtimestamp(event.scheduled).minute
            api.log("five", minute=minute)

        def heartbeat(event, api):
            n = api.store.incr("beats")
            api.fs.write_text("/heartbeat.txt", "beat " + str(n))
            api.log("beat", user=event.user, n=n)
    """)
    extra = (TICK + binding("schedule", "every.py", cron="* * * * *")
             + binding("schedule", "every.py", function="five", cron="*/5 * * * *")
             + binding("schedule", "every.py", function="heartbeat", cron="* * * * *", users=["alice"],
                       allow=["fs", "store"]))
    d = daemons.start(extra)
    d.wait_log(r"every\.py: five minute=\d+", timeout=30)
    d.wait_log(r"every\.py: beat user=alice n=3", timeout=30)
    log = d.log_text()
    ticks = re.findall(r"every\.py: tick cron=\* \* \* \* \* minute=(\d+) user=-", log)
    assert len(ticks) >= 2
    # each matching minute fires once (a scheduler late under load may skip one, never repeat one)
    assert len(set(ticks)) == len(ticks) or len(ticks) > 60
    fives = [int(m) for m in re.findall(r"every\.py: five minute=(\d+)", log)]
    assert fives and all(m % 5 == 0 for m in fives)
    assert (d.home("alice") / "heartbeat.txt").read_text().startswith("beat ")


def test_schedule_script_without_user_cannot_use_fs(daemons: DaemonFactory):
    write_script(daemons, "nouser.py", """
        def on_schedule(event, api):
            try:
                api.fs.listdir("/")
            except PermissionError as e:
                api.log("refused", error=str(e))
    """)
    d = daemons.start(TICK + binding("schedule", "nouser.py", cron="* * * * *", allow=["fs"]))
    m = d.wait_log(r"nouser\.py: refused error=.*", timeout=30)
    assert "api.fs needs an event with a user" in m.group(0)


def test_bad_cron_is_a_config_error_with_file_and_line(daemons: DaemonFactory):
    path = daemons.write_config(binding("schedule", "x.py", cron="*/5 * * *")
                                + binding("schedule", "x.py", cron="61 * * * *"))
    out = subprocess.run([str(BIN), "check", "-c", str(path)], capture_output=True, text=True)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines, 1) if "*/5 * * *" in line)
    second = next(i for i, line in enumerate(lines, 1) if "61 * * * *" in line)
    assert re.search(rf"{re.escape(str(path))}:{first}: .*cron.*5 fields", text), text
    assert re.search(rf"{re.escape(str(path))}:{second}: .*cron.*invalid cron expression", text), text


def test_script_test_runs_a_schedule_handler(tmp_path):
    script = tmp_path / "sched.py"
    script.write_text(textwrap.dedent("""
        def on_schedule(event, api):
            api.log("scheduled run", user=event.user)
    """))
    out = subprocess.run([str(BIN), "script", "test", str(script), "--event", "schedule", "--user", "alice"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "scheduled run user=alice" in out.stdout


def test_reload_changes_schedule_bindings(daemons: DaemonFactory):
    import signal

    write_script(daemons, "a.py", """
        def on_schedule(event, api):
            api.log("a fired")
    """)
    write_script(daemons, "b.py", """
        def on_schedule(event, api):
            api.log("b fired", cron=event.cron)
    """)
    d = daemons.start(TICK + binding("schedule", "a.py", cron="* * * * *"))
    d.wait_log(r"a\.py: a fired", timeout=30)
    daemons.write_config(TICK + binding("schedule", "b.py", cron="*/2 * * * *"))
    mark = len(d.lines)
    d.signal(signal.SIGHUP)
    d.wait_log(r"configuration reloaded", timeout=30, start=mark)
    mark = len(d.lines)
    d.wait_log(r"b\.py: b fired cron=\*/2 \* \* \* \*", timeout=30, start=mark)
    after = len(d.lines)
    d.wait_log(r"b\.py: b fired", timeout=30, start=after)  # a later run of b
    assert "a fired" not in "\n".join(d.lines[after:])


def test_a_minute_cut_short_by_sigkill_runs_once_after_restart_on_one_node(daemons: DaemonFactory):
    """SQLite, one node: the minutes claimed but unfinished when the daemon was killed run once
    after it restarts (the lease expired); the minutes that came due while it was down do not."""
    import sqlite3
    import time
    from datetime import datetime

    write_script(daemons, "tick.py", """
        def on_schedule(event, api):
            api.run("hang")
    """)
    hang = '\n[commands.hang]\nargv = ["sleep", "90"]\ntimeout = 90\n'
    d = daemons.start(TICK + binding("schedule", "tick.py", cron="* * * * *", allow=["run"], timeout=600) + hang)
    deadline = time.monotonic() + 60
    while d.log_text().count("schedule: tick.py fires") < 2:
        assert time.monotonic() < deadline, "no minute fired"
        time.sleep(0.1)
    d.kill()
    claims = daemons.root / "state" / "schedule.sqlite3"
    with sqlite3.connect(claims) as db:
        hung = [m for (m,) in db.execute("SELECT minute FROM schedule_claims WHERE state = 'claimed'")]
    assert len(hung) >= 2

    write_script(daemons, "tick.py", """
        def on_schedule(event, api):
            api.store.incr("m" + str(int(event.scheduled)))
    """)
    d = daemons.start(TICK + binding("schedule", "tick.py", cron="* * * * *", allow=["store"]))
    expected = {"m" + str(int(datetime.strptime(m, "%Y-%m-%dT%H:%M").timestamp())) for m in hung}
    store = daemons.root / "state" / "script-store.sqlite3"
    deadline = time.monotonic() + 90
    while True:
        with sqlite3.connect(store) as db:
            counts = {k: int(v) for k, v in db.execute("SELECT key, value FROM script_kv WHERE ns = 'tick.py'")}
        if expected <= set(counts) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert expected <= set(counts), f"cut-short minutes {sorted(expected)} not run again: {sorted(counts)}"
    d.stop()
    with sqlite3.connect(store) as db:
        counts = {k: int(v) for k, v in db.execute("SELECT key, value FROM script_kv WHERE ns = 'tick.py'")}
    assert set(counts.values()) == {1}, counts  # none twice
    # the minutes between the kill and the restart were never claimed, so never run
    ran = sorted(int(k[1:]) for k in counts)
    after = [m for m in ran if m > max(int(k[1:]) for k in expected)]
    assert after and after[0] - max(int(k[1:]) for k in expected) > 60, ran
    assert d.log_text().count("was claimed by a node that did not finish it") >= len(hung)
