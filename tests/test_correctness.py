"""The ways a committed change could be lost or delivery could stop that issue 11 reproduced, each end to end
against real Postgres sessions, the real worker and a real tursodb, asserting on the rows that reached Turso.

- deferrable keys: refused, since a deferred uniqueness check breaks "conflicts order ids" (docs/design.md);
- unique columns besides the key: plain indexes on Turso, which never refuses a state Postgres committed;
- copies inside the caller's transaction under REPEATABLE READ / SERIALIZABLE;
- resync_table against writers that are open when it runs.

Each runs in both capture modes (CAPTURE_MODES): copies, DDL and resyncs go through the outbox in both.
The failover case is in test_guarantees.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from conftest import drain
from support.turso import TursoServer

CAPTURE_MODES = ["trigger", "wal"]


def rows(conn: psycopg.Connection[Any], sql: str) -> list[list[Any]]:
    return [list(r) for r in conn.execute(sql).fetchall()]


@contextmanager
def session(dsn: str, isolation: str | None = None) -> Iterator[psycopg.Connection[Any]]:
    """Another client, autocommit; ``isolation`` (e.g. 'repeatable read') is its default_transaction_isolation."""
    options = "-c default_transaction_isolation=" + isolation.replace(" ", "\\ ") if isolation else ""
    with psycopg.connect(dsn, autocommit=True, options=options) as conn:
        yield conn


def blocked(conn: psycopg.Connection[Any], pid: int) -> bool:
    row = conn.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return bool(row and row[0])


def run_blocked(conn: psycopg.Connection[Any], dsn_session: psycopg.Connection[Any], sql: str
                ) -> Callable[[], None]:
    """Start ``sql`` on ``dsn_session`` in a thread, wait until it waits for a lock; returns a join function
    that re-raises what the statement raised."""
    pid = dsn_session.info.backend_pid
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            dsn_session.execute(sql)
        except BaseException as exc:  # handed to the test thread by join()
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    while not blocked(conn, pid):
        if not thread.is_alive():
            break
        thread.join(0.02)

    def join() -> None:
        thread.join()
        if outcome:
            raise outcome[0]

    return join


# -- 1. deferrable keys ---------------------------------------------------------------------------------------


def test_a_deferrable_key_is_refused_with_the_fix(conn, capture):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text)")
    with pytest.raises(psycopg.errors.RaiseException) as caught:
        conn.execute("SELECT pgturso.track_table('t')")
    assert 'DEFERRABLE constraint "t_pkey"' in str(caught.value)
    assert "NOT DEFERRABLE" in (caught.value.diag.message_hint or "")
    # A unique constraint that can be deferred is no key either, even when it is immediate by default.
    conn.execute("CREATE TABLE u (id int NOT NULL, v text, CONSTRAINT u_id UNIQUE (id) DEFERRABLE)")
    with pytest.raises(psycopg.errors.RaiseException, match='DEFERRABLE constraint "u_id"'):
        conn.execute("SELECT pgturso.track_table('u')")
    assert conn.execute("SELECT count(*) FROM pgturso.tracked_table").fetchone() == (0,)


def test_an_immediate_unique_index_serves_when_the_primary_key_is_deferrable(conn, dsn, turso: TursoServer, capture):
    """The interleaving that lost a row with a deferred key: B inserts key 1 without waiting, A deletes the old
    row 1 and commits, B commits. Replicated by the immediate unique index, the order is right."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, code int NOT NULL UNIQUE, "
                 "v text)")
    conn.execute("INSERT INTO t VALUES (1, 1, 'old')")
    conn.execute("SELECT pgturso.track_table('t')")
    assert conn.execute("SELECT spec -> 'key_columns' FROM pgturso.layout").fetchone() == (["code"],)
    drain(dsn, turso.url)
    with session(dsn) as a, session(dsn) as b:
        b.execute("BEGIN")
        b.execute("INSERT INTO t VALUES (2, 2, 'new')")
        a.execute("DELETE FROM t WHERE id = 1")
        b.execute("COMMIT")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, code, v FROM t ORDER BY code") == rows(conn, "SELECT id, code, v FROM t")


# -- 2. unique columns besides the key ------------------------------------------------------------------------


