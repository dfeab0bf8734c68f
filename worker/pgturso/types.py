"""The one Postgres-to-SQLite type map.

Each Postgres column type maps to a ``ColumnType``: the SQLite declared type of the column on Turso, the
Postgres expression that turns a value into its JSON form inside the capture trigger (``encode``), and the
SQLite expression that turns that JSON element back into a SQLite value on Turso (``decode``). Capture,
the initial copy, the DDL and the worker all go through this module; docs/types.md documents the table.

Capture functions run with ``TimeZone = UTC`` and ``DateStyle = ISO``, so timestamps arrive as ISO 8601
text in UTC, which SQLite's date functions read directly.
"""

from __future__ import annotations

from dataclasses import dataclass

# SQLite keeps ~15 significant digits when it converts text to REAL, so wider numerics travel as TEXT.
SQLITE_EXACT_DIGITS = 15


@dataclass(frozen=True)
class ColumnType:
    sqlite_type: str
    encode: str = "{col}"  # Postgres expression; {col} is the quoted column reference
    decode: str = "{val}"  # SQLite expression; {val} is the JSON element of the row array
    note: str = ""


INTEGER = ColumnType("INTEGER")
REAL = ColumnType("REAL")
TEXT = ColumnType("TEXT")
BOOLEAN = ColumnType("INTEGER", note="true/false arrive as 1/0")
BLOB = ColumnType("BLOB", encode="encode({col}, 'hex')", decode="unhex({val})")
JSON_TEXT = ColumnType("TEXT", encode="{col}::text", note="the JSON document as text")
EXACT_NUMERIC = ColumnType("NUMERIC", note=f"precision <= {SQLITE_EXACT_DIGITS}: exact as a SQLite number")
WIDE_NUMERIC = ColumnType(
    "TEXT", encode="{col}::text", note=f"precision > {SQLITE_EXACT_DIGITS} or unconstrained: exact decimal text"
)
ISO_TEXT = ColumnType("TEXT", note="ISO 8601; timestamptz in UTC")
JSON_FALLBACK = ColumnType("TEXT", note="arrays and composites as JSON, other types as their text form")

_BY_BASE_TYPE: dict[str, ColumnType] = {
    "int2": INTEGER,
    "int4": INTEGER,
    "int8": INTEGER,
    "oid": INTEGER,
    "float4": REAL,
    "float8": REAL,
    "bool": BOOLEAN,
    "text": TEXT,
    "varchar": TEXT,
    "bpchar": TEXT,
    "name": TEXT,
    "citext": TEXT,
    "char": TEXT,
    "uuid": TEXT,
    "bytea": BLOB,
    "json": JSON_TEXT,
    "jsonb": JSON_TEXT,
    "date": ISO_TEXT,
    "timestamp": ISO_TEXT,
    "timestamptz": ISO_TEXT,
}


def column_type(base_type: str, numeric_precision: int | None = None) -> ColumnType:
    """Map a Postgres base type name (``pg_type.typname`` after resolving domains) to its ColumnType.

    ``numeric_precision`` is the declared precision of a numeric column, None when unconstrained.
    """
    if base_type == "numeric":
        if numeric_precision is not None and numeric_precision <= SQLITE_EXACT_DIGITS:
            return EXACT_NUMERIC
        return WIDE_NUMERIC
    return _BY_BASE_TYPE.get(base_type, JSON_FALLBACK)


def numeric_precision_from_typmod(typmod: int) -> int | None:
    """Decode the precision Postgres stores in a numeric column's atttypmod (-1 when unconstrained)."""
    if typmod < 4:
        return None
    return ((typmod - 4) >> 16) & 0xFFFF
