"""The one Postgres-to-SQLite type map.

Each Postgres column type maps to a ``ColumnType``: the SQLite declared type of the column on Turso, the
Postgres expression that turns a value into its JSON form inside the capture trigger (``encode``), and the
SQLite expression that turns that JSON element back into a SQLite value on Turso (``decode``). Capture,
the initial copy, the DDL and the worker all go through this module; docs/types.md documents the table.

Rows travel as ``json_build_array(...)``, so a value whose encode is just ``{col}`` is whatever Postgres's
own JSON conversion makes of it: numbers stay numbers, timestamps become ISO 8601 strings, arrays become JSON
arrays and composites JSON objects (both arrive on Turso as JSON text), and every other type its text form.

Security (docs/security.md): capture functions are SECURITY DEFINER, and the copies run with an operator's or
the extension owner's rights, so no encoding may run code that a role other than a superuser defined.
``json_build_array``, ``to_json`` and ``::text`` consult casts (``CREATE CAST``) for every type that is not
built into Postgres, and the owner of an enum, composite, range or domain may create casts from it. So built-in
encodings are used only for columns whose type is built in (under any domain, arrays of it included:
``trusted`` in the catalog, ``_trusted_type`` in extension/sql/20_track.sql); every other value travels as its
text form from the type's output function (``concat(…)``, which consults no cast), arrays of such
types as a JSON array of the elements' text forms. Only a superuser can define an output function.

Nothing that Turso's JSON parser could refuse travels as JSON structure inside a row: arrays travel as the
text of their JSON (a JSON string inside the row), so a deeply nested jsonb element, a number beyond any
double, ``\u0000`` or a lone surrogate in a ``json`` value arrive as text and cannot stop delivery.

Capture functions run with ``TimeZone = UTC``, ``DateStyle = ISO``, ``IntervalStyle = iso_8601`` and
``extra_float_digits = 1`` (capture.CAPTURE_SETTINGS), so no session setting changes what arrives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

# SQLite keeps ~15 significant digits when it converts text to REAL, so wider numerics travel as TEXT.
SQLITE_EXACT_DIGITS = 15


# The settings that can change a value's text or JSON form; capture pins the ones a table's types need.
ENCODING_SETTINGS = ("TimeZone", "DateStyle", "IntervalStyle", "extra_float_digits")


@dataclass(frozen=True)
class ColumnType:
    sqlite_type: str
    encode: str = "{col}"  # Postgres expression; {col} is the quoted column reference
    decode: str = "{val}"  # SQLite expression; {val} is the JSON element of the row array
    note: str = ""
    settings: frozenset[str] = frozenset()  # which ENCODING_SETTINGS the encoding depends on
    # How ``encode``'s JSON element follows from the value's text form (its output function under capture's
    # settings, as a walsender writes decoded values): a key of FROM_TEXT, or "" when only Postgres can tell
    # (wal capture then has Postgres read the text back and run ``encode``; see json_from_text).
    from_text: str = ""


INTEGER = ColumnType("INTEGER", note="the integer (full 64-bit range)", from_text="as_is")
# JSON has no NaN, Infinity or -0: Postgres writes the first two as strings, and -0 as the integer -0 (which
# SQLite reads as 0). Negative zero is sent as -0.0; ±Infinity become SQLite's ±Inf; NaN, which SQLite
# cannot store as a REAL (it turns it into NULL), stays the text 'NaN'.
FLOAT = ColumnType(
    "REAL",
    encode="CASE WHEN {col} = 0 AND {col}::text = '-0' THEN '-0.0'::json ELSE to_json({col}) END",
    decode="CASE {val} WHEN 'Infinity' THEN 9e999 WHEN '-Infinity' THEN -9e999 ELSE {val} END",
    note="the float, exactly; -0 kept; ±Infinity as SQLite ±Inf (9e999); NaN as the text 'NaN'",
    settings=frozenset({"extra_float_digits"}),
    from_text="float",
)
# Decodes that only some values need, by a text that every such value's JSON element contains: FLOAT's decode
# turns the strings 'Infinity' and '-Infinity' into ±Inf and gives every other element back as it is, so an
# argument with no 'Infinity' anywhere in it decodes the same with the bare element (statements.upsert_sql).
# The CASE reads each element twice: it cost tursodb about a fifth of its CPU per row (4.4 against 3.6 us per
# row of an (int, text, int, float8) table).
DECODE_ONLY_FOR = {FLOAT.decode: "Infinity"}
TEXT = ColumnType("TEXT", note="the text (UTF-8)", from_text="string")
BOOLEAN = ColumnType("INTEGER", note="true/false arrive as 1/0", from_text="boolean")
BLOB = ColumnType("BLOB", encode="encode({col}, 'hex')", decode="unhex({val})", note="the bytes")
JSON_TEXT = ColumnType("TEXT", encode="{col}::text", note="the JSON document as text (json: exactly as written)")
EXACT_NUMERIC = ColumnType(
    "NUMERIC", note=f"precision <= {SQLITE_EXACT_DIGITS}: a SQLite number (15 significant digits are exact)"
)
WIDE_NUMERIC = ColumnType(
    "TEXT", encode="{col}::text", note=f"precision > {SQLITE_EXACT_DIGITS} or unconstrained: exact decimal text"
)
ISO_TEXT = ColumnType("TEXT", note="ISO 8601 (timestamptz in UTC, +00:00); 'infinity'/'-infinity' as text")
ISO_TEXT_UTC = ColumnType("TEXT", note=ISO_TEXT.note, settings=frozenset({"TimeZone"}))
TIME_TEXT = ColumnType("TEXT", note="HH:MM:SS[.ffffff], timetz with its offset", settings=frozenset({"DateStyle"}))
INTERVAL = ColumnType("TEXT", note="ISO 8601 duration, e.g. P1Y2M3DT4H5M6S", settings=frozenset({"IntervalStyle"}))
MONEY = ColumnType("TEXT", encode="{col}::numeric::text", note="exact decimal text, no currency symbol")
# Arrays, composites and other types contain or print values of any type: they depend on every setting.
# An array travels as the text of its JSON (a string in the row), never as nested JSON Turso must parse.
JSON_STRUCTURE = ColumnType("TEXT", encode="to_json({col})::text",
                            note="JSON text: arrays as JSON arrays (built-in composites as JSON objects)",
                            settings=frozenset(ENCODING_SETTINGS))
PG_TEXT = ColumnType("TEXT", note="the Postgres text form", settings=frozenset(ENCODING_SETTINGS))
# Types a role other than a superuser may have defined (enums, composites, ranges, domains over them, and
# arrays of them): only their output function, which no such role can define, turns them into text.
# concat() calls the output function of its argument's type and consults no cast (nor does format(), but
# its '%' would clash with client-side placeholders, e.g. in verify.py). concat(NULL) is '', hence the test
# for NULL (num_nulls: a composite whose fields are all NULL is not NULL itself, though "IS NULL" says so).
OUTPUT_TEXT = "CASE WHEN num_nulls({col}) = 0 THEN concat({col}) END"
USER_TYPE = ColumnType("TEXT", encode=OUTPUT_TEXT, note="the text form from the type's output function",
                       settings=frozenset(ENCODING_SETTINGS))
USER_ARRAY = ColumnType(
    "TEXT", encode="CASE WHEN num_nulls({col}) = 0 THEN array_to_json(concat({col})::text[])::text END",
    note="a JSON array of the elements' text forms", settings=frozenset(ENCODING_SETTINGS),
)
# Encodings that run no function a user could have defined: everything but these two (see the module doc).
USER_DEFINED_ENCODES = frozenset({USER_TYPE.encode, USER_ARRAY.encode})

_BY_BASE_TYPE: dict[str, ColumnType] = {
    "int2": INTEGER,
    "int4": INTEGER,
    "int8": INTEGER,
    "oid": INTEGER,
    "float4": FLOAT,
    "float8": FLOAT,
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
    "timestamptz": ISO_TEXT_UTC,
    "time": TIME_TEXT,
    "timetz": TIME_TEXT,
    "interval": INTERVAL,
    "money": MONEY,
}



def _float_from_text(text: str) -> str:
    """to_json(float) from float's text form: a number, '-0' as -0.0 (FLOAT's encode), NaN and ±Infinity as
    JSON strings (not numbers in JSON)."""
    if text[-1] in "0123456789":
        return "-0.0" if text == "-0" else text
    return '"' + text + '"'


# The JSON element of a value from its text form, for the ColumnTypes that say so (``from_text``): byte for
# byte what their ``encode`` makes of the value in Postgres (to_json escapes a string as
# json.encoder.encode_basestring does: \b \f \n \r \t \" \\ and \u00XX below 0x20, nothing else). Proven
# in both capture modes by tests/test_types.py.
FROM_TEXT: dict[str, Callable[[str], str]] = {
    "as_is": str,
    "string": json.encoder.encode_basestring,  # type: ignore[attr-defined]
    "boolean": {"t": "true", "f": "false"}.__getitem__,
    "float": _float_from_text,
}


def json_from_text(base_type: str, encode: str, trusted: bool = True) -> Callable[[str], str] | None:
    """How a column's JSON element follows from its value's text form, if Python can tell (None: ask Postgres).
    ``encode`` is the column's encode expression as its layout recorded it: only a column encoded as its
    type's map says today qualifies (an older layout, an array or a composite of the type does not)."""
    if not trusted:
        return None
    ctype = _BY_BASE_TYPE.get(base_type)
    if ctype is None or not ctype.from_text or ctype.encode != encode:
        return None
    return FROM_TEXT[ctype.from_text]


