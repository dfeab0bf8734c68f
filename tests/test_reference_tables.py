"""Reference tables of a pattern target: ``track_table('plans', target => 'tenant-%s')`` without route_by sends
the whole table, and every change of it, to every tenant database of the pattern, present and future, in order
with each tenant's own rows. Asserted on the rows that arrived in each tenant's database (`file:` databases and
real tursodb servers)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import WORKER, pending, run_worker
from support.turso import TursoServer
from support.workers import WorkerProcess, wait_until
from test_tenants import drain_pattern, pg_tenant_rows, tenant_rows

PLANS = "SELECT id, name, price FROM plans ORDER BY id"


def pg_rows(conn: psycopg.Connection[Any], sql: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(sql).fetchall()]


def _pattern_with_orders(conn: psycopg.Connection[Any], url: str, capture: str = "trigger") -> None:
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", url))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text, plan_id int)")
    conn.execute("SELECT pgturso.track_table('orders', target => %s, route_by => 'tenant_id', capture => %s)",
                 ("tenant-%s", capture))


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_reference_table_reaches_every_tenant_present_and_future(conn, dsn, tmp_path: Path, capture: str):
    _pattern_with_orders(conn, f"file:{tmp_path}/tenant-%s.db", capture)
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'anvil', 1), (2, 'globex', 'gear', 2)")
    conn.execute("CREATE TABLE plans (id int PRIMARY KEY, name text NOT NULL, price int, secret text)")
    conn.execute("INSERT INTO plans VALUES (1, 'free', 0, 's1'), (2, 'pro', 10, 's2')")
    conn.execute("SELECT pgturso.track_table('plans', target => 'tenant-%s', "
                 "columns => ARRAY['id', 'name', 'price'])")
    # every event of the pattern has a tenant: the reference table's copy is queued once per tenant database;
    # in wal mode the router does that (the copy is held: no tenant yet), once it met the tenants in the stream
    assert pg_rows(conn, "SELECT DISTINCT tenant FROM pgturso.outbox ORDER BY 1") == (
        [("acme",), ("globex",)] if capture == "trigger" else [(None,)])
    with conn.transaction():  # inserts, updates, deletes, and a routed row in the same transaction
        conn.execute("INSERT INTO plans VALUES (3, 'team', 30, 's3')")
        conn.execute("UPDATE plans SET price = 12 WHERE id = 2")
        conn.execute("DELETE FROM plans WHERE id = 1")
        conn.execute("UPDATE plans SET id = 4 WHERE id = 3")  # a key change
        conn.execute("INSERT INTO orders VALUES (3, 'acme', 'rope', 4)")
    drain_pattern(dsn)
    for tenant in ("acme", "globex"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, PLANS) == pg_rows(conn, PLANS) == [(2, "pro", 12), (4, "team", 30)], tenant
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant)
        assert [r[1] for r in tenant_rows(path, "PRAGMA table_info(plans)")] == ["id", "name", "price"]
    assert pending(conn) == 0

    # DDL reaches every tenant database in order with its data: a row before it, a renamed column after it.
    with conn.transaction():
        conn.execute("INSERT INTO plans VALUES (5, 'before', 50, 's5')")
        conn.execute("ALTER TABLE plans RENAME COLUMN price TO monthly")
        conn.execute("UPDATE plans SET monthly = monthly + 1")
    # a new tenant after the reference table has rows: its database gets the tables, the reference rows and
    # its own rows
    conn.execute("INSERT INTO orders VALUES (4, 'initech', 'stapler', 2)")
    conn.execute("INSERT INTO plans VALUES (6, 'after', 60, 's6')")
    drain_pattern(dsn)
    expected = pg_rows(conn, "SELECT id, name, monthly FROM plans ORDER BY id")
    assert expected == [(2, "pro", 13), (4, "team", 31), (5, "before", 51), (6, "after", 60)]
    for tenant in ("acme", "globex", "initech"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, name, monthly FROM plans ORDER BY id") == expected, tenant
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant)
    # A default-filled column makes Postgres rewrite the rows: the table is recopied to every tenant.
    conn.execute("ALTER TABLE plans ADD COLUMN tier text NOT NULL DEFAULT 'std'")
    conn.execute("ALTER TABLE plans DROP COLUMN secret")  # kept out by the column list: changes nothing there
    conn.execute("TRUNCATE plans")
    conn.execute("INSERT INTO plans VALUES (7, 'fresh', 1, 'gold')")
    drain_pattern(dsn)
    for tenant in ("acme", "globex", "initech"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, name, monthly FROM plans ORDER BY id") == [(7, "fresh", 1)], tenant
    assert pending(conn) == 0
    # verify compares every tenant's copy of the reference table with the whole table; --repair fixes only the
    # tenant whose copy differs
    subprocess.run([sys.executable, "-c", "import sys, turso; db = turso.connect(sys.argv[1]); "
                    "db.execute('DELETE FROM plans'); db.commit(); db.close()", str(tmp_path / "tenant-globex.db")],
                   check=True, timeout=60)  # another process: this one's pyturso keeps the file locked
    verify = [*WORKER, "verify", "--dsn", dsn, "--target", "tenant-%s"]
    differs = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert differs.returncode == 1 and "tenant-globex" in differs.stdout, differs.stdout + differs.stderr
    repaired = subprocess.run([*verify, "--repair"], capture_output=True, text=True, timeout=120)
    assert repaired.returncode in (0, 1), repaired.stderr
    # (in wal mode held for the router, which queues them for the tenant at their place in the stream)
    assert pg_rows(conn, "SELECT DISTINCT coalesce(tenant, route) FROM pgturso.outbox") == [("globex",)]
    drain_pattern(dsn)
    assert tenant_rows(tmp_path / "tenant-globex.db", "SELECT id, name, monthly FROM plans") == [(7, "fresh", 1)]
    assert subprocess.run(verify, capture_output=True, text=True, timeout=120).returncode == 0
    # A new tenant whose first row committed before a DDL of the reference table, both routed after they
    # committed (wal): its reference table is created and copied as of the router's snapshot, DDL included,
    # and the DDL is not sent to it again.
    conn.execute("INSERT INTO orders VALUES (9, 'umbrella', 'u', 7)")
    conn.execute("ALTER TABLE plans RENAME COLUMN name TO title")
    conn.execute("UPDATE plans SET title = title || '!'")
    drain_pattern(dsn)
    for tenant in ("acme", "globex", "initech", "umbrella"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, title, monthly FROM plans") == [(7, "fresh!", 1)], tenant
    assert tenant_rows(tmp_path / "tenant-umbrella.db", "SELECT id, item FROM orders") == [(9, "u")]


def test_reference_table_tracked_before_any_tenant_and_errors(conn, dsn, tmp_path: Path):
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE plans (id int PRIMARY KEY, name text)")
    conn.execute("INSERT INTO plans SELECT g, 'plan ' || g FROM generate_series(1, 20000) AS g")  # chunked copy
    conn.execute("SELECT pgturso.track_table('plans', target => 'tenant-%s')")
    drain_pattern(dsn)  # no tenant yet: nothing is queued anywhere, the copy finishes
    assert pending(conn) == 0
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL)")
    conn.execute("INSERT INTO orders VALUES (1, 'acme')")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("UPDATE plans SET name = 'changed' WHERE id = 3")
    drain_pattern(dsn)
    path = tmp_path / "tenant-acme.db"
    assert tenant_rows(path, "SELECT count(*), sum(id) FROM plans") == [(20000, 20000 * 20001 // 2)]
    assert tenant_rows(path, "SELECT name FROM plans WHERE id = 3") == [("changed",)]
    assert tenant_rows(path, "SELECT id FROM orders") == [(1,)]

    # untrack_table leaves the tenants' copies in place; DROP TABLE of one tracked with drop_target drops it in
    # every tenant database
    conn.execute("CREATE TABLE regions (id int PRIMARY KEY, name text)")
    conn.execute("INSERT INTO regions VALUES (1, 'eu')")
    conn.execute("SELECT pgturso.track_table('regions', target => 'tenant-%s', drop_target => true)")
    conn.execute("INSERT INTO orders VALUES (2, 'globex')")
    drain_pattern(dsn)
    for tenant in ("acme", "globex"):
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, name FROM regions") == [(1, "eu")]
    conn.execute("DROP TABLE regions")
    drain_pattern(dsn)
    for tenant in ("acme", "globex"):
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db",
                           "SELECT count(*) FROM sqlite_schema WHERE name = 'regions'") == [(0,)]
    assert pending(conn) == 0

    conn.execute("CREATE MATERIALIZED VIEW plan_names AS SELECT id, name FROM plans")
    conn.execute("CREATE UNIQUE INDEX ON plan_names (id)")
    with pytest.raises(psycopg.Error, match="cannot be a reference table"):
        conn.execute("SELECT pgturso.track_table('plan_names', target => 'tenant-%s')")
    conn.execute("CREATE TABLE countries (id int PRIMARY KEY)")
    # a pattern's tables share its capture mode, as any target's
    with pytest.raises(psycopg.Error, match="captures its tables by trigger, not wal"):
        conn.execute("SELECT pgturso.track_table('countries', target => 'tenant-%s', capture => 'wal')")


def test_a_tenant_whose_database_was_down_gets_the_reference_changes_it_missed(conn, dsn, tmp_path: Path):
    servers = {name: TursoServer().start() for name in ("a", "b", "c")}
    worker = None
    try:
        _pattern_with_orders(conn, f"file:{tmp_path}/tenant-%s.db")
        for name, server in servers.items():  # explicit overrides: each tenant on its own tursodb server
            conn.execute("SELECT pgturso.add_target(%s, %s)", (f"tenant-{name}", server.url))
        conn.execute("CREATE TABLE plans (id int PRIMARY KEY, name text, price int)")
        conn.execute("INSERT INTO plans VALUES (1, 'free', 0)")
        conn.execute("SELECT pgturso.track_table('plans', target => 'tenant-%s')")
        conn.execute("INSERT INTO orders VALUES (1, 'a', 'x', 1), (2, 'b', 'y', 1)")

        def on_server(name: str) -> list[Any]:
            try:
                return [tuple(r) for r in servers[name].query("SELECT id, name, price FROM plans ORDER BY id")]
            except Exception:  # down, or the table not created yet
                return []

        worker = WorkerProcess(dsn, "", "--target", "tenant-%s", "--idle-wait", "1",
                               env={"PGTURSO_RETRY_BASE_DELAY": "0.05", "PGTURSO_RETRY_MAX_DELAY": "1"}).start()
        wait_until(lambda: on_server("a") == on_server("b") == pg_rows(conn, "SELECT * FROM plans ORDER BY id"),
                   90, "both tenants")
        servers["b"].stop()
        for n in range(2, 12):
            conn.execute("INSERT INTO plans VALUES (%s, %s, %s)", (n, f"plan {n}", n))
            conn.execute("UPDATE plans SET price = price + 100 WHERE id = %s", (n - 1,))
        conn.execute("DELETE FROM plans WHERE id = 5")
        conn.execute("ALTER TABLE plans ADD COLUMN note text")
        conn.execute("UPDATE plans SET note = 'n' || id WHERE id > 8")
        conn.execute("INSERT INTO orders VALUES (3, 'c', 'z', 1)")  # a new tenant while b is down
        expected = pg_rows(conn, "SELECT id, name, price FROM plans ORDER BY id")
        wait_until(lambda: on_server("a") == expected, 90, "a while b is down")
        wait_until(lambda: on_server("c") == expected, 90, "the new tenant c")
        assert pending(conn) > 0  # b's share waits in the outbox
        servers["b"].start()
        wait_until(lambda: on_server("b") == expected, 90, "b after it is back")
        wait_until(lambda: pending(conn) == 0, 90, "an empty outbox")
        notes = pg_rows(conn, "SELECT id, note FROM plans ORDER BY id")
        for name in servers:
            assert [tuple(r) for r in servers[name].query("SELECT id, note FROM plans ORDER BY id")] == notes
        assert worker.stop() == 0, worker.output
    finally:
        if worker is not None and worker.proc is not None and worker.proc.poll() is None:
            worker.kill()
        for server in servers.values():
            server.cleanup()


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_roles_without_rights_on_pgturso_write_alter_and_copy_a_partitioned_filtered_reference_table(
        conn, dsn, tmp_path: Path, capture: str):
    """The application's role (owner of the tables, no superuser) writes, attaches partitions and alters a
    reference table and brings new tenants; a worker role set up by grant_worker copies it in chunks. The
    fan-out runs inside pgturso's own functions, so neither needs a right on pgturso's tables."""
    from test_security import login_role

    with login_role(conn, dsn, "ref_owner") as owner_dsn, login_role(conn, dsn, "pgturso_worker") as worker_dsn:
        conn.execute("SELECT pgturso.grant_worker('pgturso_worker')")
        if capture == "wal":  # reading a slot (the pattern's router): an attribute only a superuser gives
            conn.execute("ALTER ROLE pgturso_worker REPLICATION")
        conn.execute("GRANT CREATE ON SCHEMA public TO ref_owner")
        conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL)")
            owner.execute("CREATE TABLE plans (id int PRIMARY KEY, name text, active boolean NOT NULL) "
                          "PARTITION BY RANGE (id)")
            owner.execute("CREATE TABLE plans_1 PARTITION OF plans FOR VALUES FROM (0) TO (100)")
            owner.execute("INSERT INTO plans SELECT g, 'p' || g, g % 2 = 0 FROM generate_series(1, 60) AS g")
            conn.execute("SELECT pgturso.track_table('orders', target => %s, route_by => 'tenant_id', "
                         "capture => %s)", ("tenant-%s", capture))
            conn.execute("SELECT pgturso.track_table('plans', target => 'tenant-%s', row_filter => 'active')")
            owner.execute("INSERT INTO orders VALUES (1, 'acme')")  # a new tenant (capture, or the router)
            owner.execute("UPDATE plans SET active = NOT active WHERE id <= 4")  # rows moving in and out
            owner.execute("CREATE TABLE plans_2 (id int NOT NULL, name text, active boolean NOT NULL)")
            owner.execute("INSERT INTO plans_2 VALUES (150, 'attached', true), (151, 'filtered out', false)")
            if capture == "wal":  # a wal row filter is a CHECK on the table too, which a partition must carry
                owner.execute("ALTER TABLE plans_2 ADD CONSTRAINT pgturso_row_filter CHECK (num_nulls(active) >= 0)")
            owner.execute("ALTER TABLE plans ATTACH PARTITION plans_2 FOR VALUES FROM (100) TO (200)")
            owner.execute("INSERT INTO orders VALUES (2, 'globex')")
            owner.execute("ALTER TABLE plans ADD COLUMN tier text DEFAULT 'std'")  # a recopy
            owner.execute("UPDATE plans SET tier = 'gold' WHERE id = 150")
        conn.execute("SELECT pgturso.resync_table('plans')")  # copied by the worker, in chunks
        result = run_worker(worker_dsn, "", "--target", "tenant-%s", env={"PGTURSO_COPY_CHUNK_ROWS": "7"})
        assert result.returncode == 0, result.stderr
        assert pending(conn) == 0
        expected = pg_rows(conn, "SELECT id, name, tier FROM plans WHERE active ORDER BY id")
        assert len(expected) == 31 and (150, "attached", "gold") in expected
        for tenant in ("acme", "globex"):
            assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, name, tier FROM plans ORDER BY id") \
                == expected, tenant
        conn.execute("SELECT pgturso.untrack_table('plans')")
        conn.execute("SELECT pgturso.untrack_table('orders')")


def test_skip_transaction_skips_a_reference_change_for_the_refusing_tenant_only(conn, dsn, tmp_path: Path):
    """A reference change that one tenant's database refuses blocks that tenant only; skipping it drops that
    tenant's copy only: a tenant that was down meanwhile still gets it."""
    servers = {name: TursoServer().start() for name in ("a", "b", "c")}
    try:
        _pattern_with_orders(conn, f"file:{tmp_path}/tenant-%s.db")
        for name, server in servers.items():
            conn.execute("SELECT pgturso.add_target(%s, %s)", (f"tenant-{name}", server.url))
        conn.execute("CREATE TABLE plans (id int PRIMARY KEY, name text)")
        conn.execute("SELECT pgturso.track_table('plans', target => 'tenant-%s')")
        conn.execute("INSERT INTO orders VALUES (1, 'a', 'x', 1), (2, 'b', 'y', 1), (3, 'c', 'z', 1)")
        conn.execute("INSERT INTO plans VALUES (1, 'good')")
        drain_pattern(dsn)
        servers["b"].query("CREATE TRIGGER no_bad BEFORE INSERT ON plans WHEN NEW.name LIKE 'bad%' "
                           "BEGIN SELECT RAISE(ABORT, 'no bad plans here'); END")
        servers["c"].stop()
        bad_txid = conn.execute("INSERT INTO plans VALUES (2, 'bad') RETURNING pg_current_xact_id()::text"
                                ).fetchone()[0]  # type: ignore[index]
        conn.execute("INSERT INTO plans VALUES (3, 'after')")
        blocked = run_worker(dsn, "", "--target", "tenant-%s", env={"PGTURSO_RETRY_LIMIT": "1"})
        assert blocked.returncode != 0
        assert servers["a"].query("SELECT id FROM plans ORDER BY id") == [[1], [2], [3]]
        assert conn.execute("SELECT last_error_txid::text FROM pgturso.delivery_state WHERE target = 'tenant-b'"
                            ).fetchone()[0] == bad_txid  # type: ignore[index]
        conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'b refuses it')", (bad_txid,))
        assert pg_rows(conn, "SELECT target FROM pgturso.skipped_transaction") == [("tenant-b",)]
        servers["c"].start()
        drain_pattern(dsn)
        assert servers["b"].query("SELECT id FROM plans ORDER BY id") == [[1], [3]]
        assert servers["c"].query("SELECT id FROM plans ORDER BY id") == [[1], [2], [3]]
        assert pending(conn) == 0
    finally:
        for server in servers.values():
            server.cleanup()


