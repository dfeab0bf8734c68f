"""A tracked table's layout: its columns, key, indexes and name on Turso.

A layout is computed by ``track_table`` and again by the schema-change event triggers (inside Postgres,
through extension_api.py), stored as JSON in ``pgturso.layout.spec``, and read back by the worker; outbox
events name the layout they were packed with, so the worker always decodes an event with the column order it
was captured in. A schema change is a new layout plus an 'A' event naming the old one: ``change_between``
says how the Turso table gets from one to the other (statements.py writes the SQLite DDL).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .types import (
    ENCODING_SETTINGS,
    USER_DEFINED_ENCODES,
    ColumnType,
    column_type,
    numeric_precision_from_typmod,
    values_unchanged,
)


@dataclass(frozen=True)
class Column:
    name: str
    pg_type: str  # format_type() of the column, for messages and docs
    sqlite_type: str
    encode: str  # Postgres expression template, see types.ColumnType
    decode: str  # SQLite expression template, see types.ColumnType
    not_null: bool
    base_type: str = ""  # pg_type.typname under any domain
    attnum: int = 0  # pg_attribute.attnum: what stays the same when a column is renamed
    settings: tuple[str, ...] = ENCODING_SETTINGS  # what the encoding depends on (types.ColumnType.settings)
    # False under a nondeterministic collation: Postgres calls 'Bob' = 'bob', Turso holds two different keys.
    deterministic: bool = True
    # The built-in type under any domain, with the domain's typmod ('' for a type a user may have defined):
    # what a key's text form is read back as, so that no domain CHECK or user-defined cast runs.
    base_pg_type: str = ""

    @property
    def trusted(self) -> bool:
        """Encoded, compared and read back with functions built into Postgres only (types.USER_TYPE)."""
        return self.encode not in USER_DEFINED_ENCODES


@dataclass(frozen=True)
class Index:
    """A secondary index or unique constraint, created on Turso as a plain index.

    Postgres already enforced every unique index; Turso receives each statement as "delete the keys it moved
    away from, then upsert the new rows", whose intermediate states may hold a value twice (``UPDATE t SET
    id = id + 1`` on a table with a second unique column). A UNIQUE index on Turso would refuse a change
    Postgres committed, so layouts built since 0.2.0 say ``unique = False``; ``unique = True`` is read from
    layouts of 0.1.0, whose Turso tables the upgrade turns into plain ones (99_regenerate.sql).
    """

    name: str  # the index's name on Turso
    columns: tuple[str, ...]
    unique: bool = False


@dataclass(frozen=True)
class TableLayout:
    source_table: str  # schema-qualified Postgres name, for messages
    target_table: str  # table name on Turso
    columns: tuple[Column, ...]
    key_columns: tuple[str, ...]
    indexes: tuple[Index, ...] = field(default=())
    # track_table's row_filter, as Postgres deparsed it (pg_get_expr of the filter's publication): a boolean
    # expression over the table's columns, built-in immutable functions only. None: every row.
    row_filter: str | None = None
    # track_table's route_by: the column whose value names the tenant database a row goes to (a pattern
    # target); None: the table is not routed.
    route_by: str | None = None
    # A reference table of a pattern target (track_table without route_by): every tenant database gets all of
    # its rows, and each change is queued once per tenant (pgturso._pattern_tenants).
    reference: bool = False

    @classmethod
    def from_catalog(
        cls,
        source_table: str,
        target_table: str,
        columns: Sequence[Mapping[str, Any]],
        key_columns: Sequence[str],
        indexes: Sequence[Mapping[str, Any]] = (),
        row_filter: str | None = None,
        route_by: str | None = None,
        reference: bool = False,
    ) -> TableLayout:
        """Build a layout from catalog rows.

        Each column: name, pg_type, base_type, typmod, not_null, and optionally kind (typtype of the base
        type, 'A' for arrays), attnum and deterministic (its collation's). Each index: name, columns (and
        unique, which Turso does not get).
        """
        built = []
        for position, col in enumerate(columns, start=1):
            ctype = _catalog_column_type(col)
            built.append(
                Column(
                    name=str(col["name"]),
                    pg_type=str(col["pg_type"]),
                    sqlite_type=ctype.sqlite_type,
                    encode=ctype.encode,
                    decode=ctype.decode,
                    not_null=bool(col["not_null"]),
                    base_type=str(col["base_type"]),
                    attnum=int(col.get("attnum", position)),
                    settings=tuple(n for n in ENCODING_SETTINGS if n in ctype.settings),
                    deterministic=bool(col.get("deterministic", True)),
                    base_pg_type=str(col.get("base_pg_type") or "") if ctype.encode not in USER_DEFINED_ENCODES else "",
                )
            )
        names = {c.name for c in built}
        folded: dict[str, str] = {}
        for col in built:
            other = folded.setdefault(ascii_lower(col.name), col.name)
            if other != col.name:
                raise ValueError(
                    f"{source_table}: columns {other!r} and {col.name!r} differ only in case, which SQLite does not "
                    "tell apart; rename one of them"
                )
        reserved = [name for name in (target_table, *(str(i["name"]) for i in indexes)) if is_reserved_name(name)]
        if reserved:
            raise ValueError(
                f"{source_table}: the Turso name {reserved[0]!r} is reserved (pgturso's own tables start with "
                f"{RESERVED_PREFIXES[0]!r}, SQLite's with {RESERVED_PREFIXES[1]!r}); choose another table name, "
                "index name or target_table"
            )
        missing = [k for k in key_columns if k not in names]
        if missing or not key_columns:
            raise ValueError(f"{source_table}: key columns {missing or list(key_columns)} are not columns")
        built_indexes = []
        for index in indexes:
            cols = tuple(str(c) for c in index["columns"])
            if cols and all(c in names for c in cols) and list(cols) != list(key_columns):
                built_indexes.append(Index(str(index["name"]), cols))  # plain on Turso: see Index
        if route_by and route_by not in names:
            raise ValueError(f"{source_table}: route_by column {route_by!r} is not a replicated column")
        return cls(source_table, target_table, tuple(built), tuple(key_columns), tuple(built_indexes),
                   row_filter or None, route_by or None, bool(reference) and not route_by)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> TableLayout:
        return cls(
            source_table=spec["source_table"],
            target_table=spec["target_table"],
            columns=tuple(Column(**{**c, "settings": tuple(c.get("settings", ENCODING_SETTINGS))})
                          for c in spec["columns"]),
            key_columns=tuple(spec["key_columns"]),
            indexes=tuple(
                Index(i["name"], tuple(i["columns"]), bool(i.get("unique", False))) for i in spec.get("indexes", ())
            ),
            row_filter=spec.get("row_filter"),
            route_by=spec.get("route_by"),
            reference=bool(spec.get("reference", False)),
        )

    def reencoded(self, columns: Sequence[Mapping[str, Any]]) -> TableLayout:
        """This layout with each column encoded as this version encodes its catalog type (``columns`` as for
        ``from_catalog``, matched by attnum), where that keeps what Turso stores and decodes: an upgrade
        regenerates capture with this version's (safer) encodings without a schema change or a recopy."""
        by_attnum = {int(c.get("attnum", 0)): c for c in columns}
        updated = []
        for column in self.columns:
            catalog = by_attnum.get(column.attnum)
            ctype = _catalog_column_type(catalog) if catalog else None
            if ctype and (ctype.sqlite_type, ctype.decode) == (column.sqlite_type, column.decode):
                column = replace(
                    column, encode=ctype.encode,
                    settings=tuple(n for n in ENCODING_SETTINGS if n in ctype.settings),
                    base_pg_type=str(catalog.get("base_pg_type") or "") if ctype.encode not in USER_DEFINED_ENCODES
                    else "",
                )
            updated.append(column)
        return replace(self, columns=tuple(updated))

    def to_spec(self) -> dict[str, Any]:
        spec = {
            "source_table": self.source_table,
            "target_table": self.target_table,
            "columns": [asdict(c) for c in self.columns],
            "key_columns": list(self.key_columns),
            "indexes": [{"name": i.name, "columns": list(i.columns), "unique": i.unique} for i in self.indexes],
        }
        if self.row_filter:  # absent rather than null: layouts without a filter read as before
            spec["row_filter"] = self.row_filter
        if self.route_by:
            spec["route_by"] = self.route_by
        if self.reference:
            spec["reference"] = True
        return spec

    @property
    def key_positions(self) -> list[int]:
        index = {c.name: i for i, c in enumerate(self.columns)}
        return [index[k] for k in self.key_columns]

    @property
    def key_layout(self) -> list[Column]:
        return [self.columns[i] for i in self.key_positions]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


