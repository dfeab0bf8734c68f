"""Attacks on capture => 'wal': what pgoutput's decoded stream hides, checked against the rows on Turso.

Each test runs in both capture modes (CAPTURE_MODES): trigger capture is the reference the wal mode must match.
"""

from __future__ import annotations

import hashlib

import psycopg
import pytest
from conftest import drain, pending
from support.turso import TursoServer

CAPTURE_MODES = ("trigger", "wal")

# A value stored out of line (TOASTed): random hex does not compress below the TOAST threshold.
BIG = "SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 400)"


def test_a_key_update_moving_a_row_into_the_filter_keeps_its_toasted_value(conn: psycopg.Connection, dsn: str,
                                                                        turso: TursoServer, capture: str):
    # A row moving into the filter reaches pgoutput as an insert, and a TOASTed value the UPDATE left alone is
    # "unchanged" in the new tuple: pgoutput fills it in from the old tuple, which holds it only under replica
    # identity FULL. With the key as identity (the filter uses the key alone) the row never reached Turso.
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, n int)")
    conn.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")
    conn.execute(f"INSERT INTO docs SELECT 1, ({BIG}), 1")
    conn.execute("SELECT pgturso.track_table('docs', row_filter => 'id > 100')")
    drain(dsn, turso.url)
    assert turso.query("SELECT count(*) FROM docs") == [[0]]

    conn.execute("UPDATE docs SET id = 101, n = 2 WHERE id = 1")  # into the filter; body not touched
    drain(dsn, turso.url)
    expected = conn.execute("SELECT id, length(body), md5(body), n FROM docs").fetchall()
    assert [list(r) for r in expected] == [[101, 12800, expected[0][2], 2]]
    assert turso.query("SELECT id, length(body), n FROM docs") == [[101, 12800, 2]]
    assert pending(conn) == 0



def test_the_owner_cannot_take_the_replica_identity_a_wal_table_needs(conn: psycopg.Connection, dsn: str,
                                                                      turso: TursoServer, capture: str):
    # The key on Turso is the primary key: an identity over another unique index would give the worker old
    # tuples without the key it deletes by, and a row-filtered table needs FULL (see the test above).
    conn.execute("CREATE TABLE acct (id int PRIMARY KEY, email text NOT NULL UNIQUE, body text)")
    conn.execute("ALTER TABLE acct ALTER COLUMN body SET STORAGE EXTERNAL")
    conn.execute(f"INSERT INTO acct SELECT 1, 'a@x', ({BIG})")
    conn.execute("INSERT INTO acct VALUES (2, 'b@x', 'b'), (3, 'c@x', 'c')")
    conn.execute("SELECT pgturso.track_table('acct', row_filter => 'id > 1')")
    drain(dsn, turso.url)
    for identity in ("USING INDEX acct_email_key", "DEFAULT", "NOTHING"):
        if capture == "wal":
            with pytest.raises(psycopg.errors.RaiseException, match="replica identity") as refused:
                conn.execute(f"ALTER TABLE acct REPLICA IDENTITY {identity}")
            assert "REPLICA IDENTITY FULL" in refused.value.diag.message_hint
        else:
            conn.execute(f"ALTER TABLE acct REPLICA IDENTITY {identity}")
    conn.execute("DELETE FROM acct WHERE id = 3")
    conn.execute("UPDATE acct SET id = 101 WHERE id = 1")  # into the filter, its TOASTed body untouched
    drain(dsn, turso.url)
    expected = [list(r) for r in conn.execute(
        "SELECT id, email, length(body) FROM acct WHERE id > 1 ORDER BY id").fetchall()]
    assert expected == [[2, "b@x", 1], [101, "a@x", 12800]]
    assert turso.query("SELECT id, email, length(body) FROM acct ORDER BY id") == expected
    assert pending(conn) == 0


def test_updates_leaving_a_toasted_value_alone_keep_it_on_turso(conn: psycopg.Connection, dsn: str,
                                                                turso: TursoServer, capture: str):
    # pgoutput sends an untouched TOASTed value as "unchanged": the worker must set the other columns only,
    # including when the key changes (the row is found by its old key), and for a table keyed by key_columns
    # without a unique index (identity FULL).
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, n int)")
    conn.execute("CREATE TABLE notes (tag text NOT NULL, body text, n int)")  # no unique index
    for table in ("docs", "notes"):
        conn.execute(f"ALTER TABLE {table} ALTER COLUMN body SET STORAGE EXTERNAL")
    conn.execute(f"INSERT INTO docs SELECT i, ({BIG}), i FROM generate_series(1, 3) i")
    conn.execute(f"INSERT INTO notes SELECT 't' || i, ({BIG}), i FROM generate_series(1, 2) i")
    conn.execute("SELECT pgturso.track_table('docs')")
    conn.execute("SELECT pgturso.track_table('notes', key_columns => ARRAY['tag'])")
    drain(dsn, turso.url)
    with conn.transaction():
        conn.execute("UPDATE docs SET n = n + 10 WHERE id = 1")
        conn.execute("UPDATE docs SET id = 20, n = 22 WHERE id = 2")  # key change, body untouched
        conn.execute("UPDATE docs SET id = 30 WHERE id = 3")
        conn.execute("UPDATE docs SET n = 33 WHERE id = 30")
        conn.execute("UPDATE notes SET n = 5 WHERE tag = 't1'")
        conn.execute("UPDATE notes SET tag = 't20' WHERE tag = 't2'")
    drain(dsn, turso.url)
    for table, columns in (("docs", "id, md5(body), n"), ("notes", "tag, md5(body), n")):
        expected = [list(r) for r in conn.execute(f"SELECT {columns} FROM {table} ORDER BY 1").fetchall()]
        rows = turso.query(f"SELECT {columns.replace('md5(body)', 'body')} FROM {table} ORDER BY 1")
        assert [[r[0], hashlib.md5(r[1].encode()).hexdigest(), r[2]] for r in rows] == expected, table
    assert pending(conn) == 0


