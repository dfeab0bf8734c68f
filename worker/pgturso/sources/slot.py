"""Capture from a logical replication slot: the batches of a wal target (``track_table(..., capture => 'wal')``).

A wal target's tables have no capture trigger. Their row changes are decoded from the target's slot by the
built-in ``pgoutput`` plugin (publication ``pgturso_tables``), together with the inserts into
``pgturso.outbox`` (publication ``pgturso_outbox``: DDL, initial-copy chunks, repairs, materialized-view
diffs, TRUNCATE), so everything arrives in commit order, each transaction whole. The worker reads the slot
over its ordinary connection: ``pg_logical_slot_peek_binary_changes`` (which does not move the slot) streamed
through a server-side cursor, and ``pg_replication_slot_advance`` once Turso confirmed a batch.

- A batch is one peek: whole transactions, up to ``batch_rows`` decoded changes (a bigger transaction comes
  whole and is streamed to Turso, never held in memory).
- Values arrive as Postgres' text forms (the walsender's session pins the capture settings, see
  capture.CAPTURE_SETTINGS). Postgres turns them back into values of the column's type and encodes them with
  the very expressions the capture triggers use (capture.row_json_sql): one set-based query per run of rows,
  so both modes send the same bytes. A table whose every column's type says how its JSON follows from the
  text form (types.ColumnType.from_text: integers, text types, booleans, floats) is encoded by the worker
  instead, as those expressions would: no round trip.
- The progress marker on Turso names the batch's end (a commit LSN, or the point the peek read up to), the
  slot generation it was read from, and the layout each table was decoded with at that point. The slot is
  advanced only after Turso confirmed; a worker that restarts finds the marker ahead of the slot, deletes the
  outbox rows of what was delivered and advances the slot there, instead of sending it again.
- A slot invalidated by ``max_slot_wal_keep_size`` or gone with a failover (PG 15 slots are not kept on
  standbys) is replaced, and the target's tables are copied afresh (recreated on Turso: nothing doubled).
"""

from __future__ import annotations

import json
import logging
import select
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import psycopg

from ..capture.layout import Column, TableLayout
from ..capture.sql import CAPTURE_SETTINGS, key_from_text_sql, row_json_sql
from ..capture.types import json_from_text
from ..common.errors import ConfigError, PgTursoError
from ..common.logs import event
from ..common.quoting import quote_ident, quote_literal
from .outbox import SENT_COUNTS, Event, Outbox, Removed, note_outbox_deletion, record_batch_sql
from .pgoutput import DELETE, INSERT, PUBLICATIONS, RELATION, TRUNCATE, peek_options_sql
from .replication import ReplicationStream

log = logging.getLogger("pgturso.slot")

SLOT_OF_TARGET = """
    SELECT pgturso._slot_name(g.name), g.slot_generation, g.slot_rebuild, r.slot_name IS NOT NULL,
           coalesce(r.wal_status, 'missing'), r.confirmed_flush_lsn::text
    FROM pgturso.target g LEFT JOIN pg_replication_slots r ON r.slot_name = pgturso._slot_name(g.name)
    WHERE g.name = %(target)s
"""
PEEK = f"""
    SELECT data FROM pg_logical_slot_peek_binary_changes(%(slot)s, %(upto)s::pg_lsn, %(changes)s,
        {peek_options_sql(PUBLICATIONS)})
"""
TABLES = "SELECT id, relid::oid::int8, target FROM pgturso.tracked_table"
# How many of these tables are still tracked (untrack_table deletes the row).
TABLES_LEFT = "SELECT count(*) FROM pgturso.tracked_table WHERE id = ANY (%(tables)s::int4[])"
# Transactions skip_transaction dropped for this target and its slot has not passed: the 32-bit xid (as in
# pgoutput's Begin) and the WAL position before which that transaction committed (a later one reusing the xid
# after a wraparound commits after it).
SKIPPED = """
    SELECT (s.txid::text::numeric %% 4294967296)::int8, s.committed_before::text FROM pgturso.skipped_transaction s
    WHERE s.target = %(target)s AND s.committed_before IS NOT NULL
      AND s.committed_before > coalesce((SELECT r.confirmed_flush_lsn FROM pg_replication_slots r
                                         WHERE r.slot_name = %(slot)s), '0/0')
"""
COUNT_SKIPPED = """
    UPDATE pgturso.skipped_transaction SET events = events + %(events)s, rows = rows + %(rows)s
    WHERE target = %(target)s AND committed_before IS NOT NULL AND (txid::text::numeric %% 4294967296)::int8 = %(xid)s
      AND committed_before > %(lsn)s::pg_lsn
"""
WAL_SKIP_DELIVERED = """
    UPDATE pgturso.skipped_transaction SET delivered_at = now()
    WHERE target = %(target)s AND (txid::text::numeric %% 4294967296)::int8 = %(xid)s
      AND committed_before = %(before)s::pg_lsn AND delivered_at IS NULL
"""
# By the tracked table's oid and the columns' numbers: what a rename of the table or the column leaves alone.
# Every live column: whether it is a stored generated one, and its expression now.
GENERATED_COLUMNS = """
    SELECT a.attnum, a.attname, a.attgenerated = 's', pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.attgenerated = 's'
    WHERE a.attrelid = %(relid)s AND a.attnum > 0 AND NOT a.attisdropped
"""
# The expressions of the generated columns when the layout was made (pgturso._generated_expressions).
LAYOUT_GENERATED = "SELECT generated FROM pgturso.layout WHERE id = %(layout)s"
LIVE_COLUMNS = """
    SELECT a.attnum, a.attname FROM pg_attribute a WHERE a.attrelid = %(relid)s AND a.attnum > 0 AND NOT a.attisdropped
"""
OUTBOX_OID = "SELECT 'pgturso.outbox'::regclass::oid::int8"
RECORD_WAL_BATCH = record_batch_sql("", "DELETE FROM pgturso.outbox WHERE id = ANY (%(ids)s::int8[])", SENT_COUNTS)
NOTHING_REMOVED = Removed(0, 0, 0)
ADVANCE = "SELECT pg_replication_slot_advance(%(slot)s, %(lsn)s::pg_lsn)"
FLUSH_LSN = "SELECT pg_current_wal_flush_lsn()::text"
CURRENT_SNAPSHOT = "SELECT pg_current_snapshot()::text"
# A decoded transaction not yet visible to a new snapshot is waited for this many times (backing off), at most.
VISIBILITY_RETRIES = 200
# Where a stopping worker found nothing more for its target in the slot (WalOutbox.record_caught_up): the snapshot
# first, then the WAL inserted by then (every transaction it shows committed wrote its commit record before it).
CAUGHT_UP_SNAPSHOT = "SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text"
RECORD_CAUGHT_UP = """
    UPDATE pgturso.delivery_state SET caught_up_lsn = %(lsn)s::pg_lsn, caught_up_snapshot = %(snapshot)s::pg_snapshot,
        caught_up_xid = pg_current_xact_id()
    WHERE target = %(target)s
"""
# How long record_caught_up waits for the WAL of asynchronous commits to be flushed (the WAL writer does it
# within a few wal_writer_delay).
CAUGHT_UP_FLUSH_SECONDS = 5.0
# Rows per round of encoding queries, and outbox payload bytes held meanwhile: bound memory, and keep a big
# transaction's statements flowing to Turso.
ENCODE_ROWS = 5000
SLOT_RELEASE_SECONDS = 5.0
ENCODE_BYTES = 4 << 20

_U16 = struct.Struct("!H").unpack_from
_U32 = struct.Struct("!I").unpack_from
_U64 = struct.Struct("!Q").unpack_from


class SlotError(PgTursoError):
    """The slot's stream cannot be applied as it is (a decoded row does not fit its table's layout)."""


