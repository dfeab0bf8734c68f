"""pg_dump / pg_restore of a database that uses pgturso restores a working replication."""

from __future__ import annotations

import re
import subprocess

import psycopg
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
    # The only errors: the publications for capture => 'wal', which CREATE EXTENSION made already (a
    # publication cannot be an extension member, so pg_dump dumps them too). Known; see README "Backups".
    errors = re.findall(r"ERROR:  (.*)", result.stderr)
    assert errors == ['publication "pgturso_outbox" already exists',
                      'publication "pgturso_tables" already exists'], result.stderr

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
