"""Unit tests of capture.py: the Postgres SQL text of the capture trigger function and the initial copy."""

from __future__ import annotations

import re

import pytest
from pgturso import capture
from pgturso.capture import (
    CHUNK_ROWS,
    capture_function_sql,
    pack_sql,
    row_json_sql,
    snapshot_sql,
)
from pgturso.layout import TableLayout


def col(name: str, base_type: str, not_null: bool = False) -> dict[str, object]:
    return {"name": name, "pg_type": base_type, "base_type": base_type, "typmod": -1, "not_null": not_null}


DOCS = TableLayout.from_catalog(
    "public.docs",
    "docs",
    [col("id", "int4", True), col("body", "bytea"), col("meta", "jsonb"), col("Ver", "int4", True)],
    ["Ver", "id"],
)


def wide(ncols: int) -> TableLayout:
    return TableLayout.from_catalog(
        "public.wide", "wide", [col(f"c{i}", "bytea" if i == 1 else "int4", i == 0) for i in range(ncols)], ["c0"]
    )


def test_row_json_sql_uses_each_columns_encoding() -> None:
    assert row_json_sql(DOCS, "src") == (
        """json_build_array(src."id", encode(src."body", 'hex'), src."meta"::text, src."Ver")::text"""
    )


def test_row_json_sql_key_only_in_key_order() -> None:
    assert row_json_sql(DOCS, "o", key_only=True) == 'json_build_array(o."Ver", o."id")::text'


def test_row_json_sql_quotes_column_names() -> None:
    layout = TableLayout.from_catalog("public.q", "q", [col('a"b c', "text", True)], ['a"b c'])
    assert row_json_sql(layout, "src") == 'json_build_array(src."a""b c")::text'


def test_row_json_sql_up_to_100_columns_uses_json_build_array() -> None:
    sql = row_json_sql(wide(100), "src")
    assert sql.startswith('json_build_array(src."c0", encode(src."c1", \'hex\'), src."c2", ')
    assert sql.endswith('src."c99")::text')
    assert sql.count("src.") == 100
    assert "ARRAY[" not in sql


def test_row_json_sql_over_100_columns_builds_text_array() -> None:
    sql = row_json_sql(wide(101), "src")
    assert "json_build_array" not in sql
    assert sql.startswith(
        "'[' || array_to_string(ARRAY[coalesce(to_json(src.\"c0\")::text, 'null'), "
        "coalesce(to_json(encode(src.\"c1\", 'hex'))::text, 'null'), "
        "coalesce(to_json(src.\"c2\")::text, 'null'), "
    )
    assert sql.endswith("coalesce(to_json(src.\"c100\")::text, 'null')], ',') || ']'")
    assert sql.count("coalesce(to_json(") == 101
    # Every column appears once, in order.
    assert re.findall(r'src\."(c\d+)"', sql) == [f"c{i}" for i in range(101)]


def test_pack_sql() -> None:
    assert pack_sql(7, "U", "ROWEXPR", "new_rows") == (
        "INSERT INTO pgturso.outbox (layout_id, op, nrows, payload) "
        "SELECT 7, 'U', count(*), string_agg(packed.row_json, ',') "
        f"FROM (SELECT ROWEXPR AS row_json, (row_number() OVER () - 1) / {CHUNK_ROWS} AS chunk "
        "FROM new_rows AS src) AS packed GROUP BY packed.chunk"
    )
    assert CHUNK_ROWS == 1000


def test_pack_sql_layout_id_is_coerced_to_int() -> None:
    assert pack_sql(True, "D", "x", "old_rows").startswith(  # type: ignore[arg-type]
        "INSERT INTO pgturso.outbox (layout_id, op, nrows, payload) SELECT 1, 'D', "
    )


def test_snapshot_sql() -> None:
    assert snapshot_sql(DOCS, 3, 'public."docs"') == pack_sql(3, "U", row_json_sql(DOCS, "src"), 'public."docs"')


