"""A database per tenant: a pattern target ('tenant-%s'), tables routed by a tenant column, one worker for all
tenants. Many databases are `file:` targets (pyturso); the outage case uses real tursodb servers."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import WORKER, pending, run_worker
from pgturso.run.fanout import MAX_OPEN_TARGETS, ROUND_TENANTS
from support.pgcluster import free_port
from support.turso import TursoServer, install_apply_counter
from support.workers import WorkerProcess, wait_for_sync, wait_until


def tenant_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    import turso as pyturso

    db = pyturso.connect(str(path))
    try:
        return [tuple(r) for r in db.execute(sql).fetchall()]
    finally:
        db.close()


def pg_tenant_rows(conn: psycopg.Connection[Any], tenant: str, columns: str = "id, item") -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(
        f"SELECT {columns} FROM orders WHERE tenant_id = %s ORDER BY id", (tenant,)).fetchall()]


def install_file_apply_counter(path: Path, table: str) -> None:
    """On a tenant's file: database only: count every write of a row of ``table`` (by its ``id``) in a table
    ``applied``, as support.turso.install_apply_counter does on a server: a batch applied twice shows up even
    when the rows end up right."""
    import turso as pyturso

    db = pyturso.connect(str(path))
    try:
        db.execute("CREATE TABLE applied (id INTEGER)")
        for when in ("INSERT", "UPDATE"):
            db.execute(f"CREATE TRIGGER count_{when.lower()} AFTER {when} ON {table} "
                       "BEGIN INSERT INTO applied VALUES (NEW.id); END")
        db.commit()
    finally:
        db.close()


def applied_writes(path: Path) -> list[int]:
    return [r[0] for r in tenant_rows(path, "SELECT id FROM applied ORDER BY id")]


def count_postgres_writes(conn: psycopg.Connection[Any]) -> None:
    """The test's own count of the row writes committed in Postgres, per tenant (what Turso must apply once)."""
    conn.execute("CREATE TABLE written (tenant text, id int)")
    conn.execute("CREATE FUNCTION count_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                 "INSERT INTO written VALUES (NEW.tenant_id, NEW.id); RETURN NULL; END $$")
    conn.execute("CREATE TRIGGER count_write AFTER INSERT OR UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION "
                 "count_write()")


def postgres_writes(conn: psycopg.Connection[Any], tenant: str) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM written WHERE tenant = %s ORDER BY id", (tenant,))]


def wal_mark(conn: psycopg.Connection[Any]) -> str:
    return str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]


