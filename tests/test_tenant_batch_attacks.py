"""Attacks on the pattern worker's one-statement tenant batch (Outbox.read_whole_batch: events, snapshot and
position read in one statement outside a transaction, deleted by name afterwards in autocommit) and on its
scheduler (up to STEPS_QUEUED_PER_THREAD steps handed out per thread, the pending-tenants walk skipped while
enough tenants are due). Asserted on the rows that arrived in each tenant's `file:` database, and on how often
each row was written there (a Turso-side trigger counts the writes)."""

from __future__ import annotations

import socket
from pathlib import Path

from support.workers import WorkerProcess, wait_until
from test_tenants import tenant_rows


def test_tenants_whose_databases_hang_never_starve_a_healthy_tenant(conn, dsn, tmp_path: Path):
    """Three tenants' databases accept connections and never answer (each step waits out request_timeout), one
    thread: at any moment one of them is being tried and the others wait out a short backoff, so there are
    always as many tenants 'due' as steps may be queued. A healthy tenant's new row must still arrive: it is
    found only by the pending-tenants walk (a busy worker hears no NOTIFY), which must not be skipped because
    failing tenants in backoff count as due."""
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(64)  # never accepted: a request is sent and no answer ever comes
    port = hanging.getsockname()[1]
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    bad = ["bad1", "bad2", "bad3"]
    for name in bad:
        conn.execute("SELECT pgturso.add_target(%s, %s)", (f"tenant-{name}", f"http://127.0.0.1:{port}"))
    conn.execute("INSERT INTO orders SELECT n, t, 'down' FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n)", (bad,))
    conn.execute("INSERT INTO orders VALUES (10, 'good', 'first')")
    worker = WorkerProcess(dsn, "", "--target", "tenant-%s", "--tenant-threads", "1", "--idle-wait", "1",
                           env={"PGTURSO_RETRY_BASE_DELAY": "0.05", "PGTURSO_RETRY_MAX_DELAY": "0.3",
                                "PGTURSO_REQUEST_TIMEOUT": "1.5"}).start()
    def delivered(tenant: str) -> bool:  # its database stays open (locked) in the worker: asked of Postgres
        return conn.execute("SELECT count(*) = 0 FROM pgturso.outbox WHERE tenant = %s", (tenant,)).fetchone()[0]

    try:
        wait_until(lambda: delivered("good"), 60, "the healthy tenant's first visit")
        conn.execute("INSERT INTO orders VALUES (11, 'good', 'second'), (12, 'good', 'third')")
        wait_until(lambda: delivered("good"), 60, "the healthy tenant's later rows, while three tenants hang")
        assert not delivered("bad1")
    finally:
        worker.stop()
        hanging.close()
    assert tenant_rows(tmp_path / "tenant-good.db", "SELECT id, item FROM orders ORDER BY id") == [
        (10, "first"), (11, "second"), (12, "third")]
