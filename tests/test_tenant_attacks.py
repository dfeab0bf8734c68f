"""Attacks on the per-tenant fan-out (a pattern target 'tenant-%s', tables routed by a tenant column, reference
tables): odd tenant values, a table owner's own code, transactions that bring, move and roll back tenants.
Asserted on the rows that arrived in each tenant's database (`file:` databases, real tursodb servers)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import pending
from support.turso import TursoServer
from support.workers import wait_until
from test_security import ESCALATE, calls, is_superuser, login_role
from test_tenants import drain_pattern, pg_tenant_rows, tenant_rows


def test_table_owner_runs_no_cast_of_theirs_through_the_route_by_value(conn, dsn, tmp_path: Path):
    """The route_by value's text names the tenant: taken by the type's output function, never by a cast the
    table's owner created, which pgturso's SECURITY DEFINER capture (and track_table, the copy, verify) would
    run with pgturso's rights, and which could send a tenant's rows to another tenant's database."""
    with login_role(conn, dsn, "routeowner") as owner_dsn:
        conn.execute("GRANT CREATE ON SCHEMA public TO routeowner")
        conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute(ESCALATE.format(attacker="routeowner"))
            owner.execute("""
                CREATE TYPE tenant_name AS ENUM ('acme', 'globex');
                CREATE TABLE orders (id int PRIMARY KEY, tenant_id tenant_name NOT NULL, item text);
                INSERT INTO orders VALUES (1, 'acme', 'anvil');
                CREATE FUNCTION tenant_text(tenant_name) RETURNS text LANGUAGE plpgsql AS
                    $$ BEGIN PERFORM public.escalate('cast tenant_name to text'); RETURN 'globex'; END $$;
                CREATE CAST (tenant_name AS text) WITH FUNCTION tenant_text(tenant_name);
            """)
            conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
            owner.execute("INSERT INTO orders VALUES (2, 'acme', 'rope'), (3, 'globex', 'gear')")
            owner.execute("UPDATE orders SET tenant_id = 'globex' WHERE id = 2")
            owner.execute("UPDATE orders SET tenant_id = 'acme' WHERE id = 2")
        conn.execute("SELECT pgturso.resync_table('orders')")
        drain_pattern(dsn)
        assert not is_superuser(conn, "routeowner")
        assert calls(conn) == []
        assert conn.execute("SELECT tenant FROM pgturso.target WHERE pattern IS NOT NULL ORDER BY 1").fetchall() == [
            ("acme",), ("globex",)]
        for tenant in ("acme", "globex"):
            assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id") == [
                tuple(r) for r in conn.execute("SELECT id, item FROM orders WHERE tenant_id::name = %s ORDER BY id",
                                               (tenant,)).fetchall()], tenant
        conn.execute("SELECT pgturso.untrack_table('orders')")


@pytest.mark.parametrize("value", ["..", "."])
def test_a_tenant_value_cannot_lead_a_file_url_out_of_the_patterns_directory(conn, dsn, tmp_path: Path, value: str):
    """'tenant-..' is a valid target name, but in a pattern URL with %s as a directory it is the parent."""
    (tmp_path / "dbs" / "acme").mkdir(parents=True)
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/dbs/%s/data.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'anvil')")
    with pytest.raises(psycopg.Error, match=f'tenant value "{value}" cannot name a database'):
        conn.execute("INSERT INTO orders VALUES (2, %s, 'escaped')", (value,))
    drain_pattern(dsn)
    assert not (tmp_path / "dbs" / "data.db").exists() and not (tmp_path / "data.db").exists()
    assert tenant_rows(tmp_path / "dbs" / "acme" / "data.db", "SELECT id, item FROM orders") == [(1, "anvil")]
    assert conn.execute("SELECT tenant FROM pgturso.target WHERE pattern IS NOT NULL").fetchall() == [("acme",)]


