"""The initial copy of a pattern's table into many tenant databases (bench 11a's path): a new database gets its
marker table in its first batch's transaction, the copy gathers each tenant's rows while it runs
(fanout.COPY_STEP_SECONDS), and a worker SIGKILLed in the middle of the copy, or of the tenants' deliveries after
it, leaves every tenant exact once another worker finishes. Asserted on the rows in each tenant's `file:`
database."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import pending
from support.workers import WorkerProcess, wait_until
from test_tenants import drain_pattern, pg_tenant_rows, tenant_rows


def test_a_fresh_databases_marker_table_comes_with_its_first_batch_and_still_fences(tmp_path: Path):
    """Recovery only reads (MARKER_TABLE_EXISTS_SQL) and the first batch creates the marker table: if another
    worker created it and wrote its marker in between, the batch is refused whole, as over any moved marker."""
    from pgturso.common.errors import MarkerMoved
    from pgturso.delivery.pipeline import send_batch
    from pgturso.delivery.progress import MARKER_TABLE_EXISTS_SQL, marker_statements
    from pgturso.delivery.statements import Statement
    from pgturso.delivery.targets import FileTarget

    target = FileTarget(str(tmp_path / "fresh.db"))
    try:
        assert target.query(MARKER_TABLE_EXISTS_SQL) == [[0]]
        first = [Statement("CREATE TABLE t (id INTEGER PRIMARY KEY)"), Statement("INSERT INTO t VALUES (1)")]
        send_batch(target, first, marker_statements("src", "M1", "", create=True))
        assert target.query(MARKER_TABLE_EXISTS_SQL) == [[1]]
        assert target.query("SELECT applied_ids FROM _pgturso_progress") == [["M1"]]
        # A second worker that also found no table (it recovered before the first batch) is fenced out.
        with pytest.raises(MarkerMoved, match="another worker delivered"):
            send_batch(target, [Statement("INSERT INTO t VALUES (2)")], marker_statements("src", "M2", "", create=True))
        assert target.query("SELECT id FROM t") == [[1]]
        assert target.query("SELECT applied_ids FROM _pgturso_progress") == [["M1"]]
    finally:
        target.close()


def test_a_copy_reaches_each_new_tenant_in_one_batch_with_its_tables_and_marker(conn, dsn, tmp_path: Path):
    """The copy's rows of a new tenant, its tables and its marker table arrive in one batch (one Turso
    transaction: recovery wrote nothing), and the tenant is delivered to as usual afterwards."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("INSERT INTO orders SELECT g, 'k' || (g % 3), 'seed' FROM generate_series(1, 30) g")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    result = drain_pattern(dsn)
    for tenant in ("k0", "k1", "k2"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant)
        assert len(tenant_rows(path, "SELECT applied_ids FROM _pgturso_progress")) == 1
    # One delivered batch per tenant: the copy's rows with the tables and the marker, no separate commit.
    assert result.stderr.count("event=delivered") == 3, result.stderr
    conn.execute("INSERT INTO orders VALUES (100, 'k1', 'later')")
    drain_pattern(dsn)
    assert tenant_rows(tmp_path / "tenant-k1.db", "SELECT id, item FROM orders ORDER BY id") == \
        pg_tenant_rows(conn, "k1")


def _copy_progress(conn: psycopg.Connection) -> tuple[str, int]:
    state, done = conn.execute("SELECT copy_state, copy_rows_done FROM pgturso.tracked_table "
                               "WHERE relid = 'orders'::regclass").fetchone()
    return str(state), int(done)


