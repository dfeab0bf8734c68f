"""Reading commit-consistent batches from ``pgturso.outbox`` and deleting what Turso confirmed.

Why the order is right (docs/design.md has the long form): the worker only sees committed events, and if
transaction B wrote a row after transaction A committed, every event id of B's write is larger than every
event id of A. A batch is "every visible event with id <= L, minus transactions that also have events
above L", applied in id order in one Turso transaction. A transaction is never split across batches, a
dependent transaction never lands before the one it depends on, and a long-open transaction holds back
nothing: it is simply invisible until it commits.

A batch is therefore named exactly by (L, the snapshot it was read in, its held transactions, its tables):
its events are those with ``id <= L`` whose transaction is visible in that snapshot and not held. That name
(``Batch.marker()``) is what the worker deletes by once Turso confirmed the batch, and what the progress
marker on Turso records for recovery. It can never match a later event: ids are drawn in real time from a
sequence, so an event drawn after the batch was chosen has an id above L, and one drawn before whose
transaction was not yet committed is not visible in the snapshot.

The batch after one still in flight is chosen as if that one's events were gone (Outbox.read_past, and the
argument at OUTSIDE_BATCH_AT_OR_BELOW_CUT): it is the same batch, so the same order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from ..capture.layout import TableLayout
from ..capture.sql import WAKE_LOCK_CLASS
from ..common.errors import BatchChanged, CopyDeferred

# Named queries.
SOURCE_ID = "SELECT source_id::text FROM pgturso.instance"
SOURCE_POSITION = "SELECT pgturso._source_position()"
POSITION_REACHED = "SELECT pgturso._position_reached(%(position)s::jsonb)"

# Every query sees only the events of this worker's target (%(layouts)s: its tables' layouts; NULL when the
# outbox holds no other target's events) and, for a tenant of a pattern target, of its tenant (%(tenant)s;
# NULL: events without one, which every other target's are).
FOR_TARGET = ("(%(layouts)s::int[] IS NULL OR layout_id = ANY (%(layouts)s::int[])) "
              "AND (%(tenant)s::text IS NULL AND tenant IS NULL OR tenant = %(tenant)s::text)")
TARGET_LAYOUTS = """
    SELECT coalesce(array_agg(l.id) FILTER (WHERE t.target = %(target)s), '{}'),
           coalesce(bool_and(t.target = %(target)s), true)
    FROM pgturso.layout l JOIN pgturso.tracked_table t ON t.id = l.table_id
"""
# The cut L: the last of the oldest %(max_events)s events of the target, unless they hold more than %(max_rows)s
# rows; then the first id at which the rows add up to that (BATCH_CUT_BY_ROWS, which stops there). One round
# trip also finds the target's layouts (TARGET_LAYOUTS, here as %(layouts)s is for every other query) and what
# STRADDLING_TRANSACTIONS says of the events up to the cut, which are the head's when the cut is its last id:
# a worker that keeps up reads a batch with this query and the events themselves, and nothing else.
# The scope is read by scalar subqueries (one-time filters), not joined: joined, it hid the order of the outbox's
# primary key from the planner, which then sorted the whole outbox for every batch instead of reading its first
# %(max_events)s events by the index (a 1M-event backlog: every batch paid a 1M-row scan and sort on disk).
# The target's layouts, or NULL when the outbox holds no other target's events (no filter needed).
TARGET_SCOPE = """
    SELECT CASE WHEN coalesce(bool_and(t.target = %(target)s), true) THEN NULL
                ELSE coalesce(array_agg(l.id) FILTER (WHERE t.target = %(target)s), '{}') END AS layouts
    FROM pgturso.layout l JOIN pgturso.tracked_table t ON t.id = l.table_id
"""
BATCH_HEAD = """
    WITH scope AS (""" + TARGET_SCOPE + """), head AS (
        SELECT o.id, o.txid, o.layout_id, o.op, o.nrows, o.payload FROM pgturso.outbox o
        WHERE o.id > %(after)s
          AND ((SELECT layouts FROM scope) IS NULL OR o.layout_id = ANY ((SELECT layouts FROM scope)::int[]))
          AND (%(tenant)s::text IS NULL AND o.tenant IS NULL OR o.tenant = %(tenant)s::text)
        ORDER BY o.id LIMIT %(max_events)s
    )
    SELECT (SELECT layouts FROM scope), count(*), coalesce(sum(greatest(nrows, 1)), 0), max(id),
           count(DISTINCT txid), min(txid)::text, max(txid)::text,
           coalesce(min(layout_id) = max(layout_id) AND min(op) = max(op) AND min(op) IN ('U', 'D'), false),
           coalesce(max(octet_length(payload)), 0), coalesce(sum(octet_length(payload)), 0),
           pg_current_snapshot()::text
    FROM head
"""
BATCH_CUT_BY_ROWS = f"""
    SELECT id FROM (
        SELECT id, sum(greatest(nrows, 1)) OVER (ORDER BY id) AS rows_so_far
        FROM pgturso.outbox WHERE id > %(after)s AND {FOR_TARGET} ORDER BY id
    ) AS head WHERE rows_so_far >= %(max_rows)s LIMIT 1
"""
# The transactions of ids %(low)s to %(high)s (those of the events up to the cut %(upto)s) that also have events past
# the cut: one range scan of the (txid, id) index for later events in that range, each checked for a partner
# at or below the cut by its own probe of that index. The check is a scalar subquery, not EXISTS: the planner
# turned EXISTS into a (parallel) hash semi join that hashed every event up to the cut before finding that no
# later event was there to probe it (50,000 single-row transactions: 70-90 ms a batch instead of 1-2 ms).
def later_events_of(low: str, high: str) -> str:
    return f"""
        SELECT DISTINCT o.txid::text FROM pgturso.outbox o
        WHERE o.txid BETWEEN {low} AND {high} AND o.id > %(upto)s AND {FOR_TARGET}
          AND (SELECT true FROM pgturso.outbox h
               WHERE h.txid = o.txid AND h.id > %(after)s AND h.id <= %(upto)s AND {FOR_TARGET}
               LIMIT 1)"""


# Transactions with events on both sides of the cut, and how many transactions the events up to the cut hold:
# one pass over those events (also telling whether they are all upserts, or all deletes, of one table, and
# their largest payload), then the later events of their transactions (later_events_of).
STRADDLING_TRANSACTIONS = f"""
    WITH head AS (
        SELECT min(txid) AS low, max(txid) AS high, count(DISTINCT txid) AS transactions,
               coalesce(min(layout_id) = max(layout_id) AND min(op) = max(op) AND min(op) IN ('U', 'D'), false)
                   AS uniform,
               coalesce(max(octet_length(payload)), 0) AS widest
        FROM pgturso.outbox WHERE id > %(after)s AND id <= %(upto)s AND {FOR_TARGET}
    )
    SELECT head.transactions, head.uniform, head.widest, pg_current_snapshot()::text,
           ARRAY({later_events_of("head.low", "head.high")})
    FROM head
"""
# STRADDLING_TRANSACTIONS's last part alone, when BATCH_HEAD already described the events up to the cut
# (%(low)s, %(high)s: their transaction id range).
HELD_TRANSACTIONS = f"SELECT ARRAY({later_events_of('%(low)s::xid8', '%(high)s::xid8')})"
FIRST_TRANSACTION_END = f"""
    SELECT max(o.id) FROM pgturso.outbox o
    WHERE o.txid = (SELECT txid FROM pgturso.outbox WHERE id > %(after)s AND {FOR_TARGET} ORDER BY id LIMIT 1)
      AND o.id > %(after)s AND {FOR_TARGET}
"""
# A batch whose payloads add up to at most this is read into memory at once (a larger one through a cursor).
CLIENT_SIDE_BYTES = 1 << 20
# A batch's events by its name (the module docstring), from %(after)s on: what a statement of any later
# transaction selects as well as one of the transaction that chose the batch (Batch.events, read in parts).
BATCH_FILTER = (f"id > %(after)s AND id <= %(upto)s AND pg_visible_in_snapshot(txid, %(snapshot)s::pg_snapshot) "
                f"AND NOT (txid = ANY (%(held)s::text[]::xid8[])) AND {FOR_TARGET}")
# The last id of the next part of a batch read in parts: the first event after %(after)s at which the payloads
# add up to %(part_bytes)s, or the batch's end. The running sum over the primary key's order stops there.
PART_END = f"""
    SELECT coalesce((SELECT id FROM (
        SELECT id, sum(octet_length(coalesce(payload, '')) + 1) OVER (ORDER BY id) AS bytes_so_far
        FROM pgturso.outbox WHERE {BATCH_FILTER}
    ) AS part WHERE bytes_so_far >= %(part_bytes)s ORDER BY id LIMIT 1), %(upto)s)
