-- PL/Python entry points. They stay one import long: the logic lives in the pgturso Python package
-- (worker/pgturso), which `make install` copies to @PYTHON_DIR@ for the server's Python.

CREATE OR REPLACE FUNCTION pgturso._plan_layout(
    layout_id integer, relation text, source_table text, target_table text,
    columns jsonb, key_columns text[], function_name text, indexes jsonb, row_filter text, route_by text,
    reference boolean DEFAULT false
) RETURNS jsonb
LANGUAGE plpython3u
@SESSION_SETTINGS@
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import plan_table
return plan_table(layout_id, relation, source_table, target_table, columns, key_columns, function_name, indexes,
                  row_filter, route_by, reference)
$$;
COMMENT ON FUNCTION pgturso._plan_layout IS
    'Private: layout, capture and copy SQL of a table (pgturso.extension_api.plan_table).';

CREATE OR REPLACE FUNCTION pgturso._plan_change(
    old_spec jsonb, source_table text, target_table text, columns jsonb, key_columns text[], indexes jsonb,
    row_filter text, route_by text, reference boolean DEFAULT false
) RETURNS jsonb
LANGUAGE plpython3u
@SESSION_SETTINGS@
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import plan_change
return plan_change(old_spec, source_table, target_table, columns, key_columns, indexes, row_filter, route_by,
                   reference)
$$;
COMMENT ON FUNCTION pgturso._plan_change IS
    'Private: how a tracked table''s layout changed (pgturso.extension_api.plan_change).';

CREATE OR REPLACE FUNCTION pgturso._plan_rows(layout_id integer, spec jsonb, relation text, op text) RETURNS text
LANGUAGE plpython3u
@SESSION_SETTINGS@
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import rows_sql
return rows_sql(layout_id, spec, relation, op)
$$;
COMMENT ON FUNCTION pgturso._plan_rows IS
    'Private: SQL sending every row of a relation as upserts (U) or its keys as deletes (D).';

CREATE OR REPLACE FUNCTION pgturso._plan_tenant_rows(layout_id integer, spec jsonb, relation text) RETURNS text
LANGUAGE plpython3u
@SESSION_SETTINGS@
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import tenant_rows
return tenant_rows(layout_id, spec, relation)
$$;
COMMENT ON FUNCTION pgturso._plan_tenant_rows IS
    'Private: SQL queueing every row of a reference table for one new tenant ($1).';

CREATE OR REPLACE FUNCTION pgturso._plan_copy_chunk(layout_id integer, spec jsonb, relation text, max_rows integer)
RETURNS jsonb
LANGUAGE plpython3u
@SESSION_SETTINGS@
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import copy_chunk
return copy_chunk(layout_id, spec, relation, max_rows)
$$;
COMMENT ON FUNCTION pgturso._plan_copy_chunk IS
    'Private: SQL copying the next chunk of a table''s rows (pgturso.capture.copy_chunk_sql).';

CREATE OR REPLACE FUNCTION pgturso._plan_regenerate(layout_id integer, spec jsonb, function_name text,
                                                    columns jsonb)
RETURNS jsonb
LANGUAGE plpython3u
@SESSION_SETTINGS@
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import regenerate_capture
return regenerate_capture(layout_id, spec, function_name, columns)
$$;
COMMENT ON FUNCTION pgturso._plan_regenerate IS
    'Private: a tracked table''s capture function SQL from its stored layout, re-encoded as this version '
    'encodes its columns'' types (upgrades regenerate them).';
REVOKE ALL ON FUNCTION pgturso._plan_regenerate(integer, jsonb, text, jsonb) FROM PUBLIC;