def test_tenant_values_differing_only_in_case_never_share_a_database(conn, dsn, turso: TursoServer):
    """Host names (and Turso Cloud database names) ignore case: tenants 'localhost' and 'LOCALHOST' of
    'http://%s:PORT' would be one database, each tenant's rows landing in the other's. The second is refused."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"http://%s:{turso.port}"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("INSERT INTO orders VALUES (1, 'localhost', 'mine')")
    with pytest.raises(psycopg.Error, match='tenant value "LOCALHOST" differs only in case from tenant "localhost"'):
        conn.execute("INSERT INTO orders VALUES (2, 'LOCALHOST', 'theirs')")
    with pytest.raises(psycopg.Error, match=r'tenant value "(Bob|bob)" differs only in case from tenant "(bob|Bob)"'):
        conn.execute("INSERT INTO orders VALUES (3, 'bob', 'x'), (4, 'Bob', 'y')")  # both new, in one statement
    drain_pattern(dsn)
    assert turso.query("SELECT id, item FROM orders ORDER BY id") == [[1, "mine"]]
    assert conn.execute("SELECT tenant FROM pgturso.target WHERE pattern IS NOT NULL").fetchall() == [("localhost",)]


def test_moves_swaps_and_rolled_back_tenants_in_one_transaction(conn, dsn, tmp_path: Path):
    """A row moved A -> B -> A in one transaction, two rows swapping tenants, a tenant brought by a savepoint
    rolled back, and a transaction rolled back after bringing a tenant and altering the table: every tenant's
    database ends with exactly its rows, and no database or target appears for a tenant that never committed."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("INSERT INTO orders VALUES (1, 'a', 'one'), (2, 'b', 'two'), (3, 'a', 'three')")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    drain_pattern(dsn)
    with conn.transaction():
        conn.execute("UPDATE orders SET tenant_id = 'b', item = 'moved' WHERE id = 1")
        conn.execute("UPDATE orders SET tenant_id = 'a', item = 'back' WHERE id = 1")
        # a swap in one statement, and a key change together with a tenant change
        conn.execute("UPDATE orders SET tenant_id = CASE tenant_id WHEN 'a' THEN 'b' ELSE 'a' END WHERE id IN (2, 3)")
        conn.execute("UPDATE orders SET id = 20, tenant_id = 'b' WHERE id = 2")
        try:
            with conn.transaction():
                conn.execute("INSERT INTO orders VALUES (4, 'ghost', 'never')")
                conn.execute("UPDATE orders SET tenant_id = 'ghost' WHERE id = 3")
                raise RuntimeError("roll the savepoint back")
        except RuntimeError:
            pass
    try:
        with conn.transaction():
            conn.execute("INSERT INTO orders VALUES (5, 'phantom', 'never')")
            conn.execute("ALTER TABLE orders ADD COLUMN note text")
            conn.execute("UPDATE orders SET note = 'x', tenant_id = 'phantom' WHERE id = 1")
            raise RuntimeError("roll the transaction back")
    except RuntimeError:
        pass
    conn.execute("INSERT INTO orders VALUES (6, 'c', 'six')")
    with conn.transaction():  # committed this time: a new tenant, then the table altered, then its column used
        conn.execute("INSERT INTO orders VALUES (7, 'd', 'seven')")
        conn.execute("ALTER TABLE orders ADD COLUMN note text")
        conn.execute("UPDATE orders SET note = 'n' || id WHERE tenant_id IN ('a', 'd')")
        conn.execute("INSERT INTO orders VALUES (8, 'e', 'eight', 'late')")
    drain_pattern(dsn)
    tenants = ("a", "b", "c", "d", "e")
    assert conn.execute("SELECT tenant FROM pgturso.target WHERE pattern IS NOT NULL ORDER BY 1").fetchall() == [
        (t,) for t in tenants]
    assert sorted(p.name for p in tmp_path.glob("tenant-*.db")) == [f"tenant-{t}.db" for t in tenants]
    for tenant in tenants:
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item, note FROM orders ORDER BY id") == \
            pg_tenant_rows(conn, tenant, "id, item, note"), tenant
    assert [pg_tenant_rows(conn, t, "id, item, note") for t in tenants] == [
        [(1, "back", "n1")], [(3, "three", None), (20, "two", None)], [(6, "six", None)], [(7, "seven", "n7")],
        [(8, "eight", "late")]]
    assert pending(conn) == 0


def install_file_counter(path: Path, *tables: str) -> None:
    """On a tenant's `file:` database only: count every write of a row of ``tables`` (by table and id) in
    ``applied``, so that a batch applied twice shows up even when the rows end up right (support.turso's
    counter, for pyturso databases)."""
    import turso as pyturso

    db = pyturso.connect(str(path))
    try:
        db.execute("CREATE TABLE applied (tbl TEXT, id INTEGER)")
        for table in tables:
            for when in ("INSERT", "UPDATE"):
                db.execute(f"CREATE TRIGGER count_{table}_{when.lower()} AFTER {when} ON {table} "
                           f"BEGIN INSERT INTO applied VALUES ('{table}', NEW.id); END")
        db.commit()
    finally:
        db.close()