def test_changes_of_a_rolled_back_savepoint_are_never_sent(conn: psycopg.Connection, dsn: str,
                                                           turso: TursoServer, capture: str):
    # The slot decodes the whole transaction, subtransactions included: rows and a schema change of a
    # subtransaction rolled back must not reach Turso, those around it must, in order and at once.
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t VALUES (1, 'one')")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    with conn.transaction():
        conn.execute("INSERT INTO t VALUES (2, 'two')")
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():  # a savepoint, rolled back
            conn.execute("ALTER TABLE t ADD COLUMN secret text DEFAULT 'leaked'")
            conn.execute("UPDATE t SET v = 'rolled back' WHERE id = 1")
            conn.execute("INSERT INTO t VALUES (3, 'rolled back', 'leaked')")
            conn.execute("DELETE FROM t WHERE id = 2")
            conn.execute("INSERT INTO t VALUES (1, 'dup')")
        conn.execute("UPDATE t SET v = 'kept' WHERE id = 1")
        with conn.transaction():  # a savepoint released
            conn.execute("INSERT INTO t VALUES (4, 'four')")
    with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():  # a whole transaction rolled back
        conn.execute("INSERT INTO t VALUES (5, 'five')")
        conn.execute("SELECT 1 / 0")
    drain(dsn, turso.url)
    assert [r[0] for r in turso.query("SELECT name FROM pragma_table_info('t') ORDER BY cid")] == ["id", "v"]
    assert turso.query("SELECT id, v FROM t ORDER BY id") == [[1, "kept"], [2, "two"], [4, "four"]]
    assert pending(conn) == 0


def test_tracking_again_with_another_row_filter_sends_exactly_the_new_filters_rows(conn: psycopg.Connection,
                                                                                    dsn: str, turso: TursoServer,
                                                                                    capture: str):
    # Changes decoded before the untrack were written under the old filter, those after under the new one; the
    # slot is read after all of it, with the new filter in the publication.
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    conn.execute("SELECT pgturso.track_table('t', row_filter => 'id > 10')")
    drain(dsn, turso.url)
    conn.execute("INSERT INTO t VALUES (5, 5), (15, 15)")
    conn.execute("UPDATE t SET id = 7 WHERE id = 15")  # out of the old filter, into the new one
    conn.execute("SELECT pgturso.untrack_table('t')")
    conn.execute("INSERT INTO t VALUES (6, 6), (16, 16)")
    conn.execute("SELECT pgturso.track_table('t', row_filter => 'id <= 10')")
    conn.execute("INSERT INTO t VALUES (8, 8), (18, 18)")
    conn.execute("UPDATE t SET id = 17 WHERE id = 5")  # out of the new filter
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM t ORDER BY id") == [[6, 6], [7, 15], [8, 8]]
    assert pending(conn) == 0



def test_the_row_filter_check_cannot_be_dropped_to_stop_the_slot(conn: psycopg.Connection, dsn: str,
                                                                 turso: TursoServer, capture: str):
    # pgoutput evaluates the filter while decoding: a row on which it raises would stop the slot (every table
    # of the target) for good. The CHECK pgturso_row_filter refuses such a row to its writer, so dropping it
    # must be refused too.
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, n int)")
    conn.execute("SELECT pgturso.track_table('t', row_filter => '10 / n > 1')")
    conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('other')")
    if capture == "wal":
        with pytest.raises(psycopg.errors.RaiseException, match="pgturso_row_filter") as refused:
            conn.execute("ALTER TABLE t DROP CONSTRAINT pgturso_row_filter")
        assert "untrack_table('public.t')" in refused.value.diag.message_hint
    with pytest.raises((psycopg.errors.CheckViolation, psycopg.errors.DivisionByZero)):
        conn.execute("INSERT INTO t VALUES (1, 0)")
    conn.execute("INSERT INTO t VALUES (2, 2)")
    conn.execute("INSERT INTO other VALUES (1)")
    drain(dsn, turso.url)
    assert turso.query("SELECT id FROM t ORDER BY id") == [[2]]
    assert turso.query("SELECT id FROM other") == [[1]]
    assert pending(conn) == 0
    conn.execute("SELECT pgturso.untrack_table('t')")  # pgturso's own drop of the constraint goes through
    assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = 'pgturso_row_filter'").fetchone() == (0,)


def test_drop_extension_and_drop_table_remove_a_filtered_wal_table_without_a_refusal(conn: psycopg.Connection,
                                                                                     capture: str):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, n int)")
    conn.execute("CREATE TABLE u (id int PRIMARY KEY, n int)")
    conn.execute("SELECT pgturso.track_table('t', row_filter => 'n > 1')")
    conn.execute("SELECT pgturso.track_table('u', row_filter => 'n > 1')")
    conn.execute("DROP TABLE u")
    conn.execute("DROP EXTENSION pgturso CASCADE")
    assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = 'pgturso_row_filter'").fetchone() == (0,)
    conn.execute("CREATE EXTENSION pgturso CASCADE")  # for the fixtures' teardown
