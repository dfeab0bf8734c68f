"""Databases whose encoding is not UTF-8: Turso stores text as UTF-8, so what a LATIN1 or WIN1252 database
holds must arrive as the same characters, in both capture modes, for plain and pattern targets; a SQL_ASCII
database (bytes of no declared encoding) is refused at track_table with the fix.

Each test makes its own database of the test's cluster in the encoding it needs (the fixtures' are UTF8) and
reads Postgres back over a UTF8 connection, so that both sides are compared as the same Python strings."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import _kill_workers, run_worker
from support.turso import TursoServer
from test_tenants import tenant_rows

# Characters of each encoding beyond ASCII (WIN1252 has the typographic ones LATIN1 lacks in 0x80-0x9F).
SAMPLES = {
    "LATIN1": ["café", "½ × ÷ ÿ Ø ß", "naïve «guillemets»"],  # noqa: RUF001
    "WIN1252": ["café €5", "“quoted” – dash ™", "Œuvre ‰ š"],  # noqa: RUF001
}
TABLE = "commandes_é"
SELECT = 'SELECT "clé", "désignation", n FROM "commandes_é" ORDER BY "clé"'


@contextlib.contextmanager
def encoded_database(conn: psycopg.Connection[Any], encoding: str, capture: str = "wal") -> Iterator[str]:
    """A database of the test's cluster in ``encoding`` with pgturso installed (its targets capturing by
    ``capture``): its DSN. Dropped after, with its slots (a slot left behind blocks DROP DATABASE)."""
    info = conn.info
    name = f"{info.dbname}_{encoding.lower()}"
    conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.execute(f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    dsn = f"host={info.host} port={info.port} user={info.user} dbname={name}"
    try:
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute("CREATE EXTENSION pgturso CASCADE")
            db.execute("UPDATE pgturso.target SET capture = %s", (capture,))
        yield dsn
    finally:
        _kill_workers()
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute("SELECT pgturso._drop_slot(name) FROM pgturso.target")
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def utf8(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True, client_encoding="UTF8")


@pytest.mark.parametrize("encoding", sorted(SAMPLES))
@pytest.mark.parametrize("mode", ["trigger", "wal"])
def test_text_and_names_of_a_non_utf8_database_arrive_as_the_same_characters(conn, turso: TursoServer,
                                                                               encoding: str, mode: str):
    """A table, columns and values (a text key among them) with characters beyond ASCII: the initial copy,
    inserts, an update changing the key, a delete. Before, the worker read the database's bytes as UTF-8:
    trigger capture failed on the layout's jsonb (UnicodeDecodeError, nothing delivered) and so did a wal
    target's stream; now Turso has what Postgres has, character for character."""
    first, second, third = SAMPLES[encoding]
    with encoded_database(conn, encoding, mode) as dsn, utf8(dsn) as db:
        db.execute(f'CREATE TABLE "{TABLE}" ("clé" text PRIMARY KEY, "désignation" text, n int)')
        db.execute(f'INSERT INTO "{TABLE}" VALUES (%s, %s, 0)', (first, second))  # the initial copy's
        db.execute(f"SELECT pgturso.track_table('\"{TABLE}\"', capture => %s)", (mode,))
        db.execute(f'INSERT INTO "{TABLE}" VALUES (%s, %s, 1), (%s, %s, 2)', (second, third, third, first))
        db.execute(f'UPDATE "{TABLE}" SET "clé" = %s, "désignation" = %s WHERE "clé" = %s',
                   (first + " " + third, third + second, first))
        db.execute(f'DELETE FROM "{TABLE}" WHERE "clé" = %s', (third,))
        result = run_worker(dsn, turso.url, timeout=90)
        assert result.returncode == 0, result.stderr
        expected = [tuple(r) for r in db.execute(SELECT).fetchall()]
        assert len(expected) == 2 and any("€" in v or "é" in v for row in expected for v in row[:2])
        assert [tuple(r) for r in turso.query(SELECT)] == expected


@pytest.mark.parametrize("mode", ["trigger", "wal"])
def test_a_sql_ascii_database_is_refused_at_track_table_with_the_fix(conn, mode: str):
    """SQL_ASCII declares no encoding: its bytes cannot be converted to the UTF-8 Turso stores. track_table
    says so and how to fix it (before: a PL/Python conversion error for a non-ASCII name, and no error at all
    for ASCII names, leaving the worker to fail on the first non-UTF-8 byte)."""
    with encoded_database(conn, "SQL_ASCII", mode) as dsn, utf8(dsn) as db:
        db.execute("CREATE TABLE plain (id int PRIMARY KEY, v text)")
        with pytest.raises(psycopg.errors.RaiseException) as failure:
            db.execute("SELECT pgturso.track_table('plain', capture => %s)", (mode,))
        message = str(failure.value)
        assert "plain" in message and "SQL_ASCII" in message and "UTF-8" in message, message
        assert "ENCODING 'UTF8'" in failure.value.diag.message_hint
        assert db.execute("SELECT count(*) FROM pgturso.tracked_table").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
                          ).fetchone()[0] == 0


