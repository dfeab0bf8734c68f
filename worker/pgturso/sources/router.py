"""The router of a wal pattern target (``add_target('tenant-%s', ...)`` with ``capture => 'wal'``).

One router per pattern reads the pattern's slot (the wal machinery of slot.py and replication.py) and writes each
decoded transaction, in commit order, as per-tenant outbox rows, exactly as the capture triggers write them; the
pattern worker (run/fanout.py) then delivers them unchanged. docs/design.md ("A database per tenant") has the
ordering argument. In short:

- A batch of whole transactions is routed as it is decoded, in ONE Postgres transaction (REPEATABLE READ) that
  also records the batch's marker in ``pgturso.router``; the slot is confirmed only after that commit, and a
  restart goes on after the recorded marker (``WalOutbox.forget``): nothing routed twice.
- Outbox rows of the pattern that something else wrote (DDL, copies, repairs, TRUNCATE, table-wide events) were
  held (``pgturso._held_for_router``, asked by the SQL that writes them): they are queued again here at their
  place in the stream and deleted.
- A tenant value met for the first time is registered there (``pgturso._route_tenant``: its routed tables
  created with the layouts in force at that point, its reference tables created and copied as of this
  transaction's snapshot). A reference table's event whose transaction that snapshot sees is in the copy
  already and is not routed to that tenant; every other one is. The routing transaction's snapshot sees every
  transaction of the batch (checked: a commit can reach the WAL a moment before it is visible), so every change
  routed before a registration is in its copy.
- A tenant value that cannot be registered (it cannot name a database: its writer committed, as no trigger
  refused it) is *parked* there, not a stop for every tenant: ``_route_tenant`` queues its first events as a
  registration would, under its value, and records it in ``pgturso.blocked_tenant``; the router then routes to it
  as to any tenant (its rows, deletes, reference changes, DDL: in stream order), but without a row in
  ``pgturso.target`` no worker delivers them. ``add_target`` of its name registers it (its parked events are
  then delivered, in order); ``discard_blocked_tenant`` (or ``skip_transaction`` leaving it nothing to deliver)
  drops them, and the router forgets it (read in each routing transaction, FOR SHARE).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import psycopg

from ..common.logs import event
from ..common.postgres import connect
from .outbox import Event, Outbox
from .slot import VISIBILITY_RETRIES, NotYetVisible, SlotError, Snapshot, WalBatch, WalOutbox, lsn_to_int, slot_bytes

log = logging.getLogger("pgturso.router")

ROUTER_LOCK_CLASS = int.from_bytes(b"pgrt", "big")  # (pgtr: the delivery locks; pgturso._is_router checks this one)
TAKE_ROUTER_LOCK = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"
CLAIM = """
    INSERT INTO pgturso.router (pattern, pid) VALUES (%(pattern)s, pg_backend_pid())
    ON CONFLICT (pattern) DO UPDATE SET pid = excluded.pid
    RETURNING marker, copies
"""
TENANTS = "SELECT tenant FROM pgturso.target WHERE pattern = %s"
RECORD = "UPDATE pgturso.router SET marker = %(marker)s, copies = %(copies)s WHERE pattern = %(pattern)s"
INSERT_ROWS = """
    SELECT pgturso._route_rows(%(pattern)s, %(layouts)s::int[], %(ops)s::text[], %(nrows)s::int[], %(payloads)s::text[],
                               %(tenants)s::text[])
"""
DELETE_HELD = "DELETE FROM pgturso.outbox WHERE id = ANY (%(ids)s::int8[])"
HELD = """
    SELECT count(*) FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id
    JOIN pgturso.tracked_table t ON t.id = l.table_id WHERE o.tenant IS NULL AND t.target = %s
