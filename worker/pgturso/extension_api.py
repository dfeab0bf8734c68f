"""What the extension's PL/Python functions call. Kept free of third-party imports: it runs inside Postgres.

Each function takes and returns JSON-compatible values so that the SQL wrappers stay one line long.
"""

from __future__ import annotations

import json
from typing import Any

from .capture.layout import TableLayout, change_between
from .capture.sql import (
    capture_function_sql,
    copy_chunk_sql,
    filtered,
    pack_sql,
    refresh_function_sql,
    register_tenants_sql,
    route_expr,
    row_json_sql,
    snapshot_sql,
    tenant_rows_sql,
)


def _layout(source_table: str, target_table: str, columns_json: str, key_columns: list[str],
            indexes_json: str | None, row_filter: str | None, route_by: str | None,
            reference: bool = False) -> TableLayout:
    indexes = json.loads(indexes_json) if indexes_json else []
    return TableLayout.from_catalog(source_table, target_table, json.loads(columns_json), key_columns, indexes,
                                    row_filter, route_by, reference)


def plan_table(
    layout_id: int,
    relation: str,
    source_table: str,
    target_table: str,
    columns_json: str,
    key_columns: list[str],
    function_name: str,
    indexes_json: str | None = None,
    row_filter: str | None = None,
    route_by: str | None = None,
    reference: bool = False,
) -> str:
    """Compute a table's layout and the SQL that installs its capture and copies its rows.

    ``relation`` is the quoted Postgres name to select from; ``source_table`` its readable form.
    Returns JSON: ``spec`` (stored in pgturso.layout), ``capture_function_sql``, ``snapshot_sql`` and
    ``refresh_function_sql`` (for materialized views).
    """
    layout = _layout(source_table, target_table, columns_json, key_columns, indexes_json, row_filter, route_by,
                     reference)
    plan: dict[str, Any] = {
        "spec": layout.to_spec(),
        # pgturso._capture_function_name(table_id) is '_capture_<table_id>'.
        "capture_function_sql": capture_function_sql(layout, layout_id, function_name,
                                                     int(function_name.rsplit("_", 1)[1])),
        "snapshot_sql": snapshot_sql(layout, layout_id, relation),
        "refresh_function_sql": refresh_function_sql(layout, layout_id, function_name + "_refresh"),
    }
    return json.dumps(plan)


def plan_change(old_spec_json: str, source_table: str, target_table: str, columns_json: str,
                key_columns: list[str], indexes_json: str | None, row_filter: str | None = None,
                route_by: str | None = None, reference: bool = False) -> str:
    """Compare a table's stored layout with what the catalog says now (after DDL).

    Returns JSON: ``changed`` (false: nothing to do), ``spec`` (the new layout), ``recopy`` (the Turso table
    must be created afresh and copied again) and ``added`` (new columns; if Postgres filled them with
    values, the caller recopies as well).
    """
    old = TableLayout.from_spec(json.loads(old_spec_json))
    new = _layout(source_table, target_table, columns_json, key_columns, indexes_json, row_filter, route_by,
                  reference)
    if new == old:
        return json.dumps({"changed": False})
    change = change_between(old, new)
    return json.dumps({"changed": True, "spec": new.to_spec(), "recopy": change.recopy, "added": list(change.added)})


def rows_sql(layout_id: int, spec_json: str, relation: str, op: str) -> str:
    """SQL sending every row of ``relation`` (a partition) as upserts ('U') or its keys as deletes ('D')."""
    layout = TableLayout.from_spec(json.loads(spec_json))
    packed = pack_sql(layout_id, op, row_json_sql(layout, "src", key_only=(op == "D")), filtered(layout, relation),
                      route_expr(layout, "src"), layout.reference)
    register = register_tenants_sql(layout, layout_id, relation) if op == "U" else ""
    return f"{register}; {packed}" if register else packed


def tenant_rows(layout_id: int, spec_json: str, relation: str) -> str:
    """SQL queueing every row of a reference table for one new tenant, ``$1`` (capture.tenant_rows_sql)."""
    return tenant_rows_sql(TableLayout.from_spec(json.loads(spec_json)), layout_id, relation)


def copy_chunk(layout_id: int, spec_json: str, relation: str, limit: int) -> str:
    """SQL copying the next chunk of a table's rows, as JSON {bound, chunk} (see capture.copy_chunk_sql)."""
    bound, chunk = copy_chunk_sql(TableLayout.from_spec(json.loads(spec_json)), layout_id, relation, limit)
    return json.dumps({"bound": bound, "chunk": chunk})


def regenerate_capture(layout_id: int, spec_json: str, function_name: str, columns_json: str) -> str:
    """The capture (or, for a materialized view, refresh) function of a stored layout, as JSON
    {spec, capture_function_sql, refresh_function_sql}: an upgrade regenerates every tracked table's
    functions with this version's code, from the layout the table already has (no DDL, no event), its columns
    encoded as this version encodes their catalog types (``columns``, from ``_describe``) where Turso's
    values keep their form (TableLayout.reencoded); ``spec`` is that layout, stored back in its place."""
    layout = TableLayout.from_spec(json.loads(spec_json)).reencoded(json.loads(columns_json))
    table_id = int(function_name.rsplit("_", 1)[1])
    return json.dumps({
        "spec": layout.to_spec(),
        "capture_function_sql": capture_function_sql(layout, layout_id, function_name, table_id),
        "refresh_function_sql": refresh_function_sql(layout, layout_id, function_name + "_refresh"),
    })