@pytest.mark.parametrize("mode", ["trigger", "wal"])
def test_routed_rows_beyond_ascii_reach_their_tenants_intact_in_a_latin1_database(conn, tmp_path: Path, mode: str):
    """A pattern in a LATIN1 database: routed rows with values beyond ASCII reach each tenant's database intact
    (the router read the walsender's LATIN1 bytes as UTF-8 before: a UnicodeDecodeError on every batch,
    nothing routed). Tenant values name databases, so they are ASCII letters, digits, _ . - (_check_tenant);
    in wal capture one beyond ASCII is parked in pgturso.blocked_tenant under its own characters, and the
    other tenants go on (trigger capture refuses it in the writer's transaction, as for any bad value)."""
    with encoded_database(conn, "LATIN1", mode) as dsn, utf8(dsn) as db:
        db.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
        db.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
        db.execute("SELECT pgturso.track_table('orders', target => %s, route_by => 'tenant_id', capture => %s)",
                   ("tenant-%s", mode))
        db.execute("INSERT INTO orders VALUES (1, 'zurich', 'crème brûlée'), (2, 'geneve', '½ kg'), "
                   "(3, 'zurich', 'plain'), (4, 'acme', 'ÿ')")
        db.execute("UPDATE orders SET item = 'déjà vu' WHERE id = 3")
        if mode == "wal":
            db.execute("INSERT INTO orders VALUES (5, 'zürich', 'parked')")
        else:
            with pytest.raises(psycopg.errors.RaiseException, match="tenant value \"zürich\""):
                db.execute("INSERT INTO orders VALUES (5, 'zürich', 'refused')")
        result = run_worker(dsn, "", "--target", "tenant-%s", timeout=90)
        assert result.returncode == 0, result.stderr
        registered = [r[0] for r in db.execute(
            "SELECT name FROM pgturso.target WHERE pattern = %s ORDER BY name", ("tenant-%s",)).fetchall()]
        assert registered == ["tenant-acme", "tenant-geneve", "tenant-zurich"]
        for tenant in ("zurich", "geneve", "acme"):
            expected = [tuple(r) for r in db.execute(
                "SELECT id, item FROM orders WHERE tenant_id = %s ORDER BY id", (tenant,)).fetchall()]
            assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id"
                               ) == expected, tenant
        parked = [r[0] for r in db.execute("SELECT tenant FROM pgturso.blocked_tenant").fetchall()]
        assert parked == (["zürich"] if mode == "wal" else [])


@pytest.mark.parametrize("mode", ["trigger", "wal"])
def test_sync_and_verify_in_a_latin1_database_deliver_and_compare_the_same_characters(conn, turso: TursoServer,
                                                                                       mode: str):
    """pgturso.sync() (the worker's code in the backend, connecting back) delivers a LATIN1 database's text as
    the same characters, and pgturso-worker verify then finds Postgres and Turso equal (it reads both sides'
    text: a wrongly decoded side would differ)."""
    first, second, third = SAMPLES["LATIN1"]
    with encoded_database(conn, "LATIN1", mode) as dsn, utf8(dsn) as db:
        db.execute(f'CREATE TABLE "{TABLE}" ("clé" text PRIMARY KEY, "désignation" text, n int)')
        db.execute(f"SELECT pgturso.track_table('\"{TABLE}\"', capture => %s)", (mode,))
        db.execute(f'INSERT INTO "{TABLE}" VALUES (%s, %s, 1), (%s, %s, 2)', (first, second, third, first))
        assert db.execute("SELECT pgturso.sync(url => %s)", (turso.url,)).fetchone()[0] >= 1
        expected = [tuple(r) for r in db.execute(SELECT).fetchall()]
        assert [tuple(r) for r in turso.query(SELECT)] == expected
        verified = subprocess.run([sys.executable, "-m", "pgturso", "verify", "--dsn", dsn, "--url", turso.url],
                                  capture_output=True, text=True, timeout=120)
        assert verified.returncode == 0, verified.stdout + verified.stderr