def ledgers_and_notices_counted(conn: psycopg.Connection[Any], dsn: str, tmp_path: Path, tenants: list[str]) -> None:
    """A pattern target of `file:` databases, ``ledger`` routed by tenant and ``notices`` a reference table, each
    of ``tenants`` delivered (a row of amount 0) and counting the writes its database applies."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE ledger (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                 "tenant_id text NOT NULL, amount int)")
    conn.execute("SELECT pgturso.track_table('ledger', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("CREATE TABLE notices (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text)")
    conn.execute("SELECT pgturso.track_table('notices', target => 'tenant-%s')")
    conn.execute("INSERT INTO ledger (tenant_id, amount) SELECT t, 0 FROM unnest(%s::text[]) AS t", (tenants,))
    drain_pattern(dsn)
    for tenant in tenants:
        install_file_counter(tmp_path / f"tenant-{tenant}.db", "ledger", "notices")


def assert_each_tenant_applied_its_rows_once(conn: psycopg.Connection[Any], tmp_path: Path,
                                             tenants: list[str]) -> None:
    """Each counted tenant's database holds exactly its ledger rows written since it was counted and every
    notice, and applied each of them once."""
    notices = [tuple(r) for r in conn.execute("SELECT id, body FROM notices ORDER BY id").fetchall()]
    for tenant in tenants:
        path = tmp_path / f"tenant-{tenant}.db"
        expected = [tuple(r) for r in conn.execute(
            "SELECT id, amount FROM ledger WHERE tenant_id = %s AND amount > 0 ORDER BY id", (tenant,)).fetchall()]
        assert expected, tenant
        assert tenant_rows(path, "SELECT id, amount FROM ledger WHERE amount > 0 ORDER BY id") == expected, tenant
        assert tenant_rows(path, "SELECT id, body FROM notices ORDER BY id") == notices, tenant
        assert tenant_rows(path, "SELECT tbl, count(*), count(DISTINCT id) FROM applied GROUP BY tbl ORDER BY tbl") \
            == [("ledger", len(expected), len(expected))] + (
                [("notices", len(notices), len(notices))] if notices else []), tenant


def start_pattern_worker(dsn: str, tenant_threads: int, retry_max_delay: float) -> Any:
    """A `pgturso-worker run --target 'tenant-%s'` process retrying quickly (an attack's workers come and go)."""
    from support.workers import WorkerProcess

    return WorkerProcess(dsn, "", "--target", "tenant-%s", "--idle-wait", "1", "--tenant-threads",
                         str(tenant_threads), env={"PGTURSO_RETRY_BASE_DELAY": "0.05",
                                                   "PGTURSO_RETRY_MAX_DELAY": str(retry_max_delay)}).start()


def test_two_pattern_workers_sigkilled_in_turn_apply_every_tenants_rows_exactly_once(conn, dsn, tmp_path: Path):
    """Writers spread inserts over twelve tenants and into a reference table (every tenant gets each of its
    rows), and new tenants appear, while two pattern workers share the tenants and are SIGKILLed in turn at
    random points (a hand-over each time): every tenant's database holds exactly its rows and the reference
    rows, each written once (a Turso-side trigger counts the writes on the first twelve)."""
    import random
    import time

    from support.tenant_load import LedgerWriters
    from support.workers import WorkerProcess

    tenants = [f"t{n:02d}" for n in range(12)]
    ledgers_and_notices_counted(conn, dsn, tmp_path, tenants)
    writers = LedgerWriters(dsn, tenants, most_tenants=4, most_rows=20, notice_chance=0.3, most_notices=5,
                            new_tenant_chance=0.1, pause=0.01)

    def start() -> WorkerProcess:
        return start_pattern_worker(dsn, tenant_threads=3, retry_max_delay=0.5)

    workers = [start(), start()]
    rng = random.Random(7)
    try:
        writers.start()
        for _ in range(6):
            time.sleep(rng.uniform(0.3, 1.5))
            victim = rng.randrange(2)
            workers[victim].kill()
            workers[victim] = start()
        writers.stop()
        assert not writers.errors, writers.errors
        wait_until_drained(conn)
    finally:
        writers.stop()
        for worker in workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.kill()
    notices = [tuple(r) for r in conn.execute("SELECT id, body FROM notices ORDER BY id").fetchall()]
    assert notices
    assert_each_tenant_applied_its_rows_once(conn, tmp_path, tenants)
    newcomers = [t for (t,) in conn.execute("SELECT tenant FROM pgturso.target WHERE tenant LIKE 'new%'")]
    assert newcomers
    for tenant in newcomers:
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, body FROM notices ORDER BY id") == notices, tenant
        assert tenant_rows(path, "SELECT id, amount FROM ledger ORDER BY id") == [tuple(r) for r in conn.execute(
            "SELECT id, amount FROM ledger WHERE tenant_id = %s ORDER BY id", (tenant,)).fetchall()], tenant


def wait_until_drained(conn: psycopg.Connection[Any]) -> None:
    from support.workers import wait_until

    wait_until(lambda: pending(conn) == 0, 120, "every tenant to catch up")


def test_a_named_target_with_tables_of_its_own_never_becomes_a_tenant_database(conn, dsn, tmp_path: Path):
    """add_target('tenant-acme', ...) overrides the pattern's URL for tenant acme. But a named target that has
    tables of its own is not a tenant: two event streams (its tables, tenant acme's) would share one progress
    marker on one database, each fencing the other's events as already applied. Either order is refused."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-acme", f"file:{tmp_path}/acme-own.db"))
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('notes', target => 'tenant-acme')")
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("INSERT INTO notes VALUES (1, 'own')")
    with pytest.raises(psycopg.Error, match='target "tenant-acme" has tables of its own'):
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'routed')")
    conn.execute("INSERT INTO orders VALUES (2, 'globex', 'routed')")
    conn.execute("CREATE TABLE memos (id int PRIMARY KEY, v text)")
    with pytest.raises(psycopg.Error, match="tenant-globex is a tenant database of pattern target tenant-%s"):
        conn.execute("SELECT pgturso.track_table('memos', target => 'tenant-globex')")
    drain_pattern(dsn)
    result = __import__("conftest").run_worker(dsn, "", "--target", "tenant-acme", "--once")
    assert result.returncode == 0, result.stderr
    assert tenant_rows(tmp_path / "acme-own.db", "SELECT id, v FROM notes") == [(1, "own")]
    assert tenant_rows(tmp_path / "tenant-globex.db", "SELECT id, item FROM orders") == [(2, "routed")]
    assert conn.execute("SELECT name FROM pgturso.target WHERE pattern IS NOT NULL").fetchall() == [("tenant-globex",)]


def test_two_patterns_whose_tenant_names_collide_refuse_the_second_tenant(conn, dsn, tmp_path: Path):
    """Tenant 'x-eu' of 'tenant-%s' and tenant 'x' of 'tenant-%s-eu' are both named 'tenant-x-eu': the second
    was silently not registered, its rows queued for a tenant no worker delivers (and re-registered in vain
    at every write). It is refused, naming the other pattern."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/a-%s.db"))
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s-eu", f"file:{tmp_path}/b-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("CREATE TABLE eu_orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("SELECT pgturso.track_table('eu_orders', target => 'tenant-%s-eu', route_by => 'tenant_id')")
    conn.execute("INSERT INTO orders VALUES (1, 'x-eu', 'first')")
    with pytest.raises(psycopg.Error, match='"tenant-x-eu" is already the database of tenant "x-eu" of pattern '
                                            'tenant-%s'):
        conn.execute("INSERT INTO eu_orders VALUES (1, 'x', 'second')")
    conn.execute("INSERT INTO eu_orders VALUES (2, 'y', 'fine')")
    drain_pattern(dsn)
    result = __import__("conftest").run_worker(dsn, "", "--target", "tenant-%s-eu", "--once")
    assert result.returncode == 0, result.stderr
    assert tenant_rows(tmp_path / "a-x-eu.db", "SELECT id, item FROM orders") == [(1, "first")]
    assert tenant_rows(tmp_path / "b-y.db", "SELECT id, item FROM eu_orders") == [(2, "fine")]
    assert pending(conn) == 0


def test_route_by_column_losing_not_null_or_changing_type_keeps_every_row_routed(conn, dsn, tmp_path: Path):
    """route_by must be NOT NULL: dropping the constraint later, or changing the column's type, either is refused
    with the reason or leaves every row still routed to its tenant; a NULL tenant never reaches an outbox
    event without a tenant, and no target appears for it."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id int NOT NULL, item text)")
    conn.execute("INSERT INTO orders VALUES (1, 7, 'seven'), (2, -1, 'minus one')")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    refused = []
    try:
        conn.execute("ALTER TABLE orders ALTER COLUMN tenant_id DROP NOT NULL")
    except psycopg.Error as exc:
        refused.append(str(exc))
        assert "route_by" in str(exc), exc
    if not refused:
        with pytest.raises(psycopg.Error, match="tenant"):
            conn.execute("INSERT INTO orders VALUES (3, NULL, 'nobody')")
        conn.execute("ALTER TABLE orders ALTER COLUMN tenant_id SET NOT NULL")
    conn.execute("ALTER TABLE orders ALTER COLUMN tenant_id TYPE numeric(10, 2)")  # 7 becomes '7.00'
    conn.execute("INSERT INTO orders VALUES (4, 7, 'four')")
    drain_pattern(dsn)
    assert conn.execute("SELECT count(*) FROM pgturso.outbox WHERE tenant IS NULL").fetchone()[0] == 0
    names = [n for (n,) in conn.execute("SELECT tenant FROM pgturso.target WHERE pattern IS NOT NULL ORDER BY 1")]
    for tenant in names:
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id") == [
            tuple(r) for r in conn.execute("SELECT id, item FROM orders WHERE tenant_id::text = %s ORDER BY id",
                                           (tenant,)).fetchall()], tenant
    routed = sum(len(tenant_rows(tmp_path / f"tenant-{t}.db", "SELECT id FROM orders")) for t in names)
    assert routed == conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    assert pending(conn) == 0


def test_a_tenant_pointed_at_a_new_database_gets_its_tables_and_rows_or_a_clear_error(conn, dsn, tmp_path: Path):
    """remove_target's HINT says: to move a tenant elsewhere, add_target its name with the new URL. The new
    database has neither the tenant's tables nor its rows: after the move it must hold them all (or the move is
    refused with the reason), never only the rows written after it."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'before'), (2, 'globex', 'other')")
    drain_pattern(dsn)
    try:
        conn.execute("SELECT pgturso.add_target('tenant-acme', %s)", (f"file:{tmp_path}/moved-acme.db",))
    except psycopg.Error as exc:
        assert "tenant" in str(exc) and exc.diag.message_hint, exc
        return
    conn.execute("INSERT INTO orders VALUES (3, 'acme', 'after')")
    result = __import__("conftest").run_worker(dsn, "", "--target", "tenant-%s", "--once")
    assert tenant_rows(tmp_path / "moved-acme.db", "SELECT id, item FROM orders ORDER BY id") == [
        (1, "before"), (3, "after")], result.stderr
    assert result.returncode == 0, result.stderr


