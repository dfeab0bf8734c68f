"""Attacks on capture => 'wal': what pgoutput's decoded stream hides, checked against the rows on Turso.

Each test runs in both capture modes (CAPTURE_MODES): trigger capture is the reference the wal mode must match.
"""

from __future__ import annotations

import psycopg
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
