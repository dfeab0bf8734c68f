"""Table shapes end to end: odd identifiers, tables without a primary key, partitioned tables and
materialized views, each written in Postgres and read back from a real tursodb."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from conftest import drain, pending
from support.turso import TursoServer

CAPTURE_MODES = ("trigger", "wal")  # every test here runs in both capture modes (conftest)


def pg_rows(conn: psycopg.Connection[Any], sql: str) -> list[list[Any]]:
    return [list(r) for r in conn.execute(sql).fetchall()]


LONG = "x" * 60 + "end"  # 63 bytes, Postgres's longest identifier
UNICODE_LONG = "é" * 31 + "z"  # 63 bytes of UTF-8


def test_identifiers_of_every_kind(conn, dsn, turso: TursoServer):
    conn.execute('CREATE SCHEMA "Sales.EU"')
    columns = ['"Mixed Case"', '"with ""quotes"""', '"dot.ted"', '"select"', f'"{LONG}"', f'"{UNICODE_LONG}"', '"ü 😀"']
    conn.execute(f'CREATE TABLE "Sales.EU"."{LONG}" (id int PRIMARY KEY, {", ".join(c + " text" for c in columns)})')
    conn.execute(f'CREATE INDEX "{UNICODE_LONG}" ON "Sales.EU"."{LONG}" ("select")')
    conn.execute(f'INSERT INTO "Sales.EU"."{LONG}" VALUES (1, {", ".join(repr(str(i)) for i in range(len(columns)))})')
    conn.execute("SELECT pgturso.track_table(%s)", [f'"Sales.EU"."{LONG}"'])
    conn.execute(f'UPDATE "Sales.EU"."{LONG}" SET "with ""quotes""" = \'q\', "ü 😀" = \'😀\'')
    conn.execute('CREATE TABLE "order" ("group" int PRIMARY KEY, "from" text)')
    conn.execute("SELECT pgturso.track_table('\"order\"', target_table => 'orders \"v2\"')")
    conn.execute("INSERT INTO \"order\" VALUES (1, 'kw')")
    drain(dsn, turso.url)

    target = f"Sales.EU.{LONG}"  # schema.table outside public
    names = [r[0] for r in turso.query(f"SELECT name FROM pragma_table_info('{target}') ORDER BY cid")]
    assert names == ["id", "Mixed Case", 'with "quotes"', "dot.ted", "select", LONG, UNICODE_LONG, "ü 😀"]
    assert turso.query(f'SELECT "with ""quotes""", "ü 😀", "{UNICODE_LONG}" FROM "{target}"') == [["q", "😀", "5"]]
    # (tursodb 0.6 records index names in lower case; SQLite compares names ignoring ASCII case anyway)
    assert turso.query("SELECT name, tbl_name FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL") == [
        [f"sales.eu.{UNICODE_LONG}", target.lower()]
    ]
    assert turso.query('SELECT "group", "from" FROM "orders ""v2"""') == [[1, "kw"]]


def test_names_that_sqlite_cannot_tell_apart_are_refused(conn):
    conn.execute('CREATE TABLE "Case" (id int PRIMARY KEY)')
    conn.execute('CREATE TABLE "case" (id int PRIMARY KEY, "v" int, "V" int)')
    conn.execute("SELECT pgturso.track_table('\"Case\"')")
    with pytest.raises(psycopg.Error, match="already replicates"):
        conn.execute("SELECT pgturso.track_table('\"case\"')")
    with pytest.raises(psycopg.Error, match="differ only in case"):
        conn.execute("SELECT pgturso.track_table('\"case\"', target_table => 'case2')")


def test_tables_without_a_primary_key(conn, dsn, turso: TursoServer):
    # A unique index over NOT NULL columns serves as the key.
    conn.execute("CREATE TABLE u (code text NOT NULL, region int NOT NULL, v text, UNIQUE (region, code))")
    conn.execute("INSERT INTO u VALUES ('a', 1, 'one'), ('b', 1, 'two')")
    conn.execute("SELECT pgturso.track_table('u')")
    conn.execute("UPDATE u SET code = 'c' WHERE code = 'a'")
    conn.execute("DELETE FROM u WHERE code = 'b'")
    # No unique index at all: the user names the key, which pgturso checks now (NOT NULL, no duplicates).
    conn.execute("CREATE TABLE logs (ts int NOT NULL, host text NOT NULL, msg text, maybe int)")
    conn.execute("INSERT INTO logs VALUES (1, 'a', 'x'), (1, 'b', 'y')")
    with pytest.raises(psycopg.Error, match="no primary key") as no_key:
        conn.execute("SELECT pgturso.track_table('logs')")
    assert "key_columns" in no_key.value.diag.message_hint
    with pytest.raises(psycopg.Error, match="duplicate values"):
        conn.execute("SELECT pgturso.track_table('logs', key_columns => ARRAY['ts'])")
    with pytest.raises(psycopg.Error, match="may be NULL") as nullable:
        conn.execute("SELECT pgturso.track_table('logs', key_columns => ARRAY['ts', 'maybe'])")
    assert "SET NOT NULL" in nullable.value.diag.message_hint
    with pytest.raises(psycopg.Error, match="is not a column"):
        conn.execute("SELECT pgturso.track_table('logs', key_columns => ARRAY['nope'])")
    conn.execute("SELECT pgturso.track_table('logs', key_columns => ARRAY['ts', 'host'])")
    conn.execute("UPDATE logs SET msg = 'changed' WHERE host = 'b'")
    conn.execute("INSERT INTO logs VALUES (2, 'a', 'z')")
    conn.execute("ALTER TABLE logs ADD PRIMARY KEY (ts, host)")  # the given key stays the key
    drain(dsn, turso.url)
    assert turso.query("SELECT code, region, v FROM u") == [["c", 1, "one"]]
    assert 'PRIMARY KEY ("region", "code")' in turso.query("SELECT sql FROM sqlite_schema WHERE name = 'u'")[0][0]
    assert turso.query("SELECT ts, host, msg FROM logs ORDER BY ts, host") == pg_rows(
        conn, "SELECT ts, host, msg FROM logs ORDER BY ts, host"
    )