"""
# The deletion generation: how many calls deleted pending outbox events besides delivery (skip_transaction,
# untrack_table, discard_blocked_tenant, a worker's recopy or slot rebuild), each recording itself in the
# transaction that deletes (pgturso._note_outbox_deletion), so a snapshot sees a deletion's row exactly when it
# sees the deletion. Read in the snapshot a batch is read ahead in (Outbox.read_past), and again before it is sent.
DELETION_GENERATION = "(SELECT count(*) FROM pgturso.outbox_deletion)"
# Where the source server is, and whether nothing deleted pending events since the batch read ahead was read
# (the generation it was read at, %(generation)s, unchanged): read once the batch before is recorded delivered,
# before this one is sent.
POSITION_IF_UNCHANGED = f"SELECT pgturso._source_position(), {DELETION_GENERATION} = %(generation)s"
# Where the source server is, and how many of a batch read ahead (while %(past_...)s, the batch before, travelled)
# are still pending, from its first event on (%(first)s), the batch before's excluded: when the generation moved
# (POSITION_IF_UNCHANGED false: something deleted pending events, of this batch or not). Fewer than were read:
# some of its own are gone, and the statements in memory would send them all the same (Outbox.position_if_whole).
POSITION_IF_WHOLE = f"""
    SELECT pgturso._source_position(), (
        SELECT count(*) FROM pgturso.outbox WHERE id >= %(first)s AND {BATCH_FILTER}
          AND NOT (id <= %(past_upto)s AND pg_visible_in_snapshot(txid, %(past_snapshot)s::pg_snapshot)
                   AND NOT (txid = ANY (%(past_held)s::text[]::xid8[]))))
"""
# Reading past the batch in flight (Outbox.read_past). While batch P travels, its events are still pending, and
# the next batch must be chosen and read as if they were gone: exactly the events a rolled-back deletion of P by
# its name would leave. P's name is (upto, snapshot, held, layouts): the events with id <= upto whose transaction is
# visible in P's snapshot and not held. So every pending event above P's cut is outside P, and an event at or below
# it is outside P only if its transaction
#   - is one of P's held transactions (events on both sides of P's cut: known by txid), or
#   - is not visible in P's snapshot: in progress when P was chosen (the snapshot's xip list), or at or above its
#     xmax (a transaction can draw an outbox id before the snapshot and still be at or above xmax: xmax is the
#     latest completed transaction + 1, not the next one to be assigned; such a transaction is not in xip), or
#   - has a layout that P's name left out (P named its target's layouts then, and the target has another now).
# This statement looks for such events by transaction id (the (txid, id) index: a probe per xip or held
# transaction, and a range scan of the transactions since P's snapshot), not by scanning P's events. None
# (the common case: a backlog of committed transactions, cut where no transaction straddles): the next batch is
# chosen among the events above P's cut alone (``after`` = P's cut in every choosing query), which are the
# same events the deletion would have left, so it is the same batch, in the same commit-consistent order
# (module docstring). Some: the caller reads past P the old way, deleting P's events in the reading transaction
# and rolling that back (a late committer below the cut comes first in the next batch, by its id, as ever).
# The scope check: P's layouts are its target's then; the target's now (scope) must be among them.
PAST_FOR_TARGET = FOR_TARGET.replace("%(layouts)s", "%(past_layouts)s")
OUTSIDE_BATCH_AT_OR_BELOW_CUT = f"""
    WITH scope AS ({TARGET_SCOPE})
    SELECT (%(past_layouts)s::int[] IS NOT NULL
            AND ((SELECT layouts FROM scope) IS NULL OR NOT (SELECT layouts FROM scope) <@ %(past_layouts)s::int[]))
        OR EXISTS (SELECT FROM pgturso.outbox
                   WHERE txid = ANY (ARRAY(SELECT pg_snapshot_xip(%(past_snapshot)s::pg_snapshot))
                                     || %(past_held)s::text[]::xid8[])
                     AND id <= %(past_upto)s AND {PAST_FOR_TARGET})
        OR EXISTS (SELECT FROM pgturso.outbox
                   WHERE txid >= pg_snapshot_xmax(%(past_snapshot)s::pg_snapshot) AND id <= %(past_upto)s
                     AND {PAST_FOR_TARGET}),
        @GENERATION@
"""
# The same, in the snapshot's deletion generation (None: unknown, the batch read is counted again before it is
# sent): a catalog before 0.6.0 has no pgturso.outbox_deletion, and this version's package is installed before
# ALTER EXTENSION UPDATE runs (Outbox.read_past).
OUTSIDE_BATCH_AT_OR_BELOW_CUT, OUTSIDE_BATCH_AT_OR_BELOW_CUT_UNCOUNTED = (
    OUTSIDE_BATCH_AT_OR_BELOW_CUT.replace("@GENERATION@", DELETION_GENERATION),
    OUTSIDE_BATCH_AT_OR_BELOW_CUT.replace("@GENERATION@", "NULL::bigint"))
# Whether the catalog records deletions (0.6.0 on): looked up by name, as the catalog is now.
HAS_DELETION_GENERATION = "SELECT to_regclass('pgturso.outbox_deletion') IS NOT NULL"
# The number of a batch's events, counted in the transaction that chose it: a batch read in parts after it must
# read as many, or something deleted some of them meanwhile (Batch.read_in_parts).
BATCH_EVENTS = f"SELECT count(*) FROM pgturso.outbox WHERE {BATCH_FILTER}"


def batch_groups_sql(relations: str, where: str, max_bytes: str = "%(max_bytes)s") -> str:
    """The events of ``relations`` (the outbox, and what ``where`` refers to) that ``where`` selects, merged where
    the worker would merge them: consecutive upserts (or deletes) of one table become one group, its payloads
    joined in outbox order, up to about ``max_bytes`` per group; every other event is a group of its own.
    Postgres does this per-event work, not Python."""
    return f"""
    WITH ev AS (
        SELECT id, txid, layout_id, op, nrows, payload,
               CASE WHEN op IN ('U', 'D') AND layout_id = lag(layout_id) OVER w AND op = lag(op) OVER w
                    THEN 0 ELSE 1 END AS starts_run,
               sum(octet_length(coalesce(payload, '')) + 1) OVER w AS bytes_so_far
        FROM {relations} WHERE {where}
        WINDOW w AS (ORDER BY id)
    ), runs AS (
        SELECT *, sum(starts_run) OVER (ORDER BY id) AS run, bytes_so_far / {max_bytes} AS part FROM ev
    )
    SELECT min(id) AS first_id, min(txid)::text::bigint, max(txid)::text::bigint, min(layout_id), min(op),
           sum(nrows)::bigint, count(*), string_agg(payload, ',' ORDER BY id)
    FROM runs GROUP BY run, part ORDER BY min(id)
"""


BATCH_GROUPS = batch_groups_sql("pgturso.outbox", BATCH_FILTER)

# Tenants' whole backlogs, each as one batch, in one statement (one snapshot, so no transaction around it): for
# each tenant of %(tenants)s, its first max_events events and, when they are fewer (every visible event of the
# tenant, so no transaction straddles a cut) and hold at most max_rows rows, those events merged as BATCH_GROUPS
# does (max_events, max_rows and max_bytes are each tenant's own: a tenant's limits shrink after slow or refused
# requests). Each row also carries the snapshot that names the batches (the statement's: one for all of them) and
# the source's position, read once, after every event of the batches and every earlier batch's deletion
# committed, as Outbox.position requires. A pattern worker's tenant mostly has a few events when it is visited:
# this is its batch in a share of one round trip instead of five (BEGIN, BATCH_HEAD, position, the events,
# COMMIT). More than the limits: the caller reads that tenant's batch the general way.
def tenant_scope(tenant: str) -> str:
    """The pattern's events (``scope.layouts``) of the tenant ``tenant`` (an SQL expression, never NULL: an
    equality, so that each tenant's events are found by outbox_tenant_idx)."""
    return f"(scope.layouts IS NULL OR o.layout_id = ANY (scope.layouts)) AND o.tenant = {tenant}"


