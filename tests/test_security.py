"""The attacks of issue 16, as a hostile database user would make them, against the real cluster.

Each test creates the roles it needs (a role with USAGE on pgturso, a table owner, an INSERT-only writer, a
database owner), performs the attack, shows that it fails, and that the legitimate use still works.
docs/security.md describes the privilege model these tests hold the extension to.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from conftest import drain, pending, run_worker
from support.turso import TursoServer


@contextmanager
def login_role(conn: psycopg.Connection[Any], dsn: str, name: str, options: str = "") -> Iterator[str]:
    """A LOGIN role for the length of the test; yields its DSN (same database)."""
    conn.execute(f"DROP ROLE IF EXISTS {name}")
    conn.execute(f"CREATE ROLE {name} LOGIN {options}")
    try:
        yield re.sub(r"user=\S+", f"user={name}", dsn)
    finally:
        conn.execute(f"DROP OWNED BY {name} CASCADE")
        conn.execute(f"DROP ROLE {name}")


def is_superuser(conn: psycopg.Connection[Any], role: str) -> bool:
    row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return bool(row and row[0])


# Run by the attacker's casts, domain checks and triggers: records who ran it, and if that role is a
# superuser, makes the attacker one.
ESCALATE = """
CREATE TABLE calls (who text, how text);
GRANT INSERT ON calls TO PUBLIC;
CREATE FUNCTION escalate(how text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF current_user <> '{attacker}' THEN
        INSERT INTO public.calls VALUES (current_user, how);
    END IF;
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE 'ALTER ROLE {attacker} SUPERUSER';
    END IF;
END
$$;
"""


def calls(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return [tuple(r) for r in conn.execute("SELECT who, how FROM calls ORDER BY 1, 2").fetchall()]


def test_usage_on_pgturso_cannot_forge_deletes_through_the_partition_truncate_trigger(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE m (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (100)")
    conn.execute("CREATE TABLE m2 PARTITION OF m FOR VALUES FROM (100) TO (200)")
    conn.execute("INSERT INTO m SELECT g, 'v' FROM generate_series(1, 150) AS g")
    conn.execute("SELECT pgturso.track_table('m')")
    (table_id,) = conn.execute("SELECT id FROM pgturso.tracked_table WHERE relid = 'm'::regclass").fetchone()
    drain(dsn, turso.url)
    attach = ("CREATE TRIGGER pgturso_capture_truncate BEFORE TRUNCATE ON forged FOR EACH STATEMENT "
              f"EXECUTE FUNCTION pgturso._capture_partition_truncate('{table_id}')")
    with login_role(conn, dsn, "mallory") as mallory_dsn:
        conn.execute("GRANT USAGE ON SCHEMA pgturso TO mallory")  # what the README grants for wait_for_sync
        with psycopg.connect(mallory_dsn, autocommit=True) as mallory:
            mallory.execute("CREATE TEMP TABLE forged (id int, v text)")
            mallory.execute("INSERT INTO forged SELECT g, 'x' FROM generate_series(1, 150) AS g")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                mallory.execute(attach)
            # What USAGE is granted for still works.
            assert mallory.execute("SELECT pgturso.wait_for_sync('5 seconds')").fetchone() == (True,)
            # No private function is executable by PUBLIC (SECURITY DEFINER or not).
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                mallory.execute("SELECT pgturso._plan_rows(1, '{}', 'm', 'D')")
        # Even with EXECUTE (an operator's mistake), the function checks what fires it.
        conn.execute("GRANT EXECUTE ON FUNCTION pgturso._capture_partition_truncate() TO mallory")
        with psycopg.connect(mallory_dsn, autocommit=True) as mallory:
            mallory.execute("CREATE TEMP TABLE forged (id int, v text)")
            mallory.execute("INSERT INTO forged SELECT g, 'x' FROM generate_series(1, 150) AS g")
            mallory.execute(attach)
            with pytest.raises(psycopg.errors.RaiseException, match="not a partition of the tracked table"):
                mallory.execute("TRUNCATE forged")
        # Nor does a trigger attached to the partitioned table itself, or naming another table id.
        conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
        conn.execute("CREATE TRIGGER pgturso_capture_truncate BEFORE TRUNCATE ON other FOR EACH STATEMENT "
                     f"EXECUTE FUNCTION pgturso._capture_partition_truncate('{table_id}')")
        with pytest.raises(psycopg.errors.RaiseException, match="not a partition"):
            conn.execute("TRUNCATE other")
    assert pending(conn) == 0
    drain(dsn, turso.url)
    assert turso.query("SELECT count(*) FROM m") == [[150]]
    # The legitimate use: truncating a partition deletes its rows on Turso.
    conn.execute("TRUNCATE m1")
    drain(dsn, turso.url)
    assert turso.query("SELECT count(*), min(id) FROM m") == [[51, 100]]


def test_no_private_function_is_executable_by_public_and_every_security_definer_pins_search_path(conn):
    public = conn.execute("""
        SELECT p.oid::regprocedure::text FROM pg_proc p
        WHERE p.pronamespace = 'pgturso'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE')
        ORDER BY 1""").fetchall()
    assert [r[0] for r in public] == ["pgturso.wait_for_sync(interval)"]
    unpinned = conn.execute("""
        SELECT p.oid::regprocedure::text FROM pg_proc p
        WHERE p.pronamespace = 'pgturso'::regnamespace
          AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig)
                           AND 'standard_conforming_strings=on' = ANY (p.proconfig), false)""").fetchall()
    assert unpinned == [], "every function, generated ones too, pins search_path and standard_conforming_strings"


# The table owner's casts: every way a value of their types could be turned into text or JSON.
OWNER_TYPES = """
CREATE TYPE mood AS ENUM ('a', 'b');
CREATE FUNCTION mood_json(mood) RETURNS json LANGUAGE plpgsql AS
    $$ BEGIN PERFORM public.escalate('cast mood to json'); RETURN '"EVIL"'; END $$;