def test_a_new_tenant_gets_reference_values_encoded_whatever_the_writing_sessions_settings(conn, dsn, tmp_path: Path):
    """The rows that bring a new tenant are of a table with no time type, so its capture pins no TimeZone or
    DateStyle; the reference rows copied for the tenant must still be encoded as capture encodes them."""
    _pattern_with_orders(conn, f"file:{tmp_path}/tenant-%s.db")
    conn.execute("CREATE TABLE plans (id int PRIMARY KEY, starts timestamptz, day date, price float8, span interval)")
    conn.execute("INSERT INTO plans VALUES (1, '2024-03-01 12:00:00+00', '2024-03-01', 0.1, '1 day 2 hours')")
    conn.execute("SELECT pgturso.track_table('plans', target => 'tenant-%s')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a', 1)")  # acme: registered in this session
    with psycopg.connect(dsn, autocommit=True) as odd:
        odd.execute("SET TimeZone = 'America/New_York'")
        odd.execute("SET DateStyle = 'SQL, DMY'")
        odd.execute("SET IntervalStyle = 'postgres_verbose'")
        odd.execute("SET extra_float_digits = -3")
        odd.execute("INSERT INTO orders VALUES (2, 'globex', 'g', 1)")  # globex: registered under odd settings
    drain_pattern(dsn)
    columns = "SELECT id, starts, day, price, span FROM plans"
    acme = tenant_rows(tmp_path / "tenant-acme.db", columns)
    assert acme and tenant_rows(tmp_path / "tenant-globex.db", columns) == acme


