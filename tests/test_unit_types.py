"""Unit tests of quoting.py, types.py and layout.py (pure functions, no Postgres, no Turso)."""

from __future__ import annotations

import json

import pytest
from pgturso.capture import types
from pgturso.capture.layout import Column, TableLayout
from pgturso.capture.types import ENCODING_SETTINGS, column_type, numeric_precision_from_typmod
from pgturso.common.quoting import qualified_name, quote_ident, quote_literal


def numeric_typmod(precision: int, scale: int = 0) -> int:
    """atttypmod of numeric(precision, scale), as Postgres computes it (scale may be negative on PG 15+)."""
    return ((precision << 16) | (scale & 0x7FF)) + 4


# ---------------------------------------------------------------------------------------------- quoting


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("plain", '"plain"'),
        ("MixedCase", '"MixedCase"'),
        ('a"b', '"a""b"'),
        ('"', '""""'),
        ('""', '""""""'),
        ('"leading and trailing"', '"""leading and trailing"""'),
        ("with space", '"with space"'),
        ("schema.table", '"schema.table"'),
        ("é😀漢字", '"é😀漢字"'),
        ("select", '"select"'),
        ("order", '"order"'),
        ("a'b", '"a\'b"'),
        ("semi;colon -- comment", '"semi;colon -- comment"'),
        ("$pgturso0$", '"$pgturso0$"'),
        ("new\nline", '"new\nline"'),
    ],
)
def test_quote_ident(name: str, quoted: str) -> None:
    assert quote_ident(name) == quoted


@pytest.mark.parametrize("name", ["\x00", "a\x00b", 'x"\x00'])
def test_quote_ident_rejects_nul(name: str) -> None:
    with pytest.raises(ValueError, match="NUL"):
        quote_ident(name)


def test_quote_literal_and_qualified_name() -> None:
    assert quote_literal("it's") == "E'it''s'"
    assert quote_literal("") == "E''"
    # A backslash cannot end the constant early, whatever standard_conforming_strings says.
    assert quote_literal("\\'||x()--") == "E'\\\\''||x()--'"
    assert qualified_name("my schema", 'ta"ble') == '"my schema"."ta""ble"'
    with pytest.raises(ValueError, match="NUL"):
        quote_literal("a\x00")
    with pytest.raises(ValueError, match="NUL"):
        qualified_name("public", "t\x00")


# ------------------------------------------------------------------------------------------------ types

EXPECTED_BASE_TYPES = {
    # base type: (sqlite type, encode template, decode template)
    "int2": ("INTEGER", "{col}", "{val}"),
    "int4": ("INTEGER", "{col}", "{val}"),
    "int8": ("INTEGER", "{col}", "{val}"),
    "oid": ("INTEGER", "{col}", "{val}"),
    "float4": ("REAL", types.FLOAT.encode, types.FLOAT.decode),
    "float8": ("REAL", types.FLOAT.encode, types.FLOAT.decode),
    "bool": ("INTEGER", "{col}", "{val}"),
    "text": ("TEXT", "{col}", "{val}"),
    "varchar": ("TEXT", "{col}", "{val}"),
    "bpchar": ("TEXT", "{col}", "{val}"),
    "name": ("TEXT", "{col}", "{val}"),
    "citext": ("TEXT", "{col}", "{val}"),
    "char": ("TEXT", "{col}", "{val}"),
    "uuid": ("TEXT", "{col}", "{val}"),
    "bytea": ("BLOB", "encode({col}, 'hex')", "unhex({val})"),
    "json": ("TEXT", "{col}::text", "{val}"),
    "jsonb": ("TEXT", "{col}::text", "{val}"),
    "date": ("TEXT", "{col}", "{val}"),
    "timestamp": ("TEXT", "{col}", "{val}"),
    "timestamptz": ("TEXT", "{col}", "{val}"),
    "time": ("TEXT", "{col}", "{val}"),
    "timetz": ("TEXT", "{col}", "{val}"),
    "interval": ("TEXT", "{col}", "{val}"),
    "money": ("TEXT", "{col}::numeric::text", "{val}"),
}


@pytest.mark.parametrize("base_type", sorted(EXPECTED_BASE_TYPES))
def test_column_type_of_every_mapped_base_type(base_type: str) -> None:
    ctype = column_type(base_type)
    assert (ctype.sqlite_type, ctype.encode, ctype.decode) == EXPECTED_BASE_TYPES[base_type]


def test_every_mapped_base_type_is_tested() -> None:
    assert set(types._BY_BASE_TYPE) == set(EXPECTED_BASE_TYPES)


@pytest.mark.parametrize("base_type", ["_int4", "_text", "inet", "point", "my_composite", "numrange"])
def test_unmapped_types_fall_back_to_text(base_type: str) -> None:
    ctype = column_type(base_type)
    assert ctype is types.JSON_FALLBACK
    assert (ctype.sqlite_type, ctype.encode, ctype.decode) == ("TEXT", "{col}", "{val}")