def delivered_everything(conn: psycopg.Connection[Any], pattern: str, capture: str, mark: str) -> bool:
    """Nothing pending in the outbox; in wal mode also the pattern's slot read past ``mark`` (wal_mark()): the
    router routed every commit before it into the outbox first."""
    if capture == "wal":
        confirmed = conn.execute("SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                                 "WHERE slot_name = pgturso._slot_name(%s)", (mark, pattern)).fetchone()
        if not confirmed or not confirmed[0]:
            return False
        # (not pending(): it peeks the slot, which the running router holds)
        return conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()[0] == 0  # type: ignore[index]
    return pending(conn) == 0


def drain_pattern(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = run_worker(dsn, "", "--target", "tenant-%s", *args)
    assert result.returncode == 0, result.stderr
    return result


def two_tenants_counted(conn: psycopg.Connection[Any], dsn: str, tmp_path: Path) -> None:
    """Tenants acme and globex of a pattern of `file:` databases, ``orders`` routed to them and delivered; from
    now on each database counts the writes it applies and Postgres the writes committed (applied_writes,
    postgres_writes)."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("INSERT INTO orders VALUES (100, 'acme', 'moves later'), (200, 'globex', 'g')")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    drain_pattern(dsn)
    for tenant in ("acme", "globex"):
        install_file_apply_counter(tmp_path / f"tenant-{tenant}.db", "orders")
    count_postgres_writes(conn)


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_rows_reach_their_tenants_database_with_moves_ddl_and_new_tenants(conn, dsn, tmp_path: Path, capture: str):
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text, secret text)")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'anvil', 'S1'), (2, 'globex', 'gear', 'S2'), "
                 "(3, 'acme', 'rope', 'S3')")
    conn.execute("SELECT pgturso.track_table('orders', target => %s, route_by => 'tenant_id', "
                 "columns => ARRAY['id', 'tenant_id', 'item'], capture => %s)", ("tenant-%s", capture))
    # Trigger capture registers the tenants of the copied rows at once; in wal mode the router does, where it
    # meets them in the stream (the copy's events wait, held, for it: none is any tenant's yet).
    assert conn.execute("SELECT name, tenant FROM pgturso.target WHERE pattern IS NOT NULL ORDER BY 1").fetchall() == (
        [("tenant-acme", "acme"), ("tenant-globex", "globex")] if capture == "trigger" else [])
    with conn.transaction():  # one source transaction touching three tenants, one of them new
        conn.execute("INSERT INTO orders VALUES (4, 'initech', 'stapler', 'S4')")
        conn.execute("UPDATE orders SET tenant_id = 'globex' WHERE id = 3")  # a move: acme -> globex
        conn.execute("UPDATE orders SET item = 'ANVIL' WHERE id = 1")
    held = conn.execute("SELECT count(*) FILTER (WHERE tenant IS NULL) FROM pgturso.outbox").fetchone()[0]
    assert held == 0 if capture == "trigger" else held > 0
    drain_pattern(dsn)
    for tenant in ("acme", "globex", "initech"):
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id") == \
            pg_tenant_rows(conn, tenant), tenant
    assert tenant_rows(tmp_path / "tenant-acme.db", "SELECT id, item FROM orders ORDER BY id") == [(1, "ANVIL")]
    assert pending(conn) == 0

    # A second routed table reaches the tenants there are, and a DDL reaches every tenant, in order.
    conn.execute("CREATE TABLE invoices (id int PRIMARY KEY, tenant_id text NOT NULL, total int)")
    conn.execute("SELECT pgturso.track_table('invoices', target => 'tenant-%s', route_by => 'tenant_id')")
    with conn.transaction():
        conn.execute("INSERT INTO orders VALUES (5, 'acme', 'before', 'S5')")
        conn.execute("ALTER TABLE orders ADD COLUMN qty int")  # not in the column list: stays in Postgres
        conn.execute("ALTER TABLE orders RENAME COLUMN item TO product")
        conn.execute("INSERT INTO orders VALUES (6, 'globex', 'after', 'S6', 7)")
        conn.execute("INSERT INTO invoices VALUES (1, 'initech', 100), (2, 'umbrella', 5)")  # umbrella is new
    conn.execute("UPDATE orders SET qty = 1, product = upper(product) WHERE tenant_id = 'acme'")
    drain_pattern(dsn)
    for tenant in ("acme", "globex", "initech"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, product FROM orders ORDER BY id") == \
            pg_tenant_rows(conn, tenant, "id, product"), tenant
        assert [r[1] for r in tenant_rows(path, "PRAGMA table_info(orders)")] == ["id", "tenant_id", "product"]
    assert tenant_rows(tmp_path / "tenant-initech.db", "SELECT id, total FROM invoices") == [(1, 100)]
    # the new tenant got every table of the pattern, at its current shape
    assert tenant_rows(tmp_path / "tenant-umbrella.db", "SELECT id, total FROM invoices") == [(2, 5)]
    assert tenant_rows(tmp_path / "tenant-umbrella.db", "SELECT count(*) FROM orders") == [(0,)]
    assert [r[1] for r in tenant_rows(tmp_path / "tenant-umbrella.db", "PRAGMA table_info(orders)")] == [
        "id", "tenant_id", "product"]
    # TRUNCATE empties the table in every tenant's database
    conn.execute("TRUNCATE invoices")
    drain_pattern(dsn)
    for tenant in ("acme", "globex", "initech", "umbrella"):
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT count(*) FROM invoices") == [(0,)]
    with pytest.raises(psycopg.Error, match="tenant database of pattern target"):
        conn.execute("SELECT pgturso.remove_target('tenant-acme')")
    states = conn.execute("SELECT target, status FROM pgturso.delivery_state WHERE target LIKE 'tenant-%' "
                          "AND target <> 'tenant-%s' ORDER BY 1").fetchall()
    assert states == [(f"tenant-{t}", "stopped") for t in ("acme", "globex", "initech", "umbrella")]


def test_tenant_and_pattern_errors(conn, dsn):
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text, item text)")
    with pytest.raises(psycopg.Error, match="needs one %s in its name and in its URL"):
        conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", "libsql://one-db.turso.io"))
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", "file:/tmp/pgturso-never-%s.db"))
    with pytest.raises(psycopg.Error, match="route_by needs a pattern target"):
        conn.execute("SELECT pgturso.track_table('orders', route_by => 'tenant_id')")
    with pytest.raises(psycopg.Error, match="must be a replicated NOT NULL column"):
        conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("ALTER TABLE orders ALTER COLUMN tenant_id SET NOT NULL")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    with pytest.raises(psycopg.Error, match='tenant value "a b" cannot name a database'):
        conn.execute("INSERT INTO orders VALUES (1, 'a b', 'x')")
    assert pending(conn) == 0  # no tenant yet (so no table to create anywhere), and the refused write left nothing
    verified = subprocess.run([*WORKER, "verify", "--dsn", dsn, "--target", "tenant-%s"], capture_output=True,
                              text=True, timeout=60)
    assert verified.returncode == 0 and "no tenant databases yet" in verified.stdout, verified.stderr


def _start_worker(dsn: str, *args: str) -> WorkerProcess:
    return WorkerProcess(dsn, "", "--target", "tenant-%s", "--idle-wait", "1", *args,
                         env={"PGTURSO_RETRY_BASE_DELAY": "0.05", "PGTURSO_RETRY_MAX_DELAY": "1"}).start()


def _metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def _endpoint_of(worker: WorkerProcess | None, port: int) -> dict[str, float]:
    """The metrics of a running worker's endpoint; a refused connection says whether that worker had exited (its
    exit code and its log's end: why) or was running (then something else freed or holds the port)."""
    import urllib.error

    assert worker is not None and worker.proc is not None
    try:
        return _metrics(port)
    except urllib.error.URLError as exc:
        state = "running" if worker.proc.poll() is None else f"exited with {worker.proc.returncode}"
        raise AssertionError(f"the metrics endpoint on port {port} refused ({exc.reason}); its worker is {state}; "
                             f"its log ends:\n{worker.output[-4000:]}") from exc


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_one_tenant_down_does_not_hold_back_the_others(conn, dsn, tmp_path: Path, capture: str):
    servers = {name: TursoServer().start() for name in ("a", "b", "c")}
    worker = None
    try:
        conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
        for name, server in servers.items():  # explicit overrides: each tenant on its own tursodb server
            conn.execute("SELECT pgturso.add_target(%s, %s)", (f"tenant-{name}", server.url))
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
        conn.execute("SELECT pgturso.track_table('orders', target => %s, route_by => 'tenant_id', capture => %s)",
                     ("tenant-%s", capture))
        next_id = iter(range(1, 1_000_000))

        def write_round(label: str) -> None:
            with conn.transaction():  # one transaction over all three tenants
                for name in servers:
                    conn.execute("INSERT INTO orders VALUES (%s, %s, %s)", (next(next_id), name, label))

        def on_turso(name: str) -> list[Any]:
            return [tuple(r) for r in servers[name].query("SELECT id, item FROM orders ORDER BY id")]

        def equal(name: str) -> bool:
            try:
                return on_turso(name) == pg_tenant_rows(conn, name)
            except Exception:  # the table may not exist yet
                return False

        write_round("first")
        metrics_port = free_port()
        worker = _start_worker(dsn, "--metrics-port", str(metrics_port))
        wait_until(lambda: all(equal(n) for n in servers), 90, "all tenants")
        for server in servers.values():  # from here on, every row write on Turso is counted
            install_apply_counter(server.url, "orders")

        def applied(name: str) -> list[Any]:
            return [r[0] for r in servers[name].query("SELECT id FROM applied ORDER BY id")]

        servers["b"].stop()
        progress: dict[str, list[int]] = {"a": [], "c": []}
        for round_no in range(30):  # b stays down for about 30 s while a and c keep receiving
            write_round(f"while b is down {round_no}")
            time.sleep(1)
            if round_no in (10, 20):
                wait_until(lambda: equal("a") and equal("c"), 90, "a and c while b is down")
                for name in progress:  # a and c progressed while b was down: every round so far arrived
                    progress[name].append(len(on_turso(name)))
        wait_until(lambda: equal("a") and equal("c"), 90, "a and c while b is down")
        assert progress == {"a": [12, 22], "c": [12, 22]}, progress  # the first round, then 11 and 21 rounds
        status = dict(conn.execute("SELECT target, status FROM pgturso.delivery_state "
                                   "WHERE target IN ('tenant-a', 'tenant-b', 'tenant-c')").fetchall())
        wait_until(lambda: conn.execute("SELECT status FROM pgturso.delivery_state WHERE target = 'tenant-b'"
                                        ).fetchone()[0] == "retrying", 90, "b retrying")
        assert status["tenant-a"] in ("delivering", "idle") and status["tenant-c"] in ("delivering", "idle")
        error = conn.execute("SELECT last_error FROM pgturso.delivery_state WHERE target = 'tenant-b'").fetchone()[0]
        assert error
        # One metrics endpoint for the pattern, a sample per tenant.
        samples = _metrics(metrics_port)
        assert samples['pgturso_retries_total{target="tenant-b",pattern="tenant-%s"}'] > 0
        others_retried = [ln for ln in worker.output.splitlines() if "event=retry" in ln and "tenant-b" not in ln]
        assert samples['pgturso_retries_total{target="tenant-a",pattern="tenant-%s"}'] == 0, others_retried[:5]
        assert samples['pgturso_rows_delivered_total{target="tenant-a",pattern="tenant-%s"}'] >= 11

        servers["b"].start()
        write_round("after")
        wait_until(lambda: all(equal(n) for n in servers), 90, "all tenants after b is back")
        assert len(on_turso("b")) == 32
        for name in servers:  # 31 rounds since the counter, each row written once, b's retries included
            assert applied(name) == [r[0] for r in on_turso(name)][1:], f"{name}: a write lost or applied twice"
        mark = wal_mark(conn)
        wait_until(lambda: delivered_everything(conn, "tenant-%s", capture, mark), 90, "an empty outbox")
        assert worker.stop() == 0, worker.output
    finally:
        for server in servers.values():
            server.cleanup()


def test_two_workers_share_the_tenants_and_take_over_from_a_killed_one(conn, dsn, tmp_path: Path):
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    tenants = ["t1", "t2", "t3", "t4"]
    for i, tenant in enumerate(tenants):
        conn.execute("INSERT INTO orders VALUES (%s, %s, 'seed')", (i, tenant))
    drain_pattern(dsn)
    # From here on, every row write is counted on both sides: Postgres's by a trigger of the test, each tenant
    # database's by install_file_apply_counter. Equal multisets of keys prove each write applied exactly once.
    count_postgres_writes(conn)
    for tenant in tenants:
        install_file_apply_counter(tmp_path / f"tenant-{tenant}.db", "orders")
    ports = [free_port(), free_port()]
    first = _start_worker(dsn, "--metrics-port", str(ports[0]))
    second = None

    def owners() -> dict[str, str]:
        return dict(conn.execute("SELECT target, worker FROM pgturso.delivery_state WHERE target LIKE 'tenant-t_' "
                                 "AND status IN ('delivering', 'idle', 'retrying')").fetchall())

    try:
        wait_until(lambda: len(owners()) == 4, 90, "the first worker to take every tenant")
        second = _start_worker(dsn, "--metrics-port", str(ports[1]))

        # The second worker gets a fair share: the first hands two tenants over.
        wait_until(lambda: (shared := owners()) and len(set(shared.values())) == 2 and len(shared) == 4, 90,
                   "two workers sharing")  # one read: two could mix two moments of a hand-over

        # Each tenant is up on exactly one endpoint: the one that handed it over shows it down.
        def up_on_endpoints() -> list[float]:
            samples = [_endpoint_of(worker, port) for worker, port in ((first, ports[0]), (second, ports[1]))]
            return [sum(s.get(f'pgturso_up{{target="tenant-{t}",pattern="tenant-%s"}}', 0) for s in samples)
                    for t in tenants]

        wait_until(lambda: up_on_endpoints() == [1, 1, 1, 1], 90, "each tenant up on one worker's endpoint")
        for n in range(100, 400):
            conn.execute("INSERT INTO orders VALUES (%s, %s, 'load')", (n, tenants[n % 4]))
            if n == 200:
                first.kill()
            if n % 50 == 0:
                conn.execute("UPDATE orders SET item = item || '+' WHERE id % 7 = 0")
        wait_until(lambda: pending(conn) == 0, 90, "the second worker to take everything over")
        assert second.stop() == 0, second.output
        assert "event=tenant_failed" not in first.output + second.output
        for tenant in tenants:
            path = tmp_path / f"tenant-{tenant}.db"
            assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant), tenant
            assert applied_writes(path) == postgres_writes(conn, tenant), f"{tenant}: a write lost or applied twice"
    finally:
        for proc in (first, second):
            if proc is not None and proc.proc is not None and proc.proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_random_workload_converges_in_every_tenant_database(conn, dsn, tmp_path: Path, capture: str):
    """Six sessions of random transactions over five tenants (inserts, updates, tenant moves, key changes,
    deletes, rollbacks, a new tenant appearing under load) while the pattern worker runs; then every tenant's
    database holds exactly that tenant's rows."""
    import random
    import threading

    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text, qty int)")
    conn.execute("INSERT INTO orders SELECT g, 't' || (g % 4), 'seed', g FROM generate_series(1, 200) g")
    conn.execute("SELECT pgturso.track_table('orders', target => %s, route_by => 'tenant_id', capture => %s)",
                 ("tenant-%s", capture))
    worker = _start_worker(dsn)
    tenants = ["t0", "t1", "t2", "t3"]
    errors: list[str] = []
    commits = [0]

    def session(number: int) -> None:
        rng = random.Random(1000 + number)
        with psycopg.connect(dsn, autocommit=True) as writer:
            for _ in range(60):
                if number == 0 and _ == 30:
                    tenants.append("t4")  # a tenant that appears under load
                try:
                    with writer.transaction():
                        for _ in range(rng.randint(1, 4)):
                            key, tenant = rng.randint(1, 400), rng.choice(tenants)
                            choice = rng.random()
                            if choice < 0.35:
                                writer.execute("INSERT INTO orders VALUES (%s, %s, 'new', %s) ON CONFLICT (id) "
                                               "DO UPDATE SET qty = orders.qty + 1", (key, tenant, key))
                            elif choice < 0.55:
                                writer.execute("UPDATE orders SET tenant_id = %s WHERE id = %s", (tenant, key))
                            elif choice < 0.7:
                                writer.execute("UPDATE orders SET id = id + 1000 WHERE id = %s", (key,))
                            elif choice < 0.85:
                                writer.execute("UPDATE orders SET qty = qty + 1 WHERE id BETWEEN %s AND %s",
                                               (key, key + 5))
                            else:
                                writer.execute("DELETE FROM orders WHERE id = %s", (key,))
                        if rng.random() < 0.1:
                            raise _Rollback
                    commits[0] += 1
                except _Rollback:
                    pass
                except (psycopg.errors.DeadlockDetected, psycopg.errors.UniqueViolation,
                        psycopg.errors.SerializationFailure):
                    pass  # the application's own conflicts: its transaction is rolled back, nothing to send
                except Exception as exc:  # anything else is a failure of the test's subject
                    errors.append(repr(exc))

    try:
        threads = [threading.Thread(target=session, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[:5]
        assert commits[0] > 100
        mark = wal_mark(conn)
        wait_until(lambda: delivered_everything(conn, "tenant-%s", capture, mark), 120, "every tenant to catch up")
        assert worker.stop() == 0, worker.output
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.kill()
    names = [name for (name,) in conn.execute(
        "SELECT tenant FROM pgturso.target WHERE pattern = 'tenant-%s' ORDER BY 1").fetchall()]
    assert names == ["t0", "t1", "t2", "t3", "t4"]
    for tenant in names:
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item, qty FROM orders ORDER BY id") == \
            pg_tenant_rows(conn, tenant, "id, item, qty"), tenant


class _Rollback(Exception):
    pass


def test_one_worker_delivers_many_tenants_over_a_bounded_number_of_connections(conn, dsn, tmp_path: Path):
    """200 tenants (an initial copy of 100 of them, live writes to all, 20 appearing under load) by one worker
    with three tenant threads: Postgres never sees more than its four connections (three pool connections and
    the scheduler's), its threads and open files stay bounded, and every tenant's database holds exactly its
    rows."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("INSERT INTO orders SELECT g, 'c' || (g % 100), 'copied' FROM generate_series(1, 2000) g")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    worker = _start_worker(dsn, "--tenant-threads", "3")
    seen_connections: list[int] = []
    seen_threads: list[int] = []
    seen_files: list[int] = []

    def sample() -> None:
        seen_connections.append(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgturso-worker%'").fetchone()[0])
        assert worker.proc is not None
        seen_threads.append(len(list(Path(f"/proc/{worker.proc.pid}/task").iterdir())))
        seen_files.append(len(list(Path(f"/proc/{worker.proc.pid}/fd").iterdir())))

    try:
        next_id = iter(range(10_000, 1_000_000))
        for round_no in range(10):
            with conn.transaction():  # one source transaction over 18 tenants and 20 more of them per round
                for n in range(round_no * 18, round_no * 18 + 18):
                    conn.execute("INSERT INTO orders VALUES (%s, %s, 'live')", (next(next_id), f"l{n}"))
                for n in range(20):
                    conn.execute("UPDATE orders SET item = item || '+' WHERE id = %s", (round_no * 200 + n * 10 + 1,))
            if round_no == 5:  # tenants appearing under load
                conn.execute("INSERT INTO orders SELECT 500000 + g, 'new' || g, 'late' FROM generate_series(1, 20) g")
            sample()
            time.sleep(0.2)
        wait_until(lambda: (sample(), pending(conn) == 0)[1], 180, "every tenant to catch up")
        for _ in range(5):  # and idle
            sample()
            time.sleep(0.2)
        assert worker.stop() == 0, worker.output
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.kill()
    tenants = [t for (t,) in conn.execute(
        "SELECT tenant FROM pgturso.target WHERE pattern = 'tenant-%s' ORDER BY 1").fetchall()]
    assert len(tenants) == 100 + 180 + 20
    assert max(seen_connections) <= 4, seen_connections
    # The pool, the main thread, a few of Python's and pyturso's, and the rounds' fsync threads.
    assert max(seen_threads) <= 3 + 4 + 3 * ROUND_TENANTS // 2, seen_threads
    # Tenants' databases open at once are bounded (three descriptors each: pyturso's two and the WAL's that its
    # fsyncs use), under load too: not one per tenant; and so are the rounds' pending fsyncs (one each).
    assert max(seen_files) <= 3 * (MAX_OPEN_TARGETS + 3) + 3 * ROUND_TENANTS + 20, seen_files
    for tenant in tenants:
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id") == \
            pg_tenant_rows(conn, tenant), tenant


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_many_tenants_survive_lost_connections_a_sigkill_and_a_second_worker_under_load(conn, dsn, tmp_path: Path,
                                                                                       capture: str):
    """Attack on the pattern worker's scheduler: while 60 tenants (some new) are written to, its own Postgres
    connection (which holds every tenant's delivery lock) is terminated twice with steps in flight on the pool
    connections, the pool connections once, a second worker joins and takes a share, and the first is SIGKILLed.
    Nothing is lost in any tenant's database, and nothing applied twice: the 40 tenants there from the start
    count on Turso every write they apply (a trigger), which must be each write committed in Postgres once
    (the 20 new ones get their databases from the worker, too late to install a counter).
    In wal mode the first worker's router is SIGKILLed mid-routing with it, and the second's takes over from
    its marker; every row image is queued for its tenant once (a test trigger on the outbox)."""
    import threading

    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text, qty int)")
    conn.execute("INSERT INTO orders SELECT g, 'k' || (g % 40), 'seed', 0 FROM generate_series(1, 400) g")
    conn.execute("SELECT pgturso.track_table('orders', target => %s, route_by => 'tenant_id', capture => %s)",
                 ("tenant-%s", capture))
    drain_pattern(dsn)
    counted = [f"k{n}" for n in range(40)]
    for tenant in counted:
        install_file_apply_counter(tmp_path / f"tenant-{tenant}.db", "orders")
    count_postgres_writes(conn)
    # Every row image the test writes is unique (ids, and qty counting up): each must be queued for its tenant
    # exactly once (by the capture triggers, or by the router however often it was killed and restarted).
    conn.execute("CREATE TABLE public.queued (tenant text, image jsonb)")
    conn.execute("CREATE FUNCTION public.log_queued() RETURNS trigger LANGUAGE plpgsql SET search_path = public "
                 "AS $$ BEGIN INSERT INTO public.queued "
                 "SELECT NEW.tenant, r FROM jsonb_array_elements(('[' || NEW.payload || ']')::jsonb) r; "
                 "RETURN NULL; END $$")
    conn.execute("CREATE TRIGGER log_queued AFTER INSERT ON pgturso.outbox FOR EACH ROW "
                 "WHEN (NEW.op = 'U' AND NEW.tenant IS NOT NULL) EXECUTE FUNCTION public.log_queued()")
    first = _start_worker(dsn, "--tenant-threads", "3")
    second = None
    stop = threading.Event()
    errors: list[str] = []

    def write() -> None:
        with psycopg.connect(dsn, autocommit=True) as writer:
            n = 1000
            while not stop.is_set():
                n += 1
                try:
                    with writer.transaction():
                        writer.execute("INSERT INTO orders VALUES (%s, %s, 'live', 0)", (n, f"k{n % 60}"))
                        writer.execute("UPDATE orders SET qty = qty + 1 WHERE id = %s", (n % 400 + 1,))
                except Exception as exc:  # the test's subject is the worker: the writer must never fail
                    errors.append(repr(exc))
                time.sleep(0.005)

    def terminate(application: str) -> int:
        return conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = %s", (application,)).fetchone()[0]

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(2)
        wait_until(lambda: terminate("pgturso-worker-pattern") == 1, 60, "the scheduler's connection")
        time.sleep(1.5)
        wait_until(lambda: terminate("pgturso-worker-tenant") >= 1, 60, "a pool connection")
        time.sleep(1.5)
        wait_until(lambda: terminate("pgturso-worker-pattern") == 1, 60, "the scheduler's connection again")
        time.sleep(1)
        second = _start_worker(dsn, "--tenant-threads", "2")
        time.sleep(3)
        first.kill()
        time.sleep(2)
        stop.set()
        writer.join()
        assert not errors, errors[:5]
        mark = wal_mark(conn)
        wait_until(lambda: delivered_everything(conn, "tenant-%s", capture, mark), 180,
                   "the second worker to deliver everything")
        assert second.stop() == 0, second.output
    finally:
        stop.set()
        writer.join()
        for proc in (first, second):
            if proc is not None and proc.proc is not None and proc.proc.poll() is None:
                proc.kill()
    assert first.lines("retry"), first.output  # it did lose its connection, and carried on
    if capture == "wal":  # the second worker's router took over (the first's held the router lock until killed)
        assert first.lines("router_started") and second.lines("router_started"), second.output
    assert conn.execute("SELECT count(*), count(DISTINCT (tenant, image)) FROM queued").fetchone() == (
        conn.execute("SELECT count(*) FROM queued").fetchone()[0],) * 2
    assert conn.execute("SELECT count(*) FROM queued WHERE image ->> 2 = 'live'").fetchone()[0] == \
        conn.execute("SELECT count(*) FROM orders WHERE item = 'live'").fetchone()[0]
    tenants = [t for (t,) in conn.execute(
        "SELECT tenant FROM pgturso.target WHERE pattern = 'tenant-%s' ORDER BY 1").fetchall()]
    assert len(tenants) == 60
    for tenant in tenants:
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item, qty FROM orders ORDER BY id") == \
            pg_tenant_rows(conn, tenant, "id, item, qty"), tenant
    for tenant in counted:
        writes = postgres_writes(conn, tenant)
        assert writes, tenant  # live inserts and updates reached every counted tenant
        assert applied_writes(tmp_path / f"tenant-{tenant}.db") == writes, tenant


def test_a_tenants_batch_read_in_one_statement_names_only_what_it_read(conn, dsn, tmp_path: Path):
    """The pattern worker reads a tenant's pending events with their snapshot and position in one statement, no
    transaction around it (Outbox.read_whole_batch). Deleting by the batch's name must then remove exactly what
    was read: not another tenant's events, not an event of a transaction that was still open during the read
    (its id may be lower than the batch's last one), not one committed after it."""
    from pgturso.run.worker import delivery_connection
    from pgturso.sources.outbox import Outbox

    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("INSERT INTO orders VALUES (10, 'acme', 'registers acme'), (11, 'globex', 'registers globex')")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    drain_pattern(dsn)
    with psycopg.connect(dsn) as open_writer:  # a transaction of acme's that stays open during the read
        open_writer.execute("INSERT INTO orders VALUES (1, 'acme', 'open during the read')")
        conn.execute("INSERT INTO orders VALUES (2, 'acme', 'read'), (3, 'globex', 'other tenant')")
        conn.execute("INSERT INTO orders VALUES (4, 'acme', 'read too')")
        reader = delivery_connection(dsn)
        try:
            outbox = Outbox(reader, batch_rows=100, batch_events=100, target="tenant-acme", pattern="tenant-%s",
                            tenant="acme")
            fits, batch = outbox.read_whole_batch()
            assert fits and batch is not None and batch.position is not None
            assert reader.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # no transaction left open
            events = list(batch.events())
            assert batch.transactions == 2 and batch.rows == 2
            assert [e.id for e in events] == sorted(e.id for e in events)
            open_writer.commit()
            conn.execute("INSERT INTO orders VALUES (5, 'acme', 'committed after the read')")
            outbox.remove_delivered(batch)
            left = conn.execute("SELECT tenant, payload LIKE '%open during the read%' OR payload LIKE '%after the "
                                "read%' FROM pgturso.outbox ORDER BY tenant, id").fetchall()
            assert left == [("acme", True), ("acme", True), ("globex", False)]

            # More pending than one batch may hold: it says so, and the worker reads it the general way.
            small = Outbox(reader, batch_rows=100, batch_events=2, target="tenant-acme", pattern="tenant-%s",
                           tenant="acme")
            assert small.read_whole_batch() == (False, None)
        finally:
            reader.close()
    drain_pattern(dsn)
    for tenant in ("acme", "globex"):
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id") == \
            pg_tenant_rows(conn, tenant), tenant
    assert pending(conn) == 0


def test_a_tenant_backlog_larger_than_a_batch_is_delivered_in_order_exactly_once(conn, dsn, tmp_path: Path):
    """A tenant's backlog above the batch limits (and a source transaction larger than a batch) goes the general
    way, several batches cut by the limits; a small one is read whole: both in commit order, each write once."""
    two_tenants_counted(conn, dsn, tmp_path)
    for n in range(10, 16):
        conn.execute("INSERT INTO orders VALUES (%s, 'acme', 'single')", (n,))
    with conn.transaction():  # larger than a batch of 3 events: delivered whole, on its own
        for n in range(20, 25):
            conn.execute("INSERT INTO orders VALUES (%s, 'acme', 'large')", (n,))
    conn.execute("UPDATE orders SET item = 'last' WHERE id = 10")
    conn.execute("INSERT INTO orders VALUES (30, 'globex', 'one')")
    result = run_worker(dsn, "", "--target", "tenant-%s", "--log-format", "json", env={"PGTURSO_BATCH_EVENTS": "3"})
    assert result.returncode == 0, result.stderr
    acme_batches = [line for line in result.stderr.splitlines() if '"delivered"' in line and "tenant-acme" in line]
    assert len(acme_batches) >= 4, result.stderr
    for tenant in ("acme", "globex"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant), tenant
        assert applied_writes(path) == postgres_writes(conn, tenant), tenant
    assert pending(conn) == 0


def test_the_scans_tenant_endpoints_are_what_target_endpoint_says_for_each_tenant(conn, dsn, tmp_path: Path):
    """The pattern worker takes each tenant's URL and token from its tenant list (TENANTS) instead of asking per
    tenant: the pattern's URL with the tenant, and its token, unless an add_target of the tenant's name gives its
    own URL (and its own token, or else the pattern's)."""
    import dataclasses

    from pgturso.common.settings import resolve
    from pgturso.run.fanout import TENANTS
    from pgturso.run.worker import target_endpoint

    conn.execute("SELECT pgturso.add_target('tenant-%s', 'libsql://t-%s.example.org', 'pattern-token')")
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("SELECT pgturso.add_target('tenant-own', 'libsql://own.example.org')")
    conn.execute("SELECT pgturso.add_target('tenant-both', 'libsql://both.example.org', 'own-token')")
    conn.execute("INSERT INTO orders VALUES (1, 'plain'), (2, 'own'), (3, 'both')")
    scanned = {name: (url, token) for name, _, url, token in conn.execute(TENANTS, ("tenant-%s",)).fetchall()}
    assert scanned == {"tenant-plain": ("libsql://t-plain.example.org", "pattern-token"),
                       "tenant-own": ("libsql://own.example.org", "pattern-token"),
                       "tenant-both": ("libsql://both.example.org", "own-token")}
    settings = resolve({}, {}, {})
    for name, endpoint in scanned.items():
        assert target_endpoint(conn, dataclasses.replace(settings, target=name)) == endpoint, name


def _wal_orders(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    """Pattern tenant-%s of `file:` databases, and ``orders`` routed to it by tenant_id with capture => 'wal'."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => %s, route_by => 'tenant_id', capture => 'wal')",
                 ("tenant-%s",))


def _blocked(conn: psycopg.Connection[Any], name: str) -> str:
    """The error pgturso.status shows for tenant database ``name`` while it is blocked ('' if not blocked)."""
    row = conn.execute("SELECT last_error FROM pgturso.status WHERE target = %s AND worker_status = 'blocked'",
                       (name,)).fetchone()
    return "" if row is None else str(row[0])


def _delivered(conn: psycopg.Connection[Any], names: list[str]) -> int:
    """Rows the workers delivered to these tenant databases (read from Postgres: the worker holds the files)."""
    return int(conn.execute("SELECT coalesce(sum(rows_delivered), 0) FROM pgturso.target_status "
                            "WHERE target = ANY (%s)", (names,)).fetchone()[0])


def _write_tenants(dsn: str, stop: Any, errors: list[str], tenants: list[str], first_id: int) -> None:
    """A concurrent load: an insert and an update per transaction, spread over ``tenants``."""
    with psycopg.connect(dsn, autocommit=True) as writer:
        n = first_id
        while not stop.is_set():
            n += 1
            try:
                with writer.transaction():
                    writer.execute("INSERT INTO orders (id, tenant_id, item) VALUES (%s, %s, 'live')",
                                   (n, tenants[n % len(tenants)]))
                    writer.execute("UPDATE orders SET item = item || '+' WHERE id = %s", (n - 1,))
            except Exception as exc:  # the subject is the router: the writer must never fail
                errors.append(repr(exc))
            time.sleep(0.005)


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_a_blocked_tenant_is_parked_while_the_others_deliver_then_registered_by_add_target(
        conn, dsn, tmp_path: Path):
    """capture => 'wal': a tenant value that cannot be registered (here it differs only in case from a tenant:
    host and Turso database names ignore case) has committed: the router parks its rows (this one and every later
    one of the value, deletes, a reference table's change and a DDL in between, in stream order) and goes on
    routing every other tenant under a concurrent load. The tenant shows 'blocked' in pgturso.status,
    target_status and pgturso-worker status with the error, the table, the value and the fix; a SIGKILLed worker
    comes back with it still parked. add_target of its name with a URL of its own registers it: its parked rows
    arrive in order, once, consistent with its reference table; nothing lost or doubled for the others."""
    import threading

    _wal_orders(conn, tmp_path)
    conn.execute("CREATE TABLE plans (id int PRIMARY KEY, name text)")
    conn.execute("SELECT pgturso.track_table('plans', target => %s)", ("tenant-%s",))
    conn.execute("INSERT INTO plans VALUES (1, 'free')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a')")
    drain_pattern(dsn)
    others = ["acme", "globex", "initech"]
    worker = _start_worker(dsn)
    stop = threading.Event()
    errors: list[str] = []
    writer = threading.Thread(target=_write_tenants, args=(dsn, stop, errors, others, 1000))
    writer.start()
    try:
        with conn.transaction():
            conn.execute("INSERT INTO orders VALUES (2, 'Acme', 'parked 1')")
            txid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        conn.execute("INSERT INTO orders VALUES (3, 'Acme', 'parked 2'), (4, 'Acme', 'deleted later')")
        conn.execute("UPDATE plans SET name = 'FREE'")  # a reference change while parked
        conn.execute("ALTER TABLE orders ADD COLUMN note text")  # a DDL while parked
        conn.execute("UPDATE orders SET item = 'parked 1b', note = 'n' WHERE id = 2")
        conn.execute("DELETE FROM orders WHERE id = 4")
        wait_until(lambda: "differs only in case" in _blocked(conn, "tenant-Acme"), 120, "Acme shown blocked")
        error = _blocked(conn, "tenant-Acme")
        assert 'tenant value "Acme"' in error and "orders" in error and "HINT" in error, error
        assert "pgturso.add_target('tenant-Acme'" in error and "discard_blocked_tenant" in error, error
        assert conn.execute("SELECT last_error_txid::text, last_error_table FROM pgturso.target_status "
                            "WHERE target = 'tenant-Acme'").fetchone() == (txid, "public.orders")
        status = subprocess.run([*WORKER, "status", "--dsn", dsn], capture_output=True, text=True, timeout=60)
        assert status.returncode == 1 and "tenant-Acme" in status.stdout and "blocked" in status.stdout, status.stdout
        # The others keep delivering while Acme is parked: rows committed after the parked ones arrive.
        names = [f"tenant-{t}" for t in others]
        before = _delivered(conn, names)
        wait_until(lambda: _delivered(conn, names) > before + 20, 120, "the others' rows, behind no one")
        worker.kill()  # SIGKILL with Acme parked: the new router finds it blocked and keeps parking its rows
        worker = _start_worker(dsn)
        conn.execute("INSERT INTO orders VALUES (6, 'Acme', 'parked after the restart', NULL)")
        before = _delivered(conn, names)
        wait_until(lambda: _delivered(conn, names) > before + 20, 120, "the others' rows after the restart")
        assert _blocked(conn, "tenant-Acme")
        assert not (tmp_path / "own-Acme.db").exists()
        # The fix: Acme gets a database of its own.
        conn.execute("SELECT pgturso.add_target('tenant-Acme', %s)", (f"file:{tmp_path}/own-Acme.db",))
        assert _blocked(conn, "tenant-Acme") == ""
        conn.execute("INSERT INTO orders VALUES (8, 'Acme', 'registered', NULL)")
        time.sleep(1)
        stop.set()
        writer.join()
        assert not errors, errors[:5]
        assert conn.execute("SELECT pgturso.wait_for_sync('120 s')").fetchone()[0]
    finally:
        stop.set()
        writer.join()
        worker.stop()
    assert tenant_rows(tmp_path / "own-Acme.db", "SELECT id, item, note FROM orders ORDER BY id") == \
        pg_tenant_rows(conn, "Acme", "id, item, note") == [
            (2, "parked 1b", "n"), (3, "parked 2", None), (6, "parked after the restart", None),
            (8, "registered", None)]
    assert tenant_rows(tmp_path / "own-Acme.db", "SELECT id, name FROM plans") == [(1, "FREE")]
    assert not (tmp_path / "tenant-Acme.db").exists()
    for tenant in others:
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant), tenant
        assert tenant_rows(path, "SELECT id, name FROM plans") == [(1, "FREE")], tenant
    assert conn.execute("SELECT count(*) FROM pgturso.blocked_tenant").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()[0] == 0


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_a_blocked_tenant_given_up_is_discarded_or_skipped(conn, dsn, tmp_path: Path):
    """capture => 'wal': a tenant value that cannot name a database at all is parked (blocked) while the others
    deliver. Giving up on it: skip_transaction of the transaction that brought it (after correcting the row in
    Postgres; named by target_status) drops its parked rows as before this change: it is no longer blocked. Or
    discard_blocked_tenant drops all its parked rows at once; a later row of the value parks it again."""
    _wal_orders(conn, tmp_path)
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'before')")
    with conn.transaction():
        conn.execute("INSERT INTO orders VALUES (2, 'no way!', 'bad')")
        txid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
    conn.execute("INSERT INTO orders VALUES (3, 'globex', 'after')")
    conn.execute("INSERT INTO orders VALUES (4, 'bad value', 'b1'), (5, 'bad value', 'b2')")
    worker = _start_worker(dsn)
    try:
        wait_until(lambda: "cannot name a database" in _blocked(conn, "tenant-no way!")
                   and _blocked(conn, "tenant-bad value"), 120, "both values shown blocked")
        wait_until(lambda: _delivered(conn, ["tenant-globex"]) == 1, 120, "globex's row, behind no one")
        # (b) as before this change: correct the row, then skip the transaction for the pattern
        conn.execute("DELETE FROM orders WHERE id = 2")
        assert conn.execute("SELECT pgturso.skip_transaction(%s, 'bad tenant value', target => 'tenant-%%s')",
                            (txid,)).fetchone()[0] >= 2  # (its table's creation and row, parked)
        wait_until(lambda: _blocked(conn, "tenant-no way!") == "", 60, "no way! no longer blocked")
        # (b) all at once: the value's parked rows dropped, recorded
        conn.execute("UPDATE orders SET tenant_id = 'initech' WHERE tenant_id = 'bad value'")
        assert conn.execute("SELECT pgturso.wait_for_sync('2 s')").fetchone()[0] is False  # parked: not in sync
        discarded = conn.execute("SELECT pgturso.discard_blocked_tenant('tenant-%s', 'bad value', 'moved to initech')"
                                 ).fetchone()[0]
        assert discarded >= 2
        # recorded as a deletion of pending events (pgturso.outbox_deletion), as the skip before it was
        assert conn.execute("SELECT operation, events FROM pgturso.outbox_deletion ORDER BY id DESC LIMIT 1"
                            ).fetchone() == ("discard_blocked_tenant", discarded)
        assert conn.execute("SELECT pgturso.wait_for_sync('60 s')").fetchone()[0]
        assert conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()[0] == 0
        # a later row of a discarded value is parked again
        conn.execute("INSERT INTO orders VALUES (6, 'bad value', 'again')")
        wait_until(lambda: _blocked(conn, "tenant-bad value"), 60, "bad value blocked again")
    finally:
        worker.stop()
    assert tenant_rows(tmp_path / "tenant-acme.db", "SELECT id, item FROM orders ORDER BY id") == [(1, "before")]
    assert tenant_rows(tmp_path / "tenant-initech.db", "SELECT id, item FROM orders ORDER BY id") == [
        (4, "b1"), (5, "b2")]
    assert conn.execute("SELECT tenant FROM pgturso.target WHERE pattern IS NOT NULL ORDER BY 1").fetchall() == [
        ("acme",), ("globex",), ("initech",)]
    assert conn.execute("SELECT reason, events >= 2 FROM pgturso.skipped_transaction "
                        "WHERE target = 'tenant-bad value'").fetchall() == [("moved to initech", True)]


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_a_patterns_lost_slot_is_replaced_and_every_tenant_recopied(conn, dsn, tmp_path: Path):
    """A wal pattern whose slot is gone (a failover, dropped by hand): its router replaces it and every table of
    the pattern is copied afresh to every tenant (recreated there: nothing doubled), reference table included."""
    _wal_orders(conn, tmp_path)
    conn.execute("CREATE TABLE plans (id int PRIMARY KEY, name text)")
    conn.execute("SELECT pgturso.track_table('plans', target => %s)", ("tenant-%s",))
    conn.execute("INSERT INTO plans VALUES (1, 'free')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a'), (2, 'globex', 'g')")
    drain_pattern(dsn)
    conn.execute("SELECT pg_drop_replication_slot(pgturso._slot_name('tenant-%s'))")
    conn.execute("INSERT INTO orders VALUES (3, 'acme', 'lost with the slot'), (4, 'initech', 'new')")
    conn.execute("UPDATE plans SET name = 'FREE'")
    conn.execute("DELETE FROM orders WHERE id = 2")
    drain_pattern(dsn)
    drain_pattern(dsn)  # (the recopy's chunks, if the first run ended before they were routed)
    for tenant in ("acme", "globex", "initech"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant), tenant
        assert tenant_rows(path, "SELECT id, name FROM plans") == [(1, "FREE")], tenant
    assert pending(conn) == 0


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_a_large_transaction_is_routed_in_bounded_memory(conn, dsn, tmp_path: Path):
    """The router writes a large transaction's rows as they are decoded, in one routing transaction: its memory
    stays flat whatever the transaction's size, and every tenant gets its rows whole."""
    from test_wal_attacks import BIG_ROWS, drain_measuring_rss

    _wal_orders(conn, tmp_path)
    conn.execute("INSERT INTO orders SELECT g, 't' || (g %% 3), md5(g::text) FROM generate_series(1, %s) g",
                 (BIG_ROWS,))
    peak_mb = drain_measuring_rss(dsn, "", "--target", "tenant-%s")
    for n in range(3):
        assert tenant_rows(tmp_path / f"tenant-t{n}.db", "SELECT count(*), sum(id) FROM orders") == [tuple(
            conn.execute("SELECT count(*), sum(id) FROM orders WHERE tenant_id = %s", (f"t{n}",)).fetchone())]
    assert peak_mb < 200, f"worker peak RSS {peak_mb:.0f} MB"


@pytest.mark.usefixtures("no_autovacuum")  # asserts in_sync after a stop
@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_pattern_status_counts_what_is_held_for_the_router_and_still_in_the_slot(conn, dsn, tmp_path: Path):
    """capture => 'wal', no worker running: a row committed is still in the pattern's slot, a TRUNCATE is held
    for the router (tenant NULL). pgturso.status never says a tenant is in sync while either has not arrived:
    the held event is pending for every tenant, the slot's part shows as wal_pending_bytes; in_sync once
    delivered."""
    _wal_orders(conn, tmp_path)
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a'), (2, 'globex', 'g')")
    drain_pattern(dsn)

    def status() -> list[tuple[Any, ...]]:
        return conn.execute("SELECT target, pending_events, wal_pending_bytes > 0, in_sync FROM pgturso.status "
                            "ORDER BY target").fetchall()

    # The --once run delivered everything: in sync, though its own last writes follow the slot's position
    assert [(row[0], row[1], row[3]) for row in status()] == [("tenant-acme", 0, True), ("tenant-globex", 0, True)]

    conn.execute("INSERT INTO orders VALUES (3, 'acme', 'in the slot')")
    assert status() == [("tenant-acme", 0, True, False), ("tenant-globex", 0, True, False)]
    conn.execute("TRUNCATE orders")  # held for the router: one outbox row, tenant NULL, for every tenant
    assert [row[:2] for row in status()] == [("tenant-acme", 1), ("tenant-globex", 1)]
    assert not any(row[3] for row in status())
    shown = subprocess.run([*WORKER, "status", "--dsn", dsn], capture_output=True, text=True, timeout=60).stdout
    assert "changes in the replication slot not yet read" in shown, shown
    conn.execute("INSERT INTO orders VALUES (4, 'globex', 'after')")
    port = free_port()
    worker = _start_worker(dsn, "--metrics-port", str(port))
    router = '{target="tenant-%s",pattern="tenant-%s"}'
    try:  # (the slot's part is an upper bound: WAL written after its last confirmed position, this test's too)
        wait_until(lambda: all(row[3] for row in status()), 120, "in sync once delivered")
        # the router's gauges: what is held for it, and the pattern's slot
        wait_until(lambda: _metrics(port).get(f"pgturso_held_events{router}") == 0, 60, "the router's gauges")
        assert f"pgturso_wal_pending_bytes{router}" in _metrics(port)
    finally:
        worker.stop()
    # The router stopped a moment after routing a batch (its own routed rows come back through the slot as a
    # batch too): it looks at the slot once more at the stop, and records where it caught up.
    assert all(row[3] for row in status()), "the worker stopped with everything delivered"
    assert tenant_rows(tmp_path / "tenant-acme.db", "SELECT id FROM orders") == []
    assert tenant_rows(tmp_path / "tenant-globex.db", "SELECT id, item FROM orders") == [(4, "after")]


def test_a_pattern_worker_of_another_database_is_no_member_of_this_ones(conn, dsn, tmp_path: Path):
    """Two databases of one cluster, each with a pattern target of the same name ('tenant-%s', the README's) and
    its own pattern worker: each worker delivers every tenant of its own database. The members of a pattern
    (workers sharing its tenants) are counted by their advisory locks, which are per database: counting the
    other database's worker too, each took a fair share of two (one tenant of two) and left the other tenant of
    its database to nobody, forever."""
    info = conn.info
    other_db = f"{info.dbname}_other"
    conn.execute(f'DROP DATABASE IF EXISTS "{other_db}" WITH (FORCE)')
    conn.execute(f'CREATE DATABASE "{other_db}"')
    other_dsn = f"host={info.host} port={info.port} user={info.user} dbname={other_db}"
    workers: list[Any] = []
    try:
        for database, where in ((other_dsn, tmp_path / "other"), (dsn, tmp_path / "this")):
            where.mkdir()
            with psycopg.connect(database, autocommit=True) as db:
                if database == other_dsn:
                    db.execute("CREATE EXTENSION pgturso CASCADE")
                db.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{where}/tenant-%s.db"))
                db.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
                db.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
                db.execute("INSERT INTO orders VALUES (1, 'acme', 'a'), (2, 'globex', 'g')")
            workers.append(_start_worker(database))
        for database, worker in zip((other_dsn, dsn), workers, strict=True):
            with psycopg.connect(database, autocommit=True) as db:
                wait_for_sync(db, "120 s", worker)
    finally:
        for worker in workers:
            worker.stop()
        conn.execute(f'DROP DATABASE IF EXISTS "{other_db}" WITH (FORCE)')
    for where in ("other", "this"):
        for tenant in ("acme", "globex"):
            assert tenant_rows(tmp_path / where / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id") \
                == pg_tenant_rows(conn, tenant), (where, tenant)


@pytest.mark.usefixtures("no_autovacuum")  # asserts in_sync after a stop
def test_a_router_stopping_while_a_tenant_cannot_take_its_rows_never_says_that_tenant_is_in_sync(conn, dsn,
                                                                                               tmp_path: Path):
    """Attack on 5d64126 for a wal pattern: the router routes rows of two tenants while one tenant's database
    cannot be opened (a directory stands in its place), then the worker stops: the router's record of where it
    caught up must not make status say that tenant is in sync while its rows wait in the outbox; once its
    database is back, the next run delivers them once, and both tenants are in sync. (A new case; passes.)"""
    _wal_orders(conn, tmp_path)
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a'), (2, 'globex', 'g')")
    drain_pattern(dsn)
    aside = tmp_path / "aside"
    aside.mkdir()
    for path in tmp_path.glob("tenant-globex.db*"):
        path.rename(aside / path.name)
    (tmp_path / "tenant-globex.db").mkdir()  # globex's database cannot be opened now
    conn.execute("INSERT INTO orders VALUES (3, 'acme', 'a2'), (4, 'globex', 'g2'), (5, 'globex', 'g3')")

    def in_sync() -> dict[str, bool]:
        return {str(t): bool(s) for t, s in conn.execute("SELECT target, in_sync FROM pgturso.status").fetchall()}

    worker = _start_worker(dsn)
    try:
        # (one transaction: once globex's rows are routed, acme's are too; none left: delivered)
        routed = ("SELECT coalesce(sum(nrows) FILTER (WHERE tenant = 'globex'), 0) >= 2 "
                  "AND count(*) FILTER (WHERE tenant = 'acme') = 0 FROM pgturso.outbox")
        wait_until(lambda: conn.execute(routed).fetchone()[0], 60,  # type: ignore[index]
                   "globex's rows routed and held, acme's delivered")
    finally:
        assert worker.stop() == 0
    assert tenant_rows(tmp_path / "tenant-acme.db", "SELECT count(*) FROM orders") == [(2,)]
    assert in_sync()["tenant-globex"] is False, "globex's rows are held in the outbox, not on its database"
    (tmp_path / "tenant-globex.db").rmdir()
    for path in aside.iterdir():
        path.rename(tmp_path / path.name)
    assert in_sync()["tenant-globex"] is False
    drain_pattern(dsn)
    assert tenant_rows(tmp_path / "tenant-globex.db", "SELECT id, item FROM orders ORDER BY id") == \
        [(2, "g"), (4, "g2"), (5, "g3")]
    assert tenant_rows(tmp_path / "tenant-acme.db", "SELECT id FROM orders ORDER BY id") == [(1,), (3,)]
    assert in_sync() == {"tenant-acme": True, "tenant-globex": True}


def test_a_trigger_pattern_worker_run_in_process_closes_its_connections_when_it_ends(conn, dsn, tmp_path: Path):
    """Regression of 5d64126, which moved the closing of a pattern worker's connections (its own, holding its
    member lock, and its pool's) and metrics into the closing of its router, which a trigger pattern has none
    of: once run() returns, the worker holds no connection to Postgres. Failed before (its connections stayed
    open until the process exited)."""
    from pgturso.common.settings import resolve
    from pgturso.run.fanout import PatternWorker

    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a')")
    pattern = PatternWorker(dsn, resolve({}, {}, {"target": "tenant-%s"}))
    assert pattern.run(once=True) == 0
    assert tenant_rows(tmp_path / "tenant-acme.db", "SELECT id, item FROM orders") == [(1, "a")]
    assert pattern.conn is not None and pattern.conn.closed
    others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    wait_until(lambda: conn.execute(others).fetchone()[0] == 0, 60,  # type: ignore[index]
               "the worker's connections to end")