WHOLE_BATCHES = f"""
    WITH scope AS ({TARGET_SCOPE})
    SELECT r.n, (SELECT layouts FROM scope), pg_current_snapshot()::text, (SELECT pgturso._source_position()), b.*
    FROM unnest(%(tenants)s::text[], %(max_events)s::int8[], %(max_rows)s::int8[], %(max_bytes)s::int8[])
         WITH ORDINALITY AS r(tenant, max_events, max_rows, max_bytes, n),
    LATERAL (
        SELECT s.head_events, s.head_rows, s.head_upto, s.head_transactions, g.*
        FROM (SELECT count(*) AS head_events, coalesce(sum(greatest(head.nrows, 1)), 0) AS head_rows,
                     max(head.id) AS head_upto, count(DISTINCT head.txid) AS head_transactions
              FROM (SELECT o.id, o.txid, o.nrows FROM pgturso.outbox o, scope WHERE {tenant_scope("r.tenant")}
                    ORDER BY o.id LIMIT r.max_events) AS head) AS s
        LEFT JOIN LATERAL ({batch_groups_sql(
            "pgturso.outbox o, scope",
            f"{tenant_scope('r.tenant')} AND s.head_events < r.max_events AND s.head_rows <= r.max_rows",
            "r.max_bytes")}
        ) AS g ON true
    ) AS b
    ORDER BY r.n, b.first_id
"""
# The common case, where every event is an upsert (or every one a delete) of the same table: no runs to find,
# so the events are merged by id range, %(bucket)s ids at a time (which bounds a group's size), without the
# window passes of BATCH_GROUPS: a third of its cost. Each id range is read by its own index range scan (from the
# target's first pending event on), so its events arrive in id order and nothing is sorted but a range's own
# events for string_agg (already in order): a GROUP BY over the batch sorted all its events by their range first
# (50,000 single-row events at the worker's work_mem: about 45 ms, against about 27 ms this way).
BATCH_BUCKETS = f"""
    SELECT g.* FROM generate_series((SELECT min(id) FROM pgturso.outbox WHERE id > %(after)s AND {FOR_TARGET})
                                    / %(bucket)s,
                                    %(upto)s / %(bucket)s) AS range(k),
    LATERAL (
        SELECT min(id), min(txid)::text::bigint, max(txid)::text::bigint, min(layout_id), min(op),
               sum(nrows)::bigint, count(*) AS events, string_agg(payload, ',' ORDER BY id)
        FROM pgturso.outbox
        WHERE id >= range.k * %(bucket)s AND id < (range.k + 1) * %(bucket)s AND {BATCH_FILTER}) AS g
    WHERE g.events > 0 ORDER BY range.k
"""
ONLY_HELD = f"""
    SELECT NOT EXISTS (SELECT 1 FROM pgturso.outbox
                       WHERE id > %(after)s AND id <= %(upto)s AND NOT (txid = ANY (%(held)s::text[]::xid8[]))
                         AND {FOR_TARGET})
"""
FIRST_COMMITTED_TRANSACTION = f"""
    SELECT max(id) AS last_id FROM pgturso.outbox WHERE {FOR_TARGET} GROUP BY txid ORDER BY last_id LIMIT 1
"""
LAYOUT = "SELECT spec, table_id FROM pgturso.layout WHERE id = %(id)s"


def error_cleared_when(condition: str) -> str:
    """The SET items that end a target's current error when ``condition`` holds (delivery got past it): the
    error becomes history (previous_error, cleared now) and its retrying streak (failing_since) ends."""
    return f"""
        previous_error = CASE WHEN {condition} AND last_error IS NOT NULL THEN last_error ELSE previous_error END,
        previous_error_at = CASE WHEN {condition} AND last_error IS NOT NULL THEN last_error_at
                                 ELSE previous_error_at END,
        error_cleared_at = CASE WHEN {condition} AND last_error IS NOT NULL THEN now() ELSE error_cleared_at END,
        last_error = CASE WHEN {condition} THEN NULL ELSE last_error END,
        last_error_at = CASE WHEN {condition} THEN NULL ELSE last_error_at END,
        last_error_table = CASE WHEN {condition} THEN NULL ELSE last_error_table END,
        last_error_txid = CASE WHEN {condition} THEN NULL ELSE last_error_txid END,
        failing_since = CASE WHEN {condition} THEN NULL ELSE failing_since END"""


# %(clear)s: delivery got past the current error (it delivered, or nothing is pending): it becomes history.
RECORD_STATE = f"""
    UPDATE pgturso.delivery_state SET status = %(status)s, worker = coalesce(%(worker)s, worker),
        started_at = CASE WHEN %(starting)s THEN now() ELSE started_at END,
        retries = retries + %(retry)s, updated_at = now(),{error_cleared_when("%(clear)s")}
    WHERE target = %(target)s
"""
RECORD_ERROR = """
    UPDATE pgturso.delivery_state SET status = %(status)s, retries = retries + %(retry)s, last_error = %(error)s,
        last_error_at = now(), last_error_table = %(table)s, last_error_txid = %(txid)s::text::xid8,
        failing_since = coalesce(failing_since, now()), updated_at = now()
    WHERE target = %(target)s
"""
# A batch's events by its name (see the module docstring): the outbox rows ``o`` that the marker ``m`` (the jsonb of
# Batch.marker()) names, from the relation MARKED_BATCH selects (``b``).
MARKED_BATCH = """
    SELECT (m->>'upto')::int8 AS upto, (m->>'snapshot')::pg_snapshot AS snap,
           ARRAY(SELECT jsonb_array_elements_text(m->'held'))::xid8[] AS held,
           ARRAY(SELECT jsonb_array_elements_text(m->'layouts'))::int[] AS layouts,
           jsonb_typeof(m->'layouts') = 'array' AS filtered, m->>'tenant' AS tenant"""
IN_MARKED_BATCH = """
    o.id <= b.upto AND pg_visible_in_snapshot(o.txid, b.snap) AND NOT (o.txid = ANY (b.held))
      AND (NOT b.filtered OR o.layout_id = ANY (b.layouts))"""
# %(marker)s is Batch.marker(), as text: stored as given (RECORD_BATCH).
DELETE_BATCH = f"""
    DELETE FROM pgturso.outbox o USING ({MARKED_BATCH}
        FROM (SELECT %(marker)s::text::jsonb AS m) AS given) AS b
    WHERE {IN_MARKED_BATCH} AND (b.tenant IS NULL AND o.tenant IS NULL OR o.tenant = b.tenant)
"""
# A marker written by pgturso before batches were named by snapshot: the id ranges [[low, high], ...] it carried.
DELETE_ID_RANGES = """
    DELETE FROM pgturso.outbox o USING jsonb_array_elements(%(marker)s::jsonb) AS r
    WHERE o.id BETWEEN (r->>0)::int8 AND (r->>1)::int8
"""
# A batch's counts as its sender knows them (a slot's batch: its row changes are no outbox rows).
SENT_COUNTS = ("SELECT %(transactions)s::int8 AS transactions, %(rows)s::int8 AS rows",
               "SELECT * FROM unnest(%(tables)s::int[], %(table_rows)s::int8[])")
# The counts of the outbox events the deletion removed. A batch is counted once, by whoever removes its events:
# the worker that sent it, or one that recovers it from the marker on Turso (the sender died, or lost the
# target, before its delete); a late delete that finds its events gone counts nothing. %(per_table)s: false
# for a tenant (see remove_delivered).
REMOVED_COUNTS = ("SELECT count(DISTINCT txid) AS transactions, coalesce(sum(nrows), 0)::int8 AS rows FROM removed",
                  "SELECT l.table_id, sum(x.nrows)::int8 FROM removed x JOIN pgturso.layout l ON l.id = x.layout_id "
                  "WHERE %(per_table)s GROUP BY l.table_id")
# REMOVED_COUNTS, for a batch its sender read and Turso committed (Batch.counts()): when the deletion removed as
# many events as the batch has (%(events)s), it removed exactly the batch's events (its name names no other
# pending event: what it names below the batch's first event is the batches' before it, whose deletions came
# first), so the batch's own counts are what REMOVED_COUNTS would count, without its passes over the removed
# events (a distinct count, a sum, a join and a grouping: ~0.1 s of the one Postgres backend per 50,000 events,
# measured in session 8). Fewer but some: skip_transaction or untrack_table deleted some while Turso had the
# batch, which carried them all the same (the skips' delivered_at says so): Turso got what the batch read, so its
# own counts are still what was delivered (counted from what was removed, the skipped rows were left out of the
# totals though on Turso: test_a_skipped_transaction_turso_committed_counts_as_delivered). None: another worker
# forgot the batch by its marker first and counted it (or every transaction of it was skipped meanwhile: not
# counted). More (never expected): counted from what was removed. Each branch's condition is an uncorrelated
# subquery, so the planner runs only the branch it holds for (a one-time filter).
KNOWN_OR_REMOVED_COUNTS = (
    f"""SELECT %(transactions)s::int8 AS transactions, %(rows)s::int8 AS rows
        WHERE (SELECT events FROM tally) BETWEEN 1 AND %(events)s
        UNION ALL SELECT * FROM ({REMOVED_COUNTS[0]}) AS c
        WHERE (SELECT events FROM tally) NOT BETWEEN 1 AND %(events)s""",
    f"""SELECT l.table_id, sum(r.rows)::int8
        FROM unnest(%(layouts_sent)s::int[], %(layout_rows)s::int8[]) AS r(layout_id, rows)
        JOIN pgturso.layout l ON l.id = r.layout_id
        WHERE %(per_table)s AND (SELECT events FROM tally) BETWEEN 1 AND %(events)s GROUP BY l.table_id
        UNION ALL {REMOVED_COUNTS[1].replace(
            "WHERE", "WHERE (SELECT events FROM tally) NOT BETWEEN 1 AND %(events)s AND")}""")


