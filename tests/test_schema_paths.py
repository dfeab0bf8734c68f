"""Schema changes that reach a tracked table by another road than ALTER TABLE on it (issue 17): DDL on a type,
domain, function or schema, rewrites, keys that Postgres calls equal but Turso does not. Each case is followed
on Turso, or refused up front with an error and a HINT; none may break the application's own writes."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from conftest import drain, pending
from support.turso import TursoServer
from test_verify import verify

# Each test runs with trigger capture and with capture => 'wal' (conftest.py), except those about triggers
# (disabled capture, a stale capture function) and refusals made before anything is captured.
CAPTURE_MODES = ("trigger", "wal")


def pg_rows(conn: psycopg.Connection[Any], sql: str) -> list[list[Any]]:
    return [list(r) for r in conn.execute(sql).fetchall()]


def turso_columns(turso: TursoServer, table: str) -> list[str]:
    return [r[0] for r in turso.query(f"SELECT name FROM pragma_table_info('{table}') ORDER BY cid")]


# ------------------------------------------------------------------ (a) columns changed through other objects


def test_drop_type_domain_and_function_cascade_drop_columns_and_writes_go_on(capture, conn, dsn, turso):
    conn.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
    conn.execute("CREATE DOMAIN posint AS int CHECK (VALUE > 0)")
    conn.execute("CREATE FUNCTION twice(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1 * 2'")
    # capture => 'wal' refuses a generated column whose expression calls a user-defined function (the worker
    # would run it): there the column is a plain one with a default. A generated column dropped by a CASCADE in
    # wal mode: test_rows_written_before_a_cascade_drops_their_generated_column_arrive.
    generated = "GENERATED ALWAYS AS (twice(v)) STORED" if capture == "trigger" else "DEFAULT twice(1)"
    conn.execute(f"CREATE TABLE t (id int PRIMARY KEY, m mood, p posint, v int, g int {generated}, keep text)")
    conn.execute("INSERT INTO t VALUES (1, 'sad', 1, 1, DEFAULT, 'one')")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("DROP TYPE mood CASCADE")
    conn.execute("INSERT INTO t (id, p, v, keep) VALUES (2, 2, 2, 'two')")  # 0.1.0: column src.m does not exist
    conn.execute("DROP DOMAIN posint CASCADE")
    conn.execute("UPDATE t SET keep = 'one!' WHERE id = 1")
    conn.execute("DROP FUNCTION twice(int) CASCADE")
    conn.execute("INSERT INTO t (id, v, keep) VALUES (3, 3, 'three')")
    drain(dsn, turso.url)
    assert turso_columns(turso, "t") == (["id", "v", "keep"] if capture == "trigger" else ["id", "v", "g", "keep"])
    assert turso.query("SELECT * FROM t ORDER BY id") == pg_rows(conn, "SELECT * FROM t ORDER BY id")
    assert pending(conn) == 0


def test_rows_written_before_a_cascade_drops_their_generated_column_arrive(capture, conn, dsn, turso):
    """capture => 'wal' computes a generated column at delivery (pgoutput does not send it): for rows written
    before DROP ... CASCADE (or DROP COLUMN) took the column and its expression, the worker used to stop with a
    SlotError. They arrive, and the column's drop follows them; a renamed generated column is still computed."""
    conn.execute("CREATE DOMAIN posint AS int CHECK (VALUE > 0)")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, p posint, g int GENERATED ALWAYS AS (p * 2) STORED, "
                 "h int GENERATED ALWAYS AS (id + 100) STORED, keep text)")
    conn.execute("INSERT INTO t VALUES (1, 1, DEFAULT, DEFAULT, 'one')")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t (id, p, keep) VALUES (2, 2, 'two')")
    conn.execute("UPDATE t SET keep = 'one!', p = 5 WHERE id = 1")
    conn.execute("ALTER TABLE t RENAME COLUMN h TO h2")
    conn.execute("INSERT INTO t (id, p, keep) VALUES (3, 3, 'three')")
    conn.execute("DELETE FROM t WHERE id = 2")
    conn.execute("DROP DOMAIN posint CASCADE")  # drops p, and g computed from it
    conn.execute("INSERT INTO t (id, keep) VALUES (4, 'four')")
    conn.execute("UPDATE t SET keep = 'three!' WHERE id = 3")
    result = drain(dsn, turso.url)
    assert "SlotError" not in result.stderr
    assert turso_columns(turso, "t") == ["id", "h2", "keep"]
    assert turso.query("SELECT * FROM t ORDER BY id") == pg_rows(conn, "SELECT * FROM t ORDER BY id")
    assert turso.query("SELECT id, h2 FROM t ORDER BY id") == [[1, 101], [3, 103], [4, 104]]
    assert pending(conn) == 0