def lsn_to_int(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_to_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


@dataclass
class Snapshot:
    """A pg_snapshot (``xmin:xmax:xip,...``), asked whether a committed transaction is visible in it."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def full(self, xid32: int) -> int:
        """The 64-bit xid nearest this snapshot's xmax with these 32 bits (pgoutput's xids are 32-bit)."""
        diff = (xid32 - self.xmax) & 0xFFFFFFFF
        return self.xmax + (diff - (1 << 32) if diff >= 1 << 31 else diff)

    def sees(self, xid32: int) -> bool:
        """Whether this snapshot sees a transaction known to have committed, by its 32-bit xid (pgoutput's)."""
        full = self.full(xid32)
        return full < self.xmin or (full < self.xmax and full not in self.xip)


class NotYetVisible(Exception):
    """A transaction of the batch committed in the WAL but is not yet visible to a new snapshot: try again."""


@dataclass
class Relation:
    """A pgoutput Relation message: a published table's columns as of the changes that follow it."""

    relid: int
    name: str
    columns: list[str]
    # Where each column of a layout is in ``columns`` (WalOutbox.positions), by layout id: looked up per row.
    positions: dict[int, list[int]] = field(default_factory=dict)
    # The layout's generated columns that ``columns`` lacks, computed by the encoding (WalOutbox.positions).
    computed: dict[int, frozenset[str]] = field(default_factory=dict)
    # Layouts whose columns are ``columns`` as they are (no generated column): a decoded row is theirs as is.
    in_order: set[int] = field(default_factory=set)


def _string(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(0, pos)
    return data[pos:end].decode(), end + 1


def parse_relation(data: bytes) -> Relation:
    relid = struct.unpack_from("!I", data, 1)[0]
    namespace, pos = _string(data, 5)
    name, pos = _string(data, pos)
    ncols = struct.unpack_from("!H", data, pos + 1)[0]
    pos += 3
    columns = []
    for _ in range(ncols):
        column, pos = _string(data, pos + 1)  # skip the flags byte
        columns.append(column)
        pos += 8  # type oid, typmod
    return Relation(relid, f"{namespace}.{name}", columns)


def _present(values: list[Any]) -> list[Any]:
    """The values without GENERATED (Postgres computes those)."""
    return values if GENERATED not in values else [v for v in values if v is not GENERATED]


UNCHANGED = object()  # a TOASTed value an UPDATE did not change: pgoutput does not send it
GENERATED = object()  # a stored generated column: pgoutput (Postgres 15) does not send it; Postgres recomputes it


def parse_tuple(data: bytes, pos: int) -> tuple[list[Any], int]:
    """TupleData at ``pos``: the values as text (None for NULL, UNCHANGED for an unchanged TOASTed value),
    followed by GENERATED (where positions() points generated columns); and the position after it."""
    ncols = _U16(data, pos)[0]
    parse = _PARSERS.get(ncols) or _tuple_parser(ncols)
    return parse(data, pos + 2)  # type: ignore[no-any-return]


def _unexpected(kind: int) -> None:
    raise SlotError(f"pgoutput sent a value in an unexpected form ({chr(kind)!r})")


_PARSERS: dict[int, Callable[[bytes, int], tuple[list[Any], int]]] = {}
_VALUE = """
    kind = data[pos]
    if kind == 116:  # 't': a text form, its length first
        end = pos + 5 + U32(data, pos + 1)[0]
        v{n} = data[pos + 5:end].decode()
        pos = end
    elif kind == 110:  # 'n': NULL
        v{n} = None
        pos += 1
    elif kind == 117:  # 'u': unchanged TOASTed value
        v{n} = UNCHANGED
        pos += 1
    else:
        unexpected(kind)"""


def _tuple_parser(ncols: int) -> Callable[[bytes, int], tuple[list[Any], int]]:
    """The values of a TupleData of ``ncols`` columns, parsed by straight-line code made once per column
    count: a loop with an append per value cost half as much again, and parsing is a large share of the
    worker's time per row. (Built from the constant _VALUE only: nothing decoded becomes code.)"""
    if ncols in _PARSERS:
        return _PARSERS[ncols]
    body = "".join(_VALUE.format(n=n) for n in range(ncols))
    source = f"def parse(data, pos):{body}\n    return [{''.join(f'v{n}, ' for n in range(ncols))}GENERATED], pos\n"
    namespace: dict[str, Any] = {"U32": _U32, "UNCHANGED": UNCHANGED, "GENERATED": GENERATED,
                                 "unexpected": _unexpected}
    exec(compile(source, f"<pgoutput tuple of {ncols} columns>", "exec"), namespace)
    parser = _PARSERS[ncols] = namespace["parse"]
    return parser  # type: ignore[no-any-return]


def encode_rows_sql(layout: TableLayout, key_only: bool, generated: dict[str, str] | None = None) -> str:
    """A query turning %(c0)s, %(c1)s, … (one text[] per column, the layout's columns in order: unnest reads
    them in step, in order, where subscripting one flat array would cost a pass per value) into each
    row's JSON array, with capture's own expressions: each text form is read back as the column's type first,
    by built-in input functions only (the worker runs this: no domain CHECK or user cast, docs/security.md).
    ``generated``: stored generated columns (name: expression), which Postgres 15 does not decode: they are
    not in the values but computed from the others, as Postgres computed them."""
    generated = generated or {}
    columns = [c for c in (layout.key_layout if key_only else layout.columns) if c.name not in generated]
    def value(n: int, c: Column) -> str:
        text = f"u.c{n}"
        if not c.trusted:  # encoded from its text form anyway (types.USER_TYPE)
            return text
        return key_from_text_sql(c, text) or f"{text}::{c.pg_type}"  # (a layout from before 0.2.0)

    casts = ", ".join(f"{value(n, c)} AS {quote_ident(c.name)}" for n, c in enumerate(columns))
    arrays = ", ".join(f"%(c{n})s::text[]" for n in range(len(columns)))
    rows = f"SELECT {casts} FROM unnest({arrays}) AS u({', '.join(f'c{n}' for n in range(len(columns)))})"
    computed = [f"({expr})::{layout.column(name).pg_type} AS {quote_ident(name)}" for name, expr in generated.items()
                if key_only is False or name in layout.key_columns]
    if computed:
        rows = f"SELECT s.*, {', '.join(computed)} FROM ({rows}) AS s"
    return f"SELECT {row_json_sql(layout, 'src', key_only=key_only)} FROM ({rows}) AS src"


def rows_from_text(encoders: list[Callable[[str], str]], values: list[str | None], count: int) -> list[str]:
    """Each of the ``count`` rows of ``values`` (text forms, None for NULL, the rows one after the other) as
    capture's JSON array, in Python."""
    width = len(encoders)
    if not width:
        return ["[]"] * count
    columns = [[("null" if v is None else encode(v)) for v in values[n::width]] if encode is not str
               else [("null" if v is None else v) for v in values[n::width]]
               for n, encode in enumerate(encoders)]
    return ["[" + ",".join(row) + "]" for row in zip(*columns, strict=True)]


def text_array_literal(values: list[str | None]) -> str:
    """A text[] literal of ``values`` (None: NULL): every element quoted, backslashes and quotes escaped."""
    return "{" + ",".join("NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                          for v in values) + "}"


@dataclass
class _Run:
    """Consecutive decoded rows of one table and operation, as text values until encoded."""

    layout_id: int
    op: str
    first_txid: int
    computed: frozenset[str] = frozenset()  # generated columns not decoded: computed by the encoding
    route: str | None = None  # a routed row's tenant (the router: WalOutbox.routing)
    values: list[Any] = field(default_factory=list)
    count: int = 0
    last_txid: int = 0
    payload: str = ""
    rows: tuple[str, ...] = ()  # the encoded rows that ``payload`` joins


def _group(runs: list[_Run]) -> dict[tuple[int, bool, frozenset[str]], list[_Run]]:
    groups: dict[tuple[int, bool, frozenset[str]], list[_Run]] = {}
    for run in runs:
        groups.setdefault((run.layout_id, run.op == "D", run.computed), []).append(run)
    return groups


class WalBatch:
    """One peek of the slot, read in the caller's transaction. Iterate ``events()`` once; ``marker()`` is
    complete only after that (the worker writes the marker after the batch's statements)."""

    def __init__(self, source: WalOutbox, upto: int, first_rows: list[bytes], more: Iterator[bytes],
                 limit: int, streamed: bool = False) -> None:
        self.source = source
        self.streamed = streamed  # read from the source's replication stream (else from a peek)
        self.peek_upto = upto
        self._first = first_rows
        self._more = more
        self.limit = limit
        self.received = 0
        self.end = 0  # the last commit's end LSN
        self.event_count = 0
        self.rows = 0
        self.transactions = 0
        self.rows_per_layout: dict[int, int] = {}
        self.outbox_ids: list[int] = []
        self.skipped: dict[tuple[int, int], int] = {}  # (xid, commit LSN) of a skipped transaction: rows dropped
        self.begun: dict[int, int] = {}  # every transaction decoded: xid, commit LSN (WalOutbox.remove_delivered)
        self._skipping: tuple[int, int] | None = None  # the transaction being decoded, if it is skipped
        # The skips known when its decoding began (a new table's layout may reload them mid-batch, too late
        # for transactions decoded before): WalOutbox.skipped_since_read compares with these.
        self.skips_known = dict(source.skips)
        # The target's tables known while it is decoded (at its start, and any loaded meanwhile: a new table's
        # layout): WalOutbox.changed_since_read tells whether untrack_table removed one of them since.
        self.tables_known = source.tables_decoding = source.tables_of_target()
        self.more_pending = False
        self.uniform = False
        self.held: list[str] = []
        self.sent_anything = False
        self.layouts = dict(source.read_layouts if streamed else source.layouts_in_force)
        self._consumed = False
        # Passed to read_past or remove_delivered: the next batch follows it, settled once Turso confirmed it.
        self.removing = False
        self.count_only = False  # count the rows of the batch's row changes, decode none
        # Set once read whole (WalOutbox.chain_of): the position the chain of batches sent on unconfirmed, this
        # one last, goes on from (0: the slot's), and the skipped transactions that chain dropped. In its marker,
        # so that recovery tells a skipped transaction Turso has from one it lacks (WalOutbox.forget).
        self.chain_from = 0
        self.chain_dropped: list[tuple[int, int]] = []

    @property
    def upto(self) -> int:
        """The batch's last position: once read, the peek's end if it read all there was, else its last commit."""
        if not self._consumed:
            for _ in self.events(encode=False):
                pass
        return self.end

    def marker(self) -> str:
        upto = self.upto
        return json.dumps({"slot": self.source.generation, "lsn": lsn_to_text(upto),
                           "layouts": {str(k): v for k, v in sorted(self.layouts.items())},
                           "from": lsn_to_text(self.chain_from),
                           "dropped": [[xid, lsn_to_text(commit)] for xid, commit in self.chain_dropped]},
                          separators=(",", ":"))

    def events(self, encode: bool = True) -> Iterator[Event]:
        """The batch's changes as outbox events, in commit order: decoded rows merged into runs of one table
        and operation, outbox inserts as they were written. Rows are encoded by Postgres ENCODE_ROWS at a
        time, one query per table and form whatever the runs (small transactions make short runs)."""
        source = self.source
        # A stream sends a table's Relation message once (again only after it changed), a peek in each batch.
        relations: dict[int, Relation] = source.relations if self.streamed else {}
        pending: list[Event | _Run] = []  # in commit order; runs still to be encoded
        current: _Run | None = None
        by_route: dict[str | None, _Run] = {}  # the router's current run of each tenant (add())
        pending_rows = pending_bytes = 0
        xid = 0

        def drain() -> Iterator[Event]:
            nonlocal current, pending_rows, pending_bytes
            current = None
            by_route.clear()
            runs = [item for item in pending if isinstance(item, _Run)]
            if encode:
                for (layout_id, key_only, computed), group in _group(runs).items():
                    values = [v for run in group for v in run.values]
                    encoded = iter(source.encode(layout_id, key_only, values, sum(r.count for r in group),
                                                 computed))
                    del values
                    for run in group:
                        # The rows are kept apart too (Event.rows); their text values are no longer needed.
                        run.rows = tuple(next(encoded) for _ in range(run.count))
                        run.payload, run.values = ",".join(run.rows), []
            for item in pending:
                if isinstance(item, _Run):
                    self.rows += item.count
                    self.rows_per_layout[item.layout_id] = self.rows_per_layout.get(item.layout_id, 0) + item.count
                    first, last = item.first_txid, item.last_txid
                    yield Event(0, first, item.layout_id, item.op, item.count, item.payload,
                                (first,) if first == last else (first, last), item.count, item.route, item.rows)
                else:
                    yield item
            pending.clear()
            pending_rows = pending_bytes = 0

        def add(layout_id: int, op: str, values: list[Any], computed: frozenset[str], route: str | None = None,
                ) -> bool:
            """Add a row's values (GENERATED left out) to the current run; True when the pending rows are due
            for encoding (drain()).

            The router's runs hold one tenant's rows (``route``), and each tenant has a current run of its own:
            rows of tenants that interleave (a statement writing many tenants) still make few, large events,
            in order for each tenant (the order across tenants, different databases, is nobody's to see). A
            reference table's runs hold one transaction's rows (each tenant's copy of a change is routed by its
            transaction's visibility: router.py)."""
            nonlocal current, pending_rows
            if routing:
                current = by_route.get(route)
            if (current is None or current.layout_id != layout_id or current.op != op
                    or current.computed is not computed
                    or (routing and route is None and current.first_txid != xid)):
                current = _Run(layout_id, op, xid, computed, route)
                pending.append(current)
                if routing:
                    by_route[route] = current
            current.values.extend(values)
            current.count += 1
            current.last_txid = xid
            pending_rows += 1
            return pending_rows >= ENCODE_ROWS

        def ready(item: Event) -> Iterator[Event]:
            nonlocal current, pending_bytes
            current = None
            by_route.clear()  # (an outbox event between a tenant's rows: later rows go after it)
            pending.append(item)
            pending_bytes += len(item.payload or "")
            if pending_bytes >= ENCODE_BYTES:
                yield from drain()

        received = 0
        begun = self.begun
        outbox_oid = source.outbox_oid
        layouts = self.layouts
        routing = source.routing
        u32, u64 = _U32, _U64
        # The Inserts of a table whose decoded rows join a run as they are (its layout's columns in order, nothing
        # skipped, counted or routed), by relid: (layout id, the tuple's parser, computed columns). What decides
        # that is only looked up again after what could change it: a Relation message, an outbox event (a new
        # layout), a skipped transaction. Most of a drain's messages take this path or the two above it.
        plain: dict[int, tuple[int, Callable[[bytes, int], tuple[list[Any], int]], frozenset[str]]] = {}
        for data in chain(self._first, self._more):
            received += 1
            kind = data[0]
            # (Literals, not pgoutput's BEGIN…: a global's lookup per message counts at ~100k messages/s.)
            if kind == 66:  # Begin
                xid = u32(data, 17)[0]
                begun[xid] = u64(data, 1)[0]
                self._skipping = source.skip_of(xid, begun[xid]) if source.skips else None
                if self._skipping is not None:
                    plain.clear()
            elif kind == 67:  # Commit
                self.end = u64(data, 10)[0]
                self.transactions += 1
            elif kind == 73 and (fast := plain.get(u32(data, 1)[0])) is not None:
                self.event_count += 1
                if add(fast[0], "U", fast[1](data, 8)[0][:-1], fast[2]):  # (8: past the tuple's column count)
                    yield from drain()
            elif kind == RELATION:
                relation = parse_relation(data)
                relations[relation.relid] = relation
                plain.clear()
            elif kind == 73 or kind == 85 or kind == 68:  # Insert, Update, Delete
                relid = _U32(data, 1)[0]
                relation = relations[relid]
                if kind == 73:  # an Insert (the common case: parsed here)
                    old, new, old_full = None, parse_tuple(data, 6)[0], False
                else:
                    old, new, old_full = self._tuples(data)
                if relid == outbox_oid:
                    plain.clear()
                    if new is None:
                        continue
                    item = self._outbox_event(relation, new, xid)
                    if item is not None:
                        self.event_count += 1
                        if item.op in "UD":
                            self.rows += item.nrows
                            self.rows_per_layout[item.layout_id] = (
                                self.rows_per_layout.get(item.layout_id, 0) + item.nrows)
                        yield from ready(item)
                    continue
                layout_id = layouts.get(source.table_of_relid.get(relid))  # type: ignore[arg-type]
                if layout_id is None:
                    continue  # not this target's, or changed before the table's creation event
                if self._skipping is not None:  # pgturso.skip_transaction: its row changes are dropped
                    self.skipped[self._skipping] = self.skipped.get(self._skipping, 0) + 1
                    continue
                if self.count_only:  # recovery: how many rows, not their values (see WalOutbox.forget)
                    self.event_count += 1
                    self.rows += 1
                    self.rows_per_layout[layout_id] = self.rows_per_layout.get(layout_id, 0) + 1
                    continue
                positions = relation.positions.get(layout_id)
                if positions is None:
                    positions, relation.computed[layout_id] = source.positions(relation, layout_id)
                    relation.positions[layout_id] = positions
                    if positions == list(range(len(relation.columns))):
                        relation.in_order.add(layout_id)  # the layout's columns, no generated one: as decoded
                computed = relation.computed[layout_id]
                self.event_count += 1
                if routing:
                    yield from self._routed_change(kind, layout_id, relation, positions, computed, new, old, add,
                                                   drain)
                    continue
                if kind == 73:  # an Insert (no old tuple, no unchanged value): the common case, kept short
                    if layout_id in relation.in_order:
                        if _U16(data, 6)[0] == len(relation.columns):  # (as pgoutput writes them)
                            plain[relid] = (layout_id, _tuple_parser(len(relation.columns)), computed)
                        if add(layout_id, "U", new[:-1], computed):
                            yield from drain()
                    elif add(layout_id, "U", _present([new[p] for p in positions]), computed):
                        yield from drain()
                    continue
                layout = source.layout(layout_id)
                row = None if new is None else [new[p] for p in positions]
                if row is not None and old_full:
                    row = [old[p] if v is UNCHANGED else v for v, p in zip(row, positions, strict=True)]
                old_key = None if old is None else [old[positions[k]] for k in layout.key_positions]
                if row is not None and UNCHANGED in row:  # (values are str or None: no __eq__ surprises)
                    # An UPDATE that left a large value alone: pgoutput does not send it; set the others only.
                    key = old_key or [row[k] for k in layout.key_positions]
                    yield from ready(self._partial_update(layout_id, row, key, xid, encode, computed))
                    continue
                if old_key is not None:
                    new_key = None if row is None else [row[k] for k in layout.key_positions]
                    if new_key != old_key and add(layout_id, "D", _present(old_key), computed):
                        yield from drain()
                if row is not None and add(layout_id, "U", _present(row), computed):
                    yield from drain()
            elif kind == TRUNCATE:
                continue  # not published: TRUNCATE reaches Turso through the outbox, like in trigger mode
        yield from drain()
        self.received += received
        self._consumed = True
        self.chain_from, self.chain_dropped = source.chain_of(self)
        if self.streamed:  # the stream's next batch goes on from here (WalOutbox.choose_batch); more_pending
            source.read_layouts = self.layouts  # was set if the batch stopped at its limit
            return
        self.more_pending = self.received >= self.limit
        if not self.more_pending:
            self.end = max(self.end, self.peek_upto)

    def _partial_update(self, layout_id: int, row: list[Any], key: list[Any], xid: int, encode: bool,
                        computed: frozenset[str]) -> Event:
        present = [i for i, v in enumerate(row) if v is not UNCHANGED and v is not GENERATED]
        values = [None if v is UNCHANGED else v for v in row if v is not GENERATED]
        encoded_row = self.source.encode(layout_id, False, values, 1, computed)[0] if encode else "[]"
        encoded_key = self.source.encode(layout_id, True, key, 1, computed)[0] if encode else "[]"
        self.rows += 1
        self.rows_per_layout[layout_id] = self.rows_per_layout.get(layout_id, 0) + 1
        payload = f'{{"c":{json.dumps(present)},"r":{encoded_row},"k":{encoded_key}}}'
        return Event(0, xid, layout_id, "P", 1, payload)

    def _tuples(self, data: bytes) -> tuple[list[Any] | None, list[Any] | None, bool]:
        """The old (key or, with replica identity FULL, whole) and new tuple of an Insert, Update or Delete
        message, each followed by GENERATED (where positions() points generated columns); and whether the old
        tuple is whole."""
        kind, pos = data[0], 5
        old = new = None
        full = data[pos] == 79  # 'O'
        if kind == INSERT:
            new, _ = parse_tuple(data, pos + 1)
        elif kind == DELETE:
            old, _ = parse_tuple(data, pos + 1)
        else:
            if data[pos] in (75, 79):  # 'K' or 'O'
                old, pos = parse_tuple(data, pos + 1)
            new, _ = parse_tuple(data, pos + 1)
        return old, new, full and old is not None

    def _outbox_event(self, relation: Relation, values: list[Any], xid: int) -> Event | None:
        row = dict(zip(relation.columns, values[:len(relation.columns)], strict=True))
        if row.get("tenant") is not None:
            return None  # a trigger-captured pattern's, or the router's own (already routed)
        layout_id = int(row["layout_id"])
        table_id = self.source.table_of_layout_id(layout_id)
        if table_id is None:
            # Its layout may be new in this very transaction (a DDL, a track_table): decoded (its commit record
            # is flushed) a moment before it is visible, and a READ COMMITTED read misses the layout until then.
            self.source.await_visible(xid)
            table_id = self.source.table_of_layout_id(layout_id)
        if table_id is None:
            return None  # the table was untracked since: its events went with it, as in trigger mode
        if self.source.target_of_table.get(table_id) != self.source.target:
            return None  # another target's: its own worker deletes it
        self.outbox_ids.append(int(row["id"]))
        op = str(row["op"])
        if op in "CA":
            self.layouts[table_id] = layout_id
        elif op == "X":
            self.layouts.pop(table_id, None)
        elif table_id not in self.layouts:
            return None  # an event of a table whose creation event came before this slot: superseded by a re-copy
        elif self._skipping is not None and op in "UDTP":
            self.skipped[self._skipping] = self.skipped.get(self._skipping, 0) + int(row["nrows"])
            return None  # a row change of a transaction skip_transaction dropped (its schema changes stay)
        return Event(int(row["id"]), xid, layout_id, op, int(row["nrows"]), row["payload"], tenant=row.get("route"))

    def _routed_change(self, kind: int, layout_id: int, relation: Relation, positions: list[int],
                       computed: frozenset[str], new: list[Any] | None, old: list[Any] | None,
                       add: Callable[..., bool], drain: Callable[[], Iterator[Event]]) -> Iterator[Event]:
        """A row change of a wal pattern's table, for its router: the tenant of each row (its route column's
        text; None for a reference table). The pattern's tables have replica identity FULL, so an UPDATE or
        DELETE carries the whole old row: a row whose tenant changed (a move) is deleted in the old tenant's
        database, then upserted in the new one's."""
        source = self.source
        route_at = source.route_position(layout_id)
        layout = source.layout(layout_id)
        row = None if new is None else [new[p] for p in positions]
        old_row = None if old is None else [old[p] for p in positions]
        if row is not None and old_row is not None:
            row = [o if v is UNCHANGED else v for v, o in zip(row, old_row, strict=True)]
        if row is not None and UNCHANGED in row:
            raise SlotError(f"{layout.source_table}: an UPDATE left a large value unsent although the table's replica "
                            f"identity should be FULL; run ALTER TABLE {layout.source_table} REPLICA IDENTITY FULL")
        new_route = None if row is None or route_at is None else row[route_at]
        if old_row is not None:
            old_route = None if route_at is None else old_row[route_at]
            old_key = [old_row[k] for k in layout.key_positions]
            new_key = None if row is None else [row[k] for k in layout.key_positions]
            if (new_key != old_key or old_route != new_route) and add(layout_id, "D", _present(old_key), computed,
                                                                      old_route):
                yield from drain()
        if row is not None and add(layout_id, "U", _present(row), computed, new_route):
            yield from drain()


class WalOutbox(Outbox):
    """The worker's source for a wal target: batches from the slot instead of the outbox table."""

    def __init__(self, conn: psycopg.Connection[Any], *, dsn: str | None = None, **kwargs: Any) -> None:
        super().__init__(conn, **kwargs)
        self.slot = ""
        self.generation = 0
        self.outbox_oid = 0
        # Reading over the replication protocol (``dsn``: a worker process) or by peeks (pgturso.sync(), inside
        # a backend, and recovery): see replication.py and docs/design.md.
        self.dsn = dsn
        self.stream: ReplicationStream | None = None
        self._lookahead: bytes | None = None  # a message read while waiting, not yet part of a batch
        self._unsettled: list[WalBatch] = []  # streamed batches handed out, not yet confirmed by Turso
        self._confirmed = 0  # where the next stream starts: the last position confirmed (0: the slot's)
        self._read_end = 0  # the end of the last transaction read from the stream
        self.relations: dict[int, Relation] = {}  # the stream's Relation messages so far
        self.layouts_in_force: dict[int, int] = {}  # as of the last batch Turso confirmed
        self.read_layouts: dict[int, int] = {}  # as of the last batch read from the stream
        self.seen_upto = 0  # where the last peek read up to
        self.slot_missing = False
        self.table_of_relid: dict[int, int] = {}
        self.target_of_table: dict[int, str] = {}
        self.tables_decoding: set[int] = set()  # WalBatch.tables_known of the batch decoded last
        self.skips: dict[int, int] = {}  # xid of a skipped transaction: the WAL position it committed before
        # While forget() decodes what Turso committed: the marker's chain, which tells the skipped transactions
        # the worker that sent it dropped from those it sent (a skip it learnt of too late: Turso has them).
        self._recovering: _SentChain | None = None
        self.routing = False  # a wal pattern's router reads this slot: rows carry their tenant (router.py)
        self._positions: dict[tuple[int, int, tuple[str, ...]], list[int]] = {}
        self._encoders: dict[tuple[int, bool, frozenset[str]], str | list[Callable[[str], str]]] = {}
        self._generated: dict[int, dict[str, str]] = {}
        # Text forms from pgoutput, and their encoding, as capture's; and capture's search_path, so that no
        # function of a schema another role may create in is picked up by the encoding (docs/security.md).
        for clause in CAPTURE_SETTINGS:
            name, value = clause.removeprefix("SET ").split(" = ")
            conn.execute(f"SET {name} = {value}")
        self._require_replication_attribute()
        # Every transaction of a wal target reads in READ COMMITTED: each statement sees the layouts that the
        # transactions decoded so far created (a snapshot taken earlier would not).
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        self.outbox_oid = int(conn.execute(OUTBOX_OID).fetchone()[0])  # type: ignore[index]
        self.slot_state()

    def _require_replication_attribute(self) -> None:
        """Reading and advancing a slot takes the REPLICATION attribute (or superuser), which grant_worker does
        not give (a role attribute: only a superuser can set it, and pgturso gives no role a right): say so at
        start, with the command, instead of failing at the first peek."""
        row = self.conn.execute("SELECT current_user, rolsuper OR rolreplication FROM pg_roles "
                                "WHERE rolname = current_user").fetchone()
        if row is not None and not row[1]:
            role = str(row[0])
            raise ConfigError(
                f"target {self.target!r} captures from the WAL (capture => 'wal'), and reading its replication slot "
                f"needs the REPLICATION attribute, which the worker's role {role} lacks; a superuser gives it with: "
                f"ALTER ROLE {quote_ident(role)} REPLICATION "
                f"(besides SELECT pgturso.grant_worker({quote_literal(role)}))")

    # -- slot state and recovery -----------------------------------------------------------------------------

    def slot_state(self) -> tuple[str, int, str | None, bool, str, str | None]:
        with self.conn.transaction():
            row = self.conn.execute(SLOT_OF_TARGET, {"target": self.target}).fetchone()
        assert row is not None
        self.slot, self.generation = str(row[0]), int(row[1])
        return row  # type: ignore[return-value]

    def forget(self, marker: str) -> Removed:
        """Recover from the target's progress marker: rebuild a lost slot, or move the slot up to what Turso
        already has, deleting the outbox rows that came with it and counting what Turso has as delivered (the
        worker that sent it died before it counted). Returns what was removed and counted."""
        self.close_stream()  # the peeks below need the slot, and the stream restarts from where it is then
        self._confirmed = 0
        _, generation, rebuilding, exists, status, confirmed = self.slot_state()
        self.slot_missing = not exists
        if not exists and not rebuilding and not self._has_tables():
            return NOTHING_REMOVED  # nothing tracked: no slot wanted (track_table makes one for the first table)
        if rebuilding or not exists or status == "lost":
            self.rebuild_slot(rebuilding or ("invalidated (max_slot_wal_keep_size)" if exists else
                                             "missing (a failover, or dropped by hand)"))
            return NOTHING_REMOVED
        parsed = _parse_marker(marker)
        if parsed is None or parsed["slot"] != generation:
            self.layouts_in_force = {}
            if self._delivered_before():
                # Tables whose creation event was delivered, and no marker of this slot on the target: a new or
                # replaced Turso database. Their changes would be skipped (no layout to decode them with).
                self.rebuild_slot("not matched by the target's progress marker (a new or replaced Turso database)")
            return NOTHING_REMOVED
        self.layouts_in_force = {int(k): int(v) for k, v in parsed["layouts"].items()}
        position = lsn_to_int(parsed["lsn"])
        if confirmed is None or position <= lsn_to_int(confirmed):
            return NOTHING_REMOVED
        # Turso has batches the slot was not advanced past: forget their outbox rows and count them, then move
        # the slot. The layouts in force are the marker's (after the batches): their rows are counted, not
        # decoded (a key-changing UPDATE counts one row here, two when delivered).
        removed = NOTHING_REMOVED
        self._recovering = None if self.routing else _SentChain.of_marker(parsed)
        try:
            with self.conn.transaction():
                self.conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                batch = self._peek(position, 0)
                if batch is not None:
                    batch.count_only = True
                    for _ in batch.events(encode=False):
                        pass
                    removed = self.remove_delivered(batch)
                    self._note_skips_sent(batch)
        finally:
            self._recovering = None
        self.advance(position)
        return removed

    def _note_skips_sent(self, batch: WalBatch) -> None:
        """Recovery (forget): the skipped transactions of ``batch`` (what Turso committed) that the worker which
        sent it did not drop (its skip came too late for it: the marker's chain does not list them) are on
        Turso; their records say so (delivered_at), as a trigger target's recovery does (Outbox.forget)."""
        chain = self._recovering
        if chain is None:
            return
        for xid, before in self.skips.items():
            commit = batch.begun.get(xid)
            if commit is not None and commit < before and chain.sent(xid, commit):
                self.conn.execute(WAL_SKIP_DELIVERED,
                                  {"target": self.target, "xid": xid, "before": lsn_to_text(before)})
                event(log, logging.WARNING, "skipped_but_delivered", target=self.target, xid=xid,
                      reason="skip_transaction ran while the batch carrying it was on its way to Turso (recovered "
                             "by the target's progress marker)")

    def _delivered_before(self) -> bool:
        """Whether a table of this target has no creation event pending (the stream has no 'C' for it ahead)."""
        with self.conn.transaction():
            row = self.conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target = %s AND t.dropped_at IS NULL "
                "AND NOT EXISTS (SELECT 1 FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id "
                "WHERE l.table_id = t.id AND o.op = 'C'))", (self.target,)).fetchone()
        return bool(row and row[0])

    def _has_tables(self) -> bool:
        with self.conn.transaction():
            row = self.conn.execute("SELECT EXISTS (SELECT 1 FROM pgturso.tracked_table WHERE target = %s)",
                                    (self.target,)).fetchone()
        return bool(row and row[0])

    def rebuild_slot(self, reason: str) -> None:
        """Replace a lost slot and copy the target's tables afresh through the new one (each is recreated on
        Turso first, in order with the changes around it, so nothing is doubled)."""
        event(log, logging.WARNING, "slot_lost", slot=self.slot, reason=reason, action="recreating it and re-copying")
        with self.conn.transaction():
            self.conn.execute("UPDATE pgturso.target SET slot_rebuild = %s WHERE name = %s", (reason, self.target))
        self.conn.execute("SELECT pgturso._drop_slot(%s)", (self.target,))
        self.conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot,))
        with self.conn.transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            tables = self.conn.execute(
                "SELECT relid::regclass::text FROM pgturso.tracked_table WHERE target = %s AND dropped_at IS NULL "
                "ORDER BY id", (self.target,)).fetchall()
            # Events queued before the new slot are delivered or superseded by the copies below.
            dropped = self.conn.execute(
                "DELETE FROM pgturso.outbox o USING pgturso.layout l, pgturso.tracked_table t "
                "WHERE l.id = o.layout_id AND t.id = l.table_id AND t.target = %s", (self.target,)).rowcount
            note_outbox_deletion(self.conn, "rebuild_slot", dropped)
            # The same tables, resynced as the extension owner: a worker role without superuser may not lock them.
            self.conn.execute("SELECT pgturso._resync_target(%s)", (self.target,))
            self.conn.execute("UPDATE pgturso.target SET slot_generation = slot_generation + 1, slot_rebuild = NULL "
                              "WHERE name = %s", (self.target,))
            self.record_error("delivering", f"replication slot {self.slot} was {reason}: recreated it; re-copying "
                              f"{', '.join(t for (t,) in tables) or 'no tables'}")
        self.generation += 1
        self.layouts_in_force = {}
        self.slot_missing = False

    def advance(self, position: int) -> None:
        confirmed = self.conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                                      (self.slot,)).fetchone()
        if confirmed is not None and confirmed[0] is not None and lsn_to_int(confirmed[0]) >= position:
            return
        self.conn.execute(ADVANCE, {"slot": self.slot, "lsn": lsn_to_text(position)})

    # -- batches ---------------------------------------------------------------------------------------------

    def choose_batch(self, single_transaction: bool = False) -> WalBatch | None:  # type: ignore[override]
        """The next batch, read in the caller's transaction (READ COMMITTED: every layout a decoded transaction
        created is visible); None when the slot has nothing for this target."""
        if self.slot_missing:  # no table was tracked: has track_table made the slot since?
            row = self.conn.execute(SLOT_OF_TARGET, {"target": self.target}).fetchone()
            if row is None or not row[3]:
                return None
            self.slot_missing, self.generation, self.layouts_in_force = False, int(row[1]), {}
        limit = 1 if single_transaction else self.batch_rows
        if self.dsn is not None:
            return self._stream_batch(limit)
        upto = lsn_to_int(str(self.conn.execute(FLUSH_LSN).fetchone()[0]))  # type: ignore[index]
        batch = self._peek(upto, limit)
        self.seen_upto = upto
        if batch is None:
            self.advance(upto)  # nothing published up to here: let the slot release that WAL
        return batch

    # -- the replication stream ------------------------------------------------------------------------------

    def _stream_batch(self, limit: int) -> WalBatch | None:
        """Whole transactions from the stream: up to ``limit`` messages, or what had arrived when a transaction
        ended. The stream goes on from the last batch handed out only while every batch before was read
        whole and is being removed as delivered; else (a batch Turso refused, one too large to read ahead, a
        failure) it restarts where Turso's confirmed position is, and the same transactions come again."""
        if any(not (b._consumed and b.removing) for b in self._unsettled):
            self.close_stream()
        stream = self._open_stream()
        # Everything flushed now is in this batch (up to ``limit``): wait for the walsender to have decoded that
        # far (it says so in a keepalive) rather than end the batch at the first pause of the stream.
        flushed = lsn_to_int(str(self.conn.execute(FLUSH_LSN).fetchone()[0]))  # type: ignore[index]
        first = self._lookahead or self._next_message(stream, flushed)
        self._lookahead = None
        if first is None:
            if not self._unsettled:
                stream.confirm(stream.idle_end)  # nothing for us up to there: let the slot release that WAL
            return None
        self._load_tables()
        batch = WalBatch(self, 0, [], iter(()), limit, streamed=True)
        batch._more = self._stream_messages(batch, stream, first, limit, flushed)
        self._unsettled.append(batch)
        return batch

    def _next_message(self, stream: ReplicationStream, flushed: int) -> bytes | None:
        """The next message between transactions: None once the stream has passed ``flushed`` without one."""
        message = stream.read(0)
        while message is None and max(stream.idle_end, stream.flushed, self._read_end) < flushed:
            message = stream.read(1.0)
        return message

    def _stream_messages(self, batch: WalBatch, stream: ReplicationStream, first: bytes, limit: int,
                         flushed: int) -> Iterator[bytes]:
        message: bytes | None = first
        changes = 0  # row changes and outbox events: batch_rows counts rows, not Begin/Commit/Relation messages
        read, read_after, get_copy_data = stream.read, stream.read_after, stream.pgconn.get_copy_data
        while message is not None:
            yield message
            kind = message[0]
            if kind != 67:  # not a Commit (a literal: see WalBatch.events)
                if kind == 73 or kind == 85 or kind == 68:  # Insert, Update, Delete
                    changes += 1
                # The rest of a transaction is coming (pgoutput sends it whole): stream.read(None), its common
                # case inlined.
                size, data = get_copy_data(1)
                if size > 0 and data[0] == 119:  # XLogData: the message after its 25 bytes of header
                    message = data[25:] if data[25] == 67 else bytes(data[25:])  # (a Commit is only read from)
                else:
                    message = read_after(size, data, None)
                continue
            self._read_end = _U64(message, 10)[0]
            if changes >= limit:
                batch.more_pending = True
                return
            message = read(0) or self._next_message(stream, flushed)

    def _open_stream(self) -> ReplicationStream:
        if self.stream is None:
            # At the last position Turso confirmed (0 after a recovery: the slot's, which recovery set).
            self.stream = ReplicationStream(self.dsn or "", self.slot, PUBLICATIONS, self._confirmed)
            self.read_layouts = dict(self.layouts_in_force)
            self._read_end = self._confirmed
            self.relations = {}
        return self.stream

    def wait_for_data(self, timeout: float, also: int | None = None) -> bool:
        """Wait up to ``timeout`` seconds for a change on the stream (True), or for ``also`` (a socket) to be
        readable (False, as on a timeout). While idle, confirm the positions the server reports as decoded
        with nothing for us, so that the slot does not retain WAL that does not concern it."""
        stream = self._open_stream()
        deadline = time.monotonic() + timeout
        while True:
            self._lookahead = self._lookahead or stream.read(0)
            if self._lookahead is not None:
                return True
            if not self._unsettled:
                stream.confirm(stream.idle_end)
            wait = deadline - time.monotonic()
            if wait <= 0:
                return False
            ready, _, _ = select.select([stream.fileno()] + ([also] if also is not None else []), [], [], wait)
            if also in ready:
                return False
            if ready:
                stream.pgconn.consume_input()

    def close_stream(self) -> None:
        """End the replication stream (recovery, and before the slot is peeked, advanced or dropped); the next
        batch opens one at the last confirmed position, with the layouts in force there."""
        if self.stream is not None:
            self._confirmed = self.stream.flushed
            walsender = self.stream.conn.info.backend_pid
            self.stream.close()
            self.stream = None
            self._wait_for_walsender_exit(walsender)
        self._lookahead = None
        self._unsettled.clear()

    def _peek(self, upto: int, changes: int) -> WalBatch | None:
        self._load_tables()
        cur = self.conn.cursor(name="pgturso_slot")
        cur.itersize = 2000
        try:
            cur.execute(PEEK, {"slot": self.slot, "upto": lsn_to_text(upto), "changes": changes or None})
        except (psycopg.errors.UndefinedObject, psycopg.errors.ObjectNotInPrerequisiteState) as exc:
            # The slot was dropped or invalidated under the worker: reconnect and recover (forget()).
            raise psycopg.OperationalError(f"replication slot {self.slot}: {str(exc).strip()}") from exc
        first = [bytes(r[0]) for r in cur.fetchmany(cur.itersize)]
        if not first:
            cur.close()
            return None
        more = (bytes(r[0]) for r in cur)
        return WalBatch(self, upto, first, more, changes or 1 << 62)

    def _load_tables(self) -> None:
        rows = self.conn.execute(TABLES).fetchall()
        self.table_of_relid = {int(relid): int(table_id) for table_id, relid, _ in rows}
        self.target_of_table = {int(table_id): str(target) for table_id, _, target in rows}
        self.tables_decoding.update(self.tables_of_target())  # (the batch being decoded: WalBatch.tables_known)
        skips = self.conn.execute(SKIPPED, {"target": self.target, "slot": self.slot}).fetchall()
        self.skips = {int(xid): lsn_to_int(str(before)) for xid, before in skips}

    def changed_since_read(self, batch: WalBatch) -> bool:
        """Whether ``batch`` (read ahead, or held to be sent on from the stream) may carry what must not be sent
        now: a transaction skip_transaction dropped for this target since the batch began to be decoded, or
        changes of a table untrack_table removed since (decoded while it was tracked, or, for a held batch, still
        to be decoded as if it were). Dropped unsent, it is decoded again from the confirmed position by the
        next choose_batch, the skip applied and the untracked table's changes left out (both are rare: any new
        one will do)."""
        skips = self.conn.execute(SKIPPED, {"target": self.target, "slot": self.slot}).fetchall()
        if any(batch.skips_known.get(int(xid)) != lsn_to_int(str(before)) for xid, before in skips):
            return True
        if not batch.tables_known:
            return False
        row = self.conn.execute(TABLES_LEFT, {"tables": sorted(batch.tables_known)}).fetchone()
        return row is None or int(row[0]) != len(batch.tables_known)

    def tables_of_target(self) -> set[int]:
        """The ids of this target's tracked tables, as last loaded."""
        return {table_id for table_id, target in self.target_of_table.items() if target == self.target}

    def skip_of(self, xid: int, commit_lsn: int) -> tuple[int, int] | None:
        """(xid, commit LSN) if pgturso.skip_transaction dropped this transaction for the target, else None."""
        before = self.skips.get(xid)
        if before is None or commit_lsn >= before:
            return None
        if self._recovering is not None and self._recovering.sent(xid, commit_lsn):
            return None  # recovery: the batch Turso committed carried it (counted delivered; _note_skips_sent)
        return (xid, commit_lsn)

    def chain_of(self, batch: WalBatch) -> tuple[int, list[tuple[int, int]]]:
        """For ``batch``'s marker, once it was read whole: where the chain of batches handed out and not yet
        confirmed by Turso, ``batch`` last, goes on from (0: the slot's position), and the skipped transactions
        (xid, commit LSN) that chain dropped. Every transaction after that position up to ``batch``'s end that
        the chain decoded and is not listed was sent. A peek's batch is its own chain (the slot is advanced
        past each before the next is read)."""
        if not batch.streamed or batch not in self._unsettled:
            return 0, sorted(batch.skipped)
        chain = self._unsettled[:self._unsettled.index(batch) + 1]
        return self._confirmed, sorted({key for b in chain for key in b.skipped})

    def await_visible(self, xid: int) -> None:
        """Wait until a new snapshot sees decoded transaction ``xid`` (pgoutput's 32 bits). Its commit record is
        flushed, and so decoded, before the committing backend leaves the proc array (after XLogFlush and any
        synchronous replication wait): until then this connection's READ COMMITTED reads miss the layouts and
        tables it created, and its events would be taken for those of a table untracked since (dropped)."""
        for attempt in range(VISIBILITY_RETRIES):
            if Snapshot.parse(str(self.conn.execute(CURRENT_SNAPSHOT).fetchone()[0])).sees(xid):  # type: ignore[index]
                return
            time.sleep(min(0.005 * (attempt + 1), 0.5))
        raise NotYetVisible(f"{self.target}: transaction {xid} is committed in the WAL but still not visible "
                            "(a synchronous standby that does not answer?)")

    def table_of_layout_id(self, layout_id: int) -> int | None:
        if layout_id not in self._table_of_layout:
            row = self.conn.execute("SELECT spec, table_id FROM pgturso.layout WHERE id = %s", (layout_id,)).fetchone()
            if row is None:
                return None
            self._layouts[layout_id] = TableLayout.from_spec(row[0])
            self._table_of_layout[layout_id] = int(row[1])
            if int(row[1]) not in self.target_of_table:
                self._load_tables()
        return self._table_of_layout[layout_id]

    def positions(self, relation: Relation, layout_id: int) -> tuple[list[int], frozenset[str]]:
        """Where each of the layout's columns is in the decoded relation's columns, and the generated columns
        it does not have (computed by the encoding). A generated column that the relation has is one ALTER
        COLUMN ... DROP EXPRESSION made ordinary since the layout was made: its value is the one sent."""
        key = (relation.relid, layout_id, tuple(relation.columns))
        found = self._positions.get(key)
        if found is None:
            layout = self.layout(layout_id)
            index = {name: i for i, name in enumerate(relation.columns)}
            computed = {name for name in self.generated(layout_id) if name not in index}
            index.update((name, len(relation.columns)) for name in computed)
            missing = [c.name for c in layout.columns if c.name not in index]
            if missing and self._dropped_since(relation.relid, layout, missing):
                # Generated columns (pgoutput does not send them) that were dropped since these rows were written
                # (DROP COLUMN, or DROP ... CASCADE of what they used): their expression is gone with them. The
                # schema change that dropped them follows in the stream and drops them on Turso, so their value
                # there is never read: NULL.
                event(log, logging.WARNING, "generated_column_gone", table=layout.source_table,
                      columns=",".join(missing), sent="NULL until the column's drop, which follows")
                self._generated[layout_id].update((name, "NULL") for name in missing)
                self._encoders = {k: v for k, v in self._encoders.items() if k[0] != layout_id}
                index.update((name, len(relation.columns)) for name in missing)
                computed.update(missing)
                missing = []
            if missing:
                raise SlotError(
                    f"{layout.source_table}: the decoded rows have no column(s) {', '.join(missing)} of its layout "
                    f"{layout_id} (columns {', '.join(relation.columns)}); resync the table "
                    f"(SELECT pgturso.resync_table('{layout.source_table}')) or track it with capture => 'trigger'")
            found = self._positions[key] = ([index[c.name] for c in layout.columns], frozenset(computed))
        return found

    def _relid_of_layout(self, layout_id: int) -> int | None:
        table_id = self.table_of_layout_id(layout_id)
        return next((relid for relid, table in self.table_of_relid.items() if table == table_id), None)

    def generated(self, layout_id: int) -> dict[str, str]:
        """The stored generated columns of a layout (the layout's name: expression), which pgoutput does not
        send: the expression kept with the layout (in the layout's column names, and still there after ALTER
        COLUMN ... DROP EXPRESSION), else the catalog's (a layout made before pgturso kept them). A column is
        found by number, so a renamed column or table is still found; a dropped one is left out (positions())."""
        if layout_id not in self._generated:
            layout = self.layout(layout_id)
            relid = self._relid_of_layout(layout_id)
            rows = self.conn.execute(GENERATED_COLUMNS, {"relid": relid}).fetchall() if relid else []
            kept = self.conn.execute(LAYOUT_GENERATED, {"layout": layout_id}).fetchone()
            kept_expr: dict[str, str] = (kept[0] if kept else None) or {}
            by_attnum = {int(attnum): (bool(gen), expr) for attnum, _, gen, expr in rows}
            by_name = {str(name): (bool(gen), expr) for _, name, gen, expr in rows}
            found = {}
            for c in layout.columns:
                live = by_attnum.get(c.attnum) if c.attnum else by_name.get(c.name)
                if live is None:
                    continue  # dropped since
                expr = kept_expr.get(c.name) or (live[1] if live[0] else None)
                if expr is not None:
                    found[c.name] = str(expr)
            self._generated[layout_id] = found
        return self._generated[layout_id]

    def _dropped_since(self, relid: int, layout: TableLayout, names: list[str]) -> bool:
        """Whether every one of the layout's columns ``names`` is gone from its table (or the table is)."""
        live = self.conn.execute(LIVE_COLUMNS, {"relid": relid}).fetchall()
        attnums, live_names = {int(a) for a, _ in live}, {str(n) for _, n in live}
        columns = [layout.column(name) for name in names]
        return all((c.attnum not in attnums) if c.attnum else (c.name not in live_names) for c in columns)

    def route_position(self, layout_id: int) -> int | None:
        """Where a routed layout's route column is among its columns; None for a reference table."""
        layout = self.layout(layout_id)
        return [c.name for c in layout.columns].index(layout.route_by) if layout.route_by else None

    def encode(self, layout_id: int, key_only: bool, values: list[Any], count: int,
               computed: frozenset[str] = frozenset()) -> list[str]:
        """The rows' JSON arrays, encoded as capture encodes them: in Python where every column's type says
        how its JSON follows from the text form (types.json_from_text), else by Postgres. ``computed``: the
        generated columns not among the values (positions())."""
        sql = self._encoders.get((layout_id, key_only, computed))
        if sql is None:
            sql = self._encoders[(layout_id, key_only, computed)] = self._encoder(layout_id, key_only, computed)
        width = len(values) // count if count else 0
        if not isinstance(sql, str):
            return rows_from_text(sql, values, count)
        # The rows' values column by column, each as one text[] literal: built with str methods, several
        # times faster than psycopg's per-element list dumper, which was the worker's largest cost.
        columns = {f"c{n}": text_array_literal(values[n::width]) for n in range(width)}
        return [r[0] for r in self.conn.execute(sql, columns, binary=True).fetchall()]  # binary: no quoting

    def _encoder(self, layout_id: int, key_only: bool, computed: frozenset[str]) -> str | list[Callable[[str], str]]:
        """The query that encodes a layout's decoded rows, or each column's encoder from its text form when
        Python can do it all (no generated column to compute): no round trip, no per-value cast."""
        layout = self.layout(layout_id)
        expressions = self.generated(layout_id)
        generated = {name: expressions[name] for name in computed}
        columns = layout.key_layout if key_only else layout.columns
        from_text = [json_from_text(c.base_type, c.encode, c.trusted) for c in columns]
        if not generated and all(from_text):
            return from_text  # type: ignore[return-value]
        return encode_rows_sql(layout, key_only, generated)

    # -- after delivery --------------------------------------------------------------------------------------

    def remove_delivered(self, batch: WalBatch) -> Removed:  # type: ignore[override]
        rows_per_table: dict[int, int] = {}
        for layout_id, rows in batch.rows_per_layout.items():
            table_id = self._table_of_layout.get(layout_id)
            if table_id is not None:
                rows_per_table[table_id] = rows_per_table.get(table_id, 0) + rows
        row = self.conn.execute(RECORD_WAL_BATCH, {"ids": batch.outbox_ids, "transactions": batch.transactions,
                                                   "rows": batch.rows, "target": self.target,
                                                   "tables": list(rows_per_table),
                                                   "table_rows": list(rows_per_table.values())}).fetchone()
        assert row is not None
        for (xid, commit_lsn), rows in batch.skipped.items():
            self.conn.execute(COUNT_SKIPPED, {"events": rows, "rows": rows, "target": self.target, "xid": xid,
                                              "lsn": lsn_to_text(commit_lsn)})
        self._note_skips_delivered(batch)
        batch.removing = True
        return Removed(int(row[0]), int(row[1]), int(row[2]))

    def _note_skips_delivered(self, batch: WalBatch) -> None:
        """A skip_transaction recorded after ``batch`` began to be decoded, of a transaction it decoded and did
        not drop (Turso committed it: this runs as the batch is recorded delivered), cannot unsend it: its record
        says so (delivered_at). A routed batch (a pattern's router) is not delivered yet: its tenants' skips work
        on the outbox."""
        if self.routing:
            return
        skips = self.conn.execute(SKIPPED, {"target": self.target, "slot": self.slot}).fetchall()
        for xid, before in skips:
            xid, before = int(xid), lsn_to_int(str(before))
            commit = batch.begun.get(xid)
            if (batch.skips_known.get(xid) != before and commit is not None and commit < before
                    and (xid, commit) not in batch.skipped):
                self.conn.execute(WAL_SKIP_DELIVERED,
                                  {"target": self.target, "xid": xid, "before": lsn_to_text(before)})
                event(log, logging.WARNING, "skipped_but_delivered", target=self.target, xid=xid,
                      reason="skip_transaction ran while the batch carrying it was on its way to Turso")

    def read_past(self, batch: WalBatch) -> None:  # type: ignore[override]
        """The next batch is read on from the end of ``batch`` (in flight, read whole): the stream goes on."""
        batch.removing = True

    def mark_delivered(self, batch: WalBatch) -> Removed:  # type: ignore[override]
        """Count the batch and delete its outbox rows, then move the slot past it (Turso has it)."""
        with self.conn.transaction():
            removed = self.remove_delivered(batch)
        self.settled(batch)
        return removed

    def settled(self, batch: WalBatch) -> None:  # type: ignore[override]
        """Turso confirmed the batch and its removal is committed: let the slot move past it."""
        if batch.streamed:
            if batch in self._unsettled:
                self._unsettled.remove(batch)
            if self.stream is not None:
                self.stream.confirm(batch.upto)
            self._confirmed = max(self._confirmed, batch.upto)
        else:
            self.advance(batch.upto)
        self.layouts_in_force = batch.layouts

    def record_caught_up(self) -> bool:
        """When the worker stops with nothing left to deliver (the end of a --once run, a stopped worker): confirm
        the slot past the WAL written since the last batch (the worker's own last writes, WAL of no transaction)
        if it holds nothing for this target, and record where, with a snapshot taken before looking
        (delivery_state.caught_up_*), so that pgturso.status says in sync until a transaction commits after it
        (wal_pending_bytes, WAL written since the slot's position, counts WAL that is no change). False, and
        nothing recorded, when something for the target is there (or may be: a batch not settled)."""
        if self.slot_missing or self._unsettled:
            return False
        snapshot, inserted = self.conn.execute(CAUGHT_UP_SNAPSHOT).fetchone()  # type: ignore[misc]
        deadline = time.monotonic() + CAUGHT_UP_FLUSH_SECONDS
        while (upto := self.wal_position()) < lsn_to_int(str(inserted)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        if self.dsn is None:
            with self.conn.transaction():
                if self._peek(upto, 1) is not None:
                    return False
                self.advance(upto)
        else:
            stream = self._open_stream()
            message = self._lookahead or self._next_message(stream, upto)
            if message is not None:
                self._lookahead = message
                return False
            stream.confirm(stream.idle_end)
            self.close_stream()  # the walsender takes the confirmation before it exits
            if self._confirmed < upto:
                return False
        with self.conn.transaction():
            self.conn.execute(RECORD_CAUGHT_UP, {"lsn": lsn_to_text(upto), "snapshot": snapshot, "target": self.target})
        return True

    def take_wake_locks(self) -> tuple[list[int], bool]:
        return [], True  # no capture trigger to wake the worker: it watches the WAL instead

    def close(self) -> None:
        self.close_stream()

    def _wait_for_walsender_exit(self, pid: int) -> None:
        """A walsender lets go of the slot only as it exits, a moment after its connection closed: wait for
        that (a few seconds at most), so that what comes next (a peek, the slot's drop, a new stream) finds it
        free."""
        deadline = time.monotonic() + SLOT_RELEASE_SECONDS
        try:
            while time.monotonic() < deadline and self.conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE active_pid = %s)",  # live, unlike
                    (pid,)).fetchone()[0]:  # type: ignore[index]  # pg_stat_activity's per-transaction snapshot
                time.sleep(0.01)
        except psycopg.Error:
            pass  # the worker's own connection is gone too: it reconnects, and recovery waits if need be

    def any_pending(self) -> bool:
        return False

    def wal_position(self) -> int:
        return lsn_to_int(str(self.conn.execute(FLUSH_LSN).fetchone()[0]))  # type: ignore[index]