def record_batch_sql(set_also: str, delete: str, counts: tuple[str, str] = REMOVED_COUNTS) -> str:
    """One round trip recording a delivered batch: ``delete`` removes its events (the CTE ``removed``: their
    txid, layout_id and nrows, which ``set_also`` may look at), and its counts (``counts``: a query of its
    transactions and rows, and one of its rows per table) are added to the target's and its tables' totals
    (``set_also``: more assignments to the target's state, or ''). Returns the events removed and the counts."""
    totals, per_table = counts
    return f"""
    WITH removed AS (
        {delete.strip()}
        RETURNING txid, layout_id, nrows
    ), tally AS (SELECT count(*) AS events FROM removed), counts AS ({totals}), totals AS (
        UPDATE pgturso.delivery_state SET status = 'delivering', last_delivered_at = now(), updated_at = now(),
            transactions_delivered = transactions_delivered + c.transactions,
            rows_delivered = rows_delivered + c.rows{set_also}
        FROM counts c WHERE target = %(target)s
    ), per_table AS (
        INSERT INTO pgturso.table_state AS s (table_id, rows_delivered, last_delivered_at)
        SELECT t.id, r.rows, now() FROM ({per_table}) AS r(table_id, rows)
        JOIN pgturso.tracked_table t ON t.id = r.table_id
        ON CONFLICT (table_id) DO UPDATE SET rows_delivered = s.rows_delivered + excluded.rows_delivered,
            last_delivered_at = excluded.last_delivered_at
    )
    SELECT (SELECT events FROM tally), c.transactions, c.rows FROM counts c
"""


# skip_transaction of a transaction in a batch Turso committed: the batch was read before the skip committed (its
# snapshot does not see the skipping transaction), so it carried the transaction's events (visible to it, not
# held, the first of them at most its cut) all the same. The record then says so (docs/guarantees.md).
SKIPS_DELIVERED = """
    UPDATE pgturso.skipped_transaction s SET delivered_at = now()
    WHERE s.target = %(target)s AND s.delivered_at IS NULL AND s.committed_before IS NULL
      AND s.skip_xid IS NOT NULL AND s.first_event_id <= %(upto)s
      AND pg_visible_in_snapshot(s.txid, %(snapshot)s::pg_snapshot)
      AND NOT pg_visible_in_snapshot(s.skip_xid, %(snapshot)s::pg_snapshot)
      AND NOT (s.txid = ANY (%(held)s::text[]::xid8[]))
"""


@dataclass(frozen=True)
class Removed:
    """What recording a delivered batch removed from the outbox and counted as delivered."""
    events: int
    transactions: int
    rows: int


# The batch's marker becomes the last one Postgres knows delivered only if this deletion removed its events, or
# Postgres knows the batch before it (%(follows)s, the marker the batch's fence checked on the target) as the last
# one: a worker that lost the target and deletes late (another worker forgot the batch by the marker on the
# target and has delivered more since) must not put back an older marker, which the next start would take for a
# target that lacks deliveries, and recopy it (MarkerRecovery._catch_up_a_target_that_is_behind). The second case is a
# batch whose events something else deleted while Turso had it (untrack_table, skip_transaction: the worker
# holds no lock on them meanwhile): it was delivered all the same, and the target's marker names it.
def marker_after_removal(removed: str, follows: str, marker: str, known: str = "delivered_marker") -> str:
    """The delivered_marker a batch's deletion leaves (the rule above): ``marker`` if ``removed`` (a condition:
    the deletion removed some of its events) or ``known`` (the marker Postgres has) is ``follows``, else
    ``known``. Shared by RECORD_BATCH and a round's RECORD_TENANT_BATCHES."""
    return f"CASE WHEN {removed} OR {known} IS NOT DISTINCT FROM {follows} THEN {marker} ELSE {known} END"


KEEP_MARKER_OF_REMOVED = ", delivered_marker = " + marker_after_removal(
    "EXISTS (SELECT FROM removed)", "%(follows)s::text", "%(marker)s::text")
RECORD_BATCH = record_batch_sql(KEEP_MARKER_OF_REMOVED, DELETE_BATCH)
# RECORD_BATCH for a batch this worker read and sent (its counts known: KNOWN_OR_REMOVED_COUNTS).
RECORD_SENT_BATCH = record_batch_sql(KEEP_MARKER_OF_REMOVED, DELETE_BATCH, KNOWN_OR_REMOVED_COUNTS)
# A batch read ahead is sent once the batch before it is recorded delivered, and its events deleted while it
# travels (Worker._settle): RECORD_BATCH's marker alone first, by the same rule (an EXISTS of the batch's events
# for "the deletion removes some"), so that at most one batch is committed on Turso and not yet recorded here;
# its events are then deleted and counted by REMOVE_RECORDED, which leaves the marker alone. Until then they are
# pending with the marker recorded: recovery forgets them by that marker (Worker.recover), then by the one on Turso
# (this batch's, or the next one's, whose cut may lie below them).
RECORD_MARKER = f"""
    UPDATE pgturso.delivery_state SET delivered_marker = %(marker)s::text, updated_at = now()
    WHERE target = %(target)s AND (delivered_marker IS NOT DISTINCT FROM %(follows)s::text OR EXISTS (
        SELECT FROM pgturso.outbox o, ({MARKED_BATCH} FROM (SELECT %(marker)s::text::jsonb AS m) AS given) AS b
        WHERE {IN_MARKED_BATCH} AND (b.tenant IS NULL AND o.tenant IS NULL OR o.tenant = b.tenant)))
"""
REMOVE_RECORDED = record_batch_sql("", DELETE_BATCH, KNOWN_OR_REMOVED_COUNTS)
# Recovery by a marker written before batches were named by snapshot (the id ranges it carried).
RECORD_ID_RANGES = record_batch_sql(KEEP_MARKER_OF_REMOVED, DELETE_ID_RANGES)
# Several tenants' delivered batches recorded in one round trip (a pattern worker's round): each one's events
# deleted by its marker and counted in its own delivery_state row, as RECORD_BATCH does for one (what was
# removed is what counts; a tenant keeps no table_state: see Outbox.remove_delivered). Each batch's marker
# becomes its tenant's delivered_marker by RECORD_BATCH's rule (marker_after_removal): this deletion removed some
# of its events, or Postgres knew the batch before it (its ``follows``) as the tenant's last one. Returns, per
# target, the events, transactions and rows removed.
RECORD_TENANT_BATCHES = f"""
    WITH given AS (
        SELECT g.target, g.marker, g.follows, g.marker::jsonb AS m, g.events, g.transactions, g.rows
        FROM unnest(%(targets)s::text[], %(markers)s::text[], %(follows)s::text[], %(events)s::int8[],
                    %(transactions)s::int8[], %(rows)s::int8[])
             AS g(target, marker, follows, events, transactions, rows)
    ), removed AS (
        DELETE FROM pgturso.outbox o USING ({MARKED_BATCH}, given.target FROM given) AS b
        WHERE {IN_MARKED_BATCH} AND o.tenant = b.tenant  -- a tenant's events: by outbox_tenant_idx
        RETURNING b.target, o.txid, o.nrows
    ), removed_counts AS (
        SELECT target, count(*) AS events, count(DISTINCT txid) AS transactions,
               coalesce(sum(nrows), 0)::int8 AS rows
        FROM removed GROUP BY target
    ), counted AS (
        -- As KNOWN_OR_REMOVED_COUNTS: some events removed but no more than the batch has, the batch's own counts
        -- (skip_transaction deleted the others while Turso had them: Turso committed them all the same).
        SELECT r.target, r.events,
               CASE WHEN r.events <= g.events THEN g.transactions ELSE r.transactions END AS transactions,
               CASE WHEN r.events <= g.events THEN g.rows ELSE r.rows END AS rows
        FROM removed_counts r JOIN given g ON g.target = r.target
    ), totals AS (
        UPDATE pgturso.delivery_state d SET status = 'delivering', last_delivered_at = now(), updated_at = now(),
            transactions_delivered = d.transactions_delivered + coalesce(c.transactions, 0),
            rows_delivered = d.rows_delivered + coalesce(c.rows, 0),
            delivered_marker = {marker_after_removal("c.target IS NOT NULL", "g.follows", "g.marker",
                                                     "d.delivered_marker")}
        FROM given g LEFT JOIN counted c ON c.target = g.target
        WHERE d.target = g.target AND d.target = ANY (%(targets)s::text[])  -- by its key, not a scan
    )
    SELECT g.target, coalesce(c.events, 0), coalesce(c.transactions, 0), coalesce(c.rows, 0)
    FROM given g LEFT JOIN counted c ON c.target = g.target
"""
DELIVERED_MARKER = "SELECT delivered_marker FROM pgturso.delivery_state WHERE target = %(target)s"
SET_DELIVERED_MARKER = "UPDATE pgturso.delivery_state SET delivered_marker = %(marker)s WHERE target = %(target)s"
# A target database that lacks what was delivered to it: every committed event of the target goes (the copies
# supersede them) and each of its tables is recreated and copied afresh, in order with what commits later.
DROP_COMMITTED_EVENTS = f"DELETE FROM pgturso.outbox WHERE {FOR_TARGET}"
# Pending events deleted other than by delivering them: recorded, in the deleting transaction (DELETION_GENERATION).
NOTE_OUTBOX_DELETION = "SELECT pgturso._note_outbox_deletion(%(operation)s, %(events)s)"


