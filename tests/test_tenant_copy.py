"""The initial copy of a pattern's table into many tenant databases (bench 11a's path): a new database gets its
marker table in its first batch's transaction, the copy gathers each tenant's rows while it runs
(fanout.COPY_STEP_SECONDS), and a worker SIGKILLed in the middle of the copy, or of the tenants' deliveries after
it, leaves every tenant exact once another worker finishes. Asserted on the rows in each tenant's `file:`
database."""

from __future__ import annotations

from pathlib import Path

import pytest
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
