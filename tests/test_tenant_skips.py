"""skip_transaction for a pattern's tenant while Turso holds the answer to a batch it committed: what
pgturso.skipped_transaction says (delivered_at), in both capture modes. Real Postgres, a real tursodb behind the
test proxy (support/cloud_proxy.py) that holds Turso's answer to one committed batch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support.cloud_proxy import CloudProxy
from support.turso import TursoServer
from support.workers import outbox_empty, wait_until
from test_lock_attacks import on_turso
from test_tenants import _start_worker

BACKLOG = 60  # one-row transactions of tenant acme, delivered in batches of 5 rows
SMALL = ("--batch-events", "5", "--batch-rows", "5")


def _routed_txid(conn: psycopg.Connection[Any], row: int) -> str:
    """The txid of acme's pending outbox event that carries ``row`` of orders: the source transaction's in trigger
    mode, the router's routing transaction's in wal mode (a routed event carries no other)."""
    found = conn.execute("SELECT DISTINCT txid::text FROM pgturso.outbox WHERE tenant = 'acme' AND payload ~ %s",
                         (_row_pattern(row),)).fetchall()
    assert len(found) == 1, (row, found)
    return str(found[0][0])


def _row_pattern(row: int) -> str:
    """A regular expression matching an outbox payload (rows' JSON arrays, comma-separated) with orders' ``row``."""
    return rf"(^|,)\[{row},"


def _delivered_at_set(conn: psycopg.Connection[Any], txid: str) -> bool:
    return bool(conn.execute("SELECT delivered_at IS NOT NULL FROM pgturso.skipped_transaction "
                             "WHERE txid = %s::xid8 AND target = 'tenant-acme'", (txid,)).fetchone()[0])


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_a_tenants_skip_of_a_batch_turso_committed_says_delivered(conn, dsn, tmp_path: Path, turso: TursoServer,
                                                                  capture: str):
    """Tenant acme's database (a tursodb behind the proxy) committed batch N and the proxy holds the answer;
    skip_transaction of N's transaction for tenant-acme cannot unsend it: once the worker learns Turso has N,
    pgturso.skipped_transaction says so (delivered_at) and its rows are on acme's database. A skip of the last
    transaction, which no batch had read, stays a skip (delivered_at NULL, its rows never sent). In wal mode a
    tenant's events carry the router's routing transaction, which skip_transaction names (as the tenant's status
    does): its source transactions are skipped together for that tenant. Its rows count as delivered."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    with CloudProxy(turso.url, None, stream_expiry=30) as cloud:
        conn.execute("SELECT pgturso.add_target('tenant-acme', %s)", (cloud.url,))
        conn.execute("INSERT INTO orders VALUES (0, 'acme', 'delivered')")
        worker = _start_worker(dsn, *SMALL)
        try:
            wait_until(lambda: on_turso(turso, "SELECT count(*) FROM orders") == [[1]], 120, "the first row")
            assert worker.stop() == 0
            for i in range(1, BACKLOG + 1):
                conn.execute("INSERT INTO orders VALUES (%s, 'acme', 'x')", (i,))
            worker = _start_worker(dsn, *SMALL)
            wait_until(lambda: (on_turso(turso, "SELECT count(*) FROM orders") or [[0]])[0][0] >= 16, 120,
                       "a few batches to be delivered")
            cloud.slow_answers = [10.0]  # the next batch is committed on Turso, the worker told 10 s later
            wait_until(lambda: cloud.holding > 0, 60, "Turso to hold a committed batch's answer")
            on_turso_row = turso.query("SELECT max(id) FROM orders")[0][0]  # a row of the batch Turso committed
            in_flight = _routed_txid(conn, on_turso_row)
            if capture == "wal":
                wait_until(lambda: conn.execute("SELECT count(*) FROM pgturso.outbox WHERE payload ~ %s",
                                                (_row_pattern(BACKLOG),)).fetchone()[0] == 1, 60,
                           "the router to route the last row")
            never_read = _routed_txid(conn, BACKLOG)
            assert never_read != in_flight
            skipped_rows = {int(m) for (payload,) in conn.execute(
                "SELECT payload FROM pgturso.outbox WHERE tenant = 'acme' AND txid = %s::xid8", (never_read,))
                for m in re.findall(r"(?:^|,)\[(\d+),", payload)}
            assert BACKLOG in skipped_rows
            skip = "SELECT pgturso.skip_transaction(%s::xid8, 'attack', target => 'tenant-acme')"
            conn.execute(skip, (in_flight,))
            conn.execute(skip, (never_read,))
            assert cloud.holding > 0, "Turso answered before the skip (hold the answer longer)"
            wait_until(lambda: outbox_empty(dsn) and cloud.holding == 0, 120, "the worker to deliver the backlog")
        finally:
            worker.stop()
    on_acme = {r[0] for r in turso.query("SELECT id FROM orders")}
    assert on_turso_row in on_acme
    assert not on_acme & skipped_rows  # (in wal mode: every row of the routing transaction skipped)
    assert on_acme == set(range(BACKLOG + 1)) - skipped_rows
    assert _delivered_at_set(conn, in_flight), "the skip of a transaction Turso has says Turso lacks it"
    assert not _delivered_at_set(conn, never_read), "a skipped transaction that was never sent is said delivered"
    # A tenant stepped alone (not a file: database, so never in a round) counts what Turso committed, the skipped
    # transaction's rows included, as a target does (RECORD_SENT_BATCH).
    assert conn.execute("SELECT rows_delivered FROM pgturso.delivery_state WHERE target = 'tenant-acme'"
                        ).fetchone()[0] == len(on_acme)