def note_outbox_deletion(conn: psycopg.Connection[Any], operation: str, events: int) -> None:
    """Record, in the caller's transaction, that it deleted ``events`` pending events (NOTE_OUTBOX_DELETION), if
    the catalog records deletions: before ALTER EXTENSION UPDATE to 0.6.0 it does not, and no worker checks a
    batch against them then (Outbox.read_past)."""
    row = conn.execute(HAS_DELETION_GENERATION).fetchone()
    if row is not None and row[0]:
        conn.execute(NOTE_OUTBOX_DELETION, {"operation": operation, "events": events})
RESYNC_TARGET_TABLES = "SELECT pgturso._resync_target(%(target)s)"
LATEST_LAYOUTS = """
    SELECT DISTINCT ON (l.table_id) l.id FROM pgturso.layout l JOIN pgturso.tracked_table t ON t.id = l.table_id
    WHERE t.target = %(target)s AND t.dropped_at IS NULL ORDER BY l.table_id, l.id DESC
"""
# While the worker sleeps it holds a wake lock per table of its target (see capture.WAKE_LOCK_CLASS).
TAKE_WAKE_LOCKS = """
    SELECT t.id, pg_try_advisory_lock(%(class)s, t.id) FROM pgturso.tracked_table t WHERE t.target = %(target)s
"""
RELEASE_WAKE_LOCKS = "SELECT pg_advisory_unlock(%(class)s, id) FROM unnest(%(ids)s::int[]) AS id"
MAY_VACUUM = """
    SELECT r.rolsuper OR pg_has_role(c.relowner, 'USAGE') FROM pg_roles r, pg_class c
    WHERE r.rolname = current_user AND c.oid = 'pgturso.outbox'::regclass
"""
ANY_PENDING = f"SELECT EXISTS (SELECT 1 FROM pgturso.outbox WHERE {FOR_TARGET})"
# A copy chunk waits for a lock at most half of deadlock_timeout. Its rows are locked FOR SHARE in key order: an
# application transaction holding a row lock in the chunk's range that then writes a row the chunk locked
# already, or runs DDL on the table (which waits for the chunk's table lock), closes a cycle. Postgres ends the
# waiter whose own deadlock check (deadlock_timeout after it began waiting) finds the cycle first, which can be
# the application's. A chunk that gives up sooner is always out of the way before that check: it is retried.
COPY_LOCK_TIMEOUT = """
    SELECT set_config('lock_timeout', greatest(1, (extract(epoch FROM current_setting('deadlock_timeout')::interval)
                                                   * 500)::int)::text || 'ms', true)
"""
NEXT_COPY_CHUNK = """
    SELECT t.relid::regclass::text, pgturso._copy_chunk(t.id, %(rows)s), t.copy_rows_done, t.copy_rows_total
    FROM pgturso.tracked_table t
    WHERE t.target = %(target)s AND t.copy_state = 'copying' AND t.dropped_at IS NULL
    ORDER BY t.id LIMIT 1
"""
BACKLOG = f"""
    SELECT count(*), coalesce(sum(nrows), 0), coalesce(extract(epoch FROM now() - min(captured_at)), 0)::float8
    FROM pgturso.outbox WHERE {FOR_TARGET}
"""


@dataclass(frozen=True)
class Event:
    id: int
    txid: int
    layout_id: int
    op: str
    nrows: int
    payload: str | None
    txids: tuple[int, ...] = ()  # a merged event's lowest and highest source transaction (for messages)
    count: int = 1  # how many outbox events a merged event stands for
    # Read from a wal pattern's slot by its router (router.py): a routed row's tenant, or a held outbox row's
    # (None: every tenant).
    tenant: str | None = None
    # The payload's rows, each as its text in it, when its reader had them apart (a slot's run): spares
    # StatementBuilder finding them again (statements.row_texts) to split a payload larger than a statement.
    rows: tuple[str, ...] = ()