def test_one_tenant_value_under_two_patterns_keeps_each_patterns_rows_apart(conn, dsn, tmp_path: Path):
    """Tenant 'acme' of 'tenant-%s' and of 'eu-%s' are two databases: each gets its own pattern's tables and
    rows only (events are scoped by the pattern's layouts and the tenant value)."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/us-%s.db"))
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("eu-%s", f"file:{tmp_path}/eu-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("CREATE TABLE eu_orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("SELECT pgturso.track_table('eu_orders', target => 'eu-%s', route_by => 'tenant_id')")
    with conn.transaction():
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'us')")
        conn.execute("INSERT INTO eu_orders VALUES (1, 'acme', 'eu')")
        conn.execute("TRUNCATE eu_orders")
        conn.execute("INSERT INTO eu_orders VALUES (2, 'acme', 'eu again')")
    drain_pattern(dsn)
    result = __import__("conftest").run_worker(dsn, "", "--target", "eu-%s", "--once")
    assert result.returncode == 0, result.stderr
    assert tenant_rows(tmp_path / "us-acme.db", "SELECT id, item FROM orders") == [(1, "us")]
    assert tenant_rows(tmp_path / "eu-acme.db", "SELECT id, item FROM eu_orders") == [(2, "eu again")]
    assert tenant_rows(tmp_path / "us-acme.db", "SELECT name FROM sqlite_master WHERE type = 'table' "
                       "AND name NOT LIKE '\\_%' ESCAPE '\\' AND name NOT LIKE 'sqlite%'") == [("orders",)]
    assert pending(conn) == 0


def test_odd_tenant_values_are_refused_with_the_reason_and_nothing_queued(conn, dsn, tmp_path: Path):
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    odd = ["", "%s", "a/b", "../x", "ü", "x" * 60, "a'; DROP TABLE orders; --", "a b", "a\nb", "a%", "a\\b"]
    for number, value in enumerate(odd):
        with pytest.raises(psycopg.Error, match="cannot name a database") as refused:
            conn.execute("INSERT INTO orders VALUES (%s, %s, 'odd')", (number, value))
        assert refused.value.diag.message_hint, value
        with pytest.raises(psycopg.Error, match="cannot name a database"):  # moving a row there, too
            with conn.transaction():
                conn.execute("INSERT INTO orders VALUES (100, 'fine', 'x')")
                conn.execute("UPDATE orders SET tenant_id = %s WHERE id = 100", (value,))
    assert conn.execute("SELECT count(*) FROM pgturso.target WHERE pattern IS NOT NULL").fetchone()[0] == 0
    assert pending(conn) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_dotted_tenant_value_is_refused_where_it_would_change_a_urls_host_and_kept_in_file_paths(
        conn, dsn, tmp_path: Path):
    """'libsql://tenant-%s-myorg.turso.io' with tenant 'a.b' is host tenant-a.b-myorg.turso.io: another
    subdomain (a name Turso never gives a database, outside a *.turso.io certificate's one label). In a file:
    path a dot is just a character of the file name."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("SELECT pgturso.add_target('cloud-%s', 'libsql://tenant-%s-myorg.turso.io', 'token')")
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, org text NOT NULL)")
    conn.execute("SELECT pgturso.track_table('accounts', target => 'cloud-%s', route_by => 'org')")

    conn.execute("INSERT INTO accounts VALUES (1, 'acme')")  # no dot: its own host
    for value in ("a.b", "acme.evil.example", "x."):
        refusal = re.escape(f'tenant value "{value}" of table public.accounts')
        with pytest.raises(psycopg.Error, match=refusal) as refused:
            conn.execute("INSERT INTO accounts VALUES (2, %s)", (value,))
        assert "host" in str(refused.value) and "cloud-%s" in str(refused.value)
        assert "add_target" in refused.value.diag.message_hint and "CHECK" in refused.value.diag.message_hint
        assert "myorg" not in str(refused.value) + refused.value.diag.message_hint  # no URL (it may hold secrets)
    # A tenant with a URL of its own (an explicit add_target of its name) takes nothing from the pattern's host.
    conn.execute("SELECT pgturso.add_target('cloud-x.y', 'libsql://xy-myorg.turso.io', 'token')")
    conn.execute("INSERT INTO accounts VALUES (3, 'x.y')")
    assert conn.execute("SELECT tenant FROM pgturso.target WHERE pattern = 'cloud-%s' ORDER BY 1").fetchall() == [
        ("acme",), ("x.y",)]

    # In a file: path a dot is harmless: the tenant gets its database and its rows.
    conn.execute("INSERT INTO orders VALUES (1, 'a.b', 'anvil'), (2, 'acme', 'gear')")
    drain_pattern(dsn)
    assert tenant_rows(tmp_path / "tenant-a.b.db", "SELECT id, item FROM orders") == [(1, "anvil")]
    # Pointing that pattern at a URL whose host holds %s would move the dotted tenant to another host: refused.
    with pytest.raises(psycopg.Error, match=r'tenant "a\.b"') as refused:
        conn.execute("SELECT pgturso.add_target('tenant-%s', 'libsql://t-%s-myorg.turso.io', 'token')")
    assert "host" in str(refused.value) and refused.value.diag.message_hint
    conn.execute("SELECT pgturso.add_target('tenant-%s', 'libsql://myorg.turso.io/%s', 'token')")  # a path: fine


