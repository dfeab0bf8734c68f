"""Several named targets: different tables to different Turso databases, each delivered independently."""

from __future__ import annotations

import re

import psycopg
import pytest
from conftest import drain, pending, run_worker
from support.cloud_proxy import CloudProxy
from support.turso import TursoServer


@pytest.fixture
def second_turso():
    server = TursoServer().start()
    yield server
    server.cleanup()


def test_tables_go_to_their_own_target_independently(conn, dsn, turso: TursoServer, second_turso: TursoServer):
    with CloudProxy(second_turso.url, "eu-token") as eu:
        conn.execute("SELECT pgturso.add_target('eu', %s, 'eu-token')", (eu.url,))
        conn.execute("CREATE TABLE home (id int PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE abroad (id int PRIMARY KEY, v text)")
        conn.execute("SELECT pgturso.track_table('home')")
        conn.execute("SELECT pgturso.track_table('abroad', target => 'eu')")
        with conn.transaction():  # one source transaction touching both targets
            conn.execute("INSERT INTO home VALUES (1, 'h')")
            conn.execute("INSERT INTO abroad VALUES (1, 'a')")

        drain(dsn, turso.url)  # the default target's worker
        assert turso.query("SELECT id, v FROM home") == [[1, "h"]]
        assert turso.query("SELECT count(*) FROM sqlite_schema WHERE name = 'abroad'") == [[0]]
        assert pending(conn) > 0, "eu's events wait for eu's worker"

        # eu's URL and token come from pgturso.target: no flag, no environment.
        done = run_worker(dsn, "", "--target", "eu")
        assert done.returncode == 0, done.stderr
        assert second_turso.query("SELECT id, v FROM abroad") == [[1, "a"]]
        assert second_turso.query("SELECT count(*) FROM sqlite_schema WHERE name = 'home'") == [[0]]
        assert set(eu.auth_headers) == {"Bearer eu-token"} and "eu-token" not in done.stderr
        assert pending(conn) == 0

        # One target down does not hold back the other.
        second_turso.stop()
        conn.execute("INSERT INTO home VALUES (2, 'h2')")
        conn.execute("INSERT INTO abroad VALUES (2, 'a2')")
        assert run_worker(dsn, "", "--target", "eu", "--retry-limit", "1").returncode == 1
        drain(dsn, turso.url)
        assert turso.query("SELECT id FROM home ORDER BY id") == [[1], [2]]
        rows = conn.execute("SELECT table_name::text, target, pending_rows, worker_status, last_error IS NOT NULL "
                            "FROM pgturso.status ORDER BY 1").fetchall()
        assert rows == [("abroad", "eu", 1, "stopped", True), ("home", "default", 0, "stopped", False)]
        second_turso.start()
        assert run_worker(dsn, "", "--target", "eu").returncode == 0
        assert second_turso.query("SELECT id FROM abroad ORDER BY id") == [[1], [2]]


def test_target_management_errors_and_secrecy(conn, dsn):
    with pytest.raises(psycopg.Error, match="not a Turso URL"):
        conn.execute("SELECT pgturso.add_target('x', 'ftp://nope')")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with pytest.raises(psycopg.Error, match="there is no target nowhere") as missing:
        conn.execute("SELECT pgturso.track_table('t', target => 'nowhere')")
    assert "add_target" in missing.value.diag.message_hint
    conn.execute("SELECT pgturso.add_target('x', 'http://127.0.0.1:1', 'secret-token')")
    conn.execute("SELECT pgturso.track_table('t', target => 'x')")
    with pytest.raises(psycopg.Error, match="still tracked"):
        conn.execute("SELECT pgturso.remove_target('x')")
    with pytest.raises(psycopg.Error, match="cannot be removed"):
        conn.execute("SELECT pgturso.remove_target('default')")
    result = run_worker(dsn, "", "--target", "unknown")
    assert result.returncode == 2 and "no target named 'unknown'" in result.stderr
    conn.execute("DROP ROLE IF EXISTS snoop")
    conn.execute("CREATE ROLE snoop LOGIN")
    conn.execute("GRANT USAGE ON SCHEMA pgturso TO snoop")
    try:
        with psycopg.connect(re.sub(r"user=\S+", "user=snoop", dsn), autocommit=True) as snoop:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                snoop.execute("SELECT auth_token FROM pgturso.target")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                snoop.execute("SELECT pgturso.add_target('y', 'http://x')")
    finally:
        conn.execute("DROP OWNED BY snoop")
        conn.execute("DROP ROLE snoop")
    conn.execute("SELECT pgturso.untrack_table('t')")
    conn.execute("SELECT pgturso.remove_target('x')")
    assert conn.execute("SELECT count(*) FROM pgturso.target").fetchone() == (1,)
