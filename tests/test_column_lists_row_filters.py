"""Column lists and row filters, end to end: what may not leave Postgres never reaches the outbox nor Turso,
and only the rows a filter lets through are on Turso, with updates moving rows in and out of it.

Every test runs in both capture modes (CAPTURE_MODES). With capture => 'wal' a row filter is the table's
filter in the publication the slot reads, so the rows it excludes are not even decoded for the worker."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg
import pytest
from conftest import drain, pending
from support.turso import TursoServer

CAPTURE_MODES = ("trigger", "wal")

# Publications holding row filters (pgturso_tables and pgturso_outbox, of capture => 'wal', always exist).
ROW_FILTER_PUBLICATIONS = "SELECT count(*) FROM pg_publication WHERE pubname LIKE 'pgturso\\_row\\_filter%'"


def verify(dsn: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgturso", "verify", "--dsn", dsn, "--url", url, *args],
                          capture_output=True, text=True, timeout=120)


def outbox_text(conn: psycopg.Connection[Any]) -> str:
    return "\n".join(r[0] or "" for r in conn.execute("SELECT payload FROM pgturso.outbox ORDER BY id").fetchall())


def sent_text(conn: psycopg.Connection[Any], capture: str) -> str:
    """What capture queued for the worker: outbox payloads, and in wal mode the row changes the slot decodes
    for it (pgoutput sends values as text)."""
    if capture != "wal":
        return outbox_text(conn)
    decoded = conn.execute(  # bytes that are not text (escaped as octal \ooo) are left out
        "SELECT string_agg(regexp_replace(encode(c.data, 'escape'), '\\\\[0-7]{3}', ' ', 'g'), E'\\n') "
        "FROM pgturso.target g "
        "CROSS JOIN LATERAL pg_logical_slot_peek_binary_changes(pgturso._slot_name(g.name), NULL, NULL, "
        "'proto_version', '1', 'publication_names', 'pgturso_tables') c").fetchone()[0]
    return outbox_text(conn) + "\n" + (decoded or "")


def turso_columns(turso: TursoServer, table: str) -> list[str]:
    return [r[0] for r in turso.query(f"SELECT name FROM pragma_table_info('{table}') ORDER BY cid")]


def turso_dump(turso: TursoServer, table: str) -> str:
    return repr(turso.query(f'SELECT * FROM "{table}"'))


def test_excluded_columns_never_leave_postgres(conn, dsn, turso: TursoServer, capture: str):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY, name text, plan text, password_hash text NOT NULL, "
                 "email text UNIQUE)")
    conn.execute("INSERT INTO users VALUES (1, 'ann', 'free', 'HASH-1', 'ann@secret.example')")
    conn.execute("SELECT pgturso.track_table('users', columns => ARRAY['id', 'name', 'plan'])")
    conn.execute("INSERT INTO users VALUES (2, 'bob', 'pro', 'HASH-2', 'bob@secret.example')")
    conn.execute("UPDATE users SET password_hash = 'HASH-1b', plan = 'pro' WHERE id = 1")
    conn.execute("UPDATE users SET id = 3, email = 'bob3@secret.example' WHERE id = 2")  # a key change
    queued = outbox_text(conn)
    if capture == "trigger":  # the outbox does carry the included columns (wal mode: the slot does)
        assert "ann" in queued and "bob" in queued
    assert "HASH" not in queued and "secret.example" not in queued
    drain(dsn, turso.url)
    assert turso_columns(turso, "users") == ["id", "name", "plan"]
    assert turso.query("SELECT id, name, plan FROM users ORDER BY id") == [[1, "ann", "pro"], [3, "bob", "pro"]]
    # the unique index on an excluded column stays on Postgres
    assert turso.query("SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND sql LIKE '%email%'") == [[0]]

    # A column added later is not replicated; dropping or renaming excluded columns changes nothing on Turso.
    conn.execute("ALTER TABLE users ADD COLUMN note text DEFAULT 'NOTE-DEFAULT'")
    conn.execute("INSERT INTO users VALUES (4, 'cy', 'free', 'HASH-4', 'cy@secret.example', 'NOTE-4')")
    conn.execute("ALTER TABLE users DROP COLUMN email")
    conn.execute("ALTER TABLE users RENAME COLUMN password_hash TO pw")
    conn.execute("UPDATE users SET pw = 'HASH-4b', note = 'NOTE-4b' WHERE id = 4")
    queued = outbox_text(conn)
    assert "NOTE" not in queued and "HASH" not in queued and "secret.example" not in queued
    assert conn.execute("SELECT count(*) FROM pgturso.outbox WHERE op = 'A'").fetchone() == (0,)
    drain(dsn, turso.url)
    assert turso_columns(turso, "users") == ["id", "name", "plan"]

    # An included column: ALTER COLUMN TYPE and RENAME work as for any tracked table.
    conn.execute("ALTER TABLE users ALTER COLUMN plan TYPE varchar(10)")
    conn.execute("ALTER TABLE users RENAME COLUMN name TO full_name")
    conn.execute("UPDATE users SET full_name = 'cyd', pw = 'HASH-4c' WHERE id = 4")
    assert "HASH" not in outbox_text(conn)
    drain(dsn, turso.url)
    assert turso_columns(turso, "users") == ["id", "full_name", "plan"]
    assert turso.query("SELECT id, full_name, plan FROM users ORDER BY id") == [
        [1, "ann", "pro"], [3, "bob", "pro"], [4, "cyd", "free"]]
    dump = turso_dump(turso, "users")
    assert "HASH" not in dump and "NOTE" not in dump and "secret" not in dump
    result = verify(dsn, turso.url, "users")
    assert result.returncode == 0, result.stdout + result.stderr
    assert pending(conn) == 0


def test_a_column_list_follows_ddl_on_included_columns_and_never_refuses_writes(conn, dsn, turso: TursoServer,
                                                                                capture: str):
    """Why wal mode does not make the column list the publication's (docs/design.md, "Column lists and row
    filters"): Postgres 15 makes a publication depend on every listed column, and then refuses ALTER COLUMN
    ... TYPE of an included column (no CASCADE exists) and DROP COLUMN without CASCADE (which takes the table
    out of the publication), and refuses every UPDATE and DELETE of the table once its replica identity is
    FULL and the list does not cover it. So in wal mode the excluded columns are decoded for the worker, which
    never sends them; here the DDL on included columns goes through in both modes, writes are never refused
    (FULL by key_columns, by a row filter, by the owner), and no excluded value reaches Turso."""
    conn.execute("CREATE TABLE users (id int PRIMARY KEY, name text, plan text, secret text)")
    conn.execute("CREATE TABLE notes (tag text NOT NULL, body text, secret text)")  # no unique index: FULL
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, status text, secret text)")
    conn.execute("SELECT pgturso.track_table('users', columns => ARRAY['id', 'name', 'plan'])")
    conn.execute("SELECT pgturso.track_table('notes', key_columns => ARRAY['tag'], columns => ARRAY['tag', 'body'])")
    conn.execute("SELECT pgturso.track_table('orders', columns => ARRAY['id', 'status'], "
                 "row_filter => $$status <> 'draft'$$)")
    conn.execute("INSERT INTO users VALUES (1, 'ann', 'free', 'SECRET-U1'), (2, 'bob', 'free', 'SECRET-U2')")
    conn.execute("INSERT INTO notes VALUES ('a', 'one', 'SECRET-N1'), ('b', 'two', 'SECRET-N2')")
    conn.execute("INSERT INTO orders VALUES (1, 'paid', 'SECRET-O1'), (2, 'draft', 'SECRET-O2')")
    conn.execute("UPDATE notes SET secret = 'SECRET-X' WHERE tag = 'a'")
    conn.execute("DELETE FROM notes WHERE tag = 'b'")
    conn.execute("UPDATE orders SET status = 'paid', secret = 'SECRET-X' WHERE id = 2")
    conn.execute("ALTER TABLE users REPLICA IDENTITY FULL")  # the owner's choice: writes go on
    conn.execute("UPDATE users SET plan = 'pro', secret = 'SECRET-U3' WHERE id = 1")
    conn.execute("DELETE FROM users WHERE id = 2")
    conn.execute("ALTER TABLE users REPLICA IDENTITY DEFAULT")
    conn.execute("ALTER TABLE users ALTER COLUMN name TYPE varchar(20)")  # included columns: as for any table
    conn.execute("ALTER TABLE users DROP COLUMN plan")
    conn.execute("INSERT INTO users VALUES (3, 'cy', 'SECRET-U4')")
    conn.execute("UPDATE users SET name = 'ann!' WHERE id = 1")
    assert "SECRET" not in outbox_text(conn)
    if capture == "wal":  # decoded for the worker (the publication has no column list): never sent on
        assert "SECRET-U4" in sent_text(conn, capture)
    drain(dsn, turso.url)
    assert turso_columns(turso, "users") == ["id", "name"]
    assert turso.query("SELECT * FROM users ORDER BY id") == [[1, "ann!"], [3, "cy"]]
    assert turso.query("SELECT * FROM notes ORDER BY tag") == [["a", "one"]]
    assert turso.query("SELECT * FROM orders ORDER BY id") == [[1, "paid"], [2, "paid"]]
    for table in ("users", "notes", "orders"):
        assert "SECRET" not in turso_dump(turso, table)
    assert pending(conn) == 0


def test_a_column_list_on_a_table_copied_in_chunks(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, v int, secret text)")
    conn.execute("INSERT INTO big SELECT g, g, 'SECRET-' || g FROM generate_series(1, 12000) g")
    conn.execute("SELECT pgturso.track_table('big', columns => ARRAY['v', 'id'])")
    table_id = conn.execute("SELECT id FROM pgturso.tracked_table WHERE relid = 'big'::regclass").fetchone()[0]
    assert conn.execute("SELECT pgturso._copy_chunk(%s, 5000)", (table_id,)).fetchone() == (5000,)
    assert "SECRET" not in outbox_text(conn) and pending(conn) > 1
    drain(dsn, turso.url)
    assert turso_columns(turso, "big") == ["id", "v"]  # in the table's column order
    assert turso.query("SELECT count(*), sum(v) FROM big") == [[12000, 12000 * 12001 // 2]]
    assert verify(dsn, turso.url, "big").returncode == 0


def test_column_list_errors(conn):
    conn.execute("CREATE TABLE u (id int PRIMARY KEY, tenant int NOT NULL, name text, UNIQUE (tenant, name))")
    with pytest.raises(psycopg.Error, match='key column "id" of public\\.u is not among the columns') as keyless:
        conn.execute("SELECT pgturso.track_table('u', columns => ARRAY['name'])")
    assert "include every key column" in keyless.value.diag.message_hint
    with pytest.raises(psycopg.Error, match='"nope" is not a column of public\\.u') as unknown:
        conn.execute("SELECT pgturso.track_table('u', columns => ARRAY['id', 'nope'])")
    assert "columns => ARRAY" in unknown.value.diag.message_hint
    with pytest.raises(psycopg.Error, match="is not a column of public\\.u"):
        conn.execute("SELECT pgturso.track_table('u', columns => ARRAY[]::text[])")
    assert conn.execute("SELECT count(*) FROM pgturso.tracked_table").fetchone() == (0,)
    # A later change that would key the table on an excluded column is refused, naming the fix.
    conn.execute("SELECT pgturso.track_table('u', columns => ARRAY['id', 'tenant'])")
    with pytest.raises(psycopg.Error, match='key column "name" of public\\.u is not among the columns'):
        conn.execute("ALTER TABLE u ALTER COLUMN name SET NOT NULL, DROP CONSTRAINT u_pkey")


def test_row_filter_moves_rows_in_and_out(conn, dsn, turso: TursoServer, capture: str):
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, status text, amount int)")
    conn.execute("INSERT INTO orders VALUES (1, 'draft', 1001), (2, 'paid', 2), (3, NULL, 1003)")
    conn.execute("SELECT pgturso.track_table('orders', row_filter => $$status <> 'draft'$$)")
    if capture == "wal":  # the filter uses a column outside the key: Postgres would refuse UPDATE and DELETE
        assert conn.execute("SELECT relreplident FROM pg_class WHERE relname = 'orders'").fetchone() == ("f",)
    drain(dsn, turso.url)
    assert turso.query("SELECT id, status, amount FROM orders ORDER BY id") == [[2, "paid", 2]]

    conn.execute("INSERT INTO orders VALUES (4, 'draft', 1004), (5, 'paid', 5)")
    conn.execute("UPDATE orders SET amount = 1001 WHERE id = 1")  # stays out: nothing is sent
    sent = sent_text(conn, capture)
    assert "paid" in sent and "1001" not in sent and "1004" not in sent
    conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1")  # into the filter: an insert
    conn.execute("UPDATE orders SET status = 'draft' WHERE id = 2")  # out of it: a delete
    with conn.transaction():  # one statement moving rows both ways and a key within the filter
        conn.execute("UPDATE orders SET status = CASE WHEN status = 'draft' THEN 'paid' ELSE 'draft' END "
                     "WHERE id IN (4, 5)")
        conn.execute("UPDATE orders SET id = 40 WHERE id = 4")
    conn.execute("INSERT INTO orders VALUES (6, 'paid', 6)")
    conn.execute("UPDATE orders SET id = 60, status = 'draft' WHERE id = 6")  # key change and out at once
    conn.execute("DELETE FROM orders WHERE id IN (2, 3)")  # rows that are not on Turso
    drain(dsn, turso.url)
    expected = [list(r) for r in conn.execute(
        "SELECT id, status, amount FROM orders WHERE status <> 'draft' ORDER BY id").fetchall()]
    assert expected == [[1, "paid", 1001], [40, "paid", 1004]]
    assert turso.query("SELECT id, status, amount FROM orders ORDER BY id") == expected

    # verify compares the filtered set: Postgres' draft rows are not missing on Turso ...
    clean = verify(dsn, turso.url, "orders")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "postgres 2 rows" in clean.stdout
    # ... and a row on Turso that the filter excludes is extra, and repaired away.
    turso.query("INSERT INTO orders VALUES (60, 'draft', 6)")
    found = verify(dsn, turso.url, "orders")
    assert found.returncode == 1 and "1 extra" in found.stdout
    assert verify(dsn, turso.url, "--repair", "orders").returncode == 1
    drain(dsn, turso.url)
    assert turso.query("SELECT id FROM orders ORDER BY id") == [[1], [40]]

    # The filter follows a rename of its column; a column it uses cannot be dropped.
    conn.execute("ALTER TABLE orders RENAME COLUMN status TO state")
    conn.execute("INSERT INTO orders VALUES (7, 'draft', 7), (8, 'new', 8)")
    with pytest.raises(psycopg.Error, match="depend"):
        conn.execute("ALTER TABLE orders DROP COLUMN state")
    with pytest.raises(psycopg.Error, match="row filter of tracked table public\\.orders is gone") as cascade:
        conn.execute("ALTER TABLE orders DROP COLUMN state CASCADE")
    assert "untrack the table first" in cascade.value.diag.message_hint
    drain(dsn, turso.url)
    assert turso.query("SELECT id, state FROM orders ORDER BY id") == [[1, "paid"], [8, "new"], [40, "paid"]]
    assert pending(conn) == 0

    # untrack_table removes the publication that held the filter (and the table from the slot's).
    conn.execute("SELECT pgturso.untrack_table('orders')")
    assert conn.execute(ROW_FILTER_PUBLICATIONS).fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pg_publication_tables WHERE tablename = 'orders'").fetchone() == (0,)


def test_row_filter_on_a_table_copied_in_chunks_and_a_partitioned_table(conn, dsn, turso: TursoServer,
                                                                       capture: str):
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, v int)")
    conn.execute("INSERT INTO big SELECT g, g FROM generate_series(1, 12000) g")
    conn.execute("SELECT pgturso.track_table('big', row_filter => 'v % 3 = 0')")
    conn.execute("CREATE TABLE ev (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)")
    conn.execute("CREATE TABLE ev_eu PARTITION OF ev FOR VALUES IN ('eu')")
    conn.execute("CREATE TABLE ev_us PARTITION OF ev FOR VALUES IN ('us')")
    conn.execute("INSERT INTO ev VALUES (1, 'eu'), (2, 'us')")
    conn.execute("SELECT pgturso.track_table('ev', row_filter => $$region = 'eu'$$)")
    conn.execute("INSERT INTO ev VALUES (3, 'eu'), (4, 'us')")
    conn.execute("UPDATE ev SET region = 'us' WHERE id = 1")  # moves partition and leaves the filter
    if capture == "wal":  # any row filter makes the replica identity FULL (partitions too; test_wal_attacks.py)
        identities = conn.execute("SELECT relname, relreplident FROM pg_class "
                                  "WHERE relname IN ('ev', 'ev_eu', 'ev_us', 'big') ORDER BY relname").fetchall()
        assert identities == [("big", "f"), ("ev", "f"), ("ev_eu", "f"), ("ev_us", "f")]
    drain(dsn, turso.url)
    assert turso.query("SELECT count(*), min(v), max(v) FROM big") == [[4000, 3, 12000]]
    assert turso.query("SELECT id FROM ev ORDER BY id") == [[3]]
    assert verify(dsn, turso.url).returncode == 0


@pytest.mark.parametrize(("row_filter", "message"), [
    ("random() > 0.5", "mutable functions are not allowed"),
    ("status = (SELECT min(status) FROM public.other)", "only columns, constants"),
    ("nope = 1", 'column "nope" does not exist'),
    ("amount", "must be type boolean"),
    ("status <> 'draft' AND", "syntax error"),
    ("orders.ctid IS NOT NULL", "system column"),
    ("public.my_check(status)", "user-defined"),
    ("count(*) > 1", "aggregate"),
])
def test_row_filter_errors(conn, row_filter: str, message: str):
    conn.execute("CREATE TABLE other (status text)")
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, status text, amount int)")
    conn.execute("CREATE FUNCTION my_check(text) RETURNS boolean IMMUTABLE LANGUAGE sql AS 'SELECT true'")
    with pytest.raises(psycopg.Error) as refused:
        conn.execute("SELECT pgturso.track_table('orders', row_filter => %s)", (row_filter,))
    error = refused.value.diag
    assert (error.message_primary or "").startswith("pgturso: row filter of public.orders is not allowed")
    assert message.lower() in ((error.message_primary or "") + (error.message_detail or "")).lower()
    assert "built-in immutable functions" in (error.message_hint or "")
    assert conn.execute("SELECT count(*) FROM pgturso.tracked_table").fetchone() == (0,)
    assert conn.execute(ROW_FILTER_PUBLICATIONS).fetchone() == (0,)


def test_row_filter_with_plpgsql_names_and_a_column_list(conn, dsn, turso: TursoServer):
    """Columns named like PL/pgSQL's own variables, a filter on a column that is not replicated."""
    conn.execute('CREATE TABLE t (id int PRIMARY KEY, "found" boolean, "new" text, hidden int)')
    conn.execute("SELECT pgturso.track_table('t', columns => ARRAY['id', 'new'], "
                 "row_filter => $$found AND hidden > 0$$)")
    conn.execute("INSERT INTO t VALUES (1, true, 'a', 1), (2, false, 'b', 1), (3, true, 'c', 0)")
    conn.execute("UPDATE t SET hidden = 5 WHERE id = 3")
    drain(dsn, turso.url)
    assert turso_columns(turso, "t") == ["id", "new"]
    assert turso.query("SELECT id, new FROM t ORDER BY id") == [[1, "a"], [3, "c"]]
    assert verify(dsn, turso.url, "t").returncode == 0


def test_a_row_the_filter_fails_on_is_refused_to_its_writer(conn, dsn, turso: TursoServer, capture: str):
    """A filter that raises on a row (a division by zero): trigger capture evaluates it in the writer's
    statement; pgoutput would evaluate it while decoding and stop the slot for good, so in wal mode a CHECK
    constraint evaluates it for the writer. Either way the writer gets the error, and nothing else stops."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, n int)")
    conn.execute("INSERT INTO t VALUES (1, 0)")
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT pgturso.track_table('t', row_filter => '10 / n > 1')")
    conn.execute("DELETE FROM t")
    conn.execute("SELECT pgturso.track_table('t', row_filter => '10 / n > 1')")
    conn.execute("INSERT INTO t VALUES (1, 1), (2, 20)")
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("INSERT INTO t VALUES (3, 0)")
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("UPDATE t SET n = 0 WHERE id = 2")
    conn.execute("UPDATE t SET n = 2 WHERE id = 2")  # into the filter
    conn.execute("DELETE FROM t WHERE id = 1")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, n FROM t") == [[2, 2]]
    assert pending(conn) == 0
    conn.execute("SELECT pgturso.untrack_table('t')")
    conn.execute("INSERT INTO t VALUES (3, 0)")  # no filter left behind