@pytest.mark.parametrize(
    ("precision", "sqlite_type", "encode"),
    [
        (1, "NUMERIC", "{col}"),
        (10, "NUMERIC", "{col}"),
        (15, "NUMERIC", "{col}"),
        (16, "TEXT", "{col}::text"),
        (38, "TEXT", "{col}::text"),
        (1000, "TEXT", "{col}::text"),
        (None, "TEXT", "{col}::text"),
    ],
)
def test_numeric_precision_rule(precision: int | None, sqlite_type: str, encode: str) -> None:
    ctype = column_type("numeric", precision)
    assert (ctype.sqlite_type, ctype.encode, ctype.decode) == (sqlite_type, encode, "{val}")


def test_precision_is_ignored_for_other_types() -> None:
    assert column_type("int4", 3) is types.INTEGER
    assert column_type("text", 40) is types.TEXT


@pytest.mark.parametrize(
    ("typmod", "precision"),
    [
        (-1, None),
        (0, None),
        (3, None),
        (((10 << 16) | 2) + 4, 10),
        (numeric_typmod(10, 2), 10),
        (numeric_typmod(15), 15),
        (numeric_typmod(16, 4), 16),
        (numeric_typmod(1000, 1000), 1000),
        (numeric_typmod(10, -2), 10),  # negative scale, Postgres 15+
    ],
)
def test_numeric_precision_from_typmod(typmod: int, precision: int | None) -> None:
    assert numeric_precision_from_typmod(typmod) == precision


# ----------------------------------------------------------------------------------------------- layout

CATALOG_COLUMNS = [
    {"name": "id", "pg_type": "bigint", "base_type": "int8", "typmod": -1, "not_null": True},
    {
        "name": "price",
        "pg_type": "numeric(10,2)",
        "base_type": "numeric",
        "typmod": numeric_typmod(10, 2),
        "not_null": False,
    },
    {
        "name": "big",
        "pg_type": "numeric(20,0)",
        "base_type": "numeric",
        "typmod": numeric_typmod(20),
        "not_null": False,
    },
    {"name": "any_num", "pg_type": "numeric", "base_type": "numeric", "typmod": -1, "not_null": False},
    {"name": "photo", "pg_type": "bytea", "base_type": "bytea", "typmod": -1, "not_null": False},
    {"name": "Region", "pg_type": "character varying(8)", "base_type": "varchar", "typmod": 12, "not_null": True},
    {"name": "tags", "pg_type": "text[]", "base_type": "_text", "not_null": False},  # typmod omitted
]


def make_layout() -> TableLayout:
    return TableLayout.from_catalog('public."Orders"', "Orders", CATALOG_COLUMNS, ["Region", "id"])


def test_from_catalog_maps_every_column() -> None:
    layout = make_layout()
    assert layout.source_table == 'public."Orders"'
    assert layout.target_table == "Orders"
    assert layout.key_columns == ("Region", "id")
    assert layout.columns == (
        Column("id", "bigint", "INTEGER", "{col}", "{val}", True, "int8", 1, ()),
        Column("price", "numeric(10,2)", "NUMERIC", "{col}", "{val}", False, "numeric", 2, ()),
        Column("big", "numeric(20,0)", "TEXT", "{col}::text", "{val}", False, "numeric", 3, ()),
        Column("any_num", "numeric", "TEXT", "{col}::text", "{val}", False, "numeric", 4, ()),
        Column("photo", "bytea", "BLOB", "encode({col}, 'hex')", "unhex({val})", False, "bytea", 5, ()),
        Column("Region", "character varying(8)", "TEXT", "{col}", "{val}", True, "varchar", 6, ()),
        Column("tags", "text[]", "TEXT", "{col}", "{val}", False, "_text", 7, ENCODING_SETTINGS),  # an array
    )


def test_key_positions_and_key_layout_follow_key_order() -> None:
    layout = make_layout()
    assert layout.key_positions == [5, 0]
    assert [c.name for c in layout.key_layout] == ["Region", "id"]


def test_spec_roundtrip_through_json() -> None:
    layout = make_layout()
    spec = layout.to_spec()
    assert spec["key_columns"] == ["Region", "id"]
    assert spec["columns"][1] == {
        "name": "price",
        "pg_type": "numeric(10,2)",
        "sqlite_type": "NUMERIC",
        "encode": "{col}",
        "decode": "{val}",
        "not_null": False,
        "base_type": "numeric",
        "attnum": 2,
        "settings": (),
        "deterministic": True,
        "base_pg_type": "",
    }
    stored = json.loads(json.dumps(spec))  # as pgturso.layout.spec (jsonb) gives it back
    assert TableLayout.from_spec(stored) == layout
    assert TableLayout.from_spec(stored).to_spec() == spec


def test_missing_key_column_raises() -> None:
    with pytest.raises(ValueError, match=r"public\.t: key columns \['nope'\] are not columns"):
        TableLayout.from_catalog("public.t", "t", CATALOG_COLUMNS, ["id", "nope"])


def test_empty_key_raises() -> None:
    with pytest.raises(ValueError, match="key columns"):
        TableLayout.from_catalog("public.t", "t", CATALOG_COLUMNS, [])


def test_key_column_names_are_case_sensitive() -> None:
    with pytest.raises(ValueError, match="region"):
        TableLayout.from_catalog("public.t", "t", CATALOG_COLUMNS, ["region"])