CREATE FUNCTION mood_text(mood) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM public.escalate('cast mood to text'); RETURN 'EVIL'; END $$;
CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood);
CREATE CAST (mood AS text) WITH FUNCTION mood_text(mood);
CREATE TYPE pair AS (n integer, m mood);
CREATE FUNCTION pair_text(pair) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM public.escalate('cast pair to text'); RETURN 'EVIL'; END $$;
CREATE CAST (pair AS text) WITH FUNCTION pair_text(pair);
CREATE DOMAIN nice_mood AS mood;
-- A type named like a built-in one: pgturso must not take it for int4.
CREATE TYPE public.int4 AS ENUM ('x', 'y');
CREATE FUNCTION fake_int_text(public.int4) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM public.escalate('cast fake int4 to text'); RETURN 'EVIL'; END $$;
CREATE FUNCTION fake_int_json(public.int4) RETURNS json LANGUAGE plpgsql AS
    $$ BEGIN PERFORM public.escalate('cast fake int4 to json'); RETURN '1'; END $$;
CREATE CAST (public.int4 AS text) WITH FUNCTION fake_int_text(public.int4);
CREATE CAST (public.int4 AS json) WITH FUNCTION fake_int_json(public.int4);
"""
EVIL_COLUMNS = "e mood, es mood[], r pair, rs pair[], d nice_mood, fake public.int4"
EVIL_VALUES = "'b', '{a,b}', ROW(1, 'a'), ARRAY[ROW(2, 'b')::pair], 'a', 'y'"
EVIL_ON_TURSO = ["b", '["a","b"]', "(1,a)", '["(2,b)"]', "a", "y"]


def test_table_owner_cannot_run_code_as_the_extension_owner_through_capture_or_copies(conn, dsn,
                                                                                        turso: TursoServer):
    with login_role(conn, dsn, "tabowner") as owner_dsn:
        conn.execute("GRANT CREATE ON SCHEMA public TO tabowner")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute(ESCALATE.format(attacker="tabowner"))
            owner.execute(OWNER_TYPES)
            # Copied by track_table (the operator's rights) and by the worker (resync_table).
            owner.execute(f"CREATE TABLE copied (id int PRIMARY KEY, {EVIL_COLUMNS})")
            owner.execute(f"INSERT INTO copied VALUES (1, {EVIL_VALUES})")
            # Tracked while harmless, then given the owner's types: the DDL event trigger (SECURITY
            # DEFINER) regenerates its capture function (SECURITY DEFINER).
            owner.execute("CREATE TABLE later (id int PRIMARY KEY, v text)")
            owner.execute("CREATE TABLE parts (id int PRIMARY KEY, e mood) PARTITION BY RANGE (id)")
            owner.execute("CREATE TABLE parts1 PARTITION OF parts FOR VALUES FROM (0) TO (10)")
        for table in ("copied", "later", "parts"):
            conn.execute(f"SELECT pgturso.track_table('{table}')")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            added = EVIL_COLUMNS.replace(", ", ", ADD COLUMN ")
            owner.execute(f"ALTER TABLE later ADD COLUMN v2 text, ADD COLUMN {added}")
            owner.execute(f"INSERT INTO later VALUES (1, 'v', 'v2', {EVIL_VALUES})")
            owner.execute("UPDATE later SET e = 'b' WHERE id = 1")
            owner.execute(f"INSERT INTO copied VALUES (2, {EVIL_VALUES})")
            owner.execute("UPDATE copied SET e = 'b', id = 3 WHERE id = 2")  # a key change: moved-key deletes
            owner.execute("DELETE FROM copied WHERE id = 3")
            # A partition attached with rows: copied by the event trigger (_plan_rows).
            owner.execute("CREATE TABLE parts2 (id int PRIMARY KEY, e mood)")
            owner.execute("INSERT INTO parts2 VALUES (15, 'a')")
            owner.execute("ALTER TABLE parts ATTACH PARTITION parts2 FOR VALUES FROM (10) TO (20)")
            owner.execute("INSERT INTO parts VALUES (1, 'b')")
        conn.execute("SELECT pgturso.resync_table('copied')")
        drain(dsn, turso.url)
        assert not is_superuser(conn, "tabowner")
        assert calls(conn) == []
        columns = "e, es, r, rs, d, fake"
        assert turso.query(f"SELECT id, {columns} FROM copied") == [[1, *EVIL_ON_TURSO]]
        assert turso.query(f"SELECT id, {columns} FROM later") == [[1, *EVIL_ON_TURSO]]
        assert turso.query("SELECT id, e FROM parts ORDER BY id") == [[1, "b"], [15, "a"]]


def test_worker_copying_a_table_runs_no_code_its_owner_chose(conn, dsn, turso: TursoServer):
    with login_role(conn, dsn, "keyowner") as owner_dsn:
        conn.execute("GRANT CREATE ON SCHEMA public TO keyowner")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute(ESCALATE.format(attacker="keyowner"))
            owner.execute("""
                CREATE FUNCTION key_ok(integer) RETURNS boolean LANGUAGE plpgsql AS
                    $$ BEGIN PERFORM public.escalate('domain check'); RETURN true; END $$;
                CREATE DOMAIN checked_key AS integer CHECK (key_ok(VALUE));
                CREATE TABLE checked (id checked_key PRIMARY KEY, v text);
                INSERT INTO checked SELECT g, 'v' || g FROM generate_series(1, 30) AS g;
                CREATE TYPE label AS ENUM ('l01', 'l02', 'l03', 'l04', 'l05', 'l06', 'l07', 'l08', 'l09', 'l10',
                                           'l11', 'l12', 'l13', 'l14', 'l15', 'l16', 'l17', 'l18', 'l19', 'l20');
                CREATE FUNCTION label_from_text(text) RETURNS label LANGUAGE plpgsql AS $$
                BEGIN
                    PERFORM public.escalate('cast text to label');
                    RETURN (SELECT l FROM unnest(enum_range(NULL::label)) AS l WHERE format('%s', l) = $1);
                END $$;
                CREATE FUNCTION label_text(label) RETURNS text LANGUAGE plpgsql AS
                    $$ BEGIN PERFORM public.escalate('cast label to text'); RETURN format('%s', $1); END $$;
                CREATE CAST (text AS label) WITH FUNCTION label_from_text(text);
                CREATE CAST (label AS text) WITH FUNCTION label_text(label);
                CREATE TABLE labelled (l label PRIMARY KEY, v text);
                INSERT INTO labelled SELECT l, 'v' FROM unnest(enum_range(NULL::label)) AS l;
            """)
        for table in ("checked", "labelled"):
            conn.execute(f"SELECT pgturso.track_table('{table}')")
            conn.execute(f"SELECT pgturso.resync_table('{table}')")  # the worker copies it in chunks
        result = run_worker(dsn, turso.url, env={"PGTURSO_COPY_CHUNK_ROWS": "7"})
        assert result.returncode == 0, result.stderr
        assert not is_superuser(conn, "keyowner")
        assert calls(conn) == []
        assert turso.query("SELECT count(*), min(id), max(id) FROM checked") == [[30, 1, 30]]
        assert turso.query("SELECT count(*), min(l), max(l) FROM labelled") == [[20, "l01", "l20"]]
        # verify reads keys back too: with the same care, and it finds both tables equal.
        verify = run_worker(dsn, turso.url)  # nothing left to deliver
        assert verify.returncode == 0
        import subprocess
        import sys
        checked = subprocess.run([sys.executable, "-m", "pgturso", "verify", "--dsn", dsn, "--url", turso.url],
                                 capture_output=True, text=True, timeout=120)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert calls(conn) == []


def test_extension_refuses_a_pgturso_schema_that_another_role_owns(conn, dsn, pg_cluster):
    database = f"{conn.info.dbname}_planted"
    with login_role(conn, dsn, "dbowner") as owner_dsn:
        conn.execute(f"CREATE DATABASE {database} OWNER dbowner")
        try:
            with psycopg.connect(owner_dsn.replace(f"dbname={conn.info.dbname}", f"dbname={database}"),
                                 autocommit=True) as owner:
                owner.execute("CREATE SCHEMA pgturso")
                owner.execute("""
                    CREATE FUNCTION pgturso._turso_name(rel regclass) RETURNS text LANGUAGE plpgsql AS $$
                    BEGIN EXECUTE 'ALTER ROLE dbowner SUPERUSER'; RETURN 'hijacked'; END $$""")
            with psycopg.connect(pg_cluster.dsn(database), autocommit=True) as admin:
                with pytest.raises(psycopg.errors.RaiseException, match="owned by dbowner") as refused:
                    admin.execute("CREATE EXTENSION pgturso CASCADE")
                assert "Drop that schema" in (refused.value.diag.message_hint or "")
                assert admin.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pgturso'").fetchone() == (0,)
                # The legitimate install: into the schema the extension creates.
                admin.execute("DROP SCHEMA pgturso CASCADE")
                admin.execute("CREATE EXTENSION pgturso CASCADE")
                # Helpers are called with exactly their declared argument types: an overload a superuser
                # might add by mistake is not picked up.
                admin.execute("""
                    CREATE FUNCTION pgturso._turso_name(rel regclass) RETURNS text LANGUAGE sql AS
                    $$ SELECT 'hijacked' $$""")
                admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
                admin.execute("SELECT pgturso.track_table('t')")
                assert admin.execute("SELECT target_table FROM pgturso.tracked_table").fetchone() == ("t",)
            assert not is_superuser(conn, "dbowner")
        finally:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def test_insert_only_role_cannot_stop_delivery_with_values_turso_json_refuses(conn, dsn, turso: TursoServer):
    conn.execute("""
        CREATE TABLE docs (id int PRIMARY KEY, jbs jsonb[], js json[], j json, jb jsonb, nums numeric[],
                           fl float8[], big text)""")
    conn.execute("SELECT pgturso.track_table('docs')")
    deep = "[" * 1200 + "]" * 1200
    with login_role(conn, dsn, "writer") as writer_dsn:
        conn.execute("GRANT INSERT ON docs TO writer")
        with psycopg.connect(writer_dsn, autocommit=True) as writer:
            # Deeper than SQLite's JSON nesting limit, inside an array (embedded as raw JSON by 0.1.0).
            writer.execute("INSERT INTO docs (id, jbs, jb) VALUES (1, ARRAY[%s::jsonb], %s::jsonb)", (deep, deep))
            # json keeps NUL and lone-surrogate escapes as written; numbers beyond any double; NaN/Infinity.
            writer.execute("""
                INSERT INTO docs (id, js, j, nums, fl, jbs) VALUES
                (2, ARRAY['"\\u0000"', '"\\ud800"', '{"n": 1e999999}']::json[], '["\\udc00", "\\u0000"]',
                 ARRAY['1e100000', 'NaN', 'Infinity']::numeric[], ARRAY['NaN', 'Infinity', '-Infinity']::float8[],
                 ARRAY['{"n": 1e400}']::jsonb[])""")
            # Size: a 16 MiB element of an array.
            writer.execute("INSERT INTO docs (id, jbs, big) VALUES (3, ARRAY[to_jsonb(repeat('x', 16 << 20))], "
                           "repeat('y', 16 << 20))")
        drain(dsn, turso.url)
        expected = conn.execute("""
            SELECT id, to_json(jbs)::text, to_json(js)::text, j::text, jb::text, to_json(nums)::text,
                   to_json(fl)::text, big FROM docs ORDER BY id""").fetchall()
        assert turso.query("SELECT id, jbs, js, j, jb, nums, fl, big FROM docs ORDER BY id") == [
            list(r) for r in expected]
        assert pending(conn) == 0


def test_pgturso_names_on_turso_are_reserved(conn, dsn, turso: TursoServer):
    with login_role(conn, dsn, "renamer") as owner_dsn:
        conn.execute("GRANT CREATE ON SCHEMA public TO renamer")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            owner.execute("CREATE TABLE u (id int PRIMARY KEY)")
        for name in ("_pgturso_progress", "_PGTurso_Progress", "_pgturso_rebuild_t", "sqlite_master"):
            with pytest.raises(psycopg.errors.Error, match="reserved"):
                conn.execute("SELECT pgturso.track_table('u', target_table => %s)", (name,))
        conn.execute("SELECT pgturso.track_table('t')")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute("INSERT INTO t VALUES (1, 'a')")
            with pytest.raises(psycopg.errors.Error, match="reserved"):
                owner.execute("ALTER TABLE t RENAME TO _pgturso_progress")
            with pytest.raises(psycopg.errors.Error, match="reserved"):
                owner.execute("CREATE INDEX _pgturso_progress ON t (v)")
            owner.execute("ALTER TABLE t RENAME TO t2")  # any other name is fine
            owner.execute("INSERT INTO t2 VALUES (2, 'b')")
        drain(dsn, turso.url)
        assert turso.query("SELECT id, v FROM t2 ORDER BY id") == [[1, "a"], [2, "b"]]
        assert pending(conn) == 0


def test_drop_extension_leaves_the_tables_working_and_nothing_of_pgturso(conn, dsn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100)")
    conn.execute("CREATE MATERIALIZED VIEW mv AS SELECT id, v FROM t")
    conn.execute("CREATE UNIQUE INDEX ON mv (id)")
    for table in ("t", "p", "mv"):
        conn.execute(f"SELECT pgturso.track_table('{table}')")
    conn.execute("DROP EXTENSION pgturso")  # no CASCADE
    with login_role(conn, dsn, "app") as app_dsn:
        conn.execute("GRANT ALL ON t, p, p1 TO app")
        with psycopg.connect(app_dsn, autocommit=True) as app:
            app.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
            app.execute("UPDATE t SET v = 'c' WHERE id = 1")
            app.execute("DELETE FROM t WHERE id = 2")
            app.execute("INSERT INTO p VALUES (1, 'a')")
            app.execute("TRUNCATE p1")
            app.execute("TRUNCATE t")
        conn.execute("ALTER TABLE t ADD COLUMN w text")
        conn.execute("REFRESH MATERIALIZED VIEW mv")
        conn.execute("DROP TABLE p")
    left = conn.execute("""
        SELECT 'function ' || p.oid::regprocedure FROM pg_proc p WHERE p.pronamespace = 'pgturso'::regnamespace
        UNION ALL SELECT 'relation ' || c.oid::regclass FROM pg_class c WHERE c.relnamespace = 'pgturso'::regnamespace
        UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgname LIKE 'pgturso%'
        UNION ALL SELECT 'event trigger ' || evtname FROM pg_event_trigger""").fetchall()
    assert left == []
    # And it can be installed again.
    conn.execute("CREATE EXTENSION pgturso")
    conn.execute("SELECT pgturso.track_table('t')")


def test_a_failing_add_target_never_logs_the_token(conn, dsn, pg_cluster):
    token = f"token-{uuid.uuid4().hex}"
    secret_url = f"libsql://user:{token}@db.example.turso.io"
    for name, url in (("bad name!", "libsql://db.example.turso.io"), ("ok", "ftp://" + token),
                      ("x" * 70, secret_url), (None, secret_url)):
        with pytest.raises(psycopg.errors.Error) as failed:
            conn.execute("SELECT pgturso.add_target(%s, %s, %s)", (name, url, token))
        assert token not in str(failed.value) and token not in (failed.value.diag.message_detail or "")
    log = pg_cluster.logfile.read_text(errors="replace")
    assert "add_target" in log  # the failures were logged, the token was not
    assert token not in log
    # The legitimate use: the target is stored, its token readable by no role but the extension owner.
    conn.execute("SELECT pgturso.add_target('ok', %s, %s)", ("libsql://db.example.turso.io", token))
    with login_role(conn, dsn, "snoop") as snoop_dsn:
        conn.execute("GRANT USAGE ON SCHEMA pgturso TO snoop")
        with psycopg.connect(snoop_dsn, autocommit=True) as snoop:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                snoop.execute("SELECT auth_token FROM pgturso.target")
    assert conn.execute("SELECT auth_token FROM pgturso.target WHERE name = 'ok'").fetchone() == (token,)


def test_the_worker_delivers_without_superuser_with_what_grant_worker_grants(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 40) AS g")
    # Row-level security hides nothing from the copy (nor runs a policy as the worker).
    conn.execute("ALTER TABLE t ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY")
    conn.execute("CREATE POLICY nothing ON t USING (false)")
    conn.execute("CREATE TABLE p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100)")
    with login_role(conn, dsn, "pgturso_worker") as worker_dsn:
        conn.execute("SELECT pgturso.grant_worker('pgturso_worker')")
        conn.execute("SELECT pgturso.track_table('t')")
        conn.execute("SELECT pgturso.track_table('p')")
        conn.execute("SELECT pgturso.resync_table('t')")  # copied by the worker, in chunks
        conn.execute("UPDATE t SET v = 'changed' WHERE id = 1")
        conn.execute("DELETE FROM t WHERE id = 2")
        conn.execute("ALTER TABLE t ADD COLUMN w text")
        conn.execute("INSERT INTO t VALUES (100, 'new', 'w')")
        conn.execute("INSERT INTO p VALUES (1, 'a'), (2, 'b')")
        conn.execute("TRUNCATE p1")
        conn.execute("INSERT INTO p VALUES (3, 'c')")
        result = run_worker(worker_dsn, turso.url, env={"PGTURSO_COPY_CHUNK_ROWS": "7"})
        assert result.returncode == 0, result.stderr
        assert pending(conn) == 0
        conn.execute("SET row_security = off")
        assert turso.query("SELECT id, v, w FROM t ORDER BY id") == [
            list(r) for r in conn.execute("SELECT id, v, w FROM t ORDER BY id").fetchall()]
        assert turso.query("SELECT count(*) FROM t") == [[40]]
        assert turso.query("SELECT id, v FROM p") == [[3, "c"]]
        status = conn.execute("SELECT status FROM pgturso.delivery_state WHERE target = 'default'").fetchone()
        assert status is not None and status[0] != "blocked"
        # ... and it has no right on the application's tables, nor any that a superuser has.
        with psycopg.connect(worker_dsn, autocommit=True) as worker:
            for forbidden in ("SELECT * FROM t", "INSERT INTO pgturso.outbox (layout_id, op, nrows) VALUES (1, 'T', 0)",
                              "SELECT pgturso.track_table('p1')", "SELECT pgturso.skip_transaction('1', 'x')"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    worker.execute(forbidden)


def test_a_worker_without_superuser_copies_afresh_a_target_that_lost_what_it_was_sent(conn, dsn, tmp_path):
    """Recovery onto a Turso database that lacks what was delivered (pgturso.url changed) queues a resync of
    every table of the target: a worker set up with grant_worker does it without any right on the tables."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 30) AS g")
    first, second = TursoServer().start(), TursoServer().start()
    try:
        with login_role(conn, dsn, "pgturso_worker") as worker_dsn:
            conn.execute("SELECT pgturso.grant_worker('pgturso_worker')")
            conn.execute("SELECT pgturso.track_table('t')")
            drain(worker_dsn, first.url)
            conn.execute("UPDATE t SET v = 'changed' WHERE id <= 5")
            drain(worker_dsn, first.url)
            conn.execute("INSERT INTO t VALUES (31, 'pending when the URL changed')")
            moved = run_worker(worker_dsn, second.url)
            assert moved.returncode == 0, moved.stderr
            assert "target_behind" in moved.stderr
            assert second.query("SELECT id, v FROM t ORDER BY id") == [
                list(r) for r in conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()]
            assert pending(conn) == 0
    finally:
        first.cleanup()
        second.cleanup()


