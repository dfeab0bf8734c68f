"""Attacks on a wal pattern's router (sources/router.py): reference-table writes and DDL racing a new tenant's
registration at the router's snapshot. Real Postgres (wal_level = logical), `file:` tenant databases; asserted
on the rows and columns that arrived in each tenant's database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import run_worker
from support.workers import WorkerProcess, outbox_empty, wait_until
from test_tenants import _start_worker, drain_pattern, pg_tenant_rows, tenant_rows

PLANS = "SELECT id, name, price FROM plans ORDER BY id"


def _pattern(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    """A wal pattern: ``orders`` routed by tenant_id, ``plans`` a reference table; tenant acme delivered."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("CREATE TABLE plans (id int PRIMARY KEY, name text, price text)")
    conn.execute("INSERT INTO plans VALUES (1, 'free', '0'), (2, 'pro', '10')")
    conn.execute("SELECT pgturso.track_table('orders', target => %s, route_by => 'tenant_id', capture => 'wal')",
                 ("tenant-%s",))
    conn.execute("SELECT pgturso.track_table('plans', target => %s)", ("tenant-%s",))
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a')")
    drain_pattern(dsn_of(conn))


def dsn_of(conn: psycopg.Connection[Any]) -> str:
    info = conn.info
    return f"host={info.host} port={info.port} user={info.user} dbname={info.dbname}"


