"""A tracked table's layout: its columns, key and name on Turso.

A layout is computed once by ``track_table`` (inside Postgres, through extension_api.py), stored as JSON in
``pgturso.layout.spec``, and read back by the worker; outbox events name the layout they were packed with,
so the worker always decodes an event with the column order it was captured in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .types import column_type, numeric_precision_from_typmod


@dataclass(frozen=True)
class Column:
    name: str
    pg_type: str  # format_type() of the column, for messages and docs
    sqlite_type: str
    encode: str  # Postgres expression template, see types.ColumnType
    decode: str  # SQLite expression template, see types.ColumnType
    not_null: bool


@dataclass(frozen=True)
class TableLayout:
    source_table: str  # schema-qualified Postgres name, for messages
    target_table: str  # table name on Turso
    columns: tuple[Column, ...]
    key_columns: tuple[str, ...]

    @classmethod
    def from_catalog(
        cls,
        source_table: str,
        target_table: str,
        columns: Sequence[Mapping[str, Any]],
        key_columns: Sequence[str],
    ) -> TableLayout:
        """Build a layout from catalog rows: name, pg_type, base_type, typmod, not_null per column."""
        built = []
        for col in columns:
            precision = numeric_precision_from_typmod(int(col.get("typmod", -1)))
            ctype = column_type(str(col["base_type"]), precision)
            built.append(
                Column(
                    name=str(col["name"]),
                    pg_type=str(col["pg_type"]),
                    sqlite_type=ctype.sqlite_type,
                    encode=ctype.encode,
                    decode=ctype.decode,
                    not_null=bool(col["not_null"]),
                )
            )
        names = {c.name for c in built}
        missing = [k for k in key_columns if k not in names]
        if missing or not key_columns:
            raise ValueError(f"{source_table}: key columns {missing or list(key_columns)} are not columns")
        return cls(source_table, target_table, tuple(built), tuple(key_columns))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> TableLayout:
        return cls(
            source_table=spec["source_table"],
            target_table=spec["target_table"],
            columns=tuple(Column(**c) for c in spec["columns"]),
            key_columns=tuple(spec["key_columns"]),
        )

    def to_spec(self) -> dict[str, Any]:
        return {
            "source_table": self.source_table,
            "target_table": self.target_table,
            "columns": [asdict(c) for c in self.columns],
            "key_columns": list(self.key_columns),
        }

    @property
    def key_positions(self) -> list[int]:
        index = {c.name: i for i, c in enumerate(self.columns)}
        return [index[k] for k in self.key_columns]

    @property
    def key_layout(self) -> list[Column]:
        return [self.columns[i] for i in self.key_positions]