def test_a_tracked_table_its_owner_turns_into_a_view_is_never_read(conn, dsn, turso: TursoServer):
    with login_role(conn, dsn, "converter") as owner_dsn:
        conn.execute("GRANT CREATE ON SCHEMA public TO converter")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute(ESCALATE.format(attacker="converter"))
            owner.execute("CREATE TABLE t (id int NOT NULL, v text)")
        conn.execute("SELECT pgturso.track_table('t', key_columns => ARRAY['id'])")
        drain(dsn, turso.url)
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            for trigger in ("insert", "update", "delete", "truncate"):
                owner.execute(f"DROP TRIGGER pgturso_capture_{trigger} ON t")
            owner.execute("VACUUM t")  # clears relhastriggers: Postgres 15 then lets a table become a view
            owner.execute("""
                CREATE FUNCTION one() RETURNS int LANGUAGE plpgsql AS
                    $$ BEGIN PERFORM public.escalate('view'); RETURN 1; END $$;
                CREATE RULE "_RETURN" AS ON SELECT TO t DO INSTEAD SELECT one() AS id, 'x'::text AS v""")
        with pytest.raises(psycopg.errors.RaiseException, match="not a table"):
            conn.execute("SELECT pgturso.resync_table('t')")
        # A copy started before the conversion is abandoned, not read, by the worker; verify skips it.
        conn.execute("UPDATE pgturso.tracked_table SET copy_state = 'copying'")
        drain(dsn, turso.url)
        assert conn.execute("SELECT copy_state FROM pgturso.tracked_table").fetchone() == ("done",)
        run_worker(dsn, turso.url)
        import subprocess
        import sys
        subprocess.run([sys.executable, "-m", "pgturso", "verify", "--dsn", dsn, "--url", turso.url],
                       capture_output=True, text=True, timeout=120)
        assert calls(conn) == []
        assert not is_superuser(conn, "converter")


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_the_wal_capture_worker_runs_no_code_a_table_owner_chose(conn, dsn, turso: TursoServer):
    with login_role(conn, dsn, "walowner") as owner_dsn:
        conn.execute("GRANT CREATE ON SCHEMA public TO walowner")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute(ESCALATE.format(attacker="walowner"))
            # Overloads in a schema on a default search_path that match the encoding's calls better than
            # pg_catalog's polymorphic ones, and a domain whose CHECK the decoding would run.
            owner.execute("""
                CREATE FUNCTION public.json_build_array(integer, text, integer) RETURNS json LANGUAGE plpgsql AS
                    $$ BEGIN PERFORM public.escalate('json_build_array overload'); RETURN '[]'; END $$;
                CREATE FUNCTION key_ok(integer) RETURNS boolean LANGUAGE plpgsql AS
                    $$ BEGIN PERFORM public.escalate('domain check'); RETURN true; END $$;
                CREATE DOMAIN checked AS integer CHECK (key_ok(VALUE));
                CREATE TABLE w (id int PRIMARY KEY, v text, c checked);
                CREATE FUNCTION twice(integer) RETURNS integer IMMUTABLE LANGUAGE plpgsql AS
                    $$ BEGIN PERFORM public.escalate('generated column'); RETURN $1 * 2; END $$;
                CREATE TABLE g (id int PRIMARY KEY, n int, d int GENERATED ALWAYS AS (twice(n)) STORED)""")
        conn.execute("SELECT pgturso.track_table('w')")
        with pytest.raises(psycopg.errors.RaiseException, match="generated column d") as refused:
            conn.execute("SELECT pgturso.track_table('g')")
        assert "trigger" in (refused.value.diag.message_hint or "")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute("INSERT INTO w VALUES (1, 'a', 5)")
            owner.execute("UPDATE w SET v = 'b'")
            owner.execute("TRUNCATE calls")  # the domain check ran for the owner's own INSERT and UPDATE
        drain(dsn, turso.url)
        assert turso.query("SELECT id, v, c FROM w") == [[1, "b", 5]]
        assert calls(conn) == []
        assert not is_superuser(conn, "walowner")


