"""Outbox events to SQLite statements.

Every statement binds one JSON text argument and expands it with ``json_each``, so a run of a thousand rows
costs Turso one statement instead of a thousand. Consecutive events for the same table and operation are
merged into one statement (up to ``max_payload_bytes``, max_statement_bytes; an event of many rows larger than
that, such as a slot's run of up to 5000 rows, is split into its rows first); rows keep their order inside it,
so a key written twice ends with its last value. Values are never spliced into SQL text; identifiers are always quoted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..capture.layout import Column, Index, TableLayout, ascii_lower, change_between
from ..capture.types import DECODE_ONLY_FOR
from ..common.quoting import quote_ident
from ..sources.outbox import Event


@dataclass(frozen=True)
class Statement:
    sql: str
    args: tuple[str, ...] = ()
    table: str = ""  # the source table, for error messages
    operation: str = ""
    txids: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        """Characters of SQL and arguments: what the statement adds to a request, before encoding."""
        return len(self.sql) + sum(len(a) for a in self.args)


def create_table_sql(layout: TableLayout, name: str | None = None) -> str:
    """SQLite DDL for the target table (or a table called ``name``): SQLite types, NOT NULL, the key."""
    defs = []
    for col in layout.columns:
        defs.append(f"{quote_ident(col.name)} {col.sqlite_type}" + (" NOT NULL" if col.not_null else ""))
    defs.append("PRIMARY KEY (" + ", ".join(quote_ident(k) for k in layout.key_columns) + ")")
    return f"CREATE TABLE {quote_ident(name or layout.target_table)} (" + ", ".join(defs) + ")"


def drop_table_sql(layout: TableLayout) -> str:
    return f"DROP TABLE IF EXISTS {quote_ident(layout.target_table)}"


def create_index_sql(layout: TableLayout, index: Index) -> str:
    """Always a plain index, even for a unique one of 0.1.0's layouts: Postgres enforces uniqueness, and
    Turso must never refuse an intermediate state of a statement Postgres committed (layout.Index)."""
    columns = ", ".join(quote_ident(c) for c in index.columns)
    table = quote_ident(layout.target_table)
    return f"CREATE INDEX {quote_ident(index.name)} ON {table} ({columns})"


def drop_index_sql(index: Index) -> str:
    return f"DROP INDEX IF EXISTS {quote_ident(index.name)}"


def create_table_statements(layout: TableLayout) -> list[str]:
    """A fresh target table with its indexes (replacing any table of that name)."""
    return [drop_table_sql(layout), create_table_sql(layout)] + [create_index_sql(layout, i) for i in layout.indexes]


def alter_table_statements(old: TableLayout, new: TableLayout, recopy: bool) -> list[str]:
    """SQLite DDL that turns the Turso table of layout ``old`` into that of layout ``new``.

    With ``recopy`` the table is replaced by an empty one (the extension sends every row again right after).
    Otherwise the change is made in place with ALTER TABLE (RENAME TO, RENAME/ADD/DROP COLUMN, indexes) or,
    where SQLite cannot alter in place (key, NOT NULL or declared type changed), by a rebuild inside Turso:
    create the new table, copy the rows across, drop the old one, rename.
    """
    if recopy:
        drop_old = [drop_table_sql(old)] if old.target_table != new.target_table else []
        return [*drop_old, *create_table_statements(new)]
    change = change_between(old, new)
    out: list[str] = []
    if change.rebuild:
        # A reserved name (layout.RESERVED_PREFIXES): no tracked table can have it, so dropping it drops no data.
        staging = _unused_name("_pgturso_rebuild_" + new.target_table, {old.target_table, new.target_table})
        old_by_num = {c.attnum: c for c in old.columns}
        pairs = [(c.name, old_by_num[c.attnum].name) for c in new.columns if c.attnum in old_by_num]
        out.append(f"DROP TABLE IF EXISTS {quote_ident(staging)}")
        out.append(create_table_sql(new, staging))
        out.append(
            f"INSERT INTO {quote_ident(staging)} ({', '.join(quote_ident(n) for n, _ in pairs)}) "
            f"SELECT {', '.join(quote_ident(o) for _, o in pairs)} FROM {quote_ident(old.target_table)}"
        )
        out.append(drop_table_sql(old))
        out.append(f"ALTER TABLE {quote_ident(staging)} RENAME TO {quote_ident(new.target_table)}")
        out.extend(create_index_sql(new, i) for i in new.indexes)
        return out
    # Indexes first: SQLite refuses to drop or rename an indexed column's index away under it.
    renames = dict(change.renamed)
    kept = {Index(i.name, tuple(renames.get(c, c) for c in i.columns), i.unique) for i in old.indexes}
    wanted = set(new.indexes)
    out.extend(drop_index_sql(i) for i in old.indexes if i.name not in {k.name for k in kept & wanted})
    table = quote_ident(old.target_table)
    if old.target_table != new.target_table:
        if ascii_lower(old.target_table) == ascii_lower(new.target_table):  # "events" -> "Events": the same to SQLite
            via = _unused_name(f"{new.target_table}_pgturso_rename", {ascii_lower(old.target_table)})
            out.append(f"ALTER TABLE {table} RENAME TO {quote_ident(via)}")
            table = quote_ident(via)
        out.append(f"ALTER TABLE {table} RENAME TO {quote_ident(new.target_table)}")
        table = quote_ident(new.target_table)
    # Renames may swap names (a -> b, b -> a) or change only case (createdat -> createdAt, which SQLite calls
    # the same name): go through names that exist nowhere when they collide.
    if {ascii_lower(n) for n in renames.values()} & {ascii_lower(n) for n in renames}:
        taken = {ascii_lower(c.name) for c in (*old.columns, *new.columns)}
        via = {}
        for before in renames:
            via[before] = _unused_name(f"{before}_pgturso_rename", taken)
            taken.add(ascii_lower(via[before]))
            out.append(f"ALTER TABLE {table} RENAME COLUMN {quote_ident(before)} TO {quote_ident(via[before])}")
        for before, after in renames.items():
            out.append(f"ALTER TABLE {table} RENAME COLUMN {quote_ident(via[before])} TO {quote_ident(after)}")
    else:
        for before, after in renames.items():
            out.append(f"ALTER TABLE {table} RENAME COLUMN {quote_ident(before)} TO {quote_ident(after)}")
    for name in change.dropped:
        out.append(f"ALTER TABLE {table} DROP COLUMN {quote_ident(name)}")
    for name in change.added:
        col = new.column(name)
        out.append(f"ALTER TABLE {table} ADD COLUMN {quote_ident(col.name)} {col.sqlite_type}")
    out.extend(create_index_sql(new, i) for i in new.indexes if i not in kept)
    return out


def _unused_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base`` with a number, that is not in ``taken`` (compared as given, or ASCII case folded
    when ``taken`` holds folded names)."""
    name, n = base, 0
    while name in taken or ascii_lower(name) in taken:
        n += 1
        name = f"{base}{n}"
    return name


