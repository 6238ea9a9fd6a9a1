"""Schedules in a cluster: two real daemons sharing one PostgreSQL database fire each cron
minute of a binding on exactly one node (docs/cluster.md, "Schedules").

The binding ("* * * * *", virtual clock of ``schedule_tick`` real seconds a minute) counts
its runs per minute with ``api.store.incr("m<minute>")`` in the shared script store; the
test reads the counts from PostgreSQL: every minute once, none missing between the first
and the last, none twice.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg

from conftest import DaemonFactory
from test_cluster import cluster_toml, two_nodes  # noqa: F401 (a fixture)
from test_scripting import binding, write_script

TICK = 0.5
SCRIPTS = f"schedule_tick = {TICK}\n"  # in the base config's [scripts]

COUNT = """
def on_schedule(event, api):
    api.store.incr("m" + str(int(event.scheduled)))
"""

# node A's script never finishes a run while the test needs it (time.sleep is refused in
# scripts: it waits on a command), so every minute A claims is still unfinished when A is
# killed, and each of them must be taken over by B, and none run twice
HANG = """
def on_schedule(event, api):
    api.run("hang")
"""
HANG_COMMAND = """
[commands.hang]
argv = ["sleep", "90"]
timeout = 90
"""


def counts(dsn: str) -> dict[int, int]:
    """Runs per minute (epoch seconds of the scheduled minute), from the shared store."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT key, value FROM script_kv WHERE ns = 'tick.py'").fetchall()
    return {int(k[1:]): int(v) for k, v in rows}


def wait_counts(dsn: str, done, timeout: float, what: str) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        c = counts(dsn)
        if done(c):
            return c
        assert time.monotonic() < deadline, f"{what}: {sorted(c.items())}"
        time.sleep(0.2)


def assert_each_minute_once(c: dict[int, int], through: int) -> None:
    minutes = sorted(c)
    doubled = {m: n for m, n in c.items() if n != 1}
    assert not doubled, f"minutes run more than once: {doubled}"
    missing = [m for m in range(minutes[0], through + 60, 60) if m not in c]
    assert not missing, f"minutes never run: {missing} (ran: {minutes})"


def start_node(factory: DaemonFactory, name: str, dsn: str, script: str, extra: str = "", **kw: object):
    write_script(factory, "tick.py", script)
    return factory.start(SCRIPTS + binding("schedule", "tick.py", cron="* * * * *", **kw) + extra
                         + cluster_toml(name, dsn))


def test_a_cron_minute_fires_on_exactly_one_of_two_nodes(two_nodes: list[DaemonFactory], pg_dsn: str):
    a = start_node(two_nodes[0], "node-a", pg_dsn, COUNT, allow=["store"])
    b = start_node(two_nodes[1], "node-b", pg_dsn, COUNT, allow=["store"])
    # both nodes up for at least 10 virtual minutes after B started
    first = wait_counts(pg_dsn, lambda c: len(c) >= 1, 60, "no minute ran")
    start = max(first)
    c = wait_counts(pg_dsn, lambda c: max(c) >= start + 12 * 60, 120, "fewer than 12 minutes ran")
    through = max(c)
    fired = [d.log_text().count("schedule: tick.py fires") for d in (a, b)]
    a.stop()
    b.stop()
    c = counts(pg_dsn)
    assert_each_minute_once(c, through)
    # each firing was logged by the one node that claimed it: as many as minutes ran
    assert sum(fired) <= len(c) and sum(fired) >= len([m for m in c if m <= through]), (fired, len(c))
    for d in (a, b):
        assert "Traceback" not in d.log_text(), d.log_text()[-3000:]


def test_minutes_claimed_by_a_node_killed_with_sigkill_are_run_once_by_the_other(two_nodes: list[DaemonFactory],
                                                                                pg_dsn: str):
    a = start_node(two_nodes[0], "node-a", pg_dsn, HANG, HANG_COMMAND, allow=["run"], timeout=600)
    b = start_node(two_nodes[1], "node-b", pg_dsn, COUNT, allow=["store"])
    # halfway: A has claimed minutes (its runs hang), B has run others
    first = wait_counts(pg_dsn, lambda c: len(c) >= 1, 60, "no minute ran")
    deadline = time.monotonic() + 60
    while a.log_text().count("schedule: tick.py fires") < 2:
        assert time.monotonic() < deadline, "node A never claimed two minutes"
        time.sleep(0.2)
    wait_counts(pg_dsn, lambda c: max(c) >= max(first) + 5 * 60, 60, "B ran fewer than 5 minutes")
    claimed_by_a = a.log_text().count("schedule: tick.py fires")
    assert claimed_by_a >= 2
    a.kill()
    killed_at = max(counts(pg_dsn))
    # B takes over A's unfinished minutes once their 10 s lease expired; then every minute is there
    through = killed_at + 10 * 60
    try:
        wait_counts(pg_dsn, lambda c: all(m in c for m in range(min(c), through + 60, 60)), 120,
                    "minutes claimed by the killed node were never run")
    except AssertionError:
        print("\n".join(x for x in b.log_text().splitlines() if "fires (" not in x)[-6000:])
        raise
    assert b.log_text().count("was claimed by a node that did not finish it: running it here") >= claimed_by_a
    b.stop()
    assert_each_minute_once(counts(pg_dsn), through)


def test_minutes_due_while_postgresql_is_down_fire_once_when_it_is_back(two_nodes: list[DaemonFactory], pg,
                                                                        pg_dsn: str):
    a = start_node(two_nodes[0], "node-a", pg_dsn, COUNT, allow=["store"])
    b = start_node(two_nodes[1], "node-b", pg_dsn, COUNT, allow=["store"])
    first = wait_counts(pg_dsn, lambda c: len(c) >= 1, 60, "no minute ran")
    before = wait_counts(pg_dsn, lambda c: max(c) >= max(first) + 3 * 60, 60, "fewer than 3 minutes ran")
    pg.stop_server()
    try:
        for d in (a, b):  # both nodes tried to claim a minute and could not
            d.wait_log(r"scheduler: .* the schedule database failed", timeout=60)
    finally:
        pg.start_server()
    through = max(before) + 30 * 60
    c = wait_counts(pg_dsn, lambda c: max(c) >= through, 120, "minutes stopped after the outage")
    a.stop()
    b.stop()
    c = counts(pg_dsn)
    doubled = {m: n for m, n in c.items() if n != 1}
    assert not doubled, f"minutes run more than once: {doubled}"
    # the minutes that came due during the outage ran once it was over (less than 10 minutes
    # late); a run already going when the database went away may have failed in its incr
    missing = [m for m in range(min(c), through + 60, 60) if m not in c]
    assert len(missing) <= 2, f"minutes never run: {missing}"
    assert any(m > max(before) + 60 for m in c)
