"""``make demo``: replication into the embedded default target (a local Turso database file), shown step by step.

Starts a throwaway PostgreSQL 15, installs pgturso, tracks a table, and after each change runs the worker
once and prints what Turso holds next to what Postgres holds.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import turso
from support.pgcluster import PgCluster

REPLICA = Path(tempfile.mkdtemp(prefix="pgturso-demo-")) / "replica.db"


def show(conn: psycopg.Connection, title: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pgturso", "run", "--once", "--dsn", conn.info.dsn, "--url", f"file:{REPLICA}"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        sys.exit(f"worker failed:\n{result.stderr}")
    pg = [tuple(r) for r in conn.execute("SELECT id, name, price FROM products ORDER BY id").fetchall()]
    db = turso.connect(str(REPLICA))
    replica = [tuple(r) for r in db.execute("SELECT id, name, price FROM products ORDER BY id").fetchall()]
    db.close()
    print(f"\n== {title}")
    print(f"   {'Postgres':<40} | Turso ({REPLICA.name})")
    for i in range(max(len(pg), len(replica))):
        left = str(pg[i]) if i < len(pg) else ""
        right = str(replica[i]) if i < len(replica) else ""
        print(f"   {left:<40} | {right}")
    if [(a, b, float(c)) for a, b, c in pg] != [(a, b, float(c)) for a, b, c in replica]:
        sys.exit("demo failed: Turso differs from Postgres")
    print("   equal")


def main() -> None:
    cluster = PgCluster().start()
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            print(f"Postgres 15 on port {cluster.port}; Turso database file {REPLICA}")
            steps = [
                ("CREATE EXTENSION pgturso CASCADE", None),
                ("CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, price numeric(8,2))", None),
                ("INSERT INTO products VALUES (1, 'tea', 3.50), (2, 'coffee', 4.20), (3, 'cake', 5.00)", None),
                ("SELECT pgturso.track_table('products')", "track_table copies the existing rows"),
                ("INSERT INTO products VALUES (4, 'scone', 2.75)", "an INSERT arrives"),
                ("UPDATE products SET price = price * 1.10 WHERE name IN ('tea', 'coffee')", "an UPDATE arrives"),
                ("UPDATE products SET id = 40 WHERE id = 4", "a primary key change arrives"),
                ("DELETE FROM products WHERE name = 'cake'", "a DELETE arrives"),
            ]
            for sql, title in steps:
                print(f"postgres=# {sql}")
                conn.execute(sql)
                if title:
                    show(conn, title)
            print("postgres=# BEGIN; INSERT INTO products VALUES (99, 'never', 0); ROLLBACK;")
            with conn.transaction(force_rollback=True):
                conn.execute("INSERT INTO products VALUES (99, 'never', 0)")
            show(conn, "a rolled-back transaction sends nothing")
            print("postgres=# TRUNCATE products; INSERT INTO products VALUES (7, 'fresh start', 1);")
            conn.execute("TRUNCATE products")
            conn.execute("INSERT INTO products VALUES (7, 'fresh start', 1)")
            show(conn, "TRUNCATE arrives, and what follows it")
        print("\nDemo done: every committed change reached the local Turso database; nothing else did.")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
