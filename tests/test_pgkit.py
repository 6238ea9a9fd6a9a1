"""The throwaway PostgreSQL cluster the account database's tests run on (tests/pgkit.py).

It must be ours alone: not the system's cluster or port, reached as an unprivileged role with a
password over TCP (what a daemon's ``[accounts] database`` DSN does), one clean database per test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import psycopg
import pytest


def test_the_cluster_is_a_throwaway_of_our_own(pg) -> None:
    assert pg.port != 5432
    assert any(pg.root.is_relative_to(p) for p in (Path(tempfile.gettempdir()).resolve(), Path("/tmp")))
    assert (pg.datadir / "PG_VERSION").exists()
    assert Path(pg.psql("SHOW data_directory").strip()) == pg.datadir
    with psycopg.connect(pg.dsn) as con:
        role = con.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    assert role == ("scriptsftp", False)


def test_each_test_database_starts_empty_and_apart(pg, pg_dsn: str) -> None:
    other = pg.new_database()
    try:
        with psycopg.connect(pg_dsn) as con:
            con.execute("CREATE TABLE mine (x int)")
        with psycopg.connect(other) as con:
            tables = con.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert tables == (0,)
    finally:
        pg.drop_database(other)


def test_a_wrong_password_is_refused(pg) -> None:
    wrong = pg.dsn.replace(pg.password, "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)


def test_a_cluster_whose_run_was_killed_is_swept_by_the_next(pg) -> None:
    """pytest killed outright leaves its postmaster running; the next run's fixture stops it
    and removes its dir, and leaves live runs' clusters (this session's) alone."""
    import subprocess
    import sys

    from pgkit import sweep_leftovers

    starter = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, pgkit; c = pgkit.PgCluster.start(); "
                               "print(c.root, flush=True); time.sleep(600)"],
        cwd=Path(__file__).parent, stdout=subprocess.PIPE, text=True)
    try:
        root = Path(starter.stdout.readline().strip())
        postmaster = int((root / "data" / "postmaster.pid").read_text().split()[0])
    finally:
        starter.kill()
        starter.wait()
    assert _running(postmaster)  # nobody stopped it
    assert root in sweep_leftovers()
    assert not root.exists()
    assert not _running(postmaster)
    assert pg.root.exists() and pg.psql("SELECT 1") == "1\n"


def _running(pid: int) -> bool:
    """Alive and not a zombie (a daemonised postmaster is reaped by init, whenever it gets to it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