def decoded_values(columns: list[Column], argument: str | None = None) -> str:
    """The SQLite expressions of ``columns``' values from a json_each row (``value->>i``, column i of the row
    array). Given the statement's ``argument``, a decode that no value in it needs is left out
    (types.DECODE_ONLY_FOR)."""
    unneeded = {column.decode for column in columns
                if argument is not None and column.decode in DECODE_ONLY_FOR
                and DECODE_ONLY_FOR[column.decode] not in argument}
    return ", ".join(f"value->>{i}" if c.decode in unneeded else c.decode.format(val=f"value->>{i}")
                     for i, c in enumerate(columns))


def upsert_sql(layout: TableLayout, argument: str | None = None) -> str:
    """Insert-or-overwrite every row of a JSON array of row arrays (all columns, in layout order); ``argument``:
    that array, when known (decoded_values)."""
    names = ", ".join(quote_ident(c.name) for c in layout.columns)
    values = decoded_values(layout.columns, argument)
    keys = ", ".join(quote_ident(k) for k in layout.key_columns)
    others = [c.name for c in layout.columns if c.name not in layout.key_columns]
    if others:
        assignments = ", ".join(f"{quote_ident(n)} = excluded.{quote_ident(n)}" for n in others)
        conflict = f"DO UPDATE SET {assignments}"
    else:
        conflict = "DO NOTHING"
    return (
        f"INSERT INTO {quote_ident(layout.target_table)} ({names}) "
        f"SELECT {values} FROM json_each(?) WHERE true ON CONFLICT ({keys}) {conflict}"
    )


def delete_sql(layout: TableLayout, argument: str | None = None) -> str:
    """Delete every key of a JSON array of key arrays (key columns, in key order); ``argument``: that array, when
    known (decoded_values)."""
    keys = layout.key_layout
    targets = ", ".join(quote_ident(c.name) for c in keys)
    values = decoded_values(keys, argument)
    if len(keys) > 1:
        targets = f"({targets})"
    return f"DELETE FROM {quote_ident(layout.target_table)} WHERE {targets} IN (SELECT {values} FROM json_each(?))"


