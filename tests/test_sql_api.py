"""The SQL API: track_table/untrack_table errors, privileges, and settings read from the server."""

from __future__ import annotations

import re

import psycopg
import pytest
from conftest import REPO, drain, pending, run_worker
from pgturso.capture.sql import CAPTURE_SETTINGS, SESSION_SETTINGS
from support.turso import TursoServer


def test_create_extension_cascade_installs_plpython(pg_cluster):
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS fresh")
        admin.execute("CREATE DATABASE fresh")
    try:
        with psycopg.connect(pg_cluster.dsn("fresh"), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pgturso CASCADE")
            names = {r[0] for r in conn.execute("SELECT extname FROM pg_extension").fetchall()}
            assert {"pgturso", "plpython3u"} <= names
    finally:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
            admin.execute("DROP DATABASE fresh")


def test_outbox_payloads_are_compressed_with_lz4_where_the_server_has_it(conn):
    # pglz cost writers of large statements and the initial copy about a fifth of their CPU (BENCHMARKS.md).
    try:
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE lz4_probe (t text COMPRESSION lz4)")
        server_has_lz4 = True
    except psycopg.errors.FeatureNotSupported:
        server_has_lz4 = False
    method = conn.execute("SELECT attcompression FROM pg_attribute "
                          "WHERE attrelid = 'pgturso.outbox'::regclass AND attname = 'payload'").fetchone()[0]
    assert method == ("l" if server_has_lz4 else "")


@pytest.mark.parametrize(
    ("setup", "target", "message", "hint"),
    [
        ("CREATE VIEW v AS SELECT 1 AS x", "v", "is not a table", "ordinary table"),
        ("CREATE SEQUENCE s", "s", "is not a table", "ordinary table"),
        ("CREATE TABLE nokey (x int)", "nokey", "has no primary key", "ADD PRIMARY KEY"),
    ],
)
def test_track_table_refuses_what_it_cannot_track(conn, setup, target, message, hint):
    conn.execute(setup)
    with pytest.raises(psycopg.Error) as failure:
        conn.execute("SELECT pgturso.track_table(%s)", (target,))
    assert message in failure.value.diag.message_primary
    assert hint in (failure.value.diag.message_hint or "")


def test_tracking_twice_and_untracking_an_untracked_table_are_errors(conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    with pytest.raises(psycopg.Error, match="already tracked") as twice:
        conn.execute("SELECT pgturso.track_table('t')")
    assert "untrack_table" in twice.value.diag.message_hint
    conn.execute("SELECT pgturso.untrack_table('t')")
    with pytest.raises(psycopg.Error, match="is not tracked"):
        conn.execute("SELECT pgturso.untrack_table('t')")


def test_untrack_removes_capture_and_pending_changes(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("SELECT pgturso.track_table('other')")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute("INSERT INTO other VALUES (1)")
    conn.execute("SELECT pgturso.untrack_table('t')")
    conn.execute("INSERT INTO t VALUES (2)")
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass").fetchone() == (0,)
    drain(dsn, turso.url)
    assert turso.query("SELECT id FROM other") == [[1]]
    assert turso.query("SELECT name FROM sqlite_schema WHERE name = 't'") == []
    assert pending(conn) == 0


def test_odd_identifiers_and_schemas(conn, dsn, turso: TursoServer):
    conn.execute('CREATE SCHEMA "My Schema"')
    conn.execute('CREATE TABLE "My Schema"."Order Items ""q""" ("select" int PRIMARY KEY, "naïve col" text, "a.b" int)')
    conn.execute('INSERT INTO "My Schema"."Order Items ""q""" VALUES (1, \'x\', 2)')
    conn.execute("SELECT pgturso.track_table(%s)", ['"My Schema"."Order Items ""q"""'])
    conn.execute('CREATE TABLE "group" (id int PRIMARY KEY)')
    conn.execute("SELECT pgturso.track_table('\"group\"', target_table => 'renamed')")
    conn.execute('INSERT INTO "group" VALUES (5)')
    drain(dsn, turso.url)
    assert turso.query('SELECT "select", "naïve col", "a.b" FROM "My Schema.Order Items ""q"""') == [[1, "x", 2]]
    assert turso.query("SELECT id FROM renamed") == [[5]]


def test_application_role_writes_through_capture_but_cannot_touch_pgturso(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("DROP ROLE IF EXISTS app")
    conn.execute("CREATE ROLE app LOGIN")
    conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON t TO app")
    app_dsn = re.sub(r"user=\S+", "user=app", dsn)
    try:
        with psycopg.connect(app_dsn, autocommit=True) as app:
            app.execute("INSERT INTO t VALUES (1, 'from app')")
            app.execute("UPDATE t SET v = 'updated by app' WHERE id = 1")
            for forbidden in (
                "SELECT count(*) FROM pgturso.outbox",
                "INSERT INTO pgturso.outbox (layout_id, op, nrows) VALUES (1, 'T', 0)",
                "SELECT pgturso.track_table('t')",
                "SELECT * FROM pgturso.instance",
                "SELECT * FROM pgturso.status",
                "SELECT pgturso.skip_transaction('1', 'x')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    app.execute(forbidden)
        drain(dsn, turso.url)
        assert turso.query("SELECT id, v FROM t") == [[1, "updated by app"]]
    finally:
        conn.execute("DROP OWNED BY app")
        conn.execute("DROP ROLE app")


def test_settings_come_from_the_server_and_the_environment_overrides_them(conn, dsn, turso: TursoServer, tmp_path):
    dbname = conn.info.dbname
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute(f"ALTER DATABASE {dbname} SET pgturso.url = '{turso.url}'")
    conn.execute(f"ALTER DATABASE {dbname} SET pgturso.batch_rows = 'many'")
    try:
        import subprocess
        import sys

        bad = subprocess.run([sys.executable, "-m", "pgturso", "run", "--once", "--dsn", dsn],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "batch_rows" in bad.stderr and "postgresql.conf" in bad.stderr
        conn.execute(f"ALTER DATABASE {dbname} SET pgturso.batch_rows = '100'")
        # --url below is overridden by nothing; the environment beats postgresql.conf:
        elsewhere = run_worker(dsn, turso.url, env={"PGTURSO_BATCH_ROWS": "oops"})
        assert elsewhere.returncode == 2 and "PGTURSO_BATCH_ROWS" in elsewhere.stderr
        ok = subprocess.run([sys.executable, "-m", "pgturso", "run", "--once", "--dsn", dsn],
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert turso.query("SELECT id FROM t") == [[1]]
    finally:
        conn.execute(f"ALTER DATABASE {dbname} RESET ALL")


def _built_script() -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("build", REPO / "extension/build.py")
    assert spec and spec.loader
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.build(sorted(str(p) for p in (REPO / "extension/sql").glob("*.sql")), "/nowhere")


def test_track_table_pins_the_same_settings_as_the_capture_functions():
    sql = _built_script()
    start = sql.index("CREATE OR REPLACE FUNCTION pgturso.track_table")
    header = sql[start : sql.index("AS $$", start)]
    for setting in CAPTURE_SETTINGS:
        assert setting in header
    assert not re.search(r"@[A-Z_]+@", sql), "every placeholder is substituted"


def test_every_function_pins_search_path_and_standard_conforming_strings():
    sql = _built_script()
    functions = list(re.finditer(r"CREATE (?:OR REPLACE )?FUNCTION [^(]+\(", sql))
    assert len(functions) > 30, "the pattern still finds the extension's functions"
    for match in functions:
        body_start = sql.index("AS $", match.end())
        for setting in SESSION_SETTINGS:
            assert setting in sql[match.end():body_start], (match.group(), setting)


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_wait_for_sync_gives_read_your_writes(conn, dsn, turso: TursoServer):
    from support.workers import WorkerProcess

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("DROP ROLE IF EXISTS reader_app")
    conn.execute("CREATE ROLE reader_app LOGIN")
    conn.execute("GRANT INSERT ON t TO reader_app")
    conn.execute("GRANT USAGE ON SCHEMA pgturso TO reader_app")
    conn.execute("INSERT INTO t VALUES (1, 'no worker yet')")
    assert conn.execute("SELECT pgturso.wait_for_sync('200 milliseconds')").fetchone() == (False,)
    worker = WorkerProcess(dsn, turso.url, "--idle-wait", "30").start()
    app_dsn = re.sub(r"user=\S+", "user=reader_app", dsn)
    try:
        with psycopg.connect(app_dsn, autocommit=True) as app:
            for i in range(2, 12):
                app.execute("INSERT INTO t VALUES (%s, 'write')", (i,))
                assert app.execute("SELECT pgturso.wait_for_sync('20 seconds')").fetchone() == (True,)
                assert turso.query(f"SELECT v FROM t WHERE id = {i}") == [["write"]]  # read your write
            with app.transaction():
                app.execute("INSERT INTO t VALUES (99, 'uncommitted')")
                with pytest.raises(psycopg.Error, match="own writes") as own:
                    app.execute("SELECT pgturso.wait_for_sync()")
                assert "after committing" in own.value.diag.message_hint
                raise psycopg.Rollback
    finally:
        worker.stop()
        conn.execute("DROP OWNED BY reader_app")
        conn.execute("DROP ROLE reader_app")


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_sync_delivers_from_inside_postgres_with_the_worker_code(conn, dsn, turso: TursoServer):
    from support.workers import WorkerProcess, wait_until

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g")
    info = conn.info
    own = f"host={info.host} port={info.port} user={info.user} dbname={info.dbname}"
    delivered = conn.execute("SELECT pgturso.sync(url => %s)", (turso.url,)).fetchone()[0]  # over the socket
    assert delivered >= 2
    assert turso.query("SELECT count(*) FROM t") == [[100]]
    assert pending(conn) == 0
    conn.execute(f"ALTER DATABASE {info.dbname} SET pgturso.url = '{turso.url}'")
    try:
        conn.execute("UPDATE t SET v = 'from sync' WHERE id = 1")
        with psycopg.connect(dsn, autocommit=True) as fresh:  # picks up the database's pgturso.url
            assert fresh.execute("SELECT pgturso.sync(dsn => %s)", (own,)).fetchone()[0] == 1
        assert turso.query("SELECT v FROM t WHERE id = 1") == [["from sync"]]
        # While a worker is delivering, a pass does nothing (the advisory lock decides who delivers). Wait for
        # the worker to hold that lock, not for a time: a loaded machine may take seconds to get it there.
        worker = WorkerProcess(dsn, turso.url, "--idle-wait", "1").start()
        try:
            wait_until(lambda: conn.execute(
                "SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = 'pgturso-worker')"
            ).fetchone()[0], 60, "the worker to hold the delivery lock")
            notices: list[str] = []
            with psycopg.connect(dsn, autocommit=True) as fresh:
                fresh.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
                fresh.execute("SET client_min_messages = notice")
                assert fresh.execute("SELECT pgturso.sync(dsn => %s)", (own,)).fetchone()[0] == 0
            assert "pgturso: another worker is delivering; this pass did nothing" in notices, notices
        finally:
            worker.stop()
    finally:
        conn.execute(f"ALTER DATABASE {info.dbname} RESET ALL")
