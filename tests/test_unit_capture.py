"""Unit tests of capture.py: the Postgres SQL text of the capture trigger function and the initial copy."""

from __future__ import annotations

import re

import pytest
from pgturso.capture import sql as capture
from pgturso.capture.layout import TableLayout
from pgturso.capture.sql import (
    CAPTURE_SETTINGS,
    CHUNK_ROWS,
    NOTIFY_ENABLED,
    SESSION_SETTINGS,
    WAKE_LOCK_CLASS,
    capture_function_sql,
    capture_settings,
    pack_sql,
    row_json_sql,
    snapshot_sql,
)


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
    # Integer-only rows are concatenated (cheaper than json_build_array); the JSON is the same array.
    assert row_json_sql(DOCS, "o", key_only=True) == (
        "('[' || coalesce(o.\"Ver\"::text, 'null') || ',' || coalesce(o.\"id\"::text, 'null') || ']')"
    )


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
    sql = capture_function_sql(DOCS, 12, 'capture "12"', 12)
    header, rest = sql.split("\nAS $pgturso0$", 1)
    first, second = header.split("\n")
    assert first == 'CREATE OR REPLACE FUNCTION pgturso."capture ""12"""() RETURNS trigger'
    assert second.startswith("LANGUAGE plpgsql SECURITY DEFINER SET ")
    # DOCS (int4, bytea, jsonb): no value's form depends on a session setting, so only search_path and
    # standard_conforming_strings (how the body's string constants read) are pinned.
    assert second == ("LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp "
                      "SET standard_conforming_strings = on")
    assert rest.startswith("\nDECLARE\n")


@pytest.mark.parametrize(
    ("base_type", "pinned"),
    [
        ("int4", []),
        ("float8", ["SET extra_float_digits = 1"]),
        ("timestamptz", ["SET TimeZone = 'UTC'"]),
        ("timestamp", []),
        ("interval", ["SET IntervalStyle = 'iso_8601'"]),
        ("tstzrange", ["SET TimeZone = 'UTC'", "SET DateStyle = 'ISO, YMD'", "SET IntervalStyle = 'iso_8601'",
                       "SET extra_float_digits = 1"]),
    ],
)
def test_capture_pins_exactly_the_settings_its_types_depend_on(base_type: str, pinned: list[str]) -> None:
    layout = TableLayout.from_catalog("public.t", "t", [col("id", "int4", True), col("v", base_type)], ["id"])
    assert capture_settings(layout) == ["SET search_path = pg_catalog, pg_temp",
                                        "SET standard_conforming_strings = on", *pinned]
    assert set(capture_settings(layout)) <= set(CAPTURE_SETTINGS)
    assert CAPTURE_SETTINGS[:len(SESSION_SETTINGS)] == SESSION_SETTINGS


def test_a_sleeping_worker_is_notified_only_when_it_holds_the_wake_lock() -> None:
    _, body = _function_body(capture_function_sql(DOCS, 12, "capture_12", 7))
    gate = (f"IF {NOTIFY_ENABLED} THEN\n    IF NOT pg_try_advisory_xact_lock_shared({WAKE_LOCK_CLASS}, 7) THEN\n"
            "      PERFORM pg_notify('pgturso', '');")
    assert gate in body and body.count("pg_notify") == 1


def test_capture_function_sql_has_all_four_branches() -> None:
    sql = capture_function_sql(DOCS, 12, "capture_12", 12)
    tag, body = _function_body(sql)
    assert tag == "$pgturso0$"
    row, key = row_json_sql(DOCS, "src"), row_json_sql(DOCS, "src", key_only=True)
    moved = (
        '(SELECT o.* FROM old_rows AS o WHERE NOT EXISTS (SELECT 1 FROM new_rows AS n WHERE n."Ver" = o."Ver" '
        'AND n."id" = o."id"))'
    )
    truncate = "INSERT INTO pgturso.outbox (layout_id, op, nrows) VALUES (12, 'T', 0)"
    truncate_at = body.index("IF TG_OP = 'TRUNCATE' THEN")
    insert_at = body.index("IF TG_OP = 'INSERT' THEN")
    update_at = body.index("ELSIF TG_OP = 'UPDATE' THEN")
    delete_at = body.index("\n      ELSE\n", update_at)
    handler_at = body.index("EXCEPTION WHEN OTHERS THEN")
    write_at = body.index("INSERT INTO pgturso.outbox (layout_id, op, nrows, payload)")
    assert truncate_at < insert_at < update_at < delete_at < handler_at < write_at
    assert truncate + ";" in body[truncate_at:insert_at]
    # Packing only reads (no outbox write inside the exception block, so its subtransaction takes no xid).
    assert "INSERT INTO" not in body[insert_at:handler_at] and "pgturso.outbox" not in body[insert_at:handler_at]
    # Statements of up to CHUNK_ROWS rows take one event; larger ones are packed in chunks.
    small_insert = f"SELECT count(*), string_agg({row}, ',') INTO v_count, v_payload FROM new_rows AS src"
    assert small_insert in body[insert_at:update_at]
    chunked = f"SELECT {row} AS row_json, (row_number() OVER () - 1) / 1000 AS chunk FROM new_rows"
    assert chunked in body[insert_at:update_at]
    update_branch = body[update_at:delete_at]
    # Keys moved away by the UPDATE are deleted before the new rows are written.
    moved_at = update_branch.index(f"SELECT {key} AS row_json, (row_number() OVER () - 1) / 1000 AS chunk FROM {moved}")
    assert moved_at < update_branch.index(small_insert)
    assert f"string_agg({key}, ',') INTO v_count, v_payload FROM old_rows AS src" in body[delete_at:handler_at]
    assert "pgturso._capture_failed(12, TG_RELID, SQLSTATE, SQLERRM)" in body[handler_at:write_at]
    assert "FROM unnest(v_ops, v_counts, v_payloads)" in body[write_at:]
    assert body.index("PERFORM pg_notify('pgturso', '');") > write_at
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
    sql = capture_function_sql(layout, 1, "capture_1", 1)
    found_tag, body = _function_body(sql)
    assert found_tag == tag
    assert tag not in body
    assert sql.count(tag) == 2
    assert f'"{column}"' in body