# Kept for callers of the first release: the catch-all for types not in the table above.
JSON_FALLBACK = PG_TEXT

# Type changes (ALTER COLUMN TYPE) that keep every value's form on Turso, so the Turso table needs no recopy.
_SAME_VALUES = [frozenset({"int2", "int4", "int8"}), frozenset({"text", "varchar"})]


def column_type(base_type: str, numeric_precision: int | None = None, kind: str = "b",
                trusted: bool = True) -> ColumnType:
    """Map a Postgres base type to its ColumnType.

    ``base_type`` is ``pg_type.typname`` after resolving domains; ``numeric_precision`` the declared precision
    of a numeric column (None when unconstrained); ``kind`` is ``typtype`` of the base type, or 'A' for an
    array (``typcategory``): arrays and composites ('c') travel as JSON. ``trusted``: the type is built into
    Postgres (under any domain; an array's element too); False for any type a user may have created, whatever
    its name, which then travels as its text form (USER_TYPE, USER_ARRAY).
    """
    if not trusted:
        return USER_ARRAY if kind == "A" else USER_TYPE
    if base_type == "numeric":
        if numeric_precision is not None and numeric_precision <= SQLITE_EXACT_DIGITS:
            return EXACT_NUMERIC
        return WIDE_NUMERIC
    if kind in ("A", "c"):
        return JSON_STRUCTURE
    return _BY_BASE_TYPE.get(base_type, PG_TEXT)


