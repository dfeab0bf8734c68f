"""A seeded random OLTP workload over three tracked tables, run by several real sessions at once.

Each session draws its operations from ``random.Random(seed * 1000 + session)``: the operation sequence is
repeatable; the interleaving is whatever the machine does, which is the point.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

TABLES_SQL = [
    "CREATE TABLE acct (id int PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL DEFAULT 0)",
    "CREATE TABLE stock (sku text, warehouse int, qty int, note text, PRIMARY KEY (sku, warehouse))",
    "CREATE TABLE note (id bigint PRIMARY KEY, body text, data bytea)",
]
COMPARE = {
    "acct": "SELECT id, owner, balance FROM acct ORDER BY id",
    "stock": "SELECT sku, warehouse, qty, note FROM stock ORDER BY sku, warehouse",
    "note": "SELECT id, body, data FROM note ORDER BY id",
}


def create_tables(conn: psycopg.Connection[Any]) -> None:
    for sql in TABLES_SQL:
        conn.execute(sql)
    conn.execute("INSERT INTO acct SELECT g, 'owner' || g, g * 10 FROM generate_series(1, 200) g")
    conn.execute("INSERT INTO stock SELECT 'sku' || (g % 20), g / 20, g, NULL FROM generate_series(0, 199) g")
    for table in ("acct", "stock", "note"):
        conn.execute("SELECT pgturso.track_table(%s)", (table,))


def _ops(rng: random.Random) -> list[tuple[str, tuple[Any, ...]]]:
    """One transaction's statements."""
    ops: list[tuple[str, tuple[Any, ...]]] = []
    for _ in range(rng.randint(1, 5)):
        roll = rng.random()
        k = rng.randint(1, 400)
        if roll < 0.20:
            ops.append(("INSERT INTO acct VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE SET owner = excluded.owner",
                        (k, f"o{rng.randint(0, 99)}", rng.randint(0, 1000))))
        elif roll < 0.35:
            ops.append(("UPDATE acct SET balance = balance + %s WHERE id BETWEEN %s AND %s",
                        (rng.randint(-50, 50), k, k + rng.randint(0, 5))))
        elif roll < 0.42:
            ops.append(("UPDATE acct SET id = %s WHERE id = %s", (rng.randint(401, 800), k)))  # key change
        elif roll < 0.50:
            ops.append(("DELETE FROM acct WHERE id = %s", (k,)))
        elif roll < 0.56:  # delete, then reinsert the same key
            ops.append(("DELETE FROM acct WHERE id = %s", (k,)))
            ops.append(("INSERT INTO acct VALUES (%s, 'reborn', 0) ON CONFLICT DO NOTHING", (k,)))
        elif roll < 0.70:
            ops.append(("INSERT INTO stock VALUES (%s, %s, %s, %s) ON CONFLICT (sku, warehouse) "
                        "DO UPDATE SET qty = stock.qty + excluded.qty",
                        (f"sku{rng.randint(0, 25)}", rng.randint(0, 12), rng.randint(1, 9), rng.choice([None, "é"]))))
        elif roll < 0.76:
            ops.append(("UPDATE stock SET warehouse = warehouse + 100 WHERE sku = %s AND warehouse = %s",
                        (f"sku{rng.randint(0, 25)}", rng.randint(0, 12))))
        elif roll < 0.80:
            ops.append(("DELETE FROM stock WHERE sku = %s", (f"sku{rng.randint(0, 25)}",)))
        elif roll < 0.92:
            ops.append(("INSERT INTO note VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                        (rng.randint(1, 2000), "x" * rng.randint(0, 300), rng.randbytes(rng.randint(0, 40)))))
        elif roll < 0.97:
            ops.append(("DELETE FROM note WHERE id %% 7 = %s", (rng.randint(0, 6),)))
        elif roll < 0.985:
            ops.append(("SAVEPOINT s", ()))
            ops.append(("UPDATE acct SET owner = 'never' WHERE id < 50", ()))
            ops.append(("ROLLBACK TO SAVEPOINT s", ()))
        else:
            ops.append(("TRUNCATE note", ()))
    return ops


@dataclass
class Workload:
    dsn: str
    seed: int
    sessions: int = 8
    commits: int = 0
    rollbacks: int = 0
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _session(self, number: int) -> None:
        rng = random.Random(self.seed * 1000 + number)
        with psycopg.connect(self.dsn) as conn:
            conn.execute("SET lock_timeout = '2s'")
            conn.commit()
            while not self.stop.is_set():
                try:
                    for sql, args in _ops(rng):
                        conn.execute(sql, args)
                    if rng.random() < 0.1:
                        conn.rollback()
                        self.rollbacks += 1
                    else:
                        conn.commit()
                        self.commits += 1
                except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected,
                        psycopg.errors.LockNotAvailable, psycopg.errors.SerializationFailure):
                    conn.rollback()
                    self.rollbacks += 1
                except psycopg.Error as exc:  # anything else is a failure of the test's premise
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    conn.rollback()

    def run_for(self, seconds: float) -> Workload:
        threads = [threading.Thread(target=self._session, args=(n,)) for n in range(self.sessions)]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        self.stop.set()
        for thread in threads:
            thread.join(30)
        return self

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._session, args=(n,)) for n in range(self.sessions)]
        for thread in threads:
            thread.start()
        return threads


def assert_equal(conn: psycopg.Connection[Any], turso: Any) -> None:
    """Every tracked table of the workload is the same on Turso as on Postgres, row for row."""
    for table, sql in COMPARE.items():
        expected = [list(r) for r in conn.execute(sql).fetchall()]
        actual = turso.query(sql)
        assert actual == expected, f"{table}: Turso differs ({len(actual)} rows vs {len(expected)} in Postgres)"
