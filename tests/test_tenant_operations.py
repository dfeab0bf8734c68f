"""Operating a pattern target ('tenant-%s'): verify and repair each tenant's database, status and metrics per
tenant, and the exit code a monitoring check relies on. Tenant databases are `file:` targets (pyturso)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from test_tenants import drain_pattern, tenant_rows

TENANTS = ("acme", "globex", "initech")


def verify(dsn: str, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgturso", "verify", "--dsn", dsn, "--target", target,
                           "--settle-timeout", "1", *args], capture_output=True, text=True, timeout=300)


def write_on_turso(path: Path, *statements: str) -> None:
    """Change a tenant's database behind pgturso's back."""
    import turso as pyturso

    db = pyturso.connect(str(path))
    try:
        for sql in statements:
            db.execute(sql)
        db.commit()
    finally:
        db.close()


def tenants_setup(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    """Three tenants' orders: a column kept in Postgres, a row filter, and rows of every tenant."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text, secret text, "
                 "status text NOT NULL DEFAULT 'open')")
    conn.execute("INSERT INTO orders SELECT g, (ARRAY['acme', 'globex', 'initech'])[g % 3 + 1], 'item' || g, "
                 "'s' || g, CASE WHEN g % 10 = 0 THEN 'draft' ELSE 'open' END FROM generate_series(1, 300) g")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id', "
                 "columns => ARRAY['id', 'tenant_id', 'item', 'status'], row_filter => $$status <> 'draft'$$)")


def on_turso(path: Path) -> list[tuple[Any, ...]]:
    return tenant_rows(path, "SELECT id, tenant_id, item, status FROM orders ORDER BY id")


def in_postgres(conn: psycopg.Connection[Any], tenant: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(
        "SELECT id, tenant_id, item, status FROM orders WHERE tenant_id = %s AND status <> 'draft' ORDER BY id",
        (tenant,)).fetchall()]


def test_verify_compares_each_tenant_database_and_repairs_only_the_altered_one(conn, dsn, tmp_path: Path):
    tenants_setup(conn, tmp_path)
    drain_pattern(dsn)
    clean = verify(dsn, "tenant-%s")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    for tenant in TENANTS:  # each tenant's database compared with that tenant's rows only (filter applied)
        count = len(in_postgres(conn, tenant))
        assert f"tenant-{tenant}: public.orders -> orders: equal (postgres {count} rows, turso {count} rows)" \
            in clean.stdout, clean.stdout

    globex = tmp_path / "tenant-globex.db"
    # Drift in globex's database only: a row changed, one deleted, an extra row, and a row of acme's (its key
    # exists in Postgres, but it is not globex's: extra there), and a draft (filtered out: extra there too).
    write_on_turso(globex, "UPDATE orders SET item = 'tampered' WHERE id = 1",
                   "DELETE FROM orders WHERE id = 4",
                   "INSERT INTO orders VALUES (9999, 'globex', 'ghost', 'open')",
                   "INSERT INTO orders VALUES (3, 'acme', 'item3', 'open')",
                   "INSERT INTO orders VALUES (10, 'globex', 'draft row', 'draft')")
    untouched = {t: on_turso(tmp_path / f"tenant-{t}.db") for t in ("acme", "initech")}
    found = verify(dsn, "tenant-%s")
    assert found.returncode == 1, found.stdout + found.stderr
    assert "tenant-globex: public.orders -> orders: DIFFERENT" in found.stdout
    assert "2 missing or different, 3 extra on Turso" in found.stdout, found.stdout
    assert "tenant-acme: public.orders -> orders: equal" in found.stdout
    assert "tenant-initech: public.orders -> orders: equal" in found.stdout
    # one tenant alone, by its own target name
    assert verify(dsn, "tenant-acme").returncode == 0
    assert verify(dsn, "tenant-globex").returncode == 1

    repaired = verify(dsn, "tenant-%s", "--repair")
    assert repaired.returncode == 1 and "repair queued for 5 rows" in repaired.stdout, repaired.stdout
    # The repairs are globex's events only: the other tenants' databases get nothing.
    assert conn.execute("SELECT array_agg(DISTINCT tenant) FROM pgturso.outbox").fetchone()[0] == ["globex"]
    drain_pattern(dsn)
    assert verify(dsn, "tenant-%s").returncode == 0
    for tenant in TENANTS:
        assert on_turso(tmp_path / f"tenant-{tenant}.db") == in_postgres(conn, tenant), tenant
    assert {t: on_turso(tmp_path / f"tenant-{t}.db") for t in ("acme", "initech")} == untouched
    assert "secret" not in [r[1] for r in tenant_rows(globex, "PRAGMA table_info(orders)")]


def test_verify_of_a_pattern_reports_a_tenant_it_cannot_reach_and_goes_on(conn, dsn, tmp_path: Path):
    tenants_setup(conn, tmp_path)
    drain_pattern(dsn)
    # initech's database is elsewhere now, and empty: its table is missing there.
    conn.execute("SELECT pgturso.add_target('tenant-initech', %s)", (f"file:{tmp_path}/moved-initech.db",))
    result = verify(dsn, "tenant-%s")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "tenant-acme: public.orders -> orders: equal" in result.stdout
    assert "tenant-globex: public.orders -> orders: equal" in result.stdout
    assert "tenant-initech" in result.stderr and "orders" in result.stderr


def test_verify_of_a_pattern_without_tenants_says_so(conn, dsn, tmp_path: Path):
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    result = verify(dsn, "tenant-%s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no tenant databases yet" in result.stdout
    unknown = verify(dsn, "other-%s")
    assert unknown.returncode == 2 and "no target named 'other-%s'" in unknown.stderr