def test_unique_columns_besides_the_key_never_stop_delivery(conn, dsn, turso: TursoServer, capture):
    conn.execute("CREATE TABLE s (id int PRIMARY KEY, u text UNIQUE)")
    conn.execute("CREATE TABLE w (id int PRIMARY KEY, u text, CONSTRAINT w_u UNIQUE (u) DEFERRABLE)")
    conn.execute("SELECT pgturso.track_table('s'), pgturso.track_table('w')")
    conn.execute("INSERT INTO s VALUES (2, 'b'), (1, 'a')")
    conn.execute("INSERT INTO w VALUES (1, 'a'), (2, 'b')")
    drain(dsn, turso.url)
    # Postgres moves 2 -> 3 before 1 -> 2; Turso gets "delete 1" then upserts (2,'a'), (3,'b') in any order.
    conn.execute("UPDATE s SET id = id + 1")
    conn.execute("UPDATE w SET u = CASE u WHEN 'a' THEN 'b' ELSE 'a' END")  # two rows swap unique values
    conn.execute("INSERT INTO s VALUES (1, 'c')")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, u FROM s ORDER BY id") == rows(conn, "SELECT id, u FROM s ORDER BY id")
    assert turso.query("SELECT id, u FROM w ORDER BY id") == [[1, "b"], [2, "a"]]
    # The unique index is on Turso for lookups, but plain: Postgres is the one that keeps it unique.
    assert turso.query("SELECT sql FROM sqlite_schema WHERE name = 's_u_key'") == [
        ['CREATE INDEX "s_u_key" ON "s" ("u")']]


# -- 3. copies inside the caller's transaction, under REPEATABLE READ and SERIALIZABLE --------------------------

SNAPSHOT_LEVELS = ["repeatable read", "serializable"]