def test_dollar_tag_helper() -> None:
    assert capture._dollar_tag("nothing") == "$pgturso0$"
    assert capture._dollar_tag("$pgturso0$ $pgturso1$ $pgturso3$") == "$pgturso2$"


def test_a_row_filter_restricts_every_row_source_and_round_trips_through_the_spec() -> None:
    filtered_docs = TableLayout.from_catalog(
        "public.docs", "docs", [col("id", "int4", True), col("found", "int4")], ["id"], row_filter="(found > 0)")
    assert TableLayout.from_spec(filtered_docs.to_spec()) == filtered_docs
    assert "row_filter" not in DOCS.to_spec()  # layouts without a filter are stored as before
    assert capture.filtered(DOCS, "new_rows") == "new_rows"
    assert capture.filtered(filtered_docs, "new_rows") == "(SELECT * FROM new_rows AS filtered WHERE ((found > 0)))"
    body = _function_body(capture_function_sql(filtered_docs, 4, "c", 4))[1]
    assert body.startswith("\n#variable_conflict use_column\nDECLARE")  # a column named like a PL/pgSQL variable
    # new rows, old rows, and both sides of the moved keys: every transition table is read through the filter
    assert re.findall(r"FROM (?:new|old)_rows AS (\w+)", body) and set(
        re.findall(r"FROM (?:new|old)_rows AS (\w+)", body)) == {"filtered"}
    assert "WHERE ((found > 0))" in snapshot_sql(filtered_docs, 4, "t")
    assert "AND ((found > 0)) FOR SHARE" in capture.copy_chunk_sql(filtered_docs, 4, "t", 10)[1]
    assert "WHERE ((found > 0))" in capture.refresh_function_sql(filtered_docs, 4, "c_refresh")


def test_a_reference_table_queues_every_event_once_per_tenant_and_round_trips_through_the_spec() -> None:
    plans = TableLayout.from_catalog("public.plans", "plans", [col("id", "int4", True), col("name", "text")], ["id"],
                                     reference=True)
    assert TableLayout.from_spec(plans.to_spec()) == plans and plans.to_spec()["reference"] is True
    assert "reference" not in DOCS.to_spec()  # other layouts are stored as before
    fan_out = "CROSS JOIN pgturso._pattern_tenants(7) AS g(tenant)"
    body = _function_body(capture_function_sql(plans, 7, "c", 4))[1]
    # each event once per tenant, in statement order for each tenant; TRUNCATE through _fan_out
    assert f"{fan_out} ORDER BY e.ord, g.tenant" in body and "pgturso._fan_out(7, 'T', NULL)" in body
    assert "INSERT INTO pgturso.outbox (layout_id, op, nrows, payload)\n" not in body  # never without a tenant
    for copy in (snapshot_sql(plans, 7, "t"), capture.copy_chunk_sql(plans, 7, "t", 10)[1]):
        assert f"{fan_out} ORDER BY p.chunk, g.tenant" in copy
    # a new tenant's copy of the rows: its tenant is the statement's parameter
    assert "$1::text AS tenant" in capture.tenant_rows_sql(plans, 7, "t")
    # route_by wins: a routed table is never a reference table
    routed = TableLayout.from_catalog("public.o", "o", [col("id", "int4", True), col("t", "text", True)], ["id"],
                                      route_by="t", reference=True)
    assert not routed.reference
