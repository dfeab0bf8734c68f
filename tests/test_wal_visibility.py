"""A transaction decoded before it is visible to new snapshots: its new layout and events are waited for."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest
from support.workers import wait_for_sync, wait_until
from test_tenants import _start_worker, pg_tenant_rows, tenant_rows


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_pattern_ddl_decoded_before_its_commit_is_visible_is_still_routed(conn, dsn, tmp_path: Path):
    """The DDL's session waits in SyncRepWaitForLSN (a synchronous standby that never comes): its commit record
    is flushed and decoded, but the transaction stays in the proc array, invisible to new snapshots, which is
    the (normally microseconds wide) window between XLogFlush and ProcArrayEndTransaction."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id', "
                 "capture => 'wal')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a')")
    db = conn.execute("SELECT current_database()").fetchone()[0]
    conn.execute(f'ALTER DATABASE "{db}" SET synchronous_commit = local')
    conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    conn.execute("SELECT pg_reload_conf()")
    worker = _start_worker(dsn)
    ddl = psycopg.connect(dsn, autocommit=True)
    try:
        wait_for_sync(conn, "60 s", worker)
        ddl.execute("SET synchronous_commit = on")
        pid = ddl.info.backend_pid
        thread = threading.Thread(target=lambda: ddl.execute("ALTER TABLE orders ADD COLUMN note text DEFAULT 'n'"))
        thread.start()
        wait_until(lambda: conn.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)
                                        ).fetchone()[0] == "SyncRep", 30, "the DDL waiting for its standby")
        lsn = conn.execute("SELECT pg_current_wal_flush_lsn()").fetchone()[0]
        try:  # unfixed, the router goes past the DDL's transaction (its events dropped); fixed, it waits
            wait_until(lambda: conn.execute("SELECT confirmed_flush_lsn >= %s FROM pg_replication_slots",
                                            (lsn,)).fetchone()[0], 8, "router past the DDL")
        except AssertionError:
            pass
        conn.execute("SELECT pg_cancel_backend(%s)", (pid,))  # committed locally: visible now
        thread.join()
        conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("INSERT INTO orders VALUES (2, 'acme', 'b', 'x')")
        wait_for_sync(conn, "60 s", worker)
    finally:
        conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
        conn.execute("SELECT pg_reload_conf()")
        ddl.close()
        worker.stop()
    assert tenant_rows(tmp_path / "tenant-acme.db", "SELECT id, item, note FROM orders ORDER BY id") == \
        pg_tenant_rows(conn, "acme", "id, item, note")


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_plain_target_ddl_decoded_before_its_commit_is_visible_reaches_turso(conn, dsn, turso):
    """The same window for a plain wal target (no pattern, no router): its worker's decoding reads the layout
    the DDL made on the same READ COMMITTED connection."""
    from support.workers import WorkerProcess

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t VALUES (1, 'a')")
    db = conn.execute("SELECT current_database()").fetchone()[0]
    conn.execute(f'ALTER DATABASE "{db}" SET synchronous_commit = local')
    conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    conn.execute("SELECT pg_reload_conf()")
    worker = WorkerProcess(dsn, turso.url, "--idle-wait", "1").start()
    ddl = psycopg.connect(dsn, autocommit=True)
    try:
        wait_for_sync(conn, "60 s", worker)
        ddl.execute("SET synchronous_commit = on")
        pid = ddl.info.backend_pid
        thread = threading.Thread(target=lambda: ddl.execute("ALTER TABLE t ADD COLUMN note text DEFAULT 'n'"))
        thread.start()
        wait_until(lambda: conn.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)
                                        ).fetchone()[0] == "SyncRep", 30, "the DDL waiting for its standby")
        lsn = conn.execute("SELECT pg_current_wal_flush_lsn()").fetchone()[0]
        try:
            wait_until(lambda: conn.execute("SELECT bool_and(confirmed_flush_lsn >= %s) FROM pg_replication_slots",
                                            (lsn,)).fetchone()[0], 8, "worker past the DDL")
        except AssertionError:
            pass
        conn.execute("SELECT pg_cancel_backend(%s)", (pid,))
        thread.join()
        conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("INSERT INTO t VALUES (2, 'b', 'x')")
        wait_for_sync(conn, "60 s", worker)
    finally:
        conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
        conn.execute("SELECT pg_reload_conf()")
        ddl.close()
        worker.stop()
    assert turso.query("SELECT id, v, note FROM t ORDER BY id") == [[1, "a", "n"], [2, "b", "x"]]
