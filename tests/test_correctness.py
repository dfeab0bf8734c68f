"""The ways a committed change could be lost or delivery could stop that issue 11 reproduced, each end to end
against real Postgres sessions, the real worker and a real tursodb, asserting on the rows that reached Turso.

- deferrable keys: refused, since a deferred uniqueness check breaks "conflicts order ids" (docs/design.md);
- unique columns besides the key: plain indexes on Turso, which never refuses a state Postgres committed;
- copies inside the caller's transaction under REPEATABLE READ / SERIALIZABLE;
- resync_table against writers that are open when it runs.
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


def rows(conn: psycopg.Connection[Any], sql: str) -> list[list[Any]]:
    return [list(r) for r in conn.execute(sql).fetchall()]


@contextmanager
def session(dsn: str, isolation: str | None = None) -> Iterator[psycopg.Connection[Any]]:
    """Another client, autocommit; ``isolation`` becomes its default_transaction_isolation."""
    options = f"-c default_transaction_isolation={isolation.replace(' ', '_')}" if isolation else ""
    with psycopg.connect(dsn, autocommit=True, options=options.replace("_", "\\ ")) as conn:
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


def test_a_deferrable_key_is_refused_with_the_fix(conn):
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


def test_an_immediate_unique_index_serves_when_the_primary_key_is_deferrable(conn, dsn, turso: TursoServer):
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


def test_unique_columns_besides_the_key_never_stop_delivery(conn, dsn, turso: TursoServer):
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