class Batch:
    """One batch, chosen inside a REPEATABLE READ transaction; ``marker()`` names its events for deletion and
    recovery. Iterate ``events()`` once: in that transaction (through a server-side cursor), or, with
    ``part_bytes`` set, outside any transaction, a part at a time (each part one statement selecting the batch
    by its name, so that no transaction stays open while the caller sends what it read)."""

    def __init__(self, conn: psycopg.Connection[Any], upto: int, held: list[str], snapshot: str, transactions: int,
                 fetch_size: int, layouts: list[int] | None = None, max_group_bytes: int = 1 << 20,
                 tenant: str | None = None, after: int = 0) -> None:
        self.conn = conn
        self.upto = upto
        # Its events are all above this id: the cut of the batch in flight when it was chosen (Outbox.read_past),
        # whose events, still pending below it, are none of its own. Its name (marker) does not say so: it names
        # those too, which is harmless, as that batch is delivered before this one is sent.
        self.after = after
        self.held = held
        self.snapshot = snapshot
        self.layouts = layouts
        self.tenant = tenant
        self.params = {"upto": upto, "held": held, "layouts": layouts, "max_bytes": max_group_bytes, "bucket": 1,
                       "tenant": tenant, "after": after, "snapshot": snapshot}
        # Read in parts of about this many payload bytes, outside any transaction (None: in the caller's).
        self.part_bytes: int | None = None
        # With part_bytes: the events the choosing transaction counted in the batch (read_in_parts).
        self.chosen_events: int | None = None
        self.max_group_bytes = max_group_bytes
        self.uniform = False  # set by choose_batch: all upserts (or all deletes) of one table
        self.fetch_size = fetch_size
        self.transactions = transactions
        self.more_pending = False
        self.event_count = 0
        self.first_id: int | None = None  # its first event's id, once read
        self.rows = 0
        self.rows_per_layout: dict[int, int] = {}  # of the events read
        # Where the source server was when the batch was sent (Outbox.position): set before marker() is used.
        self.position: dict[str, Any] | None = None
        # The deletion generation of the snapshot it was read in, when read ahead (Outbox.position_if_whole).
        self.generation: int | None = None
        # The marker of the batch delivered before it, which its fence checked on the target (None: none yet).
        self.follows: str | None = None
        # The payload bytes of the batch's events, at most, when known: a small batch is read in one round trip.
        self.payload_bytes: int | None = None

    def merge_by_id_range(self, uniform: bool, widest_payload: int) -> None:
        """The batch's events are all upserts (or all deletes) of one table, none larger than
        ``widest_payload`` bytes: merge them by id range, as many ids per group as fit its size limit."""
        self.uniform = uniform
        # A group joins its payloads with commas and the statement adds brackets: bucket * (widest + 1) + 1.
        self.params["bucket"] = max(1, (self.max_group_bytes - 1) // (int(widest_payload) + 1))

    def read_in_parts(self, part_bytes: int) -> None:
        """In the transaction that chose the batch: have ``events()`` read it in parts of about ``part_bytes``
        payload bytes, each by statements of its own after this transaction, and count its events now. Nothing
        locks them meanwhile: untrack_table or skip_transaction may delete some between two parts,
        and a source transaction whose first part was sent would arrive cut in two. The count tells: events()
        raises BatchChanged after the last part if fewer were read, before the batch's Turso transaction commits."""
        self.part_bytes = part_bytes
        if self.payload_bytes is None or self.payload_bytes > CLIENT_SIDE_BYTES:  # else read in one statement
            self.chosen_events = int(self.conn.execute(BATCH_EVENTS, self.params).fetchone()[0])  # type: ignore[index]

    def counts(self) -> dict[str, Any]:
        """What the events read add up to, as KNOWN_OR_REMOVED_COUNTS takes them (once all were read)."""
        return {"events": self.event_count, "transactions": self.transactions, "rows": self.rows,
                "layouts_sent": list(self.rows_per_layout), "layout_rows": list(self.rows_per_layout.values())}

    def marker(self) -> str:
        name: dict[str, Any] = {"upto": self.upto, "snapshot": self.snapshot, "held": self.held,
                                "layouts": self.layouts}
        if self.position is not None:
            name["position"] = self.position
        if self.tenant is not None:
            name["tenant"] = self.tenant
        return json.dumps(name, separators=(",", ":"))

    def events(self) -> Iterator[Event]:
        """The batch as events in outbox order, runs of upserts or deletes of a table already merged into one
        event each (``id`` is the run's first id)."""
        query = BATCH_BUCKETS if self.uniform else BATCH_GROUPS
        if self.payload_bytes is not None and self.payload_bytes <= CLIENT_SIDE_BYTES:
            # Small enough to hold: one round trip instead of a server-side cursor's declare, fetches and close.
            rows: Iterable[tuple[Any, ...]] = self.conn.execute(query, self.params).fetchall()
            yield from self._events(rows)
            return
        if self.part_bytes is not None:
            yield from self._events_in_parts(query, self.part_bytes)
            return
        with self.conn.cursor(name="pgturso_batch") as cur:
            cur.itersize = self.fetch_size
            cur.execute(query, self.params)
            yield from self._events(cur)

    def _events_in_parts(self, query: str, part_bytes: int) -> Iterator[Event]:
        """The events a part at a time, each part read by its own statements (autocommit: no transaction is open
        while the caller consumes a part). They select the same events as the transaction that chose the batch:
        its events are named by its snapshot (BATCH_FILTER) and do not change until the worker deletes them."""
        after = self.after
        while after < self.upto:
            params = {**self.params, "after": after, "part_bytes": part_bytes}
            end = int(self.conn.execute(PART_END, params).fetchone()[0])  # type: ignore[index]
            rows = self.conn.execute(query, {**params, "upto": end}).fetchall()
            yield from self._events(rows)
            after = end
        if self.chosen_events is not None and self.event_count != self.chosen_events:
            raise BatchChanged(
                f"{self.chosen_events - self.event_count} of the {self.chosen_events} outbox events of the batch "
                "being sent in parts were deleted meanwhile (untrack_table or skip_transaction): its "
                "Turso transaction is rolled back, nothing of it applied, and the batch is chosen again")

    def _events(self, rows: Iterable[tuple[Any, ...]]) -> Iterator[Event]:
        for first_id, first_txid, last_txid, layout_id, op, nrows, count, payload in rows:
            if self.first_id is None:
                self.first_id = first_id
            self.event_count += count
            self.rows += nrows
            self.rows_per_layout[layout_id] = self.rows_per_layout.get(layout_id, 0) + nrows
            txids = (first_txid,) if first_txid == last_txid else (first_txid, last_txid)
            yield Event(first_id, first_txid, layout_id, op, nrows, payload, txids, count)


class WholeBatch(Batch):
    """A batch whose events were read with it, in the statement that chose it (Outbox.read_whole_batch): it
    needs no transaction of its own, and its position is already known."""

    def __init__(self, groups: list[tuple[Any, ...]], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups = groups

    def events(self) -> Iterator[Event]:
        yield from self._events(self.groups)


class Outbox:
    """The worker's view of the outbox, over one connection that it owns."""

    def __init__(self, conn: psycopg.Connection[Any], *, batch_rows: int, batch_events: int, fetch_size: int = 4,
                 target: str = "default", max_group_bytes: int = 1 << 20, pattern: str | None = None,
                 tenant: str | None = None) -> None:
        self.conn = conn
        self.max_group_bytes = max_group_bytes
        self.target = target  # the target delivered to (a tenant's own name, for a pattern)
        # A tenant of a pattern target: its tables are the pattern's, its events those of its tenant value.
        self.tables_target = pattern or target
        self.tenant = tenant
        self.layouts: list[int] | None = None
        self.batch_rows = batch_rows
        self.batch_events = batch_events
        self.fetch_size = fetch_size
        self._layouts: dict[int, TableLayout] = {}
        self._table_of_layout: dict[int, int] = {}
        self._may_vacuum: bool | None = None
        # Set by read_past for the next choose_batch (in the same transaction): the cut of the batch in flight,
        # and the deletion generation of the transaction's snapshot (DELETION_GENERATION).
        self._after = 0
        self._generation: int | None = None
        # Whether pgturso.outbox_deletion existed before the current transaction began (read_past): only then
        # does its count in that transaction's snapshot cover every deletion committed after it.
        self._deletions_recorded = False

    def source_id(self) -> str:
        with self.conn.transaction():
            row = self.conn.execute(SOURCE_ID).fetchone()
        if row is None:
            raise RuntimeError("pgturso.instance is empty; reinstall the extension")
        return str(row[0])

    def layout(self, layout_id: int) -> TableLayout:
        """A layout by id (they never change once committed, so they are cached)."""
        if layout_id not in self._layouts:
            row = self.conn.execute(LAYOUT, {"id": layout_id}).fetchone()
            if row is None:
                raise RuntimeError(f"outbox event names layout {layout_id}, which does not exist")
            self._layouts[layout_id] = TableLayout.from_spec(row[0])
            self._table_of_layout[layout_id] = int(row[1])
        return self._layouts[layout_id]

    def choose_batch(self, single_transaction: bool = False) -> Batch | None:
        """Pick the next batch inside the caller's REPEATABLE READ transaction; None when nothing is pending.

        ``single_transaction``: just the first source transaction in commit-consistent order, to find which
        one Turso refuses and deliver everything before it.
        """
        # Read past the batch in flight by its cut (read_past), unless that needed its events deleted.
        after, self._after = self._after, 0
        generation, self._generation = self._generation, None
        batch = self._choose_batch(after, single_transaction)
        if batch is not None:
            batch.generation = generation
        return batch

    def _choose_batch(self, after: int, single_transaction: bool) -> Batch | None:
        if single_transaction:  # (nothing is read ahead of one source transaction at a time: after is 0)
            self.layouts = self._target_layouts()
            scope = {"layouts": self.layouts, "tenant": self.tenant}
            first = self.conn.execute(FIRST_COMMITTED_TRANSACTION, scope).fetchone()
            if first is None:
                return None
            return self._batch(first[0])
        limits = {"max_events": self.batch_events, "max_rows": self.batch_rows, "target": self.tables_target,
                  "tenant": self.tenant, "after": after}
        (layouts, events, rows, last, transactions, low, high, uniform, widest, payload_bytes,  # type: ignore[misc]
         snapshot) = self.conn.execute(BATCH_HEAD, limits).fetchone()
        self.layouts = None if layouts is None else list(layouts)
        scope = {"layouts": self.layouts, "tenant": self.tenant, "after": after}
        if not events:
            return None
        # Cut short by the limits: more is pending, and reading the next batch ahead pays off.
        more_pending = events >= self.batch_events or rows >= self.batch_rows
        if rows > self.batch_rows:
            batch = self._batch(self.conn.execute(BATCH_CUT_BY_ROWS, {**limits, **scope}).fetchone()[0], after)  # type: ignore[index]
        else:
            # The cut is the head's last event: the head's figures are the batch's. Below the event limit the
            # head holds every visible event of the target, so no transaction has events past the cut.
            held: list[str] = [] if events < self.batch_events else list(self.conn.execute(  # type: ignore[index]
                HELD_TRANSACTIONS, {"upto": last, "low": low, "high": high, **scope}).fetchone()[0])
            batch = Batch(self.conn, int(last), held, snapshot, int(transactions) - len(held), self.fetch_size,
                          self.layouts, self.max_group_bytes, self.tenant, after)
            batch.merge_by_id_range(uniform, widest)
            batch.payload_bytes = int(payload_bytes)
        if batch.held and self._only_held(batch.upto, batch.held, after):
            # Every event up to the cut belongs to a transaction that continues past it: take the first
            # transaction whole, however large (it is streamed, not held in memory).
            batch = self._batch(self.conn.execute(FIRST_TRANSACTION_END, scope).fetchone()[0], after)  # type: ignore[index]
            more_pending = True  # the rest of the held transactions, at least
        batch.more_pending = more_pending
        return batch

    def read_whole_batch(self) -> tuple[bool, Batch | None]:
        """This outbox's tenant's pending events as one batch (read_whole_batches)."""
        return read_whole_batches(self.conn, [self])[0]

    def _batch(self, upto: int, after: int = 0) -> Batch:
        head_transactions, uniform, widest, snapshot, held = self.conn.execute(  # type: ignore[misc]
            STRADDLING_TRANSACTIONS, {"upto": upto, "layouts": self.layouts, "tenant": self.tenant,
                                      "after": after}).fetchone()
        batch = Batch(self.conn, upto, list(held), snapshot, int(head_transactions) - len(held), self.fetch_size,
                      self.layouts, self.max_group_bytes, self.tenant, after)
        batch.merge_by_id_range(uniform, widest)
        return batch

    def _only_held(self, upto: int, held: list[str], after: int) -> bool:
        row = self.conn.execute(ONLY_HELD, {"upto": upto, "held": held, "layouts": self.layouts,
                                            "tenant": self.tenant, "after": after}).fetchone()
        return bool(row and row[0])

    def take_wake_locks(self) -> tuple[list[int], bool]:
        """Take the wake lock of each of this target's tables; returns the ones taken and whether all were
        (one is busy while a transaction that wrote the table, and found the worker awake, is open)."""
        rows = self.conn.execute(TAKE_WAKE_LOCKS, {"class": WAKE_LOCK_CLASS, "target": self.tables_target}).fetchall()
        return [table_id for table_id, taken in rows if taken], all(taken for _, taken in rows)

    def release_wake_locks(self, table_ids: list[int]) -> None:
        if table_ids:
            self.conn.execute(RELEASE_WAKE_LOCKS, {"class": WAKE_LOCK_CLASS, "ids": table_ids})

    def _target_layouts(self) -> list[int] | None:
        """This target's layout ids, or None when the outbox holds no other target's events (no filter)."""
        mine, only_mine = self.conn.execute(  # type: ignore[misc]
            TARGET_LAYOUTS, {"target": self.tables_target}).fetchone()
        return None if only_mine else list(mine)

    def any_pending(self) -> bool:
        with self.conn.transaction():
            row = self.conn.execute(ANY_PENDING, {"layouts": self._target_layouts(), "tenant": self.tenant}).fetchone()
        return bool(row and row[0])

    def copy_chunk(self, rows: int) -> tuple[str, int, int, int | None] | None:
        """Queue the next chunk of an initial copy of one of this target's tables (its own READ COMMITTED
        transaction: the chunk locks its rows FOR SHARE). Returns (table, rows copied, done, total); raises
        CopyDeferred when the chunk stepped back from an application transaction's lock (COPY_LOCK_TIMEOUT)."""
        try:
            with self.conn.transaction():
                self.conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                self.conn.execute(COPY_LOCK_TIMEOUT)
                row = self.conn.execute(NEXT_COPY_CHUNK, {"rows": rows, "target": self.tables_target}).fetchone()
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
            raise CopyDeferred(f"a copy chunk of target {self.tables_target!r} stepped back from a lock held by "
                               f"another transaction ({str(exc).strip()}); it is tried again") from exc
        if row is None or row[1] is None:
            return None
        table, copied, done, total = row
        return str(table), int(copied), int(done), None if total is None else int(total)

    def position(self) -> dict[str, Any]:
        """The server's system, timeline and WAL insert position now (55_position.sql). Taken for a batch
        after its events and every earlier batch's deletion committed, so that a server whose history
        reaches it has all of them."""
        row = self.conn.execute(SOURCE_POSITION).fetchone()
        assert row is not None
        return dict(row[0])

    def position_if_whole(self, batch: Batch, past: Batch) -> dict[str, Any] | None:
        """position(), for ``batch`` read ahead while ``past`` travelled, once ``past`` is recorded delivered (its
        events may still be pending): None if some of ``batch``'s events are gone since it was read (deleted by
        skip_transaction or untrack_table): it must be read again. Nothing deleted pending events since the
        snapshot it was read in (the deletion generation unchanged, POSITION_IF_UNCHANGED): it is whole, and
        its events are not counted again; else they are (POSITION_IF_WHOLE)."""
        if batch.generation is not None:
            row = self.conn.execute(POSITION_IF_UNCHANGED, {"generation": batch.generation}).fetchone()
            assert row is not None
            if row[1]:
                return dict(row[0])
        row = self.conn.execute(POSITION_IF_WHOLE, {
            **batch.params, "first": batch.first_id or 0, "past_upto": past.upto, "past_snapshot": past.snapshot,
            "past_held": past.held}).fetchone()
        assert row is not None
        return dict(row[0]) if int(row[1]) == batch.event_count else None

    def trusts(self, marker: str) -> bool:
        """Whether a marker read from the target describes this server's past: it carries no position (written
        before positions were recorded: trusted as before), or this server's history contains its position."""
        try:
            position = json.loads(marker).get("position")
        except (ValueError, AttributeError):
            return True
        if position is None:
            return True
        with self.conn.transaction():
            row = self.conn.execute(POSITION_REACHED, {"position": json.dumps(position)}).fetchone()
        return bool(row and row[0])

    def marker_of_nothing(self) -> str:
        """A marker that names no event (no id is <= 0) and this server's position."""
        return json.dumps({"upto": 0, "snapshot": "1:1:", "held": [], "layouts": None, "position": self.position()},
                          separators=(",", ":"))

    def forget(self, marker: str) -> Removed:
        """Remove the events of the batch that ``marker`` names and count them delivered (on recovery, when the
        marker is all we know: the worker that sent the batch counted nothing, or counts nothing now)."""
        query = RECORD_ID_RANGES if marker.lstrip().startswith("[") else RECORD_BATCH
        with self.conn.transaction():
            removed = self._record(query, marker, marker)  # a marker Postgres knows already is kept as it is
            name = json.loads(marker) if query is RECORD_BATCH and self.tenant is None else {}
            if "snapshot" in name and "held" in name:
                # The worker that sent it died before it learnt that Turso committed it: a skip_transaction that
                # ran meanwhile of a transaction it carried is delivered all the same (note_skips_delivered).
                self.conn.execute(SKIPS_DELIVERED, {"target": self.target, "upto": name["upto"],
                                                    "snapshot": name["snapshot"], "held": name["held"]})
            return removed

    def _record(self, query: str, marker: str, follows: str | None, batch: Batch | None = None) -> Removed:
        """Run ``query`` (record_batch_sql's) for the batch ``marker`` names; ``batch``: the batch as read, whose
        counts KNOWN_OR_REMOVED_COUNTS takes."""
        row = self.conn.execute(query, {"marker": marker, "follows": follows, "target": self.target,
                                        "per_table": self.tenant is None,
                                        **(batch.counts() if batch is not None else {})}).fetchone()
        assert row is not None
        return Removed(int(row[0]), int(row[1]), int(row[2]))

    def delivered_marker(self) -> str | None:
        """The marker of the last batch Postgres knows the target committed; None before the first one."""
        row = self._one_statement(DELIVERED_MARKER, {"target": self.target}).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def latest_layouts(self) -> list[TableLayout]:
        """The current layout of each of the target's tables."""
        with self.conn.transaction():
            ids = [r[0] for r in self.conn.execute(LATEST_LAYOUTS, {"target": self.tables_target}).fetchall()]
            return [self.layout(i) for i in ids]

    def recopy_target(self, target_marker: str) -> None:
        """The target lacks what was delivered: drop the target's committed events and queue every table of
        it to be recreated and copied afresh; ``target_marker`` (the target's own marker) is what Postgres
        knows the target holds from now on."""
        with self.conn.transaction():
            dropped = self.conn.execute(DROP_COMMITTED_EVENTS, {"layouts": self._target_layouts(),
                                                                "tenant": self.tenant}).rowcount
            note_outbox_deletion(self.conn, "recopy_target", dropped)
            # A tenant's tables are its pattern's: resync_table recreates and copies them for every tenant.
            self.conn.execute(RESYNC_TARGET_TABLES, {"target": self.tables_target})
            self.conn.execute(SET_DELIVERED_MARKER, {"marker": target_marker, "target": self.target})

    def vacuum(self) -> None:
        """VACUUM the outbox (not FULL: it does not block writers), so its space is reused as a queue's must be.
        Autovacuum wakes at most once a minute per table; a busy outbox would grow in between. Only a superuser
        or the outbox's owner may: a worker role without superuser (docs/security.md) leaves it to autovacuum."""
        if self._may_vacuum is None:
            row = self.conn.execute(MAY_VACUUM).fetchone()
            self._may_vacuum = bool(row and row[0])
        if self._may_vacuum:
            self.conn.execute("VACUUM pgturso.outbox")

    def read_past(self, batch: Batch) -> None:
        """In the transaction that reads the next batch while ``batch`` is in flight: make the next choose_batch
        skip it, its events staying pending until Turso confirmed ``batch`` (mark_delivered), with no
        transaction open meanwhile. When every pending event at or below its cut is its own (one statement by
        transaction id: OUTSIDE_BATCH_AT_OR_BELOW_CUT), the next batch is chosen above its cut. Else (a late
        committer or a held transaction below the cut) its events are deleted by its name, and the caller
        rolls that transaction back once it read the next batch."""
        recorded = self._deletions_recorded
        outside = OUTSIDE_BATCH_AT_OR_BELOW_CUT if recorded else OUTSIDE_BATCH_AT_OR_BELOW_CUT_UNCOUNTED
        row = self.conn.execute(outside, {
            "target": self.tables_target, "tenant": self.tenant, "past_upto": batch.upto,
            "past_snapshot": batch.snapshot, "past_held": batch.held, "past_layouts": batch.layouts}).fetchone()
        assert row is not None
        self._generation = None if row[1] is None else int(row[1])
        if not recorded:
            # A catalog before 0.6.0 (this package runs before ALTER EXTENSION UPDATE): no generation, the batch
            # is counted again before it is sent. Seen now, the table existed before every later transaction's
            # snapshot (not necessarily this one's: the upgrade may have committed after it was taken).
            found = self.conn.execute(HAS_DELETION_GENERATION).fetchone()
            self._deletions_recorded = bool(found and found[0])
        if row[0] is False:
            self._after = batch.upto
            return
        self._after = 0
        self.conn.execute(DELETE_BATCH, {"marker": batch.marker()})

    def mark_delivered(self, batch: Batch) -> Removed:
        """Remove a delivered batch's events and count it: one statement (RECORD_BATCH), its own transaction on
        the worker's autocommit connection."""
        return self.remove_delivered(batch)

    def record_marker(self, batch: Batch) -> None:
        """Record a batch Turso confirmed as the last one delivered, leaving its events for remove_recorded
        (RECORD_MARKER): one short statement between its confirmation and the next batch's request."""
        self._one_statement(RECORD_MARKER, {"marker": batch.marker(), "follows": batch.follows,
                                            "target": self.target})

    def remove_recorded(self, batch: Batch) -> Removed:
        """Remove and count the events of a batch that record_marker recorded (while the next one travels)."""
        return self._record(REMOVE_RECORDED, batch.marker(), batch.follows, batch)

    def note_skips_delivered(self, batch: Batch) -> int:
        """Turso committed ``batch`` and some of its events were gone when the worker removed them: a
        skip_transaction that ran while the batch travelled deleted them, and cannot unsend them. Mark those
        skips delivered (SKIPS_DELIVERED); returns how many."""
        return self._one_statement(SKIPS_DELIVERED, {"target": self.target, "upto": batch.upto,
                                                     "snapshot": batch.snapshot, "held": batch.held}).rowcount

    def settled(self, batch: Batch) -> None:
        """After the transaction that removed a batch Turso confirmed committed (a slot moves past it then)."""

    def close(self) -> None:
        """Release what the source holds besides its connection (a slot's replication stream)."""

    def remove_delivered(self, batch: Batch) -> Removed:
        """Remove a delivered batch's events and count what was removed, in the caller's transaction.

        A pattern's tables are shared by all its tenants, whose workers run at once: their table_state rows
        would make every tenant's delivery wait for (or, in REPEATABLE READ, fail on) the others'. A tenant
        counts its rows in its own delivery_state row only."""
        return self._record(RECORD_SENT_BATCH, batch.marker(), batch.follows, batch)

    def record_state(self, status: str, *, worker: str | None = None, starting: bool = False,
                     retry: bool = False, clear_error: bool = False) -> None:
        """Record the worker's state; ``clear_error``: the current error is over (moved to history)."""
        self._one_statement(RECORD_STATE, {"status": status, "worker": worker, "starting": starting,
                                           "retry": int(retry), "target": self.target, "clear": clear_error})

    def _one_statement(self, query: str, params: dict[str, Any]) -> psycopg.Cursor[Any]:
        """Run one statement as a transaction of its own: bare on an idle autocommit connection (the worker's:
        one round trip, where BEGIN and COMMIT around it made three, on each of a pattern's thousand tenants'
        first visit), else in a transaction block (a savepoint inside the caller's transaction)."""
        if self.conn.autocommit and self.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            return self.conn.execute(query, params)
        with self.conn.transaction():
            return self.conn.execute(query, params)

    def record_error(self, status: str, error: str, *, table: str | None = None, txid: int | None = None,
                     retry: bool = False) -> None:
        with self.conn.transaction():
            self.conn.execute(RECORD_ERROR, {"status": status, "error": error, "table": table,
                                             "txid": None if txid is None else str(txid), "retry": int(retry),
                                             "target": self.target})

    def backlog(self) -> tuple[int, int, float]:
        """Pending events, their rows, and the age in seconds of the oldest one."""
        with self.conn.transaction():
            events, rows, lag = self.conn.execute(  # type: ignore[misc]
                BACKLOG, {"layouts": self._target_layouts(), "tenant": self.tenant}).fetchone()
        return int(events), int(rows), float(lag)


def read_whole_batches(conn: psycopg.Connection[Any], outboxes: list[Outbox]) -> list[tuple[bool, Batch | None]]:
    """The pending events of each outbox's tenant as one batch, all read in one statement (WHOLE_BATCHES) over
    ``conn``, outside any transaction; the outboxes are tenants of one pattern. Returns, in
    order, for each: (whether they fit its batch limits, the batch or None when nothing is pending); when they
    do not fit, the caller reads that tenant's batch the general way (choose_batch, in a transaction)."""
    assert all(o.tenant is not None for o in outboxes), "a pattern's tenants only"
    params = {"target": outboxes[0].tables_target, "tenants": [o.tenant for o in outboxes],
              "max_events": [o.batch_events for o in outboxes], "max_rows": [o.batch_rows for o in outboxes],
              "max_bytes": [o.max_group_bytes for o in outboxes]}
    rows_of: dict[int, list[tuple[Any, ...]]] = {}
    for row in conn.execute(WHOLE_BATCHES, params).fetchall():
        rows_of.setdefault(int(row[0]) - 1, []).append(row)
    result: list[tuple[bool, Batch | None]] = []
    for number, outbox in enumerate(outboxes):
        rows = rows_of[number]
        layouts, snapshot, position, events, total_rows, last, transactions = rows[0][1:8]
        if not events:
            result.append((True, None))
            continue
        if events >= outbox.batch_events or total_rows > outbox.batch_rows:
            result.append((False, None))
            continue
        outbox.layouts = None if layouts is None else list(layouts)
        batch = WholeBatch([row[8:] for row in rows], conn, int(last), [], snapshot, int(transactions),
                           outbox.fetch_size, outbox.layouts, outbox.max_group_bytes, outbox.tenant)
        batch.position = dict(position)
        result.append((True, batch))
    return result


def record_tenant_batches(conn: psycopg.Connection[Any], delivered: list[tuple[Outbox, Batch]]) -> dict[str, Removed]:
    """Remove several tenants' delivered batches and count each in its tenant's delivery_state, in one autocommit
    statement (RECORD_TENANT_BATCHES): from what the batch read when its deletion removed some of its events and
    no more (KNOWN_OR_REMOVED_COUNTS' rule), else from what was removed; returns that, per tenant target."""
    rows = conn.execute(RECORD_TENANT_BATCHES, {"targets": [o.target for o, _ in delivered],
                                                "markers": [b.marker() for _, b in delivered],
                                                "follows": [b.follows for _, b in delivered],
                                                "events": [b.event_count for _, b in delivered],
                                                "transactions": [b.transactions for _, b in delivered],
                                                "rows": [b.rows for _, b in delivered]}).fetchall()
    return {str(target): Removed(int(events), int(transactions), int(rows))
            for target, events, transactions, rows in rows}