def test_a_worker_role_without_the_grants_stops_with_the_fix_named(conn, dsn, turso: TursoServer):
    """A role that was never given grant_worker gets one clear error naming the fix, not a Python traceback,
    and nothing is lost: once granted, the same worker delivers everything."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t VALUES (1, 'a')")
    with login_role(conn, dsn, "pgturso_worker") as worker_dsn:
        refused = run_worker(worker_dsn, turso.url)
        assert refused.returncode == 2, refused.stderr
        assert "Traceback" not in refused.stderr
        assert "permission denied" in refused.stderr
        assert "grant_worker" in refused.stderr
        conn.execute("SELECT pgturso.grant_worker('pgturso_worker')")
        drain(worker_dsn, turso.url)
    assert turso.query("SELECT id, v FROM t") == [[1, "a"]]
    assert pending(conn) == 0


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_a_wal_worker_role_needs_replication_and_is_told_the_command(conn, dsn, turso: TursoServer):
    """grant_worker gives no role attribute: a wal target's worker without REPLICATION stops at start with the
    exact command; with it (and grant_worker's grants, no superuser), it delivers, and recovers a lost slot."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t VALUES (1, 'a')")
    with login_role(conn, dsn, "walworker") as worker_dsn:
        conn.execute("SELECT pgturso.grant_worker('walworker')")
        refused = run_worker(worker_dsn, turso.url)
        assert refused.returncode == 2, refused.stderr
        assert "Traceback" not in refused.stderr
        assert 'ALTER ROLE \\"walworker\\" REPLICATION' in refused.stderr  # (the log line escapes quotes)
        conn.execute("ALTER ROLE walworker REPLICATION")
        drain(worker_dsn, turso.url)
        assert turso.query("SELECT id, v FROM t") == [[1, "a"]]
        conn.execute("INSERT INTO t VALUES (2, 'b')")
        conn.execute("SELECT pg_drop_replication_slot(pgturso._slot_name('default'))")  # lost (a failover)
        conn.execute("INSERT INTO t VALUES (3, 'c')")
        drain(worker_dsn, turso.url)
        assert turso.query("SELECT id, v FROM t ORDER BY id") == [[1, "a"], [2, "b"], [3, "c"]]
        assert not is_superuser(conn, "walworker")
    assert pending(conn) == 0