def _blocked(conn: psycopg.Connection[Any], pid: int) -> bool:
    return conn.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                        (pid,)).fetchone()[0]  # type: ignore[index]


def test_a_new_tenant_and_a_reference_write_in_either_order_under_each_isolation(conn, dsn, tmp_path: Path):
    """The race that a registration's copy of the reference rows and a reference write's list of tenants run:
    whichever order they commit in, the new tenant gets the write exactly once; a REPEATABLE READ registration
    older than the write fails (instead of copying stale rows), and writers of reference tables do not fail
    on each other."""
    _pattern_with_orders(conn, f"file:{tmp_path}/tenant-%s.db")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a', 1)")
    conn.execute("CREATE TABLE plans (id int PRIMARY KEY, name text, price int)")
    conn.execute("SELECT pgturso.track_table('plans', target => 'tenant-%s')")
    writer = psycopg.connect(dsn, autocommit=True)
    maker = psycopg.connect(dsn, autocommit=True)
    try:
        # 1. A reference write is open when the tenant appears: the registration waits for it, then copies it.
        with writer.transaction():
            writer.execute("INSERT INTO plans VALUES (10, 'ten', 10)")
            thread = threading.Thread(target=maker.execute, args=("INSERT INTO orders VALUES (2, 'zeta', 'z', 1)",))
            thread.start()
            wait_until(lambda: _blocked(conn, maker.info.backend_pid), 30, "the registration to wait")
        thread.join()
        # 2. A registration is open when the reference write comes: the write waits, then queues for it too.
        with maker.transaction():
            maker.execute("INSERT INTO orders VALUES (3, 'eta', 'e', 1)")
            thread = threading.Thread(target=writer.execute, args=("INSERT INTO plans VALUES (11, 'eleven', 11)",))
            thread.start()
            wait_until(lambda: _blocked(conn, writer.info.backend_pid), 30, "the reference write to wait")
        thread.join()
        # 3. A REPEATABLE READ registration whose snapshot predates a committed reference write fails.
        with pytest.raises(psycopg.errors.SerializationFailure):
            with maker.transaction():
                maker.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                maker.execute("SELECT count(*) FROM plans")  # the snapshot
                writer.execute("INSERT INTO plans VALUES (12, 'twelve', 12)")
                maker.execute("INSERT INTO orders VALUES (4, 'theta', 't', 1)")
        maker.execute("INSERT INTO orders VALUES (4, 'theta', 't', 1)")  # the application's retry
        # 4. Two REPEATABLE READ writers of the reference table on different rows both commit.
        other = psycopg.connect(dsn, autocommit=True)
        while other.info.backend_pid % 64 == writer.info.backend_pid % 64:  # another stripe (see _pattern_tenants)
            other.close()
            other = psycopg.connect(dsn, autocommit=True)
        with writer.transaction(), other.transaction():
            for session in (writer, other):
                session.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                session.execute("SELECT count(*) FROM plans")
            writer.execute("UPDATE plans SET price = 100 WHERE id = 10")
            other.execute("UPDATE plans SET price = 110 WHERE id = 11")
        other.close()
    finally:
        writer.close()
        maker.close()
    drain_pattern(dsn)
    expected = pg_rows(conn, PLANS)
    assert expected == [(10, "ten", 100), (11, "eleven", 110), (12, "twelve", 12)]
    for tenant in ("acme", "zeta", "eta", "theta"):
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", PLANS) == expected, tenant
    assert pending(conn) == 0