# What a slot keeps (from its restart_lsn) and what may still be pending in it (WAL written since the position
# its reader confirmed: an upper bound, other tables' and databases' WAL included; pgturso.status shows the same).
SLOT_BYTES = """
    SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8,
           greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8
    FROM pg_replication_slots WHERE slot_name = %s
"""


def slot_bytes(conn: psycopg.Connection[Any], slot: str) -> tuple[int, int]:
    """(retained, pending) bytes of WAL of a slot (0, 0 if it is missing)."""
    row = conn.execute(SLOT_BYTES, (slot,)).fetchone()
    return (int(row[0] or 0), int(row[1] or 0)) if row else (0, 0)


@dataclass(frozen=True)
class _SentChain:
    """What a marker says of the chain of batches it ends (WalBatch.chain_of): after ``start``, every
    transaction was sent but those in ``dropped``."""
    start: int
    dropped: frozenset[tuple[int, int]]

    @classmethod
    def of_marker(cls, parsed: dict[str, Any]) -> _SentChain | None:
        """None for a marker written before markers named their chain (nothing is known: nothing is inferred)."""
        if "from" not in parsed or "dropped" not in parsed:
            return None
        return cls(lsn_to_int(parsed["from"]),
                   frozenset((int(xid), lsn_to_int(commit)) for xid, commit in parsed["dropped"]))

    def sent(self, xid: int, commit_lsn: int) -> bool:
        return commit_lsn > self.start and (xid, commit_lsn) not in self.dropped


def _parse_marker(marker: str) -> dict[str, Any] | None:
    """A marker written from a slot, or None (none yet, or one of trigger capture)."""
    try:
        parsed = json.loads(marker) if marker else None
    except ValueError:
        return None
    if isinstance(parsed, dict) and "lsn" in parsed and "slot" in parsed:
        return parsed
    return None