# Names on Turso that tracked tables and their indexes may not take (SQLite compares them without ASCII case):
# pgturso's own (progress.MARKER_TABLE, the staging tables of statements.py) and SQLite's internal ones.
RESERVED_PREFIXES = ("_pgturso", "sqlite_")


def is_reserved_name(name: str) -> bool:
    return ascii_lower(name).startswith(RESERVED_PREFIXES)


def _catalog_column_type(col: Mapping[str, Any]) -> ColumnType:
    precision = numeric_precision_from_typmod(int(col.get("typmod", -1)))
    return column_type(str(col["base_type"]), precision, str(col.get("kind", "b")), bool(col.get("trusted", True)))


def ascii_lower(name: str) -> str:
    """How SQLite compares identifiers: ASCII letters without case, everything else exactly."""
    return name.translate({c: c + 32 for c in range(65, 91)})


@dataclass(frozen=True)
class Change:
    """How the Turso table goes from one layout to the next.

    ``recopy``: the values on Turso would no longer be what the new layout encodes (a column changed type, or
    a NOT NULL column was added), so the table is dropped, created afresh and copied again from Postgres.
    ``added``: columns that are new; if Postgres filled them (a default, identity or generated column) the
    extension recopies too, since Turso cannot compute Postgres defaults.
    ``rebuild``: SQLite cannot make the change in place (key, NOT NULL or declared type changed): the worker
    creates the new table, copies the rows over inside Turso, drops the old one and renames.
    """

    recopy: bool
    rebuild: bool
    added: tuple[str, ...]
    dropped: tuple[str, ...]
    renamed: tuple[tuple[str, str], ...]  # (old name, new name)