def test_partitioned_table_feeds_one_turso_table(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE m (id int, day int, v text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)")
    conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10)")
    conn.execute("CREATE TABLE m2 PARTITION OF m FOR VALUES FROM (10) TO (20) PARTITION BY LIST (id)")
    conn.execute("CREATE TABLE m2a PARTITION OF m2 DEFAULT")
    conn.execute("INSERT INTO m VALUES (1, 1, 'a'), (2, 12, 'b')")
    with pytest.raises(psycopg.Error, match="is a partition") as part:
        conn.execute("SELECT pgturso.track_table('m1')")
    assert "track_table('public.m')" in part.value.diag.message_hint
    conn.execute("SELECT pgturso.track_table('m')")
    conn.execute("INSERT INTO m1 VALUES (3, 3, 'straight into a partition')")
    conn.execute("UPDATE m SET day = 15 WHERE id = 1")  # moves between partitions
    conn.execute("CREATE TABLE m3 PARTITION OF m FOR VALUES FROM (20) TO (30)")  # created later
    conn.execute("INSERT INTO m3 VALUES (4, 25, 'new partition')")
    conn.execute("CREATE TABLE m4 (LIKE m)")
    conn.execute("INSERT INTO m4 VALUES (5, 35, 'attached with rows')")
    conn.execute("ALTER TABLE m ATTACH PARTITION m4 FOR VALUES FROM (30) TO (40)")
    conn.execute("UPDATE m4 SET v = 'updated in attached'")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, day, v FROM m ORDER BY id") == pg_rows(conn, "SELECT * FROM m ORDER BY id")

    conn.execute("TRUNCATE m1")  # only m1's rows go
    conn.execute("ALTER TABLE m DETACH PARTITION m3")  # its rows leave the table
    conn.execute("INSERT INTO m3 VALUES (6, 26, 'no longer tracked')")
    with pytest.raises(psycopg.Error, match="partition of a tracked") as dropped:
        conn.execute("DROP TABLE m4")
    assert "DETACH PARTITION" in dropped.value.diag.message_hint
    conn.execute("ALTER TABLE m ADD COLUMN w int")  # a schema change reaches every partition
    conn.execute("INSERT INTO m4 VALUES (7, 37, 'after alter', 7)")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, day, v, w FROM m ORDER BY id") == pg_rows(conn, "SELECT * FROM m ORDER BY id")
    conn.execute("TRUNCATE m")
    drain(dsn, turso.url)
    assert turso.query("SELECT count(*) FROM m") == [[0]]


def test_materialized_view_refresh_ships_only_changed_rows(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE sales (region text, amount int)")
    conn.execute("INSERT INTO sales SELECT 'r' || (g % 50), g FROM generate_series(1, 1000) g")
    conn.execute("CREATE MATERIALIZED VIEW totals AS SELECT region, sum(amount) AS total, count(*) AS n "
                 "FROM sales GROUP BY region")
    conn.execute("CREATE UNIQUE INDEX ON totals (region)")
    conn.execute("SELECT pgturso.track_table('totals')")
    drain(dsn, turso.url)
    assert turso.query("SELECT count(*), sum(total) FROM totals") == [[50, 500500]]

    conn.execute("INSERT INTO sales VALUES ('r1', 1000), ('new', 5)")
    conn.execute("DELETE FROM sales WHERE region = 'r2'")
    conn.execute("SELECT pgturso.refresh_materialized_view('totals')")
    shipped = pg_rows(conn, "SELECT op, sum(nrows) FROM pgturso.outbox GROUP BY op ORDER BY op")
    assert shipped == [["D", 1], ["U", 2]]  # r2 gone; r1 changed and 'new' appeared: 3 of 51 rows
    conn.execute("SELECT pgturso.refresh_materialized_view('totals', concurrently => true)")  # nothing changed
    assert pending(conn) == 2
    drain(dsn, turso.url)
    assert turso.query("SELECT region, total, n FROM totals ORDER BY region") == pg_rows(
        conn, "SELECT region, total, n FROM totals ORDER BY region"
    )
    conn.execute("INSERT INTO sales VALUES ('r1', 1)")
    conn.execute("REFRESH MATERIALIZED VIEW totals")  # a plain REFRESH: the view is sent afresh
    assert pg_rows(conn, "SELECT op, sum(nrows) FROM pgturso.outbox GROUP BY op ORDER BY op") == [["A", 0], ["U", 50]]
    drain(dsn, turso.url)
    assert turso.query("SELECT region, total, n FROM totals ORDER BY region") == pg_rows(
        conn, "SELECT region, total, n FROM totals ORDER BY region"
    )
    with pytest.raises(psycopg.Error, match="not a tracked materialized view"):
        conn.execute("SELECT pgturso.refresh_materialized_view('sales')")
