"""Outbox events to SQLite statements.

Every statement binds one JSON text argument and expands it with ``json_each``, so a run of a thousand rows
costs Turso one statement instead of a thousand. Consecutive events for the same table and operation are
merged into one statement (up to ``max_payload_bytes``); rows keep their order inside it, so a key written
twice ends with its last value. Values are never spliced into SQL text; identifiers are always quoted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .layout import TableLayout
from .outbox import Event
from .quoting import quote_ident


@dataclass(frozen=True)
class Statement:
    sql: str
    args: tuple[str, ...] = ()
    table: str = ""  # the source table, for error messages
    operation: str = ""
    txids: tuple[int, ...] = ()


def create_table_sql(layout: TableLayout) -> str:
    """SQLite DDL for the target table: SQLite types, NOT NULL and the primary key."""
    defs = []
    for col in layout.columns:
        defs.append(f"{quote_ident(col.name)} {col.sqlite_type}" + (" NOT NULL" if col.not_null else ""))
    defs.append("PRIMARY KEY (" + ", ".join(quote_ident(k) for k in layout.key_columns) + ")")
    return f"CREATE TABLE {quote_ident(layout.target_table)} (" + ", ".join(defs) + ")"


def drop_table_sql(layout: TableLayout) -> str:
    return f"DROP TABLE IF EXISTS {quote_ident(layout.target_table)}"


def upsert_sql(layout: TableLayout) -> str:
    """Insert-or-overwrite every row of a JSON array of row arrays (all columns, in layout order)."""
    names = ", ".join(quote_ident(c.name) for c in layout.columns)
    values = ", ".join(c.decode.format(val=f"value->>{i}") for i, c in enumerate(layout.columns))
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


def delete_sql(layout: TableLayout) -> str:
    """Delete every key of a JSON array of key arrays (key columns, in key order)."""
    keys = layout.key_layout
    targets = ", ".join(quote_ident(c.name) for c in keys)
    values = ", ".join(c.decode.format(val=f"value->>{i}") for i, c in enumerate(keys))
    if len(keys) > 1:
        targets = f"({targets})"
    return f"DELETE FROM {quote_ident(layout.target_table)} WHERE {targets} IN (SELECT {values} FROM json_each(?))"


def truncate_sql(layout: TableLayout) -> str:
    return f"DELETE FROM {quote_ident(layout.target_table)}"


_OPERATION = {"C": "create table", "U": "upsert", "D": "delete", "T": "truncate"}


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
        run = self._run
        if event.op in "UD" and event.payload:
            size = len(event.payload.encode())
            # The merged argument is "[" + payloads joined by "," + "]": count every byte of it.
            if run and (run.layout_id, run.op) == (event.layout_id, event.op) and (
                run.size + 1 + size <= self._max_payload_bytes
            ):
                run.parts.append(event.payload)
                run.size += 1 + size
                run.txids.add(event.txid)
                return
            yield from self.flush()
            self._run = _Run(event.layout_id, event.op, [event.payload], 2 + size, {event.txid})
            return
        yield from self.flush()
        layout = self._layout_of(event.layout_id)
        context = dict(table=layout.source_table, operation=_OPERATION[event.op], txids=(event.txid,))
        if event.op == "C":
            yield Statement(drop_table_sql(layout), **context)
            yield Statement(create_table_sql(layout), **context)
        elif event.op == "T":
            yield Statement(truncate_sql(layout), **context)

    def flush(self) -> Iterator[Statement]:
        run, self._run = self._run, None
        if run is None:
            return
        layout = self._layout_of(run.layout_id)
        sql = upsert_sql(layout) if run.op == "U" else delete_sql(layout)
        yield Statement(
            sql,
            ("[" + ",".join(run.parts) + "]",),
            table=layout.source_table,
            operation=_OPERATION[run.op],
            txids=tuple(sorted(run.txids)),
        )