"""
SNAPSHOT = "SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text"
REGISTER = "SELECT pgturso._route_tenant(%(layout)s, %(tenant)s, %(layouts)s::jsonb, %(txid)s::text::xid8)"
BLOCKED = "SELECT pgturso._router_blocked(%s)"
REGISTERED = "SELECT tenant FROM pgturso.target WHERE pattern = %s AND tenant = ANY (%s)"
FLUSH_ROWS = 500  # outbox rows written per statement, at most
FLUSH_BYTES = 4 << 20  # and their payloads' bytes: memory stays bounded whatever the transaction's size


class Router:
    """Routes a wal pattern's slot into per-tenant outbox rows (see the module's docstring)."""

    def __init__(self, dsn: str, pattern: str, batch_rows: int) -> None:
        self.dsn = dsn
        self.pattern = pattern
        self.batch_rows = batch_rows
        self.conn: psycopg.Connection[Any] | None = None  # reads and encodes (READ COMMITTED)
        self.write: psycopg.Connection[Any] | None = None  # routes (REPEATABLE READ)
        self.source: WalOutbox | None = None
        self.tenants: set[str] = set()  # registered or blocked (parked): routed to alike
        self.blocked: set[str] = set()  # pgturso.blocked_tenant's values of the pattern
        self.copies: dict[str, dict[str, str]] = {}  # tenant: {"snapshot", "lsn"} of its reference copy
        self.caught_up = False  # the last look at the slot found nothing unrouted
        self.failing = False  # a failure was shown in the pattern's delivery_state

    def start(self) -> bool:
        """Connect, take the pattern's router lock (False if another process routes it) and recover."""
        self.close()
        self.write = connect(self.dsn, autocommit=True, application_name="pgturso-router")
        taken = self.write.execute(TAKE_ROUTER_LOCK, (ROUTER_LOCK_CLASS, self.pattern)).fetchone()
        if not taken or not taken[0]:
            self.close()
            return False
        marker, copies = self.write.execute(CLAIM, {"pattern": self.pattern}).fetchone()  # type: ignore[misc]
        self.copies = dict(copies or {})
        self.tenants = {str(t) for (t,) in self.write.execute(TENANTS, (self.pattern,)).fetchall()}
        self.blocked = {str(t) for (t,) in self.write.execute(BLOCKED, (self.pattern,)).fetchall()}
        self.tenants |= self.blocked
        self.conn = connect(self.dsn, autocommit=True, application_name="pgturso-router-read")
        self.source = WalOutbox(self.conn, dsn=self.dsn, target=self.pattern, batch_rows=self.batch_rows,
                                batch_events=self.batch_rows, pattern=self.pattern)
        self.source.routing = True
        # Held rows of what the last process routed but did not see confirmed are deleted here too.
        self.source.forget(marker or "")
        event(log, logging.INFO, "router_started", target=self.pattern, tenants=len(self.tenants),
              blocked=len(self.blocked), after=json.loads(marker)["lsn"] if marker else "the slot's start")
        return True

    def close(self) -> None:
        if self.source is not None:
            try:
                self.source.close()
            except psycopg.Error:
                pass
        for conn in (self.conn, self.write):
            if conn is not None:
                conn.close()
        self.conn = self.write = None
        self.source = None

    def route_once(self) -> int:
        """Route the next batch of the slot; the number of outbox rows written (0: nothing was there)."""
        assert self.source is not None
        batch = self.source.choose_batch()
        if batch is None:
            self.caught_up = True
            return 0
        self.caught_up = False
        for attempt in range(VISIBILITY_RETRIES):
            try:
                written = self._route(batch)
                break
            except (NotYetVisible, psycopg.errors.SerializationFailure) as exc:
                if attempt == VISIBILITY_RETRIES - 1:
                    raise
                event(log, logging.DEBUG, "route_retry", target=self.pattern, reason=type(exc).__name__)
                time.sleep(0.005 * (attempt + 1))
                # The stream only goes forward: read the same transactions again from the last batch routed.
                self.source.close_stream()
                again = self.source.choose_batch()
                if again is None:
                    return 0
                batch = again
        self.source.settled(batch)  # the routing committed: let the slot move past the batch
        self.record_recovery()
        return written

    def _route(self, batch: WalBatch) -> int:
        """Route a batch as it is decoded (memory stays flat whatever its size), in one REPEATABLE READ
        transaction on the router's write connection; decoding and encoding read on the source's connection
        (READ COMMITTED: the layouts a decoded transaction made are visible there)."""
        assert self.write is not None and self.source is not None
        source, conn = self.source, self.write
        tenants = set(self.tenants)
        copies = dict(self.copies)
        written = 0
        rows: list[tuple[int, str, int, str | None, str]] = []
        held: list[int] = []
        pending_bytes = 0

        def flush() -> None:
            nonlocal written, pending_bytes
            pending_bytes = 0
            if rows:
                conn.execute(INSERT_ROWS, {"pattern": self.pattern, "layouts": [r[0] for r in rows],
                                           "ops": [r[1] for r in rows],
                                           "nrows": [r[2] for r in rows], "payloads": [r[3] for r in rows],
                                           "tenants": [r[4] for r in rows]})
                written += len(rows)
                rows.clear()
            if held:
                conn.execute(DELETE_HELD, {"ids": held})
                held.clear()

        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            snapshot_text, lsn = conn.execute(SNAPSHOT).fetchone()  # type: ignore[misc]
            snapshot = Snapshot.parse(str(snapshot_text))
            # Blocked tenants whose block was lifted since (add_target of the name, or discarded): a registered
            # one stays, a discarded one is forgotten (a later row of its value parks it again).
            blocked = {str(t) for (t,) in conn.execute(BLOCKED, (self.pattern,)).fetchall()}
            lifted = self.blocked - blocked
            if lifted:
                registered = {str(t) for (t,) in conn.execute(REGISTERED, (self.pattern, sorted(lifted))).fetchall()}
                for tenant in lifted - registered:
                    tenants.discard(tenant)
                    copies.pop(tenant, None)
            seen = {t: Snapshot.parse(c["snapshot"]) for t, c in copies.items()}
            # The layouts in force at each point of the stream (batch.layouts runs ahead of the events yielded:
            # a table's creation is read before the rows pending ahead of it are yielded).
            layouts = dict(batch.layouts)
            for item in batch.events():
                if not snapshot.sees(item.txid):
                    # Committed (it is in the stream) but not yet visible: a registration or a held row's
                    # deletion here would miss it. Start over with a newer snapshot.
                    raise NotYetVisible()
                if item.op not in "CUDTAX":
                    raise SlotError(f"router of {self.pattern}: cannot route an event of kind {item.op!r}")
                if item.id:
                    held.append(item.id)  # written outside the router: queued again here, in stream order
                    if item.op in "CAX":
                        table_id = source.table_of_layout_id(item.layout_id)
                        if table_id is not None and item.op == "X":
                            layouts.pop(table_id, None)
                        elif table_id is not None:
                            layouts[table_id] = item.layout_id
                if item.tenant is not None:
                    if item.tenant not in tenants:
                        if item.op == "D":
                            continue  # keys deleted from a tenant that has no database (its rows never reached one)
                        flush()
                        if self._register(conn, item, layouts, snapshot):
                            blocked.add(item.tenant)
                        tenants.add(item.tenant)
                        copies[item.tenant] = {"snapshot": str(snapshot_text), "lsn": str(lsn)}
                        seen[item.tenant] = snapshot
                    rows.append((item.layout_id, item.op, item.nrows, item.payload, item.tenant))
                    pending_bytes += len(item.payload or "")
                else:
                    # A tenant registered since has each reference table as of its copy's snapshot (created at
                    # the layout then, its rows then): an event of one (rows, a copy, TRUNCATE, DDL, its
                    # creation or drop) whose transaction that snapshot sees is in it already.
                    reference = source.layout(item.layout_id).reference
                    for tenant in sorted(tenants):
                        if reference and tenant in seen and seen[tenant].sees(item.txid):
                            continue
                        rows.append((item.layout_id, item.op, item.nrows, item.payload, tenant))
                        pending_bytes += len(item.payload or "")
                if len(rows) >= FLUSH_ROWS or pending_bytes >= FLUSH_BYTES:
                    flush()
            flush()
            end = batch.upto
            # A copy's snapshot sees no transaction that committed after its WAL position: forget it past there.
            copies = {t: c for t, c in copies.items() if lsn_to_int(c["lsn"]) > end}
            conn.execute(RECORD, {"marker": batch.marker(), "copies": json.dumps(copies), "pattern": self.pattern})
        self.tenants, self.copies, self.blocked = tenants, copies, blocked
        if written:
            event(log, logging.DEBUG, "routed", target=self.pattern, rows=written, transactions=batch.transactions)
        return written

    def _register(self, conn: psycopg.Connection[Any], item: Event, layouts: dict[int, int],
                  snapshot: Snapshot) -> bool:
        """Register the tenant of ``item`` (met for the first time) with the routed tables' layouts in force;
        True if it could not be and is parked (blocked) instead."""
        row = conn.execute(REGISTER, {"layout": item.layout_id, "tenant": item.tenant,
                                      "layouts": json.dumps({str(k): v for k, v in layouts.items()}),
                                      "txid": snapshot.full(item.txid)}).fetchone()
        error = None if row is None else row[0]
        if error is not None:
            event(log, logging.WARNING, "tenant_blocked", target=self.pattern, tenant=item.tenant, error=error,
                  txid=item.txid)
        return error is not None

    def record_failure(self, error: str, txid: int | None = None, status: str = "retrying") -> None:
        """Show a routing failure on the pattern's own row of pgturso.target_status (every tenant waits for the
        router: it routes in commit order), over a connection of its own (the router's may be what failed).
        ``status``: 'retrying' (what can succeed later: a lost connection, a busy slot) or 'blocked' (an
        unexpected error: shown whether or not a worker runs, until routing gets past it)."""
        with connect(self.dsn, autocommit=True, application_name="pgturso-router") as conn:
            conn.execute("INSERT INTO pgturso.delivery_state (target) VALUES (%s) ON CONFLICT DO NOTHING",
                         (self.pattern,))
            Outbox(conn, batch_rows=1, batch_events=1, target=self.pattern).record_error(
                status, f"router of {self.pattern}: {error}", txid=txid, retry=True)
        self.failing = True

    def record_recovery(self) -> None:
        """Routing got past the failure: it moves to the pattern's error history."""
        if self.failing and self.write is not None:
            Outbox(self.write, batch_rows=1, batch_events=1, target=self.pattern).record_state(
                "delivering", clear_error=True)
            self.failing = False

    def backlog(self) -> tuple[int, int, int]:
        """What is committed but not yet queued per tenant: (held events, WAL bytes the slot keeps, WAL bytes
        written since its confirmed position: an upper bound of the changes still in it)."""
        assert self.write is not None and self.source is not None
        held = int(self.write.execute(HELD, (self.pattern,)).fetchone()[0])  # type: ignore[index]
        return (held, *slot_bytes(self.write, self.source.slot))

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the stream to bring something."""
        assert self.source is not None
        self.source.wait_for_data(timeout)