def test_a_copy_into_many_tenants_sigkilled_midway_ends_exact_in_every_tenant(conn, dsn, tmp_path: Path):
    """300 tenants' rows (12,000: more than track_table copies itself) copied in 50-row chunks while a writer
    inserts, updates and moves rows between tenants; the worker is SIGKILLed in the middle of the copy, a
    second one in the middle of the tenants' deliveries after it, and a third finishes. Every tenant's
    database ends equal to its rows in Postgres: a batch applied twice, or an old one applied after a newer
    one (an update replayed over a later one, a moved row back in its old tenant), would leave a row
    different or extra there."""
    tenants = 300
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text, qty int)")
    conn.execute(f"INSERT INTO orders SELECT g, 'k' || (g % {tenants}), 'seed', 0 FROM generate_series(1, 12000) g")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    env = {"PGTURSO_COPY_CHUNK_ROWS": "50", "PGTURSO_RETRY_BASE_DELAY": "0.05", "PGTURSO_RETRY_MAX_DELAY": "1"}
    stop = threading.Event()
    errors: list[str] = []

    def write() -> None:
        rng = random.Random(7)
        with psycopg.connect(dsn, autocommit=True) as writer:
            n = 100_000
            while not stop.is_set():
                n += 1
                try:
                    with writer.transaction():
                        writer.execute("INSERT INTO orders VALUES (%s, %s, 'live', 0)",
                                       (n, f"k{rng.randrange(tenants)}"))
                        writer.execute("UPDATE orders SET qty = qty + 1 WHERE id = %s", (rng.randrange(1, 12001),))
                        if n % 5 == 0:  # a move: deleted in the old tenant's database, inserted in the new one's
                            writer.execute("UPDATE orders SET tenant_id = %s WHERE id = %s",
                                           (f"k{rng.randrange(tenants)}", rng.randrange(1, 12001)))
                except Exception as exc:  # the test's subject is the worker: the writer must never fail
                    errors.append(repr(exc))
                time.sleep(0.01)

    writer = threading.Thread(target=write)
    workers: list[WorkerProcess] = []
    writer.start()
    try:
        first = WorkerProcess(dsn, "", "--target", "tenant-%s", "--tenant-threads", "4", env=env).start()
        workers.append(first)
        wait_until(lambda: _copy_progress(conn)[1] >= 3000, 180, "the copy to be under way")
        first.kill()
        assert _copy_progress(conn)[0] == "copying", "killed after the copy ended: make the chunks smaller"
        second = WorkerProcess(dsn, "", "--target", "tenant-%s", "--tenant-threads", "4", env=env).start()
        workers.append(second)
        wait_until(lambda: _copy_progress(conn)[0] == "done", 180, "the copy to end")
        wait_until(lambda: sum(1 for t in range(tenants) if (tmp_path / f"tenant-k{t}.db").exists()) >= tenants // 3,
                   180, "a third of the tenants to be visited after the copy")
        second.kill()
        stop.set()
        writer.join()
        assert not errors, errors[:5]
        drain_pattern(dsn, "--tenant-threads", "4")
    finally:
        stop.set()
        writer.join()
        for proc in workers:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.kill()
    assert pending(conn) == 0
    registered = {t for (t,) in conn.execute("SELECT tenant FROM pgturso.target WHERE pattern = 'tenant-%s'")}
    assert registered == {f"k{t}" for t in range(tenants)}
    for tenant in sorted(registered):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, item, qty FROM orders ORDER BY id") == \
            pg_tenant_rows(conn, tenant, "id, item, qty"), tenant
        assert len(tenant_rows(path, "SELECT applied_ids FROM _pgturso_progress")) == 1, tenant


