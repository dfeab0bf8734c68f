"""Schema changes of tracked tables, end to end: DDL is captured in its transaction and lands on Turso exactly
between the data written before it and the data written after it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from conftest import drain, pending
from support.turso import TursoServer

CAPTURE_MODES = ("trigger", "wal")  # every test here runs in both capture modes (conftest)


def pg_rows(conn: psycopg.Connection[Any], sql: str) -> list[list[Any]]:
    return [list(r) for r in conn.execute(sql).fetchall()]


def turso_columns(turso: TursoServer, table: str) -> list[str]:
    return [r[0] for r in turso.query(f"SELECT name FROM pragma_table_info('{table}') ORDER BY cid")]


def turso_ddl(turso: TursoServer, name: str) -> str:
    rows = turso.query(f"SELECT sql FROM sqlite_schema WHERE lower(name) = lower('{name}')")
    return rows[0][0] if rows else ""


def test_add_drop_rename_columns_and_table_between_the_data(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, a text, b int)")
    conn.execute("INSERT INTO t VALUES (1, 'one', 1)")
    conn.execute("SELECT pgturso.track_table('t')")
    with conn.transaction():  # data before and after the DDL in one transaction
        conn.execute("INSERT INTO t VALUES (2, 'two', 2)")
        conn.execute("ALTER TABLE t ADD COLUMN c text")
        conn.execute("INSERT INTO t VALUES (3, 'three', 3, 'c3')")
    drain(dsn, turso.url)  # a batch boundary in the middle of the history
    assert turso.query("SELECT id, a, b, c FROM t ORDER BY id") == pg_rows(conn, "SELECT * FROM t ORDER BY id")

    conn.execute("ALTER TABLE t ADD COLUMN d int NOT NULL DEFAULT 7")  # Postgres fills existing rows
    with conn.transaction():
        conn.execute("UPDATE t SET b = b + 10")
        conn.execute("ALTER TABLE t RENAME COLUMN a TO \"A a\"")
        conn.execute("UPDATE t SET \"A a\" = 'renamed' WHERE id = 1")
    conn.execute("ALTER TABLE t DROP COLUMN b")
    conn.execute("INSERT INTO t VALUES (4, 'four', 'c4', 8)")
    with conn.transaction():
        conn.execute("ALTER TABLE t RENAME TO \"T new\"")
        conn.execute("INSERT INTO \"T new\" VALUES (5, 'five', NULL, 9)")
    conn.execute("ALTER TABLE \"T new\" RENAME COLUMN c TO b")  # a name that existed before
    drain(dsn, turso.url)

    # (tursodb 0.6 records a renamed table's name in lower case; SQLite names are case-insensitive anyway)
    assert turso.query("SELECT lower(name) FROM sqlite_schema WHERE lower(name) IN ('t', 't new')") == [["t new"]]
    assert turso_columns(turso, "T new") == ["id", "A a", "b", "d"]
    assert turso.query('SELECT * FROM "T new" ORDER BY id') == pg_rows(conn, 'SELECT * FROM "T new" ORDER BY id')
    assert turso.query('SELECT d FROM "T new" WHERE id = 1') == [[7]]
    assert "d INTEGER NOT NULL" in turso_ddl(turso, "T new").replace('"', "")
    assert pending(conn) == 0


def test_alter_type_not_null_and_key_changes(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE k (id int PRIMARY KEY, v int, u text)")
    conn.execute("INSERT INTO k SELECT g, g * 10, 'u' || g FROM generate_series(1, 5) g")
    conn.execute("SELECT pgturso.track_table('k')")
    conn.execute("ALTER TABLE k ALTER COLUMN v TYPE bigint")  # same values: nothing to rebuild
    with conn.transaction():
        conn.execute("INSERT INTO k VALUES (6, 60, 'u6')")
        conn.execute("ALTER TABLE k ALTER COLUMN v TYPE numeric(30, 2)")  # values change form: recopy
        conn.execute("INSERT INTO k VALUES (7, 70.5, 'u7')")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v, typeof(v) FROM k WHERE id IN (1, 7) ORDER BY id") == [
        [1, "10.00", "text"], [7, "70.50", "text"]
    ]

    conn.execute("ALTER TABLE k ALTER COLUMN u SET NOT NULL")  # SQLite rebuilds the table
    assert pending(conn) == 1
    conn.execute("CREATE UNIQUE INDEX k_u ON k (u)")
    with conn.transaction():
        conn.execute("ALTER TABLE k DROP CONSTRAINT k_pkey")  # the key becomes u (unique, NOT NULL)
        conn.execute("UPDATE k SET id = 100 WHERE u = 'u1'")
        conn.execute("DELETE FROM k WHERE u = 'u2'")
    drain(dsn, turso.url)
    assert 'PRIMARY KEY ("u")' in turso_ddl(turso, "k") and '"u" TEXT NOT NULL' in turso_ddl(turso, "k")
    conn.execute("UPDATE k SET u = 'u1 moved' WHERE u = 'u1'")  # a key change under the new key
    with conn.transaction():
        conn.execute("ALTER TABLE k ADD PRIMARY KEY (id)")
        conn.execute("ALTER TABLE k ALTER COLUMN u DROP NOT NULL")
        conn.execute("UPDATE k SET u = NULL WHERE id = 3")
    drain(dsn, turso.url)
    assert 'PRIMARY KEY ("id")' in turso_ddl(turso, "k") and '"u" TEXT,' in turso_ddl(turso, "k")
    expected = pg_rows(conn, "SELECT id, v::text, u FROM k ORDER BY id")
    assert turso.query("SELECT id, v, u FROM k ORDER BY id") == expected


def test_indexes_follow_and_can_be_left_out(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE i (id int PRIMARY KEY, a text, b int NOT NULL, c int)")
    conn.execute("CREATE INDEX i_a ON i (a)")
    conn.execute("CREATE INDEX i_partial ON i (c) WHERE c > 0")  # no SQLite equivalent: stays on Postgres
    conn.execute("CREATE INDEX i_expr ON i (lower(a))")
    conn.execute("SELECT pgturso.track_table('i')")
    conn.execute("CREATE UNIQUE INDEX i_b ON i (b, a)")
    conn.execute("ALTER TABLE i ADD CONSTRAINT i_c_key UNIQUE (c)")
    conn.execute("INSERT INTO i VALUES (1, 'x', 1, 1), (2, 'y', 2, 2)")
    drain(dsn, turso.url)
    indexes = dict(turso.query("SELECT name, sql FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL"))
    assert set(indexes) == {"i_a", "i_b", "i_c_key"}
    assert indexes["i_b"] == 'CREATE INDEX "i_b" ON "i" ("b", "a")'  # plain: Postgres keeps it unique
    assert turso.query("SELECT id FROM i INDEXED BY i_a WHERE a = 'y'") == [[2]]

    conn.execute("DROP INDEX i_a")
    conn.execute("ALTER TABLE i DROP CONSTRAINT i_c_key")
    conn.execute("ALTER TABLE i RENAME COLUMN a TO aa")
    drain(dsn, turso.url)
    indexes = dict(turso.query("SELECT name, sql FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL"))
    assert set(indexes) == {"i_b"} and "aa" in indexes["i_b"]

    conn.execute("CREATE TABLE plain (id int PRIMARY KEY, a text)")
    conn.execute("CREATE INDEX plain_a ON plain (a)")
    conn.execute("SELECT pgturso.track_table('plain', indexes => false)")
    conn.execute("CREATE INDEX plain_a2 ON plain (a, id)")
    drain(dsn, turso.url)
    assert turso.query("SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'plain' AND sql IS NOT NULL"
                       ) == []


def test_drop_table_delivers_what_came_before_and_drops_on_turso_only_if_asked(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE gone (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('kept')")
    conn.execute("SELECT pgturso.track_table('gone', drop_target => true)")
    with conn.transaction():
        conn.execute("INSERT INTO kept VALUES (1)")
        conn.execute("INSERT INTO gone VALUES (1)")
    conn.execute("DROP TABLE kept, gone")
    conn.execute("CREATE TABLE kept (id int PRIMARY KEY, v text)")
    with pytest.raises(psycopg.Error, match="already replicates") as early:
        conn.execute("SELECT pgturso.track_table('kept')")
    assert "deliver" in early.value.diag.message_hint
    drain(dsn, turso.url)
    assert turso.query("SELECT id FROM kept") == [[1]]
    assert turso.query("SELECT name FROM sqlite_schema WHERE name = 'gone'") == []
    assert pending(conn) == 0
    conn.execute("SELECT pgturso.track_table('kept')")  # once delivered, the name is free again
    conn.execute("INSERT INTO kept VALUES (2, 'new table')")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM kept") == [[2, "new table"]]
    assert pg_rows(conn, "SELECT count(*) FROM pgturso.tracked_table") == [[1]]


def test_ddl_that_cannot_be_carried_fails_and_changes_nothing(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE p (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('p')")
    with pytest.raises(psycopg.Error, match="without a key") as failure:
        conn.execute("ALTER TABLE p DROP CONSTRAINT p_pkey")
    assert "untrack_table" in failure.value.diag.message_hint
    with pytest.raises(psycopg.Error, match="without a key"):
        conn.execute("ALTER TABLE p DROP COLUMN id")
    conn.execute("INSERT INTO p VALUES (1, 'still keyed')")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM p") == [[1, "still keyed"]]


def test_ddl_on_untracked_tables_and_drop_extension_are_unaffected(conn):
    conn.execute("CREATE TABLE other (id int)")
    conn.execute("ALTER TABLE other ADD COLUMN v text")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("ALTER TABLE other RENAME TO other2")
    conn.execute("DROP TABLE other2")
    assert pending(conn) == 1  # only t's create event
    conn.execute("DROP EXTENSION pgturso")
    conn.execute("ALTER TABLE t ADD COLUMN v text")
    conn.execute("DROP TABLE t")


# ------------------------------------------------------------------------------ DDL translation, no servers


def layout(target: str, cols: list[tuple[str, str, bool, int]], key: list[str], indexes=()) -> Any:
    from pgturso.capture.layout import TableLayout

    catalog = [{"name": n, "pg_type": t, "base_type": t, "not_null": nn, "attnum": num} for n, t, nn, num in cols]
    return TableLayout.from_catalog(f"public.{target}", target, catalog, key, indexes)


def test_swapped_column_names_go_through_temporary_names():
    from pgturso.delivery.statements import alter_table_statements

    old = layout("s", [("id", "int4", True, 1), ("a", "text", False, 2), ("b", "text", False, 3)], ["id"])
    new = layout("s", [("id", "int4", True, 1), ("b", "text", False, 2), ("a", "text", False, 3)], ["id"])
    assert alter_table_statements(old, new, recopy=False) == [
        'ALTER TABLE "s" RENAME COLUMN "a" TO "a_pgturso_rename"',
        'ALTER TABLE "s" RENAME COLUMN "b" TO "b_pgturso_rename"',
        'ALTER TABLE "s" RENAME COLUMN "a_pgturso_rename" TO "b"',
        'ALTER TABLE "s" RENAME COLUMN "b_pgturso_rename" TO "a"',
    ]


def test_key_or_not_null_change_rebuilds_inside_turso_and_type_change_recopies():
    from pgturso.capture.layout import change_between
    from pgturso.delivery.statements import alter_table_statements

    old = layout("r", [("id", "int4", True, 1), ("u", "text", False, 2)], ["id"], [{"name": "r_u", "columns": ["u"]}])
    new = layout("r", [("id", "int4", True, 1), ("u", "text", True, 2)], ["u"], [{"name": "r_u", "columns": ["u"]}])
    assert change_between(old, new).rebuild and not change_between(old, new).recopy
    assert alter_table_statements(old, new, recopy=False) == [
        'DROP TABLE IF EXISTS "_pgturso_rebuild_r"',
        'CREATE TABLE "_pgturso_rebuild_r" ("id" INTEGER NOT NULL, "u" TEXT NOT NULL, PRIMARY KEY ("u"))',
        'INSERT INTO "_pgturso_rebuild_r" ("id", "u") SELECT "id", "u" FROM "r"',
        'DROP TABLE IF EXISTS "r"',
        'ALTER TABLE "_pgturso_rebuild_r" RENAME TO "r"',  # (an index over just the key is left out)
    ]
    index = [{"name": "r_u", "columns": ["u"]}]
    widened = layout("r", [("id", "int8", True, 1), ("u", "varchar", False, 2)], ["id"], index)
    assert change_between(old, widened) == change_between(old, old)
    assert alter_table_statements(old, widened, recopy=False) == []
    retyped = layout("r", [("id", "int4", True, 1), ("u", "timestamptz", False, 2)], ["id"])
    assert change_between(old, retyped).recopy


def test_a_key_change_postgres_calls_equal_still_moves_the_row_on_turso(conn, dsn, turso):
    """citext 'Bob' = 'bob' and numeric 1.0 = 1.00 in Postgres, but they are different keys on Turso."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS citext")
    conn.execute("CREATE TABLE users (name citext PRIMARY KEY, v int)")
    conn.execute("CREATE TABLE amounts (n numeric PRIMARY KEY, v int)")
    conn.execute("INSERT INTO users VALUES ('Bob', 1)")
    conn.execute("INSERT INTO amounts VALUES (1.0, 1)")
    conn.execute("SELECT pgturso.track_table('users')")
    conn.execute("SELECT pgturso.track_table('amounts')")
    conn.execute("UPDATE users SET name = 'bob'")
    conn.execute("UPDATE amounts SET n = 1.00")
    drain(dsn, turso.url)
    assert turso.query("SELECT name, v FROM users") == [["bob", 1]]
    assert turso.query("SELECT n, v FROM amounts") == [["1.00", 1]]
