"""Attacks on a wal pattern's blocked (parked) tenants: a route_by value the router cannot register is parked,
its events queued under its value in stream order, until the fix its status names (add_target) or a discard."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.workers import wait_for_sync, wait_until
from test_tenants import _blocked, _start_worker, pg_tenant_rows, tenant_rows


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_a_tenant_blocked_by_the_patterns_host_is_registered_when_the_pattern_url_follows_the_hint(
        conn, dsn, tmp_path: Path):
    """A tenant value parked because the pattern's URL has %s in its host ('a_b' makes no host name) is shown
    with a HINT naming three fixes, one of them 'use a pattern URL with %s in its path (file:)'. Following it
    (add_target of the pattern with a file: URL) must register the parked tenant and deliver its rows, in order,
    once: not leave it blocked with a fix that does nothing."""
    conn.execute("SELECT pgturso.add_target('tenant-%s', 'http://tenant-%s.localhost:9')")
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id', "
                 "capture => 'wal')")
    conn.execute("INSERT INTO orders VALUES (1, 'a_b', 'first'), (2, 'a_b', 'second')")
    conn.execute("UPDATE orders SET item = 'second b' WHERE id = 2")
    worker = _start_worker(dsn)
    try:
        wait_until(lambda: "makes no host" in _blocked(conn, "tenant-a_b"), 120, "a_b shown blocked")
        hint = _blocked(conn, "tenant-a_b")
        assert "use a pattern URL with %s in its path" in hint, hint
        conn.execute("SELECT pgturso.add_target('tenant-%%s', %s)", (f"file:{tmp_path}/tenant-%s.db",))
        assert _blocked(conn, "tenant-a_b") == "", "the fix the HINT names left the tenant blocked"
        conn.execute("INSERT INTO orders VALUES (3, 'a_b', 'after the fix')")
        wait_for_sync(conn, "120 s", worker)
    finally:
        worker.stop()
    assert tenant_rows(tmp_path / "tenant-a_b.db", "SELECT id, item FROM orders ORDER BY id") == \
        pg_tenant_rows(conn, "a_b") == [(1, "first"), (2, "second b"), (3, "after the fix")]
    assert conn.execute("SELECT count(*) FROM pgturso.blocked_tenant").fetchone()[0] == 0


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_a_parked_tenants_moves_truncate_and_ddl_arrive_in_stream_order_once_registered(
        conn, dsn, tmp_path: Path):
    """'Acme' is parked (it differs only in case from tenant acme). While parked: a TRUNCATE of the routed
    table, a row moved from acme into Acme and back, one moved into Acme for good, one moved out of Acme to
    acme, a column renamed and one added. add_target of tenant-Acme registers it: both databases end equal to
    Postgres (nothing doubled, nothing resurrected by the TRUNCATE, the layouts the DDL made)."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id', "
                 "capture => 'wal')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a')")
    worker = _start_worker(dsn)
    try:
        conn.execute("INSERT INTO orders VALUES (2, 'Acme', 'truncated'), (3, 'acme', 'truncated too')")
        wait_until(lambda: "differs only in case" in _blocked(conn, "tenant-Acme"), 120, "Acme shown blocked")
        conn.execute("TRUNCATE orders")
        conn.execute("INSERT INTO orders VALUES (10, 'acme', 'there and back'), (11, 'acme', 'moves for good'), "
                     "(12, 'Acme', 'moves out')")
        conn.execute("UPDATE orders SET tenant_id = 'Acme', item = 'there' WHERE id = 10")
        conn.execute("UPDATE orders SET tenant_id = 'acme', item = 'and back' WHERE id = 10")
        conn.execute("UPDATE orders SET tenant_id = 'Acme' WHERE id = 11")
        conn.execute("UPDATE orders SET tenant_id = 'acme', item = 'moved out' WHERE id = 12")
        conn.execute("ALTER TABLE orders RENAME COLUMN item TO label")
        conn.execute("ALTER TABLE orders ADD COLUMN note text DEFAULT 'n'")
        conn.execute("INSERT INTO orders VALUES (13, 'Acme', 'after the DDL', 'x')")
        conn.execute("UPDATE orders SET note = 'y' WHERE id = 11")
        assert conn.execute("SELECT pgturso.wait_for_sync('3 s')").fetchone()[0] is False  # Acme parked
        conn.execute("SELECT pgturso.add_target('tenant-Acme', %s)", (f"file:{tmp_path}/own-Acme.db",))
        conn.execute("INSERT INTO orders VALUES (14, 'Acme', 'registered', NULL)")
        wait_for_sync(conn, "120 s", worker)
    finally:
        worker.stop()
    for tenant, path in (("acme", tmp_path / "tenant-acme.db"), ("Acme", tmp_path / "own-Acme.db")):
        assert tenant_rows(path, "SELECT id, label, note FROM orders ORDER BY id") == \
            pg_tenant_rows(conn, tenant, "id, label, note"), tenant
    assert pg_tenant_rows(conn, "Acme", "id") == [(11,), (13,), (14,)]
    assert not (tmp_path / "tenant-Acme.db").exists()
    assert conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()[0] == 0


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_discarding_a_blocked_tenant_while_its_rows_keep_coming_leaves_no_orphan(conn, dsn, tmp_path: Path):
    """'Acme' (a case clash with acme) is parked while a load writes rows of Acme, acme and globex. Discarding
    Acme three times while its rows keep coming (each discard racing the router's routing transactions) leaves
    no parked event behind without its blocked row (which would never be delivered nor shown), and every
    discard is recorded. Then Acme's rows are touched again and Acme given a database of its own: it ends equal
    to Postgres, as do the others; the outbox empties."""
    import threading

    from test_tenants import _write_tenants

    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id', "
                 "capture => 'wal')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a')")
    worker = _start_worker(dsn)
    stop = threading.Event()
    errors: list[str] = []
    writer = threading.Thread(target=_write_tenants, args=(dsn, stop, errors, ["Acme", "acme", "globex"], 1000))
    writer.start()
    discarded = 0
    try:
        for _ in range(3):
            wait_until(lambda: "differs only in case" in _blocked(conn, "tenant-Acme"), 120, "Acme blocked")
            discarded += conn.execute("SELECT pgturso.discard_blocked_tenant('tenant-%s', 'Acme', 'race')"
                                      ).fetchone()[0]
        stop.set()
        writer.join()
        assert not errors, errors[:5]
        # Every Acme event still in the outbox belongs to a tenant shown blocked (none orphaned).
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM pgturso.outbox WHERE tenant = 'Acme'").fetchone()[0] == 0
            or _blocked(conn, "tenant-Acme") != "", 60, "Acme's parked events shown")
        conn.execute("UPDATE orders SET item = item || '!' WHERE tenant_id = 'Acme'")
        conn.execute("SELECT pgturso.add_target('tenant-Acme', %s)", (f"file:{tmp_path}/own-Acme.db",))
        wait_for_sync(conn, "120 s", worker)
    finally:
        stop.set()
        writer.join()
        worker.stop()
    assert discarded > 0
    assert conn.execute("SELECT sum(events) FROM pgturso.skipped_transaction WHERE target = 'tenant-Acme'"
                        ).fetchone()[0] == discarded
    for tenant, path in (("acme", tmp_path / "tenant-acme.db"), ("globex", tmp_path / "tenant-globex.db"),
                         ("Acme", tmp_path / "own-Acme.db")):
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant), tenant
    assert conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM pgturso.blocked_tenant").fetchone()[0] == 0


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_skip_transaction_without_a_target_gives_up_on_the_tenant_its_transaction_blocked(
        conn, dsn, tmp_path: Path):
    """skip_transaction(txid, reason) of the transaction a blocked tenant's status names, without target (the
    transaction also wrote a good tenant's row, already delivered): the blocked tenant's parked rows are
    dropped and recorded once, the good tenant keeps its row, nothing is left in the outbox."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id', "
                 "capture => 'wal')")
    with conn.transaction():
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'good'), (2, 'no way!', 'bad')")
        txid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
    conn.execute("INSERT INTO orders VALUES (3, 'no way!', 'bad too')")
    worker = _start_worker(dsn)
    try:
        wait_until(lambda: _blocked(conn, "tenant-no way!") != "", 120, "no way! shown blocked")
        shown = conn.execute("SELECT last_error_txid::text FROM pgturso.target_status "
                             "WHERE target = 'tenant-no way!'").fetchone()[0]
        assert shown == txid
        conn.execute("DELETE FROM orders WHERE tenant_id = 'no way!'")
        # The router parks the delete too (its keys, for the tenant's database): skipped after it is parked,
        # so that what the skip discards is known (before, it was 2 rows or 4, as the router was fast or not).
        wait_until(lambda: conn.execute("SELECT count(*) FROM pgturso.outbox WHERE tenant = 'no way!' AND op = 'D'"
                                        ).fetchone()[0] > 0, 120, "the delete parked")
        parked = conn.execute("SELECT count(*), sum(nrows) FROM pgturso.outbox WHERE tenant = 'no way!' "
                              "AND op IN ('U', 'D')").fetchone()
        assert parked[1] == 4, parked  # rows 2 and 3 upserted, then their keys deleted
        assert conn.execute("SELECT pgturso.skip_transaction(%s, 'bad value')", (txid,)).fetchone()[0] >= 2
        assert _blocked(conn, "tenant-no way!") == ""
        wait_for_sync(conn, "120 s", worker)
    finally:
        worker.stop()
    assert tenant_rows(tmp_path / "tenant-acme.db", "SELECT id, item FROM orders") == [(1, "good")]
    assert conn.execute("SELECT target, events >= %s, rows FROM pgturso.skipped_transaction", (parked[0],)
                        ).fetchall() == [("tenant-no way!", True, 4)]
    assert conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()[0] == 0


def test_an_upgrade_from_0_4_0_parks_the_tenant_value_its_router_stopped_at(pg_cluster, tmp_path: Path):
    """0.4.0's router stopped every tenant of a wal pattern at a tenant value it could not register. Rows of
    such a value and of good tenants, committed under 0.4.0 and still in the pattern's slot, are routed after
    ALTER EXTENSION pgturso UPDATE: the bad value parked (blocked, its fix shown), the others delivered; a
    discard then empties the outbox."""
    from conftest import run_worker
    from test_upgrade import _database

    with _database(pg_cluster, "upgrade_parked") as conn:
        dsn = pg_cluster.dsn("upgrade_parked")
        conn.execute("CREATE EXTENSION pgturso VERSION '0.4.0' CASCADE")
        conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
        conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id', "
                     "capture => 'wal')")
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a'), (2, 'no way!', 'bad'), (3, 'globex', 'g')")
        conn.execute("UPDATE orders SET item = item || '+'")
        conn.execute("ALTER EXTENSION pgturso UPDATE")
        conn.execute("INSERT INTO orders VALUES (4, 'acme', 'after the upgrade'), (5, 'no way!', 'bad too')")
        result = run_worker(dsn, "", "--target", "tenant-%s")
        assert result.returncode == 0, result.stderr
        assert "cannot name a database" in _blocked(conn, "tenant-no way!")
        for tenant in ("acme", "globex"):
            assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id") == \
                pg_tenant_rows(conn, tenant), tenant
        assert conn.execute("SELECT pgturso.discard_blocked_tenant('tenant-%s', 'no way!', 'typo')").fetchone()[0]
        assert conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()[0] == 0


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_a_tenant_unblocked_while_its_router_is_sigkilled_gets_every_row_once(conn, dsn, tmp_path: Path):
    """'Acme' is parked; the worker (its router) is SIGKILLed just after more rows of Acme committed (in the
    slot or parked); add_target gives Acme its database while no router runs; more rows come. The next worker
    registers nothing twice: Acme's database gets its parked rows and the later ones once, in order (its write
    counter), acme its own."""
    from test_tenants import drain_pattern, install_file_apply_counter

    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id', "
                 "capture => 'wal')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a')")
    worker = _start_worker(dsn)
    try:
        conn.execute("INSERT INTO orders VALUES (2, 'Acme', 'parked')")
        wait_until(lambda: "differs only in case" in _blocked(conn, "tenant-Acme"), 120, "Acme blocked")
        conn.execute("INSERT INTO orders SELECT g, 'Acme', 'in the slot' FROM generate_series(10, 19) g")
        worker.kill()
        conn.execute("SELECT pgturso.add_target('tenant-Acme', %s)", (f"file:{tmp_path}/own-Acme.db",))
        assert _blocked(conn, "tenant-Acme") == ""
        conn.execute("UPDATE orders SET item = 'updated' WHERE id IN (2, 10)")
        conn.execute("INSERT INTO orders VALUES (20, 'Acme', 'after'), (21, 'acme', 'after')")
        worker = _start_worker(dsn)
        wait_until(lambda: (tmp_path / "own-Acme.db").exists(), 120, "Acme's database")
        wait_for_sync(conn, "120 s", worker)
    finally:
        worker.stop()
    install_file_apply_counter(tmp_path / "own-Acme.db", "orders")  # from now: each row written once
    conn.execute("UPDATE orders SET item = item || '!' WHERE tenant_id = 'Acme'")
    drain_pattern(dsn)
    for tenant, path in (("acme", tmp_path / "tenant-acme.db"), ("Acme", tmp_path / "own-Acme.db")):
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant), tenant
    assert tenant_rows(tmp_path / "own-Acme.db", "SELECT id FROM applied ORDER BY id") == [
        (r[0],) for r in pg_tenant_rows(conn, "Acme", "id")]
    assert conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()[0] == 0