def pg_rows(conn: psycopg.Connection[Any], sql: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(sql).fetchall()]


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_reference_writes_open_prepared_or_savepointed_across_a_new_tenants_routing_snapshot(
        conn, dsn, tmp_path: Path):
    """Reference writes in progress when the router registers a new tenant (so not in the copy taken at its
    snapshot), committed after it: an open transaction, a two-phase one PREPAREd before and COMMIT PREPARED
    after, and one whose savepoint was rolled back (its rolled-back change must reach nobody). The new tenant
    gets each committed change once, through the stream, and the rolled-back one never."""
    _pattern(conn, tmp_path)
    open_tx = psycopg.connect(dsn)
    prepared = psycopg.connect(dsn)
    savepointed = psycopg.connect(dsn)
    try:
        open_tx.execute("UPDATE plans SET price = '100' WHERE id = 1")
        prepared.execute("INSERT INTO plans VALUES (3, 'team', '30')")
        prepared.execute("PREPARE TRANSACTION 'router_attack_2pc'")
        savepointed.execute("SAVEPOINT s")
        savepointed.execute("UPDATE plans SET price = '999' WHERE id = 2")
        savepointed.execute("ROLLBACK TO SAVEPOINT s")
        savepointed.execute("UPDATE plans SET name = 'pro!' WHERE id = 2")
        conn.execute("INSERT INTO orders VALUES (2, 'zeta', 'z')")  # a new tenant, routed while those are open
        drain_pattern(dsn)
        assert tenant_rows(tmp_path / "tenant-zeta.db", PLANS) == [(1, "free", "0"), (2, "pro", "10")]
        open_tx.commit()
        conn.execute("COMMIT PREPARED 'router_attack_2pc'")
        savepointed.commit()
    finally:
        for c in (open_tx, prepared, savepointed):
            c.close()
        if conn.execute("SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'router_attack_2pc'").fetchone()[0]:
            conn.execute("ROLLBACK PREPARED 'router_attack_2pc'")  # (a failed test must not keep it)
    drain_pattern(dsn)
    expected = pg_rows(conn, PLANS)
    assert expected == [(1, "free", "100"), (2, "pro!", "10"), (3, "team", "30")]
    for tenant in ("acme", "zeta"):
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", PLANS) == expected, tenant
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id") == (
            pg_tenant_rows(conn, tenant))


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_a_reference_tables_ddl_committing_while_the_router_copies_it_to_a_new_tenant(conn, dsn, tmp_path: Path):
    """A DDL of a reference table is open (holding its lock) when the router takes its snapshot to register a
    new tenant; the registration's copy of that table waits for the lock and the DDL commits meanwhile. The
    copy's query then resolves column names in the catalog after the DDL, while the tenant's table is created at
    the layout of the snapshot and the DDL is routed to it after: two columns swapped by renames must not end
    up swapped in the new tenant's database (they did: the copy read each old name's values from the column
    that has that name after the renames)."""
    _pattern(conn, tmp_path)
    ddl = psycopg.connect(dsn)
    worker = None
    try:
        ddl.execute("ALTER TABLE plans RENAME COLUMN name TO tmp")
        ddl.execute("ALTER TABLE plans RENAME COLUMN price TO name")
        ddl.execute("ALTER TABLE plans RENAME COLUMN tmp TO price")
        conn.execute("INSERT INTO orders VALUES (2, 'zeta', 'z')")
        worker = _start_worker(dsn)

        def router_waits_for_the_ddl() -> bool:
            return bool(conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE NOT l.granted AND l.relation = 'plans'::regclass "
                "AND a.application_name = 'pgturso-router'").fetchone()[0])

        wait_until(router_waits_for_the_ddl, 120, "the router's copy of plans to wait for the DDL's lock")
        ddl.commit()
        assert conn.execute("SELECT pgturso.wait_for_sync('120 s')").fetchone()[0]
    finally:
        ddl.close()
        if worker is not None:
            worker.stop()
    expected = pg_rows(conn, PLANS)
    assert expected == [(1, "0", "free"), (2, "10", "pro")]
    for tenant in ("acme", "zeta"):
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", PLANS) == expected, tenant
    assert tenant_rows(tmp_path / "tenant-zeta.db", "SELECT id, item FROM orders") == [(2, "z")]


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_a_session_reusing_a_dead_routers_pid_is_not_taken_for_the_router(conn, dsn, tmp_path: Path):
    """pgturso.router keeps the backend pid of the pattern's last router after it died (a SIGKILLed worker not
    yet restarted). Linux reuses pids: a later session that gets that pid was taken for the router, so its
    TRUNCATE of a routed table was queued for the tenants at once instead of held, and overtook a row committed
    before it that the router had not routed yet (the row survived the TRUNCATE in the tenant's database). The
    reuse is forced here by recording the session's own pid, as a reuse does; the router is the holder of the
    pattern's router lock, not whoever has its last pid."""
    _pattern(conn, tmp_path)
    conn.execute("INSERT INTO orders VALUES (2, 'acme', 'committed before the TRUNCATE, not routed yet')")
    with psycopg.connect(dsn, autocommit=True) as reused:
        reused.execute("UPDATE pgturso.router SET pid = pg_backend_pid() WHERE pattern = 'tenant-%s'")
        reused.execute("TRUNCATE orders")
    drain_pattern(dsn)
    assert pg_tenant_rows(conn, "acme") == []
    assert tenant_rows(tmp_path / "tenant-acme.db", "SELECT id, item FROM orders ORDER BY id") == []


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_toasted_rows_moved_deleted_and_updated_reach_the_right_tenants(conn, dsn, tmp_path: Path):
    """Replica identity FULL with values stored out of line (TOAST): a move to a tenant that is new (its row's
    unchanged big value is not in the new tuple pgoutput sends), a delete (the old tenant found from the
    old tuple), and an update of the key and the tenant together; each tenant ends with exactly its rows."""
    _pattern(conn, tmp_path)
    big = "SELECT string_agg(md5(g::text || %s), '') FROM generate_series(1, 400) g"  # ~12 kB, incompressible
    conn.execute(f"INSERT INTO orders VALUES (10, 'acme', ({big})), (11, 'acme', ({big})), (12, 'acme', ({big}))",
                 ("a", "b", "c"))
    drain_pattern(dsn)
    with conn.transaction():
        conn.execute("UPDATE orders SET tenant_id = 'newco' WHERE id = 10")  # a move to a new tenant
        conn.execute("DELETE FROM orders WHERE id = 11")
        conn.execute("UPDATE orders SET id = 13, tenant_id = 'globex' WHERE id = 12")  # key and tenant together
    conn.execute("UPDATE orders SET item = item WHERE id = 1")  # (an unchanged toast-free row, same tenant)
    drain_pattern(dsn)
    for tenant in ("acme", "newco", "globex"):
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id") == (
            pg_tenant_rows(conn, tenant)), tenant
    assert [r[0] for r in pg_rows(conn, "SELECT id FROM orders ORDER BY id")] == [1, 10, 13]


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_untracking_removing_and_dropping_leave_no_slot_of_a_wal_pattern(conn, dsn, tmp_path: Path):
    """No slot of a wal pattern is left pinning WAL: untracking its last table drops it, and so do
    remove_target and DROP EXTENSION (each after the router created the slot and routed)."""
    def slots() -> list[tuple[Any, ...]]:
        return pg_rows(conn, "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()")

    _pattern(conn, tmp_path)
    assert len(slots()) == 1
    conn.execute("SELECT pgturso.untrack_table('orders')")
    assert len(slots()) == 1  # plans is still tracked to the pattern
    conn.execute("SELECT pgturso.untrack_table('plans')")
    assert slots() == []
    conn.execute("SELECT pgturso.track_table('orders', target => %s, route_by => 'tenant_id', capture => 'wal')",
                 ("tenant-%s",))
    conn.execute("INSERT INTO orders VALUES (5, 'acme', 'again')")
    drain_pattern(dsn)
    assert len(slots()) == 1
    conn.execute("SELECT pgturso.untrack_table('orders')")
    conn.execute("SELECT pgturso.remove_target('tenant-%s')")
    assert slots() == []
    assert pg_rows(conn, "SELECT pattern FROM pgturso.router") == []
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("SELECT pgturso.track_table('orders', target => %s, route_by => 'tenant_id', capture => 'wal')",
                 ("tenant-%s",))
    drain_pattern(dsn)
    assert len(slots()) == 1
    conn.execute("DROP EXTENSION pgturso")
    try:
        assert slots() == []
    finally:
        conn.execute("CREATE EXTENSION pgturso CASCADE")


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
@pytest.mark.parametrize("one_transaction", [False, True])
def test_new_tenants_just_before_and_after_a_routed_tables_ddl_in_one_routing_batch(
        conn, dsn, tmp_path: Path, one_transaction: bool):
    """Tenants that first appear right before and right after ALTER TABLEs (a column added, then one dropped) of
    a routed table, all routed in one batch: each is created at the layout in force at its first row and gets
    the DDL after it only if it came before; every tenant ends with Postgres's columns and rows."""
    _pattern(conn, tmp_path)
    steps = [
        "INSERT INTO orders VALUES (2, 'before', 'b')",
        "ALTER TABLE orders ADD COLUMN note text",
        "INSERT INTO orders VALUES (3, 'between', 'm', 'n3')",
        "UPDATE orders SET note = 'n2' WHERE id = 2",
        "ALTER TABLE orders DROP COLUMN item",
        "INSERT INTO orders VALUES (4, 'after', 'n4')",
        "INSERT INTO orders VALUES (5, 'acme', 'n5')",
    ]
    if one_transaction:
        with conn.transaction():
            for sql in steps:
                conn.execute(sql)
    else:
        for sql in steps:
            conn.execute(sql)
    drain_pattern(dsn)
    for tenant in ("acme", "before", "between", "after"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert [r[1] for r in tenant_rows(path, "PRAGMA table_info(orders)")] == ["id", "tenant_id", "note"], tenant
        assert tenant_rows(path, "SELECT id, note FROM orders ORDER BY id") == pg_tenant_rows(
            conn, tenant, "id, note"), tenant


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_an_immediate_postgres_shutdown_mid_routing_loses_and_doubles_nothing_in_any_tenant(
        pg_cluster, conn, dsn, tmp_path: Path):
    """pg_ctl stop -m immediate while writers commit routed rows (new tenants appearing) and reference rows and
    the router routes: no shutdown checkpoint, so the slot comes back at its last saved position, behind the
    router's recorded marker. After the restart every tenant holds exactly Postgres's rows and each counted
    tenant applied each committed write once (Turso-side counter against Postgres's own count)."""
    import threading

    from test_tenants import applied_writes, count_postgres_writes, install_file_apply_counter, postgres_writes

    _pattern(conn, tmp_path)
    conn.execute("INSERT INTO orders VALUES (100, 'globex', 'g')")
    drain_pattern(dsn)
    for tenant in ("acme", "globex"):
        install_file_apply_counter(tmp_path / f"tenant-{tenant}.db", "orders")
    count_postgres_writes(conn)
    worker = _start_worker(dsn)
    stop = threading.Event()
    errors: list[str] = []

    def write(session: int) -> None:
        n = 1000 + session * 100_000
        try:
            with psycopg.connect(dsn, autocommit=True) as writer:
                while not stop.is_set():
                    n += 1
                    tenant = ("acme", "globex", f"s{session}t{n % 7}")[n % 3]
                    with writer.transaction():
                        writer.execute("INSERT INTO orders VALUES (%s, %s, 'live')", (n, tenant))
                        writer.execute("UPDATE orders SET item = item || '+' WHERE id = %s", (n - 3,))
                        if n % 5 == 0:
                            writer.execute("UPDATE plans SET price = %s WHERE id = 2", (str(n),))
        except psycopg.OperationalError:
            pass  # the server went away under the writer: what it had committed is the truth
        except BaseException as exc:  # reported below
            errors.append(repr(exc))

    writers = [threading.Thread(target=write, args=(s,)) for s in range(2)]
    for thread in writers:
        thread.start()
    try:
        wait_until(lambda: conn.execute("SELECT count(*) FROM pgturso.target WHERE pattern IS NOT NULL")
                   .fetchone()[0] >= 6, 120, "new tenants routed under load")
        pg_cluster.pg_ctl("stop", "-m", "immediate", "-w")
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    assert errors == []
    worker.kill()
    pg_cluster.pg_ctl("start", "-w", "-l", str(pg_cluster.logfile))
    pg_cluster.wait_ready()
    with psycopg.connect(dsn, autocommit=True) as again:
        worker = _start_worker(dsn)
        try:
            again.execute("INSERT INTO orders VALUES (-1, 'acme', 'after the restart')")
            again.execute("UPDATE plans SET name = 'after' WHERE id = 1")
            assert again.execute("SELECT pgturso.wait_for_sync('300 s')").fetchone()[0]
        finally:
            worker.stop()
        tenants = [t for (t,) in again.execute(
            "SELECT tenant FROM pgturso.target WHERE pattern = 'tenant-%s' ORDER BY 1").fetchall()]
        assert len(tenants) >= 6
        plans = pg_rows(again, PLANS)
        for tenant in tenants:
            path = tmp_path / f"tenant-{tenant}.db"
            assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(again, tenant), \
                tenant
            assert tenant_rows(path, PLANS) == plans, tenant
        for tenant in ("acme", "globex"):
            assert applied_writes(tmp_path / f"tenant-{tenant}.db") == postgres_writes(again, tenant), tenant


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_a_routed_table_keeps_the_replica_identity_its_router_needs(conn, dsn, tmp_path: Path):
    """The router finds a moved or deleted row's old tenant in the old tuple, which only replica identity FULL
    carries when route_by is not in the key: ALTER TABLE … REPLICA IDENTITY DEFAULT on a routed table of a wal
    pattern was accepted (the key was covered) and a move then left the row in its old tenant's database too."""
    _pattern(conn, tmp_path)
    with pytest.raises(psycopg.errors.RaiseException, match="orders") as refused:
        conn.execute("ALTER TABLE orders REPLICA IDENTITY DEFAULT")
    assert "REPLICA IDENTITY FULL" in (refused.value.diag.message_hint or "")
    conn.execute("UPDATE orders SET tenant_id = 'globex' WHERE id = 1")  # a move, with FULL still in force
    drain_pattern(dsn)
    for tenant in ("acme", "globex"):
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id") == (
            pg_tenant_rows(conn, tenant)), tenant
    # A reference table of the pattern too: a value an UPDATE left alone comes from the old row.
    with pytest.raises(psycopg.errors.RaiseException, match="plans"):
        conn.execute("ALTER TABLE plans REPLICA IDENTITY DEFAULT")


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wait_for_sync_returns_once_every_tenant_has_the_callers_commits_and_not_before(conn, dsn, tmp_path: Path):
    """wait_for_sync with a wal pattern: false while no router runs (the caller's commits are only in the slot),
    true once the router routed them and every tenant (a new one included) applied them; and true for a caller
    whose commits touched no table of the pattern, the router idle."""
    _pattern(conn, tmp_path)
    conn.execute("INSERT INTO orders VALUES (2, 'acme', 'a2'), (3, 'newco', 'n3')")
    conn.execute("UPDATE plans SET price = '11' WHERE id = 2")
    assert conn.execute("SELECT pgturso.wait_for_sync('1 s')").fetchone()[0] is False
    worker = _start_worker(dsn)
    try:
        assert conn.execute("SELECT pgturso.wait_for_sync('120 s')").fetchone()[0]
        assert conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()[0] == 0
        conn.execute("CREATE TABLE untracked (n int)")
        conn.execute("INSERT INTO untracked VALUES (1)")
        assert conn.execute("SELECT pgturso.wait_for_sync('120 s')").fetchone()[0]
    finally:
        worker.stop()  # (it holds the tenants' files open; what they hold was there when wait_for_sync said so)
    for tenant in ("acme", "newco"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant)
        assert tenant_rows(path, PLANS) == pg_rows(conn, PLANS), tenant


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_a_router_killed_mid_registration_hands_over_to_a_second_worker(conn, dsn, tmp_path: Path):
    """The first worker's router is registering a new tenant (its reference copy waiting for a DDL's lock) when
    it is SIGKILLed; a second worker of the pattern, started meanwhile, takes the router lock over and routes
    from the recorded marker: the new tenant is registered once, gets the reference table as it is after the
    DDL, and every tenant applies each row once (file: write counters)."""
    from test_tenants import applied_writes, count_postgres_writes, install_file_apply_counter, postgres_writes

    _pattern(conn, tmp_path)
    install_file_apply_counter(tmp_path / "tenant-acme.db", "orders")
    count_postgres_writes(conn)
    conn.execute("INSERT INTO orders VALUES (2, 'acme', 'before')")
    ddl = psycopg.connect(dsn)
    first = second = None
    try:
        ddl.execute("ALTER TABLE plans ADD COLUMN tier text")
        ddl.execute("UPDATE plans SET tier = 'gold'")
        conn.execute("INSERT INTO orders VALUES (3, 'zeta', 'z'), (4, 'acme', 'with zeta')")
        first = _start_worker(dsn)
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE NOT l.granted AND l.relation = 'plans'::regclass "
            "AND a.application_name = 'pgturso-router'").fetchone()[0] == 1, 120, "the router to wait mid-registration")
        second = _start_worker(dsn)
        first.kill()
        ddl.commit()
        conn.execute("INSERT INTO orders VALUES (5, 'zeta', 'after')")
        assert conn.execute("SELECT pgturso.wait_for_sync('180 s')").fetchone()[0]
    finally:
        ddl.close()
        for proc in (first, second):
            if proc is not None and proc.proc is not None and proc.proc.poll() is None:
                proc.stop()
    assert second.lines("router_started"), second.output
    assert pg_rows(conn, "SELECT tenant FROM pgturso.target WHERE pattern = 'tenant-%s' ORDER BY 1") == [
        ("acme",), ("zeta",)]
    expected = pg_rows(conn, "SELECT id, name, price, tier FROM plans ORDER BY id")
    for tenant in ("acme", "zeta"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, name, price, tier FROM plans ORDER BY id") == expected, tenant
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant), tenant
    assert applied_writes(tmp_path / "tenant-acme.db") == postgres_writes(conn, "acme")


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_truncates_of_routed_and_reference_tables_between_inserts_of_one_transaction(conn, dsn, tmp_path: Path):
    """One transaction inserts, truncates the routed and the reference table, inserts again (a new tenant
    among them, appearing after the TRUNCATE); another one brings a second new tenant before a TRUNCATE.
    Each tenant ends with exactly the rows after its last TRUNCATE, the reference table as Postgres has it."""
    _pattern(conn, tmp_path)
    with conn.transaction():
        conn.execute("INSERT INTO orders VALUES (10, 'acme', 'gone'), (11, 'globex', 'gone')")
        conn.execute("INSERT INTO plans VALUES (3, 'gone', '3')")
        conn.execute("TRUNCATE orders, plans")
        conn.execute("INSERT INTO orders VALUES (12, 'acme', 'kept'), (13, 'zeta', 'kept')")
        conn.execute("INSERT INTO plans VALUES (4, 'kept', '4')")
    with conn.transaction():
        conn.execute("INSERT INTO orders VALUES (14, 'yotta', 'gone')")
        conn.execute("TRUNCATE plans")
        conn.execute("TRUNCATE orders")
        conn.execute("INSERT INTO orders VALUES (15, 'yotta', 'kept'), (16, 'acme', 'kept')")
        conn.execute("INSERT INTO plans VALUES (5, 'kept', '5')")
    drain_pattern(dsn)
    for tenant in ("acme", "globex", "zeta", "yotta"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant), tenant
        assert tenant_rows(path, PLANS) == pg_rows(conn, PLANS) == [(5, "kept", "5")], tenant


