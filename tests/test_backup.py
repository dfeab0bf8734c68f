"""pg_dump / pg_restore of a database that uses pgturso restores a working replication."""

from __future__ import annotations

import re
import subprocess

import psycopg
import pytest
from conftest import drain, pending
from support.pgcluster import PG_BIN
from support.turso import TursoServer

ROWS = "SELECT id, v FROM t ORDER BY id"


def test_dump_and_restore_keeps_what_is_tracked_and_every_undelivered_change(pg_cluster, conn, dsn, turso:
                                                                             TursoServer, tmp_path):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g")
    drain(dsn, turso.url)
    # Undelivered at the time of the dump: an update, a delete, an insert and a schema change.
    conn.execute("UPDATE t SET v = 'changed' WHERE id <= 10")
    conn.execute("DELETE FROM t WHERE id > 45")
    conn.execute("INSERT INTO t VALUES (100, 'new')")
    conn.execute("ALTER TABLE t ADD COLUMN w int DEFAULT 7")
    waiting = pending(conn)
    assert waiting > 0
    last_id = conn.execute("SELECT max(id) FROM pgturso.outbox").fetchone()[0]  # type: ignore[index]

    dump = tmp_path / "app.dump"
    subprocess.run([str(PG_BIN / "pg_dump"), "-Fc", "-f", str(dump), "-d", dsn], check=True, capture_output=True)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS restored")
        admin.execute("CREATE DATABASE restored")
    restored_dsn = pg_cluster.dsn("restored")
    result = subprocess.run([str(PG_BIN / "pg_restore"), "-d", restored_dsn, str(dump)], capture_output=True,
                            text=True)
    # No error: the dump's publications for capture => 'wal' replace the unused ones CREATE EXTENSION made.
    assert re.findall(r"ERROR:  (.*)", result.stderr) == [], result.stderr
    assert result.returncode == 0, result.stderr

    with psycopg.connect(restored_dsn, autocommit=True) as restored:
        assert pending(restored) == waiting
        assert restored.execute("SELECT relid::text, target FROM pgturso.tracked_table").fetchall() == [
            ("t", "default")]
        source_ids = {c.execute("SELECT source_id FROM pgturso.instance").fetchone() for c in (conn, restored)}
        assert len(source_ids) == 2  # a restored database is a new source on Turso

        drain(restored_dsn, turso.url)
        assert pending(restored) == 0
        assert turso.query("SELECT id, v, w FROM t ORDER BY id") == [
            list(r) for r in restored.execute("SELECT id, v, w FROM t ORDER BY id").fetchall()]

        # Changes keep flowing, after (never before) the restored ones: the outbox's ids carry on.
        restored.execute("INSERT INTO t VALUES (200, 'after restore', 1)")
        first_new = restored.execute("SELECT min(id) FROM pgturso.outbox").fetchone()[0]  # type: ignore[index]
        assert first_new > last_id
        drain(restored_dsn, turso.url)
        assert turso.query("SELECT v, w FROM t WHERE id = 200") == [["after restore", 1]]
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE restored")


PUBLICATIONS = """
    SELECT p.pubname, p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate, p.pubviaroot,
           array_agg(r.prrelid::regclass::text || coalesce(' WHERE ' || pg_get_expr(r.prqual, r.prrelid), '')
                     ORDER BY r.prrelid::regclass::text) FILTER (WHERE r.prrelid IS NOT NULL)
    FROM pg_publication p LEFT JOIN pg_publication_rel r ON r.prpubid = p.oid
    GROUP BY p.oid ORDER BY p.pubname
"""


def publications(conn: psycopg.Connection) -> list[tuple]:
    """pgturso's publications; a row filter's is named by its table's oid, which a restore changes."""
    return [(re.sub(r"_\d+$", "_<oid>", p[0]), *p[1:]) for p in conn.execute(PUBLICATIONS).fetchall()]


def test_restore_of_a_database_with_wal_tables_stops_at_no_error(pg_cluster, conn, dsn, tmp_path):
    """pg_restore --exit-on-error --single-transaction: the publications of capture => 'wal' come back as they
    were (the outbox in its publication, each wal table with its row filter) without an "already exists"."""
    conn.execute("SELECT pgturso.add_target('w', 'file:/dev/null')")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, status text)")
    conn.execute("CREATE TABLE u (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t', target => 'w', capture => 'wal', row_filter => 'id > 1')")
    conn.execute("SELECT pgturso.track_table('u', target => 'w')")
    original = publications(conn)
    assert [p[0] for p in original] == ["pgturso_outbox", "pgturso_row_filter_<oid>", "pgturso_tables"]
    assert original[0][-1] == ["pgturso.outbox"] and original[2][-1] == ["t WHERE (id > 1)", "u"]
    dump = tmp_path / "app.dump"
    subprocess.run([str(PG_BIN / "pg_dump"), "-Fc", "-f", str(dump), "-d", dsn], check=True,
                   capture_output=True)
    conn.execute("SELECT pgturso._drop_slot('w')")  # the test's database must be droppable
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS restored_wal")
        admin.execute("CREATE DATABASE restored_wal")
    try:
        result = subprocess.run([str(PG_BIN / "pg_restore"), "--exit-on-error", "--single-transaction", "-d",
                                 pg_cluster.dsn("restored_wal"), str(dump)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        with psycopg.connect(pg_cluster.dsn("restored_wal"), autocommit=True) as restored:
            assert publications(restored) == original
            # A CREATE PUBLICATION of pgturso's name while it is in use fails as it would without pgturso.
            with pytest.raises(psycopg.errors.DuplicateObject):
                restored.execute("CREATE PUBLICATION pgturso_tables")
    finally:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
            admin.execute("DROP DATABASE restored_wal")