def _function_body(sql: str) -> tuple[str, str]:
    match = re.search(r"\nAS (\$pgturso\d+\$)(.*)\1\Z", sql, flags=re.S)
    assert match, sql
    return match.group(1), match.group(2)


def test_capture_function_sql_header() -> None:
    sql = capture_function_sql(DOCS, 12, 'capture "12"')
    header, rest = sql.split("\nAS $pgturso0$", 1)
    first, second = header.split("\n")
    assert first == 'CREATE OR REPLACE FUNCTION pgturso."capture ""12"""() RETURNS trigger'
    assert second.startswith("LANGUAGE plpgsql SECURITY DEFINER SET ")
    # Every value's text form must not depend on the writing session's settings.
    for setting in (
        "SET search_path = pg_catalog, pg_temp",
        "SET TimeZone = 'UTC'",
        "SET DateStyle = 'ISO, YMD'",
        "SET IntervalStyle = 'iso_8601'",
        "SET extra_float_digits = 1",
    ):
        assert setting in second
    assert rest.startswith("\nBEGIN\n")


def test_capture_function_sql_has_all_four_branches() -> None:
    sql = capture_function_sql(DOCS, 12, "capture_12")
    tag, body = _function_body(sql)
    assert tag == "$pgturso0$"
    upsert_new = pack_sql(12, "U", row_json_sql(DOCS, "src"), "new_rows")
    delete_old = pack_sql(12, "D", row_json_sql(DOCS, "src", key_only=True), "old_rows")
    moved = (
        '(SELECT o.* FROM old_rows AS o WHERE NOT EXISTS (SELECT 1 FROM new_rows AS n WHERE n."Ver" = o."Ver" '
        'AND n."id" = o."id"))'
    )
    delete_moved = pack_sql(12, "D", row_json_sql(DOCS, "src", key_only=True), moved)
    truncate = "INSERT INTO pgturso.outbox (layout_id, op, nrows) VALUES (12, 'T', 0)"
    insert_at = body.index("IF TG_OP = 'INSERT' THEN")
    update_at = body.index("ELSIF TG_OP = 'UPDATE' THEN")
    delete_at = body.index("ELSIF TG_OP = 'DELETE' THEN")
    else_at = body.index("ELSE\n")
    end_at = body.index("END IF;")
    assert insert_at < update_at < delete_at < else_at < end_at
    assert body[insert_at:update_at].count(upsert_new + ";") == 1
    update_branch = body[update_at:delete_at]
    # Keys moved away by the UPDATE are deleted before the new rows are written.
    assert update_branch.index(delete_moved + ";") < update_branch.index(upsert_new + ";")
    assert delete_old + ";" in body[delete_at:else_at]
    assert truncate + ";" in body[else_at:end_at]
    assert body.index("PERFORM pg_notify('pgturso', '');") > end_at
    assert body.rstrip().endswith("RETURN NULL;\nEND")


@pytest.mark.parametrize(
    ("column", "tag"),
    [
        ("$pgturso0$", "$pgturso1$"),
        ("$pgturso0$$pgturso1$", "$pgturso2$"),
        ("$pgturso1$", "$pgturso0$"),
        ("pgturso0", "$pgturso0$"),
    ],
)
def test_dollar_tag_never_occurs_in_body(column: str, tag: str) -> None:
    layout = TableLayout.from_catalog("public.t", "t", [col(column, "text", True)], [column])
    sql = capture_function_sql(layout, 1, "capture_1")
    found_tag, body = _function_body(sql)
    assert found_tag == tag
    assert tag not in body
    assert sql.count(tag) == 2
    assert f'"{column}"' in body


def test_dollar_tag_helper() -> None:
    assert capture._dollar_tag("nothing") == "$pgturso0$"
    assert capture._dollar_tag("$pgturso0$ $pgturso1$ $pgturso3$") == "$pgturso2$"