def change_between(old: TableLayout, new: TableLayout) -> Change:
    old_by_num = {c.attnum: c for c in old.columns}
    new_by_num = {c.attnum: c for c in new.columns}
    added = tuple(c.name for c in new.columns if c.attnum not in old_by_num)
    dropped = tuple(c.name for c in old.columns if c.attnum not in new_by_num)
    renamed = tuple(
        (old_by_num[n].name, c.name) for n, c in new_by_num.items() if n in old_by_num and old_by_num[n].name != c.name
    )
    recopy = any(new_by_num[c].not_null for c in new_by_num if c not in old_by_num)
    rebuild = False
    for num, col in new_by_num.items():
        before = old_by_num.get(num)
        if before is None:
            continue
        if before.pg_type != col.pg_type or (before.encode, before.decode) != (col.encode, col.decode):
            if (before.encode, before.decode) != (col.encode, col.decode) or not values_unchanged(
                before.base_type, col.base_type
            ):
                recopy = True
        if before.sqlite_type != col.sqlite_type or before.not_null != col.not_null:
            rebuild = True
    renames = dict(renamed)
    if tuple(renames.get(k, k) for k in old.key_columns) != new.key_columns:
        rebuild = True
    return Change(recopy=recopy, rebuild=rebuild, added=added, dropped=dropped, renamed=renamed)
