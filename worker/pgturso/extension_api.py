"""What the extension's PL/Python functions call. Kept free of third-party imports: it runs inside Postgres.

Each function takes and returns JSON-compatible values so that the SQL wrappers stay one line long.
"""

from __future__ import annotations

import json
from typing import Any

from .capture import capture_function_sql, snapshot_sql
from .layout import TableLayout


def plan_table(
    layout_id: int,
    relation: str,
    source_table: str,
    target_table: str,
    columns_json: str,
    key_columns: list[str],
    function_name: str,
) -> str:
    """Compute a table's layout and the SQL that installs its capture and copies its rows.

    ``relation`` is the quoted Postgres name to select from; ``source_table`` its readable form.
    Returns JSON: ``spec`` (stored in pgturso.layout), ``capture_function_sql`` and ``snapshot_sql``.
    """
    layout = TableLayout.from_catalog(source_table, target_table, json.loads(columns_json), key_columns)
    plan: dict[str, Any] = {
        "spec": layout.to_spec(),
        "capture_function_sql": capture_function_sql(layout, layout_id, function_name),
        "snapshot_sql": snapshot_sql(layout, layout_id, relation),
    }
    return json.dumps(plan)