def test_a_copy_chunk_into_tenants_asks_whether_its_events_are_held_once_not_per_row(conn, tmp_path: Path):
    """A routed table's copy chunk (and any pack_sql of a pattern's rows) asks pgturso._held_for_router once per
    statement: planned as a one-row subquery CROSS JOINed to the rows, it was called once per row (bench 11a:
    1.1M calls, about half of the copy chunks' time in Postgres)."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("INSERT INTO orders SELECT g, 'k' || (g % 7), 'seed' FROM generate_series(1, 12000) g")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")  # (queued)
    table_id = conn.execute("SELECT id FROM pgturso.tracked_table WHERE relid = 'orders'::regclass").fetchone()[0]
    with conn.transaction():
        conn.execute("SET LOCAL track_functions = 'all'")
        copied = conn.execute("SELECT pgturso._copy_chunk(%s, 1500)", (table_id,)).fetchone()[0]
        calls = conn.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions "
                             "WHERE schemaname = 'pgturso' AND funcname = '_held_for_router'").fetchone()[0]
    assert copied == 1500
    assert 1 <= calls <= 2, f"_held_for_router called {calls} times for a chunk of {copied} rows"
    # The chunk's events are each tenant's, not held (a trigger pattern): 7 tenants' rows, none routed later.
    assert conn.execute("SELECT count(DISTINCT tenant), count(*) FILTER (WHERE route IS NOT NULL) "
                        "FROM pgturso.outbox WHERE nrows > 0").fetchone() == (7, 0)


def test_a_wal_patterns_copy_chunks_as_its_router_starts_and_stops_set_exactly_one_of_tenant_and_route(
        conn, dsn, tmp_path: Path):
    """pack_sql asks _held_for_router in two scalar subqueries (one per CASE, 5b307d8): the two must agree within
    a statement, whatever the router does between statements. A wal pattern's copy chunks written by a session
    that is not its router (held: route set, tenant NULL), by the router (lock held, pid recorded: tenant set,
    route NULL), by a session with the router's recorded pid but not its lock (a reused pid: held), and after the
    router let go: every packed row has exactly one of tenant and route, and the chunks hold each row once."""
    from pgturso.sources.router import ROUTER_LOCK_CLASS, TAKE_ROUTER_LOCK

    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("INSERT INTO orders SELECT g, 'k' || (g % 7), 'seed' FROM generate_series(1, 4000) g")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id', "
                 "capture => 'wal')")  # (its copy queued; no router runs here)
    table_id = conn.execute("SELECT id FROM pgturso.tracked_table WHERE relid = 'orders'::regclass").fetchone()[0]
    # track_table copied it at once, held for the router (no router runs here): 7 tenants' packed rows, each with
    # its tenant in route only. That copy is forgotten and done again in chunks, from the sessions below.
    assert conn.execute("SELECT count(*) FILTER (WHERE tenant IS NULL AND route IS NOT NULL), sum(nrows) "
                        "FROM pgturso.outbox WHERE nrows > 0").fetchone() == (7, 4000)
    conn.execute("DELETE FROM pgturso.outbox WHERE nrows > 0")
    conn.execute("UPDATE pgturso.tracked_table SET copy_state = 'copying', copy_after = NULL WHERE id = %s",
                 (table_id,))
    claim = "INSERT INTO pgturso.router (pattern, pid) VALUES ('tenant-%s', pg_backend_pid()) " \
            "ON CONFLICT (pattern) DO UPDATE SET pid = excluded.pid"
    shapes = ("SELECT count(*) FILTER (WHERE tenant IS NULL AND route IS NOT NULL), "
              "count(*) FILTER (WHERE tenant IS NOT NULL AND route IS NULL), count(*) FROM pgturso.outbox "
              "WHERE nrows > 0 AND id > %s")

    def chunk(session: psycopg.Connection[Any]) -> tuple[int, int, int]:
        """(held, queued to a tenant, all) of the packed rows one chunk wrote."""
        last = conn.execute("SELECT coalesce(max(id), 0) FROM pgturso.outbox").fetchone()[0]
        assert session.execute("SELECT pgturso._copy_chunk(%s, 1000)", (table_id,)).fetchone()[0] == 1000
        return conn.execute(shapes, (last,)).fetchone()

    with psycopg.connect(dsn, autocommit=True) as other, psycopg.connect(dsn, autocommit=True) as router:
        assert chunk(other) == (7, 0, 7)  # held for the router
        assert router.execute(TAKE_ROUTER_LOCK, (ROUTER_LOCK_CLASS, "tenant-%s")).fetchone()[0]
        router.execute(claim)
        assert chunk(router) == (0, 7, 7)  # the router's own: queued to each tenant at once
        other.execute("UPDATE pgturso.router SET pid = pg_backend_pid() WHERE pattern = 'tenant-%s'")
        assert chunk(other) == (7, 0, 7)  # the router's pid, not its lock: held
        router.execute("SELECT pg_advisory_unlock_all()")
        router.execute(claim)
        assert chunk(router) == (7, 0, 7)  # its pid, its lock let go: held
    assert conn.execute("SELECT count(*) FROM pgturso.outbox WHERE nrows > 0 "
                        "AND (tenant IS NULL) = (route IS NULL)").fetchone()[0] == 0
    assert conn.execute("SELECT sum(nrows) FROM pgturso.outbox WHERE nrows > 0").fetchone()[0] == 4000
