"""Writers for the pattern-target attacks: sessions committing transactions that spread rows of a routed table
(``ledger``, by ``tenant_id``) over several tenants, write a reference table (``notices``, sent to every tenant)
and bring new tenants, until stopped.

Each session draws from ``random.Random(session)``: what it writes is repeatable, the interleaving is not.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import psycopg


@dataclass
class LedgerWriters:
    dsn: str
    tenants: list[str]
    most_tenants: int  # a transaction writes to 1 .. most_tenants of ``tenants``
    most_rows: int  # 1 .. most_rows ledger rows for each of them
    notice_chance: float  # a transaction also inserts 1 .. most_notices reference rows
    most_notices: int
    new_tenant_chance: float  # a transaction also brings a new tenant (its first row)
    pause: float  # seconds between a session's transactions
    sessions: int = 2
    errors: list[str] = field(default_factory=list)
    # Documented (docs/design.md, "Reference tables"): two transactions that each wrote the reference table and
    # then bring a new tenant wait for each other's stripe; Postgres rolls one back, which an application
    # retries. Nothing of it may arrive anywhere: counted, not an error.
    deadlocks: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._write, args=(s,)) for s in range(self.sessions)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the sessions and wait for them (again: a no-op)."""
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _write(self, session: int) -> None:
        rng = random.Random(session)
        try:
            with psycopg.connect(self.dsn, autocommit=True) as writer:
                while not self._stop.is_set():
                    try:
                        with writer.transaction():
                            writer.execute("INSERT INTO ledger (tenant_id, amount) SELECT t, g "
                                           "FROM unnest(%s::text[]) AS t, generate_series(1, %s) AS g",
                                           (rng.sample(self.tenants, rng.randint(1, self.most_tenants)),
                                            rng.randint(1, self.most_rows)))
                            if rng.random() < self.notice_chance:
                                writer.execute("INSERT INTO notices (body) SELECT 'n' || g "
                                               "FROM generate_series(1, %s) g", (rng.randint(1, self.most_notices),))
                            if rng.random() < self.new_tenant_chance:
                                writer.execute("INSERT INTO ledger (tenant_id, amount) VALUES (%s, 1)",
                                               (f"new{session}x{rng.randrange(10**6)}",))
                    except psycopg.errors.DeadlockDetected:
                        self.deadlocks += 1
                    time.sleep(self.pause)
        except Exception as exc:
            self.errors.append(repr(exc))