def partial_update_sql(layout: TableLayout, present: list[int]) -> str:
    """Set only the ``present`` columns of the row whose key is the payload's ``k`` (capture => 'wal': an
    UPDATE that left large TOASTed values alone, which logical decoding does not send). ``?1`` is the
    payload ``{"c": present, "r": the row with those columns, "k": the old key}``."""
    columns = layout.columns
    sets = ", ".join(f"{quote_ident(columns[i].name)} = " + columns[i].decode.format(val=f"(?1 ->> '$.r[{i}]')")
                     for i in present)
    where = " AND ".join(f"{quote_ident(c.name)} = " + c.decode.format(val=f"(?1 ->> '$.k[{n}]')")
                         for n, c in enumerate(layout.key_layout))
    return f"UPDATE {quote_ident(layout.target_table)} SET {sets} WHERE {where}"


def truncate_sql(layout: TableLayout) -> str:
    return f"DELETE FROM {quote_ident(layout.target_table)}"


_ROW_DECODER = json.JSONDecoder()


def row_texts(payload: str) -> Iterator[str]:
    """The rows of an event's payload (JSON values joined by commas), each as the exact text it has there."""
    position, end = 0, len(payload)
    while position < end:
        while position < end and payload[position] in ", \t\r\n":
            position += 1
        if position == end:
            return
        _, after = _ROW_DECODER.raw_decode(payload, position)
        yield payload[position:after]
        position = after


_OPERATION = {
    "C": "create table",
    "U": "upsert",
    "D": "delete",
    "T": "truncate",
    "A": "alter table",
    "X": "drop table",
    "P": "update",
}


@dataclass
class _Run:
    layout_id: int
    op: str
    parts: list[str] = field(default_factory=list)
    size: int = 0
    txids: set[int] = field(default_factory=set)


class StatementBuilder:
    """Turns events, in outbox order, into statements; ``add`` yields the statements it completed."""

    def __init__(self, layout_of: Callable[[int], TableLayout], max_payload_bytes: int = 1 << 20) -> None:
        self._layout_of = layout_of
        self._max_payload_bytes = max_payload_bytes
        self._run: _Run | None = None

    def add(self, event: Event) -> Iterator[Statement]:
        if event.op in "UD" and event.payload:
            size = len(event.payload.encode())
            if event.nrows > 1 and 2 + size > self._max_payload_bytes:
                # Many rows in one event (a slot's run of rows, a statement's rows captured by one trigger
                # call): split into its rows, so that max_payload_bytes bounds every statement but one of a
                # single row larger than it.
                for row in event.rows or row_texts(event.payload):
                    yield from self._merge(event, row, len(row.encode()))
            else:
                yield from self._merge(event, event.payload, size)
            return
        yield from self.flush()
        layout = self._layout_of(event.layout_id)
        context = dict(table=layout.source_table, operation=_OPERATION[event.op], txids=event.txids or (event.txid,))
        if event.op == "C":
            for sql in create_table_statements(layout):
                yield Statement(sql, **context)
        elif event.op == "T":
            yield Statement(truncate_sql(layout), **context)
        elif event.op == "P":
            present = json.loads(event.payload or "{}")["c"]
            yield Statement(partial_update_sql(layout, present), (event.payload or "",), **context)
        elif event.op == "A":
            # A schema change: the payload names the layout the table had until now.
            change = json.loads(event.payload or "{}")
            old = self._layout_of(int(change["from"]))
            for sql in alter_table_statements(old, layout, bool(change.get("recopy"))):
                yield Statement(sql, **context)
        elif event.op == "X":
            # The table was dropped in Postgres; its Turso table goes too only if asked for.
            if json.loads(event.payload or "{}").get("drop_target"):
                yield Statement(drop_table_sql(layout), **context)

    def _merge(self, event: Event, payload: str, size: int) -> Iterator[Statement]:
        """Add ``payload`` (rows of ``event``, ``size`` bytes) to the current run, or flush it and start another."""
        run = self._run
        # The merged argument is "[" + payloads joined by "," + "]": count every byte of it.
        if run and (run.layout_id, run.op) == (event.layout_id, event.op) and (
            run.size + 1 + size <= self._max_payload_bytes
        ):
            run.parts.append(payload)
            run.size += 1 + size
            run.txids.update(event.txids or (event.txid,))
            return
        yield from self.flush()
        self._run = _Run(event.layout_id, event.op, [payload], 2 + size, set(event.txids or (event.txid,)))

    def flush(self) -> Iterator[Statement]:
        run, self._run = self._run, None
        if run is None:
            return
        layout = self._layout_of(run.layout_id)
        argument = "[" + ",".join(run.parts) + "]"
        sql = upsert_sql(layout, argument) if run.op == "U" else delete_sql(layout, argument)
        yield Statement(
            sql,
            (argument,),
            table=layout.source_table,
            operation=_OPERATION[run.op],
            txids=tuple(sorted(run.txids)),
        )