def _router_fails_on_every_batch(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    """A wal pattern whose router meets an exception nobody expected (neither psycopg's nor pgturso's) on every
    batch: its row of pgturso.router holds a tenant copy whose snapshot it cannot parse (a ValueError while
    routing). Found first with a LATIN1 database's bytes read as UTF-8, which is fixed (test_encodings)."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => %s, route_by => 'tenant_id', capture => 'wal')",
                 ("tenant-%s",))
    conn.execute("INSERT INTO pgturso.router (pattern, copies) VALUES (%s, %s)",
                 ("tenant-%s", '{"ghost": {"snapshot": "not a snapshot", "lsn": "0/0"}}'))
    conn.execute("INSERT INTO orders VALUES (1, 'globex', 'plain ascii')")
    conn.execute("INSERT INTO orders VALUES (2, 'acme', 'caf\u00e9')")


def _router_status(conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
    return conn.execute("SELECT recorded_status, last_error, retries FROM pgturso.target_status "
                        "WHERE target = 'tenant-%s'").fetchone()


def _nothing_routed(conn: psycopg.Connection[Any]) -> None:
    """No half-routed batch: no tenant registered, no routed row queued, no marker recorded past the failure."""
    assert conn.execute("SELECT count(*) FROM pgturso.target WHERE pattern = 'tenant-%s'").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM pgturso.outbox WHERE tenant IS NOT NULL").fetchone()[0] == 0
    assert conn.execute("SELECT marker FROM pgturso.router").fetchone()[0] is None


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_an_unexpected_router_error_stops_a_once_run_with_the_error_shown(conn, dsn, tmp_path: Path):
    """The router meets an exception it does not know (not psycopg's, not pgturso's): --once used to wait for
    a router whose thread had died, for ever, saying nothing. It stops with EXIT_FATAL, the error (its kind,
    the pattern, what to do) in its log and on the pattern's row of pgturso.target_status, nothing routed."""
    _router_fails_on_every_batch(conn, tmp_path)
    result = run_worker(dsn, "", "--target", "tenant-%s", timeout=90)
    assert result.returncode == 2, result.stderr  # EXIT_FATAL
    failed = [line for line in result.stderr.splitlines() if "event=router_failed" in line]
    assert failed and "target=tenant-%s" in failed[0] and "ValueError" in failed[0], result.stderr
    assert "Traceback" in result.stderr  # the log has where it happened
    status, error, _ = _router_status(conn)
    assert status == "blocked"
    assert "router of tenant-%s" in error and "ValueError" in error and "HINT" in error, error
    _nothing_routed(conn)


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_a_running_router_retries_an_unexpected_error_with_capped_backoff_shown_in_status(conn, dsn,
                                                                                          tmp_path: Path):
    """A running worker's router meeting an exception it does not know used to end its thread silently (the
    worker ran on, routing nothing). It is logged at ERROR, shown on the pattern's row of pgturso.target_status
    (blocked, with the error and the fix), and tried again from the router's marker after a backoff that grows
    to retry_max_delay, never in a hot loop and never with a half-routed batch; the worker keeps running."""
    _router_fails_on_every_batch(conn, tmp_path)
    worker = _start_worker(dsn)
    try:
        wait_until(lambda: len(worker.lines("router_failed")) >= 4, 120, "four failed routing attempts")
        assert worker.proc is not None and worker.proc.poll() is None, worker.output  # still running
        failed = worker.lines("router_failed")
        assert all("target=tenant-%s" in line and "ValueError" in line for line in failed), failed
        delays = [float(line.split("delay_s=")[1].split()[0]) for line in failed]
        assert all(0.025 <= d <= 1.0 for d in delays), delays  # PGTURSO_RETRY_BASE_DELAY 0.05, MAX 1
        attempts = [int(line.split("attempt=")[1].split()[0]) for line in failed]
        assert attempts[:4] == [1, 2, 3, 4], failed
        status, error, retries = _router_status(conn)
        assert status == "blocked" and retries >= 1
        assert "router of tenant-%s" in error and "ValueError" in error and "HINT" in error, error
        _nothing_routed(conn)
    finally:
        worker.stop()


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wait_for_sync_after_a_tenant_found_behind_at_restart_waits_for_its_recopy(conn, dsn, tmp_path: Path):
    """A tenant's database older than what Postgres recorded delivered (a restored copy: its marker names an
    earlier batch) is caught up at the worker's first visit: its tables recreated and copied afresh. A
    wait_for_sync called as that worker starts must not say true while the tenant's table is recreated but not
    copied yet (the reader would find it empty)."""
    import shutil

    _pattern(conn, tmp_path)
    acme = tmp_path / "tenant-acme.db"
    older = tmp_path / "older-acme"
    older.mkdir()
    for name in ("tenant-acme.db", "tenant-acme.db-wal"):
        if (tmp_path / name).exists():
            shutil.copy(tmp_path / name, older / name)
    conn.execute("INSERT INTO orders SELECT g, 'acme', 'later' FROM generate_series(2, 300) g")
    drain_pattern(dsn)
    for name in ("tenant-acme.db", "tenant-acme.db-wal"):
        (tmp_path / name).unlink(missing_ok=True)
        if (older / name).exists():
            shutil.copy(older / name, tmp_path / name)
    worker = _start_worker(dsn)
    try:
        conn.execute("INSERT INTO orders VALUES (-1, 'acme', 'after the restart')")
        assert conn.execute("SELECT pgturso.wait_for_sync('300 s')").fetchone()[0]
    finally:
        worker.stop()
    assert "event=target_behind" in worker.output, worker.output
    assert tenant_rows(acme, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, "acme"), \
        worker.output


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_a_router_failure_that_clears_resumes_delivers_everything_once_and_clears_blocked(conn, dsn,
                                                                                          tmp_path: Path):
    """The cause of an unexpected router error goes away while the worker runs (here: the corrupt row of
    pgturso.router is repaired): the next attempt routes from the router's marker, every tenant gets exactly
    its rows, once, and the pattern's row of target_status is no longer blocked."""
    _router_fails_on_every_batch(conn, tmp_path)
    worker = _start_worker(dsn)
    try:
        wait_until(lambda: len(worker.lines("router_failed")) >= 2, 120, "two failed routing attempts")
        assert _router_status(conn)[0] == "blocked"
        conn.execute("UPDATE pgturso.router SET copies = '{}'")
        conn.execute("INSERT INTO orders VALUES (3, 'acme', 'after the repair')")
        wait_until(lambda: outbox_empty(dsn) and conn.execute(
            "SELECT count(*) FROM pgturso.target WHERE pattern = 'tenant-%s'").fetchone()[0] == 2, 120,
                   "both tenants registered and delivered after the repair")
        wait_until(lambda: _router_status(conn)[0] != "blocked", 60, "the pattern's row no longer blocked")
        assert worker.proc is not None and worker.proc.poll() is None, worker.output
    finally:
        worker.stop()
    for tenant in ("acme", "globex"):
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id"
                           ) == pg_tenant_rows(conn, tenant), tenant


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_a_sigterm_while_the_router_waits_out_a_long_backoff_stops_the_worker_cleanly(conn, dsn, tmp_path: Path):
    """The router failed and waits out a backoff of minutes (retry_base_delay 300 s): SIGTERM stops the worker
    cleanly (exit 0) without waiting the backoff out, nothing half routed."""
    _router_fails_on_every_batch(conn, tmp_path)
    worker = WorkerProcess(dsn, "", "--target", "tenant-%s", "--idle-wait", "1",
                           env={"PGTURSO_RETRY_BASE_DELAY": "300", "PGTURSO_RETRY_MAX_DELAY": "600"}).start()
    try:
        wait_until(lambda: len(worker.lines("router_failed")) >= 1, 120, "a failed routing attempt")
        assert float(worker.lines("router_failed")[0].split("delay_s=")[1].split()[0]) >= 150
        assert worker.stop(timeout=60) == 0, worker.output  # killed (-9) had it waited for the backoff
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.kill()
    assert len(worker.lines("router_failed")) == 1, worker.output
    _nothing_routed(conn)


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_retry_limit_ends_a_running_worker_after_that_many_router_failures_in_a_row(conn, dsn, tmp_path: Path):
    """retry_limit 2 on a running (not --once) worker whose router fails on every batch: the first attempt and
    two retries fail, then the worker gives up with exit 1 (EXIT_RETRIES_EXHAUSTED), saying so, the pattern's
    row still blocked with the error, nothing routed."""
    _router_fails_on_every_batch(conn, tmp_path)
    worker = WorkerProcess(dsn, "", "--target", "tenant-%s", "--idle-wait", "1",
                           env={"PGTURSO_RETRY_BASE_DELAY": "0.05", "PGTURSO_RETRY_MAX_DELAY": "0.2",
                                "PGTURSO_RETRY_LIMIT": "2"}).start()
    try:
        assert worker.proc is not None
        assert worker.proc.wait(120) == 1, worker.output
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.kill()
    assert len(worker.lines("router_failed")) == 3, worker.output
    assert any("job=route" in line and "attempts=3" in line for line in worker.lines("giving_up")), worker.output
    status, error, _ = _router_status(conn)
    assert status == "blocked" and "ValueError" in error, error
    _nothing_routed(conn)