def test_drop_expression_makes_a_generated_column_an_ordinary_one_and_delivery_goes_on(capture, conn, dsn, turso):
    """ALTER COLUMN ... DROP EXPRESSION keeps the column and its values, but drops the expression that capture =>
    'wal' computes it from (pgoutput does not send a generated column): rows written before it used to stop the
    target's slot with a SlotError. They arrive with the values Postgres computed, and later values as written."""
    conn.execute("CREATE TABLE g (id int PRIMARY KEY, a int, twice int GENERATED ALWAYS AS (a * 2) STORED, "
                 "label text GENERATED ALWAYS AS ('#' || id) STORED)")
    conn.execute("INSERT INTO g (id, a) VALUES (1, 1)")
    conn.execute("SELECT pgturso.track_table('g')")
    conn.execute("INSERT INTO g (id, a) VALUES (2, 2), (3, 3)")
    conn.execute("UPDATE g SET a = 10 WHERE id = 1")
    with conn.transaction():  # rows before and after the drop in one transaction
        conn.execute("UPDATE g SET a = 30 WHERE id = 3")
        conn.execute("ALTER TABLE g ALTER COLUMN twice DROP EXPRESSION")
        conn.execute("INSERT INTO g (id, a, twice) VALUES (4, 4, 99)")
    conn.execute("UPDATE g SET twice = 7, a = 20 WHERE id = 2")  # an ordinary column now: any value
    conn.execute("INSERT INTO g (id, a) VALUES (5, 5)")  # no value: NULL
    conn.execute("DELETE FROM g WHERE id = 3")
    result = drain(dsn, turso.url)
    assert "SlotError" not in result.stderr
    expected = pg_rows(conn, "SELECT id, a, twice, label FROM g ORDER BY id")
    assert expected == [[1, 10, 20, "#1"], [2, 20, 7, "#2"], [4, 4, 99, "#4"], [5, 5, None, "#5"]]
    assert turso.query("SELECT id, a, twice, label FROM g ORDER BY id") == expected
    conn.execute("ALTER TABLE g ALTER COLUMN label DROP EXPRESSION")  # alone, the worker idle
    conn.execute("UPDATE g SET label = 'x' WHERE id = 1")
    conn.execute("INSERT INTO g (id, a) VALUES (6, 6)")
    drain(dsn, turso.url)
    expected = pg_rows(conn, "SELECT id, a, twice, label FROM g ORDER BY id")
    assert turso.query("SELECT id, a, twice, label FROM g ORDER BY id") == expected
    assert pending(conn) == 0


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_a_key_column_dropped_through_its_type_is_refused(conn):
    conn.execute("CREATE DOMAIN code AS text CHECK (VALUE <> '')")
    conn.execute("CREATE TABLE c (k code PRIMARY KEY, v int)")
    conn.execute("SELECT pgturso.track_table('c')")
    with pytest.raises(psycopg.Error, match="without a key") as failure:
        conn.execute("DROP DOMAIN code CASCADE")
    assert "untrack_table" in failure.value.diag.message_hint
    conn.execute("INSERT INTO c VALUES ('x', 1)")