def test_attack_reference_writers_new_tenants_and_a_killed_worker(conn, dsn, tmp_path: Path):
    """Sessions writing the reference table (some under REPEATABLE READ, some rolled back) race sessions
    creating new tenants and moving rows between them, while the pattern worker is SIGKILLed mid-fan-out and
    restarted: every tenant database ends with exactly Postgres' reference rows and its own rows, and the
    outbox empties (each tenant's copy of a reference event is its own, covered by its own marker)."""
    import random

    _pattern_with_orders(conn, f"file:{tmp_path}/tenant-%s.db")
    conn.execute("INSERT INTO orders VALUES (0, 't0', 'seed', 1)")
    conn.execute("CREATE TABLE plans (id int PRIMARY KEY, name text, price int)")
    conn.execute("INSERT INTO plans SELECT g, 'p' || g, g FROM generate_series(1, 30) AS g")
    conn.execute("SELECT pgturso.track_table('plans', target => 'tenant-%s')")
    worker = WorkerProcess(dsn, "", "--target", "tenant-%s", "--idle-wait", "1",
                           env={"PGTURSO_RETRY_BASE_DELAY": "0.05", "PGTURSO_RETRY_MAX_DELAY": "1"}).start()
    errors: list[str] = []
    conflicts = {"serialization": 0, "deadlock": 0}
    commits = [0]
    next_tenant = iter(range(1, 1000))

    def run(writer: psycopg.Connection[Any], body: Any, isolation: str) -> None:
        try:
            with writer.transaction():
                writer.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
                body()
            commits[0] += 1
        except _Rollback:
            pass
        except psycopg.errors.SerializationFailure:
            conflicts["serialization"] += 1  # the application retries; nothing was sent
        except psycopg.errors.DeadlockDetected:
            conflicts["deadlock"] += 1
        except Exception as exc:
            errors.append(repr(exc))

    def reference_writer(number: int) -> None:
        rng = random.Random(number)
        with psycopg.connect(dsn, autocommit=True) as writer:
            for _ in range(40):
                def body() -> None:
                    for _ in range(rng.randint(1, 3)):
                        key = rng.randint(1, 40)
                        choice = rng.random()
                        if choice < 0.4:
                            writer.execute("INSERT INTO plans VALUES (%s, 'n', %s) ON CONFLICT (id) DO UPDATE "
                                           "SET price = plans.price + 1", (key, key))
                        elif choice < 0.8:
                            writer.execute("UPDATE plans SET price = (price * 2) %% 1000 WHERE id = %s", (key,))
                        else:
                            writer.execute("DELETE FROM plans WHERE id = %s", (key,))
                    if rng.random() < 0.1:
                        raise _Rollback
                run(writer, body, rng.choice(["READ COMMITTED", "READ COMMITTED", "REPEATABLE READ"]))

    def tenant_maker(number: int) -> None:
        rng = random.Random(100 + number)
        with psycopg.connect(dsn, autocommit=True) as writer:
            for step in range(25):
                def body(step: int = step) -> None:
                    tenant = f"t{next(next_tenant)}"
                    key = 1000 * (number + 1) + step
                    writer.execute("INSERT INTO orders VALUES (%s, %s, 'new', 1)", (key, tenant))
                    if rng.random() < 0.5:  # and move an existing row to it
                        writer.execute("UPDATE orders SET tenant_id = %s WHERE id = %s",
                                       (tenant, rng.randint(1000, 1000 * (number + 1) + step)))
                run(writer, body, rng.choice(["READ COMMITTED", "REPEATABLE READ"]))

    threads = [threading.Thread(target=reference_writer, args=(n,)) for n in range(3)]
    threads += [threading.Thread(target=tenant_maker, args=(n,)) for n in range(2)]
    try:
        for thread in threads:
            thread.start()
        for _ in range(3):  # crash the worker while it fans out, and start another
            time.sleep(2)
            worker.kill()
            worker = WorkerProcess(dsn, "", "--target", "tenant-%s", "--idle-wait", "1",
                                   env={"PGTURSO_RETRY_BASE_DELAY": "0.05", "PGTURSO_RETRY_MAX_DELAY": "1"}).start()
        for thread in threads:
            thread.join()
        assert not errors, errors[:5]
        assert commits[0] > 80, (commits, conflicts)
        wait_until(lambda: pending(conn) == 0, 120, "every tenant to catch up")
        assert worker.stop() == 0, worker.output
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.kill()
    plans = pg_rows(conn, PLANS)
    tenants = [t for (t,) in conn.execute("SELECT tenant FROM pgturso.target WHERE pattern = 'tenant-%s'").fetchall()]
    assert len(tenants) > 20
    for tenant in tenants:
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, PLANS) == plans, tenant
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant), tenant
    print(commits, conflicts)


class _Rollback(Exception):
    pass