def test_a_tenant_value_that_is_no_host_name_is_refused_where_it_would_be_in_a_urls_host_and_kept_in_file_paths(
        conn, dsn, tmp_path: Path):
    """Where %s sits in a pattern URL's host, the tenant value and the rest of its label must make a DNS label,
    which is what a Turso database's host is (database names: lowercase letters, digits, dashes): letters,
    digits and - only (no underscore), not first or last, at most 63 characters. Any other value is refused at
    registration with the table, the value and the fixes; in a file: path it is kept. Case is allowed (host
    names ignore it; two values differing only in case are refused already)."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("SELECT pgturso.add_target('cloud-%s', 'libsql://tenant-%s-myorg.turso.io', 'token')")
    conn.execute("SELECT pgturso.add_target('edge-%s', 'https://%s.example.org:8443', 'token')")
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, org text NOT NULL)")
    conn.execute("SELECT pgturso.track_table('accounts', target => 'cloud-%s', route_by => 'org')")
    conn.execute("CREATE TABLE sites (id int PRIMARY KEY, org text NOT NULL)")
    conn.execute("SELECT pgturso.track_table('sites', target => 'edge-%s', route_by => 'org')")
    # %s as the port (a tenant per local tursodb server, as the background worker's test does): digits only.
    conn.execute("SELECT pgturso.add_target('port-%s', 'http://127.0.0.1:%s')")
    conn.execute("CREATE TABLE shards (id int PRIMARY KEY, port text NOT NULL)")
    conn.execute("SELECT pgturso.track_table('shards', target => 'port-%s', route_by => 'port')")
    conn.execute("INSERT INTO shards VALUES (1, '38777')")

    longest = "x" * (63 - len("tenant--myorg"))  # the label tenant-<value>-myorg at 63 characters
    conn.execute("INSERT INTO accounts VALUES (1, 'acme'), (2, 'Big-Co'), (3, '-lead'), (4, %s)", (longest,))
    conn.execute("INSERT INTO sites VALUES (1, 'acme'), (2, 'a-1')")
    refusals = [("accounts", "a_b"), ("accounts", longest + "x"), ("sites", "-acme"), ("sites", "acme-"),
                ("sites", "a_b"), ("shards", "a-1")]
    for table, value in refusals:
        refusal = re.escape(f'tenant value "{value}" of table public.{table}')
        with pytest.raises(psycopg.Error, match=refusal) as refused:
            conn.execute(f"INSERT INTO {table} VALUES (100, %s)", (value,))
        assert "host" in str(refused.value), value
        hint = refused.value.diag.message_hint or ""
        assert "add_target" in hint and "CHECK" in hint and "63" in hint, value
        assert "myorg" not in str(refused.value) + hint and "example.org" not in str(refused.value) + hint
    registered = conn.execute("SELECT pattern, tenant FROM pgturso.target WHERE pattern <> 'tenant-%s' "
                              "ORDER BY pattern, tenant COLLATE \"C\"").fetchall()
    assert registered == [("cloud-%s", "-lead"), ("cloud-%s", "Big-Co"), ("cloud-%s", "acme"), ("cloud-%s", longest),
                          ("edge-%s", "a-1"), ("edge-%s", "acme"), ("port-%s", "38777")]
    # In a file: path these are file names: the tenant gets its database and its rows.
    conn.execute("INSERT INTO orders VALUES (1, 'a_b', 'anvil'), (2, '-acme', 'gear')")
    drain_pattern(dsn)
    assert tenant_rows(tmp_path / "tenant-a_b.db", "SELECT id, item FROM orders") == [(1, "anvil")]
    assert tenant_rows(tmp_path / "tenant--acme.db", "SELECT id, item FROM orders") == [(2, "gear")]
    # Pointing that pattern at a URL whose host holds %s would leave those tenants without a host: refused.
    with pytest.raises(psycopg.Error, match=r'tenant "-acme", "a_b"') as refused:
        conn.execute("SELECT pgturso.add_target('tenant-%s', 'libsql://%s-myorg.turso.io', 'token')")
    assert "host" in str(refused.value) and refused.value.diag.message_hint


def _waiting_for_a_lock(observer: psycopg.Connection[Any], pid: int) -> bool:
    row = observer.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return bool(row and row[0])


@pytest.mark.parametrize("order", ["track_then_tenant", "tenant_then_track", "both_paused_then_released"])
@pytest.mark.parametrize("isolation", ["read committed", "repeatable read"])
def test_tracking_to_a_tenants_name_racing_that_tenants_registration_lets_one_through(
        conn, dsn, tmp_path: Path, order: str, isolation: str):
    """Session A: track_table('own', target => 'tenant-x') (an explicit target named like a tenant database).
    Session B: the first row of tenant x of pattern tenant-%s, which would make tenant-x its database. Each alone
    is refused when the other committed first; interleaved, each used to check before the other committed, and
    both succeeded: tenant x's events and own's shared tenant-x's one progress marker. Forced interleavings:
    one done but not committed while the other runs, and both held (by a third session's locks) just before
    their checks, then released together. Exactly one of them must commit."""
    from concurrent.futures import ThreadPoolExecutor

    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-x", f"file:{tmp_path}/x-own.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("CREATE TABLE own (id int PRIMARY KEY, v text)")
    sessions = {name: psycopg.connect(dsn) for name in ("track", "tenant", "holder")}
    statements = {"track": "SELECT pgturso.track_table('own', target => 'tenant-x')",
                  "tenant": "INSERT INTO orders VALUES (1, 'x', 'routed')"}
    pids = {name: s.info.backend_pid for name, s in sessions.items()}
    errors: dict[str, psycopg.Error] = {}

    def run(name: str) -> None:
        session = sessions[name]
        try:
            session.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
            session.execute(statements[name])
        except psycopg.Error as exc:
            errors[name] = exc
            session.rollback()

    def settled(futures: dict[str, Any]) -> bool:  # each finished, or waiting for the other's locks
        return all(f.done() or _waiting_for_a_lock(conn, pids[n]) for n, f in futures.items())

    pool = ThreadPoolExecutor(max_workers=2)
    try:
        if order == "both_paused_then_released":
            holder = sessions["holder"]  # holds what each takes just before its checks
            holder.execute("LOCK TABLE own IN ACCESS EXCLUSIVE MODE")  # track_table locks the table first
            holder.execute("SELECT 1 FROM pgturso.target WHERE name = 'tenant-%s' FOR UPDATE")  # a registration too
            futures = {n: pool.submit(run, n) for n in ("track", "tenant")}
            wait_until(lambda: all(_waiting_for_a_lock(conn, pids[n]) for n in futures), 60, "both to be held")
            holder.commit()
        else:
            first, second = order.split("_then_")
            run(first)  # done, not committed
            assert first not in errors, errors
            futures = {second: pool.submit(run, second)}
            wait_until(lambda: settled(futures), 60, f"{second} to finish or wait")
            sessions[first].commit()
        remaining = dict(futures)
        while remaining:  # commit each as it finishes (the other may be waiting for its locks)
            wait_until(lambda: any(f.done() for f in remaining.values()), 60, "a session to finish")
            for name in [n for n, f in remaining.items() if f.done()]:
                remaining.pop(name).result()
                if name not in errors:
                    sessions[name].commit()
    finally:
        pool.shutdown(wait=True)
        for session in sessions.values():
            session.close()

    tracked = conn.execute("SELECT count(*) FROM pgturso.tracked_table WHERE target = 'tenant-x'").fetchone()[0]
    tenant = conn.execute("SELECT pattern FROM pgturso.target WHERE name = 'tenant-x'").fetchone()[0]
    assert (tracked, tenant) in ((1, None), (0, "tenant-%s")), (tracked, tenant, errors)
    assert len(errors) == 1, errors  # exactly one refused, with a clear error (or a serialization failure)
    [(loser, error)] = errors.items()
    clear = {"track": "tenant-x is a tenant database of pattern target tenant-%s",
             "tenant": 'target "tenant-x" has tables of its own'}[loser]
    assert clear in str(error) or isinstance(error, psycopg.errors.SerializationFailure), error
    if not isinstance(error, psycopg.errors.SerializationFailure):
        assert error.diag.message_hint, error


def test_a_tenant_value_refused_during_a_chunked_copy_is_shown_and_once_stops_and_the_copy_resumes_once_fixed(
        conn, dsn):
    """A row whose tenant value makes no host name (a_b, where %s is in the URL's host) is already in the table
    when it is tracked, and the copy is left to the worker (track_table under REPEATABLE READ: so is a table of
    over 10,000 rows): the worker's copy chunk registers the chunk's tenants and is refused. That refusal cannot
    pass by retrying, so it must not be retried silently forever (a WARNING in the log, nothing in
    pgturso.status, run --once never ending, no tenant of the pattern copied): it is shown on the pattern's row of
    pgturso.status with the table and the fix, --once stops with an error, nothing is lost (the copy is still
    pending), and once the row is fixed the copy goes on."""
    conn.execute("SELECT pgturso.add_target('cloud-%s', 'libsql://tenant-%s-myorg.turso.io', 'token')")
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, org text NOT NULL)")
    conn.execute("INSERT INTO accounts VALUES (1, 'acme'), (2, 'a_b'), (3, 'acme')")
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    conn.execute("SELECT pgturso.track_table('accounts', target => 'cloud-%s', route_by => 'org')")
    conn.execute("COMMIT")
    table_id, state = conn.execute("SELECT id, copy_state FROM pgturso.tracked_table").fetchone()
    assert state == "copying"
    result = __import__("conftest").run_worker(dsn, "", "--target", "cloud-%s", timeout=60)
    assert result.returncode != 0, result.stderr
    assert 'tenant value \\"a_b\\" of table public.accounts' in result.stderr, result.stderr
    status, error, table = conn.execute("SELECT status, last_error, last_error_table FROM pgturso.delivery_state "
                                        "WHERE target = 'cloud-%s'").fetchone()
    assert status == "blocked" and table == "public.accounts", (status, table)
    assert '"a_b"' in error and "public.accounts" in error and "add_target" in error and "CHECK" in error, error
    assert conn.execute("SELECT copy_state FROM pgturso.tracked_table").fetchone()[0] == "copying"
    from support.workers import WorkerProcess

    # A running worker shows the same and tries again every retry_max_delay; the fix the error names (the row's
    # value; a CHECK keeps the next one out) lets the copy go on, and the error becomes history.
    worker = WorkerProcess(dsn, "", "--target", "cloud-%s", "--copy-chunk-rows", "2",
                           env={"PGTURSO_RETRY_MAX_DELAY": "0.2"}).start()
    try:
        wait_until(lambda: "copy_refused" in worker.output, 30, "the running worker's refused copy")
        conn.execute("UPDATE accounts SET org = 'a-b' WHERE id = 2")
        wait_until(lambda: conn.execute("SELECT copy_state FROM pgturso.tracked_table").fetchone()[0] == "done",
                   30, "the copy, once the row was fixed")
        wait_until(lambda: conn.execute("SELECT last_error IS NULL AND previous_error LIKE '%a_b%' FROM "
                                        "pgturso.delivery_state WHERE target = 'cloud-%s'").fetchone()[0],
                   30, "the pattern's error cleared")
    finally:
        worker.stop()
    assert table_id is not None
    copied = conn.execute("SELECT tenant, sum(nrows) FROM pgturso.outbox WHERE op = 'U' GROUP BY tenant "
                          "ORDER BY tenant").fetchall()
    assert copied == [("a-b", 2), ("acme", 2)], copied  # a-b: its UPDATE and its copied row