def test_typed_table_follows_its_composite_type(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TYPE person AS (name text, age int, city text)")
    conn.execute("CREATE TABLE people OF person (PRIMARY KEY (name))")
    conn.execute("INSERT INTO people VALUES ('ann', 30, 'Oslo')")
    conn.execute("SELECT pgturso.track_table('people')")
    conn.execute("ALTER TYPE person RENAME ATTRIBUTE age TO years CASCADE")
    conn.execute("INSERT INTO people VALUES ('bob', 40, 'Rome')")  # 0.1.0: column src.age does not exist
    conn.execute("ALTER TYPE person RENAME ATTRIBUTE name TO full_name CASCADE")  # the key itself
    conn.execute("UPDATE people SET full_name = 'bobby' WHERE full_name = 'bob'")
    conn.execute("ALTER TYPE person ADD ATTRIBUTE email text CASCADE")
    conn.execute("ALTER TYPE person DROP ATTRIBUTE city CASCADE")
    conn.execute("INSERT INTO people VALUES ('cy', 50, 'cy@example.org')")
    drain(dsn, turso.url)
    assert turso_columns(turso, "people") == ["full_name", "years", "email"]
    assert turso.query("SELECT * FROM people ORDER BY 1") == pg_rows(conn, "SELECT * FROM people ORDER BY 1")


def test_alter_schema_rename_is_followed(conn, dsn, turso: TursoServer):
    conn.execute("CREATE SCHEMA s")
    conn.execute("CREATE TABLE s.t (id int PRIMARY KEY, v text)")
    conn.execute("CREATE UNIQUE INDEX t_v ON s.t (v)")
    conn.execute("SELECT pgturso.track_table('s.t')")
    conn.execute("INSERT INTO s.t VALUES (1, 'same')")
    conn.execute("ALTER SCHEMA s RENAME TO s2")
    conn.execute("DROP INDEX s2.t_v")
    conn.execute("INSERT INTO s2.t VALUES (2, 'same')")  # legal now: Turso must have dropped its index too
    drain(dsn, turso.url)
    assert turso.query("SELECT name FROM sqlite_schema WHERE type = 'table' AND lower(name) LIKE 's%'") == [["s2.t"]]
    assert turso.query('SELECT id, v FROM "s2.t" ORDER BY id') == [[1, "same"], [2, "same"]]


# ------------------------------------------------------------------------------------- (c) delivery stops


def test_case_only_column_rename(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE r (id int PRIMARY KEY, createdat text)")
    conn.execute("SELECT pgturso.track_table('r')")
    conn.execute('ALTER TABLE r RENAME COLUMN createdat TO "createdAt"')
    conn.execute("INSERT INTO r VALUES (1, 'now')")
    drain(dsn, turso.url)
    assert turso_columns(turso, "r") == ["id", "createdAt"]
    assert turso.query("SELECT * FROM r") == [[1, "now"]]


# ----------------------------------------------------------------------------------- (b) silent divergence


def test_alter_column_type_using_recopies_when_values_change(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE u (id int PRIMARY KEY, cents int, name text, note text)")
    conn.execute("INSERT INTO u VALUES (1, 5, 'ann', 'x'), (2, 7, 'bob', 'y')")
    conn.execute("SELECT pgturso.track_table('u')")
    conn.execute("ALTER TABLE u ALTER COLUMN cents TYPE bigint USING cents * 100")
    conn.execute("ALTER TABLE u ALTER COLUMN name TYPE varchar USING upper(name)")
    conn.execute("ALTER TABLE u ALTER COLUMN note TYPE text USING note || '!'")  # no layout change at all
    drain(dsn, turso.url)
    assert turso.query("SELECT * FROM u ORDER BY id") == pg_rows(conn, "SELECT * FROM u ORDER BY id")
    conn.execute("ALTER TABLE u ALTER COLUMN id TYPE int USING id + 1000")  # the key
    conn.execute("UPDATE u SET note = 'later' WHERE id = 1001")
    drain(dsn, turso.url)
    assert turso.query("SELECT * FROM u ORDER BY id") == pg_rows(conn, "SELECT * FROM u ORDER BY id")


def test_dropping_the_unique_index_that_is_the_key(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE q (id int NOT NULL, code text NOT NULL, v text)")
    conn.execute("CREATE UNIQUE INDEX q_id ON q (id)")
    conn.execute("SELECT pgturso.track_table('q')")
    with pytest.raises(psycopg.Error, match="without a key") as failure:
        conn.execute("DROP INDEX q_id")
    assert "untrack_table" in failure.value.diag.message_hint
    conn.execute("CREATE UNIQUE INDEX q_code ON q (code)")
    conn.execute("INSERT INTO q VALUES (1, 'a', 'first')")
    conn.execute("DROP INDEX q_id")  # the key becomes code
    conn.execute("INSERT INTO q VALUES (1, 'b', 'second')")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, code, v FROM q ORDER BY code") == [[1, "a", "first"], [1, "b", "second"]]


def test_enum_rename_value_reaches_turso(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TYPE state AS ENUM ('new', 'done')")
    conn.execute("CREATE TABLE e (id int PRIMARY KEY, s state, ss state[])")
    conn.execute("INSERT INTO e VALUES (1, 'new', '{new,done}'), (2, 'done', '{}')")
    conn.execute("SELECT pgturso.track_table('e')")
    conn.execute("ALTER TYPE state RENAME VALUE 'new' TO 'open'")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, s, ss FROM e ORDER BY id") == [[1, "open", '["open","done"]'], [2, "done", "[]"]]


def test_keys_postgres_calls_equal_move_on_turso(conn, dsn, turso: TursoServer):
    conn.execute("CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
    conn.execute("CREATE TABLE names (n text COLLATE ci PRIMARY KEY, v int)")
    conn.execute("CREATE TABLE padded (c bpchar PRIMARY KEY, v int)")
    conn.execute("INSERT INTO names VALUES ('Bob', 1)")
    conn.execute("INSERT INTO padded VALUES ('ab ', 1)")
    conn.execute("SELECT pgturso.track_table('names')")
    conn.execute("SELECT pgturso.track_table('padded')")
    conn.execute("UPDATE names SET n = 'bob'")
    conn.execute("UPDATE padded SET c = 'ab'")
    drain(dsn, turso.url)
    assert turso.query("SELECT n, v FROM names") == [["bob", 1]]
    assert turso.query("SELECT c, v FROM padded") == pg_rows(conn, "SELECT c::text, v FROM padded")


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_array_keys_keep_their_bounds_or_are_refused(conn):
    conn.execute("CREATE TABLE a (k int[] PRIMARY KEY, v int)")
    with pytest.raises(psycopg.Error, match="array") as failure:
        conn.execute("SELECT pgturso.track_table('a')")
    assert "key_columns" in failure.value.diag.message_hint
    conn.execute("CREATE TABLE b (id int PRIMARY KEY, k int[] NOT NULL UNIQUE)")
    conn.execute("SELECT pgturso.track_table('b')")
    with pytest.raises(psycopg.Error, match="array"):
        conn.execute("ALTER TABLE b DROP CONSTRAINT b_pkey")


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_inheritance_is_refused(conn):
    conn.execute("CREATE TABLE parent (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE child () INHERITS (parent)")
    with pytest.raises(psycopg.Error, match="inherit") as failure:
        conn.execute("SELECT pgturso.track_table('parent')")
    assert failure.value.diag.message_hint
    with pytest.raises(psycopg.Error, match="inherit"):
        conn.execute("SELECT pgturso.track_table('child')")
    conn.execute("CREATE TABLE solo (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('solo')")
    with pytest.raises(psycopg.Error, match="inherit"):
        conn.execute("CREATE TABLE heir () INHERITS (solo)")
    conn.execute("CREATE TABLE other (id int PRIMARY KEY, v text)")
    with pytest.raises(psycopg.Error, match="inherit"):
        conn.execute("ALTER TABLE other INHERIT solo")
    with pytest.raises(psycopg.Error, match="inherit"):
        conn.execute("ALTER TABLE solo INHERIT other")


def test_attaching_a_tracked_table_as_a_partition_is_refused(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE m (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE m1 (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO m1 VALUES (1, 'one')")
    conn.execute("SELECT pgturso.track_table('m')")
    conn.execute("SELECT pgturso.track_table('m1')")
    with pytest.raises(psycopg.Error, match="tracked") as failure:
        conn.execute("ALTER TABLE m ATTACH PARTITION m1 FOR VALUES FROM (0) TO (10)")
    assert "untrack_table" in failure.value.diag.message_hint
    conn.execute("SELECT pgturso.untrack_table('m1')")
    conn.execute("ALTER TABLE m ATTACH PARTITION m1 FOR VALUES FROM (0) TO (10)")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM m") == [[1, "one"]]


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_disabled_capture_shows_in_status_and_verify_and_is_repaired(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE d (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('d')")
    assert pg_rows(conn, "SELECT capture_disabled FROM pgturso.status") == [[False]]
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    conn.execute("ALTER TABLE d DISABLE TRIGGER ALL")  # what pg_restore --disable-triggers does
    assert any("capture of tracked table public.d is disabled" in n for n in notices), notices
    conn.execute("INSERT INTO d VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    assert pg_rows(conn, "SELECT capture_disabled FROM pgturso.status") == [[True]]
    drain(dsn, turso.url)
    found = verify(dsn, turso.url)
    assert found.returncode == 1
    assert "public.d: capture DISABLED" in found.stdout and "ENABLE TRIGGER ALL" in found.stdout
    assert "public.d -> d: DIFFERENT" in found.stdout
    # The repair documented in docs/schema-changes.md: enable the triggers, then verify --repair.
    conn.execute("ALTER TABLE d ENABLE TRIGGER ALL")
    assert pg_rows(conn, "SELECT capture_disabled FROM pgturso.status") == [[False]]
    repaired = verify(dsn, turso.url, "--repair")
    assert "repair queued for 3 rows" in repaired.stdout
    drain(dsn, turso.url)
    assert turso.query("SELECT * FROM d ORDER BY id") == pg_rows(conn, "SELECT * FROM d ORDER BY id")
    assert verify(dsn, turso.url).returncode == 0


def test_key_change_during_a_chunked_copy(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, code text NOT NULL, v int)")
    # The new key's order is the reverse of the old one's, and every code sorts before the text '6000'.
    conn.execute("INSERT INTO big SELECT g, lpad((12001 - g)::text, 5, '0'), g FROM generate_series(1, 12000) g")
    conn.execute("CREATE TABLE wide (id int PRIMARY KEY, v int)")
    conn.execute("INSERT INTO wide SELECT g, g FROM generate_series(1, 12000) g")
    conn.execute("SELECT pgturso.track_table('big')")  # over 10,000 rows: the worker copies them in chunks
    conn.execute("SELECT pgturso.track_table('wide')")
    ids = dict(pg_rows(conn, "SELECT relid::regclass::text, id FROM pgturso.tracked_table"))
    for table in ("big", "wide"):  # half of the copy done, as the worker would
        for _ in range(3):
            conn.execute("SELECT pgturso._copy_chunk(%s, 2000)", (ids[table],))
    assert pg_rows(conn, "SELECT count(*) FROM pgturso.tracked_table WHERE copy_state = 'copying'") == [[2]]
    conn.execute("ALTER TABLE big DROP CONSTRAINT big_pkey, ADD PRIMARY KEY (code)")
    conn.execute("ALTER TABLE wide ALTER COLUMN id TYPE bigint")  # the key's type
    drain(dsn, turso.url)
    assert turso.query("SELECT count(*), sum(v) FROM big") == [[12000, 12000 * 12001 // 2]]
    assert turso.query("SELECT count(*), sum(v) FROM wide") == [[12000, 12000 * 12001 // 2]]
    assert pg_rows(conn, "SELECT count(*) FROM pgturso.tracked_table WHERE copy_state = 'done'") == [[2]]


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_unlogged_and_temporary_tables_are_refused(conn):
    conn.execute("CREATE UNLOGGED TABLE ul (id int PRIMARY KEY)")
    with pytest.raises(psycopg.Error, match="unlogged") as failure:
        conn.execute("SELECT pgturso.track_table('ul')")
    assert "SET LOGGED" in failure.value.diag.message_hint
    conn.execute("CREATE TEMP TABLE tmp (id int PRIMARY KEY)")
    with pytest.raises(psycopg.Error, match="temporary"):
        conn.execute("SELECT pgturso.track_table('tmp')")
    conn.execute("CREATE TABLE l (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('l')")
    with pytest.raises(psycopg.Error, match="unlogged"):
        conn.execute("ALTER TABLE l SET UNLOGGED")
    conn.execute("ALTER TABLE ul SET LOGGED")
    conn.execute("SELECT pgturso.track_table('ul')")


def test_replica_identity_changes_never_break_writes(capture, conn, dsn, turso: TursoServer):
    """Trigger capture does not use the replica identity; capture => 'wal' needs the old key of every UPDATE
    and DELETE, and Postgres fails those writes on a published table without an identity."""
    conn.execute("CREATE TABLE ri (id int PRIMARY KEY, code text NOT NULL UNIQUE, v text)")
    conn.execute("INSERT INTO ri VALUES (1, 'a', 'one'), (2, 'b', 'two')")
    conn.execute("SELECT pgturso.track_table('ri')")
    if capture == "wal":
        with pytest.raises(psycopg.Error, match="replica identity") as failure:
            conn.execute("ALTER TABLE ri REPLICA IDENTITY NOTHING")
        assert "REPLICA IDENTITY DEFAULT" in failure.value.diag.message_hint
        with pytest.raises(psycopg.Error, match="replica identity"):
            conn.execute("ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_code_key")  # not the key's columns
    else:
        conn.execute("ALTER TABLE ri REPLICA IDENTITY NOTHING")
    conn.execute("ALTER TABLE ri REPLICA IDENTITY FULL")
    conn.execute("UPDATE ri SET id = 10, v = 'ten' WHERE id = 1")
    conn.execute("DELETE FROM ri WHERE id = 2")
    drain(dsn, turso.url)
    assert turso.query("SELECT * FROM ri ORDER BY id") == pg_rows(conn, "SELECT * FROM ri ORDER BY id")


def test_siblings_found_by_attacking_the_fixes(conn, dsn, turso: TursoServer):
    """More roads to the same places: a case-only table rename, a rewrite of a partitioned table, a domain
    renamed, a composite's attribute retyped under a typed table, a collation dropped with its column, an enum
    value added."""
    conn.execute("CREATE TABLE events (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('events')")
    conn.execute('ALTER TABLE events RENAME TO "Events"')  # SQLite: the same name
    conn.execute('INSERT INTO "Events" VALUES (1, \'one\')')

    conn.execute("CREATE TABLE parted (id int, n int, PRIMARY KEY (id)) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100)")
    conn.execute("INSERT INTO parted VALUES (1, 1), (50, 2)")
    conn.execute("SELECT pgturso.track_table('parted')")
    conn.execute("ALTER TABLE parted ALTER COLUMN n TYPE bigint USING n * 1000")

    conn.execute("CREATE DOMAIN stamp AS timestamptz")
    conn.execute("CREATE TYPE point2 AS (x int, y int)")
    conn.execute("CREATE TABLE pts OF point2 (PRIMARY KEY (x))")
    conn.execute("CREATE TABLE stamped (id int PRIMARY KEY, at stamp, c text COLLATE \"C\")")
    conn.execute("CREATE COLLATION mine (provider = icu, locale = 'und')")
    conn.execute("ALTER TABLE stamped ADD COLUMN label text COLLATE mine")
    conn.execute("INSERT INTO pts VALUES (1, 2)")
    conn.execute("INSERT INTO stamped VALUES (1, '2024-01-01 00:00+00', 'c', 'l')")
    conn.execute("SELECT pgturso.track_table('pts')")
    conn.execute("SELECT pgturso.track_table('stamped')")
    conn.execute("ALTER DOMAIN stamp RENAME TO moment")
    conn.execute("ALTER TYPE point2 ALTER ATTRIBUTE y TYPE text CASCADE")
    conn.execute("UPDATE pts SET y = y || '!'")
    conn.execute("DROP COLLATION mine CASCADE")
    conn.execute("INSERT INTO stamped VALUES (2, '2024-01-02 00:00+00', 'd')")

    conn.execute("CREATE TYPE level AS ENUM ('low')")
    conn.execute("CREATE TABLE lv (id int PRIMARY KEY, l level)")
    conn.execute("INSERT INTO lv VALUES (1, 'low')")
    conn.execute("SELECT pgturso.track_table('lv')")
    conn.execute("ALTER TYPE level ADD VALUE 'high'")
    conn.execute("INSERT INTO lv VALUES (2, 'high')")
    drain(dsn, turso.url)
    assert turso.query('SELECT * FROM "Events"') == [[1, "one"]]
    for table in ("parted", "pts", "lv"):
        assert turso.query(f"SELECT * FROM {table} ORDER BY 1") == pg_rows(
            conn, f"SELECT * FROM {table} ORDER BY 1"), table
    assert turso_columns(turso, "stamped") == ["id", "at", "c"]
    assert turso.query("SELECT * FROM stamped ORDER BY 1") == [[1, "2024-01-01T00:00:00+00:00", "c"],
                                                               [2, "2024-01-02T00:00:00+00:00", "d"]]


# ------------------------------------------------------------------------------------ the last line of defence


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_a_stale_capture_function_never_breaks_a_write(conn, dsn, turso: TursoServer):
    """DDL that pgturso did not see (its event triggers disabled, or session_replication_role = replica):
    the application's writes still succeed, and Turso still ends up equal (the table is followed and recopied,
    with a WARNING), rather than the write failing on a column that is gone."""
    conn.execute("CREATE TABLE w (id int PRIMARY KEY, v text, x int, n int)")
    conn.execute("INSERT INTO w VALUES (1, 'one', 1, 1), (2, 'two', 2, 2)")
    conn.execute("SELECT pgturso.track_table('w')")
    for trigger in ("pgturso_ddl_command_end", "pgturso_sql_drop", "pgturso_table_rewrite"):
        conn.execute(f"ALTER EVENT TRIGGER {trigger} DISABLE")
    conn.execute("ALTER TABLE w RENAME COLUMN v TO vv")
    conn.execute("ALTER TABLE w DROP COLUMN x")
    conn.execute("ALTER TABLE w ALTER COLUMN n TYPE text USING 'n' || n")
    for trigger in ("pgturso_ddl_command_end", "pgturso_sql_drop", "pgturso_table_rewrite"):
        conn.execute(f"ALTER EVENT TRIGGER {trigger} ENABLE")
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    conn.execute("INSERT INTO w VALUES (3, 'three', 'n3')")
    assert any("recopies" in n for n in notices), notices
    conn.execute("UPDATE w SET vv = 'ONE' WHERE id = 1")
    conn.execute("DELETE FROM w WHERE id = 2")
    drain(dsn, turso.url)
    assert turso_columns(turso, "w") == ["id", "vv", "n"]
    assert turso.query("SELECT * FROM w ORDER BY id") == pg_rows(conn, "SELECT * FROM w ORDER BY id")