def values_unchanged(old_base_type: str, new_base_type: str) -> bool:
    """Whether ALTER COLUMN TYPE from one base type to the other keeps every value's form on Turso.

    Only widening integers and moving between text and varchar qualify; any other change (even of a typmod:
    numeric(10,2) to numeric(10,1) rounds, char(5) to char(9) pads) makes the worker recopy the table.
    """
    return any(old_base_type in group and new_base_type in group for group in _SAME_VALUES)


def numeric_precision_from_typmod(typmod: int) -> int | None:
    """Decode the precision Postgres stores in a numeric column's atttypmod (-1 when unconstrained)."""
    if typmod < 4:
        return None
    return ((typmod - 4) >> 16) & 0xFFFF


# Base types whose "=" holds only between values with the same encoding. For other key types (citext,
# numeric 1.0 = 1.00, float -0 = 0, interval '1 day' = '24 hours', bpchar 'ab ' = 'ab', …) equal keys can
# arrive on Turso as different keys, so capture compares their encoded form instead. Text types are
# identities only under a deterministic collation (layout.Column.deterministic).
_EQUALITY_IS_IDENTITY = frozenset(
    {"int2", "int4", "int8", "oid", "bool", "text", "varchar", "name", "uuid", "bytea", "date",
     "timestamp", "timestamptz"}
)


def equality_is_identity(base_type: str) -> bool:
    return base_type in _EQUALITY_IS_IDENTITY