@pytest.mark.parametrize("isolation", SNAPSHOT_LEVELS)
def test_track_table_in_an_old_snapshot_misses_no_writer(conn, dsn, turso: TursoServer, isolation, capture):
    """The statement's snapshot predates its lock wait: the writer's row is neither captured (no trigger yet)
    nor in that snapshot. The copy is left to the worker's READ COMMITTED chunks."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t VALUES (1, 'before')")
    with session(dsn) as writer, session(dsn, isolation) as tracker:
        writer.execute("BEGIN")
        writer.execute("INSERT INTO t VALUES (2, 'open while tracked')")
        join = run_blocked(conn, tracker, "SELECT pgturso.track_table('t')")
        writer.execute("COMMIT")
        join()
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM t ORDER BY id") == rows(conn, "SELECT id, v FROM t ORDER BY id")


@pytest.mark.parametrize("isolation", SNAPSHOT_LEVELS)
def test_a_recopying_schema_change_in_an_old_snapshot_misses_no_writer(conn, dsn, turso: TursoServer, isolation,
                                                                      capture):
    """ADD COLUMN with a default re-copies the table (and a table that looks empty in the old snapshot is
    re-copied too); so does a rewrite that changes values."""
    for table in ("t", "e", "r"):
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        conn.execute(f"SELECT pgturso.track_table('{table}')")
    conn.execute("INSERT INTO t VALUES (1, 'before')")
    conn.execute("INSERT INTO r VALUES (1, 'before')")
    drain(dsn, turso.url)
    with session(dsn) as writer, session(dsn, isolation) as ddl:
        writer.execute("BEGIN")
        for table in ("t", "e", "r"):
            writer.execute(f"INSERT INTO {table} VALUES (2, 'open during ALTER')")
        join = run_blocked(conn, ddl, "ALTER TABLE t ADD COLUMN c text DEFAULT 'x'; "
                                      "ALTER TABLE e ADD COLUMN c text DEFAULT 'x'; "
                                      "ALTER TABLE r ALTER COLUMN v TYPE text USING upper(v)")
        writer.execute("COMMIT")
        join()
    drain(dsn, turso.url)
    for table, columns in (("t", "id, v, c"), ("e", "id, v, c"), ("r", "id, v")):
        assert turso.query(f"SELECT {columns} FROM {table} ORDER BY id") == rows(
            conn, f"SELECT {columns} FROM {table} ORDER BY id")


def test_an_enum_change_recopies_after_open_writers(conn, dsn, turso: TursoServer, capture):
    """ALTER TYPE ... RENAME VALUE re-copies the tables holding the enum, but locks none of them: the recopy
    must wait for their open writers, whose events come before its recreate."""
    conn.execute("CREATE TYPE mood AS ENUM ('ok', 'sad')")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, m mood)")
    conn.execute("INSERT INTO t VALUES (1, 'ok')")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    with session(dsn) as writer, session(dsn) as ddl:
        writer.execute("BEGIN")
        writer.execute("INSERT INTO t VALUES (2, 'sad')")
        join = run_blocked(conn, ddl, "ALTER TYPE mood RENAME VALUE 'ok' TO 'fine'")
        writer.execute("COMMIT")
        join()
    drain(dsn, turso.url)
    assert turso.query("SELECT id, m FROM t ORDER BY id") == rows(conn, "SELECT id, m::text FROM t ORDER BY id")


def _partitioned(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100)")
    conn.execute("CREATE TABLE p2 (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO p VALUES (1, 'p1')")
    conn.execute("INSERT INTO p2 VALUES (150, 'p2')")
    conn.execute("SELECT pgturso.track_table('p')")


@pytest.mark.parametrize("isolation", SNAPSHOT_LEVELS)
def test_partitions_attached_detached_truncated_in_an_old_snapshot(conn, dsn, turso: TursoServer, isolation,
                                                                   capture):
    _partitioned(conn)
    drain(dsn, turso.url)
    # ATTACH: the worker copies the table in chunks (the old snapshot cannot see the writer's row).
    with session(dsn) as writer, session(dsn, isolation) as ddl:
        writer.execute("BEGIN")
        writer.execute("INSERT INTO p2 VALUES (151, 'open during ATTACH')")
        join = run_blocked(conn, ddl, "ALTER TABLE p ATTACH PARTITION p2 FOR VALUES FROM (100) TO (200)")
        writer.execute("COMMIT")
        join()
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM p ORDER BY id") == rows(conn, "SELECT id, v FROM p ORDER BY id")
    # A partition created in the same transaction holds no one else's rows: no copy needed, none refused.
    with session(dsn, isolation) as ddl:
        ddl.execute("CREATE TABLE p3 PARTITION OF p FOR VALUES FROM (200) TO (300)")
    # DETACH and TRUNCATE of a partition must read the keys leaving Turso: refused, with the fix named.
    for n, statement in enumerate(("ALTER TABLE p DETACH PARTITION p2", "TRUNCATE p1")):
        with session(dsn) as writer, session(dsn, isolation) as ddl:
            writer.execute("BEGIN")
            writer.execute("INSERT INTO p VALUES (%s, 'open'), (%s, 'open')", (152 + n, 2 + n))
            join = run_blocked(conn, ddl, statement)
            writer.execute("COMMIT")
            with pytest.raises(psycopg.errors.RaiseException, match=f"cannot run in a {isolation.upper()}") as caught:
                join()
            assert "READ COMMITTED" in (caught.value.diag.message_hint or "")
    with session(dsn, "read committed") as ddl:
        ddl.execute("ALTER TABLE p DETACH PARTITION p2")
        ddl.execute("TRUNCATE p1")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM p ORDER BY id") == rows(conn, "SELECT id, v FROM p ORDER BY id")


@pytest.mark.parametrize("isolation", SNAPSHOT_LEVELS)
def test_materialized_view_copies_refuse_an_old_snapshot(conn, dsn, isolation, capture):
    """A materialized view cannot be copied in chunks: its copy and its REFRESH difference are refused."""
    conn.execute("CREATE TABLE base (id int PRIMARY KEY)")
    conn.execute("CREATE MATERIALIZED VIEW mv AS SELECT id FROM base")
    conn.execute("CREATE UNIQUE INDEX mv_id ON mv (id)")
    with session(dsn, isolation) as other:
        with pytest.raises(psycopg.errors.RaiseException, match=r"track_table of table public\.mv"):
            other.execute("SELECT pgturso.track_table('mv')")
        conn.execute("SELECT pgturso.track_table('mv')")
        for call in ("refresh_materialized_view", "resync_table"):
            with pytest.raises(psycopg.errors.RaiseException, match=rf"{call} of table public\.mv cannot run"):
                other.execute(f"SELECT pgturso.{call}('mv')")


# -- 4. resync_table against open writers ---------------------------------------------------------------------


def test_resync_table_waits_for_open_writers(conn, dsn, turso: TursoServer, capture):
    """A writer open when resync_table runs has an event id below the recreate's; unless resync waits for it,
    the copy cannot see its row and the recreate wipes its upsert."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 5) g")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    with session(dsn) as writer, session(dsn) as resync, session(dsn) as worker:
        writer.execute("BEGIN")
        writer.execute("INSERT INTO t VALUES (100, 'open during resync')")
        join = run_blocked(conn, resync, "SELECT pgturso.resync_table('t')")
        # A copy chunk as the worker runs it (its own READ COMMITTED transaction), before the writer commits.
        worker.execute("SELECT pgturso._copy_chunk(id, 1000) FROM pgturso.tracked_table")
        writer.execute("COMMIT")
        join()
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM t ORDER BY id") == rows(conn, "SELECT id, v FROM t ORDER BY id")
